"""cifar10_serve.ranking: one order of classes, ties broken by class index."""
import torch

from cifar10_serve import ranking
from cifar10_serve.ranking import ranked, top1


def test_classes_are_ranked_by_probability_then_index():
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.1],
                          [0.2, 0.2, 0.2, 0.2, 0.2],
                          [0.0, 0.1, 0.2, 0.3, 0.4]])
    assert ranked(probs).tolist() == [[1, 3, 2, 0, 4], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]
    assert top1(probs).tolist() == [1, 0, 4]


def test_a_tie_at_any_place_of_a_long_row_keeps_index_order():
    """Long rows take other sort kernels: the tie rule must hold whatever the length."""
    probs = torch.rand(64, 1000, generator=torch.Generator().manual_seed(0))
    probs[:, 500] = probs[:, 7] = probs.max() + 1  # an exact tie for first, far apart
    order = ranked(probs)
    assert order[:, :2].tolist() == [[7, 500]] * 64
    rest = probs.gather(1, order)
    assert (rest[:, :-1] >= rest[:, 1:]).all()


def test_one_row_as_a_list():
    assert ranked([0.5, 0.25, 0.25]).tolist() == [0, 1, 2]
    assert int(top1([0.25, 0.5, 0.5])) == 1


# --- every route names one top-1 --------------------------------------------------------------

import base64  # noqa: E402  (the handler tests below)

import pytest  # noqa: E402
from conftest import COLOURS, solid_png  # noqa: E402
from ts.context import RequestProcessor  # noqa: E402

from cifar10_serve.net import CIFAR10_CLASSES  # noqa: E402

TIED = (6, 2)  # the two classes whose logits are equal for every image


@pytest.fixture(scope="module")
def tie_checkpoint(colour_checkpoint, tmp_path_factory):
    """The colour net with its head rows for classes 2 and 6 made equal and larger than every
    other's: each image's two best classes tie exactly, bit for bit, whatever the image (the
    net's features are positive), and the other eight still differ from image to image."""
    checkpoint = torch.load(colour_checkpoint, weights_only=True)
    state = dict(checkpoint["state_dict"])
    head = state["head.weight"].clone()
    head[:, :3] = head[:, :3].clamp(max=0) / 9  # the others: small, still image-dependent
    head[list(TIED), :3] = 3.0
    state["head.weight"] = head
    if "head.bias" in state:
        state["head.bias"] = torch.zeros_like(state["head.bias"])
    out = tmp_path_factory.mktemp("tie") / "tie.pt"
    torch.save({**checkpoint, "state_dict": state}, out)
    return out


def served(handler, requests):
    """One batch as TorchServe would hand it over: (answers, [(status, response headers)])."""
    rows = [row for row, _ in requests]
    context = handler.context
    context.request_processor = [RequestProcessor(dict(h)) for _, h in requests]
    answers = handler.handle(rows, context)
    return answers, [(p.get_response_status_code(), p.get_response_headers())
                     for p in context.request_processor]


def test_every_route_names_the_same_class_on_an_exact_tie(make_handler, tie_checkpoint):
    """argmax names the first maximum and topk may name either: every route ranks by
    ranking.py, so on an exact tie all name the lower class index, in one mixed batch."""
    handler = make_handler(tie_checkpoint, ig_steps=2, topk=3)
    images = [solid_png(c) for c in COLOURS[:4]]
    encoded = [base64.b64encode(i).decode() for i in images]
    predictions, v2_route = {"explain": "False", "url_path": ""}, {"explain": "False"}
    v2 = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [4], "data": encoded}],
          "outputs": [{"name": "label"},
                      {"name": "probabilities", "parameters": {"classification": 3}}]}
    answers, statuses = served(handler, [
        ({"body": images[0]}, predictions),
        ({"body": {"data": encoded}}, predictions),
        ({"body": v2}, v2_route),
        ({"body": {"instances": [{"data": e} for e in encoded]}}, predictions),
        ({"body": {"data": encoded}}, {"explain": "True", "url_path": ""}),
    ])
    assert [s for s, _ in statuses] == [200] * 5, answers
    one, several, oip, kserve, explained = answers
    first = CIFAR10_CLASSES[min(TIED)]
    probs = handler.decode([{"body": images[0]}])  # the tie is exact, not merely close
    logits = handler.model(handler.to_batch(probs[0][0].images))[0]
    assert logits[TIED[0]].item() == logits[TIED[1]].item()
    assert list(one)[:2] == [first, CIFAR10_CLASSES[max(TIED)]]
    assert one[first] == one[CIFAR10_CLASSES[max(TIED)]]
    assert [list(a)[0] for a in several] == [first] * 4
    label, top = oip["outputs"]
    assert label["data"] == [first] * 4
    assert [top["data"][3 * i].split(":")[1:] for i in range(4)] == [[str(min(TIED)), first]] * 4
    second = CIFAR10_CLASSES[max(TIED)]
    assert [top["data"][3 * i + 1].split(":")[2] for i in range(4)] == [second] * 4
    assert [list(a)[0] for a in kserve["predictions"]] == [first] * 4
    assert [a["class"] for a in explained] == [first] * 4


