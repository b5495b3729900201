"""Request bodies -> rows: what each request of a batch asks for, read before any pixel is decoded.

A request carries one or more images, as
  - the raw body:                 curl -T cat.png .../predictions/cifar10
  - multipart form fields:        curl -F a=@cat.png -F b=@dog.jpg .../predictions/cifar10
                                  (an HTML form's text fields beside the files are not images)
  - JSON with base64:             {"data": "<base64>"} or {"data": ["<base64>", ...]}
  - Open Inference Protocol v2:   POST /v2/models/cifar10/infer, BYTES (base64) or UINT8 pixels
                                  (as binary tensor data too: oip.py)
  - KServe v1:                    {"instances": [{"data": "<base64>"}, ...]}
Every count (images, JSON values, id length) is checked against the limits before the work it
bounds; a request the handler cannot use is its own 4xx (errors.bad_request).
"""
import base64
import binascii
import json
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from cifar10_serve.errors import bad_request, shown
from cifar10_serve.images import looks_like_image
from cifar10_serve.net import IMAGE_SIZE

# A body that starts like JSON (checked without copying the body, unlike bytes.lstrip()).
JSON_START = re.compile(rb"\s*[\[{]")
WHITESPACE = re.compile(r"\s+")
MAX_TEXT_FIELDS = 64  # an HTML form's own fields (tokens, buttons) read beside max_images images
PIXELS_PER_IMAGE = IMAGE_SIZE * IMAGE_SIZE * 3


@dataclass
class Row:
    """One request of a batch, carried from its body to its answer.

    kind: "predict", "explain" or "describe"; reply: the answer's shape, "one" (an object), "list",
    "v2", "kserve" or "tensor" (a kservev2 envelope's); images: encoded bytes at first, uint8
    (3, 32, 32) tensors once decoded; v2: what a v2 request asks of its answer (oip_reply.Reply: its
    id, its outputs, JSON or binary); error: (status, message) once anything failed for this
    request alone; answer: what it gets back."""
    kind: str = "predict"
    reply: str = "one"
    images: list = field(default_factory=list)
    v2: object = None
    error: tuple = None
    answer: object = None


def text(name):
    return name.decode("utf-8", "replace") if isinstance(name, (bytes, bytearray)) else str(name)


def numbered(name, position):
    """A form field's name with its position (data#1, data#2, ...): several fields keep
    their images whatever names they repeat (read_request drops the number from messages)."""
    return f"{text(name)}#{position}"


def json_values_limit(max_images):
    """The most values (as `json_values` counts them) a JSON body may hold: what the largest
    request accepted needs, ``max_images`` images as v2 UINT8 pixels nested [N, 32, 32, 3] (per
    image 3,072 numbers, 1,024 pixel lists, 32 rows and its own list), plus room for keys."""
    return max_images * (PIXELS_PER_IMAGE + IMAGE_SIZE * IMAGE_SIZE + IMAGE_SIZE + 1) + 1024


def json_values(body):
    """The commas and opening brackets of a JSON text (str or bytes), counted without parsing
    it: at least the number of values it holds bar one (commas in strings only add)."""
    marks = (b",", b"[", b"{") if isinstance(body, (bytes, bytearray)) else (",", "[", "{")
    return sum(body.count(mark) for mark in marks)


