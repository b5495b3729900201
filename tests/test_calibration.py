"""Calibrated probabilities: the metrics and the temperature fit (calibration.py), the temperature
stored in the checkpoint's spec and applied by the handler, evaluate.py's report, and the int8
file whose classifier output stays in full precision (export_onnx.py)."""
import json
import shutil

import onnx
import pytest
import torch
from conftest import COLOURS, FIXTURES, handle, solid_png

import calibration
import evaluate
from bench.resolution import resolution
from cifar10_serve import spec as model_spec
from cifar10_serve.images import decode_image, eval_transform, image_tensor
from cifar10_serve.net import CIFAR10_CLASSES, build_net
from cifar10_serve.forwards import bf16_forward, onnx_forward
from cifar10_serve.runtimes import INT8_FILE, ONNX_FILE

IMAGES = [{"body": solid_png(rgb)} for rgb in COLOURS]


def fixture_folder(root):
    """The shipped real CIFAR-10 fixtures as an ImageFolder (one image per class)."""
    for name in CIFAR10_CLASSES:
        (root / name).mkdir(parents=True)
        shutil.copy(FIXTURES / f"{name}.jpg", root / name / "0.jpg")
    return root


def with_temperature(checkpoint, temperature, out):
    data = torch.load(checkpoint, weights_only=True)
    data["spec"] = model_spec.from_checkpoint(data).replace(temperature=temperature).to_dict()
    torch.save(data, out)
    return out


def test_ece_is_the_share_weighted_gap_per_bin():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.92, 0.08], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    # bins of 1/15: 0.9 and 0.92 share (13/15, 14/15]: right once at 0.91; 0.6 wrong; 0.7 right
    expected = 0.5 * abs(0.5 - 0.91) + 0.25 * 0.6 + 0.25 * abs(1 - 0.7)
    assert calibration.ece(probs, labels) == pytest.approx(expected)
    count, confidence, accuracy = calibration.reliability(probs, labels)
    assert count.sum() == 4 and count[13] == 2 and accuracy[13] == 0.5


def test_nll_fit_recovers_the_temperature_labels_were_drawn_at():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20000, 10, generator=generator)
    labels = torch.multinomial((logits / 0.5).softmax(1), 1, generator=generator).squeeze(1)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.03)
    assert calibration.scores(logits, labels, 0.5)["ece"] < 0.02
    assert calibration.scores(logits, labels)["ece"] > 0.1  # at T 1: under-confident


def test_confidence_fit_matches_the_mean_top1_probability_to_the_accuracy():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3000, 10, generator=generator)
    labels = torch.multinomial((logits / 0.3).softmax(1), 1, generator=generator).squeeze(1)
    temperature = calibration.fit_confidence(logits, labels)
    found = calibration.scores(logits, labels, temperature)
    assert found["confidence"] == pytest.approx(found["accuracy"], abs=1e-6)


def test_cross_fitting_scores_each_half_at_the_other_halfs_temperature():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(400, 10, generator=generator)
    labels = torch.randint(0, 10, (400,), generator=generator)
    fits = []
    temperatures, scaled = calibration.cross_fitted(
        logits, labels, lambda z, y: fits.append(len(y)) or 1.0 + len(fits))
    assert fits == [200, 200] and temperatures == [2.0, 3.0]
    ratio = (logits.double() / scaled).flatten()
    assert set(ratio.round(decimals=6).tolist()) == {2.0, 3.0}
    assert (ratio == 2.0).sum() == (ratio == 3.0).sum() == 2000


def test_handler_divides_the_logits_by_the_specs_temperature(make_handler, colour_checkpoint,
                                                             tmp_path):
    plain, _ = handle(make_handler(colour_checkpoint, topk=10), IMAGES)
    hot = with_temperature(colour_checkpoint, 2.0, tmp_path / "hot.pt")
    tempered, _ = handle(make_handler(hot, topk=10), IMAGES)
    for before, after in zip(plain, tempered):
        assert list(after) == list(before)  # the same ranking, the top-1 included
        root = {k: p ** 0.5 for k, p in before.items()}  # softmax(z / 2) ~ softmax(z) ** 1/2
        for k, p in after.items():
            assert p == pytest.approx(root[k] / sum(root.values()), rel=1e-4)


