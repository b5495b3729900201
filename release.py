"""Ship a new model version without dropping a request: archive, register, gate, canary, promote
or roll back (docs/operations.md "Releasing a new model").

    python release.py release weights/new.pt     # make release WEIGHTS=weights/new.pt
    python release.py rollback                   # make rollback: the previous version back
    python release.py status                     # make status: versions, default, canary, steps

`release` archives the weights as the next version of the model (`make archive` with
MODEL_VERSION, copied into the model store as <model>-<version>.mar) and registers it beside the
serving version through TorchServe's management API (loopback, management token; model-store
archives only: allowed_urls), warm (its workers started) before any user request can reach it.
The gate: its workers passed their golden check at start (each worker checks every forward on the
archive's golden set on this CPU and refuses to start if the fp32 net misses it; the customized
describe shows the forward chosen), every answer says its version (X-Model-Version), and its
top-1 accuracy on the check set (tests/holdout), asked on its own route
/predictions/<model>/<version>, is at most --margin below the serving version's, asked the same
way. Then the canary: the proxy (make serve-proxy) sends --canary-share percent of /predictions and
/explanations requests to it (proxy.set_canary: a state file nginx's canary.js reads per request,
so nothing reloads and no client's keep-alive connection is closed) for --canary-seconds, while the driver also sends a few check-set images a second
through the proxy. Its error rate (5xx) and latency are compared with the serving version's from
the proxy's canary.log, which records every inference request with its arm, status, time and
the version that answered. It passes: set-default, the canary split removed, the old version
drained (its queue empty) and unregistered. It fails: the split removed, the new version drained
and unregistered; the serving version never stopped answering.

Every archive stays in the model store; `rollback` registers the previous one again (warm), makes
it the default and drains and unregisters the current one. Each step is logged and kept in the
state file (--state), which `status` shows.
"""
import argparse
import contextlib
import fcntl
import json
import logging
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

import proxy

log = logging.getLogger("release")
ROOT = Path(__file__).resolve().parent
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
HEADER = "X-Model-Version"
STEPS_KEPT = 200


class Refused(RuntimeError):
    """The new version failed a check: it was taken down again, the serving one kept."""


# ------------------------------------------------------------------------------- TorchServe
class Server:
    """TorchServe's management and inference APIs on loopback, with the tokens of key_file.json."""

    def __init__(self, ts_config, key_file, model, store=None):
        props = dict(line.split("=", 1) for line in Path(ts_config).read_text().splitlines()
                     if "=" in line and not line.lstrip().startswith("#"))
        props = {k.strip(): v.strip() for k, v in props.items()}
        self.inference = props.get("inference_address", "http://127.0.0.1:8080")
        self.management = props.get("management_address", "http://127.0.0.1:8081")
        # Relative to where TorchServe started, as TorchServe reads it (make serve: the repo).
        self.store = Path(store or props.get("model_store", "model_store")).resolve()
        self.key_file, self.model = Path(key_file), model
        self.session = requests.Session()

    def _headers(self, api):
        keys = json.loads(self.key_file.read_text())
        return {"Authorization": f"Bearer {keys[api]['key']}"}

    def manage(self, method, path, timeout=30, **params):
        return self.session.request(method, f"{self.management}{path}", params=params or None,
                                    headers=self._headers("management"), timeout=timeout)

    def versions(self):
        """{version: its describe} of every registered version of the model."""
        found = self.manage("GET", f"/models/{self.model}/all")
        found.raise_for_status()
        return {d["modelVersion"]: d for d in found.json()}

    def default(self):
        found = self.manage("GET", f"/models/{self.model}")
        found.raise_for_status()
        return found.json()[0]["modelVersion"]

    def predict(self, body, version=None, base=None):
        """POST one image to /predictions/<model>[/<version>]: the response (503/507 resent)."""
        url = f"{base or self.inference}/predictions/{self.model}" + (f"/{version}" if version
                                                                      else "")
        for delay in (0.5, 1.0, None):
            response = self.session.post(url, data=body, timeout=60, headers={
                **self._headers("inference"), "Content-Type": "application/octet-stream"})
            if response.status_code not in (503, 507) or delay is None:
                return response
            time.sleep(delay)


