"""The deployment files agree with each other: deploy/ manifests, their config.properties, Dockerfile.

No cluster and no Docker engine needed: deploy/k8s/ (CPU) and its overlay deploy/k8s-gpu/ are
rendered as `kubectl kustomize` renders them (kubectl where it is installed, else this file's
reader of the few kustomize features they use, which a test pins to kubectl's output), with the
proxy's nginx.conf that `make k8s-config` renders; every rendered manifest, and KServe's, is
validated against the Kubernetes API schemas offline (kubernetes-validate --strict; KServe's
InferenceService, a custom resource, has its own checks here), and the fields that decide
whether a deployment works (kinds, API versions, runtime, storage, GPU, selectors, ports, users,
draining) are checked against each other and against the TorchServe configs they run.
The nginx sidecar's ConfigMap is checked to be proxy.py's render of deploy/nginx/ for the pod
(tests/test_proxy.py runs that config's template in front of a real TorchServe).
Run alone with `.venv/bin/python -m pytest tests/test_deploy.py`.
"""
import copy
import fnmatch
import functools
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

import proxy

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
API_VERSIONS = {"InferenceService": "serving.kserve.io/v1beta1", "Deployment": "apps/v1",
                "Service": "v1", "HorizontalPodAutoscaler": "autoscaling/v2",
                "NetworkPolicy": "networking.k8s.io/v1", "PodDisruptionBudget": "policy/v1",
                "ConfigMap": "v1"}
K8S_KINDS = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
             "PodDisruptionBudget", "Service"]
EXPECTED_KINDS = {"kserve": ["InferenceService", "NetworkPolicy"], "k8s": K8S_KINDS,
                  "k8s-gpu": K8S_KINDS}
KUSTOMIZED = ("k8s", "k8s-gpu")  # rendered by kustomize; kserve/ is applied as it is
CUSTOM_RESOURCES = {"InferenceService"}  # no schema in Kubernetes itself: checked below
KUBECTL = shutil.which("kubectl")


# --- kustomize -----------------------------------------------------------------------------------
def kustomize(folder):
    """The manifests `kubectl kustomize folder` prints, for what deploy/ uses of kustomize:
    resources (files and folders), configMapGenerator from files (its name suffixed with
    kustomize 5.5's hash, and the pods' references renamed), images (newName, newTag) and
    strategic merge patches (lists of named items merged by name). Anything else fails."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "resources", "configMapGenerator", "images",
                           "patches"}
    assert not unknown, f"{folder}/kustomization.yaml: {sorted(unknown)} not read here"
    docs = []
    for entry in spec.get("resources", []):
        path = folder / entry
        docs += kustomize(path) if path.is_dir() else [
            doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    renamed = {}
    for generator in spec.get("configMapGenerator", []):
        assert set(generator) <= {"name", "files", "options"}, generator
        data = {}
        for entry in generator["files"]:
            key, _, source = entry.rpartition("=")
            data[key or Path(source).name] = (folder / source).read_text()
        renamed[generator["name"]] = f"{generator['name']}-{config_map_hash(data)}"
        metadata = {"name": renamed[generator["name"]],
                    **{k: v for k, v in generator.get("options", {}).items() if k == "labels"}}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
                     "data": data})
    for pod_spec in (d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"):
        for volume in pod_spec.get("volumes", []):
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                volume["configMap"]["name"] = renamed.get(name, name)
    for entry in spec.get("patches", []):
        patch = yaml.safe_load((folder / entry["path"]).read_text())
        (i,) = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"])
                == (patch["kind"], patch["metadata"]["name"])]
        docs[i] = strategic_merge(docs[i], patch)
    for image in spec.get("images", []):
        for d in docs:
            if d["kind"] != "Deployment":
                continue
            for ctr in d["spec"]["template"]["spec"]["containers"]:
                name, _, tag = ctr["image"].rpartition(":")
                if name == image["name"]:
                    ctr["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def config_map_hash(data):
    """kustomize 5.5's suffix for a generated ConfigMap (api/hasher: the sha256 of Go's JSON of
    kind, data and name, whose lookup of metadata/name finds none, in 10 characters without
    vowels)."""
    text = json.dumps({"data": data, "kind": "ConfigMap", "name": ""}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)  # Go's json.Marshal escapes these
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def strategic_merge(base, patch):
    """``patch`` merged into ``base`` as a strategic merge patch does for what deploy/ patches:
    maps merged key by key, lists of named items (containers) merged by name with the patched
    ones first (as kustomize orders them), other lists replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base[k], v) if k in base else v
                           for k, v in patch.items()}}
    named = isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(item, dict) and "name" in item for item in base + patch)
    if named:
        old = {item["name"]: item for item in base}
        merged = [strategic_merge(old[item["name"]], item) if item["name"] in old else item
                  for item in patch]
        return merged + [item for item in base if item["name"] not in
                         {p["name"] for p in patch}]
    return copy.deepcopy(patch)


