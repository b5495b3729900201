"""The answer to an Open Inference Protocol (v2) request, as its inference header asks: its "id"
echoed, its outputs (`label` BYTES [N], `probabilities` FP32 [N, classes], or the top k of them as
BYTES "probability:index:label" where an output's `classification` asks) in the order asked, each
as JSON or, where the request's `binary_data_output` or an output's `binary_data` says so, as
binary data after a JSON header whose length the response's `Inference-Header-Content-Length`
header gives (cifar10_serve/oip.py reads the requests).
"""
import json
import struct
from dataclasses import dataclass, field

import torch

from cifar10_serve.errors import shown
from cifar10_serve.oip import bad, parameters_of

OUTPUTS = ("label", "probabilities")


@dataclass
class Reply:
    """What a v2 request asks of its answer: its id echoed, and which outputs, in order, each as
    JSON or binary data, each its full tensor or its top ``classification`` classes."""
    id: str = None
    outputs: list = field(default_factory=lambda: [(name, False, 0) for name in OUTPUTS])


@dataclass
class Binary:
    """An answer in the binary data extension: the body, and the length of its JSON header."""
    body: bytes
    header_length: int


def reply(header, max_id_length, classes, binary=True):
    """The Reply a v2 request (its JSON inference header) asks for: its "id", and its outputs:
    each named in "outputs" (default: all, in the model's order), binary where its
    parameters.binary_data, else the request's parameters.binary_data_output, says so (and
    ``binary``: False under TorchServe's KServe envelopes, which write the answer as JSON)."""
    found = _reply(header, max_id_length, classes)
    if not binary:
        found.outputs = [(name, False, top) for name, _, top in found.outputs]
    return found


def _reply(header, max_id_length, classes):
    request_id = header.get("id")
    if request_id is not None and not (isinstance(request_id, str)
                                       and len(request_id) <= max_id_length):
        raise bad(f"a v2 \"id\" must be a string of at most {max_id_length} characters")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad("the request's \"parameters\" must be an object")
    binary = _flag(parameters, "binary_data_output", "parameters")
    asked = header.get("outputs")
    if asked is None:
        return Reply(request_id, [(name, binary, 0) for name in OUTPUTS])
    if not (isinstance(asked, list) and asked and len(asked) <= len(OUTPUTS)
            and all(isinstance(o, dict) for o in asked)):
        raise bad(f"\"outputs\" must be a list of at most {len(OUTPUTS)} objects, each "
                  f"{{\"name\": one of {list(OUTPUTS)}}}")
    outputs = []
    for index, output in enumerate(asked):
        name, where = output.get("name"), f"outputs[{index}]"
        if name not in OUTPUTS or name in [o[0] for o in outputs]:
            raise bad(f"{where}.name is {shown(name)!r}; the outputs are {list(OUTPUTS)}, each "
                      f"asked once")
        options = parameters_of(output, where, "outputs come back in the response only")
        own = _flag(options, "binary_data", f"{where}.parameters")
        top = options.get("classification", 0)
        if type(top) is not int or not 0 <= top <= len(classes) \
                or (top and name != "probabilities"):
            raise bad(f"{where}.parameters.classification must be a whole number from 1 to "
                      f"{len(classes)}, on the \"probabilities\" output, got {shown(top)!r}")
        outputs.append((name, binary if own is None else own, top))
    return Reply(request_id, outputs)


def _flag(parameters, name, where):
    value = parameters.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(f"{where}.{name} must be true or false, got {shown(value)!r}")
    return value if name == "binary_data" else bool(value)


def response(probs, classes, model_name, asked):
    """The v2 answer to a request's images (their class probabilities, N x classes): a dict to
    send as JSON, or Binary where any output goes as binary data."""
    tensors = []
    for name, binary, top in asked.outputs:
        if name == "label":
            tensor = ("BYTES", [len(probs)], [classes[i] for i in probs.argmax(dim=1).tolist()])
        elif top:
            values, indices = probs.topk(top, dim=1)
            tensor = ("BYTES", [len(probs), top],
                      [f"{p:f}:{i}:{classes[i]}" for row_p, row_i in
                       zip(values.tolist(), indices.tolist()) for p, i in zip(row_p, row_i)])
        else:
            tensor = ("FP32", list(probs.shape), probs.reshape(-1))
        tensors.append((name, binary, *tensor))
    answer = {"model_name": model_name, "outputs": []}
    if asked.id is not None:
        answer["id"] = asked.id
    payload = []
    for name, binary, datatype, shape, data in tensors:
        output = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            raw = _raw(datatype, data)
            output["parameters"] = {"binary_data_size": len(raw)}
            payload.append(raw)
        else:
            output["data"] = data.tolist() if isinstance(data, torch.Tensor) else data
        answer["outputs"].append(output)
    if not payload:
        return answer
    header = json.dumps(answer, separators=(",", ":")).encode()
    return Binary(header + b"".join(payload), len(header))


def _raw(datatype, data):
    if datatype == "FP32":
        return data.numpy().astype("<f4").tobytes()
    return b"".join(struct.pack("<I", len(item)) + item
                    for item in (text.encode() for text in data))
