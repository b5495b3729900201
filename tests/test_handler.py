"""The handler called directly, as a TorchServe worker would call it, on a real ts Context."""
import base64
import io
import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, handle, image_bytes
from ts.context import RequestProcessor
from PIL import Image

import cifar10_handler
from cifar10_serve import runtimes
from cifar10_serve.images import decode_image, image_tensor
from cifar10_serve.net import CIFAR10_CLASSES


def b64(data):
    return base64.b64encode(data).decode()


def expected_constant_answer(top=5):
    """The constant net's answer: softmax of k * 16 * GELU(1) / 9, classes k = 9, 8, ... first."""
    gelu1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    logits = [k * 16 * gelu1 / 9 for k in range(10)]
    total = sum(math.exp(v) for v in logits)
    return {CIFAR10_CLASSES[k]: math.exp(logits[k]) / total for k in range(9, 9 - top, -1)}


def assert_top5(answer):
    assert isinstance(answer, dict) and len(answer) == 5
    assert set(answer) <= set(CIFAR10_CLASSES)
    probs = list(answer.values())
    assert probs == sorted(probs, reverse=True)
    assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6


def test_exact_answer_from_fixed_weights(make_handler, constant_checkpoint):
    handler = make_handler(constant_checkpoint)
    (answer,), [(status, _)] = handle(handler, [{"body": image_bytes()}])
    assert status == 200
    expected = expected_constant_answer()
    assert list(answer) == list(expected)  # truck, ship, horse, frog, dog: sorted by probability
    assert answer == pytest.approx(expected, rel=1e-5)


def test_bytes_multipart_and_base64_give_the_same_answer(make_handler, tiny_checkpoint):
    handler = make_handler(tiny_checkpoint)
    cat = (FIXTURES / "cat.jpg").read_bytes()
    rows = [{"body": cat},                                   # curl -T cat.jpg
            {"data": bytearray(cat)},                          # the frontend's bytearray
            {"image": cat},                                    # one multipart form field
            {"body": {"data": b64(cat)}},                      # JSON, parsed by the worker
            {"body": json.dumps({"data": b64(cat)}).encode()},  # JSON sent as another type
            {"body": {"data": "data:image/jpeg;base64," + b64(cat)}},  # a browser data URL
            {"data": b64(cat)}]  # base64 text: KServe v1's {"instances": [{"data": "..."}]}
    outputs, statuses = handle(handler, rows)
    assert [s for s, _ in statuses] == [200] * len(rows)
    assert_top5(outputs[0])
    assert all(out == outputs[0] for out in outputs)


def test_a_batch_answers_each_request_in_order(make_handler, tiny_checkpoint):
    handler = make_handler(tiny_checkpoint)
    images = [(FIXTURES / f"{name}.jpg").read_bytes() for name in CIFAR10_CLASSES]
    batched, _ = handle(handler, [{"body": image} for image in images])
    one_by_one = [handle(handler, [{"body": image}])[0][0] for image in images]
    assert len(batched) == len(images)
    for together, alone in zip(batched, one_by_one):
        assert list(together) == list(alone)
        assert together == pytest.approx(alone, abs=1e-5)


def test_several_images_in_one_request_answer_a_list_in_order(make_handler, tiny_checkpoint):
    handler = make_handler(tiny_checkpoint)
    images = [(FIXTURES / f"{name}.jpg").read_bytes() for name in ("cat", "ship", "frog")]
    singles = [handle(handler, [{"body": image}])[0][0] for image in images]
    multipart = {f"file{i}": image for i, image in enumerate(images)}
    as_json = {"body": {"data": [b64(image) for image in images]}}
    one_in_list = {"body": {"data": [b64(images[0])]}}
    (from_form, from_json, single_list), statuses = handle(handler, [multipart, as_json,
                                                                     one_in_list])
    assert [s for s, _ in statuses] == [200, 200, 200]
    for answers in (from_form, from_json):
        assert len(answers) == 3
        for got, want in zip(answers, singles):
            assert got == pytest.approx(want, abs=1e-5)
    assert isinstance(single_list, list) and single_list[0] == pytest.approx(singles[0], abs=1e-5)


