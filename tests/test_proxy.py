"""The reverse proxy of issue 25 (findings 5-8) and the Open Inference Protocol routes of issue 26
it serves, through the real path: `make archive` builds the colour net's .mar (its answers tell
images apart), TorchServe serves it on free loopback ports, and Debian's nginx, configured by
proxy.py from deploy/nginx/nginx.conf.template, stands in front on free ports. Servers are
stopped by pid, also on failure.

TEST_PROXY_TARGET=torchserve points the same checks at TorchServe alone (no proxy): each of the
findings then fails, as it does against `make serve` today. Needs nginx (apt-get install nginx):
skipped, with the reason, where it is missing outside CI; .ci/run installs it.
"""
import base64
import binascii
import collections
import contextlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from conftest import COLOURS, solid_png
from PIL import Image

import client as client_module
import proxy
import torch
from cifar10_serve import spec, v2
from client import TorchServeClient
from tests.harness import GoodTraffic, free_port, local_proxy
from test_serving import torchserve

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
needs_nginx = pytest.mark.skipif(NGINX is None and not os.environ.get("CI"),
                                 reason="the proxy tests need nginx (apt-get install nginx)")
DIRECT = os.environ.get("TEST_PROXY_TARGET") == "torchserve"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def served(colour_checkpoint, tmp_path_factory):
    """TorchServe serving the colour net, and the v2 metadata its spec describes."""
    run = tmp_path_factory.mktemp("torchserve")
    with torchserve(colour_checkpoint, run) as ts:
        ts.metadata = v2.metadata(spec.from_checkpoint(
            torch.load(colour_checkpoint, weights_only=True)), "1.0")
        ts.tokens = json.loads((run / "key_file.json").read_text())
        yield ts


@pytest.fixture(scope="module")
def front(served, tmp_path_factory):
    """The proxy in front of ``served`` with its shipped limits (an unanswered request sent once
    more after half responseTimeout, 5 s: the colour net answers in milliseconds); TorchServe
    itself with TEST_PROXY_TARGET=torchserve."""
    if DIRECT:
        yield SimpleNamespace(inference=served.inference, management=served.management)
        return
    if NGINX is None:
        pytest.skip("the proxy tests need nginx (apt-get install nginx)")
    with local_proxy(served, tmp_path_factory.mktemp("proxy")) as running:
        yield running


@pytest.fixture
def make_proxy(served, tmp_path):
    """make_proxy(upstream=served, **settings) -> a proxy in front of ``upstream`` with other
    limits (the upstream itself with TEST_PROXY_TARGET=torchserve)."""
    with contextlib.ExitStack() as stack:
        def make(upstream=served, **settings):
            if DIRECT:
                return upstream
            folder = tmp_path / f"proxy-{len(stack._exit_callbacks)}"
            return stack.enter_context(local_proxy(upstream, folder, **settings))
        yield make


def inference_headers(served):
    return {"Authorization": f"Bearer {served.tokens['inference']['key']}"}


def management_headers(served):
    return {"Authorization": f"Bearer {served.tokens['management']['key']}"}


def top(response):
    assert response.status_code == 200, response.text
    answer = response.json()
    return max(answer, key=answer.get)


def address(url):
    parts = urlsplit(url)
    return parts.hostname, parts.port


