"""The Open Inference Protocol (v2) as `tritonclient.http` (2.73.0, test-only) speaks it: its
default binary tensor data in and out, its JSON mode, BYTES images and UINT8 pixels, against a
real TorchServe (test_serving's `server`: the colour net, free ports, stopped by pid) with answers
equal to /predictions/cifar10's; and the handler's reading of binary bodies, edge case by edge case.

    .venv/bin/python -m pytest tests/test_oip.py -q -x
"""
import base64
import gzip
import json
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from conftest import COLOURS, FIXTURES, solid_png
from test_serving import server  # noqa: F401  (the module-scoped TorchServe fixture)
from ts.context import RequestProcessor
from tritonclient.utils import InferenceServerException

from cifar10_serve.images import decode_image
from cifar10_serve.net import CIFAR10_CLASSES

HEADER = "Inference-Header-Content-Length"
PHOTOS = [(FIXTURES / f"{name}.jpg").read_bytes() for name in ("cat", "ship", "frog", "truck")]
SOLIDS = [solid_png(colour) for colour in COLOURS[:4]]
# The request headers TorchServe 0.12's frontend adds: /v2/models/cifar10/infer (and
# /v1/models/cifar10:predict) add `explain: False`; /predictions adds a `url_path` as well.
V2_ROUTE = {"explain": "False"}
PREDICTIONS_ROUTE = {"explain": "False", "url_path": ""}


# --- helpers -------------------------------------------------------------------------------------

def bytes_input(images, binary=True):
    """A BYTES input of encoded images: their bytes as binary data, or (JSON mode, where BYTES
    elements are UTF-8 text) base64."""
    elements = images if binary else [base64.b64encode(image) for image in images]
    tensor = httpclient.InferInput("images", [len(images)], "BYTES")
    return tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)


def pixels_of(images):
    """The images' pixels as the handler decodes them: [N, 32, 32, 3] uint8."""
    return np.stack([np.asarray(decode_image(image)) for image in images])


def uint8_input(images, binary=True):
    pixels = pixels_of(images)
    tensor = httpclient.InferInput("images", list(pixels.shape), "UINT8")
    return tensor.set_data_from_numpy(pixels, binary_data=binary)


def outputs(binary, classification=0):
    return [httpclient.InferRequestedOutput("label", binary_data=binary),
            httpclient.InferRequestedOutput("probabilities", binary_data=binary,
                                            class_count=classification)]


def labels(result):
    return [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]


def assert_as_predictions(result, singles):
    """A v2 result says what /predictions said for each image: its top class, and the same
    probabilities for its top-5 classes (the v2 answer holds all ten, in class-index order)."""
    assert labels(result) == [next(iter(single)) for single in singles]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(singles), len(CIFAR10_CLASSES))
    for row, single in zip(probabilities, singles):
        assert {CIFAR10_CLASSES[k]: float(p) for k, p in enumerate(row)
                if CIFAR10_CLASSES[k] in single} == pytest.approx(single, abs=1e-4)


def is_binary(result):
    """Did the answer carry its outputs as binary data (not JSON "data")?"""
    return all("binary_data_size" in (o.get("parameters") or {}) and "data" not in o
               for o in result.get_response()["outputs"])


# --- the real served path, with tritonclient ------------------------------------------------------

@pytest.fixture(scope="module")
def triton(server):  # noqa: F811
    """(tritonclient.http client for the test server, its token header, /predictions answers).
    The token is a function: infer() adds its Inference-Header-Content-Length to the headers
    dict it is given, so each call gets a fresh one."""
    client = httpclient.InferenceServerClient(server.inference.split("://", 1)[1],
                                              connection_timeout=60, network_timeout=60)
    singles = {image: server.predict(image).json() for image in PHOTOS + SOLIDS}
    yield client, lambda: server._token("inference"), singles
    client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("make_input", [bytes_input, uint8_input], ids=["BYTES", "UINT8"])
