"""TorchServe handler for the CIFAR-10 classifier (packaged by `make archive`, served by `make serve`).

A request carries one or more images, as
  - the raw body:                 curl -T cat.png .../predictions/cifar10
  - multipart form fields:        curl -F a=@cat.png -F b=@dog.jpg .../predictions/cifar10
  - JSON with base64:             {"data": "<base64>"} or {"data": ["<base64>", ...]}
  - Open Inference Protocol v2:   POST /v2/models/cifar10/infer, BYTES (base64) or UINT8 pixels
  - KServe v1:                    {"instances": [{"data": "<base64>"}, ...]}
and gets back, per image, its top-5 classes sorted by probability, {"cat": 0.91, "dog": 0.05, ...}:
one object for a single image, a list in request order for several (v2 and KServe v1: their own
response shapes). /explanations/cifar10 answers Integrated Gradients maps instead.

A dynamic batch mixes requests of every kind, so the handler owns `handle()`: each request is a
row record (`new_row`) that carries its own kind, images, reply shape and error from start to
end, and is answered by its own kind's code. A request the handler cannot use gets a 4xx naming
what was wrong and what is accepted; an exception of ours while serving one request is that
request's 500 (logged); the other requests of the batch are answered as usual. Every limit (images and pixels per request,
JPEG scans, decoding time, echoed ids) is checked before the work it bounds; model-config.yaml
sets them. On the CPU the forward pass is the fastest of int8, bf16, fp32 ONNX Runtime and torch
that gives the archive's golden answers on this CPU (model-config.yaml `runtime: auto`;
cifar10_runtime.py), on a GPU the torch net, in chunks of at most batchSize images.
"""
import base64
import binascii
import contextlib
import ctypes
import ctypes.util
import json
import logging
import re
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from ts.handler_utils.timer import timed
from ts.protocol import otf_message_handler
from ts.service import Service
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from cifar10_net import (IMAGE_SIZE, MAX_IMAGE_PIXELS, build_net, eval_transform, image_pixels,
                         image_tensor, open_image, predict_logits, to_rgb32)
from cifar10_runtime import RUNTIMES, choose

logger = logging.getLogger(__name__)
# A body that starts like JSON (checked without copying the body, unlike bytes.lstrip()).
JSON_START = re.compile(rb"\s*[\[{]")
PIXELS_PER_IMAGE = IMAGE_SIZE * IMAGE_SIZE * 3

ACCEPTED = ("send an image (PNG, JPEG, GIF, BMP, WebP, TIFF) as the raw body, as multipart "
            "form fields, or as JSON {\"data\": \"<base64>\"} or {\"data\": [\"<base64>\", ...]}")

# model-config.yaml `handler:` keys for the limits, and their defaults.
LIMITS = {
    "max_images": 64,              # images per /predictions (or v2, KServe) request
    "max_explain_images": 4,       # images per /explanations request (~0.15 s each on a core)
    "max_image_pixels": MAX_IMAGE_PIXELS,  # pixels an image's header may claim
    "max_request_pixels": 4096 * 4096,  # pixels per request, as the headers claim
    "max_id_length": 256,          # characters of a v2 request "id", echoed in the answer
    "max_decode_ms": 1000,         # CPU time to open and decode one request's images
}


def _keep_repeated_fields(retrieve):
    """Wrap TorchServe's request parser so that no image of a multipart request is lost.

    TorchServe 0.12's worker (ts/service.py) keys a request's fields by name, so
    `curl -F data=@a.jpg -F data=@b.jpg` would reach the handler as b.jpg alone. When a request has
    several fields, the wrapper gives every one its position (data#1, data#2, ...) before that
    happens: each name then ends in a number no other field has, whatever names the client chose.
    """
    def retrieve_data_for_inference(batch):
        for request in batch or ():
            parameters = request.get("parameters") or ()
            if len(parameters) > 1:
                for position, parameter in enumerate(parameters, 1):
                    parameter["name"] = f"{_text(parameter['name'])}#{position}"
        return retrieve(batch)
    retrieve_data_for_inference.keeps_repeated_fields = True
    return staticmethod(retrieve_data_for_inference)


if not getattr(Service.retrieve_data_for_inference, "keeps_repeated_fields", False):
    Service.retrieve_data_for_inference = _keep_repeated_fields(Service.retrieve_data_for_inference)


