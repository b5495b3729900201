"""The GPU path, proven in one run: `make gpu-check` on a machine with CUDA (about 8 minutes).

1. the CUDA tests, and the device;
2. train.py with a GPU recipe (a wider net, more epochs; AMP and channels_last) on the training
   images, holding out train.py's validation split: its accuracy and seconds;
3. `make archive` of those weights with handler/model-config.gpu.yaml into a model store of its
   own (the shipped CPU weights and model_store/ stay untouched);
4. TorchServe with GPU workers on free loopback ports: real held-out images (tests/holdout) over
   REST, workers scaled through the management API, images/s at several concurrencies with
   multi-image requests, and p50 for one image at a time;
5. report.md and report.json in OUT.

Without CUDA (or with --dry-run) every step runs at toy size on the CPU, on tests/holdout's 500
images, and the report says it is a dry run: CI runs it so that the check cannot rot.

    make gpu-check GPU_OUT=bench/results/gpu          # .venv, or VENV=... (bench/pack_offline.sh)
    python -m bench.gpu_check OUT --dry-run   # from the repo root
"""
import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

import evaluate
from cifar10_serve.forwards import cpu_flags, cpu_name
from tests.harness import GoodTraffic, local_torchserve

ROOT = Path(__file__).resolve().parent.parent

HOLDOUT = ROOT / "tests" / "holdout"
GPU_CONFIG = ROOT / "handler" / "model-config.gpu.yaml"
GPU_RECIPE = "--widths 128 384 384 --epochs 30 --translate 4 --cutout 8 --lr 10"
TOY_RECIPE = "--widths 16 32 32 --epochs 1 --val-size 100 --tta 0 --batch-size 200"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", type=Path, help="folder for report.md, report.json and the run's files")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/cifar10/train",
                   help="ImageFolder of the training images (a dry run uses tests/holdout)")
    p.add_argument("--recipe", default=GPU_RECIPE, help="train.py flags of the GPU recipe")
    p.add_argument("--dry-run", action="store_true", help="toy size on the CPU, even with CUDA")
    p.add_argument("--seconds", type=float,
                   help="seconds of load per concurrency (default: 10, a dry run 2)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--images-per-request", type=int, default=16)
    p.add_argument("--workers", type=int, default=4, help="workers to scale to (management API)")
    p.add_argument("--compare", nargs="+", default=[], metavar="KEY=VALUE",
                   help="serve the same weights again with these model-config.gpu.yaml handler "
                        "settings (e.g. tta_margin=0.3) and report both side by side")
    return p.parse_args(argv)


def step(report, name):
    """Print the step's name and keep its seconds in the report."""
    print(f"== {name}", flush=True)
    report.setdefault("seconds", {})[name] = -time.perf_counter()


def done(report, name):
    report["seconds"][name] += time.perf_counter()


