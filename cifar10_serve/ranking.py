"""The one rule that orders an answer's classes: probability descending, and on an exact tie
the lower class index first (a stable sort). argmax and topk each break ties their own way
(topk's is not even specified), so two routes that pick the top-1 by different calls can name
different classes for one image; every route that ranks classes should ask this module."""
import torch


def ranked(probs):
    """Class indices (N, classes) of each row of ``probs`` (N, classes), best first: by
    probability descending, ties by class index ascending."""
    return torch.sort(torch.as_tensor(probs), dim=-1, descending=True, stable=True).indices


def top1(probs):
    """The first class of ``ranked`` per row (N,)."""
    return ranked(probs)[..., 0]
