"""The handler's CPU runtimes. `runtime: onnx` (ONNX Runtime on the archive's cifar10.onnx) answers
as the torch net does, and a missing, stale or unknown runtime file fails the worker's start
loudly. `runtime: bf16` (the default: torch under bf16 autocast) answers within bf16's precision,
is refused when it drifts, and falls back to onnx on a CPU without bf16 units."""
import importlib.util
import logging
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, ROOT, handle

import cifar10_handler
import train
from cifar10_net import (build_net, check_precision, cpu_has_bf16, onnx_forward,
                         onnx_mismatch)

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
    with pytest.raises(ValueError, match="must be one of"):
        make_handler(tiny_checkpoint, runtime="tensorrt")


def test_gpu_worker_runs_the_torch_net(make_handler, tiny_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    handler = make_handler(tiny_checkpoint, gpu_id=0, runtime="onnx")
    assert handler.runtime == "torch" and handler.forward is handler.model


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend the CPU has bf16 units (autocast emulates them where it has not: same answers)."""
    monkeypatch.setattr(cifar10_handler, "cpu_has_bf16", lambda: True)


@pytest.mark.parametrize("tta", [0, 1])
def test_bf16_answers_as_fp32_within_its_precision(make_handler, colour_checkpoint, bf16_cpu,
                                                   tta):
    fp32, _ = handle(make_handler(colour_checkpoint, tta=tta), IMAGES)
    handler = make_handler(colour_checkpoint, tta=tta, runtime="bf16")
    bf16, statuses = handle(handler, IMAGES)
    assert handler.runtime == "bf16" and {code for code, _ in statuses} == {200}
    for expected, got in zip(fp32, bf16):
        assert next(iter(got)) == next(iter(expected))  # the same top-1
        assert max(abs(got[k] - p) for k, p in expected.items() if k in got) < 0.02


def test_bf16_that_drifts_from_fp32_stops_the_worker(make_handler, colour_checkpoint, bf16_cpu,
                                                     monkeypatch):
    monkeypatch.setattr(cifar10_handler, "bf16_forward",
                        lambda net: lambda x: net(x).flip(1))  # a broken low-precision forward
    with pytest.raises(RuntimeError, match="drifts from fp32"):
        make_handler(colour_checkpoint, runtime="bf16")


@pytest.mark.parametrize("runtime,check,units", [
    ("bf16", "cpu_has_bf16", "avx512_bf16 or amx_bf16"),
    ("int8", "cpu_has_vnni", "avx512_vnni, avx_vnni or amx_int8")])
def test_a_cpu_without_the_units_falls_back_to_onnx(make_handler, colour_checkpoint, monkeypatch,
                                                    caplog, runtime, check, units):
    monkeypatch.setattr(cifar10_handler, check, lambda: False)
    with caplog.at_level(logging.WARNING):
        handler = make_handler(colour_checkpoint, runtime=runtime)
    assert handler.runtime == "onnx" and f"no {units}" in caplog.text
    assert {code for code, _ in handle(handler, IMAGES)[1]} == {200}


def test_cpu_bf16_check_reads_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse avx512f avx512_vnni\n")
    assert not cpu_has_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_bf16(cpuinfo)
    assert not cpu_has_bf16(tmp_path / "missing")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_precision_is_chosen_and_recorded(tiny_checkpoint, tmp_path, precision):
    from conftest import TINY_ARGS
    data = tiny_checkpoint.parent / "data"
    out = tmp_path / f"{precision}.pt"
    train.train(train.parse_args(["--data-dir", str(data), "--out", str(out), "--precision",
                                  precision] + TINY_ARGS))
    assert torch.load(out, weights_only=True)["precision"] == precision
    assert train.resolve_precision("auto", torch.device("cpu")) == \
        ("bf16" if cpu_has_bf16() else "fp32")


@pytest.fixture
def vnni_cpu(monkeypatch):
    """Pretend the CPU has VNNI (ONNX Runtime's int8 kernels run either way: same answers)."""
    monkeypatch.setattr(cifar10_handler, "cpu_has_vnni", lambda: True)


def test_int8_answers_as_fp32_within_its_precision(make_handler, colour_checkpoint, vnni_cpu):
    fp32, _ = handle(make_handler(colour_checkpoint, tta=1), IMAGES)
    handler = make_handler(colour_checkpoint, tta=1, runtime="int8")
    int8, statuses = handle(handler, IMAGES)
    assert handler.runtime == "int8" and {code for code, _ in statuses} == {200}
    for expected, got in zip(fp32, int8):
        assert next(iter(got)) == next(iter(expected))  # the same top-1
        assert max(abs(got[k] - p) for k, p in expected.items() if k in got) < 0.1


def test_int8_file_of_other_weights_stops_the_worker(make_handler, colour_checkpoint,
                                                     constant_checkpoint, vnni_cpu):
    with pytest.raises(RuntimeError, match="int8 forward drifts from fp32"):
        make_handler(colour_checkpoint, runtime="int8", onnx_from=constant_checkpoint)


def test_int8_export_is_calibrated_and_checked(colour_checkpoint, tmp_path):
    """export_onnx.py --int8, as `make archive` runs it, on the fixtures as calibration images."""
    out, int8 = tmp_path / "cifar10.onnx", tmp_path / "cifar10.int8.onnx"
    result = subprocess.run([sys.executable, ROOT / "export_onnx.py", colour_checkpoint, out,
                             "--int8", int8, "--calibration-dir", FIXTURES],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "calibrated on 10 images" in result.stdout and int8.exists()
    net = build_net(torch.load(colour_checkpoint, weights_only=True))
    assert check_precision(net, onnx_forward(int8), "int8")[0] >= 0.9
