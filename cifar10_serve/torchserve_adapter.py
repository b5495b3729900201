"""Where TorchServe 0.12 meets the protocols: its batch read into each request's kind and protocol
(``detect``), answers and errors written back through its context (``respond``), and the
patches of its worker, applied once on import (a warning on any other version):

1. Repeated multipart field names lose no image (ts/service.py keys fields by name).
2. application/json bodies are parsed only up to the largest request accepted: the worker's
   reader parses every such body first (a batch of 16 8-MiB bodies of empty objects: 3.6 GB).
3. The batch's request headers carry the rows TorchServe built (``RequestHeaders``), to tell
   them from the rows a KServe envelope made of one request's instances.
4. A body the reader cannot decode is logged in one line, not a 10-line traceback that would
   let a client fill the log ten times faster than the access log; each still gets its 4xx.
5. python-multipart's warning per malformed body is silenced: each gets its 400.

TorchServe passes no URL: /predictions adds `explain: False` and `url_path`, /explanations
`explain: True`, the KServe routes `explain: False` without `url_path`, the customized describe
`describe: True`, the proxy's v2 metadata route METADATA_HEADER.
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
from cifar10_serve.errors import bad_request, failure_of, shown

logger = logging.getLogger(__name__)
WRITTEN_FOR = "0.12."
# Set by the proxy's GET /v2/models/<model>, sent on as an empty inference request.
METADATA_HEADER = "x-v2-metadata"
# Asks each image's answer to say whether its top-1 probability is below it.
MIN_CONFIDENCE_HEADER = "X-Min-Confidence"
# What TorchServe's reader may parse of a JSON body: set at worker start, before any request.
_allowed = {"json_values": None}


def set_json_values_limit(max_images, spec):
    _allowed["json_values"] = json_values_limit(max_images, spec.pixel_shape)


def bounded_loads(body, **kwargs):
    """json.loads for TorchServe's reader: over the limit it refuses, TorchServe passes the bytes
    on, and the handler answers that request alone with its 413."""
    if _allowed["json_values"] is not None and json_values(body) > _allowed["json_values"]:
        raise ValueError(f"over {_allowed['json_values']:,} JSON values: left to the handler")
    return json.loads(body, **kwargs)


def keep_repeated_fields(retrieve):
    """Wrap TorchServe's request parser: several fields are numbered by position (data#1, data#2),
    and the headers it returns carry its rows (``RequestHeaders``)."""
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
    """The reader's "Failed ... decoding" warnings: the reason, no traceback."""

    def filter(self, record):
        if record.exc_info and str(record.msg).startswith("Failed ") and "decoding" in str(
                record.msg):
            error = record.exc_info[1]
            record.msg = f"{record.msg}: {type(error).__name__}: {str(error)[:200]}"
            record.exc_info = record.exc_text = None
        return True


class RequestHeaders(list):
    def __init__(self, processors, rows):
        super().__init__(processors)
        self.rows = rows


def enveloped(data, context):
    """Are ``data`` the instances a KServe envelope made of one request (False where no worker built
    the rows: a test calling the handler directly)?"""
    built = getattr(context.request_processor, "rows", None)
    return built is not None and data is not built


def request_header(headers, name):
    name = name.lower()
    return next((value for key, value in headers.items() if isinstance(value, str)
                 and key.lower() == name), None)


def resent_at(headers):
    """When (time.time()) the proxy stops waiting for this try of the request and sends it once
    more: its X-Proxy-Sent plus X-Proxy-Resend-After; None where not sent by the proxy, or not a
    first try. From then on that copy answers the client, and this one is not computed."""
    try:
        return float(request_header(headers, "X-Proxy-Sent")) + \
            float(request_header(headers, "X-Proxy-Resend-After"))
    except (TypeError, ValueError):
        return None


def min_confidence(headers):
    return bodies.min_confidence(request_header(headers, MIN_CONFIDENCE_HEADER),
                                 f"the {MIN_CONFIDENCE_HEADER} header")


def headers_of(context, index, together):
    """Row ``index``'s request headers (``together``: every row is request 0's)."""
    processors = getattr(context, "request_processor", None) or ()
    index = 0 if together else index
    return processors[index].get_request_properties() if index < len(processors) else {}