# ------------------------------------------------------------------------------------ state
class State:
    """The release's record (--state): the versions' archives, the previous version, the
    canary and every step, kept across runs for `status` and `rollback`; one run at a time."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.setdefault("archives", {})
        self.data.setdefault("steps", [])
        self.data.setdefault("canary", None)
        self.data.setdefault("previous", None)

    @contextlib.contextmanager
    def locked(self):
        with open(self.path.with_suffix(".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"another release runs ({self.path.with_suffix('.lock')})")
            yield

    def step(self, name, **detail):
        entry = {"time": round(time.time(), 3), "step": name, **detail}
        log.info("%-10s %s", name, " ".join(f"{k}={v}" for k, v in detail.items()))
        self.data["steps"] = (self.data["steps"] + [entry])[-STEPS_KEPT:]
        self.save()
        return entry

    def save(self):
        fresh = self.path.with_suffix(".new")
        fresh.write_text(json.dumps(self.data, indent=2) + "\n")
        fresh.replace(self.path)


# ---------------------------------------------------------------------------------- archive
def manifest_version(mar):
    with zipfile.ZipFile(mar) as archive:
        return json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]


def next_version(registered, archived):
    """One more than the highest leading number of any version registered or archived: 1.0 ->
    2.0."""
    numbers = [int(m[1]) for v in (*registered, *archived) if (m := re.match(r"(\d+)", v))]
    return f"{max(numbers, default=0) + 1}.0"


def build(weights, version, store, model):
    """`make archive` of ``weights`` as ``version`` (the one recipe of the archive), copied into
    the model store as <model>-<version>.mar; its file name there."""
    staging = store / "releases" / version
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run([os.environ.get("MAKE", "make"), "--no-print-directory", "-C", str(ROOT),
                    "archive", f"WEIGHTS={Path(weights).resolve()}",
                    f"MODEL_STORE={staging}", f"MODEL_VERSION={version}"], check=True)
    name = f"{model}-{version}.mar"
    shutil.copy(staging / f"{model}.mar", store / name)
    shutil.rmtree(staging, ignore_errors=True)
    return name


def register(server, state, name, version, workers, timeout):
    """Register the archive ``name`` of the model store as ``version``, its workers started
    before this returns (not the default: no unversioned request reaches it); Refused, with the
    worker log's last lines, if they do not start (the fp32 net missed its golden answers)."""
    state.step("register", version=version, archive=name, workers=workers)
    try:
        answer = server.manage("POST", "/models", timeout=timeout, url=name,
                               model_name=server.model, initial_workers=workers,
                               synchronous="true")
        failure = None if answer.ok else f"{answer.status_code} {answer.text.strip()}"
    except requests.RequestException as err:
        failure = f"no answer in {timeout} s ({err.__class__.__name__})"
    if failure is None:
        described = server.versions().get(version, {})
        statuses = [w["status"] for w in described.get("workers", [])]
        if not statuses or any(s != "READY" for s in statuses):
            failure = f"workers {statuses}"
    if failure is not None:
        unregister(server, state, version, reason="its workers did not start")
        raise Refused(f"version {version} did not start: {failure} (why: the worker log, "
                      f"logs/model_log.log where TorchServe started)")


def unregister(server, state, version, reason):
    answer = server.manage("DELETE", f"/models/{server.model}/{version}", timeout=120)
    state.step("unregister", version=version, reason=reason, answer=answer.status_code)
    return answer.ok or answer.status_code == 404


