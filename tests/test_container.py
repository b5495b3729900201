"""The container image, built and run through the make targets as a user would (`make docker`,
`make docker-run`, `make docker-stop`): real images answered as a TorchServe outside the container
answers them, workers scaled through the management API, the container gone afterwards.

Minutes, and docker or podman (`apt-get install podman runc debootstrap`): not part of `make
test`; `make docker-test` runs it (CI does). It serves on 127.0.0.1:8080-8082 like `make serve`,
so those ports must be free."""
import json
import socket
import subprocess

import pytest
from conftest import ROOT

from client import TorchServeClient
from tests.harness import local_torchserve

pytestmark = pytest.mark.container
IMAGES = sorted((ROOT / "tests" / "holdout").rglob("*.jpg"))[::25]  # 20 real images


def make(*args, **kwargs):
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], **kwargs)


def container_names():
    runtime = make("-s", "--eval=print-runtime:\n\t@echo $(RUNTIME)", "print-runtime",
                   capture_output=True, text=True, check=True).stdout.strip()
    listed = subprocess.run(f"{runtime} ps -a --format '{{{{.Names}}}}'", shell=True,
                            capture_output=True, text=True, check=True)
    return listed.stdout.split()


def test_the_image_builds_serves_as_torchserve_does_scales_and_stops(tmp_path):
    for port in (8080, 8081, 8082):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"127.0.0.1:{port} is in use (`make stop` a running `make serve`?)")
    make("docker", check=True)
    try:
        make("docker-run", check=True)
        client = TorchServeClient(ROOT / "config.properties", ROOT / "key_file.json")
        answers = {path: client.predict(path).json() for path in IMAGES}
        inside = served_runtime(client)
        scaled = client.scale(3)
        assert scaled.ok, scaled.text
        workers = client.describe().json()[0]["workers"]
        assert len(workers) == 3 and all(w["status"] == "READY" for w in workers)
        assert 'ts_inference_requests_total{' in client.metrics().text
    finally:
        make("docker-stop")
    assert "cifar10-torchserve" not in container_names()
    with local_torchserve(ROOT / "model_store", tmp_path) as outside:
        # runtime: auto times its candidates on each machine: inside and outside the container
        # the same forward gives the same answers; two forwards (int8 and bf16, say) agree within
        # their precision (the golden check's: a probability off by at most 0.15).
        same = served_runtime(outside) == inside
        for path, answer in answers.items():
            expected = outside.predict(path).json()
            if same:
                assert answer.keys() == expected.keys(), path
                assert answer == pytest.approx(expected, abs=1e-4), path
            else:  # the top-5 may differ where the 5th and 6th classes nearly tie
                assert all(abs(answer[name] - expected[name]) <= 0.15
                           for name in answer.keys() & expected.keys()), path


def served_runtime(client):
    """The forward a served model runs (the management API's customized describe)."""
    response = client.session.get(f"{client.management}/models/{client.model}",
                                  params={"customized": "true"},
                                  headers=client._token("management"), timeout=30)
    response.raise_for_status()
    custom = response.json()[0]["customizedMetadata"]
    return (json.loads(custom) if isinstance(custom, str) else custom)["runtime"]
