"""Answers back: each row's class probabilities (or explanations) in the shape its request asked
for, and each failed row's error, set for that request alone through TorchServe's context."""
from cifar10_serve.errors import safe


def prediction(row, probs, classes, topk, model_name):
    """The answer to a predict row from its images' class probabilities (N, classes)."""
    if row.reply == "v2":
        return v2_response(probs, classes, model_name, row.request_id)
    if row.reply == "tensor":  # under the kservev2 envelope, which names and shapes it
        return probs.reshape(-1).tolist()
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    answers = [{classes[i]: p for i, p in zip(idx, val)}
               for idx, val in zip(indices.tolist(), values.tolist())]
    return shaped(row.reply, answers, "predictions")


def v2_response(probs, classes, model_name, request_id):
    """Open Inference Protocol v2: labels, and every class probability in class-index order."""
    response = {"model_name": model_name, "outputs": [
        {"name": "label", "datatype": "BYTES", "shape": [len(probs)],
         "data": [classes[i] for i in probs.argmax(dim=1).tolist()]},
        {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
         "data": probs.reshape(-1).tolist()}]}
    if request_id is not None:
        response["id"] = request_id
    return response


def shaped(reply, answers, kserve_key):
    """One answer per image -> the request's shape: one object, a list, or KServe v1's."""
    if reply == "one":
        return answers[0]
    if reply == "kserve":
        return {kserve_key: answers}
    return answers  # a list: several images, and explanations of v2 requests


def set_errors(rows, context, request_of):
    """Each failed row's status through the context, for its own request (``request_of(row
    index)``: under a KServe envelope every row is an instance of request 0, and the first
    failing instance names the status); its answer becomes the error object."""
    errors = {}
    for index, row in enumerate(rows):
        if row.error is None:
            continue
        code, message = row.error[0], safe(row.error[1])
        if request_of(index) != index:  # instances of one enveloped request
            message = f"instance {index}: {message}"
        errors.setdefault(request_of(index), (code, message))
        row.answer = {"code": code, "type": "BadRequest" if code < 500 else
                      "InternalServerError", "message": message}
    for index, (code, message) in errors.items():
        context.set_response_status(code, message, index)