def read_request(row, limits, form=None):
    """(encoded images or uint8 tensors of one request row in order, reply shape, the v2 request
    itself or None: its "id", "outputs" and "parameters" say what its answer holds, oip_reply.reply).

    ``form``: for a multipart request, each field's own content type ("" for an HTML form's
    text fields, None where unknown); None for any other body. Counts the images against the
    limits before decoding anything.
    """
    max_images = limits["max_images"]
    if isinstance(row, str):  # a bare base64 instance, from TorchServe's KServe v1 envelope
        row = {"data": row}
    if not isinstance(row, dict):
        raise bad_request(f"an instance must be {{\"data\": \"<base64>\"}}, got "
                          f"{type(row).__name__}")
    if not row:
        raise bad_request("the multipart body has no part TorchServe could read (text before "
                          "the first boundary, a preamble, makes it drop every part)"
                          if form is not None else "the request is empty")
    if _is_v2_tensor(row):  # one tensor, from TorchServe's kservev2 envelope
        return v2_images({"inputs": [_envelope_tensor(row)]}, max_images), "tensor", None
    texts = {name for name in row if form is not None and form.get(name) == ""}
    if len(row) - len(texts) > max_images:
        raise too_many(len(row) - len(texts), max_images)
    if len(texts) > max_images + MAX_TEXT_FIELDS:  # a form's own fields beside its images
        raise bad_request(f"the form has {len(texts)} text fields; at most "
                          f"{max_images + MAX_TEXT_FIELDS} are read", 413)
    images, as_list, text_fields = [], False, []
    for name, value in row.items():
        if isinstance(value, (bytes, bytearray)) and JSON_START.match(value):
            value = _parse_json(value, max_images)  # not parsed by TorchServe: see compat.py
        if isinstance(value, dict) and len(row) == 1 and "inputs" in value:
            return v2_images(value, max_images), "v2", value
        if isinstance(value, dict) and len(row) == 1 and "instances" in value:
            return _kserve_images(value, max_images), "kserve", None
        if isinstance(value, (dict, list)):
            images += _json_images(value, len(images), max_images)
            as_list = as_list or isinstance(value.get("data"), list)
        elif name in texts and isinstance(value, (bytes, bytearray)):
            image = _form_text_image(value)  # an HTML form's text field: an image, or no image
            images += [image] if image else []
            text_fields += [] if image else [text(name).rsplit("#", 1)[0]]
            if len(images) > max_images:
                raise too_many(len(images), max_images)
        elif isinstance(value, (bytes, bytearray)):
            if not value:
                raise bad_request(f"the body or field '{shown(name)}' is empty")
            images.append(bytes(value))
        else:  # text: base64, as a TorchServe KServe v1 envelope passes {"data": "..."}
            images.append(_decode_base64(value, f"the body or field '{shown(name)}' (text)"))
    if not images:
        raise bad_request(f"the form has no image: its fields {[shown(n) for n in text_fields]} "
                          f"are text (send the image as a file field, -F name=@cat.jpg, or as "
                          f"base64 text)")
    return images, "list" if as_list or len(images) > 1 else "one", None


def _form_text_image(value):
    """The image a form's text field holds (its bytes, or base64), or None when it holds none
    (a CSRF token, a submit button's name)."""
    if looks_like_image(value):  # `curl -F "data=<cat.jpg"`: the file's bytes, no content type
        return bytes(value)
    if value.startswith(b"data:") and b"," in value[:256]:  # a data URL, as browsers produce
        value = value.split(b",", 1)[1]
    try:
        data = base64.b64decode(WHITESPACE.sub("", value.decode("ascii")), validate=True)
    except (UnicodeDecodeError, binascii.Error, ValueError):
        return None
    return data if looks_like_image(data) else None


def too_many(count, max_images):
    return bad_request(f"the request carries {count} images; at most {max_images} are accepted "
                       f"per request: split it into several requests", 413)


def _is_v2_tensor(row):
    """A row that is one v2 tensor: what TorchServe's kservev2 envelope passes the handler."""
    return {"datatype", "shape", "data"} <= set(row)


def _envelope_tensor(row):
    """The kservev2 envelope keeps only data[0] of a BYTES tensor: put it back in a list, so a
    tensor of several images fails its shape check instead of losing images."""
    data = row["data"]
    return {**row, "data": [data] if isinstance(data, str) else data}


