"""`make release`, `make rollback` and `make status` (release.py) against a real TorchServe with
the proxy in front, under steady traffic: a release of different weights goes through its gate
and canary and is promoted with no failed request, every answer from one version; a worse
checkpoint is refused at the gate and never answers a user; a rollback brings the previous
version back with no failed request. The nets are the colour net of conftest.py (its answers
tell images apart) and variants of it; the gate's check set is labelled by the serving net's own
answers, so the serving version scores 100 % and the scrambled one ~0 %."""
import json
import os
import random
import signal
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import requests
import torch
from conftest import COLOURS, ROOT, solid_png
from ts.context import RequestProcessor

import proxy
import release
from test_serving import replace_in_zip, torchserve
from tests.harness import GoodTraffic, local_proxy

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None and not os.environ.get("CI"),
                                reason="the release tests need nginx (apt-get install nginx)")
# 40 colours: the ten of conftest and 30 drawn once.
PALETTE = COLOURS + [tuple(random.Random(i).randrange(256) for _ in range(3)) for i in range(30)]
IMAGES = [solid_png(colour) for colour in PALETTE]
CANARY_SHARE = 30


def variant(checkpoint, out, change):
    state = torch.load(checkpoint, weights_only=True)
    weights = dict(state["state_dict"])
    weights["head.weight"] = change(weights["head.weight"].clone())
    torch.save({**state, "state_dict": weights}, out)
    return out


@pytest.fixture(scope="module")
def checkpoints(colour_checkpoint, tmp_path_factory):
    """Different weights with the same answers (the logits scaled), and a worse checkpoint (the
    classifier's rows rolled by one: every answer another class)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {"better": variant(colour_checkpoint, folder / "scaled.pt", lambda w: 1.5 * w),
            "worse": variant(colour_checkpoint, folder / "scrambled.pt",
                             lambda w: torch.roll(w, 1, dims=0))}


@pytest.fixture(scope="module")
def stack(colour_checkpoint, tmp_path_factory):
    """TorchServe (version 1.0 of the colour net, the model API on loopback as configured) and
    the proxy in front, both on free ports; the flags `make release` needs to reach them."""
    run = tmp_path_factory.mktemp("torchserve")
    with torchserve(colour_checkpoint, run) as ts:
        proxy_dir = tmp_path_factory.mktemp("proxy")
        with local_proxy(ts, proxy_dir) as front:
            tokens = json.loads((run / "key_file.json").read_text())
            front.token = {"Authorization": f"Bearer {tokens['inference']['key']}"}
            front.management_token = {
                "Authorization": f"Bearer {tokens['management']['key']}"}
            front.ts, front.state = ts, run / "release.json"
            front.make = [f"TS_CONFIG={run / 'config.properties'}",
                          f"KEY_FILE={run / 'key_file.json'}", f"PROXY_DIR={proxy_dir}",
                          f"RELEASE_STATE={front.state}"]
            yield front


@pytest.fixture(scope="module")
def check_dir(stack, tmp_path_factory):
    """The gate's check set: each image in the folder of the class version 1.0 answers."""
    folder = tmp_path_factory.mktemp("check")
    for index, body in enumerate(IMAGES):
        answer = requests.post(f"{stack.ts.inference}/predictions/cifar10", data=body,
                               headers=stack.token, timeout=30).json()
        label = max(answer, key=answer.get)
        (folder / label).mkdir(exist_ok=True)
        (folder / label / f"{index}.png").write_bytes(body)
    return folder


class Traffic(GoodTraffic):
    """8 connections sending the images through the proxy without pause (tests/harness.py);
    ``answers``: each request's (start, end (time.time), image, status, X-Model-Version, top
    class or the start of its error)."""

    def __init__(self, url, headers):
        super().__init__(url, headers, IMAGES, clients=8)

    @property
    def answers(self):
        return [(s.wall, s.wall + s.seconds, s.body, s.outcome, s.version,
                 s.top if s.outcome == 200 else s.detail) for s in self.results()]

    def failed(self):
        return [a for a in self.answers if a[3] != 200]

    def between(self, since, until=float("inf")):
        return [a for a in self.answers if a[0] >= since and a[1] <= until]


