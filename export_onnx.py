"""Export a checkpoint (train.py's or convert.py's) for the handler's CPU runtimes (`make archive`
runs it). Input shape, decoding and normalisation are the checkpoint's model spec's.

    python export_onnx.py weights/cifar10.pt model_store/build/cifar10/cifar10.onnx \
        --int8 model_store/build/cifar10/cifar10.int8.onnx --calibration-dir weights/calibration \
        --check-dir tests/holdout --golden model_store/build/cifar10/golden.npz

The fp32 export is checked before it is written: ONNX Runtime's logits must equal eager
PyTorch's within --tolerance on a fixed batch of random images. --int8 also writes it statically
quantized (QDQ, per-channel 7-bit weights, u8 activations calibrated on the images under
--calibration-dir, any folder of images searched recursively) and checks the quantization itself
on the real held-out images under --check-dir, in fp32 arithmetic: the same file on every CPU's
kernels is the serving worker's check (cifar10_serve/runtimes.py), not this one. --golden writes those
kernels' check: a fixed few of the --check-dir images with the fp32 logits of the torch net.
Nothing here depends on the build machine's CPU: a .mar built anywhere serves anywhere.
"""
import argparse
import random
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from cifar10_serve import spec as specs
from cifar10_serve.images import decode_image, eval_transform, image_tensor
from cifar10_serve.net import build_net
from cifar10_serve.forwards import LIMITS, agreement, onnx_forward

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
# The int8 file's quantization must give the fp32 top-1 on this share of the --check-dir images
# that fp32 answers clearly (cifar10_serve.forwards.MARGIN): the shipped net's gives 99.6 %.
INT8_AGREEMENT = 0.97
GOLDEN_IMAGES = 16  # enough to tell a wrong kernel (~10-40 % agreement) from a right one


# Where the classifier's head begins, walking back from its output (output_head).
WEIGHTED_OPS = {"MatMul", "Gemm", "Conv"}


def image_batch(folder, spec, count=None, seed=0):
    """uint8 (N, C, H, W), decoded by ``spec`` as the handler decodes: a fixed random subset of
    ``count`` images under ``folder`` (None: every image, in name order)."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        sys.exit(f"no images under {folder}")
    if count is not None:
        paths = random.Random(seed).sample(paths, min(count, len(paths)))
    return torch.stack([image_tensor(decode_image(p.read_bytes(), spec)) for p in paths])


def export_onnx(net, path, input_shape):
    """Write ``net`` as ONNX with a dynamic batch: input "images" (N, *input_shape: the spec's
    (C, H, W)), output "logits".

    Uses torch's TorchScript-based exporter (needs the ``onnx`` package, at archive time only).
    """
    sample = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():  # the exporter's deprecation notices, not about this net
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (sample,), str(path), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "n"}},
                          dynamo=False)


@torch.inference_mode()
def onnx_mismatch(net, forward, input_shape, n=8):
    """Largest |forward - net| logit difference on a fixed batch of n random normalised images
    of ``input_shape``: how an ONNX file is checked against the weights it claims to hold."""
    x = torch.randn(n, *input_shape, generator=torch.Generator().manual_seed(0))
    return (forward(x) - net.eval()(x)).abs().max().item()


def quantize_int8(onnx_path, out, calibration, reduce_range=True):
    """Write ``out``: the ONNX file statically quantized to int8 (QDQ), activation ranges
    calibrated on ``calibration``, a normalised float batch (N, C, H, W) of real images.

    Weights are per-channel and 7-bit (``reduce_range``): ONNX Runtime's u8 x s8 kernels on CPUs
    without VNNI (AVX2, AVX-512 before Cascade Lake) add pairs of products in saturating 16-bit
    registers, and 2 x 255 x 127 overflows them (8-bit weights: 43 % of an AVX2 machine's answers
    right), 2 x 255 x 63 does not; VNNI CPUs run the same file at the same speed.
    (``reduce_range=False``: the 8-bit weights of earlier archives, for the tests that show it.)
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [{"images": calibration[i:i + 32].numpy()} for i in range(0, len(calibration), 32)]

    class Batches(CalibrationDataReader):
        def get_next(self):
            return batches.pop(0) if batches else None

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared))
        quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=output_head(prepared))


