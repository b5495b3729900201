"""The CIFAR-10 network and the one preprocessing path it is trained and served with.

train.py imports this module and torch-model-archiver ships it in the .mar (``--model-file``), so
training, offline evaluation and the TorchServe handler share one net definition and one transform.
The net follows the shape of airbench94 (Keller Jordan, cifar10-airbench): a frozen 2x2 whitening
conv, three conv groups with BatchNorm, max-pooling, and a bias-free linear head whose logits are
scaled down by ``scaling``.

Run it to print the default net's parameter count and FLOPs per image:
    python handler/cifar10_net.py
"""
import io
import platform
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.nn import functional as F

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SIZE = 32
# The image formats served and trained on (PIL format names). A closed list: PIL reads dozens more
# (DDS, BLP, SPIDER, ...), rarely used for photos and a larger surface for hostile files.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG includes MPO
# Refuse images whose header claims more pixels than this, before any pixel is decoded. A 32x32
# classifier needs photos, not posters: 4096x4096 (16.8 M px) admits a 12 M px phone photo.
MAX_IMAGE_PIXELS = 4096 * 4096
# A progressive JPEG decodes every scan at full size (draft mode cannot skip them): libjpeg writes
# 10 scans, optimisers ~20. Thousands of near-empty scans are a decode-time bomb, refused unread.
MAX_JPEG_SCANS = 64
JPEG_SOS = b"\xff\xda"  # start-of-scan marker; entropy-coded data never holds it (0xFF is stuffed)


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


def build_net(checkpoint):
    """The net a train.py checkpoint describes (its model_args), with its trained weights."""
    net = Cifar10Net(**checkpoint["model_args"])
    net.load_state_dict(checkpoint["state_dict"])
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
    """Set the whitening conv from the 2x2 patch covariance of normalised ``images`` (N, 3, H, W)."""
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

    The views go through the net as one batch (one call is ~15 % cheaper than one per view on a
    CPU) and their logits are averaged: mirror pairs equally, shifted views at half the weight.
    """
    if tta == 0:
        return net(x)
    views, weights = [x, x.flip(-1)], [0.5, 0.5]
    if tta == 2:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        for shifted in (padded[..., :-2, :-2], padded[..., 2:, 2:]):
            views += [shifted, shifted.flip(-1)]
        weights = [0.25, 0.25] + [0.125] * 4
    logits = net(torch.cat(views).contiguous(memory_format=torch.channels_last))
    return sum(w * part for w, part in zip(weights, logits.view(len(views), len(x), -1)))


def cpu_has_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX), which make a bf16
    forward ~1.6-1.8x faster than fp32 for this net; without them bf16 is emulated and slower."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags(cpuinfo)))


# The CPU flags that decide which kernels PyTorch and ONNX Runtime run for this net: what a
# benchmark or a start-up log names beside its numbers.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                "amx_int8")


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The KERNEL_FLAGS this CPU has (/proc/cpuinfo; none where it cannot be read)."""
    flags = set((_cpuinfo_field("flags", cpuinfo) or "").split())
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name (/proc/cpuinfo), or the machine type where it cannot be read."""
    return _cpuinfo_field("model name", cpuinfo) or platform.machine()


def _cpuinfo_field(name, cpuinfo):
    """The first CPU's ``name`` line of /proc/cpuinfo, or None."""
    try:
        match = re.search(rf"^{name}\s*:(.*)$", Path(cpuinfo).read_text(), re.M)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def open_image(data, max_pixels=MAX_IMAGE_PIXELS):
    """Bytes -> a PIL image whose header passed the checks, no pixel decoded yet. Raises
    ValueError fit for the client when the bytes are no accepted image or would cost too much
    to decode."""
    too_large = f"at most {max_pixels:,} pixels are accepted: resize it first"
    with warnings.catch_warnings():  # PIL's DecompressionBombWarning: our own cap is lower
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as err:  # PIL's own guard, for the largest headers
            raise ValueError(f"the image is too large ({err}); {too_large}") from err
        except UnidentifiedImageError as err:
            raise ValueError(f"cannot decode the image: the bytes are no image in an accepted "
                             f"format ({', '.join(IMAGE_FORMATS)})") from err
        except Exception as err:  # noqa: BLE001  (any plugin error on hostile bytes is theirs)
            raise ValueError(f"cannot decode the image: {_describe(err)}") from err
    width, height = image.size
    if width * height > max_pixels:  # checked on the header, before any pixel is decoded
        raise ValueError(f"the image is {width}x{height} pixels; {too_large}")
    if image.format == "TIFF":
        _check_tiff_layout(image, len(data))
    if image.format in ("JPEG", "MPO"):
        scans = data.count(JPEG_SOS)
        if scans > MAX_JPEG_SCANS:
            raise ValueError(f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted "
                             f"(re-save it as a baseline or ordinary progressive JPEG)")
    return image


