"""The handler's CPU runtimes (cifar10_serve/runtimes.py) and the exports they run (export_onnx.py).

Every forward is checked at worker start against the archive's golden set and timed: `auto` serves
the fastest that passes; a named runtime is served if it passes, else auto's choice with the
reason logged; only an archive whose golden answers no forward gives (not even the fp32 torch
net's: they belong to other weights) stops the worker. The int8 export's quantization is checked
at build time in fp32 arithmetic, on real held-out images.
"""
import importlib.util
import logging
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import FIXTURES, ROOT, handle, make_context, solid_png

from cifar10_serve import runtimes
import export_onnx as export_script
import train
from cifar10_handler import Cifar10Handler
from cifar10_serve.images import eval_transform
from cifar10_serve.net import build_net
from cifar10_serve.spec import from_checkpoint
from cifar10_serve.forwards import agreement, cpu_flags, cpu_has_bf16, cpu_name, onnx_forward
from cifar10_serve.runtimes import CANDIDATES, GOLDEN_FILE, ONNX_FILE

IMAGES = [{"body": (FIXTURES / f"{name}.jpg").read_bytes()}
          for name in ("airplane", "cat", "dog", "ship", "truck")]


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend the CPU has bf16 units (autocast emulates them where it has not: same answers)."""
    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: True)


def burn(seconds):
    """Use ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def top1(answers):
    return [next(iter(answer)) for answer in answers]


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
    assert export_script.onnx_mismatch(net, onnx_forward(out), (3, 32, 32), n=32) < 1e-4


def test_export_refuses_to_write_beyond_its_tolerance(tiny_checkpoint, tmp_path):
    out = tmp_path / "cifar10.onnx"
    result = subprocess.run([sys.executable, ROOT / "export_onnx.py", tiny_checkpoint, out,
                             "--tolerance", "-1"], capture_output=True, text=True)
    assert result.returncode != 0 and "nothing written" in result.stderr
    assert not out.exists() and not out.with_suffix(".tmp").exists()


