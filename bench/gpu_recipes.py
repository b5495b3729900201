"""Candidate recipes for the shipped weights, compared in one table: trained on a GPU on all the
training images but the held-out split, scored as served on the CPU.

For each recipe: train.py on DATA (holding out train.py's --val-size 500 split, which is
tests/holdout), export_onnx.py (the fp32 and int8 files `make archive` ships, calibrated on
weights/calibration), then evaluate.py on tests/holdout with the served TTA for the fp32 and int8
forwards, and the in-process CPU cost of one image (1 thread, the int8 file through ONNX Runtime,
median of repeats: a proxy for `make bench`, which is what decides on the machine that serves).
Writes OUT/recipes.md and OUT/recipes.json, and keeps each candidate's checkpoint in OUT.

    python bench/data_pack.py unpack .data/pack .data/train          # the images, checked
    python -m bench.gpu_recipes OUT --data-dir .data/train            # on the GPU machine
    python -m bench.gpu_recipes OUT --dry-run                         # toy size on the CPU

Without CUDA (or with --dry-run) each recipe is cut to one epoch of a small net on the held-out
folder itself, so that CI keeps the script from rotting; the table then says it is a dry run.
"""
import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

from cifar10_serve.forwards import cpu_flags, cpu_name

ROOT = Path(__file__).resolve().parent.parent
HOLDOUT = ROOT / "tests" / "holdout"
CALIBRATION = ROOT / "weights" / "calibration"
COMMON = "--val-size 500 --tta 1"
# name: train.py flags. The shipped recipe first (MODEL_CARD.md), then the levers: longer
# schedules of the same net (same CPU cost), and airbench96-like wider nets (more CPU cost per
# image: the table shows whether they stay inside 0.75x of today's throughput).
RECIPES = {
    "shipped-40": "--widths 128 384 384 --lr 10 --translate 4 --cutout 12 --epochs 40",
    "same-net-80": "--widths 128 384 384 --lr 10 --translate 4 --cutout 12 --epochs 80",
    "same-net-160": "--widths 128 384 384 --lr 10 --translate 4 --cutout 12 --epochs 160",
    "wider-80": "--widths 128 512 512 --lr 10 --translate 4 --cutout 12 --epochs 80",
}
TOY = "--widths 16 32 32 --epochs 1 --val-size 100 --batch-size 200 --tta 0"


def run(args, log):
    """Run a command from the repository root; its output appended to ``log``."""
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(args)}\n")
        out.flush()
        subprocess.run(args, cwd=ROOT, check=True, stdout=out, stderr=subprocess.STDOUT)


def cpu_ms_per_image(int8, repeats=7, batch=16):
    """Median ms per image of the int8 ONNX file on one CPU thread (ONNX Runtime), batch 16."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    shape = [batch, *session.get_inputs()[0].shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    name = session.get_inputs()[0].name
    session.run(None, {name: x})  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - start) * 1000 / batch)
    return median(times)


def candidate(name, flags, args, out):
    """Train, export and score one recipe; its row of the table."""
    weights, log = out / f"{name}.pt", out / f"{name}.log"
    data = ["--data-dir", str(HOLDOUT if args.dry_run else args.data_dir)]
    toy = shlex.split(TOY) if args.dry_run else []
    started = time.monotonic()
    run([sys.executable, "train.py", *data, *shlex.split(COMMON), *shlex.split(flags), *toy,
         "--out", str(weights), "--cache-dir", ""], log)
    minutes = (time.monotonic() - started) / 60
    onnx, int8 = out / f"{name}.onnx", out / f"{name}.int8.onnx"
    run([sys.executable, "export_onnx.py", str(weights), str(onnx), "--int8", str(int8),
         "--calibration-dir", str(CALIBRATION), "--check-dir", str(HOLDOUT)], log)
    scores = out / f"{name}.scores.json"
    run([sys.executable, "evaluate.py", str(HOLDOUT), "--weights", str(weights), "--int8",
         str(int8), "--json", str(scores)], log)
    scored = json.loads(scores.read_text())
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    return {"recipe": name, "flags": flags, "train_minutes": round(minutes, 2),
            "device": checkpoint.get("device"), "val_accuracy": checkpoint.get("val_accuracy"),
            "holdout": {precision: scored[precision]["overall"] for precision in scored
                        if isinstance(scored[precision], dict)
                        and "overall" in scored[precision]},
            "cpu_int8_ms_per_image": round(cpu_ms_per_image(int8), 3)}


def table(rows, dry_run):
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Recipe candidates{' (DRY RUN: toy size on the CPU)' if dry_run else ''}", "",
             f"{when}; training on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'the CPU'}; "
             f"CPU cost on {cpu_name()} ({' '.join(cpu_flags())}), 1 thread.", "",
             "| recipe | train min | held-out fp32 | held-out int8 | int8 ms/image (CPU) | flags |",
             "|---|--:|--:|--:|--:|---|"]
    for r in rows:
        acc = r["holdout"]
        lines.append(f"| {r['recipe']} | {r['train_minutes']:.1f} | "
                     f"{100 * acc.get('fp32', float('nan')):.2f} % | "
                     f"{100 * acc.get('int8', float('nan')):.2f} % | "
                     f"{r['cpu_int8_ms_per_image']:.3f} | `{r['flags']}` |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", type=Path, help="folder for recipes.md, recipes.json, checkpoints")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/cifar10/train",
                   help="ImageFolder of the training images (bench/data_pack.py unpacks them)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                   help="which candidates, in order")
    p.add_argument("--dry-run", action="store_true", help="toy size on the CPU, even with CUDA")
    args = p.parse_args(argv)
    args.dry_run = args.dry_run or not torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.recipes:
        rows.append(candidate(name, RECIPES[name], args, args.out))
        (args.out / "recipes.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "recipes.md").write_text(table(rows, args.dry_run))
        print(table(rows, args.dry_run), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
