"""Where TorchServe 0.12 meets the protocols: how its worker presents a batch (one dict of fields
per request, the headers its routes add, the rows its KServe envelopes make of one request) read
into each request's kind and protocol (``detect``), its answers and errors written back through
its context (``respond``), and the patches of its worker this handler needs (applied once, on
import; the worker logs a warning on any other version: 0.12 is the last release, upstream is in
limited maintenance).

Patches:
1. Repeated multipart field names lose no image: ts/service.py keys a request's fields by name,
   so `curl -F data=@a.jpg -F data=@b.jpg` would reach the handler as b.jpg alone.
2. application/json bodies are parsed only up to the largest request accepted: the worker's reader
   (ts/protocol/otf_message_handler.py) parses every such body before the handler sees it (an
   8 MiB body of 2.8 M empty objects took ~170 MB and 0.5 s, a batch of 16 of them 3.6 GB).
3. The batch's request headers carry the rows TorchServe built for them (``RequestHeaders``), so
   the handler can tell them from the rows a KServe envelope (`service_envelope`) made of one
   request's instances.
4. A body the reader cannot decode (bad JSON, bad UTF-8 text, JSON over the limit) is logged in
   one line with the reason, not with a traceback: TorchServe logs a 10-line traceback for each,
   so a client sending such bodies could fill the log ten times faster than the access log. The
   handler still answers each with its 400/413.
5. python-multipart (cifar10_serve/multipart.py) logs a warning for each malformed multipart
   body; the handler answers each with a 400 naming the problem, so only its errors are logged.

Routes: TorchServe passes the worker no URL. /predictions adds `explain: False` and a `url_path`
header, /explanations `explain: True`, its KServe inference routes (/v2/models/<model>/infer,
/v1/models/<model>:predict) `explain: False` without `url_path`
(org.pytorch.serve.http.api.rest.InferenceRequestHandler); the management API's customized
describe `describe: True`; the proxy's v2 model metadata route (deploy/nginx/) METADATA_HEADER.
"""
import json
import logging
import time
from types import SimpleNamespace

from ts.protocol import otf_message_handler
from ts.service import Service
from ts.version import __version__ as TORCHSERVE_VERSION

from cifar10_serve import bodies, kserve, multipart, raw, v2
from cifar10_serve.bodies import json_values, json_values_limit, looks_like_json, numbered, \
    read_json
from cifar10_serve.errors import bad_request, failure_of, too_many

logger = logging.getLogger(__name__)
WRITTEN_FOR = "0.12."
# The request header the proxy's v2 model metadata route sets (GET /v2/models/<model>, sent on as
# an empty inference request): the v2 protocol answers it from the model's spec.
METADATA_HEADER = "x-v2-metadata"
# The request header that asks every image's answer to say whether its top-1 probability is
# below it (answers.uncertain_headers; a v2 request may say so in its parameters instead).
MIN_CONFIDENCE_HEADER = "X-Min-Confidence"
# What TorchServe's reader may parse of an application/json body (the patched json.loads runs
# inside TorchServe's reader, so the handler sets it at worker start, before any request:
# ``set_json_values_limit``; None until then).
_allowed = {"json_values": None}


def set_json_values_limit(max_images, spec):
    """What TorchServe's reader may parse of an application/json body: the largest request of
    ``max_images`` images of the model's input (read at worker start)."""
    _allowed["json_values"] = json_values_limit(max_images, spec.pixel_shape)


def bounded_loads(body, **kwargs):
    """json.loads for TorchServe's request reader. Over the limit it refuses, and TorchServe passes
    the raw bytes on (logging a warning): the handler then answers that request alone with its 413
    (bodies.parse_json)."""
    if _allowed["json_values"] is not None and json_values(body) > _allowed["json_values"]:
        raise ValueError(f"over {_allowed['json_values']:,} JSON values: left to the handler")
    return json.loads(body, **kwargs)


def keep_repeated_fields(retrieve):
    """Wrap TorchServe's request parser: when a request has several fields, every one gets its
    position (data#1, data#2, ...) first, so each name ends in a number no other field has,
    whatever names the client chose; and the request headers it returns carry the rows it built
    (``RequestHeaders``)."""
    def retrieve_data_for_inference(batch):
        for request in batch or ():
            parameters = request.get("parameters") or ()
            if len(parameters) > 1:
                for position, parameter in enumerate(parameters, 1):
                    parameter["name"] = numbered(parameter["name"], position)
        headers, rows, ids = retrieve(batch)
        return RequestHeaders(headers, rows), rows, ids
    retrieve_data_for_inference.patched_by_cifar10_serve = True
    return staticmethod(retrieve_data_for_inference)


