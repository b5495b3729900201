"""The model spec: what describes the served classifier, as data, saved with its checkpoint: its
name, input size and channels, resize policy, mean and std, classes, architecture and its
arguments, and temperature. Every layer reads it from there (``python -m cifar10_serve.spec
CKPT [FIELD]`` prints it for the tools that are not Python). A checkpoint from before the spec
(``model_args``, ``classes``, ``normalization``) is read as the CIFAR-10 net it describes.
"""
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# squash: the whole image resized to image_size, whatever its aspect ratio (as CIFAR-10 was made);
# crop: the shorter side resized to resize_to, then the centre image_size cut out (ImageNet's eval).
RESIZE_POLICIES = ("squash", "crop")
CHANNEL_MODES = {1: "L", 3: "RGB"}  # the PIL mode every decoded image is converted to


@dataclass(frozen=True)
class ModelSpec:
    """The served classifier, described. ``image_size`` is (height, width)."""
    name: str
    classes: tuple
    architecture: str
    arch_args: dict = field(default_factory=dict)
    image_size: tuple = (32, 32)
    channels: int = 3
    mean: tuple = CIFAR10_MEAN
    std: tuple = CIFAR10_STD
    resize: str = "squash"
    resize_to: int = None
    temperature: float = 1.0

    def __post_init__(self):
        for name, kind in (("classes", tuple), ("image_size", tuple), ("mean", tuple),
                           ("std", tuple)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "arch_args", dict(self.arch_args or {}))
        _check(self)

    @property
    def height(self):
        return self.image_size[0]

    @property
    def width(self):
        return self.image_size[1]

    @property
    def mode(self):
        return CHANNEL_MODES[self.channels]

    @property
    def input_shape(self):  # as the net takes it
        return (self.channels, self.height, self.width)

    @property
    def pixel_shape(self):  # as raw pixels in requests (v2 UINT8)
        return (self.height, self.width, self.channels)

    @property
    def values_per_image(self):
        return self.height * self.width * self.channels

    def to_dict(self):
        plain = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in plain.items()}

    def replace(self, **changes):
        return ModelSpec(**{**self.to_dict(), **changes})


def from_dict(data):
    """ValueError naming the field that is missing, unknown or wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"a model spec is a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(ModelSpec)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"model spec: unknown fields {sorted(unknown)}; the fields are "
                         f"{sorted(known)}")
    missing = {"name", "classes", "architecture"} - set(data)
    if missing:
        raise ValueError(f"model spec: missing fields {sorted(missing)}")
    try:
        return ModelSpec(**data)
    except TypeError as err:
        raise ValueError(f"model spec: {err}") from err


def from_checkpoint(checkpoint, name="cifar10"):
    """The checkpoint's "spec", or a pre-spec checkpoint's CIFAR-10 net."""
    if "spec" in checkpoint:
        return from_dict(checkpoint["spec"])
    normalization = checkpoint.get("normalization") or {}
    arch_args = dict(checkpoint.get("model_args") or {})
    classes = tuple(checkpoint["classes"])
    # the class count is the classes' (len(spec.classes)), not an argument of its own
    if arch_args.pop("num_classes", len(classes)) != len(classes):
        raise ValueError(f"the checkpoint's model_args num_classes does not match its "
                         f"{len(classes)} classes")
    return CIFAR10.replace(name=name, classes=classes, arch_args=arch_args,
                           mean=tuple(normalization.get("mean", CIFAR10_MEAN)),
                           std=tuple(normalization.get("std", CIFAR10_STD)))


def load(path):
    path = Path(path)
    if path.suffix == ".json":
        try:
            return from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from err
    import torch  # noqa: PLC0415  (the module itself is plain data)

    return from_checkpoint(torch.load(path, map_location="cpu", weights_only=True))


def _check(spec):
    def wrong(field_name, wanted):
        raise ValueError(f"model spec: {field_name} must be {wanted}, got "
                         f"{getattr(spec, field_name)!r}")

    if not (isinstance(spec.name, str) and spec.name.replace("-", "").replace("_", "").isalnum()
            and spec.name[0].isalnum() and len(spec.name) <= 64):
        wrong("name", "1-64 letters, digits, '-' or '_', starting with a letter or digit (it is "
                      "a URL path segment)")
    if len(spec.classes) < 2 or not all(isinstance(c, str) and c for c in spec.classes) \
            or len(set(spec.classes)) != len(spec.classes):
        wrong("classes", "at least two distinct non-empty names")
    if not (isinstance(spec.architecture, str) and spec.architecture):
        wrong("architecture", "a registered architecture's name")
    if not all(isinstance(k, str) for k in spec.arch_args) or "num_classes" in spec.arch_args:
        wrong("arch_args", "the architecture's keyword arguments by name, without num_classes "
                           "(that is len(classes))")
    if len(spec.image_size) != 2 or not all(type(n) is int and 1 <= n <= 4096
                                            for n in spec.image_size):
        wrong("image_size", "[height, width], whole numbers from 1 to 4096")
    if spec.channels not in CHANNEL_MODES:
        wrong("channels", f"one of {sorted(CHANNEL_MODES)}")
    for name, positive in (("mean", False), ("std", True)):
        values = getattr(spec, name)
        if len(values) != spec.channels or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive)
                for v in values):
            wrong(name, f"{spec.channels} finite numbers (one per channel)"
                        f"{', each above 0' if positive else ''}")
    if spec.resize not in RESIZE_POLICIES:
        wrong("resize", f"one of {RESIZE_POLICIES}")
    if spec.resize == "crop":
        if type(spec.resize_to) is not int or spec.resize_to < max(spec.image_size):
            wrong("resize_to", "the shorter side's length before the centre crop, a whole number "
                               "of at least the larger of image_size")
    elif spec.resize_to is not None:
        wrong("resize_to", "unset (null) with resize: squash")
    if not (isinstance(spec.temperature, (int, float)) and math.isfinite(spec.temperature)
            and spec.temperature > 0):
        wrong("temperature", "a finite number above 0")


# The CIFAR-10 net as the shipped weights describe it (a checkpoint from before the spec).
CIFAR10 = ModelSpec(name="cifar10", classes=CIFAR10_CLASSES, architecture="airbench")


def index_to_name(spec):
    return {str(i): name for i, name in enumerate(spec.classes)}


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    spec = load(args[0])
    plain = spec.to_dict()
    if args[1:] == ["index_to_name"]:
        print(json.dumps(index_to_name(spec), indent=2))
    elif len(args) > 1:
        value = plain[args[1]]
        print(value if isinstance(value, str) else json.dumps(value))
    else:
        print(json.dumps(plain, indent=2))


if __name__ == "__main__":
    main()
