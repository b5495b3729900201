"""Long checks of a running deployment through its proxy (`make serve-proxy`), issue 33's:

  memory  --connections clients (default 32) loop the largest legal requests for --seconds
          (default 60): one 4096x4096 PNG (max_image_pixels and max_request_pixels, 16 M px),
          64 images of 512x512 in one multipart request (max_images, 16 M px together), and a
          4-image explanation of 2048x2048 PNGs (max_explain_images). Samples every worker's
          RSS (peak, and each worker's pid: a new pid is a restart, an OOM kill among them).
  soak    --clients clients (default 6) of mixed traffic for --seconds (default 600):
          predictions of real held-out JPEGs (each answer checked against the first answer to
          that image), v2 infer, multipart batches, explanations, and a trickle of requests the
          proxy refuses (unknown path, control character, form-encoded body). Every --every
          seconds (default 60): RSS and open file descriptors of TorchServe's Java process, its
          workers and nginx, and the bytes nginx's and TorchServe's logs grew per request.

    make serve-proxy
    .venv/bin/python -m bench.soak memory --seconds 60 --json bench/results/memory.json
    .venv/bin/python -m bench.soak soak --seconds 600 --json bench/results/soak.json

Prints a table; --json also writes the samples. Exits 1 when a good request failed, an answer
was wrong, or a worker restarted. Addresses: --url (the proxy), --config (TorchServe's
config.properties, for its management API), --key-file, --proxy-dir (nginx's run dir: pid and
logs), --logs (TorchServe's logs folder).
"""
import argparse
import base64
import collections
import contextlib
import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from client import TorchServeClient

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("check", choices=["memory", "soak"])
    a("--url", default="http://127.0.0.1:8000",
      help="the proxy's inference address (default: make serve-proxy's, 127.0.0.1:8000)")
    a("--config", type=Path, default=ROOT / "config.properties",
      help="TorchServe's config.properties (default: config.properties)")
    a("--key-file", type=Path, default=ROOT / "key_file.json",
      help="its token file (default: key_file.json)")
    a("--proxy-dir", type=Path, default=ROOT / ".run" / "proxy",
      help="nginx's run dir (default: .run/proxy)")
    a("--logs", type=Path, default=ROOT / "logs", help="TorchServe's logs (default: logs)")
    a("--seconds", type=float, default=None, help="duration (default: memory 60, soak 600)")
    a("--connections", type=int, default=32, help="memory: clients (default: 32)")
    a("--clients", type=int, default=6, help="soak: clients of good traffic (default: 6)")
    a("--every", type=float, default=60, help="soak: seconds between samples (default: 60)")
    a("--images", type=Path, default=ROOT / "tests" / "holdout",
      help="soak: real images (default: tests/holdout)")
    a("--json", type=Path, default=None, help="also write the results here (default: none)")
    return p.parse_args(argv)


def png(side, seed):
    """A side x side PNG of 64 x 64 blocks of random colours: well under the body limit (PNG
    compresses the blocks), decoded at full size."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((side, side), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def multipart(images, name="image"):
    boundary = "soakboundary"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}{i}\"; "
                    f"filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n".encode() + image
                    + b"\r\n" for i, image in enumerate(images))
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Deployment:
    """The processes behind the proxy: TorchServe's Java process and workers, nginx."""

    def __init__(self, args):
        self.client = TorchServeClient(args.config, args.key_file)
        self.proxy_dir, self.logs = args.proxy_dir, args.logs
        keys = json.loads(Path(args.key_file).read_text())
        self.headers = {"Authorization": f"Bearer {keys['inference']['key']}"}

    def workers(self):
        return {w["id"]: w["pid"] for w in self.client.describe().json()[0]["workers"]}

    def processes(self):
        """{"java": [...], "workers": [...], "nginx": [...]} of live psutil processes."""
        worker = []
        for pid in self.workers().values():
            with contextlib.suppress(psutil.NoSuchProcess):  # replaced since describe answered
                worker.append(psutil.Process(pid))
        java = {p.ppid() for p in worker}
        nginx = psutil.Process(int((self.proxy_dir / "nginx.pid").read_text()))
        return {"java": [psutil.Process(pid) for pid in java], "workers": worker,
                "nginx": [nginx] + nginx.children()}

    def sample(self):
        """RSS (MiB) and open files of each group; its processes' pids."""
        out = {}
        for group, processes in self.processes().items():
            rss, fds = 0, 0
            for process in processes:
                try:
                    rss += process.memory_info().rss
                    fds += process.num_fds()
                except psutil.NoSuchProcess:
                    pass
            out[group] = {"rss_mib": round(rss / 2**20, 1), "fds": fds,
                          "pids": [p.pid for p in processes]}
        return out

    def log_bytes(self):
        nginx = sum(f.stat().st_size for f in self.proxy_dir.glob("*.log*"))
        ts = sum(f.stat().st_size for f in self.logs.glob("*.log*"))
        error = (self.proxy_dir / "error.log").stat().st_size
        return {"nginx": nginx, "nginx_error": error, "torchserve": ts}


