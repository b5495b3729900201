"""Export a train.py checkpoint to ONNX for the handler's CPU runtimes (`make archive` runs it).

    python export_onnx.py weights/cifar10.pt model_store/cifar10.onnx
    python export_onnx.py weights/cifar10.pt model_store/cifar10.onnx \
        --int8 model_store/cifar10.int8.onnx --calibration-dir ../shared/data/cifar10/train

The fp32 export is checked before it is written: ONNX Runtime's logits must equal eager
PyTorch's within --tolerance on a fixed batch of random images. --int8 also writes it statically
quantized (`runtime: int8`), activation ranges calibrated on a fixed subset of the real images
under --calibration-dir (any folder of images, searched recursively), and checked as the handler
checks it at start: top-1 agreement with the fp32 net and the largest probability difference.
"""
import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "handler"))
from cifar10_net import (build_net, check_precision, decode_image, eval_transform,  # noqa: E402
                         export_onnx, image_tensor, onnx_forward, onnx_mismatch, quantize_int8)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def calibration_batch(folder, count, normalization):
    """A fixed random subset of ``count`` images under ``folder``, decoded and normalised."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        sys.exit(f"no images under {folder} to calibrate the int8 export on")
    paths = random.Random(0).sample(paths, min(count, len(paths)))
    images = torch.stack([image_tensor(decode_image(p.read_bytes())) for p in paths])
    return eval_transform(**normalization)(images), len(paths)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("weights", type=Path, help="checkpoint written by train.py")
    p.add_argument("out", type=Path, help="ONNX file to write")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted |ONNX - eager| logit difference")
    p.add_argument("--int8", type=Path, help="also write the int8 quantized ONNX file here")
    p.add_argument("--calibration-dir", type=Path, help="images to calibrate --int8 on")
    p.add_argument("--calibration-images", type=int, default=512,
                   help="how many of them (a fixed random subset)")
    args = p.parse_args(argv)
    if args.int8 and not args.calibration_dir:
        p.error("--int8 needs --calibration-dir")
    checkpoint = torch.load(args.weights, map_location="cpu", weights_only=True)
    net = build_net(checkpoint).eval()
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
    if args.int8:
        write_int8(net, checkpoint, args)


def write_int8(net, checkpoint, args):
    calibration, count = calibration_batch(args.calibration_dir, args.calibration_images,
                                           checkpoint.get("normalization", {}))
    args.int8.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.int8.with_suffix(".tmp")
    quantize_int8(args.out, tmp, calibration)
    try:  # the check the handler repeats at start
        agree, drift = check_precision(net, onnx_forward(tmp), "int8")
    except ValueError as err:
        tmp.unlink()
        sys.exit(f"{err}; nothing written")
    tmp.replace(args.int8)
    print(f"wrote {args.int8} (calibrated on {count} images of {args.calibration_dir}; top-1 "
          f"agrees with fp32 on {agree:.1%} of the check, largest probability difference "
          f"{drift:.3f})")


if __name__ == "__main__":
    main()
