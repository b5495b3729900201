"""TorchServe's own answer shapes, which the /predictions protocols (raw, multipart) and KServe v1
write: an image's top classes as {class: probability}, and the error object
{"code", "type", "message"}. Written from results and Failures only: nothing here reads a request.
"""
from cifar10_serve.errors import written

# The error type an answer names, by its status (TorchServe's own answers name their types so).
ERROR_TYPES = {413: "RequestEntityTooLarge", 503: "ServiceUnavailable"}


def top_classes(probs, classes, topk):
    """Per image (rows of ``probs``, N x classes), its ``topk`` classes and their probabilities,
    most probable first."""
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [{classes[i]: p for i, p in zip(idx, val)}
            for idx, val in zip(indices.tolist(), values.tolist())]


def error_object(failure, accepted):
    """TorchServe's error object for a failure; its message, what was wrong and what is
    accepted (``accepted``: the protocol's words, where the failure names none), is also the
    HTTP reason phrase."""
    code = failure.status
    return {"code": code, "type": ERROR_TYPES.get(code, "BadRequest" if code < 500
                                                  else "InternalServerError"),
            "message": written(failure, accepted)}
