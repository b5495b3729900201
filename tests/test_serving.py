"""The real served path: `make archive` builds a .mar of a tiny model, the repo's config.properties
(on free ports) serves it with TorchServe, and requests go over HTTP with the tokens it wrote.
The server is started once for this module and always stopped, by its pid, also on failure."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from conftest import FIXTURES, ROOT

from client import TorchServeClient, read_properties

BIN = ROOT / ".venv" / "bin"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_archive(weights, store):
    """`make archive` with this weights file and model store, as a user would run it."""
    subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "archive",
                    f"WEIGHTS={weights}", f"MODEL_STORE={store}"], check=True)
    return store / "cifar10.mar"


def test_archive_holds_what_the_handler_needs(tiny_checkpoint, tmp_path):
    mar = build_archive(tiny_checkpoint, tmp_path / "store")
    names = set(zipfile.ZipFile(mar).namelist())
    assert {"cifar10_handler.py", "cifar10_net.py", "tiny.pt", "cifar10.onnx", "index_to_name.json",
            "model-config.yaml", "MAR-INF/MANIFEST.json"} <= names


@contextlib.contextmanager
def torchserve(checkpoint, run, extra_config="", swap_weights=None):
    """A TorchServe in ``run`` on free loopback ports (the repo's config.properties plus
    ``extra_config`` lines) serving ``checkpoint``'s archive (with ``swap_weights``' bytes put in
    place of the checkpoint's, if given); yields a TorchServeClient and always stops the server,
    by its pid."""
    store = run / "store"
    mar = build_archive(checkpoint, store)
    if swap_weights is not None:
        replace_in_zip(mar, checkpoint.name, swap_weights.read_bytes())
    config = (ROOT / "config.properties").read_text()
    for name in ("inference", "management", "metrics"):
        config = re.sub(rf"^{name}_address=.*$", f"{name}_address=http://127.0.0.1:{free_port()}",
                        config, flags=re.M)
    for name in ("grpc_inference", "grpc_management"):  # TorchServe always starts gRPC too
        config = re.sub(rf"^{name}_port=.*$", f"{name}_port={free_port()}", config, flags=re.M)
    config = re.sub(r"^model_store=.*$", f"model_store={store}", config, flags=re.M)
    (run / "config.properties").write_text(config + extra_config)
    # TMPDIR: the launcher's pid file; TEMP: Java's tmpdir, where the worker sockets live.
    env = dict(os.environ, TMPDIR=str(run), TEMP=str(run), LOG_LOCATION=str(run / "logs"),
               METRICS_LOCATION=str(run / "logs"))
    subprocess.run([BIN / "torchserve", "--start", "--ncs", "--ts-config", "config.properties",
                    "--model-store", str(store), "--models", "cifar10=cifar10.mar"],
                   cwd=run, env=env, check=True)
    java = psutil.Process(int((run / ".model_server.pid").read_text()))
    client = TorchServeClient(run / "config.properties", run / "key_file.json")
    try:
        client.wait_ready(timeout=180, worker_log=run / "logs" / "model_log.log")
        client.run_dir = run
        yield client
    finally:
        stop(java)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """A TorchServe on free loopback ports serving the tiny model; yields a TorchServeClient."""
    with torchserve(tiny_checkpoint, tmp_path_factory.mktemp("torchserve")) as client:
        yield client


def replace_in_zip(path, name, data):
    """Rewrite the zip file at path with the member ``name`` holding ``data``."""
    with zipfile.ZipFile(path) as old:
        members = {info.filename: old.read(info) for info in old.infolist()}
    members[name] = data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as new:
        for member, content in members.items():
            new.writestr(member, content)


def stop(java):
    """Stop the TorchServe this module started and the workers it spawned, by pid."""
    try:
        workers = java.children(recursive=True)
        java.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:  # it already stopped (a failed start): nothing left to stop
        return
    gone, alive = psutil.wait_procs([java] + workers, timeout=30)
    for process in alive:
        process.kill()


def test_a_worker_that_cannot_load_stops_the_start_with_its_message(
        tiny_checkpoint, constant_checkpoint, tmp_path):
    """An archive whose ONNX file does not match its weights: the worker refuses to load, and the
    wait (`make serve`'s too) ends with that message instead of TorchServe's minutes of retries."""
    with pytest.raises(RuntimeError, match="does not hold these weights"):
        with torchserve(tiny_checkpoint, tmp_path, swap_weights=constant_checkpoint):
            pass


def test_ping_with_the_token(server):
    response = server.ping()
    assert response.status_code == 200 and response.json()["status"] == "Healthy"


@pytest.mark.parametrize("api", ["inference", "management"])
def test_requests_without_or_with_a_wrong_token_are_refused(server, api):
    url = (f"{server.inference}/predictions/cifar10" if api == "inference"
           else f"{server.management}/models/cifar10")
    method = requests.post if api == "inference" else requests.get
    body = (FIXTURES / "cat.jpg").read_bytes() if api == "inference" else None
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        response = method(url, data=body, headers=headers, timeout=10)
        assert response.status_code == 400
        assert "Token Authorization failed" in response.text


def test_an_expired_or_stale_token_is_renewed_by_the_client(server):
    """TorchServe refuses an expired token as it refuses a wrong one; the client then renews it
    with the API key (TorchServe rewrites key_file.json) and resends the request once."""
    key_file = server.run_dir / "key_file.json"
    keys = json.loads(key_file.read_text())
    stale = keys["inference"]["key"]
    key_file.write_text(json.dumps({**keys, "inference": {**keys["inference"], "key": "stale"}}))
    assert server.predict(FIXTURES / "cat.jpg").status_code == 200
    renewed = json.loads(key_file.read_text())["inference"]["key"]
    assert renewed not in ("stale", stale)
    old = requests.get(f"{server.inference}/ping", headers={"Authorization": f"Bearer {stale}"},
                       timeout=10)
    assert old.status_code == 400  # the old token is gone


def test_listeners_are_on_loopback_only(server):
    for key in ("inference_address", "management_address", "metrics_address"):
        assert read_properties(ROOT / "config.properties")[key].startswith("http://127.0.0.1:")
    assert read_properties(ROOT / "config.properties")["enable_model_api"] == "false"
    register = requests.post(f"{server.management}/models",
                             params={"url": "https://example.com/evil.mar"},
                             headers=server._token("management"), timeout=10)
    assert register.status_code >= 400  # the register API is off


def test_predict_returns_top5(server):
    response = server.predict(FIXTURES / "cat.jpg")
    assert response.status_code == 200
    answer = response.json()
    assert len(answer) == 5 and list(answer.values()) == sorted(answer.values(), reverse=True)


def test_served_workers_run_the_onnx_forward(server):
    """model-config.yaml's runtime: onnx reaches the workers (the log line of each start)."""
    assert server.predict(FIXTURES / "cat.jpg").status_code == 200
    log = (server.run_dir / "logs" / "model_log.log").read_text()
    assert "(runtime onnx," in log and "(runtime torch," not in log


def test_several_images_in_one_multipart_request(server):
    names = ["cat", "ship", "frog"]
    together = server.predict(*[FIXTURES / f"{n}.jpg" for n in names])
    assert together.status_code == 200
    singles = [server.predict(FIXTURES / f"{n}.jpg").json() for n in names]
    assert [list(a) for a in together.json()] == [list(a) for a in singles]


def test_repeated_multipart_field_names_lose_no_image(server):
    """`curl -F data=@a -F data=@b`: TorchServe's worker alone would keep only the last field."""
    names = ["cat", "ship", "frog"]
    files = [("data", (f"{n}.jpg", (FIXTURES / f"{n}.jpg").read_bytes())) for n in names]
    together = server.session.post(f"{server.inference}/predictions/cifar10", files=files,
                                   headers=server._token("inference"), timeout=60)
    assert together.status_code == 200
    singles = [server.predict(FIXTURES / f"{n}.jpg").json() for n in names]
    assert [list(a) for a in together.json()] == [list(a) for a in singles]


def test_bad_body_is_a_400_with_a_message_and_the_worker_lives(server):
    response = server.predict(b"this is not an image")
    assert response.status_code == 400
    assert "cannot decode the image" in response.json()["message"]
    assert server.predict(FIXTURES / "cat.jpg").status_code == 200


def test_mixed_concurrent_traffic_loses_no_good_request(server):
    good, bad = (FIXTURES / "dog.jpg").read_bytes(), b"garbage" * 10
    bodies = [good if i % 3 else bad for i in range(60)]
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda body: server.predict(body).status_code, bodies))
    assert codes == [200 if i % 3 else 400 for i in range(60)]


