"""`make gpu-check` without CUDA: every step of the GPU check at toy size on the CPU (a dry run),
so the script that runs when a GPU is lent cannot rot."""
import json
import subprocess

from conftest import ROOT


def test_gpu_check_dry_run_runs_every_step_and_reports(tmp_path):
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "gpu-check", f"GPU_OUT={tmp_path}",
         "GPU_CHECK_ARGS=--dry-run --seconds 1 --concurrency 1 4 --images-per-request 4 "
         "--workers 3 --compare tta_margin=0.3"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] and "DRY RUN" in (tmp_path / "report.md").read_text()
    assert report["cuda_tests"]["exit_code"] == 0 and "2 skipped" in report["cuda_tests"]["summary"]
    assert 0 <= report["training"]["val_accuracy"] <= 1 and report["training"]["val_size"] == 100
    served = report["serving"]
    assert served["holdout_images"] == 500
    assert (served["workers_at_start"]["ready"], served["workers_scaled"]["ready"],
            served["workers_scaled_back"]["ready"]) == (2, 3, 2)
    assert [r["concurrency"] for r in served["load"]] == [1, 4]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in served["load"] + [served["one_image"]])
    assert (tmp_path / "store" / "cifar10.mar").exists()
    compared = report["compare"]
    assert compared["settings"] == {"tta_margin": 0.3}
    assert [r["concurrency"] for r in compared["serving"]["load"]] == [1, 4]
    assert "tta_margin=0.3" in (tmp_path / "report.md").read_text()
    assert "tta_margin: 0.3" in (tmp_path / "model-config.compare.yaml").read_text()
