"""The serving package (cifar10_serve/) and the thin handler class: what importing them changes, the
settings checked at start, and request bodies that real clients send (HTML forms, wrapped base64,
KServe batches). Which module may import which: tests/test_layers.py."""
import ast
import base64
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FIXTURES, ROOT, handle, image_bytes, make_context
from PIL import Image
from ts.context import RequestProcessor
from ts.service import Service
from ts.torch_handler.request_envelope.kserve import KServeEnvelope

import cifar10_handler
from cifar10_serve import settings, torchserve_adapter
from cifar10_serve.images import decode_image, image_tensor

CAT = (FIXTURES / "cat.jpg").read_bytes()


def test_only_the_compatibility_module_changes_anything_on_import():
    """Importing the package in a fresh interpreter leaves TorchServe's worker as it is, until
    cifar10_serve.torchserve_adapter (which the handler imports) patches it."""
    script = """
import importlib, pkgutil
from ts.protocol import otf_message_handler
from ts.service import Service
import cifar10_serve
before = (Service.retrieve_data_for_inference, otf_message_handler.json)
for module in pkgutil.iter_modules(cifar10_serve.__path__):
    if module.name != "torchserve_adapter":
        importlib.import_module(f"cifar10_serve.{module.name}")
assert (Service.retrieve_data_for_inference, otf_message_handler.json) == before
import cifar10_serve.torchserve_adapter
assert Service.retrieve_data_for_inference is not before[0] and otf_message_handler.json is not before[1]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_no_script_edits_sys_path_to_find_the_package():
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*/*.py")]:
        tree = ast.parse(path.read_text())
        edits = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and node.attr == "path" and getattr(node.value, "id", None) == "sys"]
        assert not edits, f"{path.relative_to(ROOT)} edits sys.path"


@pytest.mark.parametrize("setting,value", [
    ("max_decode_ms", 0), ("max_decode_ms", -5), ("max_images", 1.5), ("max_request_pixels", "1e6"),
    ("max_id_length", True), ("topk", 0), ("tta", 3), ("ig_steps", -1), ("threads", -1),
    ("runtime", "tensorrt")])
def test_a_setting_out_of_range_stops_the_worker_naming_it(setting, value):
    """A zero max_decode_ms once served as if nothing were wrong: a zero timer_settime value
    disarms the timer, so no deadline at all."""
    with pytest.raises(ValueError, match=f"handler.{setting} must be"):
        settings.read({setting: value})


def test_settings_default_and_read():
    read = settings.read({"tta": 1, "max_decode_ms": 250, "threads": 1})
    assert (read.tta, read.limits["max_decode_ms"], read.threads, read.runtime) == (1, 250, 1, "auto")
    assert settings.read(None).limits == settings.LIMITS
    with pytest.raises(ValueError, match="unknown settings"):
        settings.read({"max_decode_msec": 10})


def form(fields):
    """A multipart request as TorchServe's worker hands it over: (row, request headers); each
    field (name, content type, bytes): a file field has the type its part declared, an HTML
    form's text field none."""
    row = {f"{name}#{i}": value for i, (name, _, value) in enumerate(fields, 1)}
    headers = {"Content-Type": "multipart/form-data; boundary=x",
               **{f"{name}#{i}": {"content-type": kind} for i, (name, kind, _) in
                  enumerate(fields, 1)}}
    return row, headers


def handle_form(handler, fields, extra_headers=None):
    row, headers = form(fields)
    headers.update(extra_headers or {})
    context = handler.context
    context.request_processor = [RequestProcessor(headers)]
    (answer,) = handler.handle([row], context)
    json.dumps(answer)
    processor = context.request_processor[0]
    return answer, processor.get_response_status_code(), processor.get_response_status_phrase()


def test_an_html_forms_text_fields_beside_the_file_are_not_images(make_handler,
                                                                    colour_checkpoint):
    """A submit button's name and a CSRF token beside the file: the file is answered (it failed
    the whole request with "image 1: cannot decode")."""
    handler = make_handler(colour_checkpoint)
    alone, _ = handle(handler, [{"body": CAT}])
    answer, status, _ = handle_form(handler, [("csrf", "", b"abc123"), ("submit", "", b"Send"),
                                              ("img", "image/jpeg", CAT)])
    assert status == 200 and answer == pytest.approx(alone[0], abs=1e-6)


