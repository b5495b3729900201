"""TorchServe handler for the CIFAR-10 classifier (packaged by `make archive`, served by `make serve`).

The class TorchServe loads; the work is in the cifar10_serve package beside it in the .mar:
    requests.py   request bodies -> rows (raw, multipart, JSON base64, v2, KServe v1)
    forms.py      multipart bodies the reverse proxy passes on unparsed -> form fields
    oip.py        v2's binary tensor data extension (tritonclient's default) in requests
    oip_reply.py  v2 answers: the outputs asked, as JSON or binary data
    images.py     where a row's bytes become a tensor (header checks, decoding, the transform)
    runtimes.py   which forward runs: every candidate checked and timed on the serving CPU
    budget.py     what a batch may cost here (timed at start), and which requests fit in it
    predict.py    the forward passes (and explanations) of a batch
    answers.py    rows -> answers in each request's shape, errors per request
    settings.py   model-config.yaml `handler:`, checked at start; compat.py TorchServe's patches

A dynamic batch mixes requests of every kind (/predictions, /explanations, v2, KServe envelopes),
so the handler owns `handle()`: each request is a Row that carries its own kind, images, reply
shape and error to its answer. A request the handler cannot use gets a 4xx naming what was wrong
and what is accepted; one that does not fit the batch's budget a prompt 503 with Retry-After; an
exception of ours while serving one request is that request's 500; the other requests of the
batch are answered as usual.
"""
import contextlib
import logging
import time
from pathlib import Path

import torch
from ts.handler_utils.timer import timed
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from cifar10_serve import answers, budget, compat, oip, oip_reply, predict, settings
from cifar10_serve import spec as model_spec
from cifar10_serve.images import decode_request, eval_transform
from cifar10_serve.net import build_net, class_names, load_checkpoint
from cifar10_serve.requests import Row, too_many
from cifar10_serve.runtimes import choose, select_device

logger = logging.getLogger(__name__)


