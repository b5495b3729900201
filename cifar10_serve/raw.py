"""The plain /predictions protocol: one image as the raw body, base64 text, or JSON {"data": ...}
(one base64 string or a list); answered with each image's top classes (a list where a list was
sent), errors as TorchServe's error object.
"""
from dataclasses import dataclass

from cifar10_serve import answers
from cifar10_serve.bodies import decode_base64
from cifar10_serve.errors import bad_request, shown, too_many

FORMATS = "PNG, JPEG, GIF, BMP, WebP, TIFF"  # images.IMAGE_FORMATS, as people write them


def accepted(spec):
    return (f"send an image ({FORMATS}) as the raw body, as multipart form fields, or as JSON "
            f"{{\"data\": \"<base64>\"}} or {{\"data\": [\"<base64>\", ...]}} to "
            f"/predictions/{spec.name}")


@dataclass
class Reply:
    """A /predictions answer's shape: one object, or a list (several images, or a list sent)."""
    as_list: bool = False

    def predictions(self, probs, classes, topk, model_name, model_version=None,
                    min_confidence=None):
        found = answers.top_classes(probs, classes, topk)
        return (found if self.as_list else found[0]), answers.uncertain_headers(probs,
                                                                                min_confidence)

    def explanations(self, found):
        return (found if self.as_list else found[0]), {}


def error(failure, spec):
    return answers.error_object(failure, accepted(spec))


def read(payload, limits, spec):
    """(images, Reply); ``payload``: (field name, bytes, base64 text or parsed JSON)."""
    name, value = payload
    if isinstance(value, (dict, list)):
        images = json_images(value, 0, limits["max_images"])
        return images, Reply(isinstance(value.get("data"), list))
    return [one_image(name, value)], Reply()


def one_image(name, value):
    """Bytes, or base64 text (TorchServe passes text/* bodies as str)."""
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise bad_request(f"the body or field '{shown(name)}' is empty")
        return bytes(value)
    return decode_base64(value, f"the body or field '{shown(name)}' (text)")


def json_images(value, already, max_images):
    if not isinstance(value, dict) or set(value) != {"data"}:
        fields = [shown(k) for k in sorted(value)[:5]] if isinstance(value, dict) \
            else type(value).__name__
        raise bad_request(f"JSON must be an object with the one field \"data\", got {fields}")
    data = value["data"]
    items = data if isinstance(data, list) else [data]
    if not items:
        raise bad_request("\"data\" is an empty list")
    if already + len(items) > max_images:
        raise too_many(already + len(items), max_images)
    return [decode_base64(item, f"\"data\" item {i}") for i, item in enumerate(items)]