class Load:
    """Threads posting (path, body, content type, check) from ``pick(thread, n)``; statuses
    counted, failures (any answer but 200 or the proxy's prompt 429/503 with Retry-After for
    the memory check's over-budget requests) and wrong answers kept."""

    def __init__(self, url, headers, threads, pick, tolerated=()):
        self.url, self.headers, self.pick, self.tolerated = url, headers, pick, set(tolerated)
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.statuses, self.failures, self.wrong = collections.Counter(), [], 0
        self.requests = 0
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(threads)]

    def run(self, index):
        session, n = requests.Session(), 0
        while not self.stop.is_set():
            path, body, kind, check, expect = self.pick(index, n)
            n += 1
            try:
                response = session.post(self.url + path, data=body, timeout=120,
                                        headers={**self.headers, "Content-Type": kind})
                status = response.status_code
            except requests.RequestException as err:
                status, response = f"error {type(err).__name__}", None
            with self.lock:
                self.requests += 1
                self.statuses[status] += 1
                if status != expect and status not in self.tolerated:
                    self.failures.append(f"{path} {status}")
                elif check and response is not None and status == 200 and not check(response):
                    self.wrong += 1

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=130)


def check_memory(args, deployment):
    big = png(4096, 0)
    tiles, kind = multipart([png(512, i) for i in range(64)])
    explain, explain_kind = multipart([png(2048, 100 + i) for i in range(4)])
    for name, body in (("4096x4096 PNG", big), ("64 x 512x512 multipart", tiles),
                       ("4 x 2048x2048 explanation", explain)):
        print(f"{name}: {len(body) / 2**20:.2f} MiB")
    requests_ = [("/predictions/cifar10", big, "image/png", None, 200),
                 ("/predictions/cifar10", tiles, kind, None, 200),
                 ("/explanations/cifar10", explain, explain_kind, None, 200)]
    before, samples, peak = deployment.workers(), [], collections.Counter()
    # Over a batch's budget, the handler answers a prompt 503 with Retry-After (and the proxy a
    # 429 when every place is taken): legal answers under this load, counted, not failures.
    load = Load(args.url, deployment.headers, args.connections,
                lambda i, n: requests_[(i + n) % len(requests_)], tolerated=(429, 503))
    started = time.monotonic()
    with load:
        while time.monotonic() - started < args.seconds:
            for process in deployment.processes()["workers"]:
                try:
                    rss = process.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    continue
                peak[process.pid] = max(peak[process.pid], rss)
            samples.append({"t": round(time.monotonic() - started, 1),
                            **{str(pid): round(rss, 1) for pid, rss in peak.items()}})
            time.sleep(0.5)
    after = deployment.workers()
    log = args.logs / "ts_log.log"
    overran = log.read_text(errors="replace").count("did not respond in given time") \
        if log.exists() else 0
    result = {"seconds": args.seconds, "connections": args.connections,
              "responseTimeout_overruns_in_ts_log": overran,
              "statuses": {str(k): v for k, v in load.statuses.items()},
              "failures": len(load.failures), "first_failures": load.failures[:10],
              "peak_worker_rss_mib": {str(k): round(v, 1) for k, v in peak.items()},
              "workers_before": before, "workers_after": after,
              "restarts": sum(before.get(k) != v for k, v in after.items())}
    print(f"{'worker pid':>10} | peak RSS MiB")
    for pid, rss in sorted(peak.items()):
        print(f"{pid:>10} | {rss:10.1f}")
    print("answers:", dict(load.statuses), "| failures:", len(load.failures),
          "| restarts:", result["restarts"])
    return result, samples, not load.failures and not result["restarts"]