def json_values_limit(max_images):
    """The most values (as `json_values` counts them) a JSON body may hold: what the largest
    request accepted needs, ``max_images`` images as v2 UINT8 pixels nested [N, 32, 32, 3] (per
    image 3,072 numbers, 1,024 pixel lists, 32 rows and its own list), plus room for keys."""
    return max_images * (PIXELS_PER_IMAGE + IMAGE_SIZE * IMAGE_SIZE + IMAGE_SIZE + 1) + 1024


def json_values(text):
    """The commas and opening brackets of a JSON text (str or bytes), counted without parsing
    it: at least the number of values it holds bar one (commas in strings only add)."""
    marks = (b",", b"[", b"{") if isinstance(text, (bytes, bytearray)) else (",", "[", "{")
    return sum(text.count(mark) for mark in marks)


# What TorchServe's worker may parse of an application/json body before the handler sees it.
_json_values_allowed = [json_values_limit(LIMITS["max_images"])]


def _bounded_loads(text, **kwargs):
    """json.loads for TorchServe's request reader (ts/protocol/otf_message_handler.py), which
    parses every application/json body into Python objects before the handler counts images: an
    8 MiB body of 2.8 M empty objects took ~170 MB and 0.5 s of a worker, a batch of 16 of them
    3.6 GB. Over the limit it refuses, and TorchServe passes the raw bytes on (logging a warning):
    the handler then answers that request alone with its 413 (`_parse_json`)."""
    if json_values(text) > _json_values_allowed[0]:
        raise ValueError(f"over {_json_values_allowed[0]:,} JSON values: left to the handler")
    return json.loads(text, **kwargs)


otf_message_handler.json = SimpleNamespace(loads=_bounded_loads, dumps=json.dumps)


def _text(name):
    return name.decode("utf-8", "replace") if isinstance(name, (bytes, bytearray)) else str(name)


def _shown(value, limit=40):
    """Something the client sent, as echoed in a message: bounded (``_safe`` escapes it)."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _safe(message):
    """A message as TorchServe sends it, in the HTTP reason phrase too: printable ASCII only.
    A lone surrogate kills the worker when TorchServe encodes the phrase, and CR or LF makes the
    frontend drop the worker; everything else outside printable ASCII is escaped as well."""
    escaped = message.encode("ascii", "backslashreplace").decode("ascii")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", escaped)


def select_device(gpu_id):
    """cuda:<gpu_id> when TorchServe assigned a GPU and CUDA is there, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def bad_request(message, code=400):
    """The client's mistake: answered with a 4xx for that request alone."""
    return PredictionException(f"{message}; {ACCEPTED}", code)