def v2_images(request, max_images):
    """The images of an Open Inference Protocol v2 request: one BYTES input of base64 images,
    shape [N], or one UINT8 input of pixels, shape [N, 32, 32, 3]; shapes are checked against
    the limits and the data sent before anything is allocated."""
    inputs = request.get("inputs")
    if not (isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict)):
        raise bad_request("a v2 request needs \"inputs\": [one tensor]")
    tensor = inputs[0]
    datatype, shape, data = tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
    if not isinstance(data, list) or not data:
        raise bad_request("v2 inputs[0].data must be a non-empty list")
    if not (isinstance(shape, list) and shape and all(type(n) is int for n in shape)):
        raise bad_request(f"v2 inputs[0].shape must be a list of integers, got {shown(shape)}")
    if not 1 <= shape[0] <= max_images:
        raise too_many(shape[0], max_images) if shape[0] > 0 else \
            bad_request(f"v2 inputs[0].shape[0] must be at least 1, got {shape[0]}")
    if datatype == "BYTES":
        if shape != [len(data)]:
            raise bad_request(f"v2 BYTES input: shape {shape} does not match {len(data)} items")
        return [_decode_base64(item, f"v2 inputs[0].data[{i}]") for i, item in enumerate(data)]
    if datatype == "UINT8":
        return _v2_pixels(shape, data)
    raise bad_request(f"v2 inputs[0].datatype must be BYTES (base64 images) or UINT8 (pixels), "
                      f"got {shown(datatype)!r}")


def _v2_pixels(shape, data):
    n = shape[0]
    wanted = f"integers 0-255 of shape [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], flat or nested"
    if shape != [n, IMAGE_SIZE, IMAGE_SIZE, 3] or len(data) not in (n * PIXELS_PER_IMAGE, n):
        raise bad_request(f"v2 UINT8 input must be {wanted}, got shape {shape} with "
                          f"{len(data)} items")
    try:
        pixels = np.asarray(data)
    except ValueError as err:
        raise bad_request(f"v2 UINT8 input: data is not a regular array ({err})") from err
    if (pixels.shape not in ((n * PIXELS_PER_IMAGE,), tuple(shape))
            or pixels.dtype.kind not in "iu" or pixels.min() < 0 or pixels.max() > 255):
        raise bad_request(f"v2 UINT8 input must be {wanted}, got data of shape "
                          f"{list(pixels.shape)} and type {pixels.dtype}")
    batch = torch.from_numpy(pixels.astype(np.uint8).reshape(n, IMAGE_SIZE, IMAGE_SIZE, 3))
    return list(batch.permute(0, 3, 1, 2))


def _kserve_images(request, max_images):
    """KServe v1: {"instances": [{"data": "<base64>"}, ...]} ("b64" is taken for "data" too)."""
    instances = request.get("instances")
    if set(request) - {"instances", "parameters"} or not isinstance(instances, list) \
            or not instances:
        raise bad_request("a KServe v1 request needs \"instances\": [{\"data\": \"<base64>\"}, "
                          "...] and nothing else but \"parameters\"")
    if len(instances) > max_images:
        raise too_many(len(instances), max_images)
    images = []
    for i, instance in enumerate(instances):
        value = instance.get("data", instance.get("b64")) if isinstance(instance, dict) \
            else instance
        images.append(_decode_base64(value, f"instance {i}"))
    return images


def _parse_json(raw, max_images):
    """A JSON body TorchServe did not parse: its Content-Type was not application/json, or it
    held more values than the largest request accepted (compat.bounded_loads)."""
    limit = json_values_limit(max_images)
    if json_values(raw) > limit:
        raise bad_request(f"the JSON body holds more than {limit:,} values (commas and brackets); "
                          f"the largest request accepted is {max_images} images as v2 UINT8 "
                          f"pixels: send base64 images, or fewer per request", 413)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise bad_request(f"the body is not valid JSON ({err})") from err


def _json_images(value, already, max_images):
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
    return [_decode_base64(item, f"\"data\" item {i}") for i, item in enumerate(items)]


def _decode_base64(item, where):
    if not isinstance(item, str):
        raise bad_request(f"{where} is {type(item).__name__}, not a base64 string")
    if item.startswith("data:") and "," in item:  # a data URL, as browsers produce
        item = item.split(",", 1)[1]
    try:  # line breaks too: GNU base64 wraps at 76 columns unless told -w0
        return base64.b64decode(WHITESPACE.sub("", item), validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"{where} is not valid base64 ({err})") from err