class OneLineDecodingWarnings(logging.Filter):
    """On the root logger (where the reader logs): its "Failed ... decoding" warnings keep the
    reason, cut to 200 characters, and lose the traceback."""

    def filter(self, record):
        if record.exc_info and str(record.msg).startswith("Failed ") and "decoding" in str(
                record.msg):
            error = record.exc_info[1]
            record.msg = f"{record.msg}: {type(error).__name__}: {str(error)[:200]}"
            record.exc_info = record.exc_text = None
        return True


class RequestHeaders(list):
    """A batch's request processors (what TorchServe sets as ``context.request_processor``), with
    the rows TorchServe built for them."""

    def __init__(self, processors, rows):
        super().__init__(processors)
        self.rows = rows


def enveloped(data, context):
    """Are ``data`` the instances a KServe envelope made of one request, not TorchServe's rows
    (False where no TorchServe worker built the rows: a test calling the handler directly)?"""
    built = getattr(context.request_processor, "rows", None)
    return built is not None and data is not built


def request_header(headers, name):
    """A request header's value, whatever case the client gave its name in, or None."""
    name = name.lower()
    return next((value for key, value in headers.items() if isinstance(value, str)
                 and key.lower() == name), None)


def given_up(headers, now=None):
    """Had the proxy stopped waiting for this try of the request, and sent it once more, before
    a worker took it off the queue (its X-Proxy-Sent plus X-Proxy-Resend-After passed)? That
    copy answers the client; this one is not computed (a request still queued when it is sent
    again runs once)."""
    try:
        sent = float(request_header(headers, "X-Proxy-Sent"))
        after = float(request_header(headers, "X-Proxy-Resend-After"))
    except (TypeError, ValueError):  # not sent by the proxy, or not a first try
        return False
    return (time.time() if now is None else now) > sent + after


def min_confidence(headers):
    """The request's X-Min-Confidence header as a probability, or None; a 400 where it is no
    probability."""
    return bodies.min_confidence(request_header(headers, MIN_CONFIDENCE_HEADER),
                                 f"the {MIN_CONFIDENCE_HEADER} header")


def headers_of(context, index, together):
    """The request headers of row ``index`` (``together``: every row is request 0's instance)."""
    processors = getattr(context, "request_processor", None) or ()
    index = 0 if together else index
    return processors[index].get_request_properties() if index < len(processors) else {}


def on_protocol_route(headers):
    """Did the request come on TorchServe's KServe inference routes, /v2/models/<model>/infer or
    /v1/models/<model>:predict? They add `explain: False`, as /predictions does, but not its
    `url_path` (the explain routes add `explain: True`; their answers are not v2's shape)."""
    return headers.get("explain") == "False" and "url_path" not in headers


def kind_of(request, headers):
    """What a request asks: "describe" (the management API's GET /models/<model>?customized=
    true), "metadata" (the proxy's v2 model metadata route), "explain" or "predict"."""
    empty = not request or (isinstance(request, dict)
                            and all(not value for value in request.values()))
    if empty and headers.get("describe") == "True":
        return "describe"
    if empty and request_header(headers, METADATA_HEADER) is not None:
        return "metadata"
    return "explain" if headers.get("explain") == "True" else "predict"


def route_protocol(headers, together):
    """The protocol whose terms a request's errors are written in until its body names its own:
    v2's on the KServe inference routes and for v2 binary data, else /predictions'."""
    if together:
        return KSERVE_INSTANCE
    if on_protocol_route(headers) or request_header(headers, v2.HEADER_LENGTH) is not None:
        return v2
    return raw


