"""The Open Inference Protocol (v2) requests as `tritonclient.http` sends them with its defaults:
the binary tensor data extension for inputs (oip_reply.py writes the answers).

A binary request is one body: a JSON inference header of `Inference-Header-Content-Length` bytes,
then the bytes of each input whose `parameters.binary_data_size` says so, in input order.
  BYTES  encoded images (PNG, JPEG, ...), each a 4-byte little-endian length and the file's bytes
  UINT8  raw pixels of shape [N, 32, 32, 3], N * 3,072 bytes

TorchServe 0.12 passes the worker no URL: a request on its KServe inference routes
(/v2/models/cifar10/infer, /v1/models/cifar10:predict) is told by the `explain: False` header those
routes add without the `url_path` header that /predictions adds (org.pytorch.serve.http.api.rest.
InferenceRequestHandler); the two routes cannot be told apart. Every size is checked against the
body and the limits before any image is copied or allocated.
"""
import json
import re
import struct

import torch
from ts.utils.util import PredictionException

from cifar10_serve import errors, forms
from cifar10_serve.errors import shown
from cifar10_serve.net import IMAGE_SIZE
from cifar10_serve.requests import (MAX_TEXT_FIELDS, PIXELS_PER_IMAGE, json_values,
                                    json_values_limit, read_request, too_many, v2_images)

HEADER_LENGTH = "Inference-Header-Content-Length"
ACCEPTED = ("a v2 request (POST /v2/models/cifar10/infer) is a JSON inference request with one "
            "input: BYTES of encoded images (PNG, JPEG, GIF, BMP, WebP, TIFF), shape [N], as "
            "base64 strings in \"data\", or UINT8 pixels, shape [N, 32, 32, 3], as integers; or, "
            "as tritonclient sends by default, the same input as binary tensor data after a JSON "
            f"header of {HEADER_LENGTH} bytes (BYTES: each image's 4-byte little-endian length, "
            "then its bytes; UINT8: N*3072 raw bytes); a raw image or a form goes to "
            "/predictions/cifar10")


def bad(message, code=400):
    """The client's mistake in a v2 request: what was wrong, then what a v2 request is."""
    return PredictionException(f"{message}; {ACCEPTED}", code)


def in_v2_terms(message):
    """An error message for a v2 request: what is accepted told in v2's terms (the checks that
    every request shares, images and limits, name /predictions' forms)."""
    if message.endswith(errors.ACCEPTED):
        return f"{message[:-len(errors.ACCEPTED)]}{ACCEPTED}"
    return message


def request_header(headers, name):
    """A request header's value, whatever case the client gave its name in, or None."""
    name = name.lower()
    return next((value for key, value in headers.items() if isinstance(value, str)
                 and key.lower() == name), None)


def on_protocol_route(headers):
    """Did the request come on TorchServe's KServe inference routes, /v2/models/cifar10/infer or
    /v1/models/cifar10:predict? They add `explain: False`, as /predictions does, but not its
    `url_path` (the explain routes add `explain: True`; their answers are not v2's shape)."""
    return headers.get("explain") == "False" and "url_path" not in headers


def check_encoding(headers):
    encoding = request_header(headers, "Content-Encoding")
    if encoding not in (None, "", "identity"):
        raise bad(f"the body is compressed (Content-Encoding: {shown(encoding)}), which "
                  f"TorchServe's frontend does not undo: send it uncompressed (tritonclient: "
                  f"request_compression_algorithm=None, its default)")


