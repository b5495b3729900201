"""The two tiers of errors: the client's fault is a 4xx for that request alone, with a message that
says what was wrong and what is accepted; everything else propagates with its traceback. A
failure is data (``Failure``); each protocol module writes it in its own terms.
"""
import re
from typing import NamedTuple

from ts.utils.util import PredictionException


class Failure(NamedTuple):
    """HTTP status, what was wrong, what is accepted (None: the request's protocol says it; "":
    nothing to add, the server's own failures and refusals)."""
    status: int
    message: str
    accepted: str = None


class ClientError(PredictionException):
    """The client's mistake; a PredictionException, so one escaping is still a 4xx."""

    def __init__(self, message, status=400, accepted=None):
        super().__init__(message, status)
        self.failure = Failure(status, message, accepted)


bad_request = ClientError  # the client's mistake: a 4xx for that request alone


def too_many(count, max_images):
    return bad_request(f"the request carries {count} images; at most {max_images} are accepted "
                       f"per request: split it into several requests", 413)


def shown(value, limit=40):
    value = str(value)
    return value if len(value) <= limit else value[:limit] + "..."


def safe(message):
    """Printable ASCII only, as it is the HTTP reason phrase too: a lone surrogate kills the
    worker when TorchServe encodes it, and CR or LF makes the frontend drop the worker."""
    escaped = message.encode("ascii", "backslashreplace").decode("ascii")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", escaped)


def failure_of(error):
    """The budget's and the forward's (status, message) are the server's own."""
    return error if isinstance(error, Failure) else Failure(*error, accepted="")


def written(failure, accepted):
    """What was wrong, then what is accepted (its own, or the protocol's ``accepted``)."""
    added = accepted if failure.accepted is None else failure.accepted
    return safe(f"{failure.message}; {added}" if added else failure.message)
