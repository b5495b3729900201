"""KServe's v1 protocol: {"instances": [{"data": "<base64>"}, ...]} ("b64" read as "data"),
answered {"predictions": [...]} or {"explanations": [...]}, errors as TorchServe's error object.
Under TorchServe's `kserve` envelope each instance is a row of its own (``read_instance``).
"""
from dataclasses import dataclass

from cifar10_serve import answers
from cifar10_serve.bodies import decode_base64
from cifar10_serve.errors import bad_request, too_many


def accepted(spec):
    return (f"a KServe v1 request (POST /v1/models/{spec.name}:predict, or "
            f"/predictions/{spec.name}) is JSON {{\"instances\": [{{\"data\": \"<base64>\"}}, "
            f"...]}} of images (PNG, JPEG, GIF, BMP, WebP, TIFF), and nothing else but "
            f"\"parameters\"")


def error(failure, spec):
    return answers.error_object(failure, accepted(spec))


@dataclass
class Reply:
    def predictions(self, probs, classes, topk, model_name, model_version=None,
                    min_confidence=None):
        return ({"predictions": answers.top_classes(probs, classes, topk)},
                answers.uncertain_headers(probs, min_confidence))

    def explanations(self, found):
        return {"explanations": found}, {}


@dataclass
class Instance:
    """One instance of TorchServe's `kserve` envelope, which wraps the answers itself."""

    def predictions(self, probs, classes, topk, model_name, model_version=None,
                    min_confidence=None):  # the envelope writes the one response's headers
        return answers.top_classes(probs, classes, topk)[0], {}

    def explanations(self, found):
        return found[0], {}


def read(request, limits, spec):
    instances = request.get("instances")
    if set(request) - {"instances", "parameters"} or not isinstance(instances, list) \
            or not instances:
        raise bad_request("a KServe v1 request needs \"instances\": [{\"data\": \"<base64>\"}, "
                          "...] and nothing else but \"parameters\"")
    if len(instances) > limits["max_images"]:
        raise too_many(len(instances), limits["max_images"])
    return [_image(instance, f"instance {i}") for i, instance in enumerate(instances)], Reply()


def read_instance(instance, limits, spec):
    """{"data": "<base64>"}, {"b64": ...}, or the base64 text itself."""
    return [_image(instance, "the instance")], Instance()


def _image(instance, where):
    if isinstance(instance, dict):
        if not instance:
            raise bad_request("the instance is empty")
        return decode_base64(instance.get("data", instance.get("b64")), where)
    if isinstance(instance, str):
        return decode_base64(instance, where)
    raise bad_request(f"an instance must be {{\"data\": \"<base64>\"}}, got "
                      f"{type(instance).__name__}")
