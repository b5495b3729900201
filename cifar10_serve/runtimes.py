"""The forward a worker runs, chosen on the CPU that serves (model-config.yaml `runtime`), and the
one start-up calibration of what work costs there.

A .mar is served on CPUs whose kernels differ (int8 can even be wrong without VNNI), so no list
of CPU flags decides: each candidate (int8 and onnx: ONNX Runtime on the archive's files; bf16:
the torch net under autocast, where the CPU has bf16 units; torch: fp32) runs the archive's
golden set (held-out images and the build machine's fp32 logits) and, where it gives the golden
answers, is timed. `auto` serves the fastest that passes; a named runtime is served if it
passes, else auto's choice, with the reason logged.

``calibrate`` times the forwards and one image's Integrated Gradients on one clock
(deadline.work_clock), on `forward_batch` images of the spec's input shape, warmed, the median of
a few runs: the runtime choice and the budget never disagree on a figure.
"""
import contextlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar10_serve.deadline import work_clock
from cifar10_serve.forwards import (LIMITS, agreement, bf16_forward, cpu_flags, cpu_has_bf16,
                                    cpu_name, onnx_forward)
from cifar10_serve.settings import RUNTIMES

logger = logging.getLogger(__name__)
CANDIDATES = RUNTIMES[1:]  # ("int8", "bf16", "onnx", "torch"): every runtime but "auto"
ONNX_FILE = "cifar10.onnx"  # export_onnx.py writes these; `make archive` ships them
INT8_FILE = "cifar10.int8.onnx"
GOLDEN_FILE = "golden.npz"
CHOICE_FILE = "runtime-choice.json"  # written beside them by the first worker that chooses
# A less precise forward serves only if it is this much faster than every more precise one that
# passes: near-ties go to precision, so that timing noise does not make two workers of one model
# serve different arithmetic (for this net int8 leads by 1.8-2x, bf16 by ~1.8x).
RANK = {"torch": 0, "onnx": 0, "bf16": 1, "int8": 2}
TIE = 1.25
# Each timing: one warm-up call, then RUNS timed calls (at least MIN_RUNS; fewer where they have
# taken TIMING_SECONDS together: a 224-px net's batches take seconds), the median kept.
RUNS, MIN_RUNS, TIMING_SECONDS = 5, 3, 1.0
# Integrated Gradients steps timed, the cost scaled to ig_steps: from 8 on a step costs the same
# (CIFAR net, one core: 8 steps x 4 = 198 ms, 32 steps 193-199 ms), and start-up stays short.
TIMED_STEPS = 8


def select_device(gpu_id):
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


@dataclass
class Trial:
    """One candidate on this CPU: its golden-set figures, or why it was not used."""
    name: str
    forward: object = None
    agree: float = None
    drift: float = None
    ms_per_image: float = None  # the median of the timed runs
    spread: tuple = None        # their lowest and highest (ms per image)
    failure: str = None

    def row(self):
        if self.agree is None:
            return f"  {self.name:<6} not run: {self.failure}"
        timing = f"{self.ms_per_image:7.3f} ms/image" if self.ms_per_image else " " * 15
        verdict = f"FAILS: {self.failure}" if self.failure else "passes"
        return (f"  {self.name:<6} top-1 as fp32 {self.agree:6.1%}  largest probability "
                f"difference {self.drift:.4f}  {timing}  {verdict}")


def passes(name, agree, drift):
    least, most = LIMITS[name]
    if agree < least or drift > most:
        return (f"top-1 as fp32 on {agree:.1%} of the clear golden images (needs {least:.0%}), "
                f"largest probability difference {drift:.4f} (allowed {most})")
    return None


def load_golden(model_dir):
    path = Path(model_dir) / GOLDEN_FILE
    if not path.exists():
        raise FileNotFoundError(f"the archive has no {GOLDEN_FILE} (the golden images every "
                                f"forward is checked on): rebuild it with `make archive`")
    with np.load(path, allow_pickle=False) as golden:
        return torch.from_numpy(golden["images"]), torch.from_numpy(golden["logits"])