def drain(server, version, quiet=1.0, timeout=60.0):
    """Wait until ``version`` has had no request waiting in its queue for ``quiet`` seconds:
    what it took before it stopped being routed to is answered (a batch still running when it
    is unregistered is dropped with TorchServe's 500, which the proxy sends again, now to the
    version that serves)."""
    deadline, calm_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        described = server.versions().get(version)
        if described is None:
            return
        pending = described.get("jobQueueStatus", {}).get("pendingRequests", 0)
        if pending:
            calm_since = None
        elif calm_since is None:
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= quiet:
            return
        time.sleep(0.1)
    log.warning("version %s still has requests queued after %.0f s", version, timeout)


# ------------------------------------------------------------------------------------- gate
def check_set(folder, limit=None):
    """(image bytes, class name) of an ImageFolder (tests/holdout), in a fixed order."""
    pairs = sorted((path, path.parent.name) for path in Path(folder).glob("*/*")
                   if path.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        pairs = random.Random(0).sample(pairs, min(limit, len(pairs)))
    if not pairs:
        raise FileNotFoundError(f"no images in class folders under {folder}")
    return [(path.read_bytes(), label) for path, label in pairs]


def accuracy(server, version, images, concurrency=4):
    """Top-1 accuracy of ``version`` on its own route; RuntimeError if an answer fails or does
    not carry that version in X-Model-Version."""
    def top1(item):
        body, label = item
        response = server.predict(body, version)
        if response.status_code != 200:
            raise RuntimeError(f"version {version} answered {response.status_code}: "
                               f"{response.text.strip()[:300]}")
        said = response.headers.get(HEADER)
        if said != version:
            raise RuntimeError(f"an answer of /predictions/{server.model}/{version} says "
                               f"{HEADER}: {said!r}")
        answer = response.json()
        return max(answer, key=answer.get) == label
    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(top1, images)) / len(images)


def golden(server, version):
    """What the customized describe of ``version``'s workers says (their forward, chosen at
    start among those that gave the archive's golden answers on this CPU)."""
    answer = server.manage("GET", f"/models/{server.model}/{version}", customized="true")
    if not answer.ok:
        raise Refused(f"the customized describe of {version} answered {answer.status_code}: "
                      f"{answer.text.strip()[:300]}")
    found = answer.json()[0].get("customizedMetadata")
    found = json.loads(found) if isinstance(found, str) else found
    if not isinstance(found, dict) or not found.get("runtime"):
        raise Refused(f"the workers of {version} do not describe their forward: {found!r}")
    return found


def gate(server, state, new, old, images, margin):
    """Refused unless ``new``'s workers passed their golden check and its accuracy on the check
    set is at most ``margin`` below ``old``'s, both asked on their own routes."""
    described = golden(server, new)
    state.step("golden", version=new, runtime=described["runtime"])
    try:
        new_accuracy = accuracy(server, new, images)
    except RuntimeError as err:
        raise Refused(str(err)) from None
    old_accuracy = accuracy(server, old, images)
    passed = new_accuracy >= old_accuracy - margin
    state.step("gate", version=new, accuracy=round(new_accuracy, 4), serving=old,
               serving_accuracy=round(old_accuracy, 4), margin=margin, images=len(images),
               passed=passed)
    if not passed:
        raise Refused(f"version {new} scores {new_accuracy:.2%} on the check set, over "
                      f"{margin:.2%} below the serving {old}'s {old_accuracy:.2%}")


# ----------------------------------------------------------------------------------- canary
def read_canary_log(path, offset):
    """The inference requests canary.log recorded past byte ``offset``: dicts of arm (1: the
    canary), status, seconds and the version that answered."""
    if not Path(path).exists():
        return []
    with open(path, "rb") as logged:
        logged.seek(offset)
        text = logged.read().decode(errors="replace")
    found = []
    for line in text.splitlines():
        parts = re.fullmatch(r'(\S+) (\d) (\d{3}) (\S+) "([^"]*)" (\S+)', line.strip())
        if parts and re.match(r"/(predictions|explanations)/", parts[6]):
            found.append({"arm": int(parts[2]), "status": int(parts[3]),
                          "seconds": float(parts[4]), "version": parts[5]})
    return found


