"""Where a request's bytes become a tensor: image headers checked against the limits before any
pixel is decoded, images decoded to the model spec's input as training saw them, and the one eval
transform that training, evaluation and serving share.
"""
import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar10_serve.deadline import deadline
from cifar10_serve.errors import bad_request
from cifar10_serve.settings import MAX_IMAGE_PIXELS
from cifar10_serve.spec import CIFAR10

# The image formats served and trained on (PIL format names). A closed list: PIL reads dozens more
# (DDS, BLP, SPIDER, ...), rarely used for photos and a larger surface for hostile files.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG includes MPO
# A progressive JPEG decodes every scan at full size (draft mode cannot skip them): libjpeg writes
# 10 scans, optimisers ~20. Thousands of near-empty scans are a decode-time bomb, refused unread.
MAX_JPEG_SCANS = 64
JPEG_SOS = b"\xff\xda"  # start-of-scan marker; entropy-coded data never holds it (0xFF is stuffed)


def open_image(data, max_pixels=MAX_IMAGE_PIXELS):
    """Bytes -> a PIL image whose header passed the checks; ValueError for the client."""
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
        scans = jpeg_scans(data)
        if scans > MAX_JPEG_SCANS:
            raise ValueError(f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted "
                             f"(re-save it as a baseline or ordinary progressive JPEG)")
    return image


def jpeg_scans(data, most_segments=256):
    """Start-of-scan markers from the first scan on: the header segments are stepped over by their
    lengths, so FF DA inside a comment does not count (past ``most_segments``, everything counts).
    """
    position = 2
    for _ in range(most_segments):
        if position + 4 > len(data) or data[position] != 0xFF:
            break
        if data[position + 1] == 0xDA:
            break
        if data[position + 1] == 0xFF:  # a fill byte before a marker
            position += 1
            continue
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return data.count(JPEG_SOS, position)


def _check_tiff_layout(image, size):
    """Strips or tiles adding up to more bytes than the file overlap: libtiff would decompress the
    same bytes again and again in one C call no deadline interrupts (40,000 strips: over 30 s)."""
    for tag in (279, 325):  # StripByteCounts, TileByteCounts
        counts = image.tag_v2.get(tag)
        if counts is None:
            continue
        total = sum(counts) if isinstance(counts, (tuple, list)) else int(counts)
        if total > size:
            raise ValueError(f"cannot decode the image: its TIFF strips or tiles hold {total:,} "
                             f"bytes but the file has {size:,}: they overlap; re-save it with an "
                             f"ordinary encoder")


def fit_image(image, spec):
    """An opened image -> the PIL image the model takes, as training saw it: EXIF orientation, first
    frame, 16-bit scaled to 8, ``spec.mode``; "squash" resizes to image_size whatever the aspect,
    "crop" is torchvision's Resize(resize_to) + CenterCrop. ValueError for corrupt pixel data."""
    try:
        if image.format in ("JPEG", "MPO"):  # decode straight at a reduced scale
            image.draft(spec.mode, _resized(image.size, spec))
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            array = np.asarray(image, dtype=np.float64)
            image = Image.fromarray((array * 255 / max(array.max(), 1)).astype(np.uint8))
        image = image.convert(spec.mode)
        size = _resized(image.size, spec)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        if size != (spec.width, spec.height):  # crop: the centre, rounded as torchvision does
            left, top = round((size[0] - spec.width) / 2), round((size[1] - spec.height) / 2)
            image = image.crop((left, top, left + spec.width, top + spec.height))
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001  (PIL's plugins raise many types on corrupt data)
        raise ValueError(f"cannot decode the image: {_describe(err)}") from err
    return image


def _resized(size, spec):
    if spec.resize == "squash":
        return spec.width, spec.height
    width, height = size
    short, long = sorted((width, height))
    long = int(spec.resize_to * long / short)  # torchvision's Resize(int): truncated
    return (spec.resize_to, long) if width <= height else (long, spec.resize_to)


def decode_image(data, spec=CIFAR10):
    return fit_image(open_image(data), spec)


def _describe(err):
    text = str(err) or type(err).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def image_tensor(image):
    """A ``fit_image`` image -> uint8 tensor (channels, height, width)."""
    pixels = np.array(image, dtype=np.uint8)
    if pixels.ndim == 2:  # mode L
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1)


def eval_transform(spec=CIFAR10):
    """uint8 (N, C, H, W) -> float32 normalised by the spec's mean and std: plain tensor arithmetic
    once per batch, so the worker never imports torchvision (seconds of cold start)."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)

    def transform(batch):
        return (batch.to(torch.float32) / 255 - mean.to(batch.device)) / std.to(batch.device)
    return transform


# The first bytes of every accepted format (TIFF in both byte orders; WebP: RIFF....WEBP).
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
              b"MM\x00*", b"RIFF")


def looks_like_image(data):
    """A cheap sniff of an accepted file's framing. A BMP's "BM" must come with its own length and a
    JPEG with its end marker, so that text starting "Qk1" or "/9j/" (their base64) is not taken."""
    if data.startswith(b"BM"):
        return len(data) >= 6 and int.from_bytes(data[2:6], "little") == len(data)
    if data.startswith(b"\xff\xd8\xff"):
        return b"\xff\xd9" in data[-32:]
    return data.startswith(SIGNATURES) and (not data.startswith(b"RIFF") or data[8:12] == b"WEBP")


def decode_request(images, limits, spec):
    """Encoded images -> uint8 tensors of ``spec.input_shape`` within the pixel limits and the
    decoding deadline (CPU time); every header is opened first, so an over-budget request decodes
    nothing. v2 UINT8 pixels (already tensors) pass through. Failures are the request's 4xx."""
    milliseconds = limits["max_decode_ms"]
    try:
        with deadline(milliseconds):
            return _decode_within_budget(images, limits, spec)
    except TimeoutError:
        raise bad_request(f"decoding the request's images took more than {milliseconds} ms of "
                          f"CPU time; send images re-saved by a common encoder, or fewer per "
                          f"request", 413) from None


def _decode_within_budget(images, limits, spec):
    budget, opened = limits["max_request_pixels"], []
    wheres = [f"image {i}: " if len(images) > 1 else "" for i in range(len(images))]
    for where, image in zip(wheres, images):
        if isinstance(image, torch.Tensor):
            opened.append(image)
            continue
        opened.append(_checked(open_image, where, image, limits["max_image_pixels"]))
        budget -= math.prod(opened[-1].size)  # JPEGs too: draft mode still decodes every scan
        if budget < 0:
            raise bad_request(f"{where}the request's images decode to more than "
                              f"{limits['max_request_pixels']:,} pixels; send fewer or smaller "
                              f"images per request", 413)
    return [image if isinstance(image, torch.Tensor)
            else image_tensor(_checked(fit_image, where, image, spec))
            for where, image in zip(wheres, opened)]


def _checked(step, where, *args):
    """A decoding step; its ValueError is the client's 400, prefixed with ``where``."""
    try:
        return step(*args)
    except ValueError as err:
        raise bad_request(f"{where}{err}") from err
