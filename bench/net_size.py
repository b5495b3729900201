"""Size and cost of the net: parameters and FLOPs (2 x multiply-adds) per image, as torch's
FlopCounterMode counts one forward pass.

    .venv/bin/python -m bench.net_size --widths 128 384 384   # from the repo root: the shipped net
"""
import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from cifar10_serve.net import DEFAULT_WIDTHS, IMAGE_SIZE, Cifar10Net


def count_flops(net):
    """FLOPs (2 x multiply-adds) of one forward pass on one image."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net.eval()(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    return counter.get_total_flops()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs=3, default=list(DEFAULT_WIDTHS),
                        help="channels of the three conv groups, as train.py --widths "
                             "(default: %(default)s; the shipped net: 128 384 384)")
    net = Cifar10Net(widths=parser.parse_args(argv).widths)
    params = sum(p.numel() for p in net.parameters())
    print(f"Cifar10Net: {params:,} parameters, {count_flops(net) / 1e6:.1f} MFLOPs per image")


if __name__ == "__main__":
    main()
