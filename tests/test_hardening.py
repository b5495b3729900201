"""Hardening: fuzzed and hostile bodies against the handler, the served path under load and under a
killed worker, and a loud start on missing or corrupt weights.

    nice -n 10 .venv/bin/python -m pytest tests/test_hardening.py -q -x      # add -s for the counts

The handler tests call it directly on a real ts Context (conftest.handle); the served tests share
one TorchServe for this module (test_serving's `server` fixture: free ports, stopped by pid).
"""
import base64
import io
import json
import logging
import random
import signal
import struct
import threading
import time
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests
import torch
from conftest import FIXTURES, ROOT, handle, image_bytes, make_context
from PIL import Image
from test_handler import assert_top5
from test_serving import server  # noqa: F401  (the module-scoped TorchServe fixture)
from ts.protocol import otf_message_handler

from client import read_properties
from cifar10_serve import bodies, raw
from cifar10_serve.spec import CIFAR10_CLASSES, ModelSpec
from tests.harness import GoodTraffic
from cifar10_handler import Cifar10Handler
from cifar10_serve.images import decode_image, image_tensor

# The CIFAR-10 model the tests serve, and what its /predictions protocol says is accepted.
CIFAR10 = ModelSpec(name="cifar10", classes=CIFAR10_CLASSES, architecture="airbench")
ACCEPTED = raw.accepted(CIFAR10)
FUZZ_CASES = 2000
FUZZ_ROWS_PER_BATCH = 40


def b64(data):
    return base64.b64encode(data).decode()


def assert_bad_request(answer, status, phrase):
    """A 400 whose body and status phrase are one message (reason; accepted): the reason."""
    assert status == 400
    assert answer == {"code": 400, "type": "BadRequest", "message": phrase}
    reason, accepted = phrase[:-len(ACCEPTED) - 2], phrase[-len(ACCEPTED) - 2:]
    assert reason and accepted == f"; {ACCEPTED}"
    return reason


# --- 1. fuzzing the handler ----------------------------------------------------------------------

def fuzz_seeds():
    """Valid PNGs of several modes and sizes, and the fixture JPEGs."""
    pngs = [image_bytes(), image_bytes("RGBA", (20, 12), seed=1),
            image_bytes("L", (16, 16), seed=2), image_bytes("P", (24, 24), seed=3),
            image_bytes("I;16", (20, 10), seed=4)]
    return pngs + [path.read_bytes() for path in sorted(FIXTURES.glob("*.jpg"))]


def flip_bits(rng, data):
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return data


def truncate(rng, data):
    return data[:rng.randrange(len(data))]


def insert_bytes(rng, data):
    i = rng.randrange(len(data) + 1)
    data[i:i] = rng.randbytes(rng.randint(1, 16))
    return data


def duplicate_chunk(rng, data):
    start = rng.randrange(len(data))
    chunk = data[start:start + rng.randint(1, 64)]
    i = rng.randrange(len(data) + 1)
    data[i:i] = chunk
    return data


MUTATIONS = (flip_bits, truncate, insert_bytes, duplicate_chunk)


def mutated_bodies(count, seed=0):
    """count mutations of the seeds, every kind of mutation equally often, some stacked."""
    rng, seeds = random.Random(seed), fuzz_seeds()
    for n in range(count):
        data = bytearray(rng.choice(seeds))
        data = MUTATIONS[n % len(MUTATIONS)](rng, data)
        if data and rng.random() < 0.3:
            data = rng.choice(MUTATIONS)(rng, data)
        yield bytes(data)


def culprit(handler, rows):
    for row in rows:
        try:
            handle(handler, [row])
        except Exception as err:  # noqa: BLE001  (reporting it is the point)
            return f"{err!r} on {row['body']!r}"
    return "no single row fails"