@pytest.mark.parametrize("mode,size,fmt", [
    ("L", (32, 32), "PNG"), ("RGBA", (32, 32), "PNG"), ("P", (32, 32), "PNG"),
    ("1", (32, 32), "PNG"), ("I;16", (40, 30), "PNG"), ("CMYK", (32, 32), "JPEG"),
    ("RGB", (2000, 1500), "JPEG"), ("RGB", (1, 1), "PNG"), ("RGB", (640, 20), "BMP"),
    ("RGB", (64, 64), "GIF"), ("RGB", (48, 48), "WEBP"), ("RGB", (32, 32), "TIFF"),
])
def test_unusual_but_valid_images_are_answered(make_handler, tiny_checkpoint, mode, size, fmt):
    handler = make_handler(tiny_checkpoint)
    (answer,), [(status, _)] = handle(handler, [{"body": image_bytes(mode, size, fmt)}])
    assert status == 200
    assert_top5(answer)


@pytest.mark.parametrize("row,fragment", [
    ({"body": b""}, "empty"),
    ({}, "empty"),
    ({"body": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40}, "cannot decode"),
    ({"body": b"<html><body>hello</body></html>"}, "cannot decode"),
    ({"body": "plain text"}, "'body' (text) is not valid base64"),
    ({"body": b'{"data": '}, "not valid JSON"),
    ({"body": {"image": "abc"}}, "\"data\""),
    ({"body": {"data": "not base64!"}}, "base64"),
    ({"body": {"data": b64(b"hello")}}, "cannot decode"),
    ({"body": {"data": []}}, "empty list"),
    ({"body": {"data": [1]}}, "base64 string"),
    ({"body": b"[" * 100000 + b"]" * 100000}, "not valid JSON"),
])
def test_bad_requests_get_a_400_that_says_what_is_accepted(make_handler, tiny_checkpoint, row,
                                                           fragment):
    handler = make_handler(tiny_checkpoint)
    (answer,), [(status, phrase)] = handle(handler, [row])
    assert status == 400
    assert answer["code"] == 400 and answer["message"] == phrase
    assert fragment in phrase and "multipart" in phrase  # what was wrong, and what is accepted


def test_a_bad_request_fails_only_itself_in_a_batch(make_handler, tiny_checkpoint):
    handler = make_handler(tiny_checkpoint)
    cat = (FIXTURES / "cat.jpg").read_bytes()
    outputs, statuses = handle(handler, [{"body": cat}, {"body": b"junk"}, {"body": cat},
                                         {"f0": cat, "f1": b"junk"}])
    assert [s for s, _ in statuses] == [200, 400, 200, 400]
    assert outputs[0] == outputs[2]
    assert "image 1" in statuses[3][1]  # names which image of the request was bad


def png_claiming(width, height):
    """A valid 8x8 PNG whose header is rewritten to claim width x height pixels."""
    png = bytearray(image_bytes("L", (8, 8)))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


@pytest.mark.parametrize("width,height,fragment", [
    (5000, 5000, "5000x5000 pixels"),     # over our limit, under PIL's own
    (40000, 40000, "too large"),          # PIL's decompression-bomb guard
])
def test_header_claiming_huge_dimensions_is_refused_before_decoding(
        make_handler, tiny_checkpoint, width, height, fragment):
    handler = make_handler(tiny_checkpoint)
    (answer,), [(status, phrase)] = handle(handler, [{"body": png_claiming(width, height)}])
    assert status == 400
    assert fragment in phrase and "at most 16,777,216 pixels are accepted" in phrase


def test_exif_orientation_is_honoured():
    upright = Image.open(FIXTURES / "cat.jpg").resize((64, 32))
    sideways = upright.rotate(90, expand=True)  # stored turned left...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...and EXIF orientation 6 says: turn it right to display
    encoded = []
    for image, extra in ((upright, {}), (sideways, {"exif": exif}), (sideways, {})):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **extra)
        encoded.append(image_tensor(decode_image(buffer.getvalue())))
    assert torch.equal(encoded[0], encoded[1])
    assert not torch.equal(encoded[0], encoded[2])


