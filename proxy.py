"""nginx in front of TorchServe: render deploy/nginx/nginx.conf.template, start and stop it.

The template's @NAME@ fields are filled from the TorchServe config (its addresses and
max_request_size) and the model config (maxWorkers, responseTimeout); the model's Open Inference
Protocol metadata is the model's own answer (the handler's, cifar10_serve/v2.py).
docs/proxy-and-security.md "Reverse proxy".

    python proxy.py start --run-dir .run/proxy
    python proxy.py stop --run-dir .run/proxy
    python proxy.py pod-conf   # deploy/k8s/nginx.conf

`start` writes the config, the pid file, error.log and access.log into --run-dir, and
client.properties there: `client.py --config <run-dir>/client.properties` goes through the proxy.
The logs are 0640, and rotated as TorchServe's are (log4j2.xml): over 100 MB a log becomes
<log>.1 (five kept) and nginx reopens it; `start` leaves a watcher (`rotate --watch`, pid in
rotate.pid) doing so every 30 s until nginx stops.

    python proxy.py rotate --run-dir .run/proxy            # once (e.g. from cron)
"""
import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import yaml

ROOT = Path(__file__).resolve().parent
TEMPLATE = ROOT / "deploy" / "nginx" / "nginx.conf.template"
CANARY = ROOT / "deploy" / "nginx" / "canary.conf.template"
CANARY_JS = ROOT / "deploy" / "nginx" / "canary.js"
# The API's OpenAPI description (docs/openapi_doc.py writes it), served at /openapi.json.
OPENAPI = ROOT / "deploy" / "nginx" / "openapi.json"
MODEL = "cifar10"
# Connections a worker process may hold: idle clients cost one descriptor each, proxied requests
# two. 20,000 idle connections fit in one worker with room for the good clients.
WORKER_CONNECTIONS = 32768
NOFILE = 65536
# Limits per client address (and for all together), and the timeouts; tests render lower ones.
DEFAULTS = {"conn_per_client": 128, "conn_per_server": 1024, "large_bodies": 32,
            "large_per_client": 8,
            "req_rate": 1000, "req_burst": 2000,
            "header_timeout": "10s", "body_timeout": "10s", "send_timeout": "10s",
            "keepalive_timeout": "15s", "worker_processes": "auto", "model": MODEL}
GET_ONLY = '{"code": 405, "type": "MethodNotAllowed", "message": "this route takes GET only", ' \
           '"error": "this route takes GET only"}\\n'
# The Kubernetes pod (deploy/k8s/): TorchServe on the pod's loopback, the proxy on the pod's
# address (inference: the Service's target) and on its loopback (management: port-forward).
# Two worker processes: nginx's "auto" would count the node's CPUs, not the pod's.
K8S_MOUNT = "/etc/cifar10-proxy"  # where deploy/k8s/deployment.yaml mounts the ConfigMap
K8S = {"ts_inference": "127.0.0.1:8080", "ts_management": "127.0.0.1:8081",
       "listen_inference": "0.0.0.0:8000", "listen_management": "127.0.0.1:8001",
       "run_dir": "/tmp/nginx", "worker_processes": 2, "nofile": NOFILE,
       "worker_connections": WORKER_CONNECTIONS,
       # Clients reach the pod through the ingress controller (networkpolicy.yaml admits only
       # it), which names them in X-Forwarded-For: the per-client limits key on that address.
       "real_ip": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}
K8S_CONFIGS = (ROOT / "deploy" / "docker" / "config.properties",
               ROOT / "handler" / "model-config.yaml")
K8S_CONF = ROOT / "deploy" / "k8s" / "nginx.conf"  # what deploy/k8s/kustomization.yaml reads
LOGS = ("error.log", "access.log", "canary.log")
# Rotation as log4j2.xml rotates TorchServe's logs: over LOG_BYTES, LOG_KEEP old files kept.
LOG_BYTES, LOG_KEEP, ROTATE_EVERY = 100 * 2**20, 5, 30.0
# nginx creates its logs and temporary files 0644 under the usual umask: they are no one
# else's to read (request lines, client addresses).
UMASK = 0o027


def server_metadata():
    """The v2 server metadata: TorchServe's version, and the protocol extensions the handler
    reads (cifar10_serve/v2.py: binary tensor data; class_count outputs, "classification")."""
    return {"name": "cifar10-torchserve", "version": importlib.metadata.version("torchserve"),
            "extensions": ["binary_tensor_data", "classification"]}