def read_body(request, headers, limits, row, enveloped=False):
    """(images, reply shape, the v2 request or None) of any one request (requests.read_request
    reads every form but v2's binary one). A request on the v2 (or KServe v1) route is answered
    in v2's shape, its errors too (``row.reply``); one in v2's binary data extension (an
    Inference-Header-Content-Length header) is read by ``read_binary``. ``enveloped``: the row is
    an instance of a KServe envelope's request, read as it is."""
    binary = None if enveloped else request_header(headers, HEADER_LENGTH)
    protocol = not enveloped and on_protocol_route(headers)
    if protocol or binary is not None:
        row.reply = "v2"
        check_encoding(headers)
    if binary is not None:
        return read_binary(request, binary, limits)
    content_type = request_header(headers, "content-type") or ""
    form = None  # a multipart request: each field's own content type ("" for text)
    proxied_form = request_header(headers, forms.FORM_HEADER)  # read only as the proxy sends it
    if proxied_form is not None and content_type.startswith("application/octet-stream") \
            and isinstance(request, dict) and len(request) == 1:
        request, form = forms.read_form(next(iter(request.values())), proxied_form,
                                        limits["max_images"] + MAX_TEXT_FIELDS)
    elif content_type.startswith("multipart/form-data") and isinstance(request, dict):
        form = {name: _field_type(headers.get(name)) for name in request}
    images, reply, v2 = read_request(request, limits, form)
    if protocol and reply not in ("v2", "kserve"):  # a raw image, a form, {"data": ...}
        raise bad("the body is not a v2 inference request (nor, on /v1/models/cifar10:predict, "
                  "KServe v1's {\"instances\": [...]}); TorchServe passes no URL to the "
                  "handler, so both routes are read alike")
    return images, reply, v2


def _field_type(headers):
    """A multipart field's own content type, or None where a request header of the same name
    (`accept`, `explain`) took its place in TorchServe's one dict of both."""
    return headers.get("content-type") if isinstance(headers, dict) else None


def read_binary(request, header_length, limits):
    """(images, "v2", the inference header) of a request with an ``Inference-Header-Content-
    Length``: the header parsed, each input's binary data found by its binary_data_size, the
    sizes checked against the body and the limits before any image is copied."""
    values = list(request.values()) if isinstance(request, dict) else []
    if len(values) != 1:
        raise bad(f"binary tensor data must be the whole body, got a form of {len(values)} "
                  f"fields")
    body = values[0]
    if isinstance(body, dict):  # sent as application/json and parsed: the body is the header
        return _images(body, memoryview(b""), limits["max_images"]), "v2", body
    if isinstance(body, str):
        body = body.encode()
    if not re.fullmatch(r"[0-9]{1,10}", header_length.strip()) \
            or not 0 < int(header_length) <= len(body):
        raise bad(f"the {HEADER_LENGTH} header is {shown(header_length)!r} for a body of "
                  f"{len(body)} bytes: it must be the length in bytes of the JSON inference "
                  f"header at the start of the body, a whole number from 1 to {len(body)}")
    length = int(header_length)
    view = memoryview(body)
    header = _parse_header(view[:length], length, limits["max_images"])
    return _images(header, view[length:], limits["max_images"]), "v2", header


def _parse_header(raw, length, max_images):
    """The JSON inference header (its values counted before parsing, as compat.bounded_loads)."""
    raw = bytes(raw)
    limit = json_values_limit(max_images)
    if json_values(raw) > limit:
        raise bad(f"the inference header holds more than {limit:,} JSON values", 413)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise bad(f"the first {length} bytes of the body ({HEADER_LENGTH}) are not a valid JSON "
                  f"inference header ({err})") from err
    if not isinstance(header, dict):
        raise bad(f"the inference header must be a JSON object, got {type(header).__name__}")
    return header