def make(stack, target, *variables):
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), target, *stack.make,
                           *variables], capture_output=True, text=True, timeout=600)


def steps(stack):
    return json.loads(stack.state.read_text())["steps"]


def last(stack, name):
    return [s for s in steps(stack) if s["step"] == name][-1]


def registered(stack):
    listed = requests.get(f"{stack.ts.management}/models/cifar10/all",
                          headers=stack.management_token, timeout=10).json()
    return sorted(d["modelVersion"] for d in listed)


def consistent(answers):
    """Each (image, version) always got the same class: no answer crossed between versions."""
    seen = {}
    for _, _, index, _, version, top in answers:
        assert seen.setdefault((index, version), top) == top, (index, version)


# ---------------------------------------------------------------------------- under traffic
def test_release_gates_canaries_and_promotes_without_a_failed_request(stack, checkpoints,
                                                                       check_dir):
    workers = {worker.pid for worker in stack.process.children()}
    with Traffic(stack.inference, stack.token) as traffic:
        time.sleep(1)
        done = make(stack, "release", f"WEIGHTS={checkpoints['better']}",
                    f"RELEASE_CHECK_DIR={check_dir}", "RELEASE_MARGIN=0.1",
                    f"CANARY_SHARE={CANARY_SHARE}",
                    "CANARY_SECONDS=6", "RELEASE_ARGS=--canary-min-requests 10 "
                    "--latency-factor 5 --latency-slack 1")
        time.sleep(1)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert traffic.failed() == [] and len(traffic.answers) > 100
    # Nothing reloaded nginx (a reload closes idle keep-alive connections under their clients).
    assert {worker.pid for worker in stack.process.children()} == workers
    consistent(traffic.answers)
    gate = last(stack, "gate")
    # The scaled logits change the forward's int8 rounding and where gated TTA looks twice.
    assert gate["passed"] and gate["serving_accuracy"] == 1.0 and gate["accuracy"] >= 0.9
    registering, canary = last(stack, "register")["time"], last(stack, "canary")["time"]
    default, promoted = last(stack, "default")["time"], last(stack, "promoted")["time"]
    assert {a[4] for a in traffic.between(0, registering)} == {"1.0"}
    # The gate asked version 2.0 on its own route: no user answer came from it before the canary.
    assert {a[4] for a in traffic.answers if a[1] < canary} == {"1.0"}
    during = [a[4] for a in traffic.between(canary, default)]
    share = during.count("2.0") / len(during)
    assert len(during) > 30 and set(during) == {"1.0", "2.0"}
    assert CANARY_SHARE / 100 - 0.15 < share < CANARY_SHARE / 100 + 0.15, share
    after = traffic.between(promoted)
    assert after and {a[4] for a in after} == {"2.0"}
    assert {a[4] for a in traffic.between(default)} == {"2.0"}
    assert registered(stack) == ["2.0"]
    judged = last(stack, "judged")
    assert judged["passed"] and judged["canary"]["errors"] == 0


def test_a_worse_checkpoint_is_refused_at_the_gate_and_answers_no_user(stack, checkpoints,
                                                                        check_dir):
    assert registered(stack) == ["2.0"]
    with Traffic(stack.inference, stack.token) as traffic:
        done = make(stack, "release", f"WEIGHTS={checkpoints['worse']}",
                    f"RELEASE_CHECK_DIR={check_dir}", "RELEASE_MARGIN=0.1",
                    "CANARY_SECONDS=6")
    assert done.returncode != 0
    assert "refused" in done.stderr
    assert traffic.failed() == [] and {a[4] for a in traffic.answers} == {"2.0"}
    gate = last(stack, "gate")
    assert gate["version"] == "3.0" and not gate["passed"] and gate["accuracy"] < 0.5
    assert last(stack, "refused")["version"] == "3.0"
    assert not [s for s in steps(stack) if s["step"] == "canary" and s["version"] == "3.0"]
    assert registered(stack) == ["2.0"]