@functools.lru_cache(maxsize=None)
def rendered(folder, with_kubectl=bool(KUBECTL)):
    """The manifests of deploy/<folder>/ as `make k8s-config && kubectl kustomize` renders them:
    a copy of deploy/ with the sidecar's nginx.conf rendered into it, built by kubectl where it
    is installed, else by kustomize() above."""
    with tempfile.TemporaryDirectory() as tmp:
        copied = Path(tmp) / "deploy"
        for name in KUSTOMIZED:
            shutil.copytree(DEPLOY / name, copied / name,
                            ignore=shutil.ignore_patterns("nginx.conf", "openapi.json"))
        for name, text in proxy.pod_files().items():
            (copied / "k8s" / name).write_text(text)
        if with_kubectl:
            out = subprocess.run([KUBECTL, "kustomize", str(copied / folder)], check=True,
                                 capture_output=True, text=True).stdout
            return tuple(doc for doc in yaml.safe_load_all(out) if doc is not None)
        return tuple(kustomize(copied / folder))


def properties(path):
    """A Java .properties file as a dict (no line continuations: these files use none)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().replace("\\\\", "\\")
    return out


def address(props, key):
    """(host, port) of an address property such as inference_address=http://0.0.0.0:8080."""
    url = urlsplit(props[key])
    return url.hostname, url.port


