"""The candidate forwards (ONNX Runtime fp32 or int8, bf16 autocast with an fp32 head), how one is
judged against fp32, and the CPU facts that decide their kernels. Shared by the worker's runtime
choice and the build and evaluation tools, which check the same way.
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
    """AVX-512 BF16 or AMX: without them bf16 is emulated, slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags(cpuinfo)))


# The CPU flags that decide which kernels PyTorch and ONNX Runtime run for this net: what a
# benchmark or a start-up log names beside its numbers.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                "amx_int8")


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    flags = set((_cpuinfo_field("flags", cpuinfo) or "").split())
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def cpu_name(cpuinfo="/proc/cpuinfo"):
    return _cpuinfo_field("model name", cpuinfo) or platform.machine()


def _cpuinfo_field(name, cpuinfo):
    try:
        match = re.search(rf"^{name}\s*:(.*)$", Path(cpuinfo).read_text(), re.M)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def agreement(logits, reference, margin=MARGIN):
    """(share of fp32's clear top-1 answers that ``logits`` give, largest probability difference);
    "clear": fp32's top-1 leads by more than ``margin`` (1.0 when none is)."""
    probs = torch.as_tensor(np.asarray(logits, dtype=np.float32)).softmax(1)
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float32)).softmax(1)
    top2 = ref.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > margin
    same = (probs.argmax(1) == ref.argmax(1))[clear]
    agree = same.float().mean().item() if clear.any() else 1.0
    return agree, (probs - ref).abs().max().item()


def onnx_forward(path, threads=1):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(x):
        return torch.from_numpy(session.run(None, {"images": x.contiguous().numpy()})[0])
    return forward


def bf16_forward(net):
    """The net's features under bf16 autocast, its head (last Linear) in fp32 on a copy: a bf16 head
    rounds logits to 8 bits, so classes collapse onto one logit and answers tie."""
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
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.layer(x.float())
