"""The handler's settings (model-config.yaml `handler:`), checked at worker start: an unknown name
or a value out of range stops the worker with a message naming it.
"""
from dataclasses import dataclass, field

# Refuse images whose header claims more pixels than this, before any pixel is decoded. A
# classifier needs photos, not posters: 4096x4096 (16.8 M px) admits a 12 M px phone photo.
MAX_IMAGE_PIXELS = 4096 * 4096
# model-config.yaml `runtime`: auto, or one forward by name (cifar10_serve/runtimes.py).
RUNTIMES = ("auto", "int8", "bf16", "onnx", "torch")

# The per-request limits and their defaults. Each is checked before the work it bounds; going
# over one is that request's 413 (or 400), never its batch neighbours' problem.
LIMITS = {
    "max_images": 64,              # images per /predictions (or v2, KServe) request
    "max_explain_images": 4,       # images per /explanations request
    "max_image_pixels": MAX_IMAGE_PIXELS,  # pixels an image's header may claim
    "max_request_pixels": 4096 * 4096,  # pixels per request, as the headers claim
    "max_id_length": 256,          # characters of a v2 request "id", echoed in the answer
    "max_decode_ms": 1000,         # CPU time to open and decode one request's images
}
TTA_LEVELS = (0, 1, 2)  # none; + mirror; + mirror and 1-pixel shifts (cifar10_serve.net)


@dataclass
class Settings:
    topk: int = 5
    tta: int = 0
    ig_steps: int = 32
    threads: int = 0  # 0: torch's own default
    # Images per forward call: a request's (or a batch's) images go through the forward in chunks
    # of this many, whatever TorchServe's batchSize (requests per batch; KServe's is 1).
    forward_batch: int = 16
    tta_margin: float = 1.0  # the extra views only below this lead (gated TTA); 1: every image
    runtime: str = "auto"
    profile: bool = False
    budget_share: float = 0.2  # of responseTimeout: what a batch may cost (budget.py)
    explain_share: float = 0.5  # of that: what a batch's explanations may cost together
    limits: dict = field(default_factory=lambda: dict(LIMITS))


def read(config):
    config = dict(config or {})
    unknown = set(config) - {"topk", "tta", "tta_margin", "ig_steps", "threads", "forward_batch",
                             "runtime", "profile", "budget_share", "explain_share", *LIMITS}
    if unknown:
        raise ValueError(f"model-config.yaml handler: unknown settings {sorted(unknown)}")
    settings = Settings()
    for name, default in {"topk": settings.topk, "ig_steps": settings.ig_steps,
                          "forward_batch": settings.forward_batch, **LIMITS}.items():
        value = _whole(name, config.get(name, default))
        if name in LIMITS:
            settings.limits[name] = value
        else:
            setattr(settings, name, value)
    settings.threads = _whole("threads", config.get("threads") or 0, least=0)
    settings.tta = _whole("tta", config.get("tta", settings.tta), least=0)
    if settings.tta not in TTA_LEVELS:
        raise ValueError(f"model-config.yaml handler.tta must be one of {TTA_LEVELS}, "
                         f"got {settings.tta}")
    for name, zero in (("tta_margin", True), ("budget_share", False), ("explain_share", False)):
        setattr(settings, name, _fraction(name, config.get(name, getattr(settings, name)), zero))
    settings.runtime = config.get("runtime", settings.runtime)
    if settings.runtime not in RUNTIMES:
        raise ValueError(f"model-config.yaml handler.runtime must be one of {RUNTIMES}, "
                         f"got {settings.runtime!r}")
    settings.profile = bool(config.get("profile", settings.profile))
    return settings


def _fraction(name, value, zero=False):
    if type(value) not in (int, float) or not 0 <= value <= 1 or (value == 0 and not zero):
        raise ValueError(f"model-config.yaml handler.{name} must be a number from 0 to 1"
                         f"{'' if zero else ', not 0'}, got {value!r}")
    return float(value)


def _whole(name, value, least=1):
    """Bools, floats and text refused (a zero max_decode_ms would disarm the deadline)."""
    if type(value) is not int or value < least:
        raise ValueError(f"model-config.yaml handler.{name} must be a whole number of at least "
                         f"{least}, got {value!r}")
    return value
