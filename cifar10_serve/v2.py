"""The Open Inference Protocol (v2), both directions: requests as JSON or with binary tensor data
(as tritonclient sends by default), answers as their inference header asks, errors in v2's
shape, and the model's metadata. The input: BYTES of encoded images, shape [N], or UINT8
pixels [N, H, W, C]; every size is checked against the body and the limits before any image is
copied. The outputs: `label`, `probabilities` (or its top k with `classification`), each JSON
or binary; `min_confidence` marks uncertain answers. TorchServe cannot tell KServe v1's route
from v2's, so KServe v1 is read there too.
"""
import json
import re
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from cifar10_serve import answers
from cifar10_serve.bodies import decode_base64, json_values, json_values_limit, min_confidence
from cifar10_serve.errors import bad_request, shown, too_many
from cifar10_serve.ranking import confidence, ranked

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUTS = ("label", "probabilities")
# The metadata's platform: what serves the model.
PLATFORM = "pytorch_torchserve"


def accepted(spec):
    height, width, channels = spec.pixel_shape
    return (f"a v2 request (POST /v2/models/{spec.name}/infer) is a JSON inference request "
            f"with one input: BYTES of encoded images (PNG, JPEG, GIF, BMP, WebP, TIFF), shape "
            f"[N], as base64 strings in \"data\", or UINT8 pixels, shape [N, {height}, {width}, "
            f"{channels}], as integers; or, as tritonclient sends by default, the same input as "
            f"binary tensor data after a JSON header of {HEADER_LENGTH} bytes (BYTES: each "
            f"image's 4-byte little-endian length, then its bytes; UINT8: "
            f"N*{spec.values_per_image} raw bytes); a raw image or a form goes to "
            f"/predictions/{spec.name}")


def error(failure, spec):
    """v2's "error" (which tritonclient reads) beside TorchServe's code, type and message."""
    found = answers.error_object(failure, accepted(spec))
    return {**found, "error": found["message"]}


def metadata(spec, version):
    return {"name": spec.name, "versions": [str(version)], "platform": PLATFORM,
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]},
                       {"name": "images", "datatype": "UINT8",
                        "shape": [-1, *spec.pixel_shape]}],
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": "probabilities", "datatype": "FP32",
                         "shape": [-1, len(spec.classes)],
                         "parameters": {"classes": list(spec.classes)}}]}


# --- requests --------------------------------------------------------------------------------

def read(payload, limits, spec):
    """(images, Reply); ``payload``: (the body: parsed JSON, or bytes after a binary header; the
    Inference-Header-Content-Length header or None; the Content-Encoding header, which the
    TorchServe adapter has checked)."""
    body, header_length, _ = payload
    max_images = limits["max_images"]
    if header_length is not None and isinstance(body, (bytes, bytearray, str)):
        header, images = _read_binary(body, header_length, max_images, spec)
    elif isinstance(body, dict) and "inputs" in body:
        header = body  # JSON, or sent as application/json and parsed: the body is the header
        images = _images(header, memoryview(b""), max_images, spec)
    elif header_length is not None:
        raise bad_request(f"binary tensor data must be the whole body, got a form of "
                          f"{len(body) if isinstance(body, dict) else 0} fields")
    else:
        raise bad_request(f"the body is not a v2 inference request (nor, on /v1/models/"
                          f"{spec.name}:predict, KServe v1's {{\"instances\": [...]}}); "
                          f"TorchServe passes no URL to the handler, so both routes are read "
                          f"alike")
    return images, reply(header, limits["max_id_length"], spec.classes)


def read_tensor(tensor, limits, spec):
    """One input tensor as a request (TorchServe's kservev2 envelope passes tensors)."""
    return _images({"inputs": [tensor]}, memoryview(b""), limits["max_images"], spec)


