"""The test and benchmark harness: servers started on free loopback ports and stopped by pid, and
the one generator of good traffic that tests and bench/ share.

    from tests.harness import GoodTraffic, local_proxy, local_torchserve

- ``local_torchserve(store, run)``: a TorchServe of its own serving ``store``/cifar10.mar;
- ``local_proxy(client, run_dir)``: nginx (proxy.py's render) in front of it;
- ``GoodTraffic(url, headers, bodies)``: threads sending good predictions back to back, each
  request recorded (when sent, how long, what came back), answers checked against the server's
  own answer for that body where asked.

Nothing here is part of what a user runs: client.py is the user's client and proxy.py serves
`make serve-proxy`; both only use what this module builds on.
"""
import collections
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

import proxy
from client import ServerExited, TorchServeClient

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- TorchServe ---------------------------------------------------------------------------------

@contextlib.contextmanager
def local_torchserve(store, run, extra_config="", timeout=180, probe=None, env=None,
                     models=("cifar10",)):
    """A TorchServe started in the folder ``run`` on free loopback ports (the repo's
    config.properties plus ``extra_config`` lines), serving ``store``/<name>.mar for each of
    ``models``, ready once each answers ``probe`` (a body; default a PNG); yields a
    TorchServeClient of the first model (its ``run_dir`` is ``run``, its ``server`` the Java
    process, its ``clients`` one per model by name) and always stops the server and its
    workers, by pid. ``env``: more environment variables (JAVA_HOME picks the Java that
    TorchServe's launcher runs)."""
    run = Path(run)
    for attempt in range(2):  # a free port can be taken by another program before TorchServe
        java = start_torchserve(store, run, extra_config, env, models)  # binds it: again if so
        clients = {name: TorchServeClient(run / "config.properties", run / "key_file.json",
                                          model=name) for name in models}
        client = clients[models[0]]
        try:
            for each in clients.values():
                each.wait_ready(timeout=timeout, worker_log=run / "logs" / "model_log.log",
                                probe=probe, server=java)
        except ServerExited:
            stop_torchserve(java)
            out = run / "torchserve.out"  # the server's stdout: its bind failure
            if attempt or "Address already in use" not in out.read_text(errors="replace"):
                raise
            out.rename(run / "torchserve.first-start.out")
            continue
        except BaseException:
            stop_torchserve(java)
            raise
        break
    for each in clients.values():
        each.run_dir, each.server = run, java
    client.clients = clients
    try:
        yield client
    finally:
        stop_torchserve(java)