def candidate(name, net, model_dir, threads):
    """The forward ``name`` stands for here, or why there is none (a str)."""
    if name == "torch":
        return net
    if name == "bf16":
        if not cpu_has_bf16():
            return "this CPU has no avx512_bf16 or amx_bf16 (/proc/cpuinfo): bf16 is emulated, " \
                   "slower than fp32"
        return bf16_forward(net)
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install onnxruntime)"
    path = Path(model_dir) / (INT8_FILE if name == "int8" else ONNX_FILE)
    if not path.exists():
        return f"the archive has no {path.name} (`make archive` writes it)"
    try:
        return onnx_forward(path, threads)
    except Exception as err:  # noqa: BLE001  (a file ONNX Runtime cannot load: not this one)
        return f"ONNX Runtime cannot load {path.name}: {str(err)[:200]}"


def timed(step, clock, runs=RUNS):
    """(median, lowest, highest) seconds of ``step()`` on ``clock``, after one untimed call."""
    step()
    times = []
    while len(times) < runs and (len(times) < MIN_RUNS or sum(times) < TIMING_SECONDS):
        start = clock()
        step()
        times.append(clock() - start)
    return float(np.median(times)), min(times), max(times)


@torch.inference_mode()
def trial(name, net, model_dir, threads, golden, reference, x, clock):
    """Check candidate ``name`` on the golden set; where it passes, time it on ``x``."""
    forward = candidate(name, net, model_dir, threads)
    if isinstance(forward, str):
        return Trial(name, failure=forward)
    result = Trial(name, forward)
    try:
        result.agree, result.drift = agreement(forward(golden).float(), reference)
    except Exception as err:  # noqa: BLE001  (a kernel that fails here fails this candidate)
        result.agree, result.drift = 0.0, float("inf")
        result.failure = f"{type(err).__name__}: {str(err)[:200]}"
        return result
    result.failure = passes(name, result.agree, result.drift)
    if result.failure is None:
        result.ms_per_image, *spread = (1000 * t / len(x) for t in timed(lambda: forward(x), clock))
        result.spread = tuple(spread)
    return result


def fastest(passed):
    best = min(t.ms_per_image for t in passed)
    near = [t for t in passed if t.ms_per_image <= TIE * best]
    return min(near, key=lambda t: (RANK[t.name], t.ms_per_image))


def agreed(model_dir, chosen, passed):
    """The first worker to choose records its choice in the model directory; the others serve it
    where it passes here too, so one model's workers answer alike when two forwards time alike."""
    path, draft = Path(model_dir) / CHOICE_FILE, Path(model_dir) / f".{CHOICE_FILE}.{os.getpid()}"
    try:
        draft.write_text(json.dumps({"runtime": chosen.name}))
        os.link(draft, path)  # atomic: the file appears whole, and only once
        return chosen
    except FileExistsError:
        with contextlib.suppress(OSError, ValueError, KeyError):
            recorded = json.loads(path.read_text())["runtime"]
            return next((t for t in passed if t.name == recorded), chosen)
        return chosen
    except OSError:
        return chosen
    finally:
        with contextlib.suppress(OSError):
            draft.unlink()


def choose(requested, net, model_dir, transform, x, threads=1, clock=None):
    """(forward, its name, the trials) for ``requested`` here. The torch net is always checked: when
    the weights themselves miss the golden answers the archive is inconsistent (RuntimeError)."""
    if requested == "torch" and not (Path(model_dir) / GOLDEN_FILE).exists():
        return net, "torch", []  # the reference itself: nothing to check it against
    images, reference = load_golden(model_dir)
    if tuple(images.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"{GOLDEN_FILE} holds images of shape {tuple(images.shape[1:])}, the "
                         f"model spec's input is {tuple(x.shape[1:])}: rebuild with "
                         f"`make archive`")
    golden = transform(images).contiguous(memory_format=torch.channels_last)
    clock = clock or work_clock("cpu")

    def run(names):
        return [trial(name, net, model_dir, threads, golden, reference, x, clock)
                for name in names]
    trials = run(CANDIDATES if requested == "auto" else dict.fromkeys((requested, "torch")))
    if next(t for t in trials if t.name == "torch").failure:  # the weights themselves
        raise RuntimeError(f"the fp32 torch net does not give the archive's golden answers: "
                           f"{GOLDEN_FILE} does not belong to these weights; rebuild with "
                           f"`make archive`\n" + "\n".join(t.row() for t in trials))
    named = requested != "auto" and trials[0].failure is None
    if requested != "auto" and not named:
        logger.warning("handler.runtime %s cannot serve on this CPU (%s): running the fastest "
                       "forward that gives the golden answers instead", requested,
                       trials[0].failure)
        trials += run(name for name in CANDIDATES if name not in (requested, "torch"))
    chosen, follows = trials[0], ""
    if not named:
        passed = [t for t in trials if t.failure is None]
        own = fastest(passed)
        chosen = agreed(model_dir, own, passed)
        follows = "" if chosen is own else " (as another worker of this model chose)"
    logger.info("runtime %s -> %s%s, on %s (%s), golden set of %d images:\n%s", requested,
                chosen.name, follows, cpu_name(), " ".join(cpu_flags()) or "no listed flags",
                len(golden), "\n".join(t.row() for t in trials))
    return chosen.forward, chosen.name, trials