def test_tritonclient_infers_as_predictions_answers(triton, make_input, binary):
    """tritonclient with its defaults (binary tensors in; no outputs named, so it asks for
    binary_data_output) and in JSON mode (binary_data=False in; then also JSON outputs asked):
    BYTES images and UINT8 pixels answer what /predictions/cifar10 answers for the same images,
    in request order, as binary data where asked and as JSON where asked."""
    client, token, singles = triton
    images = PHOTOS + SOLIDS
    want = [singles[image] for image in images]
    result = client.infer("cifar10", [make_input(images, binary)], request_id="r-7",
                          headers=token())
    assert result.get_response()["id"] == "r-7" and is_binary(result)
    assert_as_predictions(result, want)
    if not binary:  # JSON all the way: JSON inputs, JSON outputs
        result = client.infer("cifar10", [make_input(images, binary)], headers=token(),
                              outputs=outputs(binary=False))
        assert not is_binary(result) and "id" not in result.get_response()
        assert_as_predictions(result, want)


def test_tritonclient_binary_and_json_outputs_mixed_and_top_k(triton):
    """Per output: label as JSON beside binary probabilities; and `class_count` (Triton's
    classification extension) on probabilities: the top k as "probability:index:label"."""
    client, token, singles = triton
    images = PHOTOS[:2]
    mixed = [httpclient.InferRequestedOutput("label", binary_data=False),
             httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    result = client.infer("cifar10", [bytes_input(images, binary=False)], outputs=mixed,
                          headers=token())
    label, probabilities = result.get_response()["outputs"]
    assert "data" in label and probabilities["parameters"]["binary_data_size"] == 2 * 10 * 4
    assert_as_predictions(result, [singles[image] for image in images])
    top = client.infer("cifar10", [bytes_input(images)], headers=token(), outputs=[
        httpclient.InferRequestedOutput("probabilities", class_count=3)])
    assert [o["name"] for o in top.get_response()["outputs"]] == ["probabilities"]
    rows = top.as_numpy("probabilities")
    assert rows.shape == (2, 3)
    for row, image in zip(rows, images):
        want = list(singles[image].items())[:3]
        got = [item.decode().split(":") for item in row]
        assert [name for _, _, name in got] == [name for name, _ in want]
        assert [int(index) for _, index, _ in got] == [CIFAR10_CLASSES.index(n) for n, _ in want]
        assert [float(p) for p, _, _ in got] == pytest.approx([p for _, p in want], abs=1e-5)


def test_tritonclient_errors_carry_the_message(triton):
    """A refused request reaches tritonclient's exception with the server's message and status
    (it reads v2's "error" field): 65 images, one over max_images."""
    client, token, _ = triton
    with pytest.raises(InferenceServerException) as refused:
        client.infer("cifar10", [bytes_input(SOLIDS[:1] * 65)], headers=token())
    assert refused.value.status() == "413" and "at most 64" in refused.value.message()


@pytest.mark.parametrize("length,fragment", [
    (lambda n, body: n + 7, "not a valid JSON inference header"),
    (lambda n, body: len(body) + 1, "a whole number from 1 to"),
    (lambda n, body: "12x", "a whole number from 1 to"),
    (lambda n, body: n - 3, "not a valid JSON inference header"),
    (lambda n, body: 0, "a whole number from 1 to"),
], ids=["inside-data", "past-body", "not-a-number", "inside-header", "zero"])
def test_a_bad_binary_header_length_is_a_clear_400(server, length, fragment):  # noqa: F811
    """An Inference-Header-Content-Length that does not end the JSON header: a 400 that names
    the header and what it must be, in v2's error shape; the next request is served."""
    body, size = httpclient.InferenceServerClient.generate_request_body([bytes_input(PHOTOS[:1])])
    url = f"{server.inference}/v2/models/cifar10/infer"
    response = requests.post(url, data=body, timeout=60, headers={
        **server._token("inference"), HEADER: str(length(size, body))})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"] and HEADER in response.json()["error"]
    good = requests.post(url, data=body, timeout=60,
                         headers={**server._token("inference"), HEADER: str(size)})
    assert good.status_code == 200 and good.headers[HEADER].isdigit()


@pytest.mark.parametrize("route,body,kwargs", [
    ("/v2/models/cifar10/infer", "raw", {}),
    ("/v2/models/cifar10/infer", "form", {}),
    ("/v2/models/cifar10/infer", "data-json", {}),
    ("/v1/models/cifar10:predict", "raw", {}),
])
def test_the_v2_route_refuses_what_is_not_a_v2_request(server, route, body, kwargs):  # noqa: F811
    """A raw JPEG (or a form, or {"data": ...}) POSTed to the v2 route got /predictions' answer
    shape; now a 400 in v2's error shape naming the v2 forms and where a raw image goes.
    TorchServe's KServe v1 route cannot be told from it in the worker: it answers alike."""
    request = {"raw": dict(data=PHOTOS[0]), "form": dict(files={"a": PHOTOS[0]}),
               "data-json": dict(json={"data": "aGVsbG8="})}[body]
    response = requests.post(f"{server.inference}{route}", timeout=60,
                             headers=server._token("inference"), **request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "not a v2 inference request" in error and "/predictions/cifar10" in error
    assert HEADER in error and "UINT8" in error


def test_concurrent_v2_and_predictions_traffic_gets_its_own_answers(server, triton):  # noqa: F811
    """Binary, JSON and UINT8 v2 requests and /predictions requests at once, in shared batches:
    every answer is its own images', and binary answers stay with the requests that asked."""
    _, token, singles = triton
    address = server.inference.split("://", 1)[1]
    images = PHOTOS + SOLIDS

    def one(n):
        chosen = [images[(n + k) % len(images)] for k in range(1 + n % 3)]
        want = [singles[image] for image in chosen]
        if n % 4 == 3:
            return server.predict(chosen[0]).json() == pytest.approx(want[0], abs=1e-4)
        client = httpclient.InferenceServerClient(address, network_timeout=60)
        try:
            make, binary = [(bytes_input, True), (uint8_input, True), (bytes_input, False)][n % 4]
            result = client.infer("cifar10", [make(chosen, binary)], headers=token(),
                                  outputs=None if binary else outputs(binary=False))
            assert_as_predictions(result, want)
            return is_binary(result) == binary
        finally:
            client.close()
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(48)))


