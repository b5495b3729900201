"""The two tiers of errors: the client's fault is a 4xx for that request alone, with a message that
says what was wrong and what is accepted; everything else propagates with its traceback.
"""
import re

from ts.utils.util import PredictionException

ACCEPTED = ("send an image (PNG, JPEG, GIF, BMP, WebP, TIFF) as the raw body, as multipart "
            "form fields, or as JSON {\"data\": \"<base64>\"} or {\"data\": [\"<base64>\", ...]}")


def bad_request(message, code=400):
    """The client's mistake: answered with a 4xx for that request alone."""
    return PredictionException(f"{message}; {ACCEPTED}", code)


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
