"""The candidate forwards of the served net and how one is judged against fp32: ONNX Runtime on
an exported file (fp32 or int8), the torch net under bf16 autocast with its head in fp32, the
agreement measure and its limits, and the CPU facts that decide which kernels they run
(/proc/cpuinfo). Shared by the worker's runtime choice (runtimes.py) and by the build and
evaluation tools (export_onnx.py, evaluate.py, calibration.py), which check the same way.
"""
import copy
import platform
import re
from pathlib import Path

import numpy as np
import torch

# A forward passes when it gives the fp32 top-1 on this share of the golden images whose fp32
# top-1 leads the runner-up by more than MARGIN (a near-tie may flip at any precision), and
# moves no class probability by more than the second figure. fp32 differs between CPUs only in
# summation order (~1e-6); bf16 keeps ~3 significant digits, int8 ~2; int8 on a CPU whose
# kernels saturate agrees on ~10-40 %, a stale or foreign file on ~10-30 %.
LIMITS = {"torch": (1.0, 1e-3), "onnx": (1.0, 1e-3), "bf16": (0.95, 0.05), "int8": (0.9, 0.3)}
MARGIN = 0.1

def cpu_has_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX), which make a bf16
    forward ~1.6-1.8x faster than fp32 for this net; without them bf16 is emulated and slower."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags(cpuinfo)))


# The CPU flags that decide which kernels PyTorch and ONNX Runtime run for this net: what a
# benchmark or a start-up log names beside its numbers.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                "amx_int8")


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The KERNEL_FLAGS this CPU has (/proc/cpuinfo; none where it cannot be read)."""
    flags = set((_cpuinfo_field("flags", cpuinfo) or "").split())
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name (/proc/cpuinfo), or the machine type where it cannot be read."""
    return _cpuinfo_field("model name", cpuinfo) or platform.machine()


def _cpuinfo_field(name, cpuinfo):
    """The first CPU's ``name`` line of /proc/cpuinfo, or None."""
    try:
        match = re.search(rf"^{name}\s*:(.*)$", Path(cpuinfo).read_text(), re.M)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def agreement(logits, reference, margin=MARGIN):
    """(share of fp32's clear top-1 answers that ``logits`` give, largest probability
    difference); "clear": fp32's top-1 leads by more than ``margin`` (1.0 when none is)."""
    probs = torch.as_tensor(np.asarray(logits, dtype=np.float32)).softmax(1)
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float32)).softmax(1)
    top2 = ref.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > margin
    same = (probs.argmax(1) == ref.argmax(1))[clear]
    agree = same.float().mean().item() if clear.any() else 1.0
    return agree, (probs - ref).abs().max().item()


def onnx_forward(path, threads=1):
    """A callable like the net (normalised float batch -> logits) that runs the ONNX file with
    ONNX Runtime on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(x):
        return torch.from_numpy(session.run(None, {"images": x.contiguous().numpy()})[0])
    return forward


def bf16_forward(net):
    """A callable like the net that runs its features under CPU bf16 autocast and its classifier
    head (the last Linear) in fp32, returning fp32 logits. Under autocast the head's output
    would be rounded to bf16's 8 significant bits: classes collapse onto one logit and answers
    repeat probabilities (ties for first place among them); from bf16 features an fp32 head
    gives logits as fine-grained as fp32's, for a negligible share of the work. The net itself
    is not changed (Integrated Gradients runs it in fp32): the forward runs a copy."""
    heads = [name for name, module in net.named_modules() if isinstance(module, torch.nn.Linear)]
    if heads:
        net = copy.deepcopy(net)
        parent, _, attribute = heads[-1].rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        setattr(owner, attribute, _Fp32(getattr(owner, attribute)))

    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x).float()
    return forward


class _Fp32(torch.nn.Module):
    """A layer run in fp32 inside an autocast region (its input cast up)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.layer(x.float())
