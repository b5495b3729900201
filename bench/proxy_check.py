"""Issue 25's proxy checks against a running server: idle connections beside good clients, and a
2 -> 1 -> 2 scale loop under good load. Prints a table; exits 1 when a good request failed.

    make serve-proxy
    .venv/bin/python -m bench.proxy_check idle --connections 20000 --seconds 30
    .venv/bin/python -m bench.proxy_check scale --loops 6
    .venv/bin/python -m bench.proxy_check idle --url http://127.0.0.1:8080   # TorchServe alone

Good requests are single images from tests/fixtures, each answer checked against the answer the
server gave that image before the check started. Idle connections send nothing; `idle` opens
them from several processes (each process has its own limit on open files) and opens again
whatever the server closes, so the count stays at --connections. Tokens: --key-file.
"""
import argparse
import collections
import json
import multiprocessing
import resource
import select
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from tests.harness import GoodTraffic

ROOT = Path(__file__).resolve().parent.parent
BODIES = [path.read_bytes() for path in sorted((ROOT / "tests" / "fixtures").glob("*.jpg"))]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["idle", "scale"])
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="inference address (default: make serve-proxy's, 127.0.0.1:8000)")
    p.add_argument("--management", default="http://127.0.0.1:8001",
                   help="management address (default: 127.0.0.1:8001)")
    p.add_argument("--key-file", type=Path, default=ROOT / "key_file.json",
                   help="TorchServe's tokens (default: key_file.json)")
    p.add_argument("--clients", type=int, default=4, help="good clients (default: 4)")
    p.add_argument("--connections", type=int, default=20000,
                   help="idle: idle connections held open (default: 20000)")
    p.add_argument("--processes", type=int, default=4,
                   help="idle: processes that hold them (default: 4)")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="idle: how long they are held (default: 30)")
    p.add_argument("--loops", type=int, default=6, help="scale: 2 -> 1 -> 2 loops (default: 6)")
    p.add_argument("--timeout", type=float, default=150.0,
                   help="seconds a good client waits for an answer (default: 150)")
    args = p.parse_args(argv)
    if urlsplit(args.url).hostname not in {"127.0.0.1", "localhost", "::1"}:
        p.error("only loopback addresses are checked")
    return args


def tokens(key_file):
    keys = json.loads(Path(key_file).read_text())
    return ({"Authorization": f"Bearer {keys['inference']['key']}"},
            {"Authorization": f"Bearer {keys['management']['key']}"})


def hold_idle(host, port, count, seconds, queue):
    """One process: keep ``count`` connections that send nothing open to host:port for
    ``seconds``, opening a new one for each the server closes; report to ``queue``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stats = collections.Counter()

    def connect():
        try:
            return socket.create_connection((host, port), timeout=5)
        except OSError:
            stats["failed to open"] += 1
            return None

    open_ = [s for s in (connect() for _ in range(count)) if s is not None]
    stats["opened"] += len(open_)
    deadline, least = time.monotonic() + seconds, len(open_)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        readable = set(_readable(open_))
        for sock in readable:  # the server sent something (a 408) or closed it
            sock.close()
            stats["closed by the server"] += 1
        open_ = [s for s in open_ if s not in readable]
        while len(open_) < count and time.monotonic() < deadline:
            sock = connect()
            if sock is None:
                break
            open_.append(sock)
            stats["opened"] += 1
        least = min(least, len(open_))
    stats["held, least after a refill"] = least
    for sock in open_:
        sock.close()
    queue.put(dict(stats))


def _readable(socks):
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return [by_fd[fd] for fd, _ in poller.poll(0)]


def check_idle(args, inference, management):
    url = urlsplit(args.url)
    queue = multiprocessing.Queue()
    share = -(-args.connections // args.processes)
    holders = [multiprocessing.Process(target=hold_idle, args=(
        url.hostname, url.port, share, args.seconds, queue)) for _ in range(args.processes)]
    manage = collections.Counter()
    with GoodTraffic(args.url, inference, BODIES, args.clients, timeout=10.0, check=True,
                     fresh=True) as load:
        for holder in holders:
            holder.start()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            try:
                manage[requests.get(f"{args.management}/models/cifar10", headers=management,
                                    timeout=10).status_code] += 1
            except requests.RequestException as err:
                manage[type(err).__name__] += 1
            time.sleep(1.0)
        idle = collections.Counter()
        for _ in holders:
            idle.update(queue.get())
        for holder in holders:
            holder.join()
    return {"idle connections": dict(idle), "management calls": dict(manage),
            "good clients (a new connection each request)": load.summary()}, load


def check_scale(args, inference, management):
    puts = []
    with GoodTraffic(args.url, inference, BODIES, args.clients, timeout=args.timeout,
                     check=True) as load:
        time.sleep(2.0)
        for _ in range(args.loops):
            for workers in (1, 2):
                response = requests.put(f"{args.management}/models/cifar10", headers=management,
                                        params=dict(min_worker=workers, max_worker=workers,
                                                    synchronous="true"), timeout=180)
                puts.append(response.status_code)
                time.sleep(1.0)
        time.sleep(2.0)
    return {"scaling calls": dict(collections.Counter(puts)),
            "good clients": load.summary()}, load


def main(argv=None):
    args = parse_args(argv)
    inference, management = tokens(args.key_file)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    report, load = (check_idle if args.check == "idle" else check_scale)(
        args, inference, management)
    print(f"{args.check} check of {args.url}, {started}, {socket.gethostname()}")
    for section, values in report.items():
        print(f"\n{section}:")
        for key, value in values.items():
            print(f"  {key:<28} {value}")
    for failed in load.failures()[:10]:
        print(f"  failed: {failed.outcome}: {failed.detail}")
    return 1 if load.summary()["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
