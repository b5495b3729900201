"""TorchServe handler for the CIFAR-10 classifier (packaged by `make archive`, served by `make serve`).

A request carries one or more images, as
  - the raw body:                 curl -T cat.png .../predictions/cifar10
  - multipart form fields:        curl -F a=@cat.png -F b=@dog.jpg .../predictions/cifar10
  - JSON with base64:             {"data": "<base64>"} or {"data": ["<base64>", ...]}
  - Open Inference Protocol v2:   POST /v2/models/cifar10/infer, BYTES (base64) or UINT8 pixels
and gets back, per image, its top-5 classes sorted by probability, {"cat": 0.91, "dog": 0.05, ...}:
one object for a single image, a list in request order for several. A request the handler cannot
use gets a 400 with {"code": 400, "type": "BadRequest", "message": "..."} that names what was wrong
and what is accepted; the other requests of its dynamic batch are answered as usual. On the CPU the
forward pass runs in ONNX Runtime (model-config.yaml `runtime: onnx`), on a GPU in torch.
"""
import base64
import binascii
import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from ts.handler_utils.timer import timed
from ts.service import Service
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from cifar10_net import (IMAGE_SIZE, build_net, decode_image, eval_transform, image_tensor,
                         onnx_forward, onnx_mismatch, predict_logits)

logger = logging.getLogger(__name__)
ONNX_FILE = "cifar10.onnx"  # what `make archive` adds to the .mar (export_onnx.py)
ONNX_TOLERANCE = 1e-4  # largest accepted |ONNX - eager| logit difference
# A body that starts like JSON (checked without copying the body, unlike bytes.lstrip()).
JSON_START = re.compile(rb"\s*[\[{]")

ACCEPTED = ("send an image (PNG, JPEG, GIF, BMP, WebP, TIFF, ...) as the raw body, as multipart "
            "form fields, or as JSON {\"data\": \"<base64>\"} or {\"data\": [\"<base64>\", ...]}")


def _keep_repeated_fields(retrieve):
    """Wrap TorchServe's request parser so that no image of a multipart request is lost.

    TorchServe 0.12's worker (ts/service.py) keys a request's fields by name, so
    `curl -F data=@a.jpg -F data=@b.jpg` would reach the handler as b.jpg alone. The wrapper
    renames a repeated field before that happens (data, data#2, data#3, ...), in request order.
    """
    def retrieve_data_for_inference(batch):
        for request in batch or ():
            seen = {}
            for parameter in request.get("parameters", ()):
                name = parameter["name"]
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > 1:
                    parameter["name"] = f"{name}#{seen[name]}"
        return retrieve(batch)
    retrieve_data_for_inference.keeps_repeated_fields = True
    return staticmethod(retrieve_data_for_inference)


if not getattr(Service.retrieve_data_for_inference, "keeps_repeated_fields", False):
    Service.retrieve_data_for_inference = _keep_repeated_fields(Service.retrieve_data_for_inference)


def select_device(gpu_id):
    """cuda:<gpu_id> when TorchServe assigned a GPU and CUDA is there, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def bad_request(message):
    """The client's mistake: answered with a 400 for that request alone."""
    return PredictionException(f"{message}; {ACCEPTED}", 400)


def request_images(row):
    """(images of one request row in order, how to answer: "one", "list" or ("v2", request id)).

    Images are encoded bytes, or uint8 (3, 32, 32) tensors from a v2 UINT8 input.
    """
    if not row:
        raise bad_request("the request is empty")
    images, as_list = [], False
    for name, value in row.items():
        if isinstance(value, (bytes, bytearray)) and JSON_START.match(value):
            value = _parse_json(value)  # a JSON body whose Content-Type was not application/json
        if isinstance(value, dict) and "inputs" in value and len(row) == 1:
            return _v2_images(value), ("v2", value.get("id"))
        if isinstance(value, (dict, list)):
            images += _json_images(value)
            as_list = as_list or isinstance(value.get("data"), list)
        elif isinstance(value, (bytes, bytearray)):
            if not value:
                raise bad_request(f"the body or field '{name}' is empty")
            images.append(bytes(value))
        else:  # text: base64, as KServe's v1 envelope passes {"instances": [{"data": "..."}]}
            images.append(_decode_base64(value, f"the body or field '{name}' (text)"))
    return images, "list" if as_list or len(images) > 1 else "one"


