"""Throughput and latency of the served CIFAR-10 model, next to its handler and net run in-process.

Drives TorchServe with wrk (bench/post.lua) over 200 real held-out CIFAR-10 JPEGs from tests/holdout,
sent in turn (gated TTA's cost depends on how many are unsure): one-image POSTs at several
concurrencies, then multi-image requests (multipart and JSON base64). Then runs the
handler class on the same weights in this process (batches of raw-JPEG requests) and the bare net's
forward pass, and relates served to in-process images/s. Writes results.md, results.json and
results.png to --out and prints the table. Every load run is time-bounded; only loopback addresses
are accepted.

    make bench                                  # --start: `make serve` (cold start) ... `make stop`
    .venv/bin/python -m bench.bench --duration 3  # from the repo root, against `make serve`'s server

With --start, variables given to `make bench` (WEIGHTS=..., MODEL_STORE=...) reach the `make serve`
it runs through MAKEFLAGS; --make-var passes them when bench.py is called directly. Needs wrk
(apt-get install wrk) unless --in-process-only.
"""
import argparse
import base64
import contextlib
import datetime
import importlib.util
import ipaddress
import json
import logging
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import requests
import yaml

from cifar10_serve.forwards import cpu_flags
from client import TorchServeClient

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger(__name__)
LUA = Path(__file__).resolve().parent / "post.lua"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--start", action="store_true",
      help="start TorchServe with `make serve` (timed: cold start) and `make stop` it at the end "
           "(default: use the running server)")
    a("--make-var", action="append", default=[], metavar="NAME=VALUE",
      help="a variable for the `make archive/serve/stop` that --start runs, e.g. WEIGHTS=x.pt "
           "(default: none)")
    a("--config", type=Path, default=ROOT / "config.properties",
      help="TorchServe config.properties with the addresses (default: config.properties)")
    a("--key-file", type=Path, default=ROOT / "key_file.json",
      help="the token file TorchServe writes (default: key_file.json)")
    a("--mar", type=Path, default=ROOT / "model_store" / "cifar10.mar",
      help="archive whose weights and model-config.yaml the in-process runs use "
           "(default: model_store/cifar10.mar)")
    a("--weights", type=Path, default=None,
      help="checkpoint for the in-process runs instead of the archive's (default: the archive's)")
    a("--images", type=Path, default=ROOT / "tests" / "holdout",
      help="real images the requests carry, in turn (gated TTA's cost depends on how many are "
           "unsure at a glance) (default: tests/holdout)")
    a("--rotate", type=int, default=200,
      help="how many of --images (a fixed random subset) (default: 200)")
    a("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64], metavar="N",
      help="wrk connections, one run each (default: 1 4 16 32 64)")
    a("--duration", type=int, default=10, help="seconds per wrk run (default: 10)")
    a("--warmup", type=int, default=2, help="seconds of unrecorded load first (default: 2)")
    a("--wrk-threads", type=int, default=2,
      help="wrk threads, at most one per connection (default: 2)")
    a("--timeout", type=int, default=30,
      help="seconds before wrk counts a request as timed out (default: 30, 3x the model's "
           "responseTimeout)")
    a("--multi-images", type=int, default=16, help="images per multi-image request (default: 16)")
    a("--multi-connections", type=int, default=4,
      help="wrk connections for the multi-image requests (default: 4)")
    a("--ratio-connections", type=int, default=32,
      help="connections whose served img/s is compared to the in-process handler (default: 32)")
    a("--batch", type=int, default=32, help="requests per in-process handler batch (default: 32)")
    a("--seconds", type=float, default=5.0,
      help="seconds per in-process measurement (default: 5.0)")
    a("--threads", type=int, default=None,
      help="torch threads in-process (default: every usable core)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto",
      help="in-process device; auto: cuda:0 when there is one, as a TorchServe worker "
           "(default: auto)")
    a("--compare-runtime", default=None, metavar="RUNTIME|SETTING=VALUE",
      help="with --start: also serve the same archive with this handler.runtime (onnx, torch, "
           "bf16, int8) or handler setting (tta_margin=1: full TTA), one server after the "
           "other, and compare (default: none)")
    a("--peer", choices=("litserve",), default=None,
      help="also serve the same weights with this peer server (bench/litserve_peer.py: eager "
           "torch, no TTA) and compare 1-image JSON base64 requests (default: none)")
    a("--peer-connections", type=int, nargs="+", default=[1, 32], metavar="N",
      help="wrk connections for the peer comparison (default: 1 32)")
    a("--in-process-only", action="store_true",
      help="skip the server and wrk, run only the in-process part (default: off)")
    a("--out", type=Path, default=ROOT / "bench" / "results",
      help="folder for results.md, results.json, results.png (default: bench/results)")
    args = p.parse_args(argv)
    if min(args.concurrency + [args.duration, args.wrk_threads, args.multi_images, args.batch]) < 1:
        p.error("--concurrency, --duration, --wrk-threads, --multi-images, --batch must be >= 1")
    if args.compare_runtime and not args.start:
        p.error("--compare-runtime needs --start (bench.py starts both servers)")
    if not args.in_process_only and shutil.which("wrk") is None:
        p.error("wrk not found: apt-get install -y wrk (or pass --in-process-only)")
    return args