def _timer_library():
    """The C library that has timer_create (glibc >= 2.34 and musl: libc itself; older glibc:
    librt), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    for name in (None, ctypes.util.find_library("rt")):
        library = ctypes.CDLL(name, use_errno=True)
        if hasattr(library, "timer_create"):
            return library
    return None


_LIBRT = _timer_library()
SIGEV_THREAD_ID, CLOCK_THREAD_CPUTIME_ID = 4, 3  # Linux <bits/sigevent-consts.h>, <time.h>


def arm_cpu_timer(first, every):
    """Send SIGPROF once the calling thread has used ``first`` seconds of CPU time, then every
    ``every`` seconds; return the function that disarms it.

    On Linux the timer counts this thread's CPU alone and signals this thread alone
    (timer_create on CLOCK_THREAD_CPUTIME_ID with SIGEV_THREAD_ID). A process-wide ITIMER_PROF,
    the fallback elsewhere, counts torch's and ONNX Runtime's spinning pool threads too, and the
    kernel sends its SIGPROF to whichever thread used the last tick: CPython before 3.13 then only
    notes the signal, and the main thread does not run the handler until something else wakes its
    eval loop (CI once saw a 1-s burn run through a 10-ms deadline that way).
    """
    if _LIBRT is None:
        signal.setitimer(signal.ITIMER_PROF, first, every)
        return lambda: signal.setitimer(signal.ITIMER_PROF, 0)
    event = (ctypes.c_int * 16)()  # struct sigevent, 64 bytes: sigval (8), signo, notify, tid
    event[2], event[3], event[4] = signal.SIGPROF, SIGEV_THREAD_ID, threading.get_native_id()
    timer = ctypes.c_void_p()
    if _LIBRT.timer_create(CLOCK_THREAD_CPUTIME_ID, event, ctypes.byref(timer)):
        raise OSError(ctypes.get_errno(), "timer_create failed")
    nanoseconds = [divmod(round(seconds * 1e9), 10**9) for seconds in (every, first)]
    spec = (ctypes.c_long * 4)(*nanoseconds[0], *nanoseconds[1])  # struct itimerspec
    if _LIBRT.timer_settime(timer, 0, spec, None):
        _LIBRT.timer_delete(timer)
        raise OSError(ctypes.get_errno(), "timer_settime failed")
    return lambda: _LIBRT.timer_delete(timer)


@contextlib.contextmanager
def deadline(milliseconds):
    """Raise TimeoutError from the block once its thread has used ``milliseconds`` of CPU time.

    Pillow parses file structure (JPEG markers, PNG chunks, TIFF strips, GIF sub-blocks, BMP runs)
    in Python, at a cost that grows with the body's bytes rather than its pixels: 8 MiB of
    one-row TIFF strips took 21 s. A CPU-time timer (so a busy machine does not shorten the
    allowance; see arm_cpu_timer) interrupts that Python code between bytecodes with an exception
    no `except Exception` inside a plugin can swallow (a BaseException, local: TorchServe wants
    exactly one class in a handler module). It works in the main thread only, where TorchServe's
    worker runs the handler; elsewhere the block runs unbounded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    class Expired(BaseException):
        pass
    armed = [True]
    # Frames where raising would escape the handling below: this generator's own except/finally,
    # contextlib's __exit__ that throws the exception into it, and arm_cpu_timer (before it
    # returns, nothing could disarm the timer it armed).
    own = {sys._getframe().f_code, contextlib._GeneratorContextManager.__exit__.__code__,
           arm_cpu_timer.__code__}

    def expire(signum, frame):
        # Raised inside a weakref callback or a __del__ (the garbage collector runs them
        # anywhere), the exception is swallowed: so the timer fires again every 10 ms until
        # the block has ended.
        if armed[0] and (frame is None or frame.f_code not in own):
            raise Expired

    def unraisable(report):
        # An Expired swallowed that way is expected: no "Exception ignored" traceback for it.
        # The hook before (a Python one under pytest) gets everything else.
        if not isinstance(report.exc_value, Expired):
            previous_hook(report)
    own.add(unraisable.__code__)
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = signal.signal(signal.SIGPROF, expire)
    disarm = None
    try:
        disarm = arm_cpu_timer(milliseconds / 1000, 0.01)
        yield
    except Expired:
        raise TimeoutError(f"ran past {milliseconds} ms") from None
    finally:
        armed[0] = False
        if disarm:
            disarm()
        signal.signal(signal.SIGPROF, previous)
        sys.unraisablehook = previous_hook


def new_row(kind):
    """One request of a batch, carried from its body to its answer (a namespace, not a class:
    TorchServe wants exactly one class in a handler module).

    kind: "predict", "explain" or "describe"; reply: "one", "list", "v2", "kserve" or "tensor";
    images: encoded bytes at first, uint8 (3, 32, 32) tensors once decoded; error: (status,
    message) once anything failed for this request alone; answer: what it gets back.
    """
    return SimpleNamespace(kind=kind, reply="one", images=[], request_id=None, error=None,
                           answer=None)


