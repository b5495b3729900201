"""Client for the served CIFAR-10 model: predictions, workers, metrics, readiness.

Addresses come from TorchServe's config.properties and the tokens from key_file.json that TorchServe
writes where it starts (both in the repo root for `make serve`).

    python client.py predict cat.png dog.jpg photos/    # one request per file, a bar over folders
    python client.py predict --together a.png b.png     # several images in one multipart request
    python client.py predict --v2 a.png b.png           # one Open Inference Protocol v2 request
    python client.py describe | scale 3 | metrics | ping | wait --timeout 120
    python client.py token inference                    # renew a token (TorchServe's /token API)

TorchServe's tokens expire (token_expiration_min, 60 min by default); the client renews an expired
one with the key file's API key and resends the request once. An inference request answered 503
(queue full, no worker), 507 (its worker died mid-request) or TorchServe's own 500 for a request a
worker stopped by a scale-down dropped, and the proxy's 429, is sent again, at most twice: after
the answer's Retry-After (seconds or an HTTP-date, up to 30 s), else after 0.5 s and 1 s. `scale`
refuses counts TorchServe's management API would mishandle. `--config .run/proxy/client.properties`
goes through the proxy of `make serve-proxy`.
"""
import argparse
import base64
import datetime
import email.utils
import io
import json
import logging
import sys
import time
from pathlib import Path

import psutil
import requests
import yaml
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
MODEL_CONFIG = yaml.safe_load((Path(__file__).resolve().parent / "handler" / "model-config.yaml")
                              .read_text())
# TorchServe: queue full or no worker (503), the worker died mid-request (507); the proxy: a
# client over its limits (429, 503).
RETRY_STATUSES = (429, 503, 507)
# TorchServe's own answer (not the handler's) to the requests of a worker a scale-down stopped.
DROPPED_BY_WORKER = ("Worker died.", "Worker scaled down.")
RETRY_DELAYS = (0.5, 1.0)  # seconds before each resend, where the answer names no Retry-After
# A Retry-After longer than this is not waited on: the answer goes back to the caller, who knows
# better than a library whether a prediction is still wanted that much later.
MAX_RETRY_AFTER = 30.0