def test_scale_workers_through_the_management_api(server):
    assert server.scale(1).status_code == 200
    assert len(server.describe().json()[0]["workers"]) == 1
    assert server.scale(2).status_code == 200
    workers = server.describe().json()[0]["workers"]
    assert [w["status"] for w in workers] == ["READY", "READY"]


def test_prometheus_metrics_count_inference_requests(server):
    assert server.predict(FIXTURES / "cat.jpg").status_code == 200
    text = server.metrics().text
    counts = re.findall(r'^ts_inference_requests_total\{.*model_name="cifar10".*\} (\S+)$',
                        text, flags=re.M)
    assert counts and float(counts[0]) >= 1
    for stage in ("preprocess", "inference", "postprocess"):  # the handler's own timings
        assert re.search(rf'^ts_handler_{stage}\{{ModelName="cifar10",.*\}} [0-9.]+$', text,
                         flags=re.M), stage


def test_open_inference_protocol_v2_with_16_images(server):
    names = sorted(p.stem for p in FIXTURES.glob("*.jpg"))
    images = [(FIXTURES / f"{names[i % len(names)]}.jpg").read_bytes() for i in range(16)]
    response = server.predict_v2(*images, request_id="batch-7")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == "cifar10" and answer["id"] == "batch-7"
    label, probs = answer["outputs"]
    assert label["shape"] == [16] and probs["shape"] == [16, 10] and len(probs["data"]) == 160
    singles = [next(iter(server.predict(image).json())) for image in images]
    assert label["data"] == singles


def test_explanations_endpoint_returns_attribution_maps(server):
    response = requests.post(f"{server.inference}/explanations/cifar10",
                             data=(FIXTURES / "cat.jpg").read_bytes(),
                             headers=server._token("inference"), timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["class"] == next(iter(server.predict(FIXTURES / "cat.jpg").json()))
    assert len(answer["attributions"]) == 32 and {len(r) for r in answer["attributions"]} == {32}