def _v2_images(request):
    """The images of an Open Inference Protocol v2 request: one BYTES input of base64 images,
    shape [N], or one UINT8 input of pixels, shape [N, 32, 32, 3]."""
    inputs = request.get("inputs")
    if not (isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict)):
        raise bad_request("a v2 request needs \"inputs\": [one tensor]")
    tensor = inputs[0]
    datatype, shape, data = tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
    if not isinstance(data, list) or not data:
        raise bad_request("v2 inputs[0].data must be a non-empty list")
    if datatype == "BYTES":
        if shape != [len(data)]:
            raise bad_request(f"v2 BYTES input: shape {shape} does not match {len(data)} items")
        return [_decode_base64(item, f"v2 inputs[0].data[{i}]") for i, item in enumerate(data)]
    if datatype == "UINT8":
        try:
            pixels = np.asarray(data).reshape(-1)
        except ValueError as err:
            raise bad_request(f"v2 UINT8 input: data is not a regular array ({err})") from err
        n = len(pixels) // (IMAGE_SIZE * IMAGE_SIZE * 3)
        if (shape != [n, IMAGE_SIZE, IMAGE_SIZE, 3] or n == 0 or pixels.dtype.kind not in "iu"
                or len(pixels) != n * IMAGE_SIZE * IMAGE_SIZE * 3
                or pixels.min() < 0 or pixels.max() > 255):
            raise bad_request(f"v2 UINT8 input must be integers 0-255 of shape "
                              f"[N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got shape {shape} with "
                              f"{len(pixels)} values")
        batch = torch.from_numpy(pixels.astype(np.uint8).reshape(n, IMAGE_SIZE, IMAGE_SIZE, 3))
        return list(batch.permute(0, 3, 1, 2))
    raise bad_request(f"v2 inputs[0].datatype must be BYTES (base64 images) or UINT8 (pixels), "
                      f"got {datatype!r}")


def _parse_json(raw):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise bad_request(f"the body is not valid JSON ({err})") from err


def _json_images(value):
    if not isinstance(value, dict) or set(value) != {"data"}:
        fields = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise bad_request(f"JSON must be an object with the one field \"data\", got {fields}")
    data = value["data"]
    items = data if isinstance(data, list) else [data]
    if not items:
        raise bad_request("\"data\" is an empty list")
    return [_decode_base64(item, f"\"data\" item {i}") for i, item in enumerate(items)]


def _decode_base64(item, where):
    if not isinstance(item, str):
        raise bad_request(f"{where} is {type(item).__name__}, not a base64 string")
    if item.startswith("data:") and "," in item:  # a data URL, as browsers produce
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode(item.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"{where} is not valid base64 ({err})") from err


