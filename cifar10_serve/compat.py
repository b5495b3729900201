"""The patches of TorchServe's Python worker this handler needs, in one place. Importing this module
applies them (once); they were written for TorchServe 0.12, the last release (upstream is in limited
maintenance), and the worker logs a warning on any other version.

1. Repeated multipart field names lose no image: ts/service.py keys a request's fields by name,
   so `curl -F data=@a.jpg -F data=@b.jpg` would reach the handler as b.jpg alone.
2. application/json bodies are parsed only up to the largest request accepted: the worker's reader
   (ts/protocol/otf_message_handler.py) parses every such body before the handler sees it (an
   8 MiB body of 2.8 M empty objects took ~170 MB and 0.5 s, a batch of 16 of them 3.6 GB).
3. The rows TorchServe built for a batch are kept, so the handler can tell them from the rows
   a KServe envelope (`service_envelope`) made of one request's instances.
4. A body the reader cannot decode (bad JSON, bad UTF-8 text, JSON over the limit) is logged in
   one line with the reason, not with a traceback: TorchServe logs a 10-line traceback for each,
   so a client sending such bodies could fill the log ten times faster than the access log. The
   handler still answers each with its 400/413.
5. python-multipart (cifar10_serve/forms.py) logs a warning for each malformed multipart body;
   the handler answers each with a 400 naming the problem, so only its errors are logged.
"""
import json
import logging
from types import SimpleNamespace

from ts.protocol import otf_message_handler
from ts.service import Service
from ts.version import __version__ as TORCHSERVE_VERSION

from cifar10_serve.requests import json_values, json_values_limit, numbered

logger = logging.getLogger(__name__)
WRITTEN_FOR = "0.12."
_state = {"json_values_allowed": json_values_limit(64), "rows": None}


def set_json_values_limit(max_images):
    """What TorchServe's reader may parse of an application/json body: the largest request of
    ``max_images`` images (the handler's limit; read at worker start)."""
    _state["json_values_allowed"] = json_values_limit(max_images)


def bounded_loads(body, **kwargs):
    """json.loads for TorchServe's request reader. Over the limit it refuses, and TorchServe passes
    the raw bytes on (logging a warning): the handler then answers that request alone with its 413
    (requests._parse_json)."""
    if json_values(body) > _state["json_values_allowed"]:
        raise ValueError(f"over {_state['json_values_allowed']:,} JSON values: left to the handler")
    return json.loads(body, **kwargs)


def keep_repeated_fields(retrieve):
    """Wrap TorchServe's request parser: when a request has several fields, every one gets its
    position (data#1, data#2, ...) first, so each name ends in a number no other field has,
    whatever names the client chose; and the rows it builds are kept (``taken_rows``)."""
    def retrieve_data_for_inference(batch):
        for request in batch or ():
            parameters = request.get("parameters") or ()
            if len(parameters) > 1:
                for position, parameter in enumerate(parameters, 1):
                    parameter["name"] = numbered(parameter["name"], position)
        headers, rows, ids = retrieve(batch)
        _state["rows"] = rows
        return headers, rows, ids
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


def taken_rows():
    """The rows TorchServe built for the batch being handled (once: the next call gets None), or
    None where no TorchServe worker built them (a test calling the handler directly)."""
    rows, _state["rows"] = _state["rows"], None
    return rows


if not getattr(Service.retrieve_data_for_inference, "patched_by_cifar10_serve", False):
    if not TORCHSERVE_VERSION.startswith(WRITTEN_FOR):
        logger.warning("cifar10_serve.compat was written for TorchServe %sx, this is %s: check "
                       "that ts/service.py and ts/protocol/otf_message_handler.py still read "
                       "requests as it expects (tests/test_batches.py)", WRITTEN_FOR,
                       TORCHSERVE_VERSION)
    Service.retrieve_data_for_inference = keep_repeated_fields(Service.retrieve_data_for_inference)
    otf_message_handler.json = SimpleNamespace(loads=bounded_loads, dumps=json.dumps)
    logging.getLogger().addFilter(OneLineDecodingWarnings())
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