def _read_binary(body, header_length, max_images, spec):
    if isinstance(body, str):
        body = body.encode()
    if not re.fullmatch(r"[0-9]{1,10}", header_length.strip()) \
            or not 0 < int(header_length) <= len(body):
        raise bad_request(f"the {HEADER_LENGTH} header is {shown(header_length)!r} for a body of "
                          f"{len(body)} bytes: it must be the length in bytes of the JSON "
                          f"inference header at the start of the body, a whole number from 1 "
                          f"to {len(body)}")
    length = int(header_length)
    view = memoryview(body)
    raw, limit = bytes(view[:length]), json_values_limit(max_images, spec.pixel_shape)
    if json_values(raw) > limit:  # counted before parsing, as the adapter's bounded_loads
        raise bad_request(f"the inference header holds more than {limit:,} JSON values", 413)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise bad_request(f"the first {length} bytes of the body ({HEADER_LENGTH}) are not a "
                          f"valid JSON inference header ({err})") from err
    if not isinstance(header, dict):
        raise bad_request(f"the inference header must be a JSON object, got "
                          f"{type(header).__name__}")
    return header, _images(header, view[length:], max_images, spec)


def parameters_of(tensor, where, shared):
    """A tensor's "parameters"; a 400 where it is no object or names shared memory."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request(f"{where}.parameters must be an object")
    if any(key.startswith("shared_memory") for key in parameters):
        raise bad_request(f"{where} names a shared memory region; {shared}")
    return parameters


def _images(header, data, max_images, spec):
    """The one input's images: in its JSON "data", or in ``data`` (the bytes after a binary header)
    by the inputs' binary_data_size."""
    inputs = header.get("inputs")
    if not (isinstance(inputs, list) and inputs and all(isinstance(i, dict) for i in inputs)):
        raise bad_request("a v2 request needs \"inputs\": [one tensor]")
    parts, offset = [], 0
    for index, tensor in enumerate(inputs):
        parameters = parameters_of(tensor, f"inputs[{index}]",
                                   "this server reads data from the request only")
        size = parameters.get("binary_data_size")
        if size is None:
            parts.append(None)
            continue
        if type(size) is not int or size < 0:
            raise bad_request(f"inputs[{index}].parameters.binary_data_size must be a whole "
                              f"number of bytes, got {shown(size)!r}")
        if "data" in tensor:
            raise bad_request(f"inputs[{index}] has both \"data\" and binary_data_size: send one")
        if size > len(data) - offset:
            raise bad_request(f"inputs[{index}].parameters.binary_data_size is {size} bytes, but "
                              f"only {len(data) - offset} of the body's {len(data)} bytes after "
                              f"the inference header are left for it")
        parts.append(data[offset:offset + size])
        offset += size
    if offset != len(data):
        raise bad_request(f"the body holds {len(data)} bytes after the inference header, but the "
                          f"inputs' binary_data_size add up to {offset}")
    if len(inputs) != 1:
        raise bad_request(f"the request has {len(inputs)} inputs; the model takes one (the "
                          f"images)")
    return _tensor_images(inputs[0], parts[0], max_images, spec)


def _tensor_images(tensor, binary, max_images, spec):
    """One input's images, its shape checked against the limits and the data before anything is
    allocated; ``binary``: its binary data, or None for JSON "data"."""
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not (isinstance(shape, list) and shape and all(type(n) is int for n in shape)):
        raise bad_request(f"v2 inputs[0].shape must be a list of integers, got {shown(shape)}")
    count = shape[0]
    if count > max_images:
        raise too_many(count, max_images)
    if count < 1:
        raise bad_request(f"v2 inputs[0].shape[0] must be at least 1, got {count}")
    if datatype not in ("BYTES", "UINT8"):
        raise bad_request(f"v2 inputs[0].datatype must be BYTES (encoded images) or UINT8 "
                          f"(pixels), got {shown(datatype)!r}")
    data = tensor.get("data") if binary is None else binary
    if binary is None and (not isinstance(data, list) or not data):
        raise bad_request("v2 inputs[0].data must be a non-empty list")
    if datatype == "BYTES":
        if binary is not None:
            if len(shape) != 1:
                raise bad_request(f"a BYTES input has shape [N] (N images), got {shape}")
            return _elements(binary, count)
        if shape != [len(data)]:
            raise bad_request(f"v2 BYTES input: shape {shape} does not match {len(data)} items")
        return [decode_base64(item, f"v2 inputs[0].data[{i}]") for i, item in enumerate(data)]
    return list(torch.from_numpy(_pixels(shape, data, binary is not None, spec)
                                 .reshape(count, *spec.pixel_shape)).permute(0, 3, 1, 2))