def cuda_tests(out):
    """The tests that need a GPU (they skip without one): (exit code, pytest's summary line)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                             "-k", "gpu_worker", "tests/test_handler.py", "tests/test_onnx.py"],
                            cwd=ROOT, capture_output=True, text=True)
    (out / "cuda_tests.log").write_text(result.stdout + result.stderr)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    return {"exit_code": result.returncode, "summary": summary}


def train(args, out, dry):
    weights = out / "cifar10-gpu.pt"
    data = HOLDOUT if dry else args.data_dir
    command = [sys.executable, "train.py", "--data-dir", str(data), "--out", str(weights),
               "--cache-dir", "", *shlex.split(TOY_RECIPE if dry else args.recipe)]
    if dry:
        command += ["--device", "cpu"]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    checkpoint = torch.load(weights, weights_only=True)
    return weights, {"command": shlex.join(command[1:]),
                     "seconds": round(time.perf_counter() - started, 1),
                     "train_seconds": round(checkpoint.get("train_seconds", 0), 1),
                     "val_accuracy": checkpoint.get("val_accuracy"),
                     "val_size": checkpoint.get("val_size"), "val_tta": checkpoint.get("val_tta"),
                     "model_args": checkpoint.get("model_args")}


def archive(weights, out, config=GPU_CONFIG, name="store"):
    """`make archive` into out/name with ``config`` (the GPU model-config), with this Python's
    environment."""
    store = out / name
    venv = Path(sys.executable).parent.parent
    subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "archive",
                    f"VENV={venv}", f"WEIGHTS={weights}", f"MODEL_STORE={store}",
                    f"MODEL_CONFIG={config}"],
                   check=True)
    return store


def compared_config(out, settings):
    """model-config.gpu.yaml with ``settings`` ("KEY=VALUE", YAML values) in its handler
    section, written to out: (its path, the settings as a dict)."""
    overrides = {key: yaml.safe_load(value) for key, value in
                 (setting.split("=", 1) for setting in settings)}
    config = yaml.safe_load(GPU_CONFIG.read_text())
    config["handler"].update(overrides)
    path = out / "model-config.compare.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, overrides


def workers(client):
    found = client.describe().json()[0]["workers"]
    return {"count": len(found), "ready": sum(w["status"] == "READY" for w in found),
            "on_gpu": sum(bool(w.get("gpu")) for w in found)}


def scale(client, count):
    response = client.scale(count)
    response.raise_for_status()
    deadline = time.monotonic() + 180
    while (state := workers(client))["ready"] != count and time.monotonic() < deadline:
        time.sleep(0.5)
    return state


def load(client, images, concurrency, per_request, seconds):
    """``concurrency`` clients of good traffic (tests/harness.py), ``per_request`` images per
    multipart request, for ``seconds``: images/s, p50 and p99 of the answered requests'
    latency, errors (every answer but a 200, sent once each)."""
    summary = GoodTraffic.of(client, images, clients=concurrency, per_request=per_request,
                             seconds=seconds).start().join().summary()
    ms = (lambda s: None if s is None else round(1000 * s, 2))  # noqa: E731
    return {"concurrency": concurrency, "images_per_request": per_request,
            "requests": summary["ok"], "errors": summary["failed"],
            "images_per_s": round(summary["images_per_s"], 1),
            "p50_ms": ms(summary["p50_s"]), "p99_ms": ms(summary["p99_s"])}


def serve_and_measure(args, store, out, dry, run_name="run"):
    run = out / run_name
    run.mkdir(exist_ok=True)
    images = [p.read_bytes() for p in sorted(HOLDOUT.rglob("*.jpg"))]
    seconds = args.seconds or (2.0 if dry else 10.0)
    with local_torchserve(store, run, timeout=300) as client:
        result = {"workers_at_start": workers(client), "java": client.server.exe()}
        preds, truth = evaluate.predict_served(HOLDOUT, client, concurrency=8)
        result["holdout_accuracy"] = sum(p == t for p, t in zip(preds, truth)) / len(truth)
        result["holdout_images"] = len(truth)
        result["workers_scaled"] = scale(client, args.workers)
        result["load"] = [load(client, images, c, args.images_per_request, seconds)
                          for c in args.concurrency]
        single = load(client, images, 1, 1, seconds)
        result["one_image_p50_ms"], result["one_image"] = single["p50_ms"], single
        result["workers_scaled_back"] = scale(client, 2)
    return result


def machine(dry):
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": torch.get_num_threads()}
    if not dry:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def markdown(report):
    t, s = report["training"], report["serving"]
    lines = [f"# GPU check ({'DRY RUN on the CPU, toy size' if report['dry_run'] else 'GPU'})",
             "", f"{report['date']}; `{report['command']}`", "",
             f"Machine: {json.dumps(report['machine'])}", "",
             f"- CUDA tests: exit {report['cuda_tests']['exit_code']}, "
             f"{report['cuda_tests']['summary']}",
             f"- Training: `{t['command']}`: {t['seconds']} s in all ({t['train_seconds']} s "
             f"training), validation accuracy "
             f"{100 * (t['val_accuracy'] or 0):.2f} % on {t['val_size']} images (tta "
             f"{t['val_tta']})",
             f"- Served by TorchServe: workers at start {s['workers_at_start']}, scaled to "
             f"{s['workers_scaled']}, back to {s['workers_scaled_back']} (on_gpu: workers "
             f"TorchServe gave a GPU)",
             f"- TorchServe's Java: {s['java']}",
             f"- Held-out images over REST (tests/holdout): "
             f"{100 * s['holdout_accuracy']:.2f} % of {s['holdout_images']}",
             f"- One image at a time: p50 {s['one_image_p50_ms']} ms", "",
             "| connections | images/request | images/s | p50 ms | p99 ms | requests | errors |",
             "|--:|--:|--:|--:|--:|--:|--:|"]
    lines += [f"| {r['concurrency']} | {r['images_per_request']} | {r['images_per_s']} | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r['requests']} | {r['errors']} |"
              for r in s["load"]]
    if "compare" in report:
        c = report["compare"]["serving"]
        setting = ", ".join(f"{k}={v}" for k, v in report["compare"]["settings"].items())
        lines += ["", f"Beside the same weights served with {setting} (same run, one server after "
                  f"the other):", "", f"| | GPU config | {setting} |", "|---|--:|--:|",
                  f"| held-out accuracy over REST | {100 * s['holdout_accuracy']:.2f} % | "
                  f"{100 * c['holdout_accuracy']:.2f} % |",
                  f"| one image at a time, p50 ms | {s['one_image_p50_ms']} | "
                  f"{c['one_image_p50_ms']} |"]
        lines += [f"| images/s, {a['concurrency']} connections x {a['images_per_request']} images "
                  f"| {a['images_per_s']} | {b['images_per_s']} |"
                  for a, b in zip(s["load"], c["load"])]
    lines += ["", "Seconds per step: " + ", ".join(f"{k} {v:.0f}"
                                                  for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run or not torch.cuda.is_available()
    report = {"dry_run": dry, "date": datetime.datetime.now(datetime.timezone.utc)
              .strftime("%Y-%m-%d %H:%M UTC"), "command": shlex.join(sys.argv),
              "machine": machine(dry)}
    if dry:
        print("No CUDA device (or --dry-run): a DRY RUN, every step at toy size on the CPU")
    step(report, "cuda_tests")
    report["cuda_tests"] = cuda_tests(out)
    done(report, "cuda_tests")
    step(report, "training")
    weights, report["training"] = train(args, out, dry)
    done(report, "training")
    step(report, "archive")
    store = archive(weights, out)
    report["model_config"] = yaml.safe_load(GPU_CONFIG.read_text())
    done(report, "archive")
    step(report, "serving")
    report["serving"] = serve_and_measure(args, store, out, dry)
    done(report, "serving")
    if args.compare:
        step(report, "compare")
        config, settings = compared_config(out, args.compare)
        report["compare"] = {"settings": settings, "serving": serve_and_measure(
            args, archive(weights, out, config, "store-compare"), out, dry, "run-compare")}
        done(report, "compare")
    report["weights"], report["store"] = str(weights), str(store)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    served = report["serving"]
    compared = report.get("compare", {}).get("serving", {}).get("load", [])
    failed = (report["cuda_tests"]["exit_code"] != 0
              or any(r["errors"] for r in served["load"] + compared)
              or (not dry and served["workers_at_start"]["on_gpu"] == 0))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
