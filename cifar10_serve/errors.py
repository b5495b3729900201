"""The two tiers of errors: the client's fault is a 4xx for that request alone, with a message that
says what was wrong and what is accepted; everything else propagates with its traceback.

A failure is data (``Failure``: status, message, what is accepted where the check that failed knows
better than the request's protocol); each protocol module writes it in its own terms.
"""
import re
from typing import NamedTuple

from ts.utils.util import PredictionException


class Failure(NamedTuple):
    """Why one request gets no answer: its HTTP status, what was wrong, and what is accepted
    (None: the request's protocol says it; "": nothing to add, the server's own failures and
    refusals)."""
    status: int
    message: str
    accepted: str = None


class ClientError(PredictionException):
    """The client's mistake, raised where it is found: a 4xx for that request alone. A
    PredictionException, so that one escaping the handler is still TorchServe's 4xx."""

    def __init__(self, message, status=400, accepted=None):
        super().__init__(message, status)
        self.failure = Failure(status, message, accepted)


def bad_request(message, code=400, accepted=None):
    """The client's mistake: answered with a 4xx for that request alone."""
    return ClientError(message, code, accepted)


def too_many(count, max_images):
    return bad_request(f"the request carries {count} images; at most {max_images} are accepted "
                       f"per request: split it into several requests", 413)


def shown(value, limit=40):
    """Something the client sent, as echoed in a message: bounded (``safe`` escapes it)."""
    value = str(value)
    return value if len(value) <= limit else value[:limit] + "..."


def safe(message):
    """A message as TorchServe sends it, in the HTTP reason phrase too: printable ASCII only.
    A lone surrogate kills the worker when TorchServe encodes the phrase, and CR or LF makes the
    frontend drop the worker; everything else outside printable ASCII is escaped as well."""
    escaped = message.encode("ascii", "backslashreplace").decode("ascii")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", escaped)


def failure_of(error):
    """A row's error as a Failure: the budget's and the forward's (status, message) pairs are
    the server's own, with nothing accepted to add."""
    return error if isinstance(error, Failure) else Failure(*error, accepted="")


def written(failure, accepted):
    """A failure's text: what was wrong, then what is accepted (its own, or ``accepted``: the
    request's protocol's), as the client reads it."""
    added = accepted if failure.accepted is None else failure.accepted
    return safe(f"{failure.message}; {added}" if added else failure.message)