def test_fuzzed_png_and_jpeg_get_a_top5_or_a_400_never_an_exception(make_handler, tiny_checkpoint):
    handler = make_handler(tiny_checkpoint)
    anchor = (FIXTURES / "cat.jpg").read_bytes()
    (anchor_alone,), _ = handle(handler, [{"body": anchor}])
    bodies = list(mutated_bodies(FUZZ_CASES))
    codes, reasons = Counter(), Counter()
    for start in range(0, len(bodies), FUZZ_ROWS_PER_BATCH):
        # A valid image rides in every batch: the fuzzed rows must not fail it.
        rows = [{"body": anchor}] + [{"body": body}
                                     for body in bodies[start:start + FUZZ_ROWS_PER_BATCH]]
        try:
            outputs, statuses = handle(handler, rows)
        except Exception as err:  # name the body that does it, alone
            pytest.fail(f"unhandled {err!r} in a batch; alone: {culprit(handler, rows)}")
        assert len(outputs) == len(rows)
        assert statuses[0][0] == 200 and outputs[0] == pytest.approx(anchor_alone, abs=1e-5)
        for answer, (status, phrase) in zip(outputs[1:], statuses[1:]):
            codes[status] += 1
            if status == 200:
                assert_top5(answer)
            else:
                reason = assert_bad_request(answer, status, phrase)
                assert reason.startswith(("cannot decode the image: ", "the image is ", "the body or field"))
                reasons[reason.split(" (")[0][:60]] += 1
    print(f"\nfuzz: {dict(codes)}; 400 reasons: {reasons.most_common()}")
    assert sum(codes.values()) == FUZZ_CASES
    assert set(codes) == {200, 400}  # the mutations both break images and leave some decodable


def png_with_ihdr_length(length):
    """A valid PNG whose IHDR chunk claims `length` bytes instead of 13."""
    png = bytearray(image_bytes())
    png[8:12] = struct.pack(">I", length)
    return bytes(png)


# Found by the fuzzer above (a JPEG's DQT segment moved to the front): PIL reads these 18 bytes as
# a colour-mapped TGA header and raises its own ValueError while loading.
TGA_LIKE_HEADER = b"\x01\x00\x01\x00\x00\xff\xdb\x00C\x00\x08\x06\x07\x07\x06\x05\x08\x07"


@pytest.mark.parametrize("body", [png_with_ihdr_length(12), TGA_LIKE_HEADER],
                         ids=["png-short-ihdr", "tga-like-header"])
def test_undecodable_bytes_are_reported_as_cannot_decode(make_handler, tiny_checkpoint, body):
    handler = make_handler(tiny_checkpoint)
    (answer,), [(status, phrase)] = handle(handler, [{"body": body}])
    assert_bad_request(answer, status, phrase)
    assert phrase.startswith("cannot decode the image: ")


# --- 2. bad bodies and unusual valid images -------------------------------------------------------

def zip_of_an_image():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat.png", image_bytes())
    return buffer.getvalue()


def nested_dict(depth):
    value = b64(image_bytes())
    for _ in range(depth):
        value = {"data": value}
    return value


SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="32" height="32">'
       b'<rect width="32" height="32" fill="red"/></svg>')
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<<>>\n%%EOF\n"


@pytest.mark.parametrize("row,fragment", [
    ({"body": b"just some plain text, not an image\n"}, "cannot decode the image"),
    ({"body": PDF}, "cannot decode the image"),
    ({"body": SVG}, "cannot decode the image"),
    ({"body": zip_of_an_image()}, "cannot decode the image"),
    ({"body": image_bytes(size=(64, 64))[:600]},
     "cannot decode the image: image file is truncated"),
    ({"body": (FIXTURES / "cat.jpg").read_bytes()[:700]},
     "cannot decode the image: image file is truncated"),
    ({"body": b'{"data": NaN}'}, "\"data\" item 0 is float, not a base64 string"),
    ({"body": {"data": float("nan")}}, "\"data\" item 0 is float, not a base64 string"),
    ({"body": {"data": b64(image_bytes()), "label": "cat"}},
     "one field \"data\", got ['data', 'label']"),
    ({"body": json.dumps({"data": b64(image_bytes()), "top": 3}).encode()},
     "one field \"data\", got ['data', 'top']"),
    ({"body": b'{"data": ' * 100000 + b'""' + b"}" * 100000}, "not valid JSON"),
    ({"body": nested_dict(50)}, "\"data\" item 0 is dict, not a base64 string"),
], ids=["text", "pdf-header", "svg", "zip", "truncated-png", "truncated-jpeg", "nan-json-bytes",
        "nan-json-parsed", "extra-field-parsed", "extra-field-bytes", "deeply-nested-json",
        "nested-dicts-parsed"])