def output_head(onnx_path):
    """Names of the nodes from the last weighted layer (MatMul, Gemm, Conv) to the outputs: the
    classifier's head, which quantize_int8 leaves in fp32.

    Quantized, the head's output is rounded to a u8 grid (~0.05 logit apart for this net), so
    classes collapse onto one probability and ties for first place appear (issue 32: 71.7 % of
    answers repeated a probability). A 384 x 10 matmul in fp32 costs nothing measurable.
    """
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    producer = {name: node for node in graph.node for name in node.output}
    head, pending = [], [output.name for output in graph.output]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in head:
            continue
        head.append(node.name)
        if node.op_type not in WEIGHTED_OPS:
            pending += list(node.input)
    return head


def quantized_in_fp32(path):
    """A forward that runs the int8 file's QDQ graph without fusing it into int8 kernels: every
    DequantizeLinear -> float op -> QuantizeLinear in fp32, the quantization's own answers on
    any CPU (ONNX Runtime's ``session.disable_quant_qdq``)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("weights", type=Path, help="checkpoint written by train.py or convert.py")
    p.add_argument("out", type=Path, help="ONNX file to write")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted |ONNX - eager| logit difference")
    p.add_argument("--int8", type=Path, help="also write the int8 quantized ONNX file here")
    p.add_argument("--calibration-dir", type=Path, help="images to calibrate --int8 on")
    p.add_argument("--calibration-images", type=int, default=512,
                   help="how many of them (a fixed random subset)")
    p.add_argument("--check-dir", type=Path,
                   help="held-out images to check --int8's quantization and draw --golden from")
    p.add_argument("--golden", type=Path,
                   help="write the golden set here: images and fp32 logits the worker checks "
                        "every forward against on the CPU that serves")
    args = p.parse_args(argv)
    if args.int8 and not args.calibration_dir:
        p.error("--int8 needs --calibration-dir")
    if (args.int8 or args.golden) and not args.check_dir:
        p.error("--int8 and --golden need --check-dir")
    checkpoint = torch.load(args.weights, map_location="cpu", weights_only=True)
    args.spec = specs.from_checkpoint(checkpoint)
    net = build_net(args.spec, checkpoint["state_dict"]).eval()
    transform = eval_transform(args.spec)
    write_onnx(net, args)
    if args.int8 or args.golden:
        held_out = image_batch(args.check_dir, args.spec)
        with torch.inference_mode():
            reference = net(transform(held_out))
    if args.int8:
        write_int8(transform(held_out), reference, transform, args)
    if args.golden:
        write_golden(held_out, reference, args.golden)


def write_onnx(net, args):
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    export_onnx(net, tmp, args.spec.input_shape)
    error = onnx_mismatch(net, onnx_forward(tmp), args.spec.input_shape)
    if error > args.tolerance:
        tmp.unlink()
        sys.exit(f"ONNX export of {args.weights} differs from eager PyTorch by {error:.2e} "
                 f"(> {args.tolerance:.0e}); nothing written")
    tmp.replace(args.out)
    print(f"wrote {args.out} (max |ONNX - eager| logit difference {error:.1e})")


def write_int8(held_out, reference, transform, args):
    calibration = image_batch(args.calibration_dir, args.spec, args.calibration_images)
    args.int8.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.int8.with_suffix(".tmp")
    quantize_int8(args.out, tmp, transform(calibration))
    agree, drift = agreement(quantized_in_fp32(tmp)(held_out), reference)
    # With the head in fp32 a badly calibrated file can keep the top-1 and still move the
    # probabilities: refused past the drift the worker's own check tolerates.
    most_drift = LIMITS["int8"][1]
    if agree < INT8_AGREEMENT or drift > most_drift:
        tmp.unlink()
        sys.exit(f"the int8 quantization gives the fp32 top-1 on {agree:.1%} of the clear "
                 f"answers for {len(held_out)} images of {args.check_dir} (needs "
                 f"{INT8_AGREEMENT:.0%}) and moves a probability by up to {drift:.3f} (at most "
                 f"{most_drift}); nothing written: calibrate on more or other images")
    tmp.replace(args.int8)
    print(f"wrote {args.int8} (calibrated on {len(calibration)} images of "
          f"{args.calibration_dir}; in fp32 arithmetic its top-1 is fp32's on {agree:.1%} of the "
          f"clear answers for {len(held_out)} images of {args.check_dir}, largest probability "
          f"difference {drift:.3f})")


def write_golden(held_out, reference, path):
    pick = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))
    pick = pick[:GOLDEN_IMAGES].sort().values
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, images=held_out[pick].numpy(), logits=reference[pick].float().numpy())
    print(f"wrote {path} ({len(pick)} golden images with their fp32 logits)")


if __name__ == "__main__":
    main()