class TorchServeClient:
    """The inference, management and metrics APIs of one TorchServe, with token auth."""

    def __init__(self, config="config.properties", key_file="key_file.json", model="cifar10"):
        props = read_properties(config)
        self.inference = props.get("inference_address", "http://127.0.0.1:8080")
        self.management = props.get("management_address", "http://127.0.0.1:8081")
        self.metrics_url = props.get("metrics_address", "http://127.0.0.1:8082")
        self.key_file, self.model = Path(key_file), model
        self.session = requests.Session()

    def _token(self, api):
        keys = json.loads(self.key_file.read_text())
        return {"Authorization": f"Bearer {keys[api]['key']}"}

    def _call(self, method, url, api, **kwargs):
        """A request with the `api` token; an expired token (TorchServe's token_expiration_min,
        60 min by default) is renewed once with the key file's API key and the request resent."""
        response = self.session.request(method, url, headers=self._token(api), **kwargs)
        if response.status_code == 400 and "InvalidKeyException" in response.text:
            if self.renew_token(api).ok:
                response = self.session.request(method, url, headers=self._token(api), **kwargs)
        return response

    def renew_token(self, api="inference"):
        """Ask TorchServe for a fresh `api` token (it rewrites key_file.json); needs the API key."""
        keys = json.loads(self.key_file.read_text())
        return self.session.get(f"{self.management}/token", params={"type": api}, timeout=10,
                                headers={"Authorization": f"Bearer {keys['API']['key']}"})

    def ping(self):
        return self._call("GET", f"{self.inference}/ping", "inference", timeout=5)

    def _infer(self, url, **kwargs):
        """An inference POST, resent at most twice while the server answers 429, 503 or 507, or
        TorchServe's 500 for a request a stopped worker dropped (safe: a prediction changes
        nothing on the server): after the answer's Retry-After where it has one (up to
        MAX_RETRY_AFTER; a longer one is answered as it is), else after RETRY_DELAYS."""
        response = self._call("POST", url, "inference", timeout=60, **kwargs)
        for default in RETRY_DELAYS:
            if response.status_code not in RETRY_STATUSES and not dropped(response):
                break
            delay = retry_after(response)
            if delay is None:
                delay = default
            elif delay > MAX_RETRY_AFTER:
                log.warning("%s answered %d with Retry-After %.0f s: not waiting that long", url,
                            response.status_code, delay)
                break
            log.warning("%s answered %d; sending again in %.1f s", url, response.status_code,
                        delay)
            time.sleep(delay)
            response = self._call("POST", url, "inference", timeout=60, **kwargs)
        return response

    def predict(self, *images):
        """POST one image as the body, or several as multipart fields; returns the response."""
        url = f"{self.inference}/predictions/{self.model}"
        if len(images) == 1:
            return self._infer(url, data=_read(images[0]))
        files = [(f"image{i}", (Path(str(p)).name, _read(p))) for i, p in enumerate(images)]
        return self._infer(url, files=files)

    def predict_v2(self, *images, request_id=None):
        """One Open Inference Protocol v2 request carrying every image as base64 BYTES."""
        data = [base64.b64encode(_read(image)).decode() for image in images]
        body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(data)],
                            "data": data}]}
        if request_id is not None:
            body["id"] = request_id
        return self._infer(f"{self.inference}/v2/models/{self.model}/infer", json=body)

    def describe(self):
        return self._call("GET", f"{self.management}/models/{self.model}", "management",
                          timeout=10)

    def scale(self, workers):
        """Set the worker count, from 1 to model-config.yaml's maxWorkers (ValueError otherwise:
        TorchServe 0.12 itself answers min_worker=-1 with a 500 and leaves no worker, and takes
        counts over maxWorkers), as min_worker and max_worker both (the proxy takes no other
        form): that many run. TorchServe stops a worker mid-batch when scaling down; what it
        drops, the proxy (or _infer) sends again. TorchServe 0.12 sometimes answers a
        scale-down 500 (a ConcurrentModificationException while it fails the stopped worker's
        batch) after stopping the worker: the call, which sets the same counts again, is sent
        once more."""
        most = MODEL_CONFIG["maxWorkers"]
        if not (type(workers) is int and 1 <= workers <= most):
            raise ValueError(f"workers must be a whole number from 1 to {most} (maxWorkers in "
                             f"handler/model-config.yaml), got {workers!r}")
        for delay in (0.0, *RETRY_DELAYS[:1]):
            time.sleep(delay)
            response = self._call("PUT", f"{self.management}/models/{self.model}",
                                  "management", timeout=120, params=dict(
                                      min_worker=workers, max_worker=workers,
                                      synchronous="true"))
            if response.status_code != 500:
                break
            log.warning("scaling to %d answered 500 (%s); sending it once more", workers,
                        response.text.strip()[:200])
        return response

    def metrics(self):
        return self.session.get(f"{self.metrics_url}/metrics", timeout=10)

    def wait_ready(self, timeout=120.0, worker_log=None, probe=None, server=None):
        """Block until every worker is READY and a prediction of ``probe`` (a request body; by
        default a small PNG) answers 200; raise on timeout.

        With ``worker_log`` (TorchServe's model_log.log), a worker that fails to load the model
        ends the wait at once with its message: TorchServe would retry it for minutes. With
        ``server`` (its Java process), a server that exits ends it too (ServerExited).
        """
        deadline, last = time.monotonic() + timeout, "no answer yet"
        if probe is None:
            png = io.BytesIO()
            Image.new("RGB", (32, 32), (120, 80, 40)).save(png, format="PNG")
            probe = png.getvalue()
        log_read = Path(worker_log).stat().st_size if worker_log and Path(worker_log).exists() else 0
        while time.monotonic() < deadline:
            if worker_log:
                log_read = _raise_on_load_failure(worker_log, log_read)
            if server is not None and (not server.is_running()
                                       or server.status() == psutil.STATUS_ZOMBIE):
                raise ServerExited(f"TorchServe exited while starting: {last}")
            try:
                workers = self.describe().json()[0]["workers"]
                if workers and all(w["status"] == "READY" for w in workers):
                    response = self.predict(probe)
                    if response.ok:
                        return workers
                    last = f"prediction answered {response.status_code}: {response.text}"
                else:
                    last = f"workers {[w['status'] for w in workers]}"
            except (requests.RequestException, OSError, ValueError, KeyError, IndexError) as err:
                last = repr(err)
            time.sleep(0.25)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f} s: {last}")


