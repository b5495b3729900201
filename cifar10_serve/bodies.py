"""What every protocol's reading shares: the Row a request travels in, base64 and JSON read within
the limits (counted before parsing), the form-field numbering, and ``min_confidence``.
"""
import base64
import binascii
import json
import re
from dataclasses import dataclass, field

from cifar10_serve.errors import bad_request, shown

# A body that starts like JSON (checked without copying the body, unlike bytes.lstrip()).
JSON_START = re.compile(rb"\s*[\[{]")
WHITESPACE = re.compile(r"\s+")


@dataclass
class Row:
    """One request of a batch, carried from its body to its answer.

    protocol: the module that reads it and writes its answer and errors; reply: that protocol's
    Reply; images: encoded bytes, then uint8 (C, H, W) tensors once decoded; error: a Failure (or a
    (status, message)) once anything failed for this request alone; result: class probabilities
    (N x classes) or explanations."""
    kind: str = "predict"
    protocol: object = None
    reply: object = None
    images: list = field(default_factory=list)
    error: tuple = None
    result: object = None
    answer: object = None
    headers: dict = field(default_factory=dict)
    min_confidence: float = None  # mark answers whose top-1 probability is below it
    resent_at: float = None  # when the proxy sends this request again (time.time())


def text(name):
    return name.decode("utf-8", "replace") if isinstance(name, (bytes, bytearray)) else str(name)


def numbered(name, position):
    """data#1, data#2, ...: repeated field names keep every image (``field_name`` undoes it)."""
    return f"{text(name)}#{position}"


def field_name(name):
    return text(name).rsplit("#", 1)[0]


def json_values_limit(max_images, pixel_shape):
    """The most values a JSON body may hold: ``max_images`` images as v2 UINT8 pixels nested
    [N, H, W, C] (per image H*W*C numbers, H*W pixel lists, H rows, one list), plus room for keys.
    """
    height, width, channels = pixel_shape
    per_image = height * width * channels + height * width + height + 1
    return max_images * per_image + 1024


def json_values(body):
    """Commas and opening brackets, counted without parsing: at least the values held bar one."""
    marks = (b",", b"[", b"{") if isinstance(body, (bytes, bytearray)) else (",", "[", "{")
    return sum(body.count(mark) for mark in marks)


def looks_like_json(value):
    return isinstance(value, (bytes, bytearray)) and JSON_START.match(value) is not None


def parse_json(raw, limit, what="the JSON body", largest=""):
    """A JSON text TorchServe did not parse (another Content-Type, or over bounded_loads' limit),
    counted against ``limit`` values first (a 413 naming ``largest``)."""
    if json_values(raw) > limit:
        raise bad_request(f"{what} holds more than {limit:,} values (commas and brackets)"
                          f"{largest}", 413)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise bad_request(f"{what} is not valid JSON ({err})") from err


def read_json(raw, max_images, spec, what="the JSON body"):
    return parse_json(raw, json_values_limit(max_images, spec.pixel_shape), what,
                      f"; the largest request accepted is {max_images} images as v2 UINT8 "
                      f"pixels: send base64 images, or fewer per request")


def decode_base64(item, where):
    """Base64 text to bytes: a data URL too, and line breaks (GNU base64 wraps at 76)."""
    if not isinstance(item, str):
        raise bad_request(f"{where} is {type(item).__name__}, not a base64 string")
    if item.startswith("data:") and "," in item:  # a data URL, as browsers produce
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode(WHITESPACE.sub("", item), validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"{where} is not valid base64 ({err})") from err


def min_confidence(value, where):
    """A float from 0 to 1, None where not given; a 400 naming ``where`` otherwise."""
    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) \
            or not 0 <= number <= 1:
        raise bad_request(f"{where} must be a probability from 0 to 1 (the top-1 probability "
                          f"below which the answer is marked uncertain), got "
                          f"{shown(value)!r}")
    return float(number)