# --- the handler's reading of binary bodies -------------------------------------------------------

@pytest.fixture
def handler(make_handler, colour_checkpoint):
    return make_handler(colour_checkpoint)


def tritonclient_row(inputs, asked=None, **kwargs):
    """(row, request headers) of a request as tritonclient builds it, on the v2 route."""
    body, size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=asked,
                                                                        **kwargs)
    return {"body": body}, {**V2_ROUTE, **({HEADER: str(size)} if size is not None else {})}


def binary_row(header, data, length=None, extra_headers=()):
    """(row, headers) of a hand-built binary request: a JSON header, then ``data``."""
    text = json.dumps(header).encode()
    return {"body": text + data}, {**V2_ROUTE, HEADER: str(len(text) if length is None
                                                          else length), **dict(extra_headers)}


def framed(*images):
    return b"".join(struct.pack("<I", len(image)) + image for image in images)


def bytes_header(count, size, **more):
    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [count],
                        "parameters": {"binary_data_size": size}}], **more}


def run(handler, requests_and_headers):
    """Handle one batch as TorchServe would: (answers, [(status, phrase, response headers)])."""
    rows = [row for row, _ in requests_and_headers]
    context = handler.context
    context.request_processor = [RequestProcessor(dict(h)) for _, h in requests_and_headers]
    answers = handler.handle(rows, context)
    return answers, [(p.get_response_status_code(), p.get_response_status_phrase(),
                      p.get_response_headers()) for p in context.request_processor]


def result_of(answer, response_headers):
    """The answer as tritonclient reads it, binary or JSON."""
    if isinstance(answer, bytes):
        return httpclient.InferenceServerClient.parse_response_body(
            answer, header_length=int(response_headers[HEADER]))
    assert HEADER not in response_headers
    return httpclient.InferenceServerClient.parse_response_body(json.dumps(answer).encode())