def read_response(stream):
    """One HTTP/1.1 response from a socket's file: (status, headers, body); None at EOF."""
    line = stream.readline()
    if not line:
        return None
    status = int(line.split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", 0)))
    return status, headers, body


def exchange(url, data, timeout=10):
    """Send raw bytes on one connection; every response until the server closes it."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        sock.sendall(data)
        stream, responses = sock.makefile("rb"), []
        try:
            while (response := read_response(stream)) is not None:
                responses.append(response)
        except (ConnectionResetError, socket.timeout):
            pass
        return responses


def request_bytes(method, path, headers, body=b"", extra=""):
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + extra
    return head.encode() + b"\r\n" + body


# ---------------------------------------------------------------------- finding 5: pipelining
@needs_nginx
def test_pipelined_requests_are_answered_in_the_order_sent(front, served):
    """A large PNG then, 50 ms later and before any answer, a small one on the same connection:
    the answers come back in that order (TorchServe alone gives the small one to its other
    worker and answers it first)."""
    big = io.BytesIO()
    Image.new("RGB", (4000, 4000), COLOURS[0]).save(big, format="PNG")
    big, small = big.getvalue(), solid_png(COLOURS[2])
    session = requests.Session()
    expected = [top(session.post(f"{served.inference}/predictions/cifar10", data=body,
                                 headers=inference_headers(served))) for body in (big, small)]
    assert expected[0] != expected[1]
    headers = {**inference_headers(served), "Content-Type": "application/octet-stream"}
    for _ in range(3):
        with socket.create_connection(address(front.inference), timeout=30) as sock:
            for body in (big, small):
                sock.sendall(request_bytes("POST", "/predictions/cifar10",
                                           {**headers, "Content-Length": len(body)}, body))
                time.sleep(0.05)
            stream = sock.makefile("rb")
            answers = [read_response(stream) for _ in range(2)]
        got = [max(json.loads(body), key=json.loads(body).get) for _, _, body in answers]
        assert got == expected


# ----------------------------------------------------------- finding 6: idle and slow clients
def hold(url, count):
    return [socket.create_connection(address(url), timeout=5) for _ in range(count)]


def closed_by_server(sock):
    """Whether the server closed (or answered and closed) this connection."""
    sock.setblocking(False)
    try:
        while data := sock.recv(65536):
            if b"HTTP/1.1 408" in data:
                return True
        return True  # EOF
    except BlockingIOError:
        return False  # still open, nothing sent
    except ConnectionResetError:
        return True


@needs_nginx
def test_idle_and_slow_connections_are_closed_and_good_clients_get_through(make_proxy, served):
    """Rendered with 1 s timeouts and room for 256 connections: 600 idle connections (more
    than the room), slowloris headers, a trickled body and idle keep-alive connections are all
    closed within seconds, and a good client on new connections is answered throughout.
    TorchServe alone closes none (0 of 2,000 after 60 s) and runs out of files at 20,000."""
    target = make_proxy(
        header_timeout="1s", body_timeout="1s", keepalive_timeout="1s", send_timeout="1s",
        worker_connections=256)
    headers = inference_headers(served)
    idle = hold(target.inference, 600)
    slowloris = hold(target.inference, 10)
    slow_body = hold(target.inference, 5)
    for sock in slow_body:
        sock.sendall(request_bytes("POST", "/predictions/cifar10",
                                   {**headers, "Content-Length": 1000}, b"x"))
    keepalive = []
    for _ in range(5):
        sock = socket.create_connection(address(target.inference), timeout=10)
        sock.sendall(request_bytes("GET", "/ping", headers))
        assert read_response(sock.makefile("rb"))[0] == 200
        keepalive.append(sock)
    good, start = [], time.monotonic()
    while time.monotonic() - start < 4:
        for sock in slowloris:  # a header line every 0.3 s, never the end of the headers
            with contextlib.suppress(OSError):
                sock.sendall(b"X-Slow: 1\r\n")
        with contextlib.suppress(OSError):  # each slow body: a byte every 2 s or so
            slow_body[len(good) % len(slow_body)].sendall(b"x")
        response = requests.post(f"{target.inference}/predictions/cifar10",
                                 data=solid_png(COLOURS[1]),
                                 headers={**headers, "Connection": "close"}, timeout=10)
        good.append(response.status_code)
        time.sleep(0.3)
    time.sleep(1.5)
    lingering = collections.Counter()
    for kind, socks in (("idle", idle), ("slowloris", slowloris), ("slow body", slow_body),
                        ("idle keep-alive", keepalive)):
        lingering[kind] = sum(not closed_by_server(sock) for sock in socks)
        for sock in socks:
            sock.close()
    assert good and set(good) == {200}
    assert sum(lingering.values()) == 0, f"connections the server left open: {dict(lingering)}"


@pytest.mark.parametrize("hard,nofile,connections", [(1048576, 65536, 32768),
                                                     (20000, 20000, 19968), (4096, 4096, 4064)])
def test_the_proxy_asks_for_room_within_the_open_file_limit(monkeypatch, hard, nofile,
                                                           connections):
    """nginx gets room for 20,000 idle connections beside the good ones per worker process
    where the open-file limit it inherits allows (two processes on 2 cores), and never asks
    for more than that limit (docs/proxy-and-security.md "Reverse proxy": measured with 20,000)."""
    monkeypatch.setattr(proxy.resource, "getrlimit", lambda kind: (1024, hard))
    assert proxy.open_files() == {"nofile": nofile, "worker_connections": connections}


# -------------------------------------------------------- finding 8: request framing, methods
@needs_nginx
@pytest.mark.parametrize("method", ["OPTIONS", "GET", "POST"])
def test_a_star_target_gets_a_400_naming_what_is_accepted(front, served, method):
    """TorchServe alone answers `OPTIONS *` with a 500 (or a reset)."""
    (status, _, body), = exchange(front.inference, request_bytes(
        method, "*", {**inference_headers(served), "Content-Length": 0}))
    assert status == 400 and "not *" in json.loads(body)["message"]


@needs_nginx
def test_content_length_beside_chunked_is_refused_and_nothing_is_smuggled(front, served):
    """Content-Length: 5 with a chunked body whose end is followed by a GET: one 400, and the
    connection closed (TorchServe alone accepted it, and a proxy that trusted Content-Length
    would have run the GET as a second request)."""
    smuggled = request_bytes("GET", "/ping", inference_headers(served))
    data = request_bytes("POST", "/predictions/cifar10",
                         {**inference_headers(served), "Content-Length": 5,
                          "Transfer-Encoding": "chunked"}, b"0\r\n\r\n" + smuggled)
    responses = exchange(front.inference, data)
    assert [status for status, _, _ in responses] == [400]
    assert "Content-Length" in json.loads(responses[0][2])["message"]


@needs_nginx
@pytest.mark.parametrize("chunk", [b"-5\r\nabc\r\n0\r\n\r\n"])
def test_a_bad_chunk_size_gets_a_400(front, served, chunk):
    """TorchServe alone resets the connection on chunk size -5."""
    (status, _, body), = exchange(front.inference, request_bytes(
        "POST", "/predictions/cifar10", {**inference_headers(served),
                                         "Transfer-Encoding": "chunked"}, chunk))
    assert status == 400 and json.loads(body)["code"] == 400


def torchserve_access_log(served):
    return served.run_dir / "logs" / "access_log.log"


def torchserve_logged_after(served, since):
    """What TorchServe's access log (written asynchronously) recorded after byte ``since``, up
    to and including a /ping sent now as a marker."""
    requests.get(f"{served.inference}/ping", headers=inference_headers(served), timeout=10)
    deadline = time.monotonic() + 60  # async_logging: seconds on a busy machine
    while time.monotonic() < deadline:
        new = torchserve_access_log(served).read_bytes()[since:].decode(errors="replace")
        if '"GET /ping HTTP/1.1"' in new:
            return new
        time.sleep(0.1)
    raise AssertionError("TorchServe's access log never recorded the marker /ping")


CONTROL_TARGETS = ["/predictions/cifar10%0A", "/predictions/cifar10%0D",
                   "/predictions/cifar10%0D%0AX-Smuggled:%201", "/v2/models/cifar10/infer%0a",
                   "/explanations/cifar10%09", "/predictions/cifar10%7F", "/ping%0A",
                   "/v2/health/ready%0A", "/predictions/cifar10\x0b", "/predictions/cifar10\x01",
                   "/predictions/cifar10\x7f", "/predictions/\x1bcifar10"]
CONTROL_HEADERS = [{"Authorization": "Bearer x\x0b"}, {"Content-Type": "image/png\x0c"},
                   {"Content-Type": "multipart/form-data; boundary=b\x01"},
                   {"Inference-Header-Content-Length": "12\x0b"},
                   {"Content-Encoding": "identity\x1b"}, {"X-Form-Content-Type": "x\x7f"},
                   {"User-Agent": "curl\x0b"}, {"Accept": "*/*\x00"},
                   {"X-Forwarded-For": "1.2.3.4\x0b"}]


@needs_nginx
def test_control_characters_in_the_target_or_a_header_value_get_a_400_and_reach_nothing(
        front, served):
    """CR, LF (%0D, %0A: PCRE's `$` matched before a final line feed, and nginx sent it raw in
    TorchServe's request line), other control characters, raw or percent-encoded, in the path,
    and in header values: a 400 from the proxy each, and nothing in TorchServe's access log."""
    since = torchserve_access_log(served).stat().st_size
    body = solid_png(COLOURS[1])
    for target in CONTROL_TARGETS:
        method = "GET" if target.startswith(("/ping", "/v2/health")) else "POST"
        sent = f"{method} {target} HTTP/1.1\r\nHost: x\r\n".encode("latin-1") + "".join(
            f"{k}: {v}\r\n" for k, v in {**inference_headers(served),
                                          "Content-Length": len(body)}.items()).encode()
        responses = exchange(front.inference, sent + b"\r\n" + body)
        assert [status for status, _, _ in responses][:1] == [400], target
        assert json.loads(responses[0][2])["code"] == 400, target
    for extra in CONTROL_HEADERS:
        headers = {**inference_headers(served), "Content-Length": len(body), **extra}
        sent = b"POST /predictions/cifar10 HTTP/1.1\r\nHost: x\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        responses = exchange(front.inference, sent + b"\r\n" + body)
        assert [status for status, _, _ in responses][:1] == [400], extra
    logged = torchserve_logged_after(served, since)
    assert logged.count("HTTP/1.1") == 1, logged  # the marker /ping alone
    # a TAB within a header value is HTTP's own, and still served
    tab = requests.post(f"{front.inference}/predictions/cifar10", data=body,
                        headers={**inference_headers(served), "User-Agent": "a\tb"}, timeout=30)
    assert tab.status_code == 200


@needs_nginx
def test_forwarded_headers_too_long_for_torchserve_get_a_431_naming_the_limits(front, served):
    """TorchServe's frontend takes 8 KiB of headers and answers more a bare 400: the headers the
    proxy forwards are bounded so they always fit, and a longer one gets the proxy's 431."""
    since = torchserve_access_log(served).stat().st_size
    body = solid_png(COLOURS[1])
    for extra in ({"Authorization": "Bearer " + "a" * 1100}, {"Content-Type": "image/" + "p" * 1100},
                  {"X-Min-Confidence": "0." + "5" * 300}, {"Host": "h" * 300},
                  {"Content-Encoding": "i" * 130, "X-Min-Confidence": "0." + "5" * 130}):
        answer = requests.post(f"{front.inference}/predictions/cifar10", data=body, timeout=30,
                               headers={**inference_headers(served), **extra})
        assert answer.status_code == 431, (list(extra), answer.text)
        assert "Authorization and Content-Type take at most 1024" in answer.json()["message"]
    logged = torchserve_logged_after(served, since)
    assert logged.count("HTTP/1.1") == 1, logged  # the marker /ping alone
    at_limit = requests.post(f"{front.inference}/predictions/cifar10", data=body, timeout=30,
                             headers={**inference_headers(served), "Content-Type": "image/png",
                                      "X-Min-Confidence": "0." + "5" * 200})
    assert at_limit.status_code == 200, at_limit.text


def test_every_location_regex_of_the_template_ends_at_the_end_of_the_path():
    """`\\z`, not `$` (which PCRE also matches before a final line feed)."""
    template = proxy.TEMPLATE.read_text()
    regexes = re.findall(r'location ~\*? "([^"]+)"', template)
    assert regexes and all(regex.endswith(r"\z") for regex in regexes), regexes


@needs_nginx
def test_only_the_headers_torchserve_reads_are_forwarded(make_proxy, tmp_path):
    """The stand-in sees the token, the content headers and the proxy's own, never a client's
    other headers."""
    (tmp_path / "config.properties").write_text("max_request_size=8388608\n")
    with StandIn([(200, None, b'{"cat": 1.0}', 0)]) as upstream:
        front = make_proxy(upstream=upstream, ts_config=tmp_path / "config.properties")
        response = requests.post(
            f"{front.inference}/predictions/cifar10", data=b"x", timeout=30,
            headers={"Authorization": "Bearer t", "Content-Type": "image/png", "X-Evil": "1",
                     "explain": "True", "Inference-Header-Content-Length": "1",
                     "Content-Encoding": "identity", "Cookie": "a=b", "X-Min-Confidence": "0.5"})
        assert response.status_code == 200
        assert set(upstream.headers[0]) == {
            "host", "x-forwarded-for", "authorization", "content-type", "content-encoding",
            "inference-header-content-length", "content-length", "x-min-confidence",
            "x-proxy-sent", "x-proxy-resend-after"}
        assert upstream.headers[0]["authorization"] == "Bearer t"
        # When the proxy sent this try, and after how long it sends it once more.
        assert abs(float(upstream.headers[0]["x-proxy-sent"]) - time.time()) < 5
        resend = re.search(r"set \$proxy_resend_after (\d+);", Path(front.conf).read_text())
        assert upstream.headers[0]["x-proxy-resend-after"] == resend[1]


@needs_nginx
def test_an_outage_costs_error_log_nothing_per_refused_request_and_logs_are_private(
        make_proxy, tmp_path):
    """TorchServe down (nothing listens on its port): 300 requests get the proxy's prompt 503,
    and error.log grows by under 100 bytes a request (it grew ~650 before); the logs are
    readable by their owner and group only."""
    (tmp_path / "config.properties").write_text("max_request_size=8388608\n")
    down = SimpleNamespace(inference=f"http://127.0.0.1:{free_port()}",
                           management=f"http://127.0.0.1:{free_port()}")
    front = make_proxy(upstream=down, ts_config=tmp_path / "config.properties")
    run_dir = Path(front.conf).parent
    error_log = run_dir / "error.log"
    before = error_log.stat().st_size
    session = requests.Session()
    statuses = collections.Counter(
        session.post(f"{front.inference}/predictions/cifar10", data=solid_png(COLOURS[0]),
                     headers={"Authorization": "Bearer x"}, timeout=10).status_code
        for _ in range(300))
    assert statuses == {503: 300}
    assert (error_log.stat().st_size - before) / 300 < 100
    for name in ("error.log", "access.log"):
        assert (run_dir / name).stat().st_mode & 0o777 in (0o640, 0o600), name


def test_rotate_keeps_five_logs_and_has_nginx_reopen_them(tmp_path, monkeypatch):
    """Over the size: access.log becomes access.log.1 (the older ones move up, five kept), a new
    0640 access.log is created and nginx's master gets SIGUSR1 (reopen)."""
    (tmp_path / "access.log").write_bytes(b"x" * 200)
    (tmp_path / "error.log").write_bytes(b"e")
    for n in range(1, 6):
        (tmp_path / f"access.log.{n}").write_text(str(n))
    (tmp_path / "nginx.pid").write_text("4242")
    signals = []
    monkeypatch.setattr(proxy.os, "kill", lambda pid, sig: signals.append((pid, sig)))
    assert proxy.rotate(tmp_path, max_bytes=100, keep=5) == ["access.log"]
    assert (tmp_path / "access.log.1").read_bytes() == b"x" * 200
    assert [(tmp_path / f"access.log.{n}").read_text() for n in range(2, 6)] == \
        ["1", "2", "3", "4"]
    assert not (tmp_path / "access.log.6").exists()
    assert (tmp_path / "access.log").stat().st_size == 0
    assert (tmp_path / "access.log").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "error.log").read_bytes() == b"e"
    assert signals == [(4242, proxy.signal.SIGUSR1)]


@needs_nginx
@pytest.mark.parametrize("method,path,status,accepted", [
    ("DELETE", "/predictions/cifar10", 405, "POST only"),
    ("GET", "/predictions/cifar10", 405, "POST only"),
    ("PUT", "/explanations/cifar10", 405, "POST only"),
    ("POST", "/ping", 405, "GET only"),
    ("DELETE", "/v2/models/cifar10", 405, "GET only"),
    ("OPTIONS", "/", 404, "POST /predictions/cifar10"),
    ("GET", "/models", 404, "POST /predictions/cifar10"),
    ("POST", "/predictions/other", 404, "POST /predictions/cifar10"),
    ("GET", "/metrics", 404, "GET /v2/health/live"),
    ("POST", "/v2/models/cifar10/versions/1.0/infer", 404, "POST /v2/models/cifar10/infer"),
])
def test_only_the_apis_methods_and_paths_are_forwarded(front, served, method, path, status,
                                                       accepted):
    """Everything else is a 4xx from the proxy that names what is accepted (TorchServe alone
    answers DELETE /predictions/cifar10 like a POST, and OPTIONS / with its API description
    without a token)."""
    response = requests.request(method, f"{front.inference}{path}",
                                headers=inference_headers(served), data=solid_png(COLOURS[0]),
                                timeout=10)
    assert response.status_code == status, response.text
    assert accepted in response.json()["message"]
    if status == 405:
        assert response.headers["Allow"] in {"POST", "GET"}


@needs_nginx
@pytest.mark.parametrize("data,status", [
    (b"TRACE /predictions/cifar10 HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"GET /ping HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"POST /predictions/cifar10 HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 501),
    (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
], ids=["TRACE", "HTTP/2.0", "chunked-identity", "star"])
def test_nginx_own_refusals_are_json_with_the_error_key_tritonclient_reads(front, data, status):
    """nginx's own HTML error pages (TRACE, HTTP/2.0, a Transfer-Encoding other than chunked)
    are the proxy's JSON like its other errors, each with "error" (tritonclient reads it:
    without it "an exception occurred in the client while decoding the response: 'error'")."""
    (got, headers, body), = exchange(front.inference, data)
    answer = json.loads(body)
    assert (got, answer["code"]) == (status, status)
    assert headers["content-type"] == "application/json" and answer["error"]


@needs_nginx
def test_a_form_encoded_image_gets_a_415_naming_the_accepted_content_types(front, served):
    """`curl --data-binary @cat.jpg` without -H labels the image form-encoded: TorchServe
    alone answers 500 "Bad end of line" (which the proxy resent as a dropped job); the
    proxy answers 415 naming what is accepted, before a byte reaches TorchServe."""
    image = noise_png(64)
    response = requests.post(f"{front.inference}/predictions/cifar10", data=image, timeout=30,
                             headers={**inference_headers(served), "Content-Type":
                                      "application/x-www-form-urlencoded"})
    assert response.status_code == 415, response.text
    assert "application/octet-stream" in response.json()["error"]
    assert "multipart/form-data" in response.json()["message"]


def multipart(parts, boundary=b"b0undary"):
    """A multipart/form-data body of (name, Content-Transfer-Encoding or None, bytes) parts."""
    body = b""
    for name, encoding, data in parts:
        body += (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name
                 + b'"; filename="x.png"\r\nContent-Type: image/png\r\n'
                 + (b"Content-Transfer-Encoding: " + encoding + b"\r\n" if encoding else b"")
                 + b"\r\n" + data + b"\r\n")
    return body + b"--" + boundary + b"--\r\n", \
        "multipart/form-data; boundary=" + boundary.decode()


@needs_nginx
@pytest.mark.parametrize("encoding,encode", [(b"base64", base64.b64encode),
                                             (b"Base64 ", base64.encodebytes),
                                             (b"quoted-printable", lambda data: binascii.b2a_qp(
                                                 data, quotetabs=True, istext=False))],
                         ids=["base64", "Base64-lines", "quoted-printable"])
def test_a_multipart_part_in_a_transfer_encoding_is_decoded_and_answered(front, served,
                                                                         encoding, encode):
    """Finding 8: a part with Content-Transfer-Encoding base64 (or quoted-printable), here the
    second of two, got TorchServe's 500 "TransferEncoding Unknown" (Netty's decoder), and each
    such body stayed in TorchServe's direct memory. The proxy passes multipart bodies on unparsed
    and the handler reads them (cifar10_serve/forms.py): the part is decoded and answered as the
    raw image is, also in a body of 300 KB."""
    image = solid_png(COLOURS[2])
    raw = requests.post(f"{front.inference}/predictions/cifar10", data=image, timeout=30,
                        headers={**inference_headers(served), "Content-Type": "image/png"})
    for first in (solid_png(COLOURS[5]), noise_png(300)):
        body, content_type = multipart([(b"a", None, first), (b"b", encoding, encode(image))])
        response = requests.post(
            f"{front.inference}/predictions/cifar10", data=body, timeout=30,
            headers={**inference_headers(served), "Content-Type": content_type})
        assert response.status_code == 200, response.text
        assert top_of(response.json()[1]) == top(raw)


def top_of(answer):
    return max(answer, key=answer.get)


@needs_nginx
@pytest.mark.parametrize("body,content_type,named", [
    (b"--x\r\n\r\n", "multipart/form-data; boundary=", "with a boundary"),
    (b"--x\r\n\r\nabc\r\n--x--\r\n", "multipart/form-data; boundary=x",
     "no Content-Disposition"),
    (b'--x\r\nContent-Disposition: form-data; name="d"; filename="a.png"\r\n'
     b"Content-Transfer-Encoding: x-uuencode\r\n\r\nabc\r\n--x--\r\n",
     "multipart/form-data; boundary=x", "accepted: 7bit, 8bit, binary, base64, quoted-printable"),
    (b'--x\r\nContent-Disposition: form-data; name="d"; filename="a.png"\r\n\r\nabc',
     "multipart/form-data; boundary=x", "before its closing boundary"),
], ids=["empty-boundary", "no-disposition", "unknown-encoding", "no-closing-boundary"])
def test_a_malformed_multipart_body_gets_a_400_naming_what_is_wrong(front, served, body,
                                                                    content_type, named):
    """Finding 8 and the attack after it: TorchServe's frontend answers these 500 (an empty
    boundary: StringIndexOutOfBoundsException; a part without Content-Disposition:
    NullPointerException; an unknown transfer encoding) and keeps each body in direct memory;
    through the proxy, the handler's 400 names what is wrong."""
    response = requests.post(f"{front.inference}/predictions/cifar10", data=body, timeout=30,
                             headers={**inference_headers(served), "Content-Type": content_type})
    assert response.status_code == 400, response.text
    assert named in response.json()["message"]


@needs_nginx
@pytest.mark.parametrize("encoding", [b"binary", b"8bit", b"BINARY", None])
def test_multipart_parts_in_the_encodings_torchserve_decodes_are_answered(front, served,
                                                                          encoding):
    """The refusal above leaves the encodings TorchServe decodes alone: the same image in
    a binary, 8bit or unlabelled part gets the raw body's answer."""
    image = solid_png(COLOURS[2])
    body, content_type = multipart([(b"data", encoding, image)])
    headers = inference_headers(served)
    response = requests.post(f"{front.inference}/predictions/cifar10", data=body, timeout=30,
                             headers={**headers, "Content-Type": content_type})
    raw = requests.post(f"{front.inference}/predictions/cifar10", data=image, timeout=30,
                        headers={**headers, "Content-Type": "image/png"})
    assert top(response) == top(raw)


@needs_nginx
def test_bodies_over_the_limit_get_413_naming_it(front, served):
    """Over TorchServe's max_request_size (8 MiB): refused before a byte is forwarded, whether
    Content-Length says so or a chunked body grows past it."""
    big = b"\0" * (8 * 1024 * 1024 + 1)
    for extra in ({}, {"Transfer-Encoding": "chunked"}):
        body = iter([big]) if extra else big  # requests sends an iterator chunked
        response = requests.post(f"{front.inference}/predictions/cifar10", data=body,
                                 headers={**inference_headers(served), **extra}, timeout=30)
        assert response.status_code == 413
        assert "8388608 bytes" in response.json()["message"]
        assert "8388608 bytes" in response.json()["error"]


@needs_nginx
def test_answers_of_torchserve_and_the_handler_pass_through_unchanged(front, served):
    """The handler's 400 and 413, TorchServe's 400 for a missing token, and a prediction: the
    same status and body through the proxy as from TorchServe; the Authorization header
    reaches TorchServe."""
    headers = inference_headers(served)
    five = [(f"f{i}", (f"{i}.png", solid_png(c))) for i, c in enumerate(COLOURS[:5])]
    cases = [("/predictions/cifar10", dict(data=b"not an image", headers=headers)),
             ("/explanations/cifar10", dict(files=five, headers=headers)),
             ("/predictions/cifar10", dict(data=solid_png(COLOURS[3]))),
             ("/predictions/cifar10", dict(data=solid_png(COLOURS[3]), headers=headers))]
    statuses = []
    for path, kwargs in cases:
        direct = requests.post(f"{served.inference}{path}", timeout=30, **kwargs)
        proxied = requests.post(f"{front.inference}{path}", timeout=30, **kwargs)
        assert (proxied.status_code, proxied.json()) == (direct.status_code, direct.json())
        statuses.append(direct.status_code)
    assert statuses == [400, 413, 400, 200]


# ------------------------------------------------------------------ finding 7: scaling calls
SCALE_REFUSED = [
    ("PUT", ""),                                    # a bare PUT: TorchServe set min and max to 1
    ("PUT", "min_worker=5"),                        # over maxWorkers 4 (min_worker=50: 48 workers)
    ("PUT", "min_worker=abc"), ("PUT", "min_worker=2147483648"),
    ("PUT", "min_worker=2"),                        # no max_worker: TorchServe overwrote it
    ("PUT", "min_worker=0&max_worker=2"),           # 0: every prediction 503
    ("PUT", "min_worker=-1&max_worker=2"),          # TorchServe: 500 and no worker left
    ("PUT", "min_worker=3&max_worker=2"), ("PUT", "min_worker=1&max_worker=5"),
    ("PUT", "min_worker=01&max_worker=2"), ("PUT", "min_worker=+2&max_worker=2"),
    ("PUT", "min_worker=2.0&max_worker=2"),
    ("PUT", "min_worker=1&min_worker=4&max_worker=4"),
    ("PUT", "min_worker=2&max_worker=2&synchronous=maybe"),
    ("PUT", "min_worker=2&max_worker=2&batch_size=64"),
    ("POST", "min_worker=2&max_worker=2"), ("DELETE", ""),
]


@needs_nginx
@pytest.mark.parametrize("method,query", SCALE_REFUSED)
def test_scaling_outside_1_to_max_workers_is_refused_by_the_proxy(front, served, method, query):
    """Each case of finding 7 a 4xx naming the rule, and the workers untouched."""
    before = [w["pid"] for w in served.describe().json()[0]["workers"]]
    response = requests.request(method, f"{front.management}/models/cifar10?{query}",
                                headers=management_headers(served), timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert "min_worker=N&max_worker=M" in response.json()["message"]
    assert [w["pid"] for w in served.describe().json()[0]["workers"]] == before


@needs_nginx
@pytest.mark.parametrize("method,path", [("POST", "/models?url=cifar10.mar"),
                                         ("GET", "/token?type=inference"),
                                         ("DELETE", "/models/cifar10/1.0"), ("GET", "/models")])
def test_other_management_calls_are_refused_by_the_proxy(front, served, method, path):
    response = requests.request(method, f"{front.management}{path}",
                                headers=management_headers(served), timeout=10)
    assert response.status_code == 404
    assert "PUT /models/cifar10?min_worker=N&max_worker=M" in response.json()["message"]


@needs_nginx
def test_a_valid_scaling_call_passes_and_scaling_calls_run_one_at_a_time(front, served):
    """Both given within 1..maxWorkers: forwarded (describe through the proxy shows it). A
    second call while one runs: a prompt 429 with Retry-After (TorchServe alone holds it
    until the first is done, then applies it)."""
    url, headers = f"{front.management}/models/cifar10", management_headers(served)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(requests.put, url, headers=headers, timeout=120, params=dict(
            min_worker=3, max_worker=3, synchronous="true"))
        time.sleep(0.3)
        second = requests.put(url, headers=headers, timeout=60,
                              params=dict(min_worker=2, max_worker=2))
        assert first.result().status_code == 200
    assert second.status_code == 429 and second.headers["Retry-After"] == "1"
    assert "one at a time" in second.json()["message"]
    described = requests.get(url, headers=headers, timeout=10).json()[0]
    assert (described["minWorkers"], described["maxWorkers"]) == (3, 3)
    assert len(described["workers"]) == 3
    back = requests.put(url, headers=headers, timeout=120,
                        params=dict(min_worker=2, max_worker=2, synchronous="true"))
    assert back.status_code == 200 and len(served.describe().json()[0]["workers"]) == 2


@needs_nginx
def test_a_scale_loop_under_load_loses_no_good_request(front, served, tmp_path):
    """client.py scale through the proxy, 2 -> 1 -> 2 five times, while four clients send
    images: every answer 200 and the right one. TorchServe stops a worker mid-batch ("Worker
    died." 500s) and can lose a job it was taking off its queue (no answer at all); the proxy
    sends both again (alone: 6 good requests answered 500 in six loops)."""
    (tmp_path / "client.properties").write_text(
        f"inference_address={front.inference}\nmanagement_address={front.management}\n")
    scaler = TorchServeClient(tmp_path / "client.properties", served.run_dir / "key_file.json")
    # 2000x2000 images: ~0.1 s of decoding each, so that both workers are busy when a
    # scale-down stops one (the colour net's forward alone takes a millisecond).
    bodies = [solid_png(colour, (2000, 2000)) for colour in COLOURS]
    with GoodTraffic(front.inference, inference_headers(served), bodies, clients=4,
                     check=True) as load:
        time.sleep(1)
        for _ in range(5):
            for workers in (1, 2):
                assert scaler.scale(workers).status_code == 200
                time.sleep(0.5)
    summary = load.summary()
    assert summary["ok"] > 40 and not summary["failed"], [
        (sent.outcome, sent.detail[:80]) for sent in load.failures()]


# ------------------------------------------------------------ per-client limits, body sizes
@needs_nginx
def test_request_rate_per_client_is_bounded_with_a_429_and_retry_after(make_proxy, served):
    """Over the rate (here 2 per second, bursts of 2): a prompt 429 naming it, Retry-After 1,
    and not logged line by line (a flood would rotate the log out)."""
    limited = make_proxy(req_rate=2, req_burst=2)
    session = requests.Session()
    answers = [session.get(f"{limited.inference}/ping", headers=inference_headers(served),
                           timeout=10) for _ in range(12)]
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) >= 6 and {a.status_code for a in answers} == {200, 429}
    assert all(a.headers["Retry-After"] == "1" for a in refused)
    assert "requests per second" in refused[0].json()["message"]
    assert "requests per second" in refused[0].json()["error"]
    log = (Path(limited.conf).parent / "access.log").read_text()
    assert " 429 " not in log and log.count(" 200 ") == 12 - len(refused)


@needs_nginx
def test_the_rate_also_bounds_paths_the_proxy_answers_itself(make_proxy, served):
    """A client looping unknown paths got nginx's own 404 1,600 times a second, past the
    rate limit (a `return` answers before the limits run): the 404 now comes after them."""
    limited = make_proxy(req_rate=2, req_burst=2)
    session = requests.Session()
    statuses = [session.post(f"{limited.inference}/v1/models/cifar10:predict", data=b"x",
                             timeout=10).status_code for _ in range(12)]
    assert statuses.count(429) >= 6 and set(statuses) == {404, 429}


@needs_nginx
def test_requests_in_progress_are_bounded_per_client_and_for_large_bodies(make_proxy, served):
    """Two requests whose bodies are still arriving hold this client's two places: a third
    gets a 429 at once; and one large body (1 MB or more) in progress holds this client's
    one place for large bodies."""
    headers = inference_headers(served)
    for settings, holding, length in (({"conn_per_client": 2}, 2, 1000),
                                      ({"large_per_client": 1}, 1, 2_000_000)):
        limited = make_proxy(**settings)
        holders = hold(limited.inference, holding)
        for sock in holders:
            sock.sendall(request_bytes("POST", "/predictions/cifar10",
                                       {**headers, "Content-Length": length}, b"x"))
        time.sleep(0.3)
        response = requests.post(f"{limited.inference}/predictions/cifar10",
                                 data=b"\0" * length, headers=headers, timeout=10)
        assert response.status_code == 429, response.text
        assert response.headers["Retry-After"] == "1"
        assert "in progress at once" in response.json()["message"]
        for sock in holders:
            sock.close()


def noise_png(side=700):
    """A PNG of noise (it does not compress: over 1 MB at 700x700)."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@needs_nginx
def test_slow_bodies_from_a_few_addresses_do_not_deny_service(make_proxy, served):
    """The attack of issue 27 (F1, F2) scaled down: three addresses hold five trickling bodies
    each and two chunked ones each, more than the places for all clients (8) and for large
    bodies (2). A good client from another address still gets 200 for a small image and for
    a PNG of over 1 MB, whole (the shipped config counted bodies still arriving against all
    clients' places: 429 "... of all clients")."""
    target = make_proxy(conn_per_server=8, large_bodies=2, body_timeout="30s")
    headers = inference_headers(served)
    holders = []
    for source in ("127.0.1.1", "127.0.1.2", "127.0.1.3"):
        for chunked in (False,) * 5 + (True,) * 2:
            sock = socket.create_connection(address(target.inference), timeout=5,
                                            source_address=(source, 0))
            framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": 100000}
            sock.sendall(request_bytes("POST", "/predictions/cifar10", framing,
                                       b"1\r\na\r\n" if chunked else b"a"))
            holders.append(sock)
    try:
        time.sleep(0.3)
        big, small = noise_png(), solid_png(COLOURS[2])
        assert len(big) > 1_000_000
        for body in (small, big):
            response = requests.post(f"{target.inference}/predictions/cifar10", data=body,
                                     headers=headers, timeout=30)
            assert top(response) == top(served.predict(body))
    finally:
        for sock in holders:
            sock.close()


# ------------------------------------------------------- issue 26: v2 health and metadata
@needs_nginx
def test_v2_health_and_metadata_answer_tritonclient_with_the_token(front, served):
    """tritonclient 2.73's calls succeed through the proxy with the inference token (TorchServe
    alone: 404, so False and errors); the metadata is the served model's own answer (its spec's
    name, input shape and classes; the archive's version), and its output names
    and shapes are those an inference answers with."""
    tritonclient = pytest.importorskip("tritonclient.http")
    triton = tritonclient.InferenceServerClient(url=urlsplit(front.inference).netloc)
    headers = inference_headers(served)
    assert triton.is_server_live(headers=headers)
    assert triton.is_server_ready(headers=headers)
    assert triton.is_model_ready("cifar10", headers=headers)
    metadata = triton.get_model_metadata("cifar10", headers=headers)
    assert metadata == served.metadata
    assert metadata["name"] == "cifar10" and metadata["versions"] == ["1.0"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["inputs"]} == {
        ("images", "BYTES", (-1,)), ("images", "UINT8", (-1, 32, 32, 3))}
    server = triton.get_server_metadata(headers=headers)
    assert server["name"] == "cifar10-torchserve" and server["version"] == "0.12.0"
    assert server["extensions"] == ["binary_tensor_data", "classification"]
    # and inference as the client sends it by default (binary tensor data) through the proxy
    images = tritonclient.InferInput("images", [3], "BYTES")
    images.set_data_from_numpy(np.array([solid_png(c) for c in COLOURS[:3]], dtype=np.object_))
    labels = triton.infer("cifar10", [images], headers=dict(headers)).as_numpy("label")
    assert [label.decode() for label in labels] == [top(requests.post(
        f"{served.inference}/predictions/cifar10", data=solid_png(c), headers=headers,
        timeout=30)) for c in COLOURS[:3]]
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(solid_png(c)).decode() for c in COLOURS[:2]]}]}
    answer = requests.post(f"{front.inference}/v2/models/cifar10/infer", json=body,
                           headers=headers, timeout=30).json()
    for declared, output in zip(metadata["outputs"], answer["outputs"]):
        assert (declared["name"], declared["datatype"]) == (output["name"], output["datatype"])
        assert len(declared["shape"]) == len(output["shape"])
        assert all(d in (-1, o) for d, o in zip(declared["shape"], output["shape"]))
    triton.close()


