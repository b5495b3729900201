"""A worker that dies or stops answering costs no request through the proxy: a real TorchServe
serving the colour net (its answers tell images apart), nginx in front (proxy.py), 8 connections
of good traffic, and a worker of that TorchServe SIGKILLed (TorchServe answers its batch 507
"Worker died.") or SIGSTOPped (TorchServe fails its batch only at responseTimeout). Every answer
is checked against the one TorchServe gave that image before. Workers are found by the pids the
management API's describe gives, children of the TorchServe this module started.

Needs nginx (apt-get install nginx): skipped, with the reason, where it is missing outside CI.
"""
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import COLOURS, solid_png
from ts.context import RequestProcessor

import cifar10_handler as handler_module
from cifar10_serve import budget

from test_serving import torchserve
from tests.harness import GoodTraffic, local_proxy

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None and not os.environ.get("CI"),
                                reason="the proxy tests need nginx (apt-get install nginx)")
CONNECTIONS = 8


@pytest.fixture(scope="module")
def deployment(colour_checkpoint, tmp_path_factory):
    """TorchServe (its own: its workers get killed) and the proxy in front, shipped settings."""
    run = tmp_path_factory.mktemp("torchserve")
    with torchserve(colour_checkpoint, run) as ts:
        ts.headers = {"Authorization": "Bearer " + json.loads(
            (run / "key_file.json").read_text())["inference"]["key"]}
        with local_proxy(ts, tmp_path_factory.mktemp("proxy")) as front:
            ts.front = front
            yield ts


def workers(ts):
    """TorchServe's workers: (id, pid, status), each pid a live child of its Java process."""
    children = {p.pid for p in ts.server.children(recursive=True)}
    return [(w["id"], w["pid"], w["status"]) for w in ts.describe().json()[0]["workers"]
            if w.get("pid") in children]


def two_ready(ts, timeout=180):
    """The pids of TorchServe's two workers once both are READY and answering."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = workers(ts)
        if len(found) == 2 and all(status == "READY" for _, _, status in found):
            return [pid for _, pid, _ in found]
        time.sleep(0.5)
    raise TimeoutError(f"TorchServe's workers not both READY after {timeout} s: {workers(ts)}")


@pytest.fixture
def traffic(deployment):
    """Good traffic through the proxy while the test runs (tests/harness.py: CONNECTIONS
    connections, each answer's top class checked against the one the proxy gave that image
    alone first)."""
    two_ready(deployment)
    bodies = [solid_png(colour) for colour in COLOURS]
    with GoodTraffic(deployment.front.inference, deployment.headers, bodies,
                     clients=CONNECTIONS, check=True) as good:
        time.sleep(2)
        yield good


def torchserve_statuses(ts, since):
    """Statuses TorchServe's access log recorded for inference after byte ``since``."""
    log = ts.run_dir / "logs" / "access_log.log"
    text = log.read_bytes()[since:].decode(errors="replace")
    return collections.Counter(re.findall(r'"POST /predictions/cifar10 HTTP/1.1" (\d+)', text))


def log_size(ts):
    log = ts.run_dir / "logs" / "access_log.log"
    return log.stat().st_size if log.exists() else 0


def test_five_sigkills_of_a_worker_cost_no_request(deployment, traffic):
    """Five SIGKILLs of a worker, each once both workers are READY again: TorchServe answers
    the killed worker's batch 507 "Worker died." (seen in its access log), the proxy sends those
    requests once more, and no client sees a failure or a wrong answer."""
    since = log_size(deployment)
    for kill in range(5):
        pids = two_ready(deployment)
        time.sleep(1)  # both busy with the traffic
        psutil.Process(pids[kill % 2]).send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 180
        while pids[kill % 2] in [pid for _, pid, _ in workers(deployment)]:
            assert time.monotonic() < deadline, "TorchServe never noticed the killed worker"
            time.sleep(0.2)
    two_ready(deployment)
    time.sleep(1)
    traffic.__exit__()
    time.sleep(1.5)  # TorchServe's access log is written asynchronously
    assert traffic.failures() == [] and len(traffic.results()) > 100, traffic.summary()
    assert torchserve_statuses(deployment, since)["507"] >= 1, \
        "no request was in a killed worker's batch: the test checked nothing"


def test_a_worker_stopped_for_15_seconds_costs_no_request(deployment, traffic):
    """One worker SIGSTOPped for 15 s (TorchServe replaces it only at responseTimeout, 10 s):
    its batch is sent once more after half responseTimeout and answered by the other worker
    (the proxy's access log shows upstream statuses 504 : 200), and no client sees a failure
    or a wrong answer."""
    pid = two_ready(deployment)[0]
    stopped = psutil.Process(pid)
    stopped.send_signal(signal.SIGSTOP)
    try:
        time.sleep(15)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            stopped.send_signal(signal.SIGCONT)  # TorchServe has killed it by now
    time.sleep(3)
    traffic.__exit__()
    assert traffic.failures() == [] and len(traffic.results()) > 100, traffic.summary()
    access = (Path(deployment.front.conf).parent / "access.log").read_text()
    assert re.search(r"upstream=504 : 200/", access), "no request was resent after a timeout"
    two_ready(deployment)


