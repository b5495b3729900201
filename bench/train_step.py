"""What one training step costs on this CPU, in fp32 and bf16 autocast, for the shipped net and
train.py's default one: forward + backward + an SGD step on a random batch, as train.py takes it.

    .venv/bin/python -m bench.train_step   # from the repo root: a table; ~1 minute on 2 cores

Multiply by the steps of an epoch (49,500 / 1,024 ≈ 48 for `make train`) and the epochs to plan
a run. bf16 is emulated (slow) on CPUs without avx512_bf16 or amx_bf16: `--precision auto` then
trains in fp32.
"""
import argparse
import time

import torch
from torch.nn import functional as F

from cifar10_serve.net import DEFAULT_WIDTHS, Cifar10Net
from cifar10_serve.forwards import cpu_flags, cpu_name


def step_seconds(widths, precision, batch, steps):
    """Seconds per step, the best of ``steps`` after one warm-up step."""
    net = Cifar10Net(widths).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=1024, help="images per step (default: 1024)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row (default: 2)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"{cpu_name()} (kernel flags: {' '.join(cpu_flags()) or '-'}), "
          f"{torch.get_num_threads()} torch threads, batch {args.batch_size}\n")
    print("| widths | precision | s per step | min per epoch of 49,500 images |")
    print("|---|---|--:|--:|")
    for widths in ((128, 384, 384), DEFAULT_WIDTHS):
        for precision in ("fp32", "bf16"):
            seconds = step_seconds(widths, precision, args.batch_size, args.steps)
            epoch = seconds * 49_500 / args.batch_size / 60
            print(f"| {' '.join(map(str, widths))} | {precision} | {seconds:.2f} | {epoch:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