class Cifar10Handler(BaseHandler):
    """Decodes images to 32x32 RGB, batches every image of every request, answers each request."""

    def initialize(self, context):
        self.context = context
        properties = context.system_properties
        config = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        unknown = set(config) - {"topk", "tta", "ig_steps", "threads", "runtime", "profile",
                                 *LIMITS}
        if unknown:
            raise ValueError(f"model-config.yaml handler: unknown settings {sorted(unknown)}")
        self.topk = int(config.get("topk", 5))
        self.tta = int(config.get("tta", 0))
        self.ig_steps = int(config.get("ig_steps", 32))
        self.limits = {key: int(config.get(key, default)) for key, default in LIMITS.items()}
        _json_values_allowed[0] = json_values_limit(self.limits["max_images"])
        self.chunk = max(1, int(properties.get("batch_size") or 16))
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
        self.transform = eval_transform(**checkpoint.get("normalization", {}))
        runtime = config.get("runtime", "auto")
        if runtime not in RUNTIMES:
            raise ValueError(f"model-config.yaml handler.runtime must be one of {RUNTIMES}, "
                             f"got {runtime!r}")
        self.forward, self.runtime, self.trials = self.model, "torch", []
        if self.device.type == "cpu":  # on a GPU the torch net runs
            self.forward, self.runtime, self.trials = choose(
                runtime, self.model, model_dir, self.transform, torch.get_num_threads())
        self.initialized = True
        logger.info("cifar10 model loaded on %s (runtime %s, tta=%d, top-%d, %d threads, "
                    "limits %s)", self.device, self.runtime, self.tta, self.topk,
                    torch.get_num_threads(), self.limits)

    @staticmethod
    def _class_names(model_dir, trained_classes):
        """index_to_name.json's labels; they must be the classes the weights were trained on,
        by name and in order (a file from another data set would relabel every answer)."""
        path = model_dir / "index_to_name.json"
        if not path.exists():
            return list(trained_classes)
        mapping = json.loads(path.read_text())
        names = [mapping.get(str(i)) for i in range(len(mapping))]
        if names != list(trained_classes):
            raise ValueError(f"index_to_name.json names the classes {names}, but the weights "
                             f"were trained on {list(trained_classes)}")
        return names

    # --- the batch ---------------------------------------------------------------------------

    def handle(self, data, context):
        """Answer every request of the batch by its own kind; never fail one for another."""
        start = time.time()
        self.context = context
        rows = self.preprocess(data)
        self.inference(rows)
        output = self.postprocess(rows)
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return output

    @property
    def _enveloped(self):
        """Whether TorchServe's KServe envelopes (`service_envelope`) turned one request's
        instances into the batch's rows, all of request 0."""
        return len(getattr(self.context, "request_processor", None) or ()) != self._rows

    def _request_index(self, row_index):
        """The request a row belongs to."""
        return 0 if self._enveloped else row_index

    def _header(self, row_index, name):
        processors = getattr(self.context, "request_processor", None) or ()
        index = self._request_index(row_index)
        if index >= len(processors):
            return None
        value = processors[index].get_request_property(name)
        return value if isinstance(value, str) else None  # a multipart field's own headers: a dict

    @timed
    def preprocess(self, data):
        """Request rows -> row records with decoded images, or with their own error."""
        self._rows = len(data)
        return [self._prepare(index, request) for index, request in enumerate(data)]

    def _prepare(self, index, request):
        explain = self._header(index, "explain") == "True"  # set by /explanations (and :explain)
        row = new_row("explain" if explain else "predict")
        try:
            if not request and self._header(index, "describe") == "True":
                row.kind = "describe"  # the management API's GET /models/cifar10?customized=true
                return row
            if self._enveloped and self._rows > self._limit(row):
                raise _too_many(self._rows, self._limit(row))
            row.images, row.reply, row.request_id = request_images(
                request, self._limit(row), self.limits["max_id_length"])
            self._decode(row)
        except PredictionException as err:
            row.error = (err.error_code, err.message)
        except Exception:  # noqa: BLE001  (ours, not the client's: this request's 500)
            logger.exception("preparing request %d of the batch failed", index)
            row.error = (500, "the server failed while reading this request (logged)")
        row.images = [] if row.error else row.images
        return row

    def _limit(self, row):
        return self.limits["max_explain_images" if row.kind == "explain" else "max_images"]

    def _decode(self, row):
        """Decode the row's images in place, within the per-image and per-request pixel limits
        and the request's decoding deadline."""
        milliseconds = self.limits["max_decode_ms"]
        try:
            with deadline(milliseconds):
                self._decode_within_budget(row)
        except TimeoutError:
            raise bad_request(f"decoding the request's images took more than {milliseconds} ms "
                              f"of CPU time; "
                              f"send images re-saved by a common encoder, or fewer per request",
                              413) from None

    def _decode_within_budget(self, row):
        """Open every image's header first and refuse the request if their pixels add up past
        the request's cap, so an over-budget request costs no decoding at all; then decode."""
        budget, opened = self.limits["max_request_pixels"], []
        wheres = [f"image {i}: " if len(row.images) > 1 else "" for i in range(len(row.images))]
        for where, image in zip(wheres, row.images):
            if isinstance(image, torch.Tensor):  # v2 UINT8 pixels: already (3, 32, 32)
                opened.append(image)
                continue
            opened.append(self._checked(open_image, where, image, self.limits["max_image_pixels"]))
            budget -= image_pixels(opened[-1])
            if budget < 0:
                raise bad_request(
                    f"{where}the request's images decode to more than "
                    f"{self.limits['max_request_pixels']:,} pixels; send fewer or smaller "
                    f"images per request", 413)
        row.images = [image if isinstance(image, torch.Tensor)
                      else image_tensor(self._checked(to_rgb32, where, image))
                      for where, image in zip(wheres, opened)]

    @staticmethod
    def _checked(step, where, *args):
        """One decoding step of an image; its ValueError becomes the client's 400, prefixed
        with ``where`` (which image)."""
        try:
            return step(*args)
        except ValueError as err:
            raise bad_request(f"{where}{err}") from err

    @timed
    def inference(self, rows, *args, **kwargs):
        """Predictions for every predict row, Integrated Gradients for every explain row."""
        for kind, run in (("predict", self._predict), ("explain", self._explain)):
            group = [row for row in rows if row.kind == kind and row.error is None]
            if group:
                self._run_isolated(group, run)
        for row in rows:
            if row.kind == "describe":
                row.answer = self.describe_handle()

    def _run_isolated(self, group, run):
        """Run the group together; if that fails, each row alone, so a failure stays its own."""
        try:
            run(group)
            return
        except Exception:  # noqa: BLE001
            logger.exception("a %s batch of %d requests failed; retrying them one by one",
                             group[0].kind, len(group))
        for row in group:
            try:
                run([row])
            except Exception:  # noqa: BLE001
                logger.exception("a %s request failed", row.kind)
                row.error = (500, f"the server failed while answering this {row.kind} "
                                  f"request (logged)")

    def to_batch(self, images):
        """Decoded uint8 images -> the normalised channels-last batch the forward takes."""
        batch = self.transform(torch.stack(images).to(self.device))  # uint8 crosses: 4x fewer bytes
        return batch.contiguous(memory_format=torch.channels_last)

    def _predict(self, rows):
        images = [image for row in rows for image in row.images]
        parts = []
        with torch.inference_mode():
            for start in range(0, len(images), self.chunk):
                logits = predict_logits(self.forward, self.to_batch(images[start:start + self.chunk]),
                                        self.tta)
                parts.append(logits.float().softmax(dim=1).cpu())
        probs = torch.cat(parts)
        for row, row_probs in zip(rows, torch.split(probs, [len(r.images) for r in rows])):
            row.answer = self._prediction(row, row_probs)

    def _prediction(self, row, probs):
        if row.reply == "v2":
            return self._v2_response(probs, row.request_id)
        if row.reply == "tensor":  # under the kservev2 envelope, which names and shapes it
            return probs.reshape(-1).tolist()
        values, indices = probs.topk(min(self.topk, probs.shape[1]), dim=1)
        answers = [{self.classes[i]: p for i, p in zip(idx, val)}
                   for idx, val in zip(indices.tolist(), values.tolist())]
        return _shaped(row.reply, answers, "predictions")

    def _explain(self, rows):
        """Per image, the predicted class and a 32x32 map of Captum Integrated Gradients
        attributions (summed over colour channels) for it. Captum is imported here, so
        predictions never pay for it."""
        from captum.attr import IntegratedGradients

        for row in rows:
            answers = []
            for start in range(0, len(row.images), self.chunk):
                batch = self.to_batch(row.images[start:start + self.chunk])
                with torch.no_grad():
                    target = self.model(batch).argmax(dim=1)
                attributions = IntegratedGradients(self.model).attribute(
                    batch, target=target, n_steps=self.ig_steps, internal_batch_size=256)
                answers += [{"class": self.classes[t], "attributions": a.tolist()}
                            for t, a in zip(target.tolist(), attributions.sum(dim=1))]
            row.answer = _shaped("list" if row.reply in ("v2", "tensor") else row.reply, answers,
                                 "explanations")

    def describe_handle(self):
        """The management API's customized describe: what this model answers and its limits."""
        return {"classes": self.classes, "runtime": self.runtime, "tta": self.tta,
                "topk": self.topk, "limits": self.limits}

    @timed
    def postprocess(self, rows):
        """Per request: its answer, or its error set through the context."""
        errors = {}
        for index, row in enumerate(rows):
            if row.error is not None:
                code, message = row.error[0], _safe(row.error[1])
                if self._request_index(index) != index:  # instances of one enveloped request
                    message = f"instance {index}: {message}"
                errors.setdefault(self._request_index(index), (code, message))
                row.answer = {"code": code, "type": "BadRequest" if code < 500 else
                              "InternalServerError", "message": message}
        for index, (code, message) in errors.items():
            self.context.set_response_status(code, message, index)
        return [row.answer for row in rows]

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