def start_torchserve(store, run, extra_config="", env=None, models=("cifar10",)):
    """Start a TorchServe in ``run`` on free ports serving ``models`` (store/<name>.mar each);
    its Java process."""
    config = (ROOT / "config.properties").read_text()
    for name in ("inference", "management", "metrics"):
        config = re.sub(rf"^{name}_address=.*$", f"{name}_address=http://127.0.0.1:{free_port()}",
                        config, flags=re.M)
    for name in ("grpc_inference", "grpc_management"):  # TorchServe always starts gRPC too
        config = re.sub(rf"^{name}_port=.*$", f"{name}_port={free_port()}", config, flags=re.M)
    config = re.sub(r"^model_store=.*$", f"model_store={store}", config, flags=re.M)
    (run / "config.properties").write_text(config + extra_config)
    # TMPDIR: the launcher's pid file; TEMP: Java's tmpdir, where the worker sockets live.
    env = dict(os.environ, TMPDIR=str(run), TEMP=str(run),
               LOG_LOCATION=str(run / "logs"), METRICS_LOCATION=str(run / "logs"), **(env or {}))
    torchserve = Path(sys.executable).parent / "torchserve"
    with open(run / "torchserve.out", "wb") as out:  # the launcher's and the server's stdout
        subprocess.run([str(torchserve), "--start", "--ncs", "--ts-config", "config.properties",
                        "--log-config", str(ROOT / "log4j2.xml"),
                        "--model-store", str(store), "--models",
                        *[f"{name}={name}.mar" for name in models]],
                       cwd=run, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    return psutil.Process(int((run / ".model_server.pid").read_text()))


def stop_torchserve(java):
    """Stop a TorchServe (its Java process) and the workers it spawned, by pid."""
    try:
        workers = java.children(recursive=True)
        java.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:  # it already stopped (a failed start): nothing left to stop
        return
    gone, alive = psutil.wait_procs([java] + workers, timeout=30)
    for process in alive:
        process.kill()


# ---- nginx --------------------------------------------------------------------------------------

class Proxy:
    """A running nginx: its URLs and its master process."""

    def __init__(self, settings, process, conf):
        self.inference = f"http://{settings['listen_inference']}"
        self.management = f"http://{settings['listen_management']}"
        self.process, self.conf, self.settings = process, conf, settings


@contextlib.contextmanager
def local_proxy(client, run_dir, ts_config=None, **overrides):
    """nginx in front of the TorchServe ``client`` talks to (a TorchServeClient) on free loopback
    ports, in the foreground of this process; always stopped, by pid. Keyword arguments override
    proxy.DEFAULTS (lower limits for tests)."""
    settings = {"listen_inference": f"127.0.0.1:{free_port()}",
                "listen_management": f"127.0.0.1:{free_port()}",
                **proxy.settings_from(ts_config or client.run_dir / "config.properties",
                                      ROOT / "handler" / "model-config.yaml"),
                "worker_processes": 1, "model": getattr(client, "model", proxy.MODEL),
                **overrides}
    settings.update(ts_inference=urlsplit(client.inference).netloc,
                    ts_management=urlsplit(client.management).netloc)
    conf = proxy.prepare(run_dir, settings, daemon=False)
    with open(Path(run_dir) / "nginx.out", "wb") as out:
        process = subprocess.Popen([proxy.nginx_binary(), "-p", str(Path(run_dir).resolve()),
                                    "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                   umask=proxy.UMASK)
    master = psutil.Process(process.pid)
    try:
        proxy.wait_listening(settings["listen_inference"], process)
        yield Proxy(settings, master, conf)
    finally:
        proxy.stop_process(master, timeout=5)
        process.wait()
        if proxy.root_temp(run_dir) is not None:
            shutil.rmtree(proxy.root_temp(run_dir), ignore_errors=True)


# ---- a stand-in server --------------------------------------------------------------------------

class Stub(http.server.ThreadingHTTPServer):
    """A stand-in HTTP server on a free loopback port: answers POSTs from ``script``, a list of
    (status, headers) in turn (then 200s), a 200 with ``answer(body)`` (JSON; default a
    one-class prediction), and records when each request arrived (time.monotonic) and its body.
    Stopped at the with-block's end."""

    def __init__(self, script=(), answer=lambda body: {"cat": 1.0}):
        self.script, self.answer, self.arrived, self.bodies = list(script), answer, [], []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(handler):  # noqa: N805
                server = handler.server
                received = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
                with server.lock:
                    server.bodies.append(received)
                    server.arrived.append(time.monotonic())
                    status, headers = server.script.pop(0) if server.script else (200, {})
                body = (json.dumps(server.answer(received)).encode() if status == 200
                        else b'{"code": %d}' % status)
                handler.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    handler.send_header(name, value)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):  # noqa: N805
                pass
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        self.thread.join()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


# ---- good traffic -------------------------------------------------------------------------------

@dataclass
class Sent:
    """One good request: when it was sent (time.monotonic, comparable across processes; and
    time.time, as logs and release.py's steps note it), how many seconds it took, its outcome
    (the status, an exception's name, or "wrong answer"), the start of the answer or error, the
    body it began with (its index), the answer's top class and X-Model-Version."""
    at: float
    seconds: float
    outcome: object
    detail: str = ""
    wall: float = None
    body: int = None
    top: object = None
    version: str = None


def top(answer):
    """The top class of a prediction answer (one image: {class: probability}), or of each image
    of a multi-image answer (a list of them)."""
    if isinstance(answer, list):
        return [top(one) for one in answer]
    return max(answer, key=answer.get) if isinstance(answer, dict) and answer else answer


class GoodTraffic:
    """``clients`` threads POSTing ``bodies`` (encoded images) to ``url``'s /predictions route,
    back to back, until ``seconds`` have passed (or the with-block ends). Each request carries
    ``per_request`` images: one as the raw body, several as multipart fields; thread ``c`` starts
    at body ``97 * c`` and sends them in turn. ``check``: each answer must be ``same`` as (by
    default: name the top class of) the one the server gave that request alone before the load
    started, else it counts as "wrong answer". ``fresh``: a new connection for every request.

        with GoodTraffic(url, headers, bodies, clients=4, seconds=10) as load: ...
        load.summary()   # requests, outcomes, p50/p99/max of the 200s, images/s
    """

    def __init__(self, url, headers, bodies, clients=4, per_request=1, timeout=60.0,
                 seconds=None, check=False, same=None, fresh=False, model="cifar10"):
        self.url = f"{url.rstrip('/')}/predictions/{model}"
        self.headers, self.bodies, self.timeout = dict(headers), list(bodies), timeout
        self.per_request, self.fresh, self.seconds = per_request, fresh, seconds
        self.sent, self.lock, self.stop = [], threading.Lock(), threading.Event()
        self.expected, self.same = None, same or (lambda got, alone: top(got) == top(alone))
        if check:
            with requests.Session() as session:
                alone = [self._post(session, self._request(i)) for i in range(len(self.bodies))]
            for response in alone:  # no reference, no check: the server must answer first
                response.raise_for_status()
            self.expected = [response.json() for response in alone]
        self.threads = [threading.Thread(target=self._run, args=(97 * c,), daemon=True)
                        for c in range(clients)]
        self.started = self.ended = None

    @classmethod
    def of(cls, client, bodies, **options):
        """Good traffic to the TorchServe (or proxy) of a TorchServeClient, with its token."""
        return cls(client.inference, client._token("inference"), bodies, model=client.model,
                   **options)

    def _request(self, first):
        """The request starting at body ``first``: (kwargs for requests.post)."""
        if self.per_request == 1:
            return {"data": self.bodies[first % len(self.bodies)],
                    "headers": {**self.headers, "Content-Type": "application/octet-stream"}}
        files = [(f"image{k}", (f"{k}.jpg", self.bodies[(first + k) % len(self.bodies)]))
                 for k in range(self.per_request)]
        return {"files": files, "headers": self.headers}

    def _post(self, session, request):
        headers = {**request["headers"], **({"Connection": "close"} if self.fresh else {})}
        return session.post(self.url, timeout=self.timeout, **{**request, "headers": headers})

    def _run(self, offset):
        session, i = requests.Session(), offset
        deadline = None if self.seconds is None else self.started + self.seconds
        while not self.stop.is_set() and (deadline is None or time.monotonic() < deadline):
            first, i = i, i + self.per_request
            if self.fresh:
                session.close()
                session = requests.Session()
            at, wall, found, version = time.monotonic(), time.time(), None, None
            try:
                response = self._post(session, self._request(first))
                outcome, detail = response.status_code, response.text[:200]
                version = response.headers.get("X-Model-Version")
                if outcome == 200:
                    found = top(response.json())
                    if self.expected is not None and not self.same(
                            response.json(), self.expected[first % len(self.bodies)]):
                        outcome = "wrong answer"
            except requests.RequestException as err:
                outcome, detail = type(err).__name__, str(err)[:200]
            with self.lock:
                self.sent.append(Sent(at, time.monotonic() - at, outcome, detail, wall,
                                      first % len(self.bodies), found, version))
        session.close()

    def start(self):
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def join(self):
        """Stop (at once, or when ``seconds`` are up if given) and wait for the last answers."""
        if self.seconds is None:
            self.stop.set()
        for thread in self.threads:
            thread.join()
        self.ended = time.monotonic()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop.set()
        self.join()

    def results(self, since=0.0):
        """The requests sent at or after ``since`` (time.monotonic), so far."""
        with self.lock:
            return [s for s in self.sent if s.at >= since]

    def wait_for(self, count, since=0.0, timeout=60.0):
        """Block until ``count`` requests were sent since ``since``; AssertionError after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.results(since)) < count:
            assert time.monotonic() < deadline, f"fewer than {count} requests in {timeout} s"
            time.sleep(0.05)

    def failures(self):
        return [s for s in self.results() if s.outcome != 200]

    def summary(self):
        """What the traffic got: requests, outcomes, the 200s' latency percentiles (nearest
        rank), the slowest request of all, images answered per second."""
        sent = self.results()
        ok = sorted(s.seconds for s in sent if s.outcome == 200)
        elapsed = ((self.ended or time.monotonic()) - self.started) if self.started else 0.0
        return {"requests": len(sent), "ok": len(ok), "failed": len(sent) - len(ok),
                "outcomes": dict(collections.Counter(s.outcome for s in sent)),
                "p50_s": percentile(ok, 0.5), "p99_s": percentile(ok, 0.99),
                "max_s": max((s.seconds for s in sent), default=None),
                "over_5_s": sum(s.seconds > 5 for s in sent),
                "images_per_s": len(ok) * self.per_request / elapsed if elapsed else None}


def percentile(values, share):
    """The nearest-rank ``share`` percentile of ``values`` (None when there are none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else None
