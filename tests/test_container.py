"""The container image, built and run through the make targets as a user would (`make docker`,
`make docker-run`, `make docker-stop`): a CPU image without CUDA libraries, 200 held-out images
answered with the top-1 that a TorchServe outside the container (`make serve`'s) gives them,
explanations served, workers scaled 2 -> 3 -> 2 through the management API, the container gone
afterwards.

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
HOLDOUT = ROOT / "tests" / "holdout"
# 200 real images: the first 20 of each class's held-out folder
IMAGES = [path for folder in sorted(p for p in HOLDOUT.iterdir() if p.is_dir())
          for path in sorted(folder.glob("*.jpg"))[:20]]
CONTAINER, TAG = "cifar10-torchserve", "cpu"  # the Makefile's IMAGE and IMAGE_TAG
# The bound: the CUDA build of torch made the CPU image 6.56 GB.
MAX_CPU_IMAGE_BYTES = 1.5e9
# The golden check's tolerance: two forwards (int8 and bf16, say) may each put a probability
# off by this much, so their top-1 may differ only where the top two are within twice it.
PROBABILITY_TOLERANCE = 0.15


def make(*args, **kwargs):
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], **kwargs)


def runtime():
    """docker, or the podman command line the Makefile runs (its RUNTIME)."""
    return make("-s", "--eval=print-runtime:\n\t@echo $(RUNTIME)", "print-runtime",
                capture_output=True, text=True, check=True).stdout.strip()


def container(command):
    """`command` run by the container runtime; its standard output."""
    return subprocess.run(f"{runtime()} {command}", shell=True, capture_output=True, text=True,
                          check=True).stdout


def test_the_image_builds_serves_as_torchserve_does_scales_and_stops(tmp_path):
    assert len(IMAGES) == 200
    for port in (8080, 8081, 8082):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"127.0.0.1:{port} is in use (`make stop` a running `make serve`?)")
    make("docker", check=True)
    size = int(container(f"image inspect --format '{{{{.Size}}}}' {CONTAINER}:{TAG}"))
    assert size <= MAX_CPU_IMAGE_BYTES, f"the CPU image is {size / 1e9:.2f} GB"
    try:
        make("docker-run", check=True)
        packages = json.loads(container(
            f"exec {CONTAINER} python -c \"import json, importlib.metadata as m, torch; "
            f"print(json.dumps([torch.__version__, torch.version.cuda, "
            f"[d.metadata['Name'].lower() for d in m.distributions()]]))\""))
        version, cuda, names = packages
        assert version.endswith("+cpu") and cuda is None, (version, cuda)
        assert not [n for n in names if n.startswith("nvidia") or n in ("triton", "torchvision")]

        client = TorchServeClient(ROOT / "config.properties", ROOT / "key_file.json")
        assert len(client.describe().json()[0]["workers"]) == 2
        answers = {path: client.predict(path).json() for path in IMAGES}
        inside = served_runtime(client)
        explained = client._infer(f"{client.inference}/explanations/cifar10",
                                  data=IMAGES[0].read_bytes())
        assert explained.status_code == 200, explained.text
        assert explained.json()["class"] == next(iter(answers[IMAGES[0]]))
        assert [len(row) for row in explained.json()["attributions"]] == [32] * 32
        for workers in (3, 2):
            scaled = client.scale(workers)
            assert scaled.ok, scaled.text
            # READY, and a prediction answered: on a loaded machine a worker that an explanation
            # held past responseTimeout may still be restarting (its request was resent above).
            assert len(client.wait_ready(timeout=120)) == workers
            # each worker chooses its forward when it starts: the same top-1, if not the digits
            assert next(iter(client.predict(IMAGES[1]).json())) == next(iter(answers[IMAGES[1]]))
        assert 'ts_inference_requests_total{' in client.metrics().text
    finally:
        make("docker-stop")
    assert CONTAINER not in container("ps -a --format '{{.Names}}'").split()
    with local_torchserve(ROOT / "model_store", tmp_path) as outside:
        # runtime: auto times its candidates on each machine: inside and outside the container
        # the same forward gives the same answers; two forwards (int8 and bf16, say) agree within
        # their precision.
        same = served_runtime(outside) == inside
        for path, answer in answers.items():
            expected = outside.predict(path).json()
            top = list(expected.values())
            if same or top[0] - top[1] > 2 * PROBABILITY_TOLERANCE:
                assert next(iter(answer)) == next(iter(expected)), (path, answer, expected)
            if same:
                assert answer.keys() == expected.keys(), path
                assert answer == pytest.approx(expected, abs=1e-4), path
            else:  # the top-5 may differ where the 5th and 6th classes nearly tie
                assert all(abs(answer[name] - expected[name]) <= PROBABILITY_TOLERANCE
                           for name in answer.keys() & expected.keys()), path


def served_runtime(client):
    """The forward a served model runs (the management API's customized describe)."""
    response = client.session.get(f"{client.management}/models/{client.model}",
                                  params={"customized": "true"},
                                  headers=client._token("management"), timeout=30)
    response.raise_for_status()
    custom = response.json()[0]["customizedMetadata"]
    return (json.loads(custom) if isinstance(custom, str) else custom)["runtime"]
