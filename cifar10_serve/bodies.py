"""What every protocol's reading shares: the record a request travels in (Row), base64 and JSON
read within the limits, the form-field numbering TorchServe's adapter applies, and the optional
``min_confidence`` a request may ask its answer to be marked by.

JSON bodies are counted before they are parsed: the largest legal one is ``max_images`` images as
v2 UINT8 pixels nested [N, H, W, C] of the model's input (``json_values_limit``).
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

    kind: "predict", "explain" or "describe"; protocol: the module that reads the request and
    writes its answer and errors (raw, multipart, kserve, v2, or the TorchServe adapter's
    envelope tensors); reply: what the request asks of its answer (that protocol's Reply);
    images: encoded bytes at first, uint8 (C, H, W) tensors once decoded; error: a
    errors.Failure (or the budget's and the forward's (status, message)) once anything failed
    for this request alone; result: what the forward found (class probabilities, N x classes,
    or explanations); answer and headers: what it gets back; min_confidence: where the request
    asked, the top-1 probability below which its answer says it is uncertain."""
    kind: str = "predict"
    protocol: object = None
    reply: object = None
    images: list = field(default_factory=list)
    error: tuple = None
    result: object = None
    answer: object = None
    headers: dict = field(default_factory=dict)
    min_confidence: float = None  # X-Min-Confidence: mark answers whose top-1 is below it


def text(name):
    return name.decode("utf-8", "replace") if isinstance(name, (bytes, bytearray)) else str(name)


def numbered(name, position):
    """A form field's name with its position (data#1, data#2, ...): several fields keep
    their images whatever names they repeat (messages drop the number: ``field_name``)."""
    return f"{text(name)}#{position}"


def field_name(name):
    return text(name).rsplit("#", 1)[0]


def json_values_limit(max_images, pixel_shape):
    """The most values (as `json_values` counts them) a JSON body may hold: what the largest
    request accepted needs, ``max_images`` images as v2 UINT8 pixels nested [N, H, W, C]
    (``pixel_shape`` (H, W, C): per image H*W*C numbers, H*W pixel lists, H rows and its own
    list), plus room for keys."""
    height, width, channels = pixel_shape
    per_image = height * width * channels + height * width + height + 1
    return max_images * per_image + 1024


def json_values(body):
    """The commas and opening brackets of a JSON text (str or bytes), counted without parsing
    it: at least the number of values it holds bar one (commas in strings only add)."""
    marks = (b",", b"[", b"{") if isinstance(body, (bytes, bytearray)) else (",", "[", "{")
    return sum(body.count(mark) for mark in marks)


def looks_like_json(value):
    return isinstance(value, (bytes, bytearray)) and JSON_START.match(value) is not None


def parse_json(raw, limit, what="the JSON body", largest=""):
    """A JSON text TorchServe did not parse (its Content-Type was not application/json, or it
    held more values than the largest request accepted: the TorchServe adapter's
    bounded_loads), counted against ``limit`` values first (a 413 naming ``largest``)."""
    if json_values(raw) > limit:
        raise bad_request(f"{what} holds more than {limit:,} values (commas and brackets)"
                          f"{largest}", 413)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise bad_request(f"{what} is not valid JSON ({err})") from err


def read_json(raw, max_images, spec, what="the JSON body"):
    """``parse_json`` within what the largest request of ``max_images`` images needs."""
    return parse_json(raw, json_values_limit(max_images, spec.pixel_shape), what,
                      f"; the largest request accepted is {max_images} images as v2 UINT8 "
                      f"pixels: send base64 images, or fewer per request")


def decode_base64(item, where):
    """An image sent as base64 text (a data URL too; line breaks too: GNU base64 wraps at 76
    columns unless told -w0)."""
    if not isinstance(item, str):
        raise bad_request(f"{where} is {type(item).__name__}, not a base64 string")
    if item.startswith("data:") and "," in item:  # a data URL, as browsers produce
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode(WHITESPACE.sub("", item), validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"{where} is not valid base64 ({err})") from err


def min_confidence(value, where):
    """A request's ``min_confidence`` (a number, or its text in a header) as a float from 0 to 1;
    None where it was not given; a 400 naming ``where`` it was read otherwise."""
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