def test_a_try_the_proxy_sent_again_before_it_left_the_queue_is_not_computed(make_handler,
                                                                               colour_checkpoint):
    """A row whose X-Proxy-Sent + X-Proxy-Resend-After passed before the worker took it gets a
    503 without being decoded or computed; its batch neighbours (a try still in time, a resend,
    a request that did not come through the proxy) are answered."""
    handler = make_handler(colour_checkpoint)
    now = time.time()
    headers = [{"X-Proxy-Sent": f"{now - 6:.3f}", "X-Proxy-Resend-After": "5"},
               {"X-Proxy-Sent": f"{now - 1:.3f}", "X-Proxy-Resend-After": "5"},
               {"X-Proxy-Sent": f"{now - 6:.3f}"}, {}]
    handler.context.request_processor = [RequestProcessor(h) for h in headers]
    # The given-up row's body is not an image: decoding it would be a 400, not the 503.
    rows = [{"body": b"not an image"}] + [{"body": solid_png(COLOURS[0])}] * 3
    outputs = handler.handle(rows, handler.context)
    statuses = [p.get_response_status_code() for p in handler.context.request_processor]
    assert statuses == [503, 200, 200, 200]
    assert "sent the request once more" in outputs[0]["message"]
    assert all(max(answer, key=answer.get) == max(outputs[1], key=outputs[1].get)
               for answer in outputs[1:])


def test_a_try_whose_resend_time_passes_while_its_batch_decodes_is_not_decoded(
        make_handler, colour_checkpoint, monkeypatch):
    """The check is made again when a row's turn to decode comes: a slow neighbour (here a
    decode that takes 0.5 s) can carry a try past the proxy's resend time."""
    handler = make_handler(colour_checkpoint)
    decode = handler_module.decode_request
    decoded = []

    def slow(images, limits, spec):
        decoded.append(len(images))
        time.sleep(0.5)
        return decode(images, limits, spec)
    monkeypatch.setattr(handler_module, "decode_request", slow)
    now = time.time()
    headers = [{"X-Proxy-Sent": f"{now:.3f}", "X-Proxy-Resend-After": "0.3"}] * 2
    handler.context.request_processor = [RequestProcessor(h) for h in headers]
    handler.handle([{"body": solid_png(COLOURS[0])}] * 2, handler.context)
    statuses = [p.get_response_status_code() for p in handler.context.request_processor]
    assert statuses == [200, 503] and decoded == [1]


def test_a_batch_past_its_wall_clock_bound_decodes_no_more(make_handler, colour_checkpoint,
                                                           monkeypatch):
    """On a CPU shared with other processes the wall clock outruns the worker's CPU time, which
    the budget counts: once a batch has run budget.wall seconds, its other requests get a
    prompt 503 (with Retry-After) instead of TorchServe killing the worker at responseTimeout."""
    handler = make_handler(colour_checkpoint)
    # Where decoding one more request at max_decode_ms could pass half of responseTimeout.
    assert handler.budget.wall == budget.headroom_cap(budget.TORCHSERVE_RESPONSE_TIMEOUT,
                                                      handler.limits["max_decode_ms"])
    handler.budget.wall = 0.3
    decode = handler_module.decode_request

    def slow(images, limits, spec):
        time.sleep(0.5)
        return decode(images, limits, spec)
    monkeypatch.setattr(handler_module, "decode_request", slow)
    handler.context.request_processor = [RequestProcessor({}) for _ in range(3)]
    outputs = handler.handle([{"body": solid_png(COLOURS[0])}] * 3, handler.context)
    processors = handler.context.request_processor
    assert [p.get_response_status_code() for p in processors] == [200, 503, 503]
    assert "the server is busy" in outputs[1]["message"]
    assert processors[1].get_response_headers().get("Retry-After")


def test_requests_still_queued_when_the_proxy_sends_them_again_run_once(deployment):
    """Both workers stopped, so requests queue in TorchServe past the proxy's resend time (half
    responseTimeout): each is sent once more, and when the workers go on, the first tries still
    queued are answered without being computed (ts_handler_given_up) and the resends answer
    every client, correctly."""
    pids = two_ready(deployment)
    expected = {c: deployment.predict(solid_png(COLOURS[c])).json() for c in range(4)}
    before = given_up(deployment)
    stopped = [psutil.Process(pid) for pid in pids]
    results = {}

    def ask(index):
        colour = index % 4
        try:
            answer = requests.post(f"{deployment.front.inference}/predictions/cifar10",
                                   data=solid_png(COLOURS[colour]), headers=deployment.headers,
                                   timeout=60)
            results[index] = (answer.status_code, answer.json() == expected[colour])
        except requests.RequestException as err:
            results[index] = (0, repr(err))
    for process in stopped:
        process.send_signal(signal.SIGSTOP)
    try:
        clients = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for client in clients:
            client.start()
            time.sleep(0.05)
        time.sleep(7)  # past the proxy's 5 s, within TorchServe's 10 s responseTimeout
    finally:
        for process in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)
    for client in clients:
        client.join()
    assert results == {i: (200, True) for i in range(12)}
    assert given_up(deployment) - before >= 1, "no first try was still queued: checked nothing"
    two_ready(deployment)


def given_up(ts):
    """The workers' ts_handler_given_up counters, summed (0 before the first)."""
    text = ts.metrics().text
    return sum(float(v) for v in re.findall(r"^ts_handler_given_up\{.*\} (\S+)$", text, re.M))