def test_calibration_writes_the_temperature_into_the_spec(colour_checkpoint, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    shutil.copy(colour_checkpoint, weights)
    before = torch.load(weights, weights_only=True)
    assert calibration.main([str(weights), str(fixture_folder(tmp_path / "folder")),
                             "--write"]) == 0
    assert "ECE a perfectly calibrated forward would score" in capsys.readouterr().out
    after = torch.load(weights, weights_only=True)
    assert set(after) == set(before) | {"spec", "calibration"}
    for key in before:
        if key not in ("state_dict", "spec"):
            assert repr(after[key]) == repr(before[key])  # (nan in the tiny run's figures)
    old, new = model_spec.from_checkpoint(before), model_spec.from_checkpoint(after)
    assert new == old.replace(temperature=new.temperature)  # the spec's temperature alone
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    spec = model_spec.from_checkpoint(after)
    assert spec.temperature == after["calibration"]["fits"]["confidence"]["temperature"]
    assert spec.replace(temperature=1.0) == model_spec.from_checkpoint(before)


def test_evaluate_reports_calibration_before_and_after_per_runtime(colour_checkpoint, exports,
                                                                   tmp_path):
    weights = with_temperature(colour_checkpoint, 0.5, tmp_path / "weights.pt")
    folder, png, out = fixture_folder(tmp_path / "folder"), tmp_path / "rel.png", \
        tmp_path / "result.json"
    int8 = exports(colour_checkpoint) / INT8_FILE
    assert evaluate.main([str(folder), "--weights", str(weights), "--int8", str(int8),
                          "--tta", "1", "--calibration", str(png), "--json", str(out)]) == 0
    found = json.loads(out.read_text())["calibration"]
    assert set(found) == {"fp32", "int8"}
    for runtime in found.values():
        assert runtime["before"]["temperature"] == 1 and runtime["after"]["temperature"] == 0.5
        assert runtime["after"]["confidence"] > runtime["before"]["confidence"]
        assert runtime["before"]["accuracy"] == runtime["after"]["accuracy"]
    assert png.read_bytes().startswith(b"\x89PNG")


def test_int8_file_keeps_the_classifier_output_in_full_precision(colour_checkpoint, exports,
                                                                 tmp_path):
    """The head (matmul and scaling) is left out of quantization: no QDQ between the last
    weighted layer and the output, so the int8 answers have as many distinct probabilities as
    fp32's and no tie the quantizer's grid made. (The colour net's head, jittered: its integer
    weights on quantized features could make two classes equal in any precision.)"""
    data = torch.load(colour_checkpoint, weights_only=True)
    head = data["state_dict"]["head.weight"]
    head += 0.01 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0))
    weights = tmp_path / "jittered.pt"
    torch.save(data, weights)
    folder = exports(weights)
    graph = onnx.load(str(folder / INT8_FILE)).graph
    producer = {out: node for node in graph.node for out in node.output}
    last = producer[graph.output[0].name]
    assert last.op_type == "Mul" and producer[last.input[0]].op_type == "MatMul"
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)  # the rest is int8
    x = eval_transform()(torch.stack([image_tensor(decode_image(row["body"])) for row in IMAGES]))
    with torch.inference_mode():
        reference = resolution(build_net(data).eval()(x).softmax(1))
    assert reference == (10, 0, 0)
    assert resolution(onnx_forward(folder / INT8_FILE)(x).softmax(1)) == reference
    assert onnx.load(str(folder / ONNX_FILE)).graph.output[0].name == graph.output[0].name


def test_resolution_counts_distinct_probabilities_and_ties():
    probs = torch.tensor([[0.4, 0.4, 0.2], [0.5, 0.3, 0.2], [0.5, 0.25, 0.25]])
    distinct, repeating, ties = resolution(probs)
    assert distinct == pytest.approx(7 / 3) and repeating == pytest.approx(2 / 3) and ties == 1


def test_bf16_runtime_runs_its_head_in_fp32(colour_checkpoint):
    """bf16_forward: the features under bf16 autocast, the head's matmul in fp32 on them, so the
    logits are not on bf16's grid (8 significant bits); the fp32 net it was given (Integrated
    Gradients runs it) is left as it was."""
    data = torch.load(colour_checkpoint, weights_only=True)
    net = build_net(data).eval()
    forward = bf16_forward(net)
    assert type(net.head) is torch.nn.Linear
    x = eval_transform(model_spec.from_checkpoint(data))(
        torch.stack([image_tensor(decode_image(solid_png(c))) for c in COLOURS]))
    features = {}
    net.head.register_forward_hook(lambda m, i, o: features.update(x=i[0]))
    with torch.inference_mode():
        logits = forward(x)
        assert not features  # the copy ran, not the given net
        net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_features = net.features(net.whiten(x))
    expected = torch.nn.functional.linear(bf16_features.float(), net.head.weight) * net.scaling
    assert logits.dtype == torch.float32
    assert torch.equal(logits, expected)
    on_grid = logits.to(torch.bfloat16).float()
    assert not torch.equal(logits, on_grid)  # finer than bf16's grid