def test_hostile_bodies_get_a_400_naming_the_problem(make_handler, tiny_checkpoint, row, fragment):
    handler = make_handler(tiny_checkpoint)
    (answer,), [(status, phrase)] = handle(handler, [row])
    assert_bad_request(answer, status, phrase)
    assert fragment in phrase


class FrontendSocket:
    """What a worker reads from TorchServe's frontend: the bytes given, in recv-sized pieces."""
    def __init__(self, data):
        self.stream = io.BytesIO(data)

    def recv(self, size):
        return self.stream.read(size)


def frontend_frame(content_type, body):
    """A request's body as TorchServe's frontend frames it for the worker: name, type, value."""
    return b"".join(struct.pack("!i", len(part)) + part
                    for part in (b"body", content_type.encode(), body))


def test_json_bodies_over_the_largest_request_are_refused_before_the_worker_parses_them(
        make_handler, tiny_checkpoint):
    """TorchServe's worker parses every application/json body before the handler runs: 8 MiB of
    empty objects cost it ~170 MB (3.6 GB for a batch of 16). The largest request accepted (v2
    UINT8 pixels nested, max_images of them) is still parsed as before; a body with more values
    reaches the handler unparsed and gets its own 413, its batch neighbour its answer."""
    handler = make_handler(tiny_checkpoint, max_images=2)
    limit = bodies.json_values_limit(2, (32, 32, 3))
    pixels = np.stack([np.asarray(decode_image((FIXTURES / f"{n}.jpg").read_bytes()))
                       for n in ("cat", "ship")])
    largest = json.dumps({"id": "big", "inputs": [{"name": "p", "datatype": "UINT8",
                                                   "shape": [2, 32, 32, 3],
                                                   "data": pixels.tolist()}]}).encode()
    amplified = b'{"data": [' + b"{}," * limit + b"{}]}"
    assert bodies.json_values(largest) <= limit < bodies.json_values(amplified)
    read = [otf_message_handler._retrieve_input_data(
        FrontendSocket(frontend_frame("application/json", body))) for body in (largest, amplified)]
    assert read[0]["value"]["id"] == "big"  # parsed by TorchServe, as before
    assert read[1]["value"] == amplified  # left as bytes
    (answer, refused), statuses = handle(handler, [{"body": read[0]["value"]},
                                                   {"body": read[1]["value"]}])
    assert statuses[0][0] == 200 and answer["id"] == "big"
    assert answer["outputs"][0]["data"] == [next(iter(handle(handler, [{"body": image}])[0][0]))
                                            for image in map(image_bytes_of, pixels)]
    assert statuses[1][0] == 413 and f"holds more than {limit:,} values" in statuses[1][1]



def test_a_body_the_reader_cannot_decode_costs_one_log_line_not_a_traceback(caplog):
    """TorchServe's reader logged a 10-line traceback for every bad JSON or UTF-8 body, so a
    client could fill the log ten times faster than the access log; now one line with the reason
    (and the body still reaches the handler as bytes, for its own 400)."""
    from cifar10_serve import torchserve_adapter  # its import applies the patches
    torchserve_adapter.set_json_values_limit(2, CIFAR10)  # as a handler with max_images 2 sets it
    amplified = b'{"data": [' + b"{}," * 10 ** 5 + b"{}]}"
    bodies = [("application/json", b'{"data": '), ("application/json", amplified),
              ("text/plain", b"\xff\xfe not utf-8")]
    with caplog.at_level(logging.WARNING):
        read = [otf_message_handler._retrieve_input_data(FrontendSocket(frontend_frame(*body)))
                for body in bodies]
    assert [r["value"] for r in read] == [body for _, body in bodies]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all(r.exc_info is None for r in warned)
    messages = [r.getMessage() for r in warned]
    assert "JSONDecodeError" in messages[0] and "JSON values" in messages[1]
    assert "UnicodeDecodeError" in messages[2]
    assert all("\n" not in m and len(m) < 300 for m in messages)

