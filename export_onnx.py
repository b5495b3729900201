"""Export a train.py checkpoint to ONNX for the handler's `runtime: onnx` (`make archive` runs it).

    python export_onnx.py weights/cifar10.pt model_store/cifar10.onnx

The export is checked before it is written: ONNX Runtime's logits must equal eager PyTorch's
within --tolerance on a fixed batch of random images; the handler repeats that check at start.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "handler"))
from cifar10_net import build_net, export_onnx, onnx_forward, onnx_mismatch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("weights", type=Path, help="checkpoint written by train.py")
    p.add_argument("out", type=Path, help="ONNX file to write")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted |ONNX - eager| logit difference")
    args = p.parse_args(argv)
    net = build_net(torch.load(args.weights, map_location="cpu", weights_only=True)).eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    export_onnx(net, tmp)
    error = onnx_mismatch(net, onnx_forward(tmp))
    if error > args.tolerance:
        tmp.unlink()
        sys.exit(f"ONNX export of {args.weights} differs from eager PyTorch by {error:.2e} "
                 f"(> {args.tolerance:.0e}); nothing written")
    tmp.replace(args.out)
    print(f"wrote {args.out} (max |ONNX - eager| logit difference {error:.1e})")


if __name__ == "__main__":
    main()