def test_an_archive_whose_net_misses_its_golden_answers_never_starts(stack, checkpoints,
                                                                    tmp_path):
    """Version 2.0's archive with the scrambled weights in it (its golden set is 2.0's): the
    workers refuse to start, the release is refused and the version unregistered."""
    mar = tmp_path / "cifar10-4.0.mar"
    shutil.copy(stack.ts.run_dir / "store" / "cifar10-2.0.mar", mar)
    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    manifest["model"]["modelVersion"] = "4.0"
    replace_in_zip(mar, "MAR-INF/MANIFEST.json", json.dumps(manifest).encode())
    replace_in_zip(mar, manifest["model"]["serializedFile"], checkpoints["worse"].read_bytes())
    with Traffic(stack.inference, stack.token) as traffic:
        done = make(stack, "release", f"RELEASE_ARGS=--mar {mar}")
    assert done.returncode != 0 and "version 4.0 did not start" in done.stderr, done.stderr
    assert traffic.failed() == [] and {a[4] for a in traffic.answers} == {"2.0"}
    assert last(stack, "refused")["version"] == "4.0"
    assert registered(stack) == ["2.0"]


def test_rollback_restores_the_previous_version_without_a_failed_request(stack):
    with Traffic(stack.inference, stack.token) as traffic:
        time.sleep(1)
        started = time.time()
        done = make(stack, "rollback")
        took = time.time() - started
        time.sleep(1)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert traffic.failed() == []
    consistent(traffic.answers)
    rolled = last(stack, "rolled-back")
    assert rolled["version"] == "1.0" and rolled["previous"] == "2.0"
    assert {a[4] for a in traffic.between(last(stack, "default")["time"])} == {"1.0"}
    assert registered(stack) == ["1.0"]
    assert took < 120, took
    shown = make(stack, "status")
    assert shown.returncode == 0, shown.stderr
    assert "default version 1.0" in shown.stdout and "rolled-back" in shown.stdout
    assert "previous version (make rollback): 2.0" in shown.stdout