def _shaped(reply, answers, kserve_key):
    if reply == "one":
        return answers[0]
    if reply == "kserve":
        return {kserve_key: answers}
    return answers


# --- reading a request ---------------------------------------------------------------------------

def request_images(row, max_images, max_id_length=LIMITS["max_id_length"]):
    """(encoded images or uint8 tensors of one request row in order, reply shape, v2 request id).

    Counts the images against ``max_images`` before decoding anything.
    """
    if isinstance(row, str):  # a bare base64 instance, from TorchServe's KServe v1 envelope
        row = {"data": row}
    if not isinstance(row, dict):
        raise bad_request(f"an instance must be {{\"data\": \"<base64>\"}}, got "
                          f"{type(row).__name__}")
    if not row:
        raise bad_request("the request is empty")
    if _is_v2_tensor(row):  # one tensor, from TorchServe's kservev2 envelope
        return _v2_images({"inputs": [_envelope_tensor(row)]}, max_images), "tensor", None
    if len(row) > max_images:
        raise _too_many(len(row), max_images)
    images, as_list = [], False
    for name, value in row.items():
        if isinstance(value, (bytes, bytearray)) and JSON_START.match(value):
            value = _parse_json(value, max_images)  # not parsed by TorchServe: see _bounded_loads
        if isinstance(value, dict) and len(row) == 1 and "inputs" in value:
            return _v2_images(value, max_images), "v2", _v2_id(value, max_id_length)
        if isinstance(value, dict) and len(row) == 1 and "instances" in value:
            return _kserve_images(value, max_images), "kserve", None
        if isinstance(value, (dict, list)):
            images += _json_images(value, len(images), max_images)
            as_list = as_list or isinstance(value.get("data"), list)
        elif isinstance(value, (bytes, bytearray)):
            if not value:
                raise bad_request(f"the body or field '{_shown(name)}' is empty")
            images.append(bytes(value))
        else:  # text: base64, as a TorchServe KServe v1 envelope passes {"data": "..."}
            images.append(_decode_base64(value, f"the body or field '{_shown(name)}' (text)"))
    return images, "list" if as_list or len(images) > 1 else "one", None


