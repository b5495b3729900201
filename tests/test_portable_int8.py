"""The int8 export on a CPU without VNNI, on any x86-64 machine: qemu-user's Haswell (AVX2 and
FMA; no AVX-512, no VNNI) makes ONNX Runtime run its AVX2 kernels, whose u8 x s8 products are
summed in pairs in saturating 16-bit registers. There the 8-bit weights of earlier archives give
fp32's answer for few real images, and the shipped 7-bit ones for as many as on a VNNI CPU.

Slow (the emulator runs ~100x slower than the CPU): one small batch of real held-out images, and
numpy + onnxruntime alone under the emulator (tests/onnx_logits.py). Needs Debian's qemu-user;
CI installs it (.ci/run) and fails here without it.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import export_onnx as export_script
from cifar10_serve.images import eval_transform
from cifar10_serve.net import build_net
from cifar10_serve.spec import from_checkpoint
from cifar10_serve.forwards import LIMITS, agreement
from cifar10_serve.runtimes import passes

QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None and not os.environ.get("CI"),
                                reason="needs qemu-user (apt-get install qemu-user)")
IMAGES = 64


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """(folder, normalised held-out batch, fp32 logits): the shipped weights exported as
    `make archive` does, and with the earlier 8-bit weights, calibrated on weights/calibration."""
    folder = tmp_path_factory.mktemp("portable")
    checkpoint = torch.load(ROOT / "weights" / "cifar10.pt", weights_only=True)
    net = build_net(checkpoint).eval()
    spec = from_checkpoint(checkpoint)
    transform = eval_transform(spec)
    export_script.export_onnx(net, folder / "fp32.onnx", spec.input_shape)
    calibration = transform(export_script.image_batch(ROOT / "weights" / "calibration", spec,
                                                      512))
    for name, reduce_range in (("7bit", True), ("8bit", False)):
        export_script.quantize_int8(folder / "fp32.onnx", folder / f"{name}.onnx", calibration,
                                    reduce_range=reduce_range)
    x = transform(export_script.image_batch(ROOT / "tests" / "holdout", spec, IMAGES))
    np.save(folder / "images.npy", x.numpy())
    with torch.inference_mode():
        return folder, net(x)


def on_haswell(folder, model):
    out = folder / f"{model}.logits.npy"
    subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, ROOT / "tests" / "onnx_logits.py",
                    folder / f"{model}.onnx", folder / "images.npy", out], check=True,
                   stderr=subprocess.DEVNULL, timeout=600)  # qemu warns of CPUID bits TCG lacks
    return np.load(out)


def test_8bit_weights_saturate_on_avx2(shipped):
    """What broke `make serve` on AVX2 CPUs; it also shows the emulator runs the AVX2 kernels."""
    folder, reference = shipped
    agree, _ = agreement(on_haswell(folder, "8bit"), reference)
    assert agree < 0.6
    assert passes("int8", agree, 0.0) is not None  # the worker's check refuses it


def test_shipped_int8_export_gives_fp32_answers_on_avx2(shipped):
    folder, reference = shipped
    logits = on_haswell(folder, "7bit")
    agree, drift = agreement(logits, reference)
    assert passes("int8", agree, drift) is None, (agree, drift, LIMITS["int8"])
    overall = (torch.as_tensor(logits).argmax(1) == reference.argmax(1)).float().mean().item()
    assert overall >= 0.95  # every image, near-ties too