def test_rollback_after_a_release_killed_in_its_canary_takes_that_release_down(stack,
                                                                                checkpoints,
                                                                                check_dir):
    """A release killed (SIGKILL) during its canary leaves its version registered and the split
    on; make rollback then takes that release down (no failed request) and the default version
    serves alone, with the previous version still the one a further rollback returns to."""
    with Traffic(stack.inference, stack.token) as traffic:
        since = time.time()
        running = subprocess.Popen(
            ["make", "--no-print-directory", "-C", str(ROOT), "release", *stack.make,
             f"WEIGHTS={checkpoints['better']}", f"RELEASE_CHECK_DIR={check_dir}",
             "RELEASE_MARGIN=0.1", "CANARY_SECONDS=120"], start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while not [s for s in steps(stack) if s["step"] == "canary"
                       and s["time"] > since]:
                assert running.poll() is None and time.monotonic() < deadline, steps(stack)[-3:]
                time.sleep(0.5)
            time.sleep(2)  # the canary answers users
        finally:
            os.killpg(running.pid, signal.SIGKILL)  # make and release.py, which this test started
            running.wait()
        assert len(registered(stack)) == 2
        done = make(stack, "rollback")
        time.sleep(1)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert traffic.failed() == []
    consistent(traffic.answers)
    assert registered(stack) == ["1.0"]
    assert last(stack, "recovered")["serving"] == "1.0"
    assert {a[4] for a in traffic.between(last(stack, "recovered")["time"])} == {"1.0"}
    state = json.loads(stack.state.read_text())
    assert state["canary"] is None and state["previous"] == "2.0"


def test_the_proxy_forwards_no_registration_nor_version_change(stack):
    for method, path, params in (("POST", "/models", {"url": "cifar10-2.0.mar"}),
                                 ("PUT", "/models/cifar10/2.0/set-default", {}),
                                 ("DELETE", "/models/cifar10/1.0", {}),
                                 ("DELETE", "/models/cifar10", {})):
        answer = requests.request(method, stack.management + path, params=params,
                                  headers=stack.management_token, timeout=10)
        assert answer.status_code in (404, 405), (method, path, answer.text)
    assert registered(stack) == ["1.0"]


# ------------------------------------------------------------------------------ the pieces
def test_every_answer_names_the_version_that_made_it(make_handler, colour_checkpoint):
    handler = make_handler(colour_checkpoint)
    handler.context.manifest = {"model": {"serializedFile": "weights.pt",
                                          "modelVersion": "7.1"}}
    handler.context.request_processor = [RequestProcessor({}) for _ in range(2)]
    handler.handle([{"body": IMAGES[0]}, {"body": b"not an image"}], handler.context)
    for processor in handler.context.request_processor:
        assert processor.get_response_headers()["X-Model-Version"] == "7.1"


def test_the_canary_split_is_a_state_file_read_per_request_with_the_share_and_version(tmp_path):
    text = proxy.canary_conf(tmp_path)
    assert f"js_var $canary_state {tmp_path}/tmp/canary.json;" in text
    assert f"access_log {tmp_path}/canary.log canary if=$canary_logged;" in text
    assert "/$2/cifar10/$1;" in text and "@" not in text
    (tmp_path / "nginx.conf").write_text(text)
    (tmp_path / "tmp").mkdir()
    proxy.set_canary(tmp_path, "2.0", 12.5)
    state = tmp_path / "tmp" / "canary.json"
    assert json.loads(state.read_text()) == {"version": "2.0", "share": 12.5}
    proxy.set_canary(tmp_path, None, 0)
    assert json.loads(state.read_text()) == {"version": None, "share": 0}
    for version, share in (("2.0; evil", 10), ("2.0", 101), ("2.0", -1)):
        with pytest.raises(ValueError):
            proxy.set_canary(tmp_path, version, share)
    assert json.loads(state.read_text()) == {"version": None, "share": 0}


def test_the_canary_is_judged_on_its_errors_latency_and_routing():
    class Args:
        canary_min_requests, max_error_increase, latency_factor, latency_slack = 10, 0.01, 2, 0.1

    def entries(arm, count, seconds=0.05, status=200, version=None):
        return [{"arm": arm, "status": status, "seconds": seconds,
                 "version": version or ("2.0" if arm else "1.0")}] * count
    good = entries(0, 90) + entries(1, 10)
    assert release.judge(good, "2.0", "1.0", Args)[0]
    assert not release.judge(entries(0, 90) + entries(1, 5), "2.0", "1.0", Args)[0]
    failing = good + entries(1, 1, status=500)
    assert "error rate" in release.judge(failing, "2.0", "1.0", Args)[1]
    slow = entries(0, 90) + entries(1, 10, seconds=0.5)
    assert "latency" in release.judge(slow, "2.0", "1.0", Args)[1]
    crossed = good + entries(1, 1, version="1.0")
    assert "not routed" in release.judge(crossed, "2.0", "1.0", Args)[1]


def test_canary_log_lines_are_read_per_inference_request(tmp_path):
    logged = tmp_path / "canary.log"
    logged.write_text('1.5 1 200 0.012 "2.0" /predictions/cifar10\n'
                      '1.6 0 503 0.001 "" /predictions/cifar10\n'
                      '1.7 0 200 0.002 "" /ping\n')
    assert release.read_canary_log(logged, 0) == [
        {"arm": 1, "status": 200, "seconds": 0.012, "version": "2.0"},
        {"arm": 0, "status": 503, "seconds": 0.001, "version": ""}]
    assert release.next_version(["1.0"], {"2.0": "cifar10-2.0.mar"}) == "3.0"