def singles_of(handler, images):
    answers, statuses = run(handler, [({"body": image}, PREDICTIONS_ROUTE) for image in images])
    assert {s for s, _, _ in statuses} == {200}
    return answers


def test_a_batch_mixing_binary_json_and_predictions_answers_each_its_own(handler):
    """One batch: tritonclient's binary BYTES and UINT8 requests, its JSON mode, a /predictions
    request and a bad binary request: each its own answer and status, and the binary answer's
    header length and content type set for its own request alone."""
    singles = singles_of(handler, PHOTOS + SOLIDS)
    batch = [tritonclient_row([bytes_input(PHOTOS)], request_id="a"),
             ({"body": PHOTOS[0]}, PREDICTIONS_ROUTE),
             tritonclient_row([uint8_input(SOLIDS)]),
             tritonclient_row([bytes_input(SOLIDS, binary=False)], outputs(binary=False)),
             binary_row(bytes_header(1, 10), framed(PHOTOS[0]))]
    answers, statuses = run(handler, batch)
    assert [s for s, _, _ in statuses] == [200, 200, 200, 200, 400]
    first = result_of(answers[0], statuses[0][2])
    assert first.get_response()["id"] == "a" and is_binary(first)
    assert statuses[0][2]["content-type"] == "application/octet-stream"
    assert_as_predictions(first, singles[:4])
    json_only = {"content-type": "application/json"}
    assert answers[1] == pytest.approx(singles[0], abs=1e-6) and statuses[1][2] == json_only
    assert_as_predictions(result_of(answers[2], statuses[2][2]), singles[4:])
    assert isinstance(answers[3], dict) and statuses[3][2] == json_only
    assert_as_predictions(result_of(answers[3], statuses[3][2]), singles[4:])
    assert "add up to 10" in answers[4]["error"] and HEADER not in statuses[4][2]


def test_binary_answers_equal_json_answers(handler):
    """The same images answered as binary outputs and as JSON: equal (FP32 little-endian bytes,
    BYTES length-prefixed labels)."""
    binary, json_mode = run(handler, [tritonclient_row([bytes_input(PHOTOS)]),
                                      tritonclient_row([bytes_input(PHOTOS)], outputs(False))])[0]
    assert isinstance(binary, bytes) and isinstance(json_mode, dict)
    header_length = len(binary) - 4 * 10 * len(PHOTOS) - sum(
        4 + len(label) for label in json_mode["outputs"][0]["data"])
    read = result_of(binary, {HEADER: str(header_length)})
    assert labels(read) == json_mode["outputs"][0]["data"]
    assert read.as_numpy("probabilities").reshape(-1).tolist() == pytest.approx(
        json_mode["outputs"][1]["data"], abs=1e-7)


def truncated(cut):
    row, headers = tritonclient_row([bytes_input(PHOTOS[:2])])
    return {"body": row["body"][:-cut]}, headers