def image_bytes_of(pixels):
    """A lossless PNG of (32, 32, 3) uint8 pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_png(rgb16):
    """A 16-bit-per-channel RGB PNG, written by hand: PIL cannot write one."""
    height, width, _ = rgb16.shape
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_rgb_png_is_read_as_its_8_bit_image(make_handler, tiny_checkpoint):
    rgb8 = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png16 = encode_png(rgb8.astype(np.uint16) * 257)  # 257 * v: high byte v, low byte v
    png8 = io.BytesIO()
    Image.fromarray(rgb8).save(png8, format="PNG")
    assert torch.equal(image_tensor(decode_image(png16)),
                       image_tensor(decode_image(png8.getvalue())))
    handler = make_handler(tiny_checkpoint)
    (answer,), [(status, _)] = handle(handler, [{"body": png16}])
    assert status == 200
    assert_top5(answer)


def four_colour_image(colours):
    quadrants = np.array(colours, dtype=np.uint8).reshape(2, 2, 3)
    return Image.fromarray(quadrants.repeat(16, axis=0).repeat(16, axis=1))


def test_animated_gif_is_answered_from_its_first_frame(make_handler, tiny_checkpoint):
    first = four_colour_image([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)])
    second = four_colour_image([(0, 0, 0), (255, 255, 255), (128, 0, 128), (0, 128, 128)])
    gif = io.BytesIO()
    first.save(gif, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(gif).n_frames == 2
    decoded = image_tensor(decode_image(gif.getvalue()))
    assert torch.equal(decoded, image_tensor(first))
    assert not torch.equal(decoded, image_tensor(second))
    handler = make_handler(tiny_checkpoint)
    (answer,), [(status, _)] = handle(handler, [{"body": gif.getvalue()}])
    assert status == 200
    assert_top5(answer)


def test_progressive_jpeg_decodes_like_the_baseline_jpeg(make_handler, tiny_checkpoint):
    baseline = image_bytes("RGB", (64, 64), "JPEG", quality=90)
    progressive = image_bytes("RGB", (64, 64), "JPEG", quality=90, progressive=True)
    assert Image.open(io.BytesIO(progressive)).info.get("progressive") == 1
    assert torch.equal(image_tensor(decode_image(progressive)),
                       image_tensor(decode_image(baseline)))
    handler = make_handler(tiny_checkpoint)
    (answer,), [(status, _)] = handle(handler, [{"body": progressive}])
    assert status == 200
    assert_top5(answer)


# --- 4. startup fails loudly ----------------------------------------------------------------------

def model_dir_with(tmp_path, weights):
    """A model dir as TorchServe unpacks it, weights.pt holding `weights` (None: no file)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "index_to_name.json").write_bytes((ROOT / "handler" / "index_to_name.json")
                                                    .read_bytes())
    if weights is not None:
        (model_dir / "weights.pt").write_bytes(weights)
    return model_dir


def test_missing_weights_fail_initialize_naming_the_file(tmp_path):
    model_dir = model_dir_with(tmp_path, None)
    handler = Cifar10Handler()
    with pytest.raises(FileNotFoundError) as raised:
        handler.initialize(make_context(model_dir))
    assert str(model_dir / "weights.pt") in str(raised.value)
    assert not handler.initialized


