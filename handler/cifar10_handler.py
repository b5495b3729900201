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
from cifar10_serve.images import decode_request, eval_transform
from cifar10_serve.net import build_net, class_names, load_checkpoint
from cifar10_serve.requests import Row, too_many
from cifar10_serve.runtimes import calibrate, select_device
from cifar10_serve.spec import from_checkpoint

logger = logging.getLogger(__name__)


class Cifar10Handler(BaseHandler):
    """Decodes images to 32x32 RGB, batches every image of every request, answers each request."""

    def initialize(self, context):
        self.context, properties = context, context.system_properties
        self.settings = settings.read((getattr(context, "model_yaml_config", None) or {})
                                      .get("handler"))
        self.limits = self.settings.limits
        compat.set_json_values_limit(self.limits["max_images"])
        self.chunk = self.settings.forward_batch  # images per forward call, not batchSize
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.device = select_device(properties.get("gpu_id"))
        model_dir = Path(properties.get("model_dir"))
        checkpoint = load_checkpoint(model_dir / context.manifest["model"]["serializedFile"])
        self.classes = class_names(model_dir, checkpoint["classes"])
        self.model = build_net(checkpoint).to(self.device, memory_format=torch.channels_last)
        self.model.eval()
        self.transform = eval_transform(**checkpoint.get("normalization", {}))
        self.spec = from_checkpoint(checkpoint)
        # One start-up calibration (on a GPU the torch net runs) feeds the runtime and the budget.
        self.calibration = calibrate(self.settings.runtime, self.model, model_dir, self.transform,
                                     self.spec, self.device, self.chunk, self.settings.ig_steps,
                                     torch.get_num_threads())
        self.forward, self.runtime = self.calibration.forward, self.calibration.runtime
        config = getattr(context, "model_yaml_config", None) or {}
        self.budget = budget.for_worker(
            self.settings, config.get("responseTimeout", budget.TORCHSERVE_RESPONSE_TIMEOUT),
            self.calibration)
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
        self.admission = self.budget.admission(rows, started, together=self.enveloped)
        for row in self.admission.order:
            if self.admission.fits(row):  # else it has its 503 or 413
                self._decode(row)
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
        forwards = predict.Forwards(self.forward, self.model, self.transform, self.device,
                                    self.chunk, self.settings.tta, self.settings.tta_margin,
                                    self.settings.ig_steps, self.classes)
        found, looked = predict.run(rows, forwards, getattr(self, "admission", None))
        self._count(sum(len(f.probs) for f in found if f is not None), looked)
        for row, result in zip(rows, found):
            if result is None:
                continue
            try:
                row.answer = (answers.shaped(row.reply, result.explained, "explanations")
                              if row.kind == "explain" else
                              answers.prediction(row, result.probs, self.classes,
                                                 self.settings.topk, self.context.model_name))
            except Exception:  # noqa: BLE001  (ours: this request's 500)
                logger.exception("answering a %s request failed", row.kind)
                row.error = (500, f"the server failed while answering this {row.kind} "
                                  f"request (logged)")
        for row in rows:
            if row.kind == "describe":
                row.answer = self.describe_handle()
        return rows

    def to_batch(self, images):
        """Decoded uint8 images -> the normalised batch the forward takes (tests, bench)."""
        return predict.to_batch(images, self.transform, self.device)

    def _count(self, images, looked):
        """Images forwarded and how many took the TTA views: for the budget's estimate, and on
        the metrics port (ts_handler_tta_images, ..._second_looks)."""
        self.budget.saw(images, looked)
        metrics = getattr(self.context, "metrics", None)
        if metrics is not None and self.settings.tta:
            metrics.add_counter("ts_handler_tta_images", images, None)
            metrics.add_counter("ts_handler_tta_second_looks", looked, None)

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