class Cifar10Handler(BaseHandler):
    """Decodes images to 32x32 RGB, batches every image of every request, answers each request."""

    def initialize(self, context):
        self.context, properties = context, context.system_properties
        self.settings = settings.read((getattr(context, "model_yaml_config", None) or {})
                                      .get("handler"))
        self.limits = self.settings.limits
        compat.set_json_values_limit(self.limits["max_images"])
        self.chunk = max(1, int(properties.get("batch_size") or 16))
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.device = select_device(properties.get("gpu_id"))
        model_dir = Path(properties.get("model_dir"))
        checkpoint = load_checkpoint(model_dir / context.manifest["model"]["serializedFile"])
        self.classes = class_names(model_dir, checkpoint["classes"])
        self.model = build_net(checkpoint).to(self.device, memory_format=torch.channels_last)
        self.model.eval()
        self.transform = eval_transform(**checkpoint.get("normalization", {}))
        self.temperature = model_spec.from_checkpoint(checkpoint).temperature
        self.forward, self.runtime, self.trials = self.model, "torch", []
        if self.device.type == "cpu":  # on a GPU the torch net runs
            self.forward, self.runtime, self.trials = choose(
                self.settings.runtime, self.model, model_dir, self.transform,
                torch.get_num_threads())
        config = getattr(context, "model_yaml_config", None) or {}
        timed_ms = next((t.ms_per_image for t in self.trials if t.forward is self.forward), None)
        self.budget = budget.for_worker(
            self.settings, config.get("responseTimeout", budget.TORCHSERVE_RESPONSE_TIMEOUT),
            self.forward, self.model, self.to_batch([torch.zeros(3, 32, 32, dtype=torch.uint8)]
                                                    * self.chunk), timed_ms, self.runtime)
        self.enveloped, self.initialized = False, True
        logger.info("cifar10 model loaded on %s (runtime %s, tta=%d, top-%d, %d threads, "
                    "limits %s)", self.device, self.runtime, self.settings.tta,
                    self.settings.topk, torch.get_num_threads(), self.limits)

    def handle(self, data, context):
        """Answer every request of the batch by its own kind; never fail one for another."""
        start, self.context = time.time(), context
        built = compat.taken_rows()
        # Under a KServe envelope the rows are one request's instances, not TorchServe's rows.
        self.enveloped = built is not None and data is not built
        output = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return output

    def _request_of(self, row_index):
        return 0 if self.enveloped else row_index

    def _headers(self, row_index):
        processors = getattr(self.context, "request_processor", None) or ()
        index = self._request_of(row_index)
        return processors[index].get_request_properties() if index < len(processors) else {}

    @timed
    def preprocess(self, data):
        """Request rows -> Rows, each read and counted against the limits; those the batch's
        budget admits decoded, the others refused (503, or 413 for one that never fits); each
        failed row with its own error."""
        started = self.budget.clock()
        rows = [self._read(index, request, len(data)) for index, request in enumerate(data)]
        self.budget.admit(rows, self._decode, started, together=self.enveloped)
        return rows

    def _read(self, index, request, rows):
        headers = self._headers(index)
        row = Row(kind="explain" if headers.get("explain") == "True" else "predict")
        if not request and headers.get("describe") == "True":
            row.kind = "describe"  # the management API's GET /models/cifar10?customized=true
            return row
        with self._own_error(row, f"reading request {index} of the batch"):
            limit = self.limits["max_explain_images" if row.kind == "explain" else "max_images"]
            if self.enveloped and rows > limit:  # one request's instances
                raise too_many(rows, limit)
            limits = {**self.limits, "max_images": limit}
            row.images, row.reply, v2 = oip.read_body(request, headers, limits, row,
                                                         self.enveloped)
            if v2 is not None:
                row.v2 = oip_reply.reply(v2, self.limits["max_id_length"], self.classes,
                                   binary=not self.enveloped)
        return row

    def _decode(self, row):
        with self._own_error(row, f"decoding a {row.kind} request of the batch"):
            row.images = decode_request(row.images, self.limits)

    @contextlib.contextmanager
    def _own_error(self, row, doing):
        """The client's 4xx, or our 500 (logged), as the row's own error."""
        try:
            yield
        except PredictionException as err:
            row.error, row.images = (err.error_code, err.message), []
        except Exception:  # noqa: BLE001  (ours, not the client's: this request's 500)
            logger.exception("%s failed", doing)
            row.error, row.images = (500, "the server failed while reading this request "
                                          "(logged)"), []

    @timed
    def inference(self, rows, *args, **kwargs):
        """Predictions for every predict row, Integrated Gradients for every explain row."""
        predicting = [row for row in rows if row.kind == "predict" and row.error is None]
        if predicting:
            predict.run_isolated(predicting, self._predict)
        explaining = [row for row in rows if row.kind == "explain" and row.error is None]
        if explaining:
            predict.run_isolated(explaining, self._explain)
        for row in rows:
            if row.kind == "describe":
                row.answer = self.describe_handle()
        return rows

    def to_batch(self, images):
        """Decoded uint8 images -> the normalised batch the forward takes (tests, bench)."""
        return predict.to_batch(images, self.transform, self.device)

    def _probabilities(self, rows):
        """The served forward's class probabilities per row, with the configured (gated) TTA;
        the images counted on the metrics port (ts_handler_tta_images, ..._second_looks)."""
        probs, looked = predict.probabilities(rows, self.forward, self.transform, self.device,
                                              self.chunk, self.settings.tta,
                                              self.settings.tta_margin, self.temperature)
        self.budget.saw(sum(len(p) for p in probs), looked)
        metrics = getattr(self.context, "metrics", None)
        if metrics is not None and self.settings.tta:
            metrics.add_counter("ts_handler_tta_images", sum(len(p) for p in probs), None)
            metrics.add_counter("ts_handler_tta_second_looks", looked, None)
        return probs

    def _predict(self, rows):
        for row, row_probs in zip(rows, self._probabilities(rows)):
            row.answer = answers.prediction(row, row_probs, self.classes, self.settings.topk,
                                            self.context.model_name)

    def _explain(self, rows):
        for row, row_probs in zip(rows, self._probabilities(rows)):
            found = predict.explanations(row, self.model, row_probs.argmax(dim=1),
                                         self.transform, self.device, self.chunk,
                                         self.settings.ig_steps, self.classes)
            row.answer = answers.shaped(row.reply, found, "explanations")

    def describe_handle(self):
        """The management API's customized describe: what this model answers and its limits."""
        return {"classes": self.classes, "runtime": self.runtime, "tta": self.settings.tta,
                "tta_margin": self.settings.tta_margin, "topk": self.settings.topk,
                "limits": self.limits, "budget": self.budget.figures()}

    @timed
    def postprocess(self, rows):
        """Per request: its answer, or its error set through the context (with Retry-After
        where the budget refused it)."""
        answers.set_errors(rows, self.context, self._request_of)
        answers.set_binary(rows, self.context)
        for index, row in enumerate(rows):
            if row.error is not None and row.error[0] == 503:
                self.context.set_response_header(self._request_of(index), "Retry-After",
                                                 str(self.budget.retry_after))
        return [row.answer for row in rows]
