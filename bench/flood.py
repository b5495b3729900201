"""Floods of legal but costly requests beside good traffic: do good requests still get their answer
promptly, and does any worker restart? (issue 25's acceptance; docs/api.md "Errors").

Two scenarios, each for --duration seconds against one TorchServe:
  explain  --explain-clients clients loop /explanations with --explain-images images each,
           resending after a 503/429's Retry-After as client.py does;
  v2       --v2-clients clients loop Open Inference Protocol v2 requests of --v2-images UINT8
           images (JSON, nested [N, 32, 32, 3]);
beside --good-clients clients looping one-image /predictions of real held-out JPEGs, sent once
each. Prints a table per scenario: good requests, how many failed (any answer but 200), their
p50/p99/max latency, worker restarts (worker pids from the management API before and after), and
the flood's answer codes. The flood runs in a child process, so its client work does not slow the
good clients' timing in this one.

    .venv/bin/python -m bench.flood --start --duration 20   # its own TorchServe on free ports
    .venv/bin/python -m bench.flood --duration 90           # against `make serve`'s server

--start serves --mar (`make archive` builds it) from a temporary folder on free loopback ports and
stops it at the end; without it, the server of --config and --key-file is used as it is.
"""
import argparse
import collections
import contextlib
import json
import multiprocessing
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from cifar10_serve.images import decode_image
from client import TorchServeClient
from tests.harness import GoodTraffic, local_torchserve

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--start", action="store_true",
      help="serve --mar with a TorchServe of its own on free loopback ports (default: use the "
           "server of --config)")
    a("--mar", type=Path, default=ROOT / "model_store" / "cifar10.mar",
      help="the archive --start serves (default: model_store/cifar10.mar)")
    a("--config", type=Path, default=ROOT / "config.properties",
      help="config.properties of the running server (default: config.properties)")
    a("--key-file", type=Path, default=ROOT / "key_file.json",
      help="its token file (default: key_file.json)")
    a("--scenarios", nargs="+", choices=("explain", "v2"), default=["explain", "v2"],
      help="which floods to run, one after the other (default: explain v2)")
    a("--duration", type=float, default=90, help="seconds per scenario (default: 90)")
    a("--good-clients", type=int, default=4, help="clients of good traffic (default: 4)")
    a("--explain-clients", type=int, default=16, help="explanation clients (default: 16)")
    a("--explain-images", type=int, default=4, help="images per explanation (default: 4)")
    a("--v2-clients", type=int, default=32, help="v2 UINT8 clients (default: 32)")
    a("--v2-images", type=int, default=64, help="images per v2 request (default: 64)")
    a("--images", type=Path, default=ROOT / "tests" / "holdout",
      help="real images the requests carry (default: tests/holdout)")
    a("--timeout", type=float, default=60, help="seconds before a request is given up and "
      "counted as failed (default: 60)")
    a("--json", type=Path, default=None, help="also write the results here (default: none)")
    return p.parse_args(argv)


@contextlib.contextmanager
def server(args):
    """A TorchServeClient: of a TorchServe started here (--start), or of the running one."""
    if not args.start:
        yield TorchServeClient(args.config, args.key_file)
        return
    if not args.mar.exists():
        raise SystemExit(f"{args.mar} is missing: `make archive` builds it")
    with tempfile.TemporaryDirectory(prefix="flood-") as run:
        store = Path(run) / "store"
        store.mkdir()
        (store / "cifar10.mar").symlink_to(args.mar.resolve())
        with local_torchserve(store, Path(run)) as client:
            log = Path(run) / "logs" / "model_log.log"
            for line in log.read_text(errors="replace").splitlines():
                if "batch budget" in line:  # what each worker derived at start
                    print("worker log:", line.split("MODEL_LOG - ", 1)[-1])
            yield client


def worker_pids(client):
    return {w["pid"] for w in client.describe().json()[0]["workers"]}


def budget_figures(client):
    """What the workers derived at start (the management API's customized describe)."""
    response = client._call("GET", f"{client.management}/models/{client.model}?customized=true",
                            "management", timeout=30)
    metadata = response.json()[0].get("customizedMetadata") or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    return metadata.get("budget")


def flood_client(url, headers, body, stop, timeout, results):
    """One flooding client until ``stop``: (status, seconds) each; a 503/429 with Retry-After
    is resent after that many seconds, as client.py and polite clients do."""
    session = requests.Session()
    while time.monotonic() < stop:
        start = time.monotonic()
        try:
            response = session.post(url, data=body, headers=headers, timeout=timeout)
            status, retry = response.status_code, response.headers.get("Retry-After")
        except requests.RequestException as err:
            status, retry = type(err).__name__, None
        results.append((status, time.monotonic() - start))
        if status in (429, 503) and retry:
            time.sleep(min(float(retry), max(0.0, stop - time.monotonic())))