def open_files():
    """worker_rlimit_nofile and worker_connections within this process's hard limit on open
    files, which nginx inherits (a container's root cannot raise it either)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    return {"nofile": nofile, "worker_connections": min(WORKER_CONNECTIONS, nofile - 32)}


def nginx_string(value):
    """JSON for a single-quoted nginx string ('\\' and "'" escaped; nginx has no escape for
    '$', which would start a variable, so JSON holding one is refused)."""
    text = json.dumps(value, separators=(", ", ": "))
    if "$" in text:
        raise ValueError(f"'$' cannot be served in an nginx string: {text}")
    return text.replace("\\", "\\\\").replace("'", "\\'")


def settings_from(ts_config, model_config):
    """Render settings from TorchServe's config.properties and the model's model-config.yaml."""
    props = dict(line.split("=", 1) for line in Path(ts_config).read_text().splitlines()
                 if "=" in line and not line.lstrip().startswith("#"))
    model = yaml.safe_load(Path(model_config).read_text())
    return {"ts_inference": urlsplit(props.get("inference_address", "http://127.0.0.1:8080")
                                     .strip()).netloc,
            "ts_management": urlsplit(props.get("management_address", "http://127.0.0.1:8081")
                                      .strip()).netloc,
            "max_body": int(props.get("max_request_size", 6553500)),
            "max_workers": int(model["maxWorkers"]), "response_timeout":
            int(model.get("responseTimeout", 120))}


def render(settings, daemon=True, as_root=None, temp_root=None, logs=None):
    """The nginx config text for ``settings`` (settings_from's keys, the listen addresses,
    run_dir, and any of DEFAULTS)."""
    s = {**DEFAULTS, **open_files(), **settings}
    as_root = os.geteuid() == 0 if as_root is None else as_root
    most, model = s["max_workers"], s["model"]
    resend_after = s.get("resend_after", max(1, s["response_timeout"] // 2))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", model):  # as the model spec's names
        raise ValueError(f"not a model name this proxy routes: {model!r}")
    inference_routes = (
        f"this proxy forwards POST /predictions/{model}, POST /explanations/{model}, "
        f"POST /v2/models/{model}/infer, POST /v2/models/{model}/explain, GET /ping, "
        f"GET /v2/health/live, GET /v2/health/ready, GET /v2, GET /v2/models/{model} and "
        f"GET /v2/models/{model}/ready only")
    rule = (f"scaling takes PUT /models/{model}?min_worker=N&max_worker=M with both given, each "
            f"once, whole numbers 1 <= N <= M <= {most} (maxWorkers in the model config), and "
            f"optionally synchronous=true|false; nothing else")
    scale_rule = nginx_string({"code": 400, "type": "BadRequest", "message": rule,
                               "error": rule}) + "\\n"
    fields = {
        "USER": "user nobody nogroup;" if as_root else "",
        "DAEMON": "" if daemon else "daemon off;",
        "RUN_DIR": str(s["run_dir"]), "MODEL": model,
        "ERROR_LOG": logs["error"] if logs else f"{s['run_dir']}/error.log",
        "ACCESS_LOG": logs["access"] if logs else f"{s['run_dir']}/access.log",
        "WORKER_PROCESSES": s["worker_processes"], "NOFILE": s["nofile"],
        "WORKER_CONNECTIONS": s["worker_connections"],
        "HEADER_TIMEOUT": s["header_timeout"], "BODY_TIMEOUT": s["body_timeout"],
        "SEND_TIMEOUT": s["send_timeout"], "KEEPALIVE_TIMEOUT": s["keepalive_timeout"],
        "READ_TIMEOUT": f"{s.get('read_timeout', 2 * s['response_timeout'])}s",
        # A worker that stopped answering is given up on, and the request sent once more, after
        # half responseTimeout: before TorchServe itself gives up on the worker.
        "RESEND_AFTER": f"{resend_after}s", "RESEND_SECONDS": resend_after,
        "LONG_HEADERS": "Authorization and Content-Type take at most 1024 characters each, "
                        "Host 255, Content-Encoding, Inference-Header-Content-Length and "
                        "X-Min-Confidence 250 together",
        "CONTROL_REFUSED": "the path or a header value of this request holds a control character "
                           "(CR, LF or another below 0x20, or DEL; a TAB is allowed in a header "
                           "value), which the proxy never forwards",
        "MAX_BODY": s["max_body"], "MAX_WORKERS": most,
        "CONN_PER_CLIENT": s["conn_per_client"], "CONN_PER_SERVER": s["conn_per_server"],
        "LARGE_BODIES": s["large_bodies"], "LARGE_PER_CLIENT": s["large_per_client"],
        "RESEND_CONNS": max(1, s["conn_per_server"] // 8),
        "RESEND_LARGE": max(1, s["large_bodies"] // 8),
        "PER_CLIENT": f"over {s['conn_per_client']} requests, or {s['large_per_client']} bodies "
                      f"of 1 MB or more (or chunked), of this client address in progress at "
                      f"once; retry after 1 s",
        "BUSY": f"the model server has {s['conn_per_server']} requests (or {s['large_bodies']} "
                f"bodies of 1 MB or more) of all clients in progress, as many as it takes at "
                f"once; retry after 1 s",
        "UNAVAILABLE": nginx_string({
            "code": 503, "type": "ServiceUnavailable", "message":
            "the model server behind this proxy did not answer (not started, restarting or over "
            "its time); retry after 5 s", "error": "model server unavailable"}) + "\\n",
        "REQ_RATE": s["req_rate"], "REQ_BURST": s["req_burst"],
        "REAL_IP": "".join(f"    set_real_ip_from {cidr};\n" for cidr in s.get("real_ip", []))
        + ("    real_ip_header X-Forwarded-For;\n" if s.get("real_ip") else ""),
        "TS_INFERENCE": s["ts_inference"], "TS_MANAGEMENT": s["ts_management"],
        "LISTEN_INFERENCE": s["listen_inference"], "LISTEN_MANAGEMENT": s["listen_management"],
        "SCALE_PAIRS": "\n".join(f'        "{n} {m}" 1;' for n in range(1, most + 1)
                                 for m in range(n, most + 1)),
        "SCALE_RULE": scale_rule, "GET_ONLY": GET_ONLY,
        "INFERENCE_ROUTES": inference_routes,
        "FORM_REFUSED": "the body is labelled application/x-www-form-urlencoded (curl "
                        "--data-binary without -H does so), which the model server would parse "
                        "as form fields; send an image as the raw body with Content-Type "
                        "application/octet-stream or image/*, images as multipart/form-data, or "
                        "JSON (application/json)",
        "CANARY": s.get("canary") or canary_conf(s["run_dir"], model),
        "MODULES": "" if s.get("canary") else f"load_module {njs_module()};",
        "OPENAPI_FILE": s.get("openapi_file") or f"{temp_root or s['run_dir']}/openapi.json",
        "SERVER_METADATA": nginx_string(server_metadata())}
    text = TEMPLATE.read_text()
    for key, value in fields.items():
        text = text.replace(f"@{key}@", str(value))
    if temp_root is not None:  # workers that cannot reach run_dir write their temp files here
        text = text.replace(f"{s['run_dir']}/tmp/", f"{temp_root}/")
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"template fields without a value: {sorted(set(left))}")
    return text


def openapi(model, max_workers, max_body):
    """The OpenAPI description the proxy serves for ``model`` (deploy/nginx/openapi.json with
    the model's name and the limits filled in), as JSON text."""
    text = OPENAPI.read_text().replace("@MODEL@", model)
    text = text.replace('"@MAX_WORKERS@"', str(int(max_workers)))
    spec = json.loads(text)
    spec["paths"][f"/predictions/{model}"]["post"]["responses"]["413"]["description"] += (
        f"; max_request_size is {int(max_body)} bytes")
    return json.dumps(spec, indent=1) + "\n"


def nginx_binary():
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if found is None:
        raise FileNotFoundError("nginx is not installed (Debian/Ubuntu: apt-get install nginx)")
    return found


def root_temp(run_dir):
    """Where nginx started as root keeps its workers' temporary files (None: in run_dir)."""
    if os.geteuid() != 0:
        return None
    name = f"cifar10-proxy-{zlib.crc32(bytes(Path(run_dir).resolve())):08x}"
    return Path(tempfile.gettempdir()) / name


def own_folder(path):
    """Create ``path`` (0755), or take it only where it is a folder of ours that no one else may
    write to: the name under /tmp is predictable, and whoever owned the folder could swap the
    proxy's temporary files and the canary's state for links to files of root's."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        found = os.lstat(path)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() \
                or found.st_mode & 0o022:
            raise RuntimeError(f"{path} exists but is not a folder of this user that only it may "
                               f"write to (owner uid {found.st_uid}, mode "
                               f"{stat.filemode(found.st_mode)}): remove it and start again")
    os.chmod(path, 0o755)


def prepare(run_dir, settings, daemon=True):
    """Write run_dir/nginx.conf (and its temp folders) for ``settings`` and check it with
    `nginx -t`; returns the config's path. Started as root, nginx's workers run as nobody: their
    temp files then go to a folder under /tmp (the run dir's parents may be closed to them)."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    temp_root = root_temp(run_dir)
    if temp_root is not None:
        own_folder(temp_root)
    else:
        (run_dir / "tmp").mkdir(exist_ok=True)
    # No canary when nginx starts: a release (release.py) sets its own while this nginx runs.
    ((temp_root or run_dir / "tmp") / "canary.json").unlink(missing_ok=True)
    for name in LOGS:
        private_log(run_dir / name)
    s = {**DEFAULTS, **settings}
    served = (temp_root or run_dir) / "openapi.json"  # where nginx's workers can read it
    served.write_text(openapi(s["model"], s["max_workers"], s["max_body"]))
    os.chmod(served, 0o644)
    text = render({**settings, "run_dir": run_dir}, daemon=daemon, temp_root=temp_root)
    conf = run_dir / "nginx.conf"
    conf.write_text(text)
    check = subprocess.run([nginx_binary(), "-t", "-q", "-p", str(run_dir), "-c", str(conf)],
                           capture_output=True, text=True)
    if check.returncode:
        raise RuntimeError(f"nginx -t refused {conf}:\n{check.stderr}")
    return conf


def njs_module():
    """The path of nginx's JavaScript module (njs), which the canary split runs in."""
    found = subprocess.run([nginx_binary(), "-V"], capture_output=True, text=True).stderr
    folders = re.findall(r"--modules-path=(\S+)", found) + [
        "/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/etc/nginx/modules"]
    for folder in folders:
        if (Path(folder) / "ngx_http_js_module.so").exists():
            return Path(folder) / "ngx_http_js_module.so"
    raise FileNotFoundError("the proxy's canary split needs nginx's njs module (Debian/Ubuntu: "
                            "apt-get install libnginx-mod-http-js; nginx.org's packages: "
                            "nginx-module-njs)")


def canary_conf(run_dir, model=MODEL):
    """The canary split (deploy/nginx/canary.conf.template) of the proxy running from
    ``run_dir``: its state file under run_dir/tmp (where nginx's workers may read), its log
    run_dir/canary.log."""
    fields = {"SCRIPT": CANARY_JS, "MODEL": model,
              "STATE": f"{run_dir}/tmp/canary.json", "LOG": f"{run_dir}/canary.log"}
    text = CANARY.read_text()
    for key, value in fields.items():
        text = text.replace(f"@{key}@", str(value))
    return text


def set_canary(run_dir, version=None, share=0.0):
    """Route ``share`` percent (0-100) of the /predictions and /explanations requests of the
    proxy running from ``run_dir`` to ``version`` (None or share 0: none), from the next request
    on: its state file is replaced whole, which canary.js reads per request (nothing reloads)."""
    if not 0 <= share <= 100:
        raise ValueError(f"the canary share is a percentage from 0 to 100, got {share}")
    if version is not None and not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}", version):
        raise ValueError(f"not a model version this proxy routes: {version!r}")
    conf = (Path(run_dir) / "nginx.conf").read_text()
    state = Path(re.search(r"js_var \$canary_state (\S+);", conf)[1])
    # A new file of its own (mkstemp: O_EXCL, a random name, nothing followed), then renamed over.
    handle, fresh = tempfile.mkstemp(dir=state.parent, prefix=".canary-")
    with os.fdopen(handle, "w") as out:
        json.dump({"version": version, "share": share if version else 0}, out)
        os.fchmod(out.fileno(), 0o644)  # nginx's workers (nobody, started as root) read it
    os.replace(fresh, state)


def private_log(path):
    """Create ``path`` (or leave it) readable by its owner and group only: nginx appends to a
    log that exists and keeps its mode."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640))
    os.chmod(path, 0o640)


def rotate(run_dir, max_bytes=LOG_BYTES, keep=LOG_KEEP):
    """Rotate run_dir's logs over ``max_bytes`` (<log>.1 the newest of ``keep``) and have the
    nginx of run_dir reopen them (SIGUSR1); returns the logs rotated."""
    run_dir, rotated = Path(run_dir), []
    for name in LOGS:
        log = run_dir / name
        if not log.exists() or log.stat().st_size <= max_bytes:
            continue
        for n in range(keep - 1, 0, -1):
            older = run_dir / f"{name}.{n}"
            if older.exists():
                older.replace(run_dir / f"{name}.{n + 1}")
        log.replace(run_dir / f"{name}.1")
        private_log(log)
        rotated.append(name)
    pid_file = run_dir / "nginx.pid"
    if rotated and pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGUSR1)
    return rotated


def watch_logs(run_dir, every=ROTATE_EVERY, **limits):
    """rotate() every ``every`` seconds while the nginx of run_dir runs."""
    pid_file = Path(run_dir) / "nginx.pid"
    while pid_file.exists() and psutil.pid_exists(int(pid_file.read_text() or 0)):
        rotate(run_dir, **limits)
        time.sleep(every)


def write_client_properties(run_dir, settings, ts_config):
    """A config.properties for client.py that goes through the proxy (metrics: TorchServe's)."""
    props = Path(ts_config).read_text()
    metrics = re.search(r"^metrics_address=(.*)$", props, re.M)
    lines = [f"inference_address=http://{settings['listen_inference']}",
             f"management_address=http://{settings['listen_management']}"]
    if metrics:
        lines.append(f"metrics_address={metrics[1].strip()}")
    (Path(run_dir) / "client.properties").write_text("\n".join(lines) + "\n")


def wait_listening(address, process=None, timeout=10.0):
    host, port = address.rsplit(":", 1)
    host = "127.0.0.1" if host == "0.0.0.0" else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}")
        with contextlib.suppress(OSError):
            with socket.create_connection((host, int(port)), timeout=1):
                return
        time.sleep(0.05)
    raise TimeoutError(f"nginx is not listening on {address} after {timeout:.0f} s")


def start(run_dir, settings):
    """Start nginx as a daemon (make serve-proxy); returns the master's pid."""
    pid_file = Path(run_dir) / "nginx.pid"
    if pid_file.exists() and psutil.pid_exists(int(pid_file.read_text() or 0)):
        raise RuntimeError(f"nginx of {run_dir} is already running (pid {pid_file.read_text()})")
    conf = prepare(run_dir, settings)
    subprocess.run([nginx_binary(), "-p", str(Path(run_dir).resolve()), "-c", str(conf)],
                   check=True, umask=UMASK)
    wait_listening(settings["listen_inference"])
    watcher = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "rotate",
                                "--run-dir", str(run_dir), "--watch"], start_new_session=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    (Path(run_dir) / "rotate.pid").write_text(str(watcher.pid))
    return int(pid_file.read_text())