def manifests(folder):
    """{kind: [documents]} of deploy/<folder>/: kustomize's render of the k8s folders, every
    YAML document of the others."""
    if folder in KUSTOMIZED:
        docs = copy.deepcopy(list(rendered(folder)))
    else:
        docs = [doc for path in sorted((DEPLOY / folder).rglob("*.y*ml"))
                for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    found = {}
    for doc in docs:
        found.setdefault(doc.get("kind"), []).append(doc)
    return found


def one(folder, kind):
    docs = manifests(folder).get(kind, [])
    assert len(docs) == 1, f"deploy/{folder}/ should hold exactly one {kind}, found {len(docs)}"
    return docs[0]


def dockerfile():
    """The Dockerfile's instructions as (KEYWORD, argument) with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


def instruction_args(keyword):
    """Arguments of every `keyword` instruction, with ${ARG}s replaced by their defaults."""
    defaults = dict(arg.split("=", 1) for kw, arg in dockerfile() if kw == "ARG" and "=" in arg)
    return [re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m[1], m[0]), arg)
            for kw, arg in dockerfile() if kw == keyword]


@pytest.mark.parametrize("folder", sorted(EXPECTED_KINDS))
def test_every_kubernetes_manifest_passes_strict_schema_validation(folder):
    """As `kubernetes-validate --strict`: unknown or misplaced fields fail, not only bad types."""
    docs = [doc for found in manifests(folder).values() for doc in found]
    assert docs
    for doc in docs:
        if doc["kind"] not in CUSTOM_RESOURCES:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_strict_validation_catches_a_misplaced_field():
    deployment = one("k8s", "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["replicas"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


DOCKER_CONFIG = properties(DEPLOY / "docker" / "config.properties")
KSERVE_CONFIG = properties(DEPLOY / "kserve" / "config" / "config.properties")


@pytest.mark.parametrize("folder", sorted(EXPECTED_KINDS))
def test_every_manifest_has_a_known_kind_api_version_and_name(folder):
    found = manifests(folder)
    assert sorted(kind for kind, docs in found.items() for _ in docs) == EXPECTED_KINDS[folder]
    for kind, docs in found.items():
        for doc in docs:
            assert doc["apiVersion"] == API_VERSIONS[kind], f"{kind} {doc['metadata']}"
            assert doc["metadata"]["name"], f"a {kind} without a name"


def test_inference_service_runs_kserves_torchserve_runtime_on_a_gpu():
    model = one("kserve", "InferenceService")["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch"
    assert model["runtime"] == "kserve-torchserve"
    # The kfs image of the TorchServe the archive is built with, in its GPU flavour.
    assert re.fullmatch(r"0\.12\.\d+-gpu", str(model["runtimeVersion"]))
    # v1 until the handler reads OIP (v2) inputs; see the comment in inferenceservice.yaml.
    assert model["protocolVersion"] == "v1"
    assert urlsplit(model["storageUri"]).scheme in {"s3", "gs", "pvc", "https", "hdfs", "azure"}
    resources = model["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"], key


def test_inference_service_probes_the_model_name_that_the_snapshot_declares():
    model = one("kserve", "InferenceService")["spec"]["predictor"]["model"]
    snapshot = json.loads(KSERVE_CONFIG["model_snapshot"])
    (name,) = snapshot["models"]
    probe = model["readinessProbe"]["httpGet"]
    # KServe's model server (8080), not TorchServe's loopback port behind it.
    assert (probe["path"], probe["port"]) == (f"/v1/models/{name}", 8080)
    assert address(KSERVE_CONFIG, "inference_address")[1] != probe["port"]


def test_kserve_config_is_what_the_torchserve_runtime_expects():
    assert KSERVE_CONFIG["model_store"] == "/mnt/models/model-store"
    snapshot = json.loads(KSERVE_CONFIG["model_snapshot"])
    assert snapshot["modelCount"] == len(snapshot["models"]) == 1
    (versions,) = snapshot["models"].values()
    (entry,) = versions.values()
    assert entry["marName"] == "cifar10.mar" and entry["defaultVersion"] is True
    # KServe's envelopes answer one request per TorchServe batch.
    assert entry["batchSize"] == 1
    assert 1 <= entry["minWorkers"] <= entry["maxWorkers"]
    # The wrapper finds TorchServe at one address for both APIs; 8081 is KServe's gRPC port.
    inference = address(KSERVE_CONFIG, "inference_address")
    assert inference == address(KSERVE_CONFIG, "management_address") == ("127.0.0.1", 8085)
    assert address(KSERVE_CONFIG, "metrics_address")[1] == 8082
    assert KSERVE_CONFIG["metrics_mode"] == "prometheus"
    assert KSERVE_CONFIG["enable_envvars_config"] == "true"  # TS_SERVICE_ENVELOPE
    # The wrapper sends no tokens (pytorch/serve#3301); nothing may register other models.
    assert KSERVE_CONFIG["disable_token_authorization"] == "true"
    assert KSERVE_CONFIG["enable_model_api"] == "false"


def test_kserve_network_policy_selects_the_inference_service_pods():
    name = one("kserve", "InferenceService")["metadata"]["name"]
    policy = one("kserve", "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": name}
    assert "Ingress" in policy["policyTypes"]
    metrics_port = address(KSERVE_CONFIG, "metrics_address")[1]
    assert metrics_port in {p["port"] for rule in policy["ingress"] for p in rule.get("ports", [])}


def pod(deployment):
    return deployment["spec"]["template"]


def container(deployment, name="torchserve"):
    """The pod's TorchServe container, or its nginx sidecar (name="proxy")."""
    containers = pod(deployment)["spec"]["containers"]
    assert sorted(c["name"] for c in containers) == ["proxy", "torchserve"]
    (found,) = [c for c in containers if c["name"] == name]
    return found


def named_ports(deployment):
    return {p["name"]: p["containerPort"] for c in pod(deployment)["spec"]["containers"]
            for p in c.get("ports", [])}


@pytest.mark.parametrize("name", ["torchserve", "proxy"])
def test_deployment_selects_its_own_pods_and_runs_as_a_non_root_user(name):
    deployment = one("k8s", "Deployment")
    labels = pod(deployment)["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec, ctr = pod(deployment)["spec"], container(deployment, name)
    context = {**spec.get("securityContext", {}), **ctr.get("securityContext", {})}
    assert context["runAsNonRoot"] is True
    assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
    assert context["allowPrivilegeEscalation"] is False
    assert not ctr["image"].endswith(":latest") and ":" in ctr["image"]


def test_dockerfile_creates_the_uid_that_the_deployment_runs_as():
    run_as = pod(one("k8s", "Deployment"))["spec"]["securityContext"]["runAsUser"]
    user = instruction_args("USER")[-1]
    assert any(re.search(rf"useradd --uid {run_as} .*\b{user}$", arg)
               for arg in instruction_args("RUN"))


def test_deployment_ports_and_probes_agree_with_the_container_config():
    """TorchServe's inference and management APIs on the pod's loopback, where the proxy's
    config looks for them; the pod's ports are the proxy's and the metrics; probes go through
    the proxy's /v2/health/ready (TorchServe's /ping)."""
    deployment = one("k8s", "Deployment")
    ports = named_ports(deployment)
    metrics = address(DOCKER_CONFIG, "metrics_address")[1]
    listen = int(proxy.K8S["listen_inference"].rsplit(":", 1)[1])
    assert ports == {"http": listen, "metrics": metrics}
    assert [p["containerPort"] for p in container(deployment, "proxy")["ports"]] == [listen]
    for name in ("torchserve", "proxy"):
        probe = container(deployment, name)["readinessProbe"]["httpGet"]
        assert probe["path"] == "/v2/health/ready"
        assert ports.get(probe["port"], probe["port"]) == listen
        assert "requests" in container(deployment, name)["resources"]
    env = {e["name"]: e["value"] for e in container(deployment)["env"]}
    # An un-tokened /ping needs token auth off, which the env can only do with envvars enabled;
    # with tokens off, the management API must stay on the pod's loopback.
    assert DOCKER_CONFIG["enable_envvars_config"] == "true"
    assert env["TS_DISABLE_TOKEN_AUTHORIZATION"] == "true"
    for api, key in (("inference", "ts_inference"), ("management", "ts_management")):
        url = urlsplit(env[f"TS_{api.upper()}_ADDRESS"])
        assert url.hostname == "127.0.0.1" and url.netloc == proxy.K8S[key], api
    liveness = container(deployment)["livenessProbe"]["exec"]["command"]
    assert f"('127.0.0.1', {proxy.K8S['ts_inference'].rsplit(':', 1)[1]})" in liveness[-1]


def test_proxy_sidecar_runs_the_configmap_that_proxy_py_renders():
    """The pod's ConfigMap is generated from proxy.py's render of deploy/nginx/nginx.conf.template
    for the pod (`make k8s-config`), under a name that changes with it (a new config rolls the
    pods); the sidecar mounts it and a writable run directory where the config puts its pid and
    temporary files."""
    configmap = one("k8s", "ConfigMap")
    assert configmap["data"] == proxy.pod_files()
    assert f"alias {proxy.K8S_MOUNT}/openapi.json;" in proxy.pod_conf()
    assert re.fullmatch(r"cifar10-proxy-[a-z0-9]{10}", configmap["metadata"]["name"])
    assert configmap["metadata"]["labels"] == {"app.kubernetes.io/name": "cifar10-torchserve"}
    deployment = one("k8s", "Deployment")
    sidecar = container(deployment, "proxy")
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod(deployment)["spec"]["volumes"]}
    assert volumes["proxy-config"]["configMap"]["name"] == configmap["metadata"]["name"]
    conf = sidecar["command"][sidecar["command"].index("-c") + 1]
    assert Path(conf) == Path(mounts["proxy-config"]) / "nginx.conf"
    assert "emptyDir" in volumes["proxy-run"] and mounts["proxy-run"] == proxy.K8S["run_dir"]
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["image"] == container(deployment)["image"]  # Debian's nginx in our image
    assert any("nginx" in arg.split() for arg in instruction_args("RUN"))


def test_the_sidecar_config_has_one_source_the_template():
    """No rendered copy of the nginx config is checked in: deploy/k8s/ generates its ConfigMap
    from nginx.conf and openapi.json, which `make k8s-config` writes and git ignores."""
    for path in DEPLOY.rglob("*.y*ml"):
        kinds = {doc.get("kind") for doc in yaml.safe_load_all(path.read_text()) if doc}
        assert "ConfigMap" not in kinds, f"{path} is a checked-in ConfigMap"
    spec = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    (generator,) = spec["configMapGenerator"]
    assert generator["files"] == ["nginx.conf", "openapi.json"]
    for name in generator["files"]:
        ignored = subprocess.run(["git", "check-ignore", "-q", f"deploy/k8s/{name}"], cwd=ROOT)
        assert ignored.returncode == 0, f"deploy/k8s/{name} should be git-ignored"
    make = subprocess.run(["make", "-n", "--no-print-directory", "k8s-config"], cwd=ROOT,
                          capture_output=True, text=True)
    assert make.returncode == 0 and "proxy.py pod-conf" in make.stdout, make.stderr


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: kustomize() alone renders")
@pytest.mark.parametrize("folder", KUSTOMIZED)
def test_this_files_kustomize_renders_what_kubectl_renders(folder):
    def by_kind(docs):
        return sorted(docs, key=lambda doc: (doc["kind"], doc["metadata"]["name"]))
    assert by_kind(rendered(folder, with_kubectl=False)) == by_kind(rendered(folder, True))


def test_the_gpu_deployment_is_an_overlay_of_the_cpu_one():
    spec = yaml.safe_load((DEPLOY / "k8s-gpu" / "kustomization.yaml").read_text())
    assert spec["resources"] == ["../k8s"]
    patches = [yaml.safe_load((DEPLOY / "k8s-gpu" / p["path"]).read_text())
               for p in spec["patches"]]
    assert [(p["kind"], p["metadata"]["name"]) for p in patches] == [
        ("Deployment", one("k8s", "Deployment")["metadata"]["name"])]


def test_service_reaches_the_deployments_pods_and_ports():
    deployment, service = one("k8s", "Deployment"), one("k8s", "Service")
    assert service["spec"]["type"] == "ClusterIP"
    labels = pod(deployment)["metadata"]["labels"]
    assert service["spec"]["selector"] and service["spec"]["selector"].items() <= labels.items()
    ports = named_ports(deployment)
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert target in ports or target in ports.values(), f"no container port {target}"
    # Inference reaches the pod through the proxy only.
    (http,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    proxy_ports = {p["name"]: p["containerPort"]
                   for p in container(deployment, "proxy")["ports"]}
    assert http["targetPort"] in proxy_ports or http["targetPort"] in proxy_ports.values()
    management = address(DOCKER_CONFIG, "management_address")[1]
    assert management not in {ports.get(p["targetPort"], p["targetPort"])
                               for p in service["spec"]["ports"]}


def test_hpa_scales_the_deployment_on_cpu_utilisation():
    deployment, hpa = one("k8s", "Deployment"), one("k8s", "HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], "Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # Utilisation is a percentage of the request: without one the HPA cannot compute it.
    assert "cpu" in container(deployment)["resources"]["requests"]


def test_k8s_network_policy_admits_the_inference_port_to_the_deployments_pods():
    deployment, policy = one("k8s", "Deployment"), one("k8s", "NetworkPolicy")["spec"]
    labels = pod(deployment)["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    allowed = {p["port"] for rule in policy["ingress"] for p in rule.get("ports", [])}
    assert named_ports(deployment)["http"] in allowed  # the proxy
    assert address(DOCKER_CONFIG, "management_address")[1] not in allowed


def test_container_config_listens_on_all_interfaces_with_tokens_and_no_model_api():
    for key in ("inference_address", "management_address", "metrics_address"):
        assert address(DOCKER_CONFIG, key)[0] == "0.0.0.0", key
    assert DOCKER_CONFIG["disable_token_authorization"] == "false"
    assert DOCKER_CONFIG["enable_model_api"] == "false"
    assert DOCKER_CONFIG["metrics_mode"] == "prometheus"


def test_dockerfile_builds_on_debian_as_non_root_and_exposes_the_configured_ports():
    """The tested stack, not a stock image's: Debian bookworm (Python 3.11, as the tests run),
    its Java 17, non-root."""
    assert instruction_args("FROM") == ["debian:bookworm-slim"]
    assert any("openjdk-17-jre-headless" in arg for arg in instruction_args("RUN"))
    assert instruction_args("USER")[-1] not in {"root", "0"}
    exposed = {int(port) for arg in instruction_args("EXPOSE") for port in arg.split()}
    assert exposed == {address(DOCKER_CONFIG, key)[1] for key in
                       ("inference_address", "management_address", "metrics_address")}


def test_dockerfile_copies_the_archive_and_config_that_the_command_uses():
    copies = {tuple(arg.split()[-2:]) for arg in instruction_args("COPY")}
    store = DOCKER_CONFIG["model_store"]
    assert ("model_store/cifar10.mar", f"{store}/cifar10.mar") in copies
    config_copy = [dest for src, dest in copies if src == "deploy/docker/config.properties"]
    assert len(config_copy) == 1
    command = json.loads(instruction_args("CMD")[-1])
    assert command[0] == "torchserve" and "--ncs" in command and "--foreground" in command
    assert command[command.index("--ts-config") + 1] == config_copy[0]
    assert command[command.index("--models") + 1] == "cifar10=cifar10.mar"


def test_dockerfile_installs_what_serving_needs_at_the_pins():
    """Every package the worker imports, at requirements.txt's pins (grepped from it, so they
    cannot drift; torch's on its own, from the index of the image's build), and a build-time
    import check."""
    runs = " ".join(instruction_args("RUN"))
    grep = re.search(r"grep -iE '\^\(([\w|-]+)\)==' /tmp/requirements.txt", runs)
    assert grep, "the Dockerfile should install its packages from requirements.txt's pins"
    assert "grep -E '^torch==' /tmp/requirements.txt" in runs
    pins = {line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().split()
            if "==" in line}
    wanted = {"torch", "torchserve", "pyyaml", "pillow", "numpy", "psutil", "captum", "onnxruntime",
              "python-multipart"}
    assert set(grep[1].split("|")) | {"torch"} == wanted and wanted <= pins
    checks = [set(names.replace(" ", "").split(","))
              for names in re.findall(r'python -c "import ([\w, ]+)"', runs)]
    assert any({"yaml", "onnxruntime", "torch", "PIL", "numpy", "ts", "python_multipart"} <= names
               for names in checks)


def docker_build(*make_args):
    """The image build command that `make docker` would run (a dry run: nothing is built)."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), "docker",
                          *make_args], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if " build " in line and " -t " in line)


def test_the_cpu_image_takes_cpu_only_torch_and_the_gpu_image_the_pinned_cuda_build():
    """The CPU image's torch comes from PyTorch's CPU-only index (the Dockerfile's default, so a
    plain `docker build .` gets it too) or a local CPU-only wheel mounted into podman's build; the
    GPU image's from pip's own index, where the pin is the CUDA build."""
    defaults = dict(arg.split("=", 1) for kw, arg in dockerfile() if kw == "ARG" and "=" in arg)
    assert defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    cpu = docker_build("CONTAINER=docker", "TORCH_CPU_WHEEL=")
    assert "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu " in cpu
    wheel = "/w/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    local = docker_build("CONTAINER=podman", f"TORCH_CPU_WHEEL={wheel}")
    assert f"-v /w:/w:ro --build-arg TORCH={wheel} --build-arg TORCH_INDEX_URL= " in local
    for container in ("docker", "podman"):
        gpu = docker_build(f"CONTAINER={container}", "IMAGE_TAG=gpu", f"TORCH_CPU_WHEEL={wheel}")
        assert "--build-arg TORCH_INDEX_URL= " in gpu and "TORCH=" not in gpu.replace(
            "TORCH_INDEX_URL=", "")
        assert "-t cifar10-torchserve:gpu" in gpu and "model_store/gpu/cifar10.mar" in gpu


def docker_ignored(path, patterns):
    """Whether .dockerignore keeps `path` out of the build context (last matching rule wins)."""
    parts, ignored = path.split("/"), False
    for rule in patterns:
        negated, pattern = rule.startswith("!"), rule.lstrip("!").strip("/")
        # A pattern matches the path or one of its folders, component for component ("*" never
        # crosses a "/"), so compare it with the prefix that has as many components.
        depth = len(pattern.split("/"))
        if depth <= len(parts) and fnmatch.fnmatchcase("/".join(parts[:depth]), pattern):
            ignored = not negated
    return ignored


def test_dockerignore_sends_what_the_dockerfile_copies_and_keeps_secrets_out():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = {arg.split()[-2] for arg in instruction_args("COPY") if "--from" not in arg}
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert not docker_ignored(source, patterns), f"{source} is excluded but COPY needs it"
    for kept_out in (".venv/bin/python", "data/cifar10/x.png", "logs/model_log.log",
                     "key_file.json", "tests/__pycache__/x.pyc", "weights/cifar10.pt"):
        assert docker_ignored(kept_out, patterns), f"{kept_out} would be in the build context"


def test_pods_drain_before_torchserve_stops_and_updates_keep_one_serving():
    deployment = one("k8s", "Deployment")
    command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    pause = re.fullmatch(r"sleep (\d+) && torchserve --stop", command[-1])
    assert command[:2] == ["/bin/sh", "-c"] and pause, command
    assert int(pause[1]) + 30 <= pod(deployment)["spec"]["terminationGracePeriodSeconds"]
    # The proxy keeps forwarding as long as TorchServe serves, then finishes what it holds.
    command = container(deployment, "proxy")["lifecycle"]["preStop"]["exec"]["command"]
    quit_ = re.fullmatch(r"sleep (\d+) && nginx -c (\S+) -s quit", command[-1])
    assert quit_ and int(quit_[1]) >= int(pause[1]), command
    assert quit_[2] == container(deployment, "proxy")["command"][-1]
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1


def test_disruption_budget_covers_the_deployments_pods_and_leaves_one_serving():
    deployment, pdb = one("k8s", "Deployment"), one("k8s", "PodDisruptionBudget")["spec"]
    labels = pod(deployment)["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    minimum = one("k8s", "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    assert pdb["maxUnavailable"] < minimum and deployment["spec"]["replicas"] >= minimum


def test_gpu_deployment_differs_from_the_cpu_one_only_where_gpus_need_it():
    cpu, gpu = one("k8s", "Deployment"), one("k8s-gpu", "Deployment")
    for name in ("torchserve", "proxy"):
        assert container(gpu, name)["image"] == container(cpu, name)["image"].replace(
            ":cpu", ":gpu") != container(cpu, name)["image"]
    resources = container(gpu)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod(gpu)["spec"]["tolerations"]
    for deployment in (cpu, gpu):  # the rest must be the same Deployment
        pod(deployment)["spec"].pop("tolerations", None)
        container(deployment).pop("resources")
        for name in ("torchserve", "proxy"):
            container(deployment, name).pop("image")
        pod(deployment)["spec"]["containers"].sort(key=lambda c: c["name"])
    assert gpu == cpu
    # and every other manifest is the CPU one's
    others = {kind: docs for kind, docs in manifests("k8s").items() if kind != "Deployment"}
    assert others == {kind: docs for kind, docs in manifests("k8s-gpu").items()
                      if kind != "Deployment"}