@pytest.mark.parametrize("corruption", ["random-bytes", "truncated-checkpoint"])
def test_corrupt_weights_fail_initialize(tmp_path, tiny_checkpoint, corruption):
    good = tiny_checkpoint.read_bytes()
    weights = (np.random.default_rng(0).bytes(4096) if corruption == "random-bytes"
               else good[:len(good) // 2])
    handler = Cifar10Handler()
    with pytest.raises(RuntimeError, match="cannot load the weights .*weights.pt"):
        handler.initialize(make_context(model_dir_with(tmp_path, weights)))
    assert not handler.initialized


# --- 3. the served path ---------------------------------------------------------------------------

def inference_session(server):  # noqa: F811
    session = requests.Session()
    session.headers.update(server._token("inference"))
    return session


def test_body_over_max_request_size_gets_413_from_the_frontend(server):  # noqa: F811
    limit = int(read_properties(server.run_dir / "config.properties")["max_request_size"])
    url = f"{server.inference}/predictions/cifar10"
    with inference_session(server) as session:
        at_limit = session.post(url, data=b"\0" * limit, timeout=60)
        over_limit = session.post(url, data=b"\0" * (limit + 1), timeout=60)
    assert at_limit.status_code == 400  # reached the handler, which found no image in it
    assert "cannot decode the image" in at_limit.json()["message"]
    assert over_limit.status_code == 413


def test_300_requests_on_32_connections_all_get_their_answer(server):  # noqa: F811
    images = [(FIXTURES / f"{name}.jpg").read_bytes()
              for name in ("cat", "dog", "ship", "frog", "truck")]
    url = f"{server.inference}/predictions/cifar10"
    with inference_session(server) as session:
        alone = [session.post(url, data=image, timeout=60).json() for image in images]
    local = threading.local()

    def predict(i):
        if not hasattr(local, "session"):
            local.session = inference_session(server)
        response = local.session.post(url, data=images[i % len(images)], timeout=60)
        return i, response.status_code, response.json()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(predict, range(300)))
    assert [status for _, status, _ in results] == [200] * 300
    for i, _, answer in results:  # dynamic batching kept every answer with its request
        assert answer == pytest.approx(alone[i % len(images)], abs=1e-5)


def worker_processes(java):
    workers = []
    for process in java.children(recursive=True):
        try:
            if "model_service_worker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.NoSuchProcess:  # exited between the listing and the look
            pass
    return workers


def test_killed_worker_is_replaced_and_later_requests_succeed(server):  # noqa: F811
    """Runs last in the module: it leaves the server with a replaced worker."""
    java = psutil.Process(int((server.run_dir / ".model_server.pid").read_text()))
    workers = worker_processes(java)
    assert len(workers) == 2
    victim = workers[0]
    cat = (FIXTURES / "cat.jpg").read_bytes()
    with GoodTraffic.of(server, [cat], clients=4) as stream:
        stream.wait_for(20)
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        ready_at, deadline = None, killed_at + 60
        while ready_at is None and time.monotonic() < deadline:
            described = server.describe().json()[0]["workers"]
            if (len(described) == 2 and all(w["status"] == "READY" for w in described)
                    and victim.pid not in [w["pid"] for w in described]):
                ready_at = time.monotonic()
            time.sleep(0.2)
        assert ready_at is not None, f"no 2 READY workers 60 s after the kill: {described}"
        stream.wait_for(100, since=ready_at)
    # Requests in flight on the victim when it dies fail (TorchServe answers them 507), so count
    # every request sent before the replacement was READY, not only those sent after the kill.
    before = [sent.outcome for sent in stream.results() if sent.at < ready_at]
    after = [sent.outcome for sent in stream.results(since=ready_at)]
    failed = Counter(outcome for outcome in before if outcome != 200)
    print(f"\nworker kill: replaced in {ready_at - killed_at:.1f} s; {sum(failed.values())} of "
          f"{len(before)} requests sent before it was READY failed {dict(failed)}; "
          f"{len(after)} sent after READY")
    assert len(after) >= 100 and set(after) == {200}
    assert len(worker_processes(java)) == 2
