"""TorchServe's own answer shapes, which raw, multipart and KServe v1 write: an image's top classes
as {class: probability}, and the error object {"code", "type", "message"}.
"""
from cifar10_serve.errors import written
from cifar10_serve.ranking import confidence, ranked

# The error type an answer names, by its status (TorchServe's own answers name their types so).
ERROR_TYPES = {413: "RequestEntityTooLarge", 503: "ServiceUnavailable"}


def top_classes(probs, classes, topk):
    """Per image, its ``topk`` classes and their probabilities in ranking.py's order."""
    indices = ranked(probs)[:, :min(topk, probs.shape[1])]
    values = probs.gather(1, indices)
    return [{classes[i]: p for i, p in zip(idx, val)}
            for idx, val in zip(indices.tolist(), values.tolist())]


def uncertain_headers(probs, min_confidence):
    """X-Uncertain, where the request asked (X-Min-Confidence): per image "true" where its top-1
    probability is below ``min_confidence``, else "false"; the body keeps its shape."""
    if min_confidence is None:
        return {}
    top, _ = confidence(probs)
    return {"X-Uncertain": ", ".join("true" if p < min_confidence else "false"
                                     for p in top.tolist())}


def error_object(failure, accepted):
    """TorchServe's error object; its message is also the HTTP reason phrase."""
    code = failure.status
    return {"code": code, "type": ERROR_TYPES.get(code, "BadRequest" if code < 500
                                                  else "InternalServerError"),
            "message": written(failure, accepted)}