def summary(entries):
    seconds = sorted(e["seconds"] for e in entries)
    return {"requests": len(entries),
            "errors": sum(e["status"] >= 500 for e in entries),
            "p50": round(statistics.median(seconds), 4) if seconds else None,
            "p95": round(seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))], 4)
            if seconds else None}


def judge(entries, new, old, args):
    """(passed, why) of the canary's requests against the serving version's."""
    canary = [e for e in entries if e["arm"] == 1]
    serving = [e for e in entries if e["arm"] == 0]
    crossed = [e for e in canary if e["status"] == 200 and e["version"] != new] + \
              [e for e in serving if e["status"] == 200 and e["version"] not in (old, new)]
    ours, theirs = summary(canary), summary(serving)
    if crossed:
        return False, f"{len(crossed)} answers from a version not routed to", ours, theirs
    if ours["requests"] < args.canary_min_requests:
        return False, (f"only {ours['requests']} requests reached the canary (fewer than "
                       f"--canary-min-requests {args.canary_min_requests})"), ours, theirs
    rate = ours["errors"] / ours["requests"]
    base = theirs["errors"] / theirs["requests"] if theirs["requests"] else 0.0
    if rate > base + args.max_error_increase:
        return False, f"error rate {rate:.2%} against {base:.2%}", ours, theirs
    if theirs["requests"] and ours["p95"] > theirs["p95"] * args.latency_factor \
            + args.latency_slack:
        return False, (f"p95 latency {ours['p95']:.3f} s against {theirs['p95']:.3f} s "
                       f"(allowed: x{args.latency_factor} + {args.latency_slack} s)"), ours, theirs
    return True, "error rate and latency within bounds", ours, theirs


def probe(server, base, images, rate, stop):
    """Check-set images through the proxy, ``rate`` a second, until ``stop`` is set: the canary
    is judged on traffic even when users send little."""
    for index in range(10 ** 9):
        if stop.wait(1.0 / rate):
            return
        with contextlib.suppress(requests.RequestException):
            server.predict(images[index % len(images)][0], base=base)


def canary(server, state, new, old, images, args):
    """Send the canary share through the proxy for --canary-seconds; (passed, why)."""
    canary_log = Path(args.proxy_dir) / "canary.log"
    offset = canary_log.stat().st_size if canary_log.exists() else 0
    # Recorded first: the new nginx workers route to the canary as soon as they start.
    state.data["canary"] = {"version": new, "share": args.canary_share}
    state.step("canary", version=new, share=args.canary_share, seconds=args.canary_seconds)
    proxy.set_canary(args.proxy_dir, new, args.canary_share)
    stop, prober = threading.Event(), None
    if args.probe_rate > 0:
        prober = threading.Thread(target=probe, daemon=True, args=(
            server, proxy_inference(args), images, args.probe_rate, stop))
        prober.start()
    try:
        time.sleep(args.canary_seconds)
    finally:
        stop.set()
        if prober is not None:
            prober.join(timeout=70)
    passed, why, ours, theirs = judge(read_canary_log(canary_log, offset), new, old, args)
    state.step("judged", version=new, passed=passed, why=why, canary=ours, serving=theirs)
    return passed


def proxy_inference(args):
    """The inference address of the proxy running from --proxy-dir (its nginx.conf)."""
    conf = (Path(args.proxy_dir) / "nginx.conf").read_text()
    return "http://" + re.search(r"listen (\S+) backlog", conf)[1]


def proxy_running(proxy_dir):
    pid_file = Path(proxy_dir) / "nginx.pid"
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text()), 0)
        return True
    return False


def remove_split(state, args):
    """The canary split off, where one is on."""
    if state.data.get("canary") and proxy_running(args.proxy_dir):
        proxy.set_canary(args.proxy_dir, None, 0)
        state.data["canary"] = None
        state.step("split", share=0)


def take_down(server, state, version, args, reason):
    """No more traffic to ``version`` (the canary split removed), drained, unregistered."""
    remove_split(state, args)
    drain(server, version)
    unregister(server, state, version, reason)