@needs_nginx
@pytest.mark.parametrize("token", [None, "wrong"])
def test_v2_health_and_metadata_refuse_a_missing_or_wrong_token(front, token):
    """The inference token rule: without it, health is false and metadata an error naming the
    token (400, as TorchServe answers inference)."""
    tritonclient = pytest.importorskip("tritonclient.http")
    utils = pytest.importorskip("tritonclient.utils")
    triton = tritonclient.InferenceServerClient(url=urlsplit(front.inference).netloc)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    assert not triton.is_server_live(headers=headers)
    assert not triton.is_server_ready(headers=headers)
    assert not triton.is_model_ready("cifar10", headers=headers)
    for call in (lambda: triton.get_model_metadata("cifar10", headers=headers),
                 lambda: triton.get_server_metadata(headers=headers)):
        with pytest.raises(utils.InferenceServerException, match="Token Authorization failed"):
            call()
    response = requests.get(f"{front.inference}/v2/health/live", headers=headers or {},
                            timeout=10)
    assert response.status_code == 400 and "InvalidKeyException" in response.text
    triton.close()


# ------------------------------------------- what is resent: a stand-in for TorchServe's port
class StandIn(http.server.ThreadingHTTPServer):
    """An HTTP server in front of which the proxy runs, answering POSTs from ``script`` (a
    list of (status, content type or None, body, seconds to wait) in turn) and /ping with
    ``ping``; it records the bodies it received."""

    def __init__(self, script, ping=200):
        self.script, self.ping, self.received, self.headers = list(script), ping, [], []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(handler):  # noqa: N805
                handler.server.received.append(
                    handler.rfile.read(int(handler.headers["Content-Length"])))
                handler.server.headers.append({k.lower(): v for k, v in handler.headers.items()})
                status, kind, body, wait = handler.server.script.pop(0)
                time.sleep(wait)
                handler.answer(status, kind, body)

            def do_GET(handler):  # noqa: N805
                ok = handler.headers.get("Authorization") == "Bearer good"
                status = handler.server.ping if ok else 400
                handler.answer(status, "application/json", b'{"status": "x"}')

            def answer(handler, status, kind, body):  # noqa: N805
                handler.send_response(status)
                if kind:
                    handler.send_header("Content-Type", kind)
                handler.send_header("Content-Length", str(len(body)))
                handler.send_header("Retry-After", "7")
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):  # noqa: N805
                pass
        super().__init__(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{self.server_address[1]}"
        self.inference = self.management = url

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


DROPPED = json.dumps({"code": 500, "type": "InternalServerException",
                      "message": "Worker died."}).encode()
KILLED = json.dumps({"code": 507, "type": "InternalServerException",
                     "message": "Worker died."}).encode()
HANDLER_500 = json.dumps({"code": 500, "type": "InternalServerError",
                          "message": "the server failed while answering this predict request "
                                     "(logged)"}).encode()


@needs_nginx
@pytest.mark.parametrize("script,status,sent", [
    # TorchServe's own 500 for a request a stopped worker dropped: sent again, answered.
    ([(500, "application/json", DROPPED, 0), (200, None, b'{"cat": 1.0}', 0)], 200, 2),
    # its 507 for a request whose worker was SIGKILLed (exit 137): likewise.
    ([(507, "application/json", KILLED, 0), (200, None, b'{"cat": 1.0}', 0)], 200, 2),
    # no answer within resend_after (a stopped worker, a job TorchServe lost): sent again.
    ([(200, None, b'{"late": 1.0}', 3), (200, None, b'{"cat": 1.0}', 0)], 200, 2),
    # sent once more at most: the second try's answer passes through, whatever it is.
    ([(507, "application/json", KILLED, 0), (500, "application/json", DROPPED, 0)], 500, 2),
    # the handler's own 500 (the worker's answers carry no Content-Type): answered, not resent.
    ([(500, None, HANDLER_500, 0)], 500, 1),
    # every other answer passes through once, unchanged: the handler's 4xx, a 429 or 503 with
    # Retry-After, TorchServe's 503 (queue full).
    ([(400, None, b'{"code": 400}', 0)], 400, 1), ([(413, None, b'{"code": 413}', 0)], 413, 1),
    ([(429, None, b'{"code": 429}', 0)], 429, 1),
    ([(503, "application/json", b'{"code": 503}', 0)], 503, 1),
], ids=["dropped-500", "killed-507", "lost", "twice", "handler-500", "400", "413", "429", "503"])
def test_only_what_torchserve_dropped_or_lost_is_sent_again(make_proxy, tmp_path, script,
                                                            status, sent):
    (tmp_path / "config.properties").write_text("max_request_size=8388608\n")
    with StandIn(script) as upstream:
        front = make_proxy(upstream=upstream, ts_config=tmp_path / "config.properties",
                           resend_after=2)
        body = solid_png(COLOURS[4])
        response = requests.post(f"{front.inference}/predictions/cifar10", data=body,
                                 timeout=30)
        assert response.status_code == status
        assert upstream.received == [body] * sent
        if status == 200:
            assert response.json() == {"cat": 1.0}
        elif status == 500 and sent == 2:
            assert response.json()["message"] == "Worker died."
        elif status == 500:
            assert "failed while answering" in response.json()["message"]
        else:
            assert response.json() == {"code": status}
            assert response.headers["Retry-After"] == "7"


@needs_nginx
def test_requests_handed_to_torchserve_are_bounded_with_a_429(make_proxy, tmp_path):
    """At most conn_per_server requests (here 4, and 1 place for resends) are with TorchServe
    at once: the others get a prompt 429 naming it, with Retry-After 1 and the "error" key
    tritonclient reads."""
    (tmp_path / "config.properties").write_text("max_request_size=8388608\n")
    with StandIn([(200, None, b'{"cat": 1.0}', 1.5)] * 7) as upstream:
        front = make_proxy(upstream=upstream, ts_config=tmp_path / "config.properties",
                           conn_per_server=4)
        with ThreadPoolExecutor(7) as pool:
            answers = list(pool.map(lambda _: requests.post(
                f"{front.inference}/predictions/cifar10", data=b"x", timeout=30), range(7)))
        assert sorted(a.status_code for a in answers) == [200] * 5 + [429] * 2
        refused = [a for a in answers if a.status_code == 429]
        assert all(a.headers["Retry-After"] == "1" for a in refused)
        assert "4 requests" in refused[0].json()["error"]
        assert len(upstream.received) == 5


@needs_nginx
def test_a_request_unanswered_twice_gets_a_prompt_503(make_proxy, tmp_path):
    """No answer within resend_after, then none within read_timeout to the one resend: a 503
    with Retry-After, and the request was sent twice, no more."""
    (tmp_path / "config.properties").write_text("max_request_size=8388608\n")
    with StandIn([(200, None, b'{"late": 1.0}', 4)] * 2) as upstream:
        front = make_proxy(upstream=upstream, ts_config=tmp_path / "config.properties",
                           resend_after=1, read_timeout=2)
        started = time.monotonic()
        response = requests.post(f"{front.inference}/predictions/cifar10", data=b"x", timeout=30)
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert 2.5 < time.monotonic() - started < 4 and len(upstream.received) == 2


@needs_nginx
@pytest.mark.parametrize("ping,live,ready", [(200, 200, 200), (500, 200, 400)])
def test_v2_health_follows_torchserves_ping(make_proxy, tmp_path, ping, live, ready):
    """/ping 200: live and ready; /ping 500 (short of workers, token accepted): live, not ready
    (400, empty body, as the protocol says); a token /ping refuses: 400 naming it."""
    (tmp_path / "config.properties").write_text("max_request_size=8388608\n")
    with StandIn([], ping=ping) as upstream:
        front = make_proxy(upstream=upstream, ts_config=tmp_path / "config.properties")
        good = {"Authorization": "Bearer good"}
        for path, want in (("/v2/health/live", live), ("/v2/health/ready", ready),
                           ("/v2/models/cifar10/ready", ready)):
            response = requests.get(f"{front.inference}{path}", headers=good, timeout=10)
            assert (response.status_code, response.content) == (want, b""), path
            refused = requests.get(f"{front.inference}{path}",
                                   headers={"Authorization": "Bearer bad"}, timeout=10)
            assert refused.status_code == 400 and "Token" in refused.json()["error"]


# ----------------------------------------------------------------- make serve-proxy, k8s
@needs_nginx
def test_proxy_py_start_and_stop_as_make_serve_proxy_runs_them(served, tmp_path):
    """`proxy.py start` (what `make serve-proxy` runs after `make serve`): nginx in the
    background, client.properties through it for client.py; `stop` ends it, by its pid."""
    run = tmp_path / "proxy"
    listen, manage = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    assert proxy.main(["start", "--run-dir", str(run), "--ts-config",
                       str(served.run_dir / "config.properties"),
                       "--listen", listen, "--listen-management", manage]) == 0
    master = int((run / "nginx.pid").read_text())
    try:
        through = TorchServeClient(run / "client.properties", served.run_dir / "key_file.json")
        assert through.inference == f"http://{listen}"
        assert top(through.predict(solid_png(COLOURS[5]))) == top(served.predict(
            solid_png(COLOURS[5])))
        assert len(through.describe().json()[0]["workers"]) == 2
    finally:
        assert proxy.main(["stop", "--run-dir", str(run)]) == 0
    assert not Path(f"/proc/{master}").exists()
    with pytest.raises(OSError):
        socket.create_connection(address(f"http://{listen}"), timeout=2)


@needs_nginx
def test_the_kubernetes_sidecar_config_passes_nginx_t(tmp_path):
    """The pod's config (`make k8s-config`: deploy/k8s/nginx.conf), its paths moved under
    tmp_path."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(proxy.pod_conf().replace(proxy.K8S["run_dir"], str(tmp_path)))
    check = proxy.subprocess.run([proxy.nginx_binary(), "-t", "-q", "-c", str(conf)],
                                 capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


# ------------------------------------------------------------------------- client.py alone
def test_client_resends_what_a_stopped_worker_dropped_and_nothing_else(monkeypatch, tmp_path):
    """Straight to TorchServe (no proxy): its own 500 for a dropped request is sent again; the
    handler's 500 is not."""
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "k"}}))
    client = TorchServeClient(tmp_path / "none.properties", tmp_path / "key_file.json")
    answers = iter([(500, DROPPED), (200, b"{}"), (500, HANDLER_500)])
    sent = []

    def request(method, url, **kwargs):
        sent.append(url)
        response = requests.Response()
        response.status_code, response._content = next(answers)
        return response
    monkeypatch.setattr(client.session, "request", request)
    monkeypatch.setattr(client_module.time, "sleep", lambda s: None)
    assert client.predict(b"image").status_code == 200 and len(sent) == 2
    assert client.predict(b"image").status_code == 500 and len(sent) == 3