class Cifar10Handler(BaseHandler):
    """Decodes images to 32x32 RGB, batches every image of every request, returns top-5 each."""

    def initialize(self, context):
        self.context = context
        properties = context.system_properties
        config = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        self.topk = int(config.get("topk", 5))
        self.tta = int(config.get("tta", 0))
        self.ig_steps = int(config.get("ig_steps", 32))
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        self.device = select_device(properties.get("gpu_id"))
        model_dir = Path(properties.get("model_dir"))
        weights = model_dir / context.manifest["model"]["serializedFile"]
        try:
            checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # say which file; torch's own advice (weights_only=False) is unsafe
            raise RuntimeError(f"cannot load the weights {weights}: not a checkpoint written by "
                               f"train.py ({type(err).__name__}: {str(err)[:200]})") from err
        self.classes = self._class_names(model_dir, checkpoint["classes"])
        self.model = build_net(checkpoint)
        self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.forward = self._runtime(config.get("runtime", "torch"), model_dir)
        self.transform = eval_transform()
        self.initialized = True
        logger.info("cifar10 model loaded on %s (runtime %s, tta=%d, top-%d, %d threads)",
                    self.device, self.runtime, self.tta, self.topk, torch.get_num_threads())

    def _runtime(self, runtime, model_dir):
        """The forward pass predictions use: the torch net, or (on the CPU) ONNX Runtime running
        the archive's cifar10.onnx, checked against the torch net before it is trusted."""
        if runtime not in ("torch", "onnx"):
            raise ValueError(f"model-config.yaml handler.runtime must be torch or onnx, "
                             f"got {runtime!r}")
        if runtime == "torch" or self.device.type != "cpu":
            return self.model
        if importlib.util.find_spec("onnxruntime") is None:  # e.g. a stock TorchServe image
            logger.warning("handler.runtime onnx: onnxruntime is not installed, running the torch "
                           "net (the same answers, slower; pip install onnxruntime)")
            return self.model
        path = model_dir / ONNX_FILE
        if not path.exists():
            raise FileNotFoundError(f"handler.runtime onnx needs {ONNX_FILE} in the archive "
                                    f"(`make archive` exports it), or set runtime: torch")
        forward = onnx_forward(path, torch.get_num_threads())
        error = onnx_mismatch(self.model, forward)
        if error > ONNX_TOLERANCE:
            raise RuntimeError(f"{ONNX_FILE} does not hold these weights: its logits differ by "
                               f"{error:.2e} (> {ONNX_TOLERANCE:.0e}); rebuild with `make archive`")
        return forward

    @property
    def runtime(self):
        """What runs the forward pass: "onnx" (ONNX Runtime) or "torch"."""
        return "torch" if self.forward is self.model else "onnx"

    @staticmethod
    def _class_names(model_dir, trained_classes):
        """index_to_name.json's labels; they must name the classes the weights were trained on."""
        path = model_dir / "index_to_name.json"
        if not path.exists():
            return list(trained_classes)
        mapping = json.loads(path.read_text())
        names = [mapping[str(i)] for i in range(len(mapping))]
        if len(names) != len(trained_classes):
            raise ValueError(f"index_to_name.json has {len(names)} classes, the weights "
                             f"{len(trained_classes)}")
        return names

    @timed
    def preprocess(self, data):
        """Request rows -> (normalised batch of all their images, per request: answer shape or error)."""
        tensors, shapes = [], []
        for row in data:
            try:
                images, reply = request_images(row)
                decoded = [self._decode(image, i if len(images) > 1 else None)
                           for i, image in enumerate(images)]
            except PredictionException as err:
                shapes.append(err)
                continue
            tensors += decoded
            shapes.append((reply, len(decoded)))
        batch = torch.stack(tensors) if tensors else torch.empty(0, 3, 32, 32, dtype=torch.uint8)
        batch = self.transform(batch.to(self.device))  # uint8 crosses to a GPU: 4x fewer bytes
        return batch.contiguous(memory_format=torch.channels_last), shapes

    @staticmethod
    def _decode(image, index):
        if isinstance(image, torch.Tensor):  # v2 UINT8 pixels: already (3, 32, 32)
            return image
        try:
            return image_tensor(decode_image(image))
        except ValueError as err:
            raise bad_request(f"image {index}: {err}" if index is not None else str(err)) from err

    @timed
    def inference(self, data, *args, **kwargs):
        batch, shapes = data
        if not len(batch):
            return torch.empty(0, len(self.classes)), shapes
        with torch.inference_mode():
            probs = predict_logits(self.forward, batch, self.tta).softmax(dim=1)
        return probs.float().cpu(), shapes

    @timed
    def postprocess(self, data):
        """Per request: its top-k dict, a list of them, or a 400 set through the context."""
        probs, shapes = data
        values, indices = probs.topk(min(self.topk, probs.shape[1]), dim=1)
        answers = [{self.classes[i]: p for i, p in zip(idx, val)}
                   for idx, val in zip(indices.tolist(), values.tolist())]
        return self._per_request(shapes, answers, lambda start, n, request_id:
                                 self._v2_response(probs[start:start + n], request_id))

    def _per_request(self, shapes, answers, v2_reply):
        """Group per-image answers by request: one, a list, a v2 response, or the request's 400."""
        out, start = [], 0
        for request, shape in enumerate(shapes):
            if isinstance(shape, PredictionException):
                self.context.set_response_status(shape.error_code, shape.message, request)
                out.append({"code": shape.error_code, "type": "BadRequest",
                            "message": shape.message})
                continue
            reply, n = shape
            if reply == "one":
                out.append(answers[start])
            elif reply == "list":
                out.append(answers[start:start + n])
            else:
                out.append(v2_reply(start, n, reply[1]))
            start += n
        return out

    def explain_handle(self, data_preprocess, raw_data):
        """POST /explanations/cifar10: per image, the predicted class and a 32x32 map of Captum
        Integrated Gradients attributions (summed over colour channels) for it. Captum is
        imported here, so predictions never pay for it."""
        from captum.attr import IntegratedGradients

        batch, shapes = data_preprocess
        answers = []
        if len(batch):
            with torch.no_grad():
                target = self.model(batch).argmax(dim=1)
            attributions = IntegratedGradients(self.model).attribute(
                batch, target=target, n_steps=self.ig_steps, internal_batch_size=256)
            answers = [{"class": self.classes[t], "attributions": a.tolist()}
                       for t, a in zip(target.tolist(), attributions.sum(dim=1))]
        return self._per_request(shapes, answers,
                                 lambda start, n, request_id: answers[start:start + n])

    def _v2_response(self, probs, request_id):
        """Open Inference Protocol v2: labels, and every class probability in class-index order."""
        response = {"model_name": self.context.model_name, "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [len(probs)],
             "data": [self.classes[i] for i in probs.argmax(dim=1).tolist()]},
            {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
             "data": probs.reshape(-1).tolist()}]}
        if request_id is not None:
            response["id"] = request_id
        return response