def _pixels(shape, data, binary, spec):
    """UINT8 pixels of ``shape``: ``data`` binary bytes, or JSON integers (flat or nested)."""
    height, width, channels = spec.pixel_shape
    count, values = shape[0], shape[0] * spec.values_per_image

    def wrong(got):
        return bad_request(f"a UINT8 input is pixels of shape [N, {height}, {width}, {channels}]: "
                           f"{values} integers 0-255 ({values} bytes of pixels as binary data; "
                           f"flat or nested in JSON); got {got}")
    sent = f"shape {shape} with {len(data)} {'bytes' if binary else 'items'}"
    if shape != [count, *spec.pixel_shape] or len(data) not in ((values,) if binary
                                                                else (values, count)):
        raise wrong(sent)
    if binary:
        return np.frombuffer(bytearray(data), dtype=np.uint8)
    try:
        pixels = np.asarray(data)
    except ValueError as err:
        raise bad_request(f"v2 UINT8 input: data is not a regular array ({err})") from err
    if (pixels.shape not in ((values,), tuple(shape))
            or pixels.dtype.kind not in "iu" or pixels.min() < 0 or pixels.max() > 255):
        raise wrong(f"data of shape {list(pixels.shape)} and type {pixels.dtype}")
    return pixels.astype(np.uint8)


def _elements(data, count):
    """BYTES elements: each a 4-byte little-endian length and its bytes, ``count`` in all."""
    if 4 * count > len(data):
        raise bad_request(f"a BYTES input of shape [{count}] needs at least {4 * count} bytes (a "
                          f"4-byte length per image), got {len(data)}")
    images, offset = [], 0
    while offset < len(data):
        index = len(images)
        if index == count:
            raise bad_request(f"the BYTES input's {len(data)} bytes hold more than the {count} "
                              f"images its shape says ({len(data) - offset} bytes left after "
                              f"image {count - 1})")
        if len(data) - offset < 4:
            raise bad_request(f"BYTES image {index}: its 4-byte length is cut off after "
                              f"{len(data) - offset} bytes")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if size > len(data) - offset:
            raise bad_request(f"BYTES image {index} says it is {size} bytes, but only "
                              f"{len(data) - offset} are left in the input")
        if size == 0:
            raise bad_request(f"BYTES image {index} is empty")
        images.append(bytes(data[offset:offset + size]))
        offset += size
    if len(images) != count:
        raise bad_request(f"the BYTES input holds {len(images)} images, its shape says {count}")
    return images


# --- answers ---------------------------------------------------------------------------------