def test_a_missing_runtime_file_falls_back_with_its_reason(make_handler, tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        handler = make_handler(tiny_checkpoint, runtime="onnx", without=(ONNX_FILE,))
    assert handler.runtime != "onnx" and "has no cifar10.onnx" in caplog.text
    assert {code for code, _ in handle(handler, IMAGES)[1]} == {200}


def test_without_onnxruntime_the_torch_net_answers(make_handler, tiny_checkpoint, monkeypatch):
    """A stock TorchServe image lacks onnxruntime: the worker still starts, on the torch net."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: False)
    handler = make_handler(tiny_checkpoint, runtime="onnx")
    assert handler.runtime == "torch" and handler.forward is handler.model
    assert "onnxruntime is not installed" in handler.calibration.trials[0].failure
    assert {code for code, _ in handle(handler, IMAGES)[1]} == {200}


@pytest.mark.parametrize("runtime", ["onnx", "int8"])
def test_export_files_of_other_weights_are_not_served(make_handler, colour_checkpoint,
                                                      constant_checkpoint, caplog, runtime):
    """A stale cifar10.onnx or cifar10.int8.onnx fails the golden check: the worker says so and
    serves a forward that gives the weights' own answers."""
    fp32, _ = handle(make_handler(colour_checkpoint), IMAGES)
    with caplog.at_level(logging.WARNING):
        handler = make_handler(colour_checkpoint, runtime=runtime, onnx_from=constant_checkpoint)
    assert handler.runtime in ("bf16", "torch") and "top-1 as fp32 on" in caplog.text
    assert top1(handle(handler, IMAGES)[0]) == top1(fp32)


def test_golden_set_of_other_weights_stops_the_worker(exports, colour_checkpoint,
                                                      constant_checkpoint, tmp_path):
    """When not even the fp32 torch net gives the golden answers, the archive is inconsistent."""
    model_dir = tmp_path / "model"
    shutil.copytree(exports(constant_checkpoint), model_dir)
    shutil.copy(colour_checkpoint, model_dir / "weights.pt")
    with pytest.raises(RuntimeError, match="does not belong to these weights"):
        Cifar10Handler().initialize(make_context(model_dir, config={"runtime": "auto"}))


def test_an_archive_without_its_golden_set_fails_loudly(make_handler, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="make archive"):
        make_handler(tiny_checkpoint, runtime="auto", without=(GOLDEN_FILE,))


def test_unknown_runtime_fails_loudly(make_handler, tiny_checkpoint):
    with pytest.raises(ValueError, match="must be one of"):
        make_handler(tiny_checkpoint, runtime="tensorrt")


def test_gpu_worker_runs_the_torch_net(make_handler, tiny_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    handler = make_handler(tiny_checkpoint, gpu_id=0, runtime="onnx")
    assert handler.runtime == "torch" and handler.forward is handler.model


@pytest.mark.parametrize("slow,broken,expected", [
    ({"int8", "bf16", "torch"}, set(), "onnx"),
    ({"bf16", "onnx", "torch"}, set(), "int8"),
    ({"bf16", "onnx"}, {"int8"}, "torch"),
    (set(), set(), ("onnx", "torch")),
], ids=["onnx-fastest", "int8-fastest", "fastest-is-wrong", "near-tie-goes-to-precision"])
def test_auto_serves_the_fastest_forward_that_gives_the_golden_answers(
        make_handler, colour_checkpoint, bf16_cpu, monkeypatch, caplog, slow, broken, expected):
    """Candidates made slow (50 ms of CPU time a call: calibration counts the worker thread's
    CPU time, which a pause would not use) or wrong (logits reversed) on purpose: the worker
    times the ones that pass and serves the fastest; a wrong one is never served."""
    real = runtimes.candidate

    def candidate(name, *args):
        forward = real(name, *args)

        def changed(x):
            if name in slow:
                burn(0.05)
            elif expected == ("onnx", "torch"):  # every forward about as fast: a near-tie
                burn(0.045 if name in ("int8", "bf16") else 0.05)
            return forward(x).flip(1) if name in broken else forward(x)
        return changed
    monkeypatch.setattr(runtimes, "candidate", candidate)
    fp32, _ = handle(make_handler(colour_checkpoint, tta=1), IMAGES)
    with caplog.at_level(logging.INFO):
        handler = make_handler(colour_checkpoint, runtime="auto", tta=1)
    assert handler.runtime in expected if isinstance(expected, tuple) else \
        handler.runtime == expected
    trials = {t.name: t for t in handler.calibration.trials}
    assert list(trials) == list(CANDIDATES)
    assert all((trials[n].failure is not None) == (n in broken) for n in CANDIDATES)
    assert all(trials[n].ms_per_image for n in CANDIDATES if n not in broken)
    assert f"runtime auto -> {handler.runtime}" in caplog.text and cpu_name() in caplog.text
    assert top1(handle(handler, IMAGES)[0]) == top1(fp32)
    assert handler.describe_handle()["runtime"] == handler.runtime


def test_the_workers_of_one_model_serve_one_forward(tmp_path):
    """The first worker records its choice in the model directory the workers share; a second
    one serves it too, even where its own timings would pick another (two forwards that time
    alike made two workers answer differently), unless it fails that worker's check."""
    first, second = runtimes.Trial("bf16", ms_per_image=1.0), runtimes.Trial("torch",
                                                                             ms_per_image=0.9)
    assert runtimes.agreed(tmp_path, first, [first, second]) is first
    assert runtimes.agreed(tmp_path, second, [first, second]) is first
    assert runtimes.agreed(tmp_path, second, [second]) is second
    assert [p.name for p in tmp_path.iterdir()] == [runtimes.CHOICE_FILE]


def test_a_named_runtime_is_served_when_it_passes(make_handler, colour_checkpoint, monkeypatch):
    """A named runtime is served if it gives the golden answers (and so does the torch net, the
    reference), whatever the others would do."""
    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: False)
    handler = make_handler(colour_checkpoint, runtime="onnx")
    assert handler.runtime == "onnx" and [t.name for t in handler.calibration.trials] == ["onnx", "torch"]


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


def test_bf16_that_drifts_from_fp32_is_not_served(make_handler, colour_checkpoint, bf16_cpu,
                                                  monkeypatch, caplog):
    monkeypatch.setattr(runtimes, "bf16_forward",
                        lambda net: lambda x: net(x).flip(1))  # a broken low-precision forward
    with caplog.at_level(logging.WARNING):
        handler = make_handler(colour_checkpoint, runtime="bf16")
    assert handler.runtime != "bf16" and "handler.runtime bf16 cannot serve" in caplog.text


def test_bf16_on_a_cpu_without_its_units_falls_back(make_handler, colour_checkpoint, monkeypatch,
                                                    caplog):
    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        handler = make_handler(colour_checkpoint, runtime="bf16")
    assert handler.runtime in ("int8", "onnx", "torch")
    assert "no avx512_bf16 or amx_bf16" in caplog.text
    assert {code for code, _ in handle(handler, IMAGES)[1]} == {200}


def test_cpu_name_and_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma avx512f "
                       "avx512_vnni\n")
    assert not cpu_has_bf16(cpuinfo)
    assert cpu_flags(cpuinfo) == ["avx2", "fma", "avx512f", "avx512_vnni"]
    assert cpu_name(cpuinfo) == "AMD EPYC 7B13"
    cpuinfo.write_text("flags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_bf16(cpuinfo)
    assert not cpu_has_bf16(tmp_path / "missing") and cpu_flags(tmp_path / "missing") == []


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


def test_int8_answers_as_fp32_within_its_precision(make_handler, colour_checkpoint):
    fp32, _ = handle(make_handler(colour_checkpoint, tta=1), IMAGES)
    handler = make_handler(colour_checkpoint, tta=1, runtime="int8")
    int8, statuses = handle(handler, IMAGES)
    assert handler.runtime == "int8" and {code for code, _ in statuses} == {200}
    for expected, got in zip(fp32, int8):
        assert next(iter(got)) == next(iter(expected))  # the same top-1
        assert max(abs(got[k] - p) for k, p in expected.items() if k in got) < 0.1


def test_int8_export_is_calibrated_checked_and_has_a_golden_set(colour_checkpoint, tmp_path):
    """export_onnx.py as `make archive` runs it, on the fixtures as calibration and check images:
    the golden set holds those images, decoded as the handler decodes them, and the fp32 net's
    logits for them."""
    out, int8, golden = (tmp_path / name for name in ("cifar10.onnx", "int8.onnx", "golden.npz"))
    result = subprocess.run([sys.executable, ROOT / "export_onnx.py", colour_checkpoint, out,
                             "--int8", int8, "--calibration-dir", FIXTURES, "--check-dir",
                             FIXTURES, "--golden", golden], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "calibrated on 10 images" in result.stdout and "10 golden images" in result.stdout
    checkpoint = torch.load(colour_checkpoint, weights_only=True)
    net = build_net(checkpoint).eval()
    images, logits = runtimes.load_golden(tmp_path)
    x = eval_transform(from_checkpoint(checkpoint))(images)
    assert torch.allclose(net(x), logits, atol=1e-5)
    assert agreement(onnx_forward(int8)(x), logits)[0] >= 0.9


def test_int8_export_refuses_a_quantization_that_drifts(colour_checkpoint, tmp_path):
    """Calibrated on one black image, every activation range is ~0: the quantized net's
    probabilities move far from fp32's (0.63 here, though its fp32 head keeps the colour net's
    clear top-1 answers), and the build check on real held-out images refuses to write it."""
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / "black.png").write_bytes(solid_png((0, 0, 0)))
    out, int8 = tmp_path / "cifar10.onnx", tmp_path / "cifar10.int8.onnx"
    result = subprocess.run([sys.executable, ROOT / "export_onnx.py", colour_checkpoint, out,
                             "--int8", int8, "--calibration-dir", calibration, "--check-dir",
                             FIXTURES], capture_output=True, text=True)
    assert result.returncode != 0 and "nothing written" in result.stderr, result.stderr
    assert not int8.exists() and not int8.with_suffix(".tmp").exists()


def test_calibration_takes_the_median_of_warmed_runs():
    """One untimed call, then the timed runs' median (and their range) on the clock given; runs
    that take long (a large model's) stop at MIN_RUNS."""
    def timed(costs):
        costs, now = iter(costs), [0.0]

        def step():
            now[0] += next(costs)
        return runtimes.timed(step, lambda: now[0])
    assert timed([0.9, 0.03, 0.01, 0.02, 0.05, 0.04]) == pytest.approx((0.03, 0.01, 0.05))
    assert runtimes.MIN_RUNS == 3 and timed([9.0, 3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)


def test_calibration_times_the_model_specs_input_shape(tmp_path):
    """Every forward and Integrated Gradients are timed on the spec's input (channels, height,
    width) in batches of the forward chunk, on the worker thread's CPU time: a 64x48 model is
    timed at 64x48, not at CIFAR's 32x32."""
    from torch import nn

    from cifar10_serve.spec import ModelSpec
    spec = ModelSpec(name="wide", classes=("a", "b"), architecture="test", image_size=(64, 48))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2)).eval()
    seen = []
    net.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    calibration = runtimes.calibrate("torch", net, tmp_path, lambda x: x.float() / 255, spec,
                                     torch.device("cpu"), batch=4, ig_steps=32)
    assert calibration.runtime == "torch" and calibration.forward is net
    assert {shape[1:] for shape in seen} == {(3, 64, 48)}
    assert {(4, 3, 64, 48), (runtimes.TIMED_STEPS, 3, 64, 48)} <= set(seen)
    assert calibration.forward_ms > 0 and calibration.ig_ms > 0
    assert calibration.clock is time.thread_time
    assert calibration.figures()["clock"] == "thread CPU time"
    assert calibration.figures()["input_shape"] == [3, 64, 48]


def test_the_forward_chunk_is_a_handler_setting_not_torchserves_batch_size(make_handler,
                                                                           colour_checkpoint):
    """forward_batch (model-config.yaml handler:) sets the images per forward call and the
    calibration's batch; TorchServe's batchSize (16 in the test context; KServe's is 1) does
    not."""
    handler = make_handler(colour_checkpoint, forward_batch=5)
    assert handler.chunk == 5 and handler.calibration.batch == 5
    calls, forward = [], handler.forward
    handler.forward = lambda x: calls.append(len(x)) or forward(x)
    handle(handler, [{"body": solid_png((10 * i, 0, 0))} for i in range(12)])
    assert calls == [5, 5, 2]