def test_device_is_the_assigned_gpu_when_cuda_is_there(monkeypatch):
    assert runtimes.select_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtimes.select_device(1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtimes.select_device(1) == torch.device("cuda:1")
    assert runtimes.select_device(None) == torch.device("cpu")


def test_cpu_worker_without_gpu_id_loads_on_cpu(make_handler, tiny_checkpoint):
    handler = make_handler(tiny_checkpoint, gpu_id=None)
    assert handler.device == torch.device("cpu")
    assert next(handler.model.parameters()).device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_worker_runs_on_its_gpu(make_handler, tiny_checkpoint):
    handler = make_handler(tiny_checkpoint, gpu_id=0)
    assert next(handler.model.parameters()).device == torch.device("cuda:0")
    (answer,), _ = handle(handler, [{"body": (FIXTURES / "cat.jpg").read_bytes()}])
    assert_top5(answer)


def test_handler_config_sets_topk_and_tta(make_handler, constant_checkpoint):
    handler = make_handler(constant_checkpoint, topk=3, tta=2)
    (answer,), _ = handle(handler, [{"body": image_bytes()}])
    assert answer == pytest.approx(expected_constant_answer(top=3), rel=1e-5)


def test_index_to_name_must_match_the_weights(make_handler, tiny_checkpoint, tmp_path):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    classes = checkpoint["spec"]["classes"]
    assert json.loads((FIXTURES.parent.parent / "handler" / "index_to_name.json").read_text()) \
        == {str(i): name for i, name in enumerate(classes)}
    nine = {**checkpoint, "spec": {**checkpoint["spec"], "classes": classes[:9]}}
    torch.save(nine, tmp_path / "nine.pt")
    with pytest.raises(ValueError, match="index_to_name.json names the classes"):
        make_handler(tmp_path / "nine.pt")
    swapped = list(classes)
    swapped[3], swapped[5] = swapped[5], swapped[3]  # the same ten names, two relabelled
    torch.save({**checkpoint, "spec": {**checkpoint["spec"], "classes": swapped}},
               tmp_path / "swapped.pt")
    with pytest.raises(ValueError, match="trained on .*'dog', 'deer', 'cat'"):
        make_handler(tmp_path / "swapped.pt")


def v2_bytes_request(images, request_id="req-1"):
    return {"id": request_id, "inputs": [{"name": "images", "datatype": "BYTES",
                                          "shape": [len(images)], "data": [b64(i) for i in images]}]}


def test_open_inference_protocol_v2_bytes_and_uint8(make_handler, tiny_checkpoint):
    handler = make_handler(tiny_checkpoint)
    names = ["cat", "ship", "frog"]
    images = [(FIXTURES / f"{n}.jpg").read_bytes() for n in names]
    singles = [handle(handler, [{"body": image}])[0][0] for image in images]
    pixels = np.stack([np.asarray(decode_image(image)) for image in images])  # (3, 32, 32, 3)
    uint8 = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                         "data": pixels.reshape(-1).tolist()}]}
    (from_bytes, from_uint8), statuses = handle(handler, [{"body": v2_bytes_request(images)},
                                                          {"body": uint8}])
    assert [s for s, _ in statuses] == [200, 200]
    assert from_bytes["model_name"] == "cifar10" and from_bytes["id"] == "req-1"
    assert "id" not in from_uint8
    for response in (from_bytes, from_uint8):
        label, probs = response["outputs"]
        assert (label["name"], label["datatype"], label["shape"]) == ("label", "BYTES", [3])
        assert label["data"] == [next(iter(single)) for single in singles]  # order kept
        assert (probs["name"], probs["datatype"], probs["shape"]) == ("probabilities", "FP32",
                                                                      [3, 10])
        rows = [probs["data"][10 * i:10 * (i + 1)] for i in range(3)]
        for row, single in zip(rows, singles):  # class-index order, the full distribution
            assert sum(row) == pytest.approx(1, abs=1e-5)
            assert {CIFAR10_CLASSES[k]: p for k, p in enumerate(row) if CIFAR10_CLASSES[k]
                    in single} == pytest.approx(single, abs=1e-5)