def detect(request, headers, together, limits, spec):
    """(the protocol module that reads the request, what its ``read`` takes), from TorchServe's
    row for it and its headers; a JSON body is parsed here, within the limits, to tell its
    protocol (errors: in ``route_protocol``'s terms). ``together``: the row is one instance of a
    KServe envelope's request."""
    if together:
        if isinstance(request, dict) and {"datatype", "shape", "data"} <= set(request):
            return ENVELOPE_TENSOR, request  # the kservev2 envelope's tensor
        return KSERVE_INSTANCE, request
    fields = request if isinstance(request, dict) else {}
    route, encoding = on_protocol_route(headers), request_header(headers, "Content-Encoding")
    header_length = request_header(headers, v2.HEADER_LENGTH)
    single = next(iter(fields.values())) if len(fields) == 1 else None
    if header_length is not None:
        return v2, (fields if single is None else single, header_length, encoding)
    content_type = request_header(headers, "content-type") or ""
    proxied = request_header(headers, multipart.FORM_HEADER)  # read only as the proxy sends it
    if proxied is not None and content_type.startswith("application/octet-stream") \
            and single is not None:
        form = (single, None, proxied)
    elif content_type.startswith("multipart/form-data"):
        form = (fields, {name: multipart.field_type(headers.get(name)) for name in fields}, None)
    elif len(fields) > 1:
        form = (fields, None, None)  # fields whose content types TorchServe did not pass
    else:
        form = None
    if form is not None:
        return (v2, (fields, None, encoding)) if route else (multipart, form)
    if not fields:
        raise bad_request("the request is empty")
    name, value = next(iter(fields.items()))
    if looks_like_json(value):  # not parsed by TorchServe: another Content-Type, or too large
        value = read_json(value, limits["max_images"], spec)
    if isinstance(value, dict) and "instances" in value:
        return kserve, value
    if route or (isinstance(value, dict) and "inputs" in value):
        return v2, (value, None, encoding)
    return raw, (name, value)


class _EnvelopeTensor:
    """The rows TorchServe's kservev2 envelope passes: each one v2 input tensor, answered as the
    flat list of its class probabilities (the envelope names and shapes it)."""

    @staticmethod
    def read(tensor, limits, spec):
        data = tensor["data"]
        # The envelope keeps only data[0] of a BYTES tensor: put it back in a list, so a tensor
        # of several images fails its shape check instead of losing images.
        tensor = {**tensor, "data": [data] if isinstance(data, str) else data}
        return v2.read_tensor(tensor, limits, spec), _EnvelopeTensor()

    error = staticmethod(v2.error)

    @staticmethod
    def predictions(probs, classes, topk, model_name, model_version=None, min_confidence=None):
        return probs.reshape(-1).tolist(), {}

    @staticmethod
    def explanations(found):
        return found, {}


class _KServeInstance:
    """The rows TorchServe's kserve envelope passes: each one instance of one request."""
    read = staticmethod(kserve.read_instance)
    error = staticmethod(kserve.error)


ENVELOPE_TENSOR, KSERVE_INSTANCE = _EnvelopeTensor, _KServeInstance


def check_instances(count, limit):
    """A KServe envelope's request carries its ``count`` instances as rows: they count against
    ``limit``."""
    if count > limit:
        raise too_many(count, limit)


def respond(rows, context, together, spec, retry_after, version=None):
    """Each row's answer back through the context: a failed row's error written by its protocol
    and its status set for its own request (``together``: every row is an instance of request
    0, and the first failing instance names the status), with Retry-After where the budget
    refused it; an answer's own headers (v2 binary data) for its request alone; and which
    ``version`` of the model answered (X-Model-Version: during a release several answer at once).
    Returns the answers, one per row."""
    statuses = {}
    for index, row in enumerate(rows):
        request = 0 if together else index
        if row.error is not None:
            failure = failure_of(row.error)
            if together:
                failure = failure._replace(message=f"instance {index}: {failure.message}")
            row.answer = row.protocol.error(failure, spec)
            statuses.setdefault(request, (failure.status, row.answer["message"]))
            if failure.status == 503:
                context.set_response_header(request, "Retry-After", str(retry_after))
        for key, value in row.headers.items():
            context.set_response_header(request, key, value)
        if version:
            context.set_response_header(request, "X-Model-Version", version)
    for request, (code, message) in statuses.items():
        context.set_response_status(code, message, request)
    return [row.answer for row in rows]


if not getattr(Service.retrieve_data_for_inference, "patched_by_cifar10_serve", False):
    if not TORCHSERVE_VERSION.startswith(WRITTEN_FOR):
        logger.warning("cifar10_serve.torchserve_adapter was written for TorchServe %sx, this is %s: check "
                       "that ts/service.py and ts/protocol/otf_message_handler.py still read "
                       "requests as it expects (tests/test_batches.py)", WRITTEN_FOR,
                       TORCHSERVE_VERSION)
    Service.retrieve_data_for_inference = keep_repeated_fields(Service.retrieve_data_for_inference)
    otf_message_handler.json = SimpleNamespace(loads=bounded_loads, dumps=json.dumps)
    logging.getLogger().addFilter(OneLineDecodingWarnings())
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
