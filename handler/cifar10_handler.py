"""TorchServe handler for the image classifier (packaged by `make archive`, served by `make serve`).

The class TorchServe loads; the work is in the cifar10_serve package beside it in the .mar. A
batch goes detect (torchserve_adapter) -> decode (the protocol reads each body) -> admit (budget,
images decoded) -> forward (predict) -> encode (each answer or error in its protocol's terms).
A dynamic batch mixes every kind of request, so the handler owns `handle()` and carries each
request as a Row to its answer; one request's 4xx, 503 or 500 never fails its neighbours.
"""
import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from ts.handler_utils.timer import timed
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from cifar10_serve import budget, predict, ranking, raw, settings, spec, torchserve_adapter, v2
from cifar10_serve.bodies import Row
from cifar10_serve.errors import ClientError, Failure, too_many
from cifar10_serve.images import decode_request, eval_transform
from cifar10_serve.net import build_net, class_names, load_checkpoint
from cifar10_serve.runtimes import calibrate, select_device

logger = logging.getLogger(__name__)


class Cifar10Handler(BaseHandler):
    def initialize(self, context):
        self.context, properties = context, context.system_properties
        config = getattr(context, "model_yaml_config", None) or {}
        self.settings = settings.read(config.get("handler"))
        self.limits = self.settings.limits
        self.chunk = self.settings.forward_batch  # images per forward call, not batchSize
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.device = select_device(properties.get("gpu_id"))
        model_dir = Path(properties.get("model_dir"))
        checkpoint = load_checkpoint(model_dir / context.manifest["model"]["serializedFile"])
        self.spec = spec.from_checkpoint(checkpoint)  # what the model is: its input, its classes
        torchserve_adapter.set_json_values_limit(self.limits["max_images"], self.spec)
        self.classes = class_names(model_dir, self.spec.classes)
        self.model = build_net(self.spec, checkpoint["state_dict"]).to(
            self.device, memory_format=torch.channels_last)
        self.model.eval()
        self.transform = eval_transform(self.spec)
        # One start-up calibration (on a GPU the torch net runs) feeds the runtime and the budget.
        self.calibration = calibrate(self.settings.runtime, self.model, model_dir, self.transform,
                                     self.spec, self.device, self.chunk, self.settings.ig_steps,
                                     torch.get_num_threads())
        self.forward, self.runtime = self.calibration.forward, self.calibration.runtime
        self.budget = budget.for_worker(
            self.settings, config.get("responseTimeout", budget.TORCHSERVE_RESPONSE_TIMEOUT),
            self.calibration)
        self.initialized = True
        logger.info("model %s loaded on %s (runtime %s, tta=%d, top-%d, %d threads, limits %s), "
                    "spec %s", self.spec.name, self.device, self.runtime, self.settings.tta,
                    self.settings.topk, torch.get_num_threads(), self.limits,
                    json.dumps(self.spec.to_dict()))

    def handle(self, data, context):
        start, self.context = time.time(), context
        together = torchserve_adapter.enveloped(data, context)
        rows, admission = self.decode(data, together)
        self.infer(rows, admission)
        output = self.encode(rows, together)
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return output

    @timed
    def decode(self, data, together=False):
        """TorchServe's rows -> (Rows, their budget.Admission): each read and counted against the
        limits; those the budget admits decoded, the others refused (503, or 413)."""
        started, wall_started = self.budget.clock(), time.monotonic()
        rows = [self._read(index, request, len(data), together)
                for index, request in enumerate(data)]
        admission = self.budget.admission(rows, started, together, wall_started)
        for row in admission.order:
            if admission.fits(row) and not self._given_up(row) and admission.in_time(row):
                with self._own_error(row, f"decoding a {row.kind} request of the batch"):
                    row.images = decode_request(row.images, self.limits, self.spec)
        return rows, admission

    def _given_up(self, row):
        """Has the proxy sent this request again (taken off the queue, or its turn to decode
        come, too late)? Its second try answers the client: this one is not computed."""
        if row.resent_at is None or time.time() <= row.resent_at:
            return False
        self._add_counter("ts_handler_given_up", 1)
        row.error, row.images = Failure(503, "the proxy stopped waiting for this try and sent "
                                             "the request once more: its second try answers it",
                                        ""), []
        return True

    def _read(self, index, request, count, together):
        headers = torchserve_adapter.headers_of(self.context, index, together)
        kind = torchserve_adapter.kind_of(request, headers)
        if kind in ("describe", "metadata"):  # answered from the model, not from a body
            return Row(kind=kind, protocol=v2 if kind == "metadata" else raw)
        # The route's protocol writes the errors until the body names its own.
        row = Row(kind=kind, protocol=torchserve_adapter.route_protocol(headers, together),
                  resent_at=torchserve_adapter.resent_at(headers))
        if self._given_up(row):
            return row
        with self._own_error(row, f"reading request {index} of the batch"):
            limit = self.limits["max_explain_images" if kind == "explain" else "max_images"]
            if together and count > limit:  # an envelope's instances are its request's images
                raise too_many(count, limit)
            limits = {**self.limits, "max_images": limit}
            row.protocol, payload = torchserve_adapter.detect(request, headers, together, limits,
                                                              self.spec)
            row.images, row.reply = row.protocol.read(payload, limits, self.spec)
            row.min_confidence = torchserve_adapter.min_confidence(headers)
        return row

    @contextlib.contextmanager
    def _own_error(self, row, doing):
        """The client's 4xx, or our 500 (logged), as the row's own error."""
        try:
            yield
        except ClientError as err:
            row.error, row.images = err.failure, []
        except PredictionException as err:
            row.error, row.images = Failure(err.error_code, err.message), []
        except Exception:  # noqa: BLE001  (ours, not the client's: this request's 500)
            logger.exception("%s failed", doing)
            row.error, row.images = Failure(500, f"the server failed while {doing.split()[0]} "
                                                 f"this request (logged)", ""), []

    @timed
    def infer(self, rows, admission=None):
        """Class probabilities or explanations (``row.result``); a failed group reruns row by row
        while it fits the batch's budget (predict.run)."""
        forwards = predict.Forwards(self.forward, self.model, self.transform, self.device,
                                    self.chunk, self.settings.tta, self.settings.tta_margin,
                                    self.settings.ig_steps, self.classes, self.spec.temperature)
        found, looked = predict.run(rows, forwards, admission)
        self._count(sum(len(f.probs) for f in found if f is not None), looked)
        self._confidences([f.probs for row, f in zip(rows, found)
                           if f is not None and row.kind == "predict"])
        for row, result in zip(rows, found):
            if result is not None:
                row.result = result.explained if row.kind == "explain" else result.probs

    def _count(self, images, looked):
        """For the budget's estimate, and the metrics port's TTA counters."""
        self.budget.saw(images, looked)
        if self.settings.tta:
            self._add_counter("ts_handler_tta_images", images)
            self._add_counter("ts_handler_tta_second_looks", looked)

    def _add_counter(self, name, value):
        metrics = getattr(self.context, "metrics", None)
        if metrics is not None:
            metrics.add_counter(name, value, None)

    def _confidences(self, probs):
        """The served top-1 probabilities as a Prometheus histogram: TorchServe 0.12 has no
        histogram metric, so the cumulative buckets are a counter with an `le` dimension beside
        ..._count and ..._sum, which histogram_quantile() and rate() read as one."""
        metrics = getattr(self.context, "metrics", None)
        if metrics is None or not probs:
            return
        top, _ = ranking.confidence(torch.cat(probs))
        for bound, count in ranking.confidence_buckets(top).items():
            if not count:  # a counter that did not move needs no [METRICS] log line
                continue
            metrics.add_counter("ts_handler_top1_confidence_bucket", count, None,
                                [Dimension("le", bound)])
        metrics.add_counter("ts_handler_top1_confidence_count", len(top), None)
        metrics.add_counter("ts_handler_top1_confidence_sum", round(top.sum().item(), 6), None)

    def to_batch(self, images):
        """Decoded uint8 images -> the normalised batch (tests, bench)."""
        return predict.to_batch(images, self.transform, self.device)

    @timed
    def encode(self, rows, together=False):
        """Each row's answer or error, set back through the context."""
        for row in rows:
            if row.error is not None:
                continue
            with self._own_error(row, f"answering a {row.kind} request of the batch"):
                if row.kind == "describe":
                    row.answer = self.describe_handle()
                elif row.kind == "metadata":
                    row.answer = v2.metadata(self.spec, self.version or "1.0")
                elif row.kind == "explain":
                    row.answer, row.headers = row.reply.explanations(row.result)
                else:
                    row.answer, row.headers = row.reply.predictions(
                        row.result, self.classes, self.settings.topk, self.context.model_name,
                        self.version, row.min_confidence)
        return torchserve_adapter.respond(rows, self.context, together, self.spec,
                                          self.budget.retry_after, self.version)

    @property
    def version(self):
        """The archive's version (X-Model-Version): during a release several answer."""
        manifest = getattr(self.context, "manifest", None) or {}
        return str(manifest.get("model", {}).get("modelVersion") or "")

    def describe_handle(self):
        return {"classes": self.classes, "runtime": self.runtime, "tta": self.settings.tta,
                "tta_margin": self.settings.tta_margin, "topk": self.settings.topk,
                "limits": self.limits, "budget": self.budget.figures()}