@pytest.mark.parametrize("request_body,fragment", [
    ({"inputs": []}, "needs \"inputs\""),
    ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [0.5]}]}, "BYTES"),
    ({"inputs": [{"datatype": "BYTES", "shape": [2], "data": ["aGk="]}]}, "does not match"),
    ({"inputs": [{"datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [256] * 3072}]},
     "integers 0-255"),
    ({"inputs": [{"datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 100}]},
     "got shape [1, 32, 32, 3] with 100 items"),
    ({"inputs": [{"datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [[[0]] * 3072]}]},
     "got data of shape [1, 3072, 1]"),
    ({"inputs": [{"datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, "not valid base64"),
])
def test_bad_v2_requests_get_a_400(make_handler, tiny_checkpoint, request_body, fragment):
    handler = make_handler(tiny_checkpoint)
    (answer,), [(status, phrase)] = handle(handler, [{"body": request_body}])
    assert status == 400 and fragment in phrase


def test_explanations_are_integrated_gradients_per_image(make_handler, tiny_checkpoint):
    handler = make_handler(tiny_checkpoint, ig_steps=8)
    cat, ship = [(FIXTURES / f"{n}.jpg").read_bytes() for n in ("cat", "ship")]
    rows = [{"body": cat}, {"a": cat, "b": ship}, {"body": b"junk"}]
    context = handler.context
    context.request_processor = [RequestProcessor({"explain": "True"}) for _ in rows]
    (one, two, bad) = handler.handle(rows, context)
    assert bad["code"] == 400 and context.request_processor[2].get_response_status_code() == 400
    predicted = handle(handler, [{"body": cat}])[0][0]
    assert one["class"] == next(iter(predicted))
    attributions = torch.tensor(one["attributions"])
    assert attributions.shape == (32, 32) and attributions.abs().sum() > 0
    assert [a["class"] for a in two] == [one["class"], two[1]["class"]] and len(two) == 2
    assert torch.allclose(torch.tensor(two[0]["attributions"]), attributions, atol=1e-5)
    # Integrated Gradients' completeness: attributions sum to f(x) - f(baseline) for the class
    x = handler.to_batch(handler.decode([{"body": cat}])[0][0].images)
    with torch.no_grad():
        k = CIFAR10_CLASSES.index(one["class"])
        gap = (handler.model(x)[0, k] - handler.model(torch.zeros_like(x))[0, k]).item()
    assert attributions.sum().item() == pytest.approx(gap, rel=0.1, abs=1e-3)


def test_worker_imports_neither_torchvision_nor_onnx(make_handler, tiny_checkpoint):
    """Worker start-up stays lean: torchvision and the ONNX exporter's onnx package never (the
    worker needs only onnxruntime). Captum is warmed at start (runtimes.integrated_gradients_step:
    a worker's first explanation would otherwise pay ~1.4 s outside the budget)."""
    model_dir = make_handler(tiny_checkpoint, runtime="onnx").context.system_properties["model_dir"]
    script = f"""
import sys, uuid
sys.path.insert(0, {str(Path(cifar10_handler.__file__).parent)!r})
from ts.context import Context, RequestProcessor
from ts.metrics.metrics_store import MetricsStore
from cifar10_handler import Cifar10Handler
context = Context("cifar10", {model_dir!r}, {{"model": {{"serializedFile": "weights.pt"}}}}, 1, None,
                  "0.12.0", metrics=MetricsStore(uuid.uuid4(), "cifar10"),
                  model_yaml_config={{"handler": {{"runtime": "onnx"}}}})
handler = Cifar10Handler()
handler.initialize(context)
context.request_processor = [RequestProcessor({{}})]
print(handler.handle([{{"body": open({str(FIXTURES / "cat.jpg")!r}, "rb").read()}}], context))
print(handler.runtime, sorted({{m.split(".")[0] for m in sys.modules}} & {{"captum", "torchvision", "onnx"}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()
    assert out[0].startswith("[{") and out[-1] == "onnx ['captum']"


def test_the_handler_module_holds_exactly_one_class():
    """TorchServe's worker refuses a handler module with more than one class in it."""
    from ts.utils.util import list_classes_from_module
    assert list_classes_from_module(cifar10_handler) == [cifar10_handler.Cifar10Handler]