def stop(run_dir, timeout=15.0):
    """Stop the nginx whose pid file is in run_dir: finish what is in progress (SIGQUIT), then
    SIGTERM and SIGKILL if it takes longer than ``timeout``. False if none was running."""
    pid_file, watcher = Path(run_dir) / "nginx.pid", Path(run_dir) / "rotate.pid"
    if watcher.exists():  # the log watcher `start` left, by its pid
        with contextlib.suppress(psutil.NoSuchProcess, ValueError):
            process = psutil.Process(int(watcher.read_text()))
            if "rotate" in process.cmdline():
                process.terminate()
        watcher.unlink()
    if not pid_file.exists():
        return False
    try:
        master = psutil.Process(int(pid_file.read_text()))
        stop_process(master, timeout)
    except (psutil.NoSuchProcess, ValueError):
        return False
    finally:
        if root_temp(run_dir) is not None:
            shutil.rmtree(root_temp(run_dir), ignore_errors=True)
    return True


def stop_process(master, timeout=15.0):
    """Stop an nginx master and its workers, by pid."""
    processes = [master] + master.children(recursive=True)
    for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(psutil.NoSuchProcess):
            master.send_signal(sig)
        _, alive = psutil.wait_procs(processes, timeout=timeout if sig == signal.SIGQUIT else 5)
        if not alive:
            return
        processes = alive
        if sig == signal.SIGTERM:
            for process in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()