def flood(url, headers, body, clients, stop, timeout, queue):
    """The child process: ``clients`` threads of flood_client until ``stop`` (the monotonic
    clock is the machine's, the same in every process); puts their results on queue."""
    results = []
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(flood_client, url, headers, body, stop, timeout, results)
    queue.put(results)


def multipart(images):
    boundary = "floodboundary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="image{i}"; '
                    f'filename="{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode() + image
                    + b"\r\n" for i, image in enumerate(images)) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def v2_uint8(images):
    pixels = np.stack([np.asarray(decode_image(image)) for image in images])
    return json.dumps({"id": "flood", "inputs": [{
        "name": "images", "datatype": "UINT8", "shape": list(pixels.shape),
        "data": pixels.tolist()}]}).encode(), "application/json"


def scenario(client, args, name, images):
    """Run one flood beside good traffic; its row of the table."""
    sample = [images[i % len(images)] for i in range(max(args.explain_images, args.v2_images))]
    if name == "explain":
        (body, content_type), path = multipart(sample[:args.explain_images]), "explanations"
        clients, what = args.explain_clients, f"{args.explain_images}-image explanations"
    else:
        (body, content_type), path = v2_uint8(sample[:args.v2_images]), "v2"
        clients, what = args.v2_clients, f"{args.v2_images}-image v2 UINT8"
    url = (f"{client.inference}/v2/models/{client.model}/infer" if path == "v2"
           else f"{client.inference}/{path}/{client.model}")
    headers = {**client._token("inference"), "Content-Type": content_type}
    check = requests.post(url, data=body, headers=headers, timeout=args.timeout)
    if check.status_code != 200:
        raise SystemExit(f"a lone {what} request answered {check.status_code}: "
                         f"{check.text[:300]}")
    before, spawn = worker_pids(client), multiprocessing.get_context("spawn")
    queue, stop = spawn.Queue(), time.monotonic() + args.duration
    child = spawn.Process(target=flood,
                          args=(url, headers, body, clients, stop, args.timeout, queue))
    child.start()
    good = GoodTraffic.of(client, images, clients=args.good_clients, timeout=args.timeout,
                          seconds=stop - time.monotonic()).start().join().summary()
    flooded = queue.get(timeout=args.duration + args.timeout + 60)
    child.join()
    after = worker_pids(client)
    refused = [seconds for status, seconds in flooded if status in (429, 503)]
    return {"scenario": f"{clients} clients of {what}", "seconds": args.duration,
            "good_requests": good["requests"], "good_failed": good["failed"],
            "good_p50_s": good["p50_s"], "good_p99_s": good["p99_s"], "good_max_s": good["max_s"],
            "worker_restarts": len(before - after),
            "flood_answers": dict(collections.Counter(str(s) for s, _ in flooded)),
            "flood_refusal_p50_s": statistics.median(refused) if refused else None}


def table(rows):
    def s(value):
        return "-" if value is None else f"{value:.2f}"
    lines = ["| flood | s | good requests | good failed | good p50 s | good p99 s | good max s "
             "| worker restarts | flood answers | 503/429 answered in (p50 s) |",
             "|---|--:|--:|--:|--:|--:|--:|--:|---|--:|"]
    for r in rows:
        answers = ", ".join(f"{code}: {n}" for code, n in sorted(r["flood_answers"].items()))
        lines.append(f"| {r['scenario']} | {r['seconds']:g} | {r['good_requests']} | "
                     f"{r['good_failed']} | {s(r['good_p50_s'])} | {s(r['good_p99_s'])} | "
                     f"{s(r['good_max_s'])} | {r['worker_restarts']} | {answers} | "
                     f"{s(r['flood_refusal_p50_s'])} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    images = [p.read_bytes() for p in random.Random(0).sample(paths, min(200, len(paths)))]
    with server(args) as client:
        figures = budget_figures(client)
        print(f"the workers' budget (management API describe): {json.dumps(figures)}")
        rows = []
        for name in args.scenarios:
            rows.append(scenario(client, args, name, images))
            print(table(rows[-1:]), flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {args.duration:g} s per flood, "
          f"{args.good_clients} good clients\n{table(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"budget": figures, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