class ServerExited(RuntimeError):
    """TorchServe's Java process ended before it was ready (a port taken, a bad config)."""


def dropped(response):
    """Whether ``response`` is TorchServe's 500 for a request that a stopped worker dropped
    (its frontend's InternalServerException, not an answer of the handler)."""
    if response.status_code != 500:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return (isinstance(body, dict) and body.get("type") == "InternalServerException"
            and body.get("message") in DROPPED_BY_WORKER)


def retry_after(response, now=None):
    """Seconds the answer's Retry-After header asks to wait (RFC 9110: a number of seconds or an
    HTTP-date; a date in the past is 0), or None where it has none or one that cannot be read."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a date without a zone is read so too
        when = when.replace(tzinfo=datetime.timezone.utc)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return max(0.0, (when - now).total_seconds())


def _raise_on_load_failure(worker_log, start):
    """Raise RuntimeError with the worker's message if model_log.log's whole lines past byte
    ``start`` say a worker failed to load the model; else return the offset read up to."""
    path = Path(worker_log)
    if not path.exists() or path.stat().st_size <= start:
        return start
    with path.open("rb") as log:
        log.seek(start)
        new = log.read()
    complete = new[:new.rfind(b"\n") + 1]  # a line still being written is read next time
    for line in complete.decode(errors="replace").splitlines():
        if "Failed to load model" in line:
            raise RuntimeError(f"a worker failed to load the model (see {worker_log}): "
                               f"{line.split('MODEL_LOG - ', 1)[-1]}")
    return start + len(complete)


def read_properties(path):
    """key=value lines of a Java properties file (comments and blanks skipped)."""
    path = Path(path)
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _read(image):
    return image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


def expand(paths):
    """Files as given; folders replaced by the image files below them, sorted."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="config.properties", help="TorchServe config.properties")
    p.add_argument("--key-file", default="key_file.json", help="TorchServe's token file")
    p.add_argument("--model", default="cifar10",
                   help="the model's name on the server (its spec's name; default: cifar10)")
    sub = p.add_subparsers(dest="command", required=True)
    pred = sub.add_parser("predict", help="classify image files or folders")
    pred.add_argument("paths", nargs="+")
    pred.add_argument("--together", action="store_true", help="all files in one request")
    pred.add_argument("--v2", action="store_true",
                      help="all files in one Open Inference Protocol v2 request")
    sub.add_parser("describe", help="the model's workers")
    sub.add_parser("metrics", help="Prometheus metrics")
    scale = sub.add_parser("scale", help="set the number of workers")
    scale.add_argument("workers", type=int)
    ping = sub.add_parser("ping", help="health check")
    ping.add_argument("--quiet", action="store_true")
    token = sub.add_parser("token", help="renew a token: TorchServe rewrites key_file.json")
    token.add_argument("api", choices=["inference", "management"])
    wait = sub.add_parser("wait", help="block until a prediction succeeds")
    wait.add_argument("--timeout", type=float, default=120.0)
    wait.add_argument("--worker-log", type=Path,
                      help="TorchServe's model_log.log: stop waiting when a worker fails to load")
    args = p.parse_args(argv)

    client = TorchServeClient(args.config, args.key_file, args.model)
    if args.command == "predict":
        return _predict(client, list(expand(args.paths)), args.together, args.v2)
    if args.command == "wait":
        try:
            workers = client.wait_ready(args.timeout, args.worker_log)
        except (RuntimeError, TimeoutError) as err:
            print(err, file=sys.stderr)
            return 1
        print(f"{client.model} ready: {len(workers)} workers READY")
        return 0
    try:
        response = {"describe": client.describe, "metrics": client.metrics, "ping": client.ping,
                    "scale": lambda: client.scale(args.workers),
                    "token": lambda: client.renew_token(args.api)}[args.command]()
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if not getattr(args, "quiet", False):
        print(response.text)
    return 0 if response.ok else 1


def _predict(client, paths, together, v2):
    if together or v2:
        response = client.predict_v2(*paths) if v2 else client.predict(*paths)
        print(json.dumps(response.json(), indent=2))
        return 0 if response.ok else 1
    failed = 0
    for path in tqdm(paths, disable=len(paths) < 2, desc="predict"):
        response = client.predict(path)
        failed += not response.ok
        tqdm.write(f"{path}: {json.dumps(response.json())}")
    return 1 if failed else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
