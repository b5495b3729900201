"""The handler's `runtime: onnx` forward (ONNX Runtime on the archive's cifar10.onnx): it answers as
the torch net does, and a missing, stale or unknown runtime file fails the worker's start loudly."""
import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, ROOT, handle

from cifar10_net import build_net, onnx_forward, onnx_mismatch

IMAGES = [{"body": (FIXTURES / f"{name}.jpg").read_bytes()}
          for name in ("airplane", "cat", "dog", "ship", "truck")]


@pytest.mark.parametrize("tta", [0, 1, 2])
def test_onnx_answers_equal_the_torch_net(make_handler, tiny_checkpoint, tta):
    torch_answers, _ = handle(make_handler(tiny_checkpoint, tta=tta), IMAGES)
    onnx_handler = make_handler(tiny_checkpoint, tta=tta, runtime="onnx")
    onnx_answers, _ = handle(onnx_handler, IMAGES)
    assert onnx_handler.runtime == "onnx"
    for expected, got in zip(torch_answers, onnx_answers):
        assert list(got) == list(expected)  # the same top-5 classes in the same order
        assert list(got.values()) == pytest.approx(list(expected.values()), abs=1e-5)


def test_shipped_weights_onnx_logits_match_eager(tmp_path):
    """export_onnx.py on the shipped weights: ONNX Runtime's logits equal eager PyTorch's."""
    out = tmp_path / "cifar10.onnx"
    subprocess.run([sys.executable, ROOT / "export_onnx.py", ROOT / "weights" / "cifar10.pt", out],
                   check=True)
    net = build_net(torch.load(ROOT / "weights" / "cifar10.pt", weights_only=True))
    assert onnx_mismatch(net, onnx_forward(out), n=32) < 1e-4


def test_export_refuses_to_write_beyond_its_tolerance(tiny_checkpoint, tmp_path):
    out = tmp_path / "cifar10.onnx"
    result = subprocess.run([sys.executable, ROOT / "export_onnx.py", tiny_checkpoint, out,
                             "--tolerance", "-1"], capture_output=True, text=True)
    assert result.returncode != 0 and "nothing written" in result.stderr
    assert not out.exists() and not out.with_suffix(".tmp").exists()


def test_missing_onnx_file_fails_loudly(make_handler, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr("conftest.export_onnx", lambda net, path: None)  # the .mar lacks it
    with pytest.raises(FileNotFoundError, match="make archive"):
        make_handler(tiny_checkpoint, runtime="onnx")


def test_without_onnxruntime_the_torch_net_answers(make_handler, tiny_checkpoint, monkeypatch):
    """A stock TorchServe image lacks onnxruntime: the worker still starts, on the torch net."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    handler = make_handler(tiny_checkpoint, runtime="onnx")
    assert handler.runtime == "torch" and handler.forward is handler.model
    _, statuses = handle(handler, IMAGES)
    assert {code for code, _ in statuses} == {200}


def test_onnx_file_of_other_weights_fails_loudly(make_handler, tiny_checkpoint,
                                                 constant_checkpoint):
    with pytest.raises(RuntimeError, match="does not hold these weights"):
        make_handler(tiny_checkpoint, runtime="onnx", onnx_from=constant_checkpoint)


def test_unknown_runtime_fails_loudly(make_handler, tiny_checkpoint):
    with pytest.raises(ValueError, match="must be torch or onnx"):
        make_handler(tiny_checkpoint, runtime="tensorrt")


def test_gpu_worker_runs_the_torch_net(make_handler, tiny_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    handler = make_handler(tiny_checkpoint, gpu_id=0, runtime="onnx")
    assert handler.runtime == "torch" and handler.forward is handler.model