def pod_files(model=MODEL):
    """The Kubernetes sidecar's ConfigMap files: nginx.conf (pod_conf) and the openapi.json it
    serves; `make k8s-config` writes both into deploy/k8s/, where kustomize's configMapGenerator
    reads them."""
    s = settings_from(*K8S_CONFIGS)
    return {"nginx.conf": pod_conf(model),
            "openapi.json": openapi(model, s["max_workers"], s["max_body"])}


def pod_conf(model=MODEL):
    """The nginx.conf of the Kubernetes sidecar (K8S settings), with the ConfigMap (mounted at
    K8S_MOUNT) beside it."""
    # No canary in the pod: a release there is a new image and a rolling update (docs/).
    text = render({**settings_from(*K8S_CONFIGS), **K8S, "model": model,
                   "openapi_file": f"{K8S_MOUNT}/openapi.json",
                   "canary": "map $uri $model_uri { default $uri; }"}, daemon=False,
                  as_root=False, temp_root=K8S["run_dir"],
                  logs={"error": "stderr", "access": "/dev/stdout"})
    return ("# The nginx sidecar's config (deploy/k8s/): proxy.py's render of\n"
            "# deploy/nginx/nginx.conf.template for the pod. Rendered by `make k8s-config`, never\n"
            "# edited or checked in.\n" + text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("start", help="render the config and start nginx in the background")
    run.add_argument("--run-dir", type=Path, default=Path(".run/proxy"),
                     help="config, pid, logs (default: .run/proxy)")
    run.add_argument("--ts-config", type=Path, default=Path("config.properties"),
                     help="TorchServe's config.properties (default: config.properties)")
    run.add_argument("--model-config", type=Path, default=Path("handler/model-config.yaml"),
                     help="maxWorkers and responseTimeout (default: handler/model-config.yaml)")
    run.add_argument("--listen", default="127.0.0.1:8000",
                     help="inference address (default: 127.0.0.1:8000)")
    run.add_argument("--listen-management", default="127.0.0.1:8001",
                     help="management address (default: 127.0.0.1:8001)")
    run.add_argument("--model", default=MODEL,
                     help=f"the served model's name, its spec's (default: {MODEL})")
    halt = sub.add_parser("stop", help="stop the nginx that `start` started")
    halt.add_argument("--run-dir", type=Path, default=Path(".run/proxy"))
    pod = sub.add_parser("pod-conf", help="write the Kubernetes sidecar's nginx.conf")
    pod.add_argument("--out", type=Path, default=K8S_CONF,
                     help=f"(default: {K8S_CONF.relative_to(ROOT)})")
    pod.add_argument("--model", default=MODEL,
                     help=f"the served model's name, its spec's (default: {MODEL})")
    turn = sub.add_parser("rotate", help="rotate the logs of a running `start` over 100 MB")
    turn.add_argument("--run-dir", type=Path, default=Path(".run/proxy"))
    turn.add_argument("--watch", action="store_true",
                      help=f"every {ROTATE_EVERY:.0f} s while nginx runs (default: once)")
    args = p.parse_args(argv)

    if args.command == "start":
        settings = {**settings_from(args.ts_config, args.model_config),
                    "listen_inference": args.listen, "listen_management": args.listen_management,
                    "model": args.model}
        pid = start(args.run_dir, settings)
        write_client_properties(args.run_dir, settings, args.ts_config)
        room = open_files()
        print(f"nginx (pid {pid}) on http://{args.listen} (inference) and "
              f"http://{args.listen_management} (management), room for "
              f"{room['worker_connections']} connections per worker process (open-file limit "
              f"{room['nofile']}); client.py --config {args.run_dir}/client.properties goes "
              f"through it")
    elif args.command == "stop":
        if not stop(args.run_dir):
            print(f"no nginx running from {args.run_dir}")
    elif args.command == "rotate":
        if args.watch:
            watch_logs(args.run_dir)
        else:
            print("rotated:", ", ".join(rotate(args.run_dir)) or "none")
    else:
        for name, text in pod_files(args.model).items():
            args.out.with_name(name).write_text(text)
        print(f"wrote {args.out} and openapi.json beside it: `kubectl apply -k deploy/k8s` (GPU "
              f"nodes: -k deploy/k8s-gpu)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
