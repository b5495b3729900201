"""Make a checkpoint this project serves from weights trained elsewhere: a plain state_dict (or
torchvision's pretrained weights) and a model spec (a JSON file; cifar10_serve/spec.py).

    python convert.py spec.json --state-dict my_weights.pt --out weights/mine.pt
    python convert.py spec.json --torchvision-weights ResNet18_Weights.IMAGENET1K_V1 --out r18.pt
    make convert SPEC=spec.json STATE_DICT=my_weights.pt WEIGHTS=weights/mine.pt

The net is rebuilt from the spec (its architecture, arch_args and len(classes) outputs), the
weights loaded strictly (every key, every shape) and one image of the spec's input shape run
through it, so a spec that does not describe the weights fails here, not in a serving worker. The
checkpoint holds the spec, the state_dict and where they came from; `make archive WEIGHTS=...`
takes it as it takes train.py's. For ``module:Class`` architectures, the module must be importable
(PYTHONPATH, as `make convert EXTRA_FILES=...` sets it).
"""
import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from cifar10_serve import spec as specs
from cifar10_serve.net import build_net

# Prefixes that wrappers put before every key (DataParallel/DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path):
    """A state_dict from ``path``: a bare one, or the "state_dict"/"model" entry of a training
    checkpoint, loaded the safe way (weights_only); wrapper prefixes dropped."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not (isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise ValueError(f"{path} holds no state_dict (a mapping of names to tensors)")
    for prefix in WRAPPER_PREFIXES:
        if loaded and all(k.startswith(prefix) for k in loaded):
            loaded = {k[len(prefix):]: v for k, v in loaded.items()}
    return loaded


def torchvision_state_dict(name):
    """torchvision's pretrained weights by their enum name (e.g. ResNet18_Weights.IMAGENET1K_V1);
    downloaded by torchvision into its cache on first use."""
    import torchvision.models  # noqa: PLC0415

    return torchvision.models.get_weight(name).get_state_dict(progress=False)


@torch.inference_mode()
def convert(spec, state_dict, source=""):
    """The checkpoint for ``spec`` and ``state_dict``; ValueError where they do not fit."""
    try:
        net = build_net(spec, state_dict).eval()
    except RuntimeError as err:  # load_state_dict's missing/unexpected keys or shapes
        raise ValueError(f"the weights do not fit the spec's architecture "
                         f"{spec.architecture} with {len(spec.classes)} classes: "
                         f"{str(err)[:1000]}") from err
    logits = net(torch.zeros(1, *spec.input_shape))
    if tuple(logits.shape) != (1, len(spec.classes)):
        raise ValueError(f"the net answers an input of {spec.input_shape} with shape "
                         f"{tuple(logits.shape)}, not (1, {len(spec.classes)}): check the spec's "
                         f"image_size, channels and classes")
    return dict(spec=spec.to_dict(), state_dict={k: v.detach().clone().contiguous()
                                                 for k, v in net.state_dict().items()},
                classes=list(spec.classes),  # a copy the spec overrides; proxy.py reads it
                converted_from=source, command=shlex.join(["python", "convert.py"] + sys.argv[1:]),
                versions=dict(torch=str(torch.__version__), python=platform.python_version()),
                finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("spec", type=Path, help="the model spec, a JSON file")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--state-dict", type=Path,
                         help="a saved state_dict (or a checkpoint holding one)")
    weights.add_argument("--torchvision-weights",
                         help="torchvision's pretrained weights by name, e.g. "
                              "ResNet18_Weights.IMAGENET1K_V1")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write")
    args = p.parse_args(argv)
    try:
        spec = specs.load(args.spec)
        if args.state_dict:
            state_dict, source = read_state_dict(args.state_dict), str(args.state_dict)
        else:
            state_dict = torchvision_state_dict(args.torchvision_weights)
            source = f"torchvision {args.torchvision_weights}"
        checkpoint = convert(spec, state_dict, source)
    except (ValueError, OSError) as err:
        sys.exit(f"convert.py: {err}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, args.out)
    print(f"wrote {args.out}: model {spec.name}, {spec.architecture}, input "
          f"{list(spec.input_shape)}, {len(spec.classes)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