@pytest.mark.parametrize("request_and_headers,status,fragment", [
    # sizes against the body
    (truncated(1), 400, "are left for it"),
    (truncated(len(PHOTOS[1]) + 4), 400, "are left for it"),
    (binary_row(bytes_header(1, len(PHOTOS[0]) + 4), framed(PHOTOS[0]) + b"xx"), 400,
     "add up to"),
    (binary_row(bytes_header(1, -1), b""), 400, "binary_data_size must be a whole number"),
    (binary_row(bytes_header(1, 4), framed(b"")), 400, "image 0 is empty"),
    # the elements of a BYTES input against its size and shape
    (binary_row(bytes_header(1, 8), struct.pack("<I", 2 ** 32 - 1) + b"abcd"), 400,
     "says it is 4294967295 bytes, but only 4"),
    (binary_row(bytes_header(1, 6), framed(b"x") + b"z"), 400, "more than the 1 images"),
    (binary_row(bytes_header(2, 11), framed(b"xxxxx") + b"zz"), 400,
     "4-byte length is cut off after 2 bytes"),
    (binary_row(bytes_header(2, 8 + len(PHOTOS[0])), framed(PHOTOS[0]) + b"abcd"), 400,
     "says it is"),
    (binary_row(bytes_header(3, 8), framed(b"a", b"b")[:8]), 400, "needs at least 12 bytes"),
    # limits, before anything is read
    (binary_row(bytes_header(65, 65 * 4), framed(*[b""] * 65)), 413, "at most 64"),
    (binary_row(bytes_header(10 ** 9, 8), framed(b"abcd")), 413, "at most 64"),
    (binary_row({"inputs": [{"name": "p", "datatype": "UINT8", "shape": [65, 32, 32, 3],
                             "parameters": {"binary_data_size": 65 * 3072}}]},
                bytes(65 * 3072)), 413, "at most 64"),
    (binary_row({"inputs": [{"name": "p", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                             "parameters": {"binary_data_size": 3071}}]}, bytes(3071)), 400,
     "3072 bytes of pixels"),
    (binary_row({"inputs": [{"name": "p", "datatype": "UINT8", "shape": [1, 3072],
                             "parameters": {"binary_data_size": 3072}}]}, bytes(3072)), 400,
     "got shape [1, 3072]"),
    (binary_row({"id": "x" * 257, **bytes_header(1, 4 + len(PHOTOS[0]))}, framed(PHOTOS[0])),
     400, "at most 256 characters"),
    # mixed binary and JSON inputs
    (binary_row({"inputs": [bytes_header(1, 4 + len(PHOTOS[0]))["inputs"][0],
                            {"name": "more", "datatype": "BYTES", "shape": [1],
                             "data": ["aGk="]}]}, framed(PHOTOS[0])), 400,
     "has 2 inputs; the model takes one"),
    (binary_row({"inputs": [{"name": "i", "datatype": "BYTES", "shape": [1], "data": ["aGk="],
                             "parameters": {"binary_data_size": 3}}]}, b"abc"), 400,
     "both \"data\" and binary_data_size"),
    (binary_row({"inputs": [{"name": "i", "datatype": "BYTES", "shape": [1],
                             "data": ["aGk="]}]}, b"stray"), 400, "add up to 0"),
    # what is accepted
    (binary_row({"inputs": [{"name": "f", "datatype": "FP32", "shape": [1, 3, 32, 32],
                             "parameters": {"binary_data_size": 4}}]}, bytes(4)), 400,
     "must be BYTES (encoded images) or UINT8 (pixels), got 'FP32'"),
    (binary_row([1, 2], b""), 400, "must be a JSON object"),
    (binary_row({"inputs": [{"name": "i", "datatype": "BYTES", "shape": [1],
                             "parameters": {"shared_memory_region": "r"}}]}, b""), 400,
     "shared memory"),
    (binary_row(bytes_header(1, 4 + len(PHOTOS[0]), outputs=[{"name": "logits"}]),
                framed(PHOTOS[0])), 400, "the outputs are ['label', 'probabilities']"),
    (binary_row(bytes_header(1, 4 + len(PHOTOS[0]),
                             outputs=[{"name": "label", "parameters": {"classification": 2}}]),
                framed(PHOTOS[0])), 400, "on the \"probabilities\" output"),
    (binary_row(bytes_header(1, 4 + len(PHOTOS[0])), framed(PHOTOS[0]),
                extra_headers={"Content-Encoding": "gzip"}), 400, "is compressed"),
    (binary_row(bytes_header(1, 4 + len(PHOTOS[0])), framed(PHOTOS[0]), length=" 1e3"), 400,
     "a whole number from 1 to"),
    # the images themselves: the decoding limits of every request
    (binary_row(bytes_header(1, 4 + 5), framed(b"junk!")), 400, "cannot decode"),
])
def test_bad_binary_requests_get_their_own_clear_4xx(handler, request_and_headers, status,
                                                     fragment):
    """Truncated data, sizes that do not add up, lengths over the limits, mixed binary and JSON
    inputs, what is not accepted: that request's own 4xx naming it, in v2's error shape; the
    good request beside it in the batch is answered."""
    good = tritonclient_row([bytes_input(PHOTOS[:1])])
    answers, statuses = run(handler, [request_and_headers, good])
    (code, phrase, headers), (good_code, _, good_headers) = statuses
    assert (code, good_code) == (status, 200), phrase
    assert fragment in phrase and fragment in answers[0]["error"]
    assert "tritonclient sends by default" in phrase and HEADER not in headers
    assert isinstance(answers[1], bytes) and good_headers[HEADER].isdigit()