def on_protocol_route(headers):
    """TorchServe's KServe routes add `explain: False` but not `url_path`."""
    return headers.get("explain") == "False" and "url_path" not in headers


def kind_of(request, headers):
    """"describe", "metadata" (the proxy's v2 metadata route), "explain" or "predict"."""
    empty = not request or (isinstance(request, dict)
                            and all(not value for value in request.values()))
    if empty and headers.get("describe") == "True":
        return "describe"
    if empty and request_header(headers, METADATA_HEADER) is not None:
        return "metadata"
    return "explain" if headers.get("explain") == "True" else "predict"


def route_protocol(headers, together):
    """Whose terms a request's errors are in until its body names its protocol."""
    if together:
        return KSERVE_INSTANCE
    if on_protocol_route(headers) or request_header(headers, v2.HEADER_LENGTH) is not None:
        return v2
    return raw


def detect(request, headers, together, limits, spec):
    """(the protocol module that reads the request, what its ``read`` takes); a JSON body is parsed
    here within the limits. ``together``: the row is one instance of a KServe envelope's request."""
    if together:
        if isinstance(request, dict) and {"datatype", "shape", "data"} <= set(request):
            return EnvelopeTensor, request  # the kservev2 envelope's tensor
        return KSERVE_INSTANCE, request
    fields = request if isinstance(request, dict) else {}
    route, encoding = on_protocol_route(headers), request_header(headers, "Content-Encoding")
    if encoding not in (None, "", "identity"):  # whatever the body, it would be misread
        raise bad_request(f"the body is compressed (Content-Encoding: {shown(encoding)}), which "
                          f"TorchServe's frontend does not undo: send it uncompressed "
                          f"(tritonclient: request_compression_algorithm=None, its default)")
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


class EnvelopeTensor:
    """The kservev2 envelope's rows: each one v2 input tensor, answered as the flat list of its
    probabilities (the envelope names and shapes it)."""
    error = staticmethod(v2.error)

    @staticmethod
    def read(tensor, limits, spec):
        data = tensor["data"]
        # The envelope keeps only data[0] of a BYTES tensor: put it back in a list, so a tensor
        # of several images fails its shape check instead of losing images.
        tensor = {**tensor, "data": [data] if isinstance(data, str) else data}
        return v2.read_tensor(tensor, limits, spec), EnvelopeTensor

    @staticmethod
    def predictions(probs, *_):
        return probs.reshape(-1).tolist(), {}

    @staticmethod
    def explanations(found):
        return found, {}


# The rows TorchServe's kserve envelope passes: each one instance of one request.
KSERVE_INSTANCE = SimpleNamespace(read=kserve.read_instance, error=kserve.error)


def respond(rows, context, together, spec, retry_after, version=None):
    """Each row's answer, or its error in its protocol's terms with its status (``together``: all
    are request 0's; the first failure names it) and Retry-After on a 503; its own headers, and
    X-Model-Version (several versions answer during a release). Returns the answers."""
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
        # Every answer is JSON. But the handler's own 500s: the proxy tells them from the 500s
        # TorchServe's frontend makes for a dropped batch (which it resends) by their having none.
        if statuses.get(request, (200,))[0] != 500 \
                and not context.get_response_content_type(request):  # v2 binary sets its own
            context.set_response_content_type(request, "application/json")
    for request, (code, message) in statuses.items():
        context.set_response_status(code, message, request)
    return [row.answer for row in rows]


if not getattr(Service.retrieve_data_for_inference, "patched_by_cifar10_serve", False):
    if not TORCHSERVE_VERSION.startswith(WRITTEN_FOR):
        logger.warning("cifar10_serve.torchserve_adapter was written for TorchServe %sx, this is "
                       "%s: check that ts/service.py and ts/protocol/otf_message_handler.py "
                       "still read requests as it expects (tests/test_batches.py)", WRITTEN_FOR,
                       TORCHSERVE_VERSION)
    Service.retrieve_data_for_inference = keep_repeated_fields(Service.retrieve_data_for_inference)
    otf_message_handler.json = SimpleNamespace(loads=bounded_loads, dumps=json.dumps)
    logging.getLogger().addFilter(OneLineDecodingWarnings())
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
