"""The nets: the CIFAR-10 network train.py trains (airbench94's shape: a frozen 2x2 whitening conv,
three conv groups with BatchNorm, max-pooling, a bias-free scaled linear head), the architecture
registry that rebuilds any spec's net, and test-time augmentation. The one net definition that
training, export, conversion and the handler use.

A spec's ``architecture``: "airbench" (the net below), a torchvision classifier's name (or
"torchvision:NAME"), or "module:Class" from a module shipped in the archive beside the handler;
each called with ``num_classes=len(spec.classes)`` and the spec's ``arch_args``.
"""
import importlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from cifar10_serve import spec as specs
from cifar10_serve.spec import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD  # noqa: F401

IMAGE_SIZE = 32  # the CIFAR-10 net's input side (bench/net_size.py); serving reads the spec
DEFAULT_WIDTHS = (64, 256, 256)  # airbench94's conv groups; the shipped net is 128, 384, 384


class Cifar10Net(nn.Module):
    """airbench94-shaped CIFAR-10 classifier; input is a normalised float batch (N, 3, 32, 32)."""

    def __init__(self, widths=DEFAULT_WIDTHS, num_classes=10, batchnorm_momentum=0.6,
                 scaling=1 / 9):
        super().__init__()
        whiten_width = 2 * 3 * 2 * 2  # +/- each eigenvector of the 3x2x2 patch covariance
        self.scaling = scaling
        self.whiten = nn.Conv2d(3, whiten_width, kernel_size=2, padding=0)
        self.whiten.weight.requires_grad_(False)  # set from the data by init_whitening()
        groups, cin = [], whiten_width
        for width in widths:
            groups.append(_conv_group(cin, width, batchnorm_momentum))
            cin = width
        self.features = nn.Sequential(nn.GELU(), *groups, nn.MaxPool2d(3), nn.Flatten())
        self.head = nn.Linear(cin, num_classes, bias=False)

    def forward(self, x):
        return self.head(self.features(self.whiten(x))) * self.scaling


ARCHITECTURES = {"airbench": Cifar10Net}


def architecture(name):
    """The factory ``name`` stands for (torchvision imported only here, so a worker serving the
    CIFAR net never imports it); ValueError naming the forms where there is none."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    module, _, attribute = name.rpartition(":")
    if module in ("", "torchvision"):
        import torchvision.models  # noqa: PLC0415

        if attribute.lower() not in torchvision.models.list_models():
            raise ValueError(f"model spec: unknown architecture {name!r}: one of "
                             f"{sorted(ARCHITECTURES)}, a torchvision classifier's name "
                             f"(torchvision.models.list_models()), or module:Class for an "
                             f"nn.Module of your own shipped in the archive")
        return lambda **args: torchvision.models.get_model(attribute.lower(), **args)
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model spec: architecture {name!r}: cannot import {attribute} from "
                         f"{module} ({err}); ship {module}.py in the archive (make archive "
                         f"EXTRA_FILES=...) or put it on PYTHONPATH") from err
    if not callable(found):
        raise ValueError(f"model spec: architecture {name!r} is no nn.Module class")
    return found


def build_net(spec, state_dict=None):
    """The net ``spec`` describes, ``state_dict`` loaded strictly where given; a checkpoint dict in
    place of the spec is read as (its spec, its state_dict)."""
    if isinstance(spec, dict):
        spec, state_dict = specs.from_checkpoint(spec), spec["state_dict"]
    net = architecture(spec.architecture)(num_classes=len(spec.classes), **spec.arch_args)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return net


def _conv_group(cin, cout, batchnorm_momentum):
    layers = []
    for i, c in enumerate((cin, cout)):
        conv = nn.Conv2d(c, cout, kernel_size=3, padding="same", bias=False)
        # Identity-initialise the first in-channels: each group starts close to a pass-through.
        nn.init.dirac_(conv.weight.data[:c])
        # BatchNorm as in airbench: tiny eps, a fast running average, and a frozen unit scale
        # (only the bias is trained, at its own learning rate).
        norm = nn.BatchNorm2d(cout, eps=1e-12, momentum=1 - batchnorm_momentum)
        norm.weight.requires_grad_(False)
        layers += [conv] + ([nn.MaxPool2d(2)] if i == 0 else []) + [norm, nn.GELU()]
    return nn.Sequential(*layers)


def init_whitening(net, images, eps=5e-4):
    """Set the whitening conv from the 2x2 patch covariance of normalised ``images``."""
    c, h, w = net.whiten.weight.shape[1:]
    patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
    patches = patches.double()
    covariance = (patches.T @ patches) / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    scaled = (eigenvectors / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, h, w)
    net.whiten.weight.data[:] = torch.cat((scaled, -scaled)).to(net.whiten.weight.dtype)


def predict_logits(net, x, tta=0):
    """Logits for a normalised batch; ``tta`` 0: plain, 1: + mirror, 2: + mirror and 1-px shifts.
    The views go through the net as one batch (~15 % cheaper on a CPU); mirror pairs weigh alike,
    shifted views half."""
    if tta == 0:
        return net(x)
    views, weights = tta_views(x, tta)
    logits = net(torch.cat(views).contiguous(memory_format=torch.channels_last))
    return sum(w * part for w, part in zip(weights, logits.view(len(views), len(x), -1)))


def gated_logits(net, x, tta, margin):
    """(logits, images that took the second look): the plain view first, the other views only for
    images whose top-1 leads by less than ``margin`` (1: every image; 0: none)."""
    if tta == 0 or margin <= 0:
        return net(x), 0
    if margin >= 1:
        return predict_logits(net, x, tta), len(x)
    first = net(x)
    top2 = first.float().softmax(1).topk(2, dim=1).values
    unsure = (top2[:, 0] - top2[:, 1] < margin).nonzero().flatten()
    if not len(unsure):
        return first, 0
    views, weights = tta_views(x[unsure], tta)
    extra = net(torch.cat(views[1:]).contiguous(memory_format=torch.channels_last))
    looked = weights[0] * first[unsure] + sum(
        w * part for w, part in zip(weights[1:], extra.view(len(views) - 1, len(unsure), -1)))
    return first.index_copy(0, unsure, looked.to(first.dtype)), len(unsure)


def tta_views(x, tta):
    """(views of the batch, their weights): the batch itself first."""
    views, weights = [x, x.flip(-1)], [0.5, 0.5]
    if tta == 2:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        for shifted in (padded[..., :-2, :-2], padded[..., 2:, 2:]):
            views += [shifted, shifted.flip(-1)]
        weights = [0.25, 0.25] + [0.125] * 4
    return views, weights


def load_checkpoint(path):
    """torch.load the safe way (weights_only); RuntimeError naming a bad file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # say which file; torch's own advice (weights_only=False) is unsafe
        raise RuntimeError(f"cannot load the weights {path}: not a checkpoint written by "
                           f"train.py or convert.py ({type(err).__name__}: "
                           f"{str(err)[:200]})") from err


def class_names(model_dir, trained_classes):
    """index_to_name.json's labels where the archive has one: they must be the trained classes, in
    order (a file from another data set would relabel every answer)."""
    path = Path(model_dir) / "index_to_name.json"
    if not path.exists():
        return list(trained_classes)
    mapping = json.loads(path.read_text())
    names = [mapping.get(str(i)) for i in range(len(mapping))]
    if names != list(trained_classes):
        raise ValueError(f"index_to_name.json names the classes {names}, but the weights "
                         f"were trained on {list(trained_classes)}")
    return names
