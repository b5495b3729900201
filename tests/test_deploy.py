"""The deployment files agree with each other: deploy/ manifests, their config.properties, Dockerfile.

No cluster and no Docker engine needed: every Kubernetes manifest under deploy/ is validated
against the Kubernetes API schemas offline (kubernetes-validate --strict; KServe's
InferenceService, a custom resource, has its own checks here), and the fields that decide whether
a deployment works (kinds, API versions, runtime, storage, GPU, selectors, ports, users,
draining) are checked against each other and against the TorchServe configs they run.
The nginx sidecar's ConfigMap is checked to be proxy.py's render of deploy/nginx/ for the pod
(tests/test_proxy.py runs that config's template in front of a real TorchServe).
Run alone with `.venv/bin/python -m pytest tests/test_deploy.py`.
"""
import fnmatch
import json
import re
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
EXPECTED_KINDS = {"kserve": ["InferenceService", "NetworkPolicy"],
                  "k8s": ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                          "PodDisruptionBudget", "Service"],
                  "k8s-gpu": ["Deployment"]}
CUSTOM_RESOURCES = {"InferenceService"}  # no schema in Kubernetes itself: checked below


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
    """{kind: [documents]} of every YAML document under deploy/<folder>/."""
    found = {}
    for path in sorted((DEPLOY / folder).rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
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


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_kubernetes_manifest_passes_strict_schema_validation(path):
    """As `kubernetes-validate --strict`: unknown or misplaced fields fail, not only bad types."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
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
    """deploy/k8s/proxy-configmap.yaml is proxy.py's render of deploy/nginx/nginx.conf.template
    for the pod; the sidecar mounts it and a writable run
    directory where the config puts its pid and temporary files."""
    configmap = one("k8s", "ConfigMap")
    expected = yaml.safe_load(proxy.configmap())
    assert configmap == expected, ("deploy/k8s/proxy-configmap.yaml is stale: regenerate it "
                                   "with `proxy.py configmap` (its header says how)")
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
    cannot drift), and a build-time import check."""
    runs = " ".join(instruction_args("RUN"))
    grep = re.search(r"grep -iE '\^\(([\w|-]+)\)==' /tmp/requirements.txt", runs)
    assert grep, "the Dockerfile should install its packages from requirements.txt's pins"
    pins = {line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().split()
            if "==" in line}
    wanted = {"torch", "torchserve", "pyyaml", "pillow", "numpy", "psutil", "captum", "onnxruntime",
              "python-multipart"}
    assert set(grep[1].split("|")) == wanted and wanted <= pins
    checks = [set(names.replace(" ", "").split(","))
              for names in re.findall(r'python -c "import ([\w, ]+)"', runs)]
    assert any({"yaml", "onnxruntime", "torch", "PIL", "numpy", "ts", "python_multipart"} <= names
               for names in checks)


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
    assert gpu == cpu
