"""bench/gpu_recipes.py (issue: a 94 % model, trained where a GPU is lent): its dry run trains,
exports and scores one candidate at toy size on the CPU, so the GPU run cannot rot."""
import json

from bench import gpu_recipes


def test_dry_run_scores_a_candidate_as_served(tmp_path):
    assert gpu_recipes.main([str(tmp_path), "--dry-run", "--recipes", "shipped-40"]) == 0
    (row,) = json.loads((tmp_path / "recipes.json").read_text())
    assert row["recipe"] == "shipped-40" and set(row["holdout"]) == {"fp32", "int8"}
    assert all(0 <= accuracy <= 1 for accuracy in row["holdout"].values())
    assert row["cpu_int8_ms_per_image"] > 0
    table = (tmp_path / "recipes.md").read_text()
    assert "DRY RUN" in table and "| shipped-40 |" in table
    assert (tmp_path / "shipped-40.int8.onnx").exists()