def test_min_confidence_marks_uncertain_answers_without_changing_their_shape(
        make_handler, colour_checkpoint):
    """X-Min-Confidence (any route) and a v2 request's parameters.min_confidence: the answer
    keeps its shape; /predictions and KServe v1 say which images fall below it in X-Uncertain,
    v2 in its parameters, with each image's lead over the runner-up."""
    handler = make_handler(colour_checkpoint)
    images = [solid_png(c) for c in COLOURS[:3]]
    encoded = [base64.b64encode(i).decode() for i in images]
    predictions, v2_route = {"explain": "False", "url_path": ""}, {"explain": "False"}
    v2 = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [3], "data": encoded}]}
    (plain,), _ = served(handler, [({"body": {"data": encoded}}, predictions)])
    (reference,), _ = served(handler, [({"body": v2}, v2_route)])
    probs = torch.tensor(reference["outputs"][1]["data"]).view(3, 10)
    top = probs.max(dim=1).values
    threshold = float(top.sort().values[1:].mean())  # one or two images fall below it
    below = [bool(p < threshold) for p in top]
    assert any(below) and not all(below)
    asked = {**predictions, "X-Min-Confidence": str(threshold)}
    answers, statuses = served(handler, [
        ({"body": {"data": encoded}}, asked),
        ({"body": {"instances": [{"data": e} for e in encoded]}}, asked),
        ({"body": {**v2, "parameters": {"min_confidence": threshold}}}, v2_route),
        ({"body": images[0]}, {**predictions, "x-min-confidence": "1.5"}),
        ({"body": {**v2, "parameters": {"min_confidence": "high"}}}, v2_route),
        ({"body": {"data": encoded}}, predictions),
    ])
    marked = ", ".join("true" if b else "false" for b in below)
    assert [s for s, _ in statuses] == [200, 200, 200, 400, 400, 200]
    assert answers[0] == plain and statuses[0][1]["X-Uncertain"] == marked
    assert statuses[1][1]["X-Uncertain"] == marked
    assert answers[2]["outputs"] == reference["outputs"]
    assert answers[2]["parameters"]["uncertain"] == below
    second = probs.sort(dim=1, descending=True).values[:, 1]
    assert answers[2]["parameters"]["margin"] == pytest.approx((top - second).tolist())
    assert "X-Min-Confidence" in answers[3]["message"]
    assert "min_confidence" in answers[4]["message"]
    assert "X-Uncertain" not in statuses[5][1] and answers[5] == plain  # not asked: as ever
    assert "parameters" not in reference


def test_the_served_top1_confidence_is_a_histogram_on_the_metrics_port(
        make_handler, colour_checkpoint):
    handler = make_handler(colour_checkpoint)
    images = [solid_png(c) for c in COLOURS]
    added = []
    handler.context.metrics.add_counter = lambda name, value, idx=None, dims=(): added.append(
        (name, value, [(d.name, d.value) for d in dims or ()]))
    answers, _ = served(handler, [({"body": i}, {"explain": "False", "url_path": ""})
                                  for i in images] + [({"body": images[0]}, {"explain": "True"})])
    top = torch.tensor([max(a.values()) for a in answers[:-1]])  # explanations are not counted
    buckets = {dims[0][1]: value for name, value, dims in added
               if name == "ts_handler_top1_confidence_bucket"}
    expected = {f"{b:g}": int((top <= b).sum()) for b in ranking.CONFIDENCE_BOUNDS}
    expected = {**{b: n for b, n in expected.items() if n}, "+Inf": len(top)}
    assert buckets == expected  # only the buckets that moved: one log line each
    assert len(set(buckets.values())) > 2  # the colour net's answers spread over the buckets
    totals = {name: value for name, value, _ in added if not name.endswith("_bucket")}
    assert totals == {"ts_handler_top1_confidence_count": 10,
                      "ts_handler_top1_confidence_sum": pytest.approx(top.sum().item())}