# ---- the machine -------------------------------------------------------------------------------

def machine_info():
    import torch
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
              if line.startswith("model name")]
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    meminfo = Path("/proc/meminfo").read_text().split() if Path("/proc/meminfo").exists() else []
    return {
        "cpu": models[0] if models else platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(int(meminfo[1]) / 2**20, 1) if meminfo[:1] == ["MemTotal:"] else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchserve": _torchserve_version(),
        "wrk": _wrk_version(),
    }


def _torchserve_version():
    try:
        from ts.version import __version__
        return __version__
    except ImportError:
        return None


def _wrk_version():
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).split("[")[0].replace("wrk", "", 1).strip() or None


# ---- the server --------------------------------------------------------------------------------

def make(target, make_vars):
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), target, *make_vars])


@contextlib.contextmanager
def server(args, make_vars=None):
    """Yields (client, cold-start seconds or None); with --start, `make serve` ... `make stop`
    (with ``make_vars``, by default --make-var's)."""
    make_vars = args.make_var if make_vars is None else make_vars
    client = TorchServeClient(args.config, args.key_file)
    for address in (client.inference, client.management):
        host = urlparse(address).hostname or ""
        if host != "localhost" and not _is_loopback(host):
            sys.exit(f"{address} in {args.config} is not a loopback address; bench.py only "
                     "loads servers on this machine")
    if not args.start:
        yield client, None
        return
    if _answers(client):
        sys.exit("a TorchServe already answers at these addresses; `make stop` it first, or drop "
                 "--start to benchmark it as it is")
    if make("archive", make_vars).returncode:  # untimed, so `make serve` only starts
        sys.exit("`make archive` failed")
    started = False
    try:
        log.info("cold start: timing `make serve` (archive up to date)")
        t0 = time.perf_counter()
        started = True
        if make("serve", make_vars).returncode:
            sys.exit("`make serve` failed (its output above)")
        yield client, time.perf_counter() - t0
    finally:
        if started:
            log.info("stopping the TorchServe bench.py started: `make stop`")
            make("stop", make_vars)


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _answers(client):
    try:
        return client.ping().ok
    except Exception:  # noqa: BLE001 - nothing listening, no key file yet, ...: not running
        return False


def compare_runtime(args, folder):
    """Serve the archive again with model-config.yaml's handler.runtime set to
    --compare-runtime (its own model store), measured as the first: {runtime, cold start, rows}."""
    config = yaml.safe_load(model_config(args).read_text())
    name, _, value = args.compare_runtime.rpartition("=")
    config["handler"][name or "runtime"] = yaml.safe_load(value)
    config_file = folder / "model-config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    make_vars = [*args.make_var, f"MODEL_CONFIG={config_file}",
                 f"MODEL_STORE={folder / 'store'}", f"ONNX={folder / 'store' / 'cifar10.onnx'}",
                 f"INT8={folder / 'store' / 'cifar10.int8.onnx'}",
                 f"GOLDEN={folder / 'store' / 'golden.npz'}"]
    with server(args, make_vars) as (client, cold):
        return {"runtime": args.compare_runtime, "cold_start_s": cold,
                "served": served(client, args, folder), "second_looks": second_looks(client)}


def model_config(args):
    """The model-config.yaml `make archive` packs: MODEL_CONFIG of --make-var or of the make
    that runs this, else handler/model-config.yaml."""
    given = [v.split("=", 1)[1] for v in [*make_assignments(), *args.make_var]
             if v.startswith("MODEL_CONFIG=")]
    return Path(given[-1]) if given else ROOT / "handler" / "model-config.yaml"


