"""Answers back: each row's class probabilities (or explanations) in the shape its request asked
for, and each failed row's error, set for that request alone through TorchServe's context."""
from cifar10_serve import oip, oip_reply
from cifar10_serve.errors import safe


def prediction(row, probs, classes, topk, model_name):
    """The answer to a predict row from its images' class probabilities (N, classes)."""
    if row.reply == "v2":
        return oip_reply.response(probs, classes, model_name, row.v2 or oip_reply.Reply())
    if row.reply == "tensor":  # under the kservev2 envelope, which names and shapes it
        return probs.reshape(-1).tolist()
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    answers = [{classes[i]: p for i, p in zip(idx, val)}
               for idx, val in zip(indices.tolist(), values.tolist())]
    return shaped(row.reply, answers, "predictions")


def shaped(reply, answers, kserve_key):
    """One answer per image -> the request's shape: one object, a list, or KServe v1's."""
    if reply == "one":
        return answers[0]
    if reply == "kserve":
        return {kserve_key: answers}
    return answers  # a list: several images, and explanations of v2 requests


# The error type an answer names, by its status (TorchServe's own answers name their types so).
ERROR_TYPES = {413: "RequestEntityTooLarge", 503: "ServiceUnavailable"}


def set_errors(rows, context, request_of):
    """Each failed row's status through the context, for its own request (``request_of(row
    index)``: under a KServe envelope every row is an instance of request 0, and the first
    failing instance names the status); its answer becomes the error object (with v2's
    "error" too, which v2 clients such as tritonclient read)."""
    errors = {}
    for index, row in enumerate(rows):
        if row.error is None:
            continue
        code, message = row.error[0], safe(row.error[1])
        if row.reply == "v2":
            message = oip.in_v2_terms(message)
        if request_of(index) != index:  # instances of one enveloped request
            message = f"instance {index}: {message}"
        errors.setdefault(request_of(index), (code, message))
        row.answer = {"code": code, "type": ERROR_TYPES.get(code, "BadRequest" if code < 500
                                                            else "InternalServerError"),
                      "message": message}
        if row.reply == "v2":
            row.answer["error"] = message
    for index, (code, message) in errors.items():
        context.set_response_status(code, message, index)


def set_binary(rows, context):
    """Answers in v2's binary data extension (oip_reply.Binary): the body as bytes, and the length of
    its JSON header in the response's Inference-Header-Content-Length header."""
    for index, row in enumerate(rows):
        if isinstance(row.answer, oip_reply.Binary):
            context.set_response_header(index, oip.HEADER_LENGTH, str(row.answer.header_length))
            context.set_response_content_type(index, "application/octet-stream")
            row.answer = row.answer.body
