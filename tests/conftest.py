"""Shared fixtures: a tiny model trained by train.py, handlers on a real ts Context, test images."""
import io
import json
import shutil
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.metrics.metrics_store import MetricsStore

import train
from cifar10_handler import Cifar10Handler
import export_onnx as export_script
from cifar10_serve.net import CIFAR10_CLASSES
from cifar10_serve.runtimes import GOLDEN_FILE, INT8_FILE, ONNX_FILE

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_ARGS = ["--epochs", "1", "--batch-size", "16", "--widths", "8", "16", "16",
             "--val-size", "20", "--tta", "0", "--seed", "0", "--cache-dir", ""]


def image_bytes(mode="RGB", size=(32, 32), fmt="PNG", seed=0, **save_args):
    """A deterministic random image of the given mode and size, encoded."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    rgb.convert(mode).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def make_image_folder(root, per_class=4, classes=CIFAR10_CLASSES):
    """An ImageFolder of tiny random PNGs, per_class images per class."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(image_bytes(seed=100 * label + i))
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint written by train.py itself: tiny widths, one epoch on 40 random images."""
    tmp = tmp_path_factory.mktemp("tiny")
    data = make_image_folder(tmp / "data")
    out = tmp / "tiny.pt"
    train.train(train.parse_args(["--data-dir", str(data), "--out", str(out)] + TINY_ARGS))
    return out


@pytest.fixture(scope="session")
def constant_checkpoint(tiny_checkpoint, tmp_path_factory):
    """A fixed-weight net whose logits are k * 16 * GELU(1) / 9 for class k, whatever the image.

    Every weight is zero except the last BatchNorm's bias (1.0) and the head (row k filled
    with k): each of the 16 features is GELU(1), so the answer is exact and known.
    """
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    state = {k: torch.zeros_like(v) if v.is_floating_point() else v
             for k, v in checkpoint["state_dict"].items()}
    for key in state:
        if key.endswith("running_var") or (key.endswith("weight") and state[key].dim() == 1):
            state[key] = torch.ones_like(state[key])  # BatchNorm: unit scale and variance
    last_norm_bias = [k for k in state if k.endswith(".bias") and state[k].dim() == 1][-1]
    state[last_norm_bias] = torch.ones_like(state[last_norm_bias])
    state["head.weight"] = torch.arange(10.0)[:, None].expand_as(state["head.weight"]).clone()
    out = tmp_path_factory.mktemp("constant") / "constant.pt"
    torch.save({**checkpoint, "state_dict": state}, out)
    return out


@pytest.fixture(scope="session")
def colour_checkpoint(tiny_checkpoint, tmp_path_factory):
    """A fixed-weight net whose answer is a fixed linear map of each colour channel's level, so
    different images get clearly different answers (crossed, reordered or dropped answers show).

    The whitening conv averages each colour channel over its 2x2 patch (plus 3, to stay where GELU
    is nearly the identity), every conv passes channels 0-2 through (a centred 1 on the diagonal),
    BatchNorm is the identity, and the head maps the three channels to ten logits by a fixed
    matrix. For a solid-colour image the features are a monotone function of its colour; for any
    image, of each channel's maximum (the net max-pools).
    """
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    state = {k: torch.zeros_like(v) if v.is_floating_point() else v
             for k, v in checkpoint["state_dict"].items()}
    for key, value in state.items():
        if key.endswith("running_var") or (key.endswith("weight") and value.dim() == 1):
            state[key] = torch.ones_like(value)  # BatchNorm: the identity
        elif key.endswith("weight") and value.dim() == 4:
            centre = (value.shape[2] // 2, value.shape[3] // 2) if value.shape[2] == 3 else None
            for c in range(3):
                if centre:
                    value[c, c, centre[0], centre[1]] = 1.0
                else:
                    value[c, c] = 0.25  # the 2x2 whitening conv: the patch mean
    state["whiten.bias"][:3] = 3.0
    mix = torch.tensor(np.random.default_rng(7).integers(-9, 10, (10, 3)), dtype=torch.float32)
    state["head.weight"][:, :3] = 3 * mix
    out = tmp_path_factory.mktemp("colour") / "colour.pt"
    torch.save({**checkpoint, "state_dict": state}, out)
    return out


def solid_png(rgb, size=(32, 32)):
    """A one-colour PNG: the colour net answers each colour differently."""
    buffer = io.BytesIO()
    Image.new("RGB", size, tuple(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


# Ten colours whose answers from the colour net differ clearly (tests check that they do).
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (40, 40, 40), (230, 230, 230), (128, 64, 0), (0, 128, 192)]


def make_context(model_dir, gpu_id=None, config=None):
    return Context("cifar10", str(model_dir), {"model": {"serializedFile": "weights.pt"}},
                   batch_size=16, gpu=gpu_id, mms_version="0.12.0",
                   metrics=MetricsStore(uuid.uuid4(), "cifar10"),
                   model_yaml_config={"handler": config or {}})


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """exports(checkpoint, onnx_from=None) -> a folder holding what `make archive` adds for the
    CPU runtimes: cifar10.onnx and cifar10.int8.onnx of ``onnx_from`` (default: the checkpoint),
    calibrated and checked on the fixtures, and the golden set of the checkpoint itself (the
    fixtures with its fp32 logits). Built once per pair."""
    built = {}

    def build(checkpoint, onnx_from=None):
        key = (str(checkpoint), str(onnx_from))
        if key not in built:
            folder = tmp_path_factory.mktemp("exports")
            common = ["--check-dir", str(FIXTURES), "--golden", str(folder / GOLDEN_FILE)]
            export_script.main([str(onnx_from or checkpoint), str(folder / ONNX_FILE), "--int8",
                                str(folder / INT8_FILE), "--calibration-dir", str(FIXTURES)]
                               + common)
            if onnx_from:  # the golden answers are the served weights' own
                export_script.main([str(checkpoint), str(folder / "own.onnx")] + common)
            built[key] = folder
        return built[key]
    return build


@pytest.fixture
def make_handler(tmp_path, exports):
    """make_handler(checkpoint, gpu_id=None, onnx_from=None, without=(), **handler_config) ->
    an initialised handler. runtime defaults to torch here (no export needed); with any other
    the model directory also gets the exports as the .mar has them (``exports``), less the
    file names in ``without``."""
    def make(checkpoint, gpu_id=None, onnx_from=None, without=(), **config):
        config.setdefault("runtime", "torch")
        model_dir = tmp_path / f"model-{uuid.uuid4().hex[:8]}"
        model_dir.mkdir()
        shutil.copy(checkpoint, model_dir / "weights.pt")
        if config["runtime"] != "torch":
            for name in {ONNX_FILE, INT8_FILE, GOLDEN_FILE} - set(without):
                shutil.copy(exports(checkpoint, onnx_from) / name, model_dir)
        shutil.copy(ROOT / "handler" / "index_to_name.json", model_dir)
        handler = Cifar10Handler()
        handler.initialize(make_context(model_dir, gpu_id, config))
        return handler
    return make


def handle(handler, rows):
    """Run a batch of request rows as TorchServe would: (outputs, [(status, message)] per row)."""
    context = handler.context if handler.context is not None else make_context("unused")
    context.request_processor = [RequestProcessor({}) for _ in rows]
    outputs = handler.handle(rows, context)
    json.dumps(outputs)  # TorchServe serialises every answer as JSON
    statuses = [(p.get_response_status_code(), p.get_response_status_phrase())
                for p in context.request_processor]
    return outputs, statuses


def tiff_of_strips(rows):
    """A valid 1-pixel-wide grey TIFF of ``rows`` rows, one strip per row (every strip the same
    byte): ~4 bytes a row that Pillow parses in Python, a decode-time bomb within the pixel caps."""
    def entry(tag, kind, count, value):
        return struct.pack("<HHII", tag, kind, count, value)
    offsets, counts = 10, 10 + 2 * rows
    ifd = counts + 2 * rows
    entries = [entry(256, 4, 1, 1), entry(257, 4, 1, rows), entry(258, 3, 1, 8),
               entry(259, 3, 1, 1), entry(262, 3, 1, 1), entry(273, 3, rows, offsets),
               entry(277, 3, 1, 1), entry(278, 4, 1, 1), entry(279, 3, rows, counts)]
    return (b"II*\x00" + struct.pack("<I", ifd) + b"\x80\x00" + struct.pack("<H", 8) * rows
            + struct.pack("<H", 1) * rows + struct.pack("<H", len(entries)) + b"".join(entries)
            + b"\x00\x00\x00\x00")


def jpeg_with_markers(count):
    """A 32x32 JPEG with ``count`` empty APP0 segments after its start: parsed one by one."""
    jpeg = image_bytes("RGB", (32, 32), "JPEG")
    return jpeg[:2] + b"\xff\xe0\x00\x02" * count + jpeg[2:]


def tiff_of_shared_strips(rows, blob_bytes, width=32):
    """A deflate TIFF whose ``rows`` one-row strips all point at one zlib stream of
    ``blob_bytes`` (empty stored blocks, then the row): libtiff inflates the stream once per strip,
    in one C call, while the file stays small."""
    row = b"\x40" * width
    stream = b"\x78\x01" + b"\x00\x00\x00\xff\xff" * (blob_bytes // 5) \
        + b"\x01" + struct.pack("<HH", len(row), 0xFFFF ^ len(row)) + row \
        + struct.pack(">I", zlib.adler32(row))
    offsets = 8 + len(stream) + (8 + len(stream)) % 2
    counts, ifd = offsets + 4 * rows, offsets + 8 * rows

    def entry(tag, kind, count, value):
        return struct.pack("<HHII", tag, kind, count, value)
    entries = [entry(256, 4, 1, width), entry(257, 4, 1, rows), entry(258, 3, 1, 8),
               entry(259, 3, 1, 8), entry(262, 3, 1, 1), entry(273, 4, rows, offsets),
               entry(277, 3, 1, 1), entry(278, 4, 1, 1), entry(279, 4, rows, counts)]
    head = b"II*\x00" + struct.pack("<I", ifd) + stream
    head += b"\x00" * (offsets - len(head))
    return (head + struct.pack("<I", 8) * rows + struct.pack("<I", len(stream)) * rows
            + struct.pack("<H", len(entries)) + b"".join(entries) + b"\x00\x00\x00\x00")