def test_a_forms_base64_text_field_is_an_image_and_a_form_of_text_alone_is_refused(
        make_handler, colour_checkpoint):
    handler = make_handler(colour_checkpoint)
    alone, _ = handle(handler, [{"body": CAT}])
    wrapped = base64.encodebytes(CAT)  # 76-column lines, as `base64 cat.jpg` writes it
    answer, status, _ = handle_form(handler, [("data", "", wrapped), ("submit", "", b"Send")])
    assert status == 200 and answer == pytest.approx(alone[0], abs=1e-6)
    answer, status, phrase = handle_form(handler, [("csrf", "", b"abc123"), ("q", "", b"cat")])
    assert status == 400 and "the form has no image" in phrase and "'csrf'" in phrase
    _, status, phrase = handle_form(handler, [("img", "application/octet-stream", b"junk")])
    assert status == 400 and "cannot decode" in phrase  # a file field must be an image


def test_a_field_named_like_a_header_is_still_a_file(make_handler, colour_checkpoint):
    """TorchServe keeps a field's own headers and the request's in one dict: `-F accept=@cat.jpg`
    with an `accept` header (or `-F explain=@...` to /explanations, which sets `explain`) left a
    string where the field's headers were, and the request got a 500."""
    handler = make_handler(colour_checkpoint)
    alone, _ = handle(handler, [{"body": CAT}])
    row, headers = form([("accept", "image/jpeg", CAT)])
    headers["accept#1"] = "*/*"
    context = handler.context
    context.request_processor = [RequestProcessor(headers)]
    (answer,) = handler.handle([row], context)
    assert context.request_processor[0].get_response_status_code() == 200
    assert answer == pytest.approx(alone[0], abs=1e-6)


def test_text_fields_a_token_an_image_and_the_limits(make_handler, colour_checkpoint):
    handler = make_handler(colour_checkpoint)
    alone, _ = handle(handler, [{"body": CAT}])
    for token in (b"Qk1" + b"x7" * 30, b"/9j/" + b"x7" * 30):  # base64 of "BM", FF D8 FF
        answer, status, _ = handle_form(handler, [("csrf", "", token), ("img", "image/jpeg", CAT)])
        assert status == 200 and answer == pytest.approx(alone[0], abs=1e-6)
    as_url = b"data:image/jpeg;base64," + base64.b64encode(CAT)
    answer, status, _ = handle_form(handler, [("data", "", as_url)])
    assert status == 200 and answer == pytest.approx(alone[0], abs=1e-6)
    raw = [("img", "image/jpeg", CAT), ("again", "", CAT)]  # curl -F "again=<cat.jpg"
    answer, status, _ = handle_form(handler, raw)
    assert status == 200 and len(answer) == 2  # nothing dropped
    many = [("img", "image/jpeg", CAT)] + [(f"t{i}", "", b"x") for i in range(70)]
    answer, status, _ = handle_form(handler, many)  # text fields are no images to count
    assert status == 200 and answer == pytest.approx(alone[0], abs=1e-6)
    too_many = [("img", "image/jpeg", CAT)] + [(f"t{i}", "", b"x") for i in range(200)]
    _, status, phrase = handle_form(handler, too_many)
    assert status == 413 and "200 text fields" in phrase


