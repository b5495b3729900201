"""The one rule that orders an answer's classes: probability descending, and on an exact tie the
lower class index first. argmax and topk each break ties their own way, so every route that ranks
classes asks this module. Also the answers' confidence: the top-1 probability, its lead over the
runner-up, and the buckets of the metrics port's confidence histogram."""
import torch

# The upper bounds of the metrics port's top-1 confidence histogram: finer near 1, where a
# calibrated model's confident answers gather and a shift in what users send shows first.
CONFIDENCE_BOUNDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def ranked(probs):
    """Class indices (N, classes), best first; ties by class index ascending."""
    return torch.sort(torch.as_tensor(probs), dim=-1, descending=True, stable=True).indices


def top1(probs):
    return ranked(probs)[..., 0]


def confidence(probs):
    """(the top-1 probability (N,), its lead over the runner-up (N,))."""
    top2 = torch.topk(torch.as_tensor(probs), 2, dim=-1).values
    return top2[..., 0], top2[..., 0] - top2[..., 1]


def confidence_buckets(top, bounds=CONFIDENCE_BOUNDS):
    """{bound as Prometheus writes it ("0.5", ..., "+Inf"): how many of ``top`` are at most it}."""
    top = torch.as_tensor(top)
    return {**{f"{b:g}": int((top <= b).sum()) for b in bounds}, "+Inf": len(top)}