def _too_many(count, max_images):
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


def _v2_id(request, limit):
    request_id = request.get("id")
    if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= limit):
        raise bad_request(f"a v2 \"id\" must be a string of at most {limit} characters")
    return request_id


def _v2_images(request, max_images):
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
        raise bad_request(f"v2 inputs[0].shape must be a list of integers, got {_shown(shape)}")
    if not 1 <= shape[0] <= max_images:
        raise _too_many(shape[0], max_images) if shape[0] > 0 else \
            bad_request(f"v2 inputs[0].shape[0] must be at least 1, got {shape[0]}")
    if datatype == "BYTES":
        if shape != [len(data)]:
            raise bad_request(f"v2 BYTES input: shape {shape} does not match {len(data)} items")
        return [_decode_base64(item, f"v2 inputs[0].data[{i}]") for i, item in enumerate(data)]
    if datatype == "UINT8":
        return _v2_pixels(shape, data)
    raise bad_request(f"v2 inputs[0].datatype must be BYTES (base64 images) or UINT8 (pixels), "
                      f"got {_shown(datatype)!r}")


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
        raise _too_many(len(instances), max_images)
    images = []
    for i, instance in enumerate(instances):
        value = instance.get("data", instance.get("b64")) if isinstance(instance, dict) \
            else instance
        images.append(_decode_base64(value, f"instance {i}"))
    return images


def _parse_json(raw, max_images):
    """A JSON body TorchServe did not parse: its Content-Type was not application/json, or it
    held more values than the largest request accepted (`_bounded_loads`)."""
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
        fields = [_shown(k) for k in sorted(value)[:5]] if isinstance(value, dict) \
            else type(value).__name__
        raise bad_request(f"JSON must be an object with the one field \"data\", got {fields}")
    data = value["data"]
    items = data if isinstance(data, list) else [data]
    if not items:
        raise bad_request("\"data\" is an empty list")
    if already + len(items) > max_images:
        raise _too_many(already + len(items), max_images)
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