def test_client_scale_sends_both_counts_and_again_after_a_500(monkeypatch, tmp_path):
    """The proxy passes a scaling call only with min_worker and max_worker both given; a 500
    (TorchServe 0.12's scale-down race, seen in a 20-loop run) gets the same call once more."""
    (tmp_path / "key_file.json").write_text(json.dumps({"management": {"key": "k"}}))
    client = TorchServeClient(tmp_path / "none.properties", tmp_path / "key_file.json")
    calls, statuses = [], iter([200, 500, 200, 500, 500])

    def request(method, url, **kwargs):
        calls.append(kwargs["params"])
        response = requests.Response()
        response.status_code, response._content = next(statuses), b"{}"
        return response
    monkeypatch.setattr(client.session, "request", request)
    monkeypatch.setattr(client_module.time, "sleep", lambda s: None)
    assert client.scale(3).status_code == 200
    assert calls == [{"min_worker": 3, "max_worker": 3, "synchronous": "true"}]
    assert client.scale(1).status_code == 200 and len(calls) == 3
    assert client.scale(1).status_code == 500 and len(calls) == 5


def test_the_proxys_folder_under_tmp_is_taken_only_where_it_is_its_own(tmp_path):
    """proxy.own_folder: created 0755, or refused where it is a link, writable by others or
    (as root) another user's: its name under /tmp is predictable, and the canary's state and
    nginx's temporary files are written there as root."""
    made = tmp_path / "made"
    proxy.own_folder(made)
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o755
    proxy.own_folder(made)  # ours already: taken
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    refused = [tmp_path / "link", shared]
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 65534, 65534)
        refused.append(theirs)
    for path in refused:
        with pytest.raises(RuntimeError, match="remove it"):
            proxy.own_folder(path)


def test_the_canary_state_is_written_as_a_new_file_never_through_a_link(tmp_path):
    """set_canary writes a fresh file and renames it over the state: a link planted where a
    fixed temporary name would be is never followed."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "nginx.conf").write_text(proxy.canary_conf(tmp_path))
    secret = tmp_path / "secret"
    secret.write_text("root's")
    secret.chmod(0o600)
    (tmp_path / "tmp" / "canary.json.new").symlink_to(secret)
    proxy.set_canary(tmp_path, "2.0", 10)
    assert secret.read_text() == "root's" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    state = tmp_path / "tmp" / "canary.json"
    assert json.loads(state.read_text()) == {"version": "2.0", "share": 10}
    assert stat.S_IMODE(state.stat().st_mode) == 0o644 and not state.is_symlink()