# ---------------------------------------------------------------------------------- commands
def release(args):
    server = Server(args.ts_config, args.key_file, args.model, args.model_store)
    state = State(args.state)
    with state.locked():
        registered = server.versions()
        old = server.default()
        if len(registered) > 1:
            raise RuntimeError(f"versions {sorted(registered)} are registered: a release starts "
                               f"from one (make status; make rollback or finish the last one)")
        if args.canary_share and not proxy_running(args.proxy_dir):
            raise RuntimeError(f"the canary needs the proxy of make serve-proxy running from "
                               f"{args.proxy_dir} (or --canary-share 0: promote after the gate)")
        if args.mar:
            name, new = Path(args.mar).name, manifest_version(args.mar)
            if Path(args.mar).resolve() != (server.store / name).resolve():
                shutil.copy(args.mar, server.store / name)
        else:
            stored = [m.stem.split("-", 1)[1] for m in server.store.glob(f"{server.model}-*.mar")]
            new = args.version or next_version(registered, [*state.data["archives"], *stored])
            name = build(args.weights, new, server.store, server.model)
        if new in registered:
            raise RuntimeError(f"version {new} is already registered")
        state.data["archives"].setdefault(old, registered[old].get("modelUrl"))
        state.data["archives"][new] = name
        state.step("release", version=new, serving=old, archive=name,
                   weights=str(args.mar or args.weights))
        workers = max(1, len(registered[old].get("workers", [])))
        images = check_set(args.check_dir, args.check_images)
        try:
            register(server, state, name, new, workers, args.start_timeout)
            gate(server, state, new, old, images, args.margin)
            if args.canary_share and not canary(server, state, new, old, images, args):
                raise Refused(f"version {new} failed its canary: {state.data['steps'][-1]['why']}")
        except BaseException as err:
            take_down(server, state, new, args, reason=f"refused: {err}"[:300])
            state.step("refused", version=new, serving=old, why=str(err)[:500])
            raise
        promote(server, state, new, old, args)


def promote(server, state, new, old, args, step="promoted"):
    """``new`` the default, the split removed, ``old`` drained and unregistered."""
    state.data["previous"] = old  # first: a run killed past set-default still knows it
    answer = server.manage("PUT", f"/models/{server.model}/{new}/set-default")
    if not answer.ok:
        raise RuntimeError(f"set-default {new} answered {answer.status_code}: {answer.text}")
    state.step("default", version=new)
    remove_split(state, args)
    drain(server, old)
    unregister(server, state, old, reason=f"{new} serves")
    state.step(step, version=new, previous=old)


def rollback(args):
    """The previous version registered again from its archive (warm), the default, the current
    one drained and unregistered. After a release stopped half-way (killed: another version
    registered beside the default, or its canary split left on), that release is taken down
    instead, and the default version goes on serving alone."""
    server = Server(args.ts_config, args.key_file, args.model, args.model_store)
    state = State(args.state)
    with state.locked():
        current, previous = server.default(), state.data.get("previous")
        unfinished = sorted(v for v in server.versions() if v != current)
        if unfinished or state.data.get("canary"):
            remove_split(state, args)
            for version in unfinished:
                take_down(server, state, version, args, reason="an unfinished release")
            state.step("recovered", serving=current, taken_down=unfinished)
            print(f"took down an unfinished release ({', '.join(unfinished) or 'its split'}): "
                  f"{current} serves alone; make rollback again goes back to {previous}")
            return
        if previous is None or previous == current:
            raise RuntimeError(f"no previous version to roll back to (serving {current})")
        name = state.data["archives"][previous]
        registered = server.versions()
        if previous not in registered:
            workers = max(1, len(registered[current].get("workers", [])))
            register(server, state, name, previous, workers, args.start_timeout)
            state.step("golden", version=previous, runtime=golden(server, previous)["runtime"])
        promote(server, state, previous, current, args, step="rolled-back")