def second_looks(client):
    """The share of served images that took TTA's extra views (the handler's counters on the
    metrics port), or None where TTA is off."""
    counted = {name: float(value) for name, value in re.findall(
        r"^(ts_handler_tta_images|ts_handler_tta_second_looks)\{.*\} (\S+)$",
        client.metrics().text, flags=re.M)}
    images = counted.get("ts_handler_tta_images")
    return counted.get("ts_handler_tta_second_looks", 0) / images if images else None


def served_runtime(args, client):
    """handler.runtime of the served archive's model-config.yaml (--make-var MODEL_CONFIG=...),
    and the forward the workers chose for it where that differs (auto: "auto (int8)")."""
    configured = yaml.safe_load(model_config(args).read_text()).get("handler", {}).get(
        "runtime", "auto")
    response = client._call("GET", f"{client.management}/models/{client.model}?customized=true",
                            "management", timeout=10)
    chosen = (response.json()[0].get("customizedMetadata") or {}).get("runtime")
    return configured if chosen in (None, configured) else f"{configured} ({chosen})"


def describe(client):
    model = client.describe().json()[0]
    workers = model.get("workers", [])
    return {"workers": len(workers), "gpu_workers": sum(bool(w.get("gpu")) for w in workers),
            "batch_size": model.get("batchSize"), "max_batch_delay_ms": model.get("maxBatchDelay")}


# ---- request bodies and wrk --------------------------------------------------------------------

def sample(args):
    """A fixed random subset of --rotate images under --images: what the requests carry."""
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    return random.Random(0).sample(paths, min(args.rotate, len(paths)))


def rotation(folder, name, bodies):
    """A .list file naming one body file per body, for post.lua to send in turn."""
    paths = []
    for i, body in enumerate(bodies):
        paths.append(folder / f"{name}-{i}")
        paths[-1].write_bytes(body)
    listing = folder / f"{name}.list"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    return listing


def first_body(path):
    """The bytes of a body file, or of the first body a .list file names."""
    if path.suffix == ".list":
        path = Path(path.read_text().split("\n")[0])
    return path.read_bytes()


def request_bodies(folder, images, n):
    """{kind: (body file, Content-Type, images per request)} for the one- and n-image requests;
    one-image bodies rotate over ``images``."""
    singles = rotation(folder, "single", [p.read_bytes() for p in images])
    images = [images[i % len(images)] for i in range(n)]
    boundary = uuid.uuid4().hex
    multipart = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image{i}"; filename="{p.name}"'
        f"\r\nContent-Type: image/jpeg\r\n\r\n".encode() + p.read_bytes() + b"\r\n"
        for i, p in enumerate(images)) + f"--{boundary}--\r\n".encode()
    as_json = json.dumps({"data": [base64.b64encode(p.read_bytes()).decode() for p in images]})
    bodies = {f"{n} images, multipart": (multipart, f"multipart/form-data; boundary={boundary}", n),
              f"{n} images, JSON base64": (as_json.encode(), "application/json", n)}
    out = {"1 image, raw body": (singles, "image/jpeg", 1)}
    for i, (kind, (body, content_type, count)) in enumerate(bodies.items()):
        path = folder / f"body{i}"
        path.write_bytes(body)
        out[kind] = (path, content_type, count)
    return out


def check_body(client, authorization, path, content_type, count):
    """One request with this body (the first of a .list) must answer 200 with `count`
    predictions, before any load."""
    response = client.session.post(
        f"{client.inference}/predictions/{client.model}", data=first_body(path), timeout=60,
        headers={"Authorization": authorization, "Content-Type": content_type})
    answer = response.json() if response.ok else None
    got = len(answer) if isinstance(answer, list) else 1 if isinstance(answer, dict) else 0
    if got != count or (count > 1) != isinstance(answer, list):
        sys.exit(f"a check request answered {response.status_code} with {response.text[:300]!r};"
                 f" expected {count} prediction(s)")