@dataclass
class Reply:
    """A v2 request's id, and its outputs in order: (name, binary?, top k or 0)."""
    id: str = None
    outputs: list = field(default_factory=lambda: [(name, False, 0) for name in OUTPUTS])
    min_confidence: float = None

    def predictions(self, probs, classes, topk, model_name, model_version=None,
                    min_confidence=None):
        """A dict to send as JSON, or a binary answer's bytes with the headers that say so; with a
        min_confidence (the request's, else X-Min-Confidence) "uncertain" and "margin" per image."""
        answer = {"model_name": model_name, "outputs": []}
        if model_version:  # several versions answer at once during a release (release.py)
            answer["model_version"] = model_version
        if self.id is not None:
            answer["id"] = self.id
        threshold = self.min_confidence if self.min_confidence is not None else min_confidence
        if threshold is not None:
            top, margin = confidence(probs)
            answer["parameters"] = {"uncertain": (top < threshold).tolist(),
                                    "margin": margin.tolist()}
        order, payload = ranked(probs), []  # the label and classification agree on ties
        for name, binary, top in self.outputs:
            if name == "label":
                data = [classes[i] for i in order[:, 0].tolist()]
                datatype, shape = "BYTES", [len(probs)]
            elif top:
                indices = order[:, :top].tolist()
                values = probs.gather(1, order[:, :top]).tolist()
                datatype, shape = "BYTES", [len(probs), top]
                data = [f"{p:f}:{i}:{classes[i]}" for row_p, row_i in zip(values, indices)
                        for p, i in zip(row_p, row_i)]
            else:
                datatype, shape, data = "FP32", list(probs.shape), probs.reshape(-1)
            output = {"name": name, "datatype": datatype, "shape": shape}
            if binary:
                raw = _raw(datatype, data)
                output["parameters"] = {"binary_data_size": len(raw)}
                payload.append(raw)
            else:
                output["data"] = data.tolist() if isinstance(data, torch.Tensor) else data
            answer["outputs"].append(output)
        if not payload:
            return answer, {}
        header = json.dumps(answer, separators=(",", ":")).encode()
        return header + b"".join(payload), {HEADER_LENGTH: str(len(header)),
                                            "content-type": "application/octet-stream"}

    def explanations(self, found):
        return found, {}


def reply(header, max_id_length, classes):
    """The Reply a v2 inference header asks: its "id", its "outputs" (default all), binary where the
    output's binary_data, else the request's binary_data_output, says so."""
    request_id = header.get("id")
    if request_id is not None and not (isinstance(request_id, str)
                                       and len(request_id) <= max_id_length):
        raise bad_request(f"a v2 \"id\" must be a string of at most {max_id_length} characters")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request("the request's \"parameters\" must be an object")
    binary = _flag(parameters, "binary_data_output", "parameters")
    threshold = min_confidence(parameters.get("min_confidence"), "parameters.min_confidence")
    asked = header.get("outputs")
    if asked is None:
        return Reply(request_id, [(name, binary, 0) for name in OUTPUTS], threshold)
    if not (isinstance(asked, list) and asked and len(asked) <= len(OUTPUTS)
            and all(isinstance(o, dict) for o in asked)):
        raise bad_request(f"\"outputs\" must be a list of at most {len(OUTPUTS)} objects, each "
                          f"{{\"name\": one of {list(OUTPUTS)}}}")
    outputs = []
    for index, output in enumerate(asked):
        name, where = output.get("name"), f"outputs[{index}]"
        if name not in OUTPUTS or name in [o[0] for o in outputs]:
            raise bad_request(f"{where}.name is {shown(name)!r}; the outputs are "
                              f"{list(OUTPUTS)}, each asked once")
        options = parameters_of(output, where, "outputs come back in the response only")
        own = _flag(options, "binary_data", f"{where}.parameters")
        top = options.get("classification", 0)
        if type(top) is not int or not 0 <= top <= len(classes) \
                or (top and name != "probabilities"):
            raise bad_request(f"{where}.parameters.classification must be a whole number from 1 "
                              f"to {len(classes)}, on the \"probabilities\" output, got "
                              f"{shown(top)!r}")
        outputs.append((name, binary if own is None else own, top))
    return Reply(request_id, outputs, threshold)


def _flag(parameters, name, where):
    value = parameters.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{where}.{name} must be true or false, got {shown(value)!r}")
    return value if name == "binary_data" else bool(value)


def _raw(datatype, data):
    if datatype == "FP32":
        return data.numpy().astype("<f4").tobytes()
    return b"".join(struct.pack("<I", len(item)) + item
                    for item in (text.encode() for text in data))
