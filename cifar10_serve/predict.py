"""The forward passes of a batch (``run``): predict rows through the chosen forward in chunks of
`forward_batch` images (with TTA), Integrated Gradients for explain rows; a failed group is run
again row by row, each rerun charged to the budget, so a failure stays its request's own 500.
"""
import logging
from dataclasses import dataclass

import torch

from cifar10_serve.net import gated_logits
from cifar10_serve.ranking import top1

logger = logging.getLogger(__name__)


def to_batch(images, transform, device):
    batch = transform(torch.stack(images).to(device))  # uint8 crosses to a GPU: 4x fewer bytes
    return batch.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def probabilities(rows, f):
    """(per row its class probabilities (N, classes) on the CPU, images that took TTA)."""
    images = [image for row in rows for image in row.images]
    parts, looked = [], 0
    for start in range(0, len(images), f.chunk):
        batch = to_batch(images[start:start + f.chunk], f.transform, f.device)
        logits, second = gated_logits(f.forward, batch, f.tta, f.margin)
        parts.append((logits.float() / f.temperature).softmax(dim=1).cpu())  # the spec's T
        looked += second
    return torch.split(torch.cat(parts), [len(row.images) for row in rows]), looked


def explanations(row, targets, f):
    """Per image, the served prediction's class and Captum's Integrated Gradients of the fp32 net
    for it, summed over channels (Captum is already loaded by the start-up calibration)."""
    from captum.attr import IntegratedGradients

    answers = []
    for start in range(0, len(row.images), f.chunk):
        batch = to_batch(row.images[start:start + f.chunk], f.transform, f.device)
        target = targets[start:start + f.chunk].to(f.device)
        attributions = IntegratedGradients(f.net).attribute(
            batch, target=target, n_steps=f.ig_steps, internal_batch_size=256)
        answers += [{"class": f.classes[t], "attributions": a.tolist()}
                    for t, a in zip(target.tolist(), attributions.sum(dim=1))]
    return answers


@dataclass
class Forwards:
    """What a batch's forwards run with (the fp32 ``net``: Integrated Gradients)."""
    forward: object
    net: object
    transform: object
    device: object
    chunk: int
    tta: int = 0
    margin: float = 1.0
    ig_steps: int = 32
    classes: tuple = ()
    temperature: float = 1.0  # the spec's: probabilities = softmax(logits / temperature)


@dataclass
class Found:
    probs: torch.Tensor
    explained: list = None


def run(rows, forwards, admission=None):
    """(per row its Found, or None where not run or failed; images that took TTA). Predict rows run
    together, then explain rows; a failed group reruns row by row while ``admission.again`` lets
    it (else a 503); a row that fails alone gets its 500."""
    found, looked, failed = [None] * len(rows), 0, []
    for kind in ("predict", "explain"):
        group = [i for i, row in enumerate(rows) if row.kind == kind and row.error is None]
        if not group:
            continue
        try:
            results, seen = _work([rows[i] for i in group], forwards, admission)
        except Exception:  # noqa: BLE001  (ours: answered per row below)
            logger.exception("a %s batch of %d requests failed%s", kind, len(group),
                             "; retrying them one by one" if len(group) > 1 else "")
            failed += group if len(group) > 1 else []
            if len(group) == 1:  # alone already: running it again would fail alike
                _failed(rows[group[0]])
            continue
        looked += seen
        for i, result in zip(group, results):
            found[i] = result
    for i in failed:
        if admission is not None and not admission.again(rows[i]):
            continue
        try:
            (found[i],), seen = _work([rows[i]], forwards)
            looked += seen
        except Exception:  # noqa: BLE001
            logger.exception("a %s request failed", rows[i].kind)
            _failed(rows[i])
    return found, looked


def _work(rows, forwards, admission=None):
    probs, looked = probabilities(rows, forwards)
    if rows[0].kind != "explain":
        return [Found(p) for p in probs], looked
    # Each explanation starts only while the batch is in time (else that row's 503: None).
    return [Found(p, explanations(row, top1(p), forwards))
            if admission is None or admission.in_time(row) else None
            for row, p in zip(rows, probs)], looked


def _failed(row):
    row.error = (500, f"the server failed while answering this {row.kind} request (logged)")
