"""Gated TTA (model-config.yaml `tta_margin`): the extra views only for the images whose first look
is unsure, with the answers of full TTA for those and of the plain view for the rest; counted on
the metrics port; explanations name the class predictions answer; evaluate.py's table."""
import json

import pytest
import torch
from conftest import COLOURS, FIXTURES, handle, solid_png
from ts.context import RequestProcessor

import evaluate
from cifar10_serve.net import gated_logits, predict_logits

IMAGES = [solid_png(colour) for colour in COLOURS]


@pytest.fixture
def colour_batch(make_handler, colour_checkpoint):
    """(handler, normalised batch of the ten colours, first-look lead of each)."""
    handler = make_handler(colour_checkpoint, tta=1)
    rows, _ = handler.decode([{"body": image} for image in IMAGES])
    x = handler.to_batch([image for row in rows for image in row.images])
    with torch.inference_mode():
        top2 = handler.model(x).softmax(1).topk(2, dim=1).values
    return handler, x, top2[:, 0] - top2[:, 1]


@pytest.mark.parametrize("tta", [1, 2])
def test_only_the_unsure_images_take_the_extra_views(colour_batch, tta):
    handler, x, lead = colour_batch
    margin = lead.median().item()  # half the colours are unsure at this margin
    unsure = lead < margin
    assert 0 < unsure.sum() < len(x)
    with torch.inference_mode():
        plain, full = handler.model(x), predict_logits(handler.model, x, tta)
        gated, looked = gated_logits(handler.model, x, tta, margin)
    assert looked == unsure.sum().item()
    assert torch.allclose(gated[unsure], full[unsure], atol=1e-5)
    assert torch.equal(gated[~unsure], plain[~unsure])
    with torch.inference_mode():
        assert gated_logits(handler.model, x, tta, 1.0)[1] == len(x)
        assert gated_logits(handler.model, x, tta, 0.0)[1] == 0
        assert gated_logits(handler.model, x, 0, 0.5)[1] == 0


def test_the_handler_serves_gated_tta_and_counts_the_second_looks(make_handler, colour_checkpoint,
                                                                  colour_batch):
    _, _, lead = colour_batch
    margin = lead.median().item()
    plain, _ = handle(make_handler(colour_checkpoint, tta=0), [{"body": i} for i in IMAGES])
    full, _ = handle(make_handler(colour_checkpoint, tta=1), [{"body": i} for i in IMAGES])
    handler = make_handler(colour_checkpoint, tta=1, tta_margin=margin)
    counted = {}
    handler.context.metrics.add_counter = lambda name, value, *a, **k: counted.update(
        {name: counted.get(name, 0) + value})
    gated, statuses = handle(handler, [{"body": i} for i in IMAGES])
    assert {code for code, _ in statuses} == {200}
    for answer, unsure, one, both in zip(gated, lead < margin, plain, full):
        assert answer == pytest.approx(both if unsure else one, abs=1e-5)
    counted = {k: v for k, v in counted.items() if k.startswith("ts_handler_tta")}
    assert counted == {"ts_handler_tta_images": 10,
                       "ts_handler_tta_second_looks": (lead < margin).sum().item()}
    assert handler.describe_handle()["tta_margin"] == margin


def test_explanations_name_the_class_predictions_answer(make_handler, colour_checkpoint):
    """The served forward decides the class (int8 near a tie, or gated TTA, can differ from the
    fp32 net alone): here a forward that ranks the classes in reverse."""
    handler = make_handler(colour_checkpoint, tta=1, tta_margin=0.3, ig_steps=4)
    net = handler.model
    handler.forward = lambda x: -net(x)
    context = handler.context
    predicted, _ = handle(handler, [{"body": IMAGES[0]}])
    context.request_processor = [RequestProcessor({"explain": "True"})]
    (explained,) = handler.handle([{"body": IMAGES[0]}], context)
    assert explained["class"] == next(iter(predicted[0]))
    with torch.inference_mode():
        x = handler.to_batch(handler.decode([{"body": IMAGES[0]}])[0][0].images)
        assert handler.classes[net(x).argmax().item()] != explained["class"]


def test_evaluate_reports_accuracy_and_forwards_per_margin(colour_checkpoint, tmp_path):
    folder = tmp_path / "folder"
    for name in ("cat", "dog", "ship"):
        (folder / name).mkdir(parents=True)
        (folder / name / "0.jpg").write_bytes((FIXTURES / f"{name}.jpg").read_bytes())
    out = tmp_path / "margins.json"
    assert evaluate.main([str(folder), "--weights", str(colour_checkpoint), "--tta", "1",
                          "--tta-margin", "0", "0.5", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["fp32"]
    assert [row["tta_margin"] for row in rows] == [0, 0.5, 1]
    assert rows[0]["forwards_per_image"] == 1 and rows[-1]["forwards_per_image"] == 2
    assert 1 <= rows[1]["forwards_per_image"] <= 2