def _check_tiff_layout(image, size):
    """Refuse a TIFF whose strips or tiles add up to more bytes than the file holds: they overlap,
    so libtiff would decompress the same bytes again and again, in one C call no deadline can
    interrupt (3,000 one-row strips sharing a 1 MB blob took 7 s, 40,000 over 30 s)."""
    for tag in (279, 325):  # StripByteCounts, TileByteCounts
        counts = image.tag_v2.get(tag)
        if counts is None:
            continue
        total = sum(counts) if isinstance(counts, (tuple, list)) else int(counts)
        if total > size:
            raise ValueError(f"cannot decode the image: its TIFF strips or tiles hold {total:,} "
                             f"bytes but the file has {size:,}: they overlap; re-save it with an "
                             f"ordinary encoder")


def image_pixels(image):
    """The pixels an opened image's header claims: what decoding it costs. JPEGs too: draft
    mode shrinks their output, but every coefficient of every scan is still decoded."""
    width, height = image.size
    return width * height


def to_rgb32(image):
    """An opened image -> 32x32 RGB PIL image, as training and serving see it.

    Honours EXIF orientation, takes the first frame of animations, scales 16-bit greyscale to
    8 bits and squashes any aspect ratio to 32x32. Raises ValueError for the client when the
    pixel data is corrupt.
    """
    try:
        if image.format in ("JPEG", "MPO"):
            image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # decode straight at a reduced scale
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            array = np.asarray(image, dtype=np.float64)
            image = Image.fromarray((array * 255 / max(array.max(), 1)).astype(np.uint8))
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001  (PIL's plugins raise many types on corrupt data)
        raise ValueError(f"cannot decode the image: {_describe(err)}") from err
    return image


def decode_image(data):
    """Bytes of an accepted image -> 32x32 RGB PIL image (``open_image`` then ``to_rgb32``)."""
    return to_rgb32(open_image(data))


def _describe(err):
    """A decoder error for the client: its message, or its type where it has none; bounded."""
    text = str(err) or type(err).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def image_tensor(image):
    """A decoded 32x32 RGB PIL image -> uint8 tensor (3, 32, 32)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def eval_transform(mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """The one eval transform: uint8 (N, 3, 32, 32) -> normalised float32, for training and serving
    (serving passes the checkpoint's own ``normalization``).

    Plain tensor arithmetic over the whole batch: the worker never imports torchvision (seconds
    of cold start) and normalises once per batch, not once per image.
    """
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def transform(batch):
        return (batch.to(torch.float32) / 255 - mean.to(batch.device)) / std.to(batch.device)
    return transform


def count_flops(net):
    """FLOPs (2 x multiply-adds) of one forward pass on one image."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net.eval()(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    return counter.get_total_flops()


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Size and cost of the net.")
    parser.add_argument("--widths", type=int, nargs=3, default=list(DEFAULT_WIDTHS),
                        help="channels of the three conv groups, as train.py --widths "
                             "(default: %(default)s; the shipped net: 128 384 384)")
    net = Cifar10Net(widths=parser.parse_args().widths)
    params = sum(p.numel() for p in net.parameters())
    print(f"Cifar10Net: {params:,} parameters, {count_flops(net) / 1e6:.1f} MFLOPs per image")
