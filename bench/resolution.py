"""How finely each forward's probabilities resolve, and what the int8 files cost: per ONNX file
(and the fp32 torch net; with --bf16 also the bf16 runtime's forward), on a folder of images
through the served forward (gated TTA and the checkpoint's temperature, as the handler runs it):
distinct probabilities per answer, answers that repeat a probability, exact ties for first
place; then each forward's ms/image in process, one thread as inside a worker, repeated to show
the machine's noise.

    .venv/bin/python -m bench.resolution weights/cifar10.pt tests/holdout \
        --onnx before=old/cifar10.int8.onnx --onnx after=model_store/build/cifar10.int8.onnx \
        --bf16
"""
import argparse
import statistics
import time

import torch

from calibration import held_out, runtime_forward, served_logits
from cifar10_serve import spec as model_spec
from cifar10_serve.images import eval_transform
from cifar10_serve.net import gated_logits
from cifar10_serve.forwards import cpu_flags, cpu_name, onnx_forward
from evaluate import served


def resolution(probs):
    """(mean distinct values per answer, share of answers that repeat a value, answers whose two
    largest probabilities are exactly equal), probabilities as float32, as the answers carry."""
    probs = probs.float()
    distinct = torch.tensor([len(set(row.tolist())) for row in probs], dtype=torch.float64)
    top2 = probs.topk(2, dim=1).values
    return (distinct.mean().item(), (distinct < probs.shape[1]).double().mean().item(),
            int((top2[:, 0] == top2[:, 1]).sum()))


def timings(forwards, x, tta, margin, repeats, batch=16):
    """{name: ms per image of each run} of the served forward on batches of ``batch`` images;
    the forwards take turns, run after run, so that the machine's drift falls on all alike."""
    found = {name: [] for name in forwards}
    with torch.inference_mode():
        for forward in forwards.values():
            gated_logits(forward, x[:batch], tta, margin)  # warm-up: kernels, allocations
        for _ in range(repeats):
            for name, forward in forwards.items():
                start = time.perf_counter()
                for i in range(0, len(x), batch):
                    gated_logits(forward, x[i:i + batch], tta, margin)
                found[name].append(1000 * (time.perf_counter() - start) / len(x))
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", help="checkpoint written by train.py")
    p.add_argument("data_dir", help="ImageFolder of held-out images")
    p.add_argument("--onnx", action="append", default=[], metavar="NAME=FILE",
                   help="an ONNX forward to compare, repeatable")
    p.add_argument("--bf16", action="store_true",
                   help="also the bf16 runtime's forward (default: off; slow where the CPU has "
                        "no bf16 units)")
    p.add_argument("--repeats", type=int, default=7, help="timing runs per file (default: 7)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    checkpoint = torch.load(args.weights, map_location="cpu", weights_only=True)
    spec = model_spec.from_checkpoint(checkpoint)
    images, _ = held_out(args.data_dir, spec)
    transform, tta, margin = eval_transform(spec), served("tta", 0), \
        served("tta_margin", 1.0)
    forwards = {"fp32 torch": runtime_forward(checkpoint, "fp32")}
    if args.bf16:
        forwards["bf16 torch"] = runtime_forward(checkpoint, "bf16")
    forwards.update({name: onnx_forward(path, 1) for name, path in
                     (item.split("=", 1) for item in args.onnx)})
    print(f"{args.weights} (T {spec.temperature:.4f}), tta {tta}, tta_margin {margin}, "
          f"{len(images)} images of {args.data_dir}; {cpu_name()} ({' '.join(cpu_flags())})\n")
    print("| forward | distinct probabilities per answer | answers repeating one | ties for "
          "first | ms/image: median (min-max) of %d runs |\n|---|--:|--:|--:|--:|" % args.repeats)
    x = transform(images).contiguous(memory_format=torch.channels_last)
    timed = timings({name: f for name, f in forwards.items() if name != "fp32 torch"}, x, tta,
                    margin, args.repeats)
    for name, forward in forwards.items():
        logits = served_logits(forward, images, transform, tta, margin)
        distinct, repeating, ties = resolution((logits / spec.temperature).softmax(1))
        runs = timed.get(name)
        shown = f"{statistics.median(runs):.3f} ({min(runs):.3f}-{max(runs):.3f})" if runs \
            else "-"
        print(f"| {name} | {distinct:.2f} | {100 * repeating:.1f} % | {ties} | {shown} |")

if __name__ == "__main__":
    main()