@dataclass
class Calibration:
    """What work costs here, timed once at worker start, on ``clock``; ``timed``: how."""
    forward: object
    runtime: str
    trials: list
    forward_ms: float  # one view of one image through the served forward (median)
    ig_ms: float       # one image's Integrated Gradients at ig_steps (median)
    clock: object
    batch: int
    timed: dict

    def figures(self):
        return dict(self.timed)


def sample_batch(spec, transform, size, device):
    """``size`` images of fixed noise, normalised: kernels' speed ignores the pixels."""
    pixels = torch.randint(0, 256, (size, *spec.input_shape), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return transform(pixels.to(device)).contiguous(memory_format=torch.channels_last)


def integrated_gradients_step(net, x, ig_steps):
    """(a call running min(ig_steps, TIMED_STEPS) steps of one image's Integrated Gradients as
    Captum batches them, the factor that scales its cost to ig_steps). Captum runs once first, as
    the first explanation would pay its ~1.4 s import outside the budget; its per-call overhead is
    not timed (it over-charged a small net 40 %)."""
    from captum.attr import IntegratedGradients

    target = torch.zeros(1, dtype=torch.long, device=x.device)
    IntegratedGradients(net).attribute(x[:1], target=target, n_steps=2)
    steps = min(ig_steps, TIMED_STEPS)
    alphas = torch.linspace(1 / steps, 1, steps, device=x.device).view(-1, *[1] * (x.dim() - 1))

    def step():
        with torch.enable_grad():
            scaled = (alphas * x[:1]).contiguous(memory_format=torch.channels_last)
            scaled.requires_grad_(True)
            torch.autograd.grad(net(scaled)[:, 0].sum(), scaled)
    return step, ig_steps / steps


def calibrate(requested, net, model_dir, transform, spec, device, batch=16, ig_steps=32,
              threads=1):
    """On a CPU the forward ``choose`` serves, on a GPU the torch net; timed as above."""
    clock = work_clock(device.type)
    x = sample_batch(spec, transform, batch, device)
    forward, runtime, trials = net, "torch", []
    if device.type == "cpu":
        forward, runtime, trials = choose(requested, net, model_dir, transform, x, threads,
                                          clock)
    synced = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    served = next((t for t in trials if t.forward is forward), None)
    if served is None:  # the torch net on a GPU, or served unchecked: timed here
        with torch.inference_mode():
            seconds = timed(lambda: (forward(x), synced()), clock)
        served = Trial(runtime, forward, ms_per_image=1000 * seconds[0] / batch,
                       spread=tuple(1000 * t / batch for t in seconds[1:]))
    step, scale = integrated_gradients_step(net, x, ig_steps)
    ig = [1000 * t * scale for t in timed(lambda: (step(), synced()), clock)]
    timed_on = {"clock": "wall time" if device.type == "cuda" else "thread CPU time",
                "input_shape": list(spec.input_shape), "batch": batch,
                "forward_ms_range": [round(t, 3) for t in served.spread],
                "explain_ms_range": [round(t, 1) for t in ig[1:]]}
    return Calibration(forward, runtime, trials, served.ms_per_image, ig[0], clock, batch, timed_on)