def parameters_of(tensor, where, shared):
    """A tensor's (an input's, an output's) "parameters" object; a 400 where it is not one, or
    where it names a shared memory region (``shared``: what this server does instead)."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad(f"{where}.parameters must be an object")
    if any(key.startswith("shared_memory") for key in parameters):
        raise bad(f"{where} names a shared memory region; {shared}")
    return parameters


def _images(header, data, max_images):
    """The images of the one input, found in ``data`` (the bytes after the header) by the inputs'
    binary_data_size; sizes that do not add up to the data are the client's mistake."""
    inputs = header.get("inputs")
    if not (isinstance(inputs, list) and inputs and all(isinstance(i, dict) for i in inputs)):
        raise bad("the inference header needs \"inputs\": a list of tensors")
    parts, offset = [], 0
    for index, tensor in enumerate(inputs):
        parameters = parameters_of(tensor, f"inputs[{index}]",
                                   "this server reads data from the request only")
        size = parameters.get("binary_data_size")
        if size is None:
            parts.append(None)
            continue
        if type(size) is not int or size < 0:
            raise bad(f"inputs[{index}].parameters.binary_data_size must be a whole number of "
                      f"bytes, got {shown(size)!r}")
        if "data" in tensor:
            raise bad(f"inputs[{index}] has both \"data\" and binary_data_size: send one")
        if size > len(data) - offset:
            raise bad(f"inputs[{index}].parameters.binary_data_size is {size} bytes, but only "
                      f"{len(data) - offset} of the body's {len(data)} bytes after the "
                      f"inference header are left for it")
        parts.append(data[offset:offset + size])
        offset += size
    if offset != len(data):
        raise bad(f"the body holds {len(data)} bytes after the inference header, but the "
                  f"inputs' binary_data_size add up to {offset}")
    if len(inputs) != 1:
        raise bad(f"the request has {len(inputs)} inputs; the model takes one (the images)")
    if parts[0] is None:
        return v2_images(header, max_images)
    return _binary_images(inputs[0], parts[0], max_images)


def _binary_images(tensor, data, max_images):
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not (isinstance(shape, list) and shape and all(type(n) is int for n in shape)):
        raise bad(f"inputs[0].shape must be a list of integers, got {shown(shape)}")
    count = shape[0]
    if count > max_images:
        raise too_many(count, max_images)
    if count < 1:
        raise bad(f"inputs[0].shape[0] must be at least 1, got {count}")
    if datatype == "BYTES":
        if len(shape) != 1:
            raise bad(f"a BYTES input has shape [N] (N images), got {shape}")
        return _elements(data, count)
    if datatype == "UINT8":
        if shape != [count, IMAGE_SIZE, IMAGE_SIZE, 3] or len(data) != count * PIXELS_PER_IMAGE:
            raise bad(f"a UINT8 input is {count * PIXELS_PER_IMAGE} bytes of pixels of shape "
                      f"[N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3]; got shape {shape} with "
                      f"{len(data)} bytes")
        pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return list(pixels.reshape(count, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 3, 1, 2))
    raise bad(f"inputs[0].datatype must be BYTES (encoded images) or UINT8 (pixels), got "
              f"{shown(datatype)!r}")


def _elements(data, count):
    """BYTES elements: each a 4-byte little-endian length and that many bytes, ``count`` in all
    (the shape's), filling the input's binary data exactly."""
    if 4 * count > len(data):
        raise bad(f"a BYTES input of shape [{count}] needs at least {4 * count} bytes (a 4-byte "
                  f"length per image), got {len(data)}")
    images, offset = [], 0
    while offset < len(data):
        index = len(images)
        if index == count:
            raise bad(f"the BYTES input's {len(data)} bytes hold more than the {count} images "
                      f"its shape says ({len(data) - offset} bytes left after image {count - 1})")
        if len(data) - offset < 4:
            raise bad(f"BYTES image {index}: its 4-byte length is cut off after "
                      f"{len(data) - offset} bytes")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if size > len(data) - offset:
            raise bad(f"BYTES image {index} says it is {size} bytes, but only "
                      f"{len(data) - offset} are left in the input")
        if size == 0:
            raise bad(f"BYTES image {index} is empty")
        images.append(bytes(data[offset:offset + size]))
        offset += size
    if len(images) != count:
        raise bad(f"the BYTES input holds {len(images)} images, its shape says {count}")
    return images