def status(args):
    server = Server(args.ts_config, args.key_file, args.model, args.model_store)
    state = State(args.state)
    versions, default = server.versions(), server.default()
    print(f"model {server.model}: default version {default}")
    for version, described in sorted(versions.items()):
        workers = ", ".join(w["status"] for w in described.get("workers", []))
        queued = described.get("jobQueueStatus", {}).get("pendingRequests", 0)
        mark = "*" if version == default else " "
        print(f" {mark} {version:<8} {described.get('modelUrl', ''):<24} workers: {workers or '-'}"
              f"; queued: {queued}")
    split = state.data.get("canary")
    print(f"canary: {split['share']:g} % of /predictions and /explanations to {split['version']}"
          if split else "canary: none")
    print(f"previous version (make rollback): {state.data.get('previous') or '-'}")
    steps = state.data["steps"][-args.steps:]
    if steps:
        print("last steps:")
    for entry in steps:
        detail = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("time", "step"))
        print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(entry['time']))}Z "
              f"{entry['step']:<11} {detail}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common = argparse.ArgumentParser(add_help=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_argument("--ts-config", default="config.properties",
                        help="TorchServe's config.properties (addresses, model_store)")
    common.add_argument("--key-file", default="key_file.json",
                        help="the tokens TorchServe wrote where it started")
    common.add_argument("--model", default=proxy.MODEL, help="the model's name")
    common.add_argument("--model-store", help="TorchServe's model store (default: its config's "
                                              "model_store)")
    common.add_argument("--proxy-dir", default=".run/proxy",
                        help="run directory of the proxy (make serve-proxy)")
    common.add_argument("--state", default=".run/release.json", help="the release's record")
    common.add_argument("--start-timeout", type=float, default=180,
                        help="seconds a new version's workers get to start")
    sub = p.add_subparsers(dest="command", required=True)
    go = sub.add_parser("release", parents=[common], help="release new weights",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    go.add_argument("weights", nargs="?", help="the checkpoint (train.py's) to release")
    go.add_argument("--mar", help="release this archive instead (its manifest's version)")
    go.add_argument("--version", help="the new version (default: the next whole number)")
    go.add_argument("--check-dir", default="tests/holdout",
                    help="the gate's check set: an ImageFolder of real held-out images")
    go.add_argument("--check-images", type=int, default=0,
                    help="use this many of them, a fixed sample (0: all)")
    go.add_argument("--margin", type=float, default=0.01,
                    help="how far (a fraction) the new accuracy may fall below the serving one")
    go.add_argument("--canary-share", type=float, default=10,
                    help="percent of /predictions and /explanations requests sent to the new "
                         "version during the canary (0: no canary, promote after the gate)")
    go.add_argument("--canary-seconds", type=float, default=60, help="how long the canary runs")
    go.add_argument("--canary-min-requests", type=int, default=20,
                    help="fewest requests the canary must answer to be judged")
    go.add_argument("--probe-rate", type=float, default=4,
                    help="check-set images a second the driver sends through the proxy during "
                         "the canary (0: none)")
    go.add_argument("--max-error-increase", type=float, default=0.01,
                    help="how much higher (a fraction) the canary's 5xx rate may be")
    go.add_argument("--latency-factor", type=float, default=2.0,
                    help="the canary's p95 latency may be this times the serving one's...")
    go.add_argument("--latency-slack", type=float, default=0.1, help="...plus these seconds")
    sub.add_parser("rollback", parents=[common], help="the previous version back as default",
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    show = sub.add_parser("status", parents=[common], help="versions, default, canary, steps",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    show.add_argument("--steps", type=int, default=12, help="how many last steps to show")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s release %(message)s")
    if args.command == "release" and not (args.weights or args.mar):
        p.error("release takes a checkpoint (or --mar ARCHIVE)")
    try:
        {"release": release, "rollback": rollback, "status": status}[args.command](args)
    except Refused as err:
        log.error("refused: %s", err)
        return 3
    except (RuntimeError, requests.RequestException, OSError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