def test_a_jpeg_comment_holding_scan_markers_is_no_scan(make_handler, colour_checkpoint):
    """Only the markers from the first scan on count against max_jpeg_scans."""
    handler = make_handler(colour_checkpoint)
    comment = b"\xff\xda" * 65
    jpeg = CAT[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + CAT[2:]
    (answer,), [(status, phrase)] = handle(handler, [{"body": jpeg}])
    assert status == 200, phrase


def test_a_multipart_body_torchserve_could_not_read_says_why(make_handler, colour_checkpoint):
    """Text before the first boundary (a preamble) makes TorchServe's frontend drop every part:
    the request reaches the handler empty."""
    handler = make_handler(colour_checkpoint)
    context = handler.context
    context.request_processor = [RequestProcessor({"Content-Type": "multipart/form-data; b=x"})]
    (answer,) = handler.handle([{}], context)
    assert answer["code"] == 400 and "preamble" in answer["message"]


def test_base64_with_line_breaks_is_accepted(make_handler, colour_checkpoint):
    """GNU base64 wraps at 76 columns by default: `$(base64 cat.jpg)` in a JSON body."""
    handler = make_handler(colour_checkpoint)
    plain, wrapped = base64.b64encode(CAT).decode(), base64.encodebytes(CAT).decode()
    assert "\n" in wrapped
    answers, statuses = handle(handler, [{"body": {"data": plain}}, {"body": {"data": wrapped}},
                                         {"body": {"data": [wrapped.replace("\n", "\r\n")]}}])
    assert [code for code, _ in statuses] == [200, 200, 200]
    assert answers[1] == answers[0] and answers[2] == [answers[0]]


def test_a_kserve_batch_is_told_from_its_instances_by_what_torchserve_built(make_handler,
                                                                             colour_checkpoint):
    """Two requests in TorchServe's batch, the first with two instances: the KServe v1 envelope
    reads request 0 alone and hands the handler its two instances. Counting rows could not tell
    them from two requests (the old guess): the second instance's error went to request 1."""
    handler = make_handler(colour_checkpoint)
    first = {"instances": [{"data": base64.b64encode(CAT).decode()}, {"data": "bad!"}]}
    second = {"instances": [{"data": base64.b64encode(CAT).decode()}]}
    headers, rows, _ = Service.retrieve_data_for_inference(
        [{"requestId": str(i).encode(), "parameters": [{"name": "body", "contentType": "",
                                                         "value": body}]}
         for i, body in enumerate((first, second))])
    context = handler.context
    context.request_processor = headers
    KServeEnvelope(handler.handle).handle(rows, context)
    assert torchserve_adapter.enveloped(first["instances"], context)
    assert not torchserve_adapter.enveloped(rows, context)
    assert headers[0].get_response_status_code() == 400
    assert "instance 1" in headers[0].get_response_status_phrase()
    assert headers[1].get_response_status_code() == 200  # nothing of request 0's set on it


@pytest.mark.parametrize("mode,colour,expected", [
    ("L", 100, (100, 100, 100)), ("LA", (100, 255), (100, 100, 100)),
    ("RGBA", (10, 200, 30, 255), (10, 200, 30)), ("P", None, (10, 200, 30)),
    ("I;16", 60000, (255, 255, 255)), ("1", 1, (255, 255, 255)), ("RGB", (7, 8, 9), (7, 8, 9))])
def test_every_colour_mode_decodes_to_its_rgb_pixels(mode, colour, expected):
    """Greyscale, alpha, palette, 16-bit and 1-bit images become the RGB pixels a person sees
    (TorchServe's VisionHandler breaks on greyscale and RGBA uploads)."""
    if mode == "P":
        image = Image.new("RGB", (32, 32), expected).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = Image.new(mode, (32, 32), colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = image_tensor(decode_image(buffer.getvalue()))
    assert pixels.shape == (3, 32, 32)
    assert torch.equal(pixels, torch.tensor(expected, dtype=torch.uint8).view(3, 1, 1)
                       .expand(3, 32, 32))


def test_a_cmyk_jpeg_decodes_to_its_rgb_colour():
    cmyk = image_bytes("RGB", (32, 32), "JPEG")
    rgb = Image.open(io.BytesIO(cmyk)).convert("RGB")
    buffer = io.BytesIO()
    rgb.convert("CMYK").save(buffer, format="JPEG", quality=95)
    decoded = image_tensor(decode_image(buffer.getvalue())).float()
    reference = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()
    assert (decoded - reference).abs().mean() < 8  # JPEG-lossy, but the same colours


def test_the_handler_reads_its_settings_at_start(colour_checkpoint, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(colour_checkpoint, model_dir / "weights.pt")
    handler = cifar10_handler.Cifar10Handler()
    with pytest.raises(ValueError, match="handler.max_decode_ms must be"):
        handler.initialize(make_context(model_dir, config={"runtime": "torch",
                                                           "max_decode_ms": 0}))