def test_pixel_limits_hold_for_binary_images(make_handler, colour_checkpoint):
    """max_request_pixels counts the images' headers before any decoding, binary or not."""
    small = make_handler(colour_checkpoint, max_request_pixels=2 * 32 * 32)
    answers, statuses = run(small, [
        binary_row(bytes_header(3, 3 * 4 + sum(map(len, SOLIDS[:3]))), framed(*SOLIDS[:3])),
        binary_row(bytes_header(2, 2 * 4 + sum(map(len, SOLIDS[:2]))), framed(*SOLIDS[:2]))])
    assert [s for s, _, _ in statuses] == [413, 200]
    assert "decode to more than 2,048 pixels" in answers[0]["error"]


def test_the_v2_route_answers_only_v2_requests(handler):
    """On the v2 route, a raw image, a form or {"data": ...} is a 400 in v2's error shape naming
    the v2 forms; the same image on /predictions is answered as ever; KServe v1 is read on the
    route the worker cannot tell from v2's (/v1/models/cifar10:predict); and curl's v2 JSON (no
    binary_data_output, no outputs named) gets the JSON answer it always got."""
    encoded = base64.b64encode(PHOTOS[0]).decode()
    instances = {"instances": [{"data": encoded}]}
    curl = {"id": "r1", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                    "data": [encoded]}]}
    bodies = [{"body": PHOTOS[0]}, {"a#1": PHOTOS[0], "b#2": PHOTOS[1]}, {"body": {"data": "aGk="}}]
    answers, statuses = run(handler, [(b, V2_ROUTE) for b in bodies]
                            + [({"body": PHOTOS[0]}, PREDICTIONS_ROUTE),
                               ({"body": instances}, V2_ROUTE), ({"body": curl}, V2_ROUTE)])
    assert [s for s, _, _ in statuses] == [400, 400, 400, 200, 200, 200]
    for answer in answers[:3]:
        assert "not a v2 inference request" in answer["error"]
    assert answers[4] == {"predictions": [pytest.approx(answers[3], abs=1e-6)]}
    assert statuses[5][2] == {"content-type": "application/json"} and answers[5]["id"] == "r1"
    assert [o["name"] for o in answers[5]["outputs"]] == ["label", "probabilities"]
    assert answers[5]["outputs"][0]["data"] == [next(iter(answers[3]))]


def test_a_gzip_body_is_refused_not_misread(handler):
    """TorchServe's frontend does not undo Content-Encoding: the handler says so."""
    row, headers = tritonclient_row([bytes_input(PHOTOS[:1])])
    (answer,), [(status, phrase, _)] = run(handler, [
        ({"body": gzip.compress(row["body"])}, {**headers, "Content-Encoding": "gzip"})])
    assert status == 400 and "Content-Encoding: gzip" in phrase


@pytest.mark.parametrize("body", [PHOTOS[0], b"--b\r\n", b'{"instances": []}'])
def test_a_compressed_body_of_any_protocol_is_refused_not_misread(handler, body):
    """Raw images, forms and KServe bodies too: a 400 naming the Content-Encoding."""
    (answer,), [(status, phrase, _)] = run(handler, [
        ({"body": gzip.compress(body)}, {"Content-Encoding": "gzip"})])
    assert status == 400 and "Content-Encoding: gzip" in phrase, phrase
