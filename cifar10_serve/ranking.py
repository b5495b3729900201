"""The one rule that orders an answer's classes: probability descending, and on an exact tie
the lower class index first (a stable sort). argmax and topk each break ties their own way
(topk's is not even specified), so two routes that pick the top-1 by different calls can name
different classes for one image; every route that ranks classes should ask this module. Also
what the answers say of their confidence: the top-1 probability and its lead over the runner-up
(``min_confidence``'s marker), and the buckets of the metrics port's confidence histogram."""
import torch


def ranked(probs):
    """Class indices (N, classes) of each row of ``probs`` (N, classes), best first: by
    probability descending, ties by class index ascending."""
    return torch.sort(torch.as_tensor(probs), dim=-1, descending=True, stable=True).indices


def top1(probs):
    """The first class of ``ranked`` per row (N,)."""
    return ranked(probs)[..., 0]


def confidence(probs):
    """(the top-1 probability (N,), its lead over the runner-up (N,)) per row of ``probs``: what
    the uncertainty marker (``min_confidence``) and the confidence histogram read."""
    top2 = torch.sort(torch.as_tensor(probs), dim=-1, descending=True).values[..., :2]
    return top2[..., 0], top2[..., 0] - top2[..., 1]


# The upper bounds of the served top-1 confidence histogram (the metrics port's
# ts_handler_top1_confidence_bucket{le=...}): finer near 1, where a calibrated model's
# confident answers gather and a shift in what users send shows first.
CONFIDENCE_BOUNDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def confidence_buckets(top, bounds=CONFIDENCE_BOUNDS):
    """{upper bound as Prometheus writes it ("0.5", ..., "+Inf"): how many of the top-1
    probabilities ``top`` are at most it}: cumulative, as a Prometheus histogram's buckets."""
    top = torch.as_tensor(top)
    counts = {f"{b:g}": int((top <= b).sum()) for b in bounds}
    return {**counts, "+Inf": len(top)}