def soak(args, deployment):
    images = sorted(args.images.rglob("*.jpg")) + sorted(args.images.rglob("*.png"))
    bodies = [p.read_bytes() for p in images[:200]]
    first = {}
    for i, body in enumerate(bodies):  # the answer each image gets at the start
        answer = deployment.client.predict(body).json()
        first[i] = max(answer, key=answer.get)
    batch, batch_kind = multipart(bodies[:8])

    def top_is(index):
        def check(response):
            answer = response.json()
            return max(answer, key=answer.get) == first[index]
        return check

    def v2(index):
        body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(bodies[index]).decode()]}]}
        return json.dumps(body).encode()

    def pick(thread, n):
        index = (thread * 997 + n) % len(bodies)
        turn = n % 20
        if turn == 19 and thread == 0:  # refused by the proxy, never reaching TorchServe
            return [("/predictions/cifar10%0A", b"x", "image/png", None, 400),
                    ("/nowhere", b"x", "image/png", None, 404),
                    ("/predictions/cifar10", bodies[index], "application/x-www-form-urlencoded",
                     None, 415)][(n // 20) % 3]
        if turn == 17:
            return ("/explanations/cifar10", bodies[index], "image/jpeg", None, 200)
        if turn in (5, 15):
            return ("/predictions/cifar10", batch, batch_kind, None, 200)
        if turn in (3, 13):
            return ("/v2/models/cifar10/infer", v2(index), "application/json", None, 200)
        return ("/predictions/cifar10", bodies[index], "image/jpeg", top_is(index), 200)

    before = deployment.workers()
    rows, started = [], time.monotonic()
    last_logs, last_requests = deployment.log_bytes(), 0
    with Load(args.url, deployment.headers, args.clients, pick) as load:
        while time.monotonic() - started < args.seconds:
            time.sleep(min(args.every, args.seconds - (time.monotonic() - started)))
            logs, done = deployment.log_bytes(), load.requests
            now = deployment.sample()
            grown = {k: logs[k] - last_logs[k] for k in logs}
            per = max(1, done - last_requests)
            rows.append({"t_s": round(time.monotonic() - started), "requests": done,
                         "req_per_s": round((done - last_requests) / args.every, 1),
                         **{f"{g}_rss_mib": v["rss_mib"] for g, v in now.items()},
                         **{f"{g}_fds": v["fds"] for g, v in now.items()},
                         "nginx_log_bytes_per_req": round(grown["nginx"] / per, 1),
                         "nginx_error_log_bytes": grown["nginx_error"],
                         "torchserve_log_bytes_per_req": round(grown["torchserve"] / per, 1),
                         "failures": len(load.failures), "wrong": load.wrong})
            last_logs, last_requests = logs, done
            print(" | ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    after = deployment.workers()
    restarts = sum(before.get(k) != v for k, v in after.items())
    result = {"seconds": args.seconds, "clients": args.clients,
              "statuses": {str(k): v for k, v in load.statuses.items()},
              "failures": len(load.failures), "first_failures": load.failures[:10],
              "wrong": load.wrong, "restarts": restarts, "rows": rows}
    print("answers:", dict(load.statuses), "| failures:", len(load.failures), "| wrong:",
          load.wrong, "| restarts:", restarts)
    return result, rows, not load.failures and not load.wrong and not restarts


def main(argv=None):
    args = parse_args(argv)
    args.seconds = args.seconds or (60 if args.check == "memory" else 600)
    deployment = Deployment(args)
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "?")
    print(f"{args.check}: {args.seconds:.0f} s through {args.url}; CPU {cpu}, "
          f"{psutil.cpu_count()} cores")
    run = check_memory if args.check == "memory" else soak
    result, samples, ok = run(args, deployment)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"check": args.check, "cpu": cpu,
                                         "cores": psutil.cpu_count(),
                                         "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                               time.gmtime()),
                                         **result, "samples": samples}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