def run_wrk(url, authorization, body, content_type, connections, args, seconds=None):
    """One bounded wrk run; returns post.lua's numbers plus req/s."""
    seconds = seconds or args.duration
    cmd = ["wrk", f"-t{min(args.wrk_threads, connections)}", f"-c{connections}", f"-d{seconds}s",
           "--timeout", f"{args.timeout}s", "-s", str(LUA), url, "--", str(body), content_type]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + args.timeout + 60,
                         env=dict(os.environ, BENCH_AUTHORIZATION=authorization))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    if out.returncode or not lines:
        sys.exit(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    result["req_s"] = result["requests"] / (result["duration_us"] / 1e6)
    result["non_2xx"] = sum(n for status, n in result["statuses"].items()
                            if not 200 <= int(status) < 300)
    result["socket_errors"] = sum(v for k, v in result["errors"].items() if k != "status")
    result["wrk_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def server_processes(client):
    """{"frontend": [pid], "workers": [pids]} of the server on this machine: the workers the
    management API lists and their parent (TorchServe's Java frontend); empty without /proc."""
    workers = [w["pid"] for w in client.describe().json()[0].get("workers", []) if w.get("pid")]
    try:
        parents = {int(proc_stat(pid)[1]) for pid in workers}
    except (OSError, ValueError, IndexError):
        return {}
    return {"frontend": sorted(parents), "workers": workers}


def proc_stat(pid):
    """/proc/<pid>/stat's fields after the command name (state, ppid, ...; utime is [11])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(processes):
    """{role: CPU seconds (user + system) its processes have used so far}; a role is left out
    where one of its processes cannot be read (a worker replaced mid-run)."""
    tick, found = os.sysconf("SC_CLK_TCK"), {}
    for role, pids in processes.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[role] = sum(sum(map(int, proc_stat(pid)[11:13])) for pid in pids) / tick
    return found


def with_cpu(processes, run):
    """``run()``'s result with "cpu_ms_per_request": the CPU time the frontend, the workers and
    wrk used per answered request during it (what the 2 cores are shared out to)."""
    start = cpu_seconds(processes)
    result = run()
    end, requests = cpu_seconds(processes), max(result["requests"], 1)
    spent = {role: end[role] - start[role] for role in start if role in end}
    spent["wrk"] = result["wrk_cpu_s"]
    result["cpu_ms_per_request"] = {role: 1000 * s / requests for role, s in spent.items()}
    return result


def served(client, args, folder):
    authorization = client._token("inference")["Authorization"]
    url = f"{client.inference}/predictions/{client.model}"
    bodies = request_bodies(folder, sample(args), args.multi_images)
    for path, content_type, count in bodies.values():
        check_body(client, authorization, path, content_type, count)
    single, *multi = bodies.items()
    if args.warmup:
        run_wrk(url, authorization, single[1][0], single[1][1], 4, args, seconds=args.warmup)
    rows, processes = [], server_processes(client)
    one_json = [(JSON_ONE, (json_bodies(folder, sample(args)), "application/json", 1), c)
                for c in (args.peer_connections if args.peer else [])]
    for kind, (path, content_type, count), connections in (
            [(*single, c) for c in args.concurrency]
            + [(*m, args.multi_connections) for m in multi] + one_json):
        result = with_cpu(processes, lambda: run_wrk(url, authorization, path, content_type,
                                                     connections, args))
        rows.append(dict(result, kind=kind, connections=connections, images=count,
                         img_s=result["req_s"] * count))
        log.info("%-24s %3d connections: %8.1f req/s  p50 %7.1f ms  p99 %7.1f ms  non-2xx %d",
                 kind, connections, result["req_s"], result["latency_us"]["p50"] / 1e3,
                 result["latency_us"]["p99"] / 1e3, result["non_2xx"])
    return rows


JSON_ONE = "1 image, JSON base64"


def json_bodies(folder, images):
    """1-image JSON base64 bodies, {"data": "<base64>"}, one per image (a .list file): what
    TorchServe and the peer both read."""
    return rotation(folder, "one-json", [
        json.dumps({"data": base64.b64encode(p.read_bytes()).decode()}).encode() for p in images])


def peer(args, folder):
    """The peer server on a free loopback port, loaded with the archive's weights, measured with
    the same 1-image JSON body: {"name", "rows"}. Stopped (its process group) at the end."""
    from tests.harness import free_port  # noqa: PLC0415

    with zipfile.ZipFile(args.mar) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        weights = folder / "peer.pt"
        weights.write_bytes(mar.read(manifest["model"]["serializedFile"]))
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.litserve_peer", "--weights",
                                str(weights), "--port", str(port)], cwd=ROOT,
                               start_new_session=True, stdout=subprocess.DEVNULL)
    url, body = f"http://127.0.0.1:{port}/predict", json_bodies(folder, sample(args))
    try:
        for _ in range(240):
            with contextlib.suppress(Exception):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.5)
        answer = requests.post(url, data=first_body(body), timeout=30)
        if answer.status_code != 200 or len(answer.json()) != 5:
            sys.exit(f"the LitServe peer answered {answer.status_code}: {answer.text[:300]}")
        if args.warmup:
            run_wrk(url, "none", body, "application/json", 4, args, seconds=args.warmup)
        rows = []
        for connections in args.peer_connections:
            result = run_wrk(url, "none", body, "application/json", connections, args)
            rows.append(dict(result, kind=JSON_ONE, connections=connections, images=1,
                             img_s=result["req_s"]))
            log.info("litserve %-15s %3d connections: %8.1f req/s  p50 %7.1f ms", JSON_ONE,
                     connections, result["req_s"], result["latency_us"]["p50"] / 1e3)
        return {"name": "LitServe 0.2.19 (eager torch, no TTA, batch 32, 2 workers)", "rows": rows}
    finally:
        stop_group(process)


def stop_group(process, seconds=30):
    """SIGTERM the process group the peer started (its workers too), SIGKILL what is left after
    ``seconds``, and return once none of them runs: nothing of it may load the next measurement."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=seconds)
        for _ in range(seconds * 10):
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


# ---- in-process --------------------------------------------------------------------------------

def load_handler(args, folder, threads):
    """The served handler class, initialised on a ts Context as a TorchServe worker would, with
    ``threads`` torch (and ONNX Runtime) threads; also the threads a served worker gets."""
    import torch
    from ts.context import Context
    from ts.metrics.metrics_store import MetricsStore
    handler_module = importlib.util.spec_from_file_location(  # as TorchServe loads it
        "cifar10_handler", ROOT / "handler" / "cifar10_handler.py")
    Cifar10Handler = importlib.util.module_from_spec(handler_module)
    handler_module.loader.exec_module(Cifar10Handler)
    Cifar10Handler = Cifar10Handler.Cifar10Handler

    model_dir = folder / f"model-{threads}"
    if args.weights:
        model_dir.mkdir()
        shutil.copy(args.weights, model_dir / args.weights.name)
        manifest = {"model": {"serializedFile": args.weights.name}}
        config_file = ROOT / "handler" / "model-config.yaml"
    else:
        with zipfile.ZipFile(args.mar) as mar:
            mar.extractall(model_dir)
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        config_file = model_dir / manifest["model"].get("configFile", "model-config.yaml")
    if not (model_dir / "index_to_name.json").exists():
        shutil.copy(ROOT / "handler" / "index_to_name.json", model_dir)
    model_config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
    model_config.setdefault("handler", {})
    if args.weights:  # no exported ONNX file beside a bare checkpoint
        model_config["handler"]["runtime"] = "torch"
    worker_threads = model_config["handler"].get("threads") or torch.get_num_threads()
    model_config["handler"]["threads"] = threads or worker_threads
    model_config["handler"]["forward_batch"] = args.batch  # a --batch batch in one forward call
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    context = Context("cifar10", str(model_dir), manifest, batch_size=args.batch,
                      gpu=0 if cuda else None, mms_version=_torchserve_version(),
                      metrics=MetricsStore(uuid.uuid4(), "cifar10"),
                      model_yaml_config=model_config)
    handler = Cifar10Handler()
    handler.initialize(context)
    return handler, context, worker_threads


def rate(step, seconds, sync, warmup=3, min_steps=3):
    """(steps, elapsed seconds) of `step` run for about `seconds`, after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    sync()
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < seconds:
        step()
        sync()
        steps += 1
    return steps, time.perf_counter() - start


def in_process(args, folder):
    """The handler and its forward pass without HTTP: on every usable core (the yardstick for the
    server), and one image on a served worker's threads (what a lone request costs it)."""
    import torch
    from ts.context import RequestProcessor

    # In-process gets the whole machine (every usable core), as a fair yardstick for the server.
    cores = args.threads or len(os.sched_getaffinity(0))
    worker, _, worker_threads = load_handler(args, folder, threads=0)
    handler, context, _ = load_handler(args, folder, threads=cores)
    torch.set_num_threads(cores)
    images = sample(args)  # the served runs' images: as many unsure ones for the TTA gate
    rows = [{"body": bytearray(images[i % len(images)].read_bytes())} for i in range(args.batch)]
    sync = torch.cuda.synchronize if handler.device.type == "cuda" else (lambda: None)

    def handle():
        context.request_processor = [RequestProcessor({}) for _ in rows]
        answers = handler.handle(rows, context)
        if len(answers) != len(rows) or any(p.get_response_status_code() != 200
                                            for p in context.request_processor):
            sys.exit(f"the handler did not answer 200 to every request: {answers[:2]}")

    batch = handler.to_batch([image for row in handler.decode(rows)[0] for image in row.images])
    runtime, as_worker = handler.runtime, f"{worker_threads} thread(s) as a worker"
    steps = [("handler.handle, raw-JPEG requests", args.batch, cores, handle),
             (f"forward ({runtime})", args.batch, cores, lambda: _forward(handler, batch)),
             (f"forward ({runtime})", 1, cores, lambda: _forward(handler, batch[:1])),
             (f"forward ({runtime}), {as_worker}", 1, worker_threads,
              lambda: _forward(worker, batch[:1]))]
    if runtime != "torch":  # what the ONNX runtime saves, for comparison
        steps += [("forward (torch)", args.batch, cores,
                   lambda: _forward(handler, batch, handler.model)),
                  (f"forward (torch), {as_worker}", 1, worker_threads,
                   lambda: _forward(worker, batch[:1], worker.model))]
    results = []
    for what, n, threads, step in steps:
        torch.set_num_threads(threads)
        done, elapsed = rate(step, args.seconds, sync)
        results.append({"what": what, "batch": n, "img_s": done * n / elapsed,
                        "ms_per_batch": elapsed / done * 1e3})
        log.info("%-40s batch %3d: %9.1f img/s  %8.3f ms", what, n, results[-1]["img_s"],
                 results[-1]["ms_per_batch"])
    torch.set_num_threads(cores)
    weights = args.weights or f"{args.mar} ({context.manifest['model']['serializedFile']})"
    meta = {"device": str(handler.device), "threads": cores, "tta": handler.settings.tta,
            "runtime": runtime, "parameters": sum(p.numel() for p in handler.model.parameters()),
            "weights": str(weights)}
    return results, meta


def _forward(handler, batch, net=None):
    """One forward pass as the handler's inference() runs it, with its test-time augmentation."""
    import torch
    from cifar10_serve.net import predict_logits
    with torch.inference_mode():
        predict_logits(net or handler.forward, batch, handler.settings.tta)


# ---- results -----------------------------------------------------------------------------------

def markdown(report):
    m, lines = report["machine"], []
    gpus = ", ".join(m["gpus"]) or "none"
    lines += ["# CIFAR-10 on TorchServe: benchmark", "",
              f"- date: {report['date']}",
              f"- command: {report['command']}",
              f"- machine: {m['cpu']} (kernel flags: {' '.join(m.get('cpu_flags', [])) or '-'}), "
              f"{m['cores']} cores ({m['cores_usable']} usable), "
              f"{m['memory_gib']} GiB RAM, GPU: {gpus}; load average {m['load_average']:.2f} "
              "at start",
              f"- software: Python {m['python']}, torch {m['torch']}, torchserve {m['torchserve']},"
              f" wrk {m['wrk']}"]
    p = report.get("in_process_meta")
    if p:
        lines.append(f"- model: {p['weights']}, {p['parameters']:,} parameters, tta {p['tta']}, "
                     f"runtime {p.get('runtime', 'torch')} (forward rows include the TTA views)")
    s = report.get("server")
    if s:
        lines.append(f"- server: {s['workers']} workers ({s['gpu_workers']} on a GPU), batchSize "
                     f"{s['batch_size']}, maxBatchDelay {s['max_batch_delay_ms']} ms")
    if "cold_start_s" in report:
        cold = report["cold_start_s"]
        lines.append("- cold start: not measured (no --start: the server was already running)"
                     if cold is None else
                     f"- cold start: {cold:.1f} s, the wall time of `make serve` with the archive "
                     "already built: TorchServe launch to its first prediction answered 200 "
                     "(includes two client.py start-ups)")
    if report.get("served"):
        lines += ["", f"## Served (wrk, {report['duration_s']} s per row, latency per request)", "",
                  "| request | connections | req/s | img/s | p50 ms | p90 ms | p99 ms | non-2xx "
                  "| socket errors | CPU ms per request: frontend / workers / wrk |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in report["served"]:
            lat = {k: v / 1e3 for k, v in r["latency_us"].items()}
            lines.append(f"| {r['kind']} | {r['connections']} | {r['req_s']:.1f} | "
                         f"{r['img_s']:.1f} | {lat['p50']:.1f} | {lat['p90']:.1f} | "
                         f"{lat['p99']:.1f} | {r['non_2xx']} | {r['socket_errors']} | "
                         f"{cpu_cell(r)} |")
        bad = {k: v for r in report["served"] for k, v in r["statuses"].items()
               if not 200 <= int(k) < 300}
        if bad:
            lines += ["", f"Non-2xx answers by status: {bad}"]
    if report.get("in_process"):
        lines += ["", f"## In-process ({p['device']}, torch threads: {p['threads']}, "
                  f"{report['seconds']} s per row)", "",
                  "| what | batch | img/s | ms per batch |", "|---|--:|--:|--:|"]
        lines += [f"| {r['what']} | {r['batch']} | {r['img_s']:.1f} | {r['ms_per_batch']:.3f} |"
                  for r in report["in_process"]]
    if report.get("compare"):
        lines += compare_table(report)
    if report.get("peer"):
        lines += peer_table(report)
    ratio = report.get("ratio")
    if report.get("served") and not ratio:
        lines += ["", "Served / in-process: n/a (no 1-image run at --ratio-connections)"]
    if ratio:
        lines += ["", f"**Served / in-process: {ratio['value']:.2f}** = {ratio['served_img_s']:.1f}"
                  f" img/s served at {ratio['connections']} connections / "
                  f"{ratio['handler_img_s']:.1f} img/s of the handler in-process at batch "
                  f"{ratio['batch']}."]
    return "\n".join(lines) + "\n"


def cpu_cell(row):
    """"frontend / workers / wrk" CPU ms per request, "-" for what was not measured."""
    cpu = row.get("cpu_ms_per_request", {})
    return " / ".join(f"{cpu[k]:.2f}" if k in cpu else "-" for k in ("frontend", "workers", "wrk"))


def peer_table(report):
    """Markdown rows: this server beside the peer on the same 1-image JSON base64 requests."""
    mine = {r["connections"]: r for r in report["served"] if r["kind"] == JSON_ONE}
    lines = ["", f"## Beside a peer: {report['peer']['name']}, same weights, same run", "",
             f"1-image JSON base64 requests; this server: runtime "
             f"{report['server'].get('runtime', '')}, its TTA settings.", "",
             "| connections | this server img/s | peer img/s | ratio | this server p50 ms | "
             "peer p50 ms | non-2xx (this / peer) |", "|--:|--:|--:|--:|--:|--:|--:|"]
    for theirs in report["peer"]["rows"]:
        own = mine.get(theirs["connections"])
        if own:
            lines.append(f"| {theirs['connections']} | {own['img_s']:.1f} | {theirs['img_s']:.1f} "
                         f"| {own['img_s'] / theirs['img_s']:.2f} | "
                         f"{own['latency_us']['p50'] / 1e3:.1f} | "
                         f"{theirs['latency_us']['p50'] / 1e3:.1f} | "
                         f"{own['non_2xx'] + own['socket_errors']} / "
                         f"{theirs['non_2xx'] + theirs['socket_errors']} |")
    return lines


def compare_table(report):
    """Markdown rows: the default runtime beside --compare-runtime's, and their ratios."""
    default, other = report["server"].get("runtime", "default"), report["compare"]
    def pick(rows, kind, connections):
        return next((r for r in rows if r["kind"] == kind and r["connections"] == connections),
                    None)
    rows = [("cold start, s", report.get("cold_start_s"), other["cold_start_s"]),
            ("share of images given the TTA views, %",
             100 * report["server"]["second_looks"] if report["server"].get("second_looks")
             is not None else None,
             100 * other["second_looks"] if other.get("second_looks") is not None else None)]
    for r in report["served"]:
        twin = pick(other["served"], r["kind"], r["connections"])
        if twin:
            rows.append((f"img/s, {r['kind']}, {r['connections']} conn", r["img_s"],
                         twin["img_s"]))
            for role in ("frontend", "workers"):
                if r["images"] == 1 and r["connections"] > 1 and all(
                        role in x.get("cpu_ms_per_request", {}) for x in (r, twin)):
                    rows.append((f"CPU ms per request, {role}, {r['kind']}, {r['connections']} "
                                 "conn", r["cpu_ms_per_request"][role],
                                 twin["cpu_ms_per_request"][role]))
            if r["images"] == 1 and r["connections"] == 1:
                rows.append((f"p50 ms, {r['kind']}, 1 conn", r["latency_us"]["p50"] / 1e3,
                             twin["latency_us"]["p50"] / 1e3))
    lines = ["", f"## Runtime {default} beside runtime {other['runtime']} (same run, one server "
             "after the other)", "", f"| | {default} | {other['runtime']} | {default} / "
             f"{other['runtime']} |", "|---|--:|--:|--:|"]
    for what, mine, theirs in rows:
        if mine is not None and theirs:
            digits = 2 if what.startswith("CPU") else 1
            lines.append(f"| {what} | {mine:.{digits}f} | {theirs:.{digits}f} | "
                         f"{mine / theirs:.2f} |")
    return lines


def plot(report):
    """PNG bytes: served images/s and p50/p99 latency against wrk connections."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    rows = [r for r in report["served"] if r["images"] == 1]
    x = [r["connections"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    runtime = report["server"].get("runtime", "")
    left.plot(x, [r["img_s"] for r in rows], "o-", label=f"served {runtime}, 1-image requests")
    other = report.get("compare")
    other_rows = [r for r in other["served"] if r["images"] == 1] if other else []
    if other_rows:
        left.plot([r["connections"] for r in other_rows], [r["img_s"] for r in other_rows], "o--",
                  label=f"served {other['runtime']}, 1-image requests")
    for r in report["served"]:
        if r["images"] > 1:
            left.plot([r["connections"]], [r["img_s"]], "s", label=f"served, {r['kind']}")
    handler = report["in_process"][0] if report.get("in_process") else None
    if handler:
        left.axhline(handler["img_s"], ls="--", c="grey",
                     label=f"handler in-process, batch {handler['batch']}")
    left.set(xscale="log", xlabel="wrk connections", ylabel="images/s", title="Throughput")
    right.plot(x, [r["latency_us"]["p50"] / 1e3 for r in rows], "o-", label=f"p50 {runtime}")
    right.plot(x, [r["latency_us"]["p99"] / 1e3 for r in rows], "o-", label=f"p99 {runtime}")
    if other_rows:
        ox = [r["connections"] for r in other_rows]
        right.plot(ox, [r["latency_us"]["p50"] / 1e3 for r in other_rows], "o--",
                   label=f"p50 {other['runtime']}")
        right.plot(ox, [r["latency_us"]["p99"] / 1e3 for r in other_rows], "o--",
                   label=f"p99 {other['runtime']}")
    right.set(xscale="log", yscale="log", xlabel="wrk connections", ylabel="ms",
              title="Latency, 1-image requests")
    right.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    right.yaxis.set_minor_formatter(NullFormatter())
    ticks = sorted({r["connections"] for r in report["served"]})
    for ax in (left, right):
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"{m['cpu']}, {m['cores']} cores, GPU: {', '.join(m['gpus']) or 'none'} - "
                 f"{report['date']}", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return png.getvalue()


def write(path, data):
    """Write through a .tmp file, so an interrupted run leaves the previous results whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    os.replace(tmp, path)


def command_line():
    """This process's command line, and the variables given to make when make ran it."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    cmd = f"`{shlex.join([str(python), *sys.argv])}`"
    assigned = make_assignments()
    return f"{cmd}, run by make with `{shlex.join(assigned)}`" if assigned else cmd


def make_assignments():
    """The NAME=VALUE variables given to the make that runs this process (none outside make)."""
    flags = os.environ.get("MAKEFLAGS", "").split("-- ", 1) if "MAKELEVEL" in os.environ else []
    if len(flags) < 2:
        return []
    # make escapes the spaces inside a value with a backslash
    return [v.replace("\\ ", " ") for v in re.split(r"(?<!\\) ", flags[1].strip()) if v]


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `make stop` in finally
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": command_line(), "machine": machine_info(),
              "duration_s": args.duration, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="cifar10-bench-") as tmp:
        folder = Path(tmp)
        if not args.in_process_only:
            with server(args) as (client, cold):
                report["cold_start_s"] = cold
                report["server"] = dict(describe(client), runtime=served_runtime(args, client))
                report["served"] = served(client, args, folder)
                report["server"]["second_looks"] = second_looks(client)
            if args.compare_runtime:
                report["compare"] = compare_runtime(args, folder)
            if args.peer:
                report["peer"] = peer(args, folder)
        report["in_process"], report["in_process_meta"] = in_process(args, folder)
    served_at = [r for r in report.get("served", [])
                 if r["images"] == 1 and r["connections"] == args.ratio_connections]
    if served_at:
        handler = report["in_process"][0]
        report["ratio"] = {"value": served_at[0]["img_s"] / handler["img_s"],
                           "served_img_s": served_at[0]["img_s"], "handler_img_s": handler["img_s"],
                           "connections": args.ratio_connections, "batch": handler["batch"]}
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    write(args.out / "results.md", table)
    write(args.out / "results.json", json.dumps(report, indent=2) + "\n")
    if report.get("served"):
        write(args.out / "results.png", plot(report))
    print(table)
    log.info("wrote %s", ", ".join(str(p) for p in sorted(args.out.glob("results.*"))))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ts").setLevel(logging.WARNING)  # a [METRICS] line per handler call
    sys.exit(main())
