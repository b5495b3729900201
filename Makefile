# CIFAR-10 on TorchServe: train -> archive -> serve -> call. `make` lists the targets.
PYTHON      ?= python3
VENV        ?= .venv
DATA_DIR    ?= ../shared/data/cifar10/train
EPOCHS      ?= 40
# The shipped recipe (MODEL_CARD.md): airbench95's widths and learning rate, airbench96's
# augmentation (translate 4, Cutout 12), 40 epochs (96 min on 2 AMD EPYC cores), trained on every
# training image but the 500 that tests/holdout holds out.
TRAIN_ARGS  ?= --widths 128 384 384 --lr 10 --translate 4 --cutout 12 --val-size 500
WEIGHTS     ?= weights/cifar10.pt
# The model's name: its URL (/predictions/NAME) and its archive (MODEL_STORE/NAME.mar). Empty:
# the name in WEIGHTS' model spec, read by the recipes that need it (`make archive` writes
# model_store/cifar10.mar for the shipped weights).
MODEL_NAME  ?=
MODEL_STORE ?= model_store
# Build outputs of one checkpoint (its ONNX exports, golden set, staged package)
BUILD       ?= $(MODEL_STORE)/build/$(basename $(notdir $(WEIGHTS)))
ONNX        ?= $(BUILD)/cifar10.onnx
INT8        ?= $(BUILD)/cifar10.int8.onnx
GOLDEN      ?= $(BUILD)/golden.npz
# `make convert`: a model spec (JSON, cifar10_serve/spec.py) and a plain state_dict of weights
# trained elsewhere -> WEIGHTS, a checkpoint `make archive` takes (docs/own-model.md)
SPEC        ?=
STATE_DICT  ?=
# Python files of your own the archive ships beside the handler (comma-separated): a spec's
# `architecture: my_net:MyNet` imports my_net.py from there (and from PYTHONPATH when building)
EXTRA_FILES ?=
# Real images the int8 export is calibrated on (any folder of images; 512 of them, a fixed random
# subset): 512 training images that ship with the repository, so every clone builds the same file.
CALIB_DIR   ?= weights/calibration
# Held-out real images the int8 quantization is checked on (in fp32 arithmetic: the same on any
# build machine) and the archive's golden set is drawn from (every forward is checked on it at
# worker start, on the CPU that serves).
CHECK_DIR   ?= tests/holdout
TS_CONFIG   ?= config.properties
MODEL_CONFIG ?= handler/model-config.yaml
RUN_DIR     ?= .run
IMG         ?= tests/fixtures/cat.jpg
WORKERS     ?= 2
TESTS       ?= tests
BENCH_ARGS  ?=
# make bench serves the archive again with this handler.runtime, or handler setting (e.g.
# tta_margin=1: full TTA), and compares (empty: skip)
BENCH_COMPARE ?= onnx
# make bench also serves the same weights with a peer server and compares (litserve; empty: skip)
BENCH_PEER  ?=
# make flood: seconds per flood, more bench/flood.py flags
FLOOD_SECONDS ?= 90
FLOOD_ARGS  ?=
IMAGE       ?= cifar10-torchserve
# cpu, or gpu: the archive built with handler/model-config.gpu.yaml in MODEL_STORE/gpu
IMAGE_TAG   ?= cpu
DOCKER_BASE ?= debian:bookworm-slim
DOCKER_RUN_ARGS ?=
# docker where its daemon answers, else podman (apt-get install podman runc debootstrap), run
# with deploy/docker/containers.conf, the runc runtime and the host's network.
CONTAINER   ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
# A local package index mounted into podman builds (this project's machines keep the pinned
# torch there); empty where pip's index has every pin. PIP_CERT (pip's own variable), where set,
# is mounted too: the CA bundle of a proxy between this machine and the package index.
LOCAL_INDEX ?= $(wildcard /opt/pypi-more)
# The CPU image's torch: PyTorch's CPU-only index, or, in podman builds, a CPU-only wheel for
# Python 3.11 found in LOCAL_WHEELS (this project's machines reach no index of PyTorch's and keep
# one in pip's find-links folder; TORCH_CPU_WHEEL= to use the index all the same).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
LOCAL_WHEELS ?= $(wildcard /opt/wheels)
TORCH_CPU_WHEEL ?= $(lastword $(sort $(wildcard $(LOCAL_WHEELS)/torch-*+cpu-cp311-*.whl)))
KSERVE_DIR  ?= dist/kserve
# make k8s-config: the nginx.conf deploy/k8s/kustomization.yaml generates the sidecar's ConfigMap
# from (rendered from deploy/nginx/, not checked in)
K8S_CONF    ?= deploy/k8s/nginx.conf
# make gpu-check: where its report goes (bench/results/gpu for a real GPU run), extra flags
GPU_OUT     ?= $(RUN_DIR)/gpu-check
GPU_CHECK_ARGS ?=
DEMO_PORT   ?= 8090
# make serve-proxy: nginx in front of TorchServe on 127.0.0.1 (deploy/nginx/;
# docs/proxy-and-security.md)
PROXY_PORT  ?= 8000
PROXY_MANAGEMENT_PORT ?= 8001
PROXY_DIR   ?= $(RUN_DIR)/proxy
# The archive's version (the model's v2 metadata names it)
MODEL_VERSION ?= 1.0

BIN := $(VENV)/bin
JAVA_MSG := TorchServe 0.12 needs Java 17+ (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)
CHECK_JAVA = java -version 2>&1 | grep -qE 'version "(1[7-9]|[2-9][0-9])' \
  || { echo "$(JAVA_MSG); found: $$(java -version 2>&1 | head -n 1 || echo no java)"; exit 1; }
PY  := $(BIN)/python
PODMAN := CONTAINERS_CONF=$(abspath deploy/docker/containers.conf) podman --runtime runc
RUNTIME = $(if $(filter docker,$(CONTAINER)),docker,$(PODMAN))
DOCKER_STORE = $(if $(filter gpu,$(IMAGE_TAG)),$(MODEL_STORE)/gpu,$(MODEL_STORE))
DOCKER_CONFIG = $(if $(filter gpu,$(IMAGE_TAG)),handler/model-config.gpu.yaml,$(MODEL_CONFIG))
# The torch build arguments: the GPU image's from pip's index (the pinned CUDA build), the CPU
# image's from TORCH_CPU_INDEX, or its local wheel (mounted into podman builds).
TORCH_WHEEL_DIR = $(abspath $(dir $(TORCH_CPU_WHEEL)))
DOCKER_TORCH = $(if $(filter gpu,$(IMAGE_TAG)),--build-arg TORCH_INDEX_URL=,$(if \
  $(and $(TORCH_CPU_WHEEL),$(filter-out docker,$(CONTAINER))),-v $(TORCH_WHEEL_DIR):$(TORCH_WHEEL_DIR):ro \
  --build-arg TORCH=$(abspath $(TORCH_CPU_WHEEL)) --build-arg TORCH_INDEX_URL=,--build-arg \
  TORCH_INDEX_URL=$(TORCH_CPU_INDEX)))
# The container's APIs on the host's loopback: published ports with docker; with podman's host
# network TorchServe itself listens there (deploy/docker/config.properties reads TS_* variables).
DOCKER_PORTS = $(if $(filter docker,$(CONTAINER)),-p 127.0.0.1:8080:8080 \
  -p 127.0.0.1:8081:8081 -p 127.0.0.1:8082:8082,--network host \
  -e TS_INFERENCE_ADDRESS=http://127.0.0.1:8080 -e TS_MANAGEMENT_ADDRESS=http://127.0.0.1:8081 \
  -e TS_METRICS_ADDRESS=http://127.0.0.1:8082)
# The serving package, shipped in the .mar as a folder: the archiver flattens a folder named in
# --extra-files but keeps the folders inside it, so the package is staged in SHIP first.
PACKAGE_FILES := $(wildcard cifar10_serve/*.py)
# The class names the archive answers with, in the order the weights were trained on: by default
# written from WEIGHTS' spec; one of your own must name the spec's classes (the worker checks)
INDEX_TO_NAME ?= $(BUILD)/index_to_name.json
SHIP        = $(BUILD)/ship
HANDLER_FILES := handler/cifar10_handler.py $(PACKAGE_FILES) $(INDEX_TO_NAME) \
                 $(MODEL_CONFIG)
# Stamp of `make archive` for WEIGHTS (and MODEL_NAME): the archive is MODEL_STORE/<name>.mar
ARCHIVED    = $(BUILD)/archived$(if $(MODEL_NAME),-$(MODEL_NAME))
comma := ,
empty :=
space := $(empty) $(empty)
EXTRA_LIST  = $(subst $(comma),$(space),$(EXTRA_FILES))
# The model's name, as a shell word in recipes (no work while make reads this file)
NAME        = $(or $(MODEL_NAME),$$($(PY) -m cifar10_serve.spec $(WEIGHTS) name))
MAR         = $(MODEL_STORE)/$(NAME).mar
# Build steps import the user's modules (EXTRA_FILES) as the worker will, from their folders
BUILD_ENV   = $(if $(EXTRA_FILES),PYTHONPATH=$(subst $(space),:,$(sort $(abspath $(dir $(EXTRA_LIST))))))

.DEFAULT_GOAL := help
.PHONY: help install train convert archive serve stop status predict scale test evaluate bench clean \
        docker docker-run docker-stop kserve-bundle demo gpu-check docker-test serve-proxy \
        stop-proxy k8s-config

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(BIN)/torchserve: requirements.txt
	@$(CHECK_JAVA)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(BIN)/torchserve ## create .venv with the pinned dependencies (checks for Java 17+)

train: $(BIN)/torchserve ## train on the ImageFolder DATA_DIR (DATA_DIR= downloads CIFAR10), write WEIGHTS
	$(PY) train.py $(if $(DATA_DIR),--data-dir $(DATA_DIR),--download-root data) \
	  --epochs $(EPOCHS) $(TRAIN_ARGS) --out $(WEIGHTS)

convert: $(BIN)/torchserve ## SPEC (a model spec, JSON) + STATE_DICT (weights trained elsewhere) -> the checkpoint WEIGHTS
	@test -n "$(SPEC)" -a -n "$(STATE_DICT)" || { echo "usage: make convert SPEC=spec.json STATE_DICT=weights.pt WEIGHTS=out.pt [EXTRA_FILES=my_net.py]"; exit 2; }
	$(BUILD_ENV) $(PY) convert.py $(SPEC) --state-dict $(STATE_DICT) --out $(WEIGHTS)

$(BUILD)/index_to_name.json: $(WEIGHTS) | $(BIN)/torchserve
	@mkdir -p $(BUILD)
	$(PY) -m cifar10_serve.spec $(WEIGHTS) index_to_name > $@.tmp && mv $@.tmp $@

$(ONNX) $(INT8) $(GOLDEN) &: $(WEIGHTS) $(PACKAGE_FILES) $(EXTRA_LIST) export_onnx.py | $(BIN)/torchserve
	$(BUILD_ENV) $(PY) export_onnx.py $(WEIGHTS) $(ONNX) --int8 $(INT8) \
	  --calibration-dir $(CALIB_DIR) --check-dir $(CHECK_DIR) --golden $(GOLDEN)

$(ARCHIVED): $(WEIGHTS) $(ONNX) $(INT8) $(GOLDEN) $(HANDLER_FILES) $(EXTRA_LIST) | $(BIN)/torchserve
	@rm -rf $(SHIP) && mkdir -p $(SHIP)/cifar10_serve && cp $(PACKAGE_FILES) $(SHIP)/cifar10_serve/
	name=$(NAME) && $(BIN)/torch-model-archiver --force --model-name $$name \
	  --version $(MODEL_VERSION) --serialized-file $(WEIGHTS) --handler handler/cifar10_handler.py \
	  --extra-files $(subst $(space),$(comma),$(strip $(SHIP) $(INDEX_TO_NAME) $(ONNX) $(INT8) \
	  $(GOLDEN) $(EXTRA_LIST))) --config-file $(MODEL_CONFIG) --export-path $(MODEL_STORE) \
	  && echo "wrote $(MODEL_STORE)/$$name.mar" && touch $@

$(WEIGHTS):
	@echo "$(WEIGHTS) is missing: \`make train\` or \`make convert\` writes it (or pass WEIGHTS=path/to/checkpoint.pt)"; exit 1

archive: $(ARCHIVED) ## export the ONNX forwards (fp32, int8) and the golden set of WEIGHTS, package them with the model, handler, configs as MODEL_STORE/<its name>.mar

serve: $(ARCHIVED) ## start TorchServe in the background; returns once a prediction succeeds
	@$(CHECK_JAVA)
	@mkdir -p $(RUN_DIR)
	@if $(PY) client.py --config $(TS_CONFIG) ping --quiet 2>/dev/null; then echo "TorchServe is already running"; \
	else name=$(NAME) && TMPDIR=$(abspath $(RUN_DIR)) TEMP=$(abspath $(RUN_DIR)) $(BIN)/torchserve --start --ncs --ts-config $(TS_CONFIG) --log-config $(abspath log4j2.xml) \
	  --model-store $(MODEL_STORE) --models $$name=$$name.mar >$(RUN_DIR)/torchserve.out 2>&1 \
	  && $(PY) client.py --config $(TS_CONFIG) --model $$name wait --timeout 60 --worker-log logs/model_log.log || { cat $(RUN_DIR)/torchserve.out; \
	  tail -n 30 logs/model_log.log 2>/dev/null; $(MAKE) --no-print-directory stop; exit 1; }; fi

stop: ## stop the TorchServe that `make serve` started
	@TMPDIR=$(abspath $(RUN_DIR)) $(BIN)/torchserve --stop --foreground

serve-proxy: serve ## make serve, then nginx in front on 127.0.0.1:PROXY_PORT (inference) and PROXY_MANAGEMENT_PORT
	@$(PY) -c "import proxy; proxy.njs_module()" 2>/dev/null || { echo "make serve-proxy needs \
	  nginx and its njs module (Debian/Ubuntu: apt-get install nginx libnginx-mod-http-js)"; exit 1; }
	$(PY) proxy.py start --run-dir $(PROXY_DIR) --ts-config $(TS_CONFIG) \
	  --model-config $(MODEL_CONFIG) --model $(NAME) \
	  --listen 127.0.0.1:$(PROXY_PORT) --listen-management 127.0.0.1:$(PROXY_MANAGEMENT_PORT)

stop-proxy: ## stop the nginx of make serve-proxy, then TorchServe (make stop)
	$(PY) proxy.py stop --run-dir $(PROXY_DIR)
	@$(MAKE) --no-print-directory stop

status: ## show the model's versions (default starred), workers, canary share and last release steps
	$(PY) release.py status $(RELEASE_FLAGS)

predict: ## classify IMG (default: a test fixture) on the running server
	$(PY) client.py --model $(NAME) predict $(IMG)

demo: $(BIN)/torchserve ## serve the browser demo on 127.0.0.1:DEMO_PORT (after `make serve`)
	$(PY) -m demo.serve --config $(TS_CONFIG) --port $(DEMO_PORT)

scale: ## set the number of workers to WORKERS (management API)
	$(PY) client.py --model $(NAME) scale $(WORKERS)

evaluate: $(BIN)/torchserve ## score WEIGHTS in fp32 and int8 (or URL=http://127.0.0.1:8080, the server) on the ImageFolder EVAL_DIR
	@test -n "$(EVAL_DIR)" || { echo "usage: make evaluate EVAL_DIR=path/to/imagefolder [URL=http://127.0.0.1:8080]"; exit 2; }
	$(PY) evaluate.py $(EVAL_DIR) $(if $(URL),--url $(URL),--weights $(WEIGHTS) \
	  $(if $(wildcard $(INT8)),--int8 $(INT8))) \
	  $(if $(HOLDOUT),--holdout $(HOLDOUT))

bench: $(ARCHIVED) ## load-test a TorchServe started here with wrk, beside the handler in-process; writes bench/results/
	@command -v wrk >/dev/null || { echo "make bench needs wrk (Debian/Ubuntu: apt-get install wrk)"; exit 1; }
	$(if $(BENCH_PEER),$(PY) -m pip install -q -r bench/requirements-peer.txt)
	$(PY) -m bench.bench --start --config $(TS_CONFIG) --mar $(MAR) \
	  $(if $(BENCH_COMPARE),--compare-runtime $(BENCH_COMPARE)) \
	  $(if $(BENCH_PEER),--peer $(BENCH_PEER)) $(BENCH_ARGS)

.PHONY: flood
flood: $(ARCHIVED) ## flood a TorchServe of its own (free ports) with explanations, then 64-image v2 requests, beside good traffic; prints good p50/p99, failures, worker restarts
	$(PY) -m bench.flood --start --mar $(MAR) --duration $(FLOOD_SECONDS) $(FLOOD_ARGS)

gpu-check: $(BIN)/torchserve ## the GPU check: CUDA tests, GPU training, GPU workers, img/s -> GPU_OUT (a dry run without CUDA)
	$(PY) -m bench.gpu_check $(GPU_OUT) --data-dir $(DATA_DIR) $(GPU_CHECK_ARGS)

docker: $(BIN)/torchserve ## build IMAGE:IMAGE_TAG (cpu: CPU-only torch; gpu: CUDA torch, the GPU archive), docker or podman
	$(MAKE) --no-print-directory archive MODEL_STORE=$(DOCKER_STORE) MODEL_CONFIG=$(DOCKER_CONFIG)
	$(if $(filter docker,$(CONTAINER)),docker build --build-arg MAR=$(DOCKER_STORE)/cifar10.mar \
	  $(DOCKER_TORCH) -t $(IMAGE):$(IMAGE_TAG) .,{ $(PODMAN) image exists $(DOCKER_BASE) \
	  || bash deploy/docker/make_base.sh $(DOCKER_BASE); } && \
	  $(PODMAN) build --isolation chroot --network host --build-arg BASE=$(DOCKER_BASE) \
	  $(if $(LOCAL_INDEX),-v $(LOCAL_INDEX):$(LOCAL_INDEX):ro \
	  --build-arg PIP_EXTRA_INDEX_URL=file://$(LOCAL_INDEX)/simple) \
	  $(if $(PIP_CERT),-v $(PIP_CERT):/run/pip-ca.crt:ro --build-arg PIP_CERT=/run/pip-ca.crt) \
	  $(DOCKER_TORCH) --build-arg MAR=$(DOCKER_STORE)/cifar10.mar -t $(IMAGE):$(IMAGE_TAG) .)

docker-run: $(BIN)/torchserve ## run IMAGE:IMAGE_TAG on 127.0.0.1:8080-8082 like make serve; copies its key_file.json here
	$(RUNTIME) run -d --rm --name $(IMAGE) $(DOCKER_PORTS) $(DOCKER_RUN_ARGS) $(IMAGE):$(IMAGE_TAG)
	@for i in $$(seq 120); do $(RUNTIME) cp $(IMAGE):/home/model-server/key_file.json \
	  key_file.json 2>/dev/null && break; sleep 0.5; done; test -s key_file.json
	$(PY) client.py wait --timeout 180 || { $(RUNTIME) logs $(IMAGE) | tail -n 30; \
	  $(RUNTIME) exec $(IMAGE) torchserve --stop; $(RUNTIME) rm -f $(IMAGE); exit 1; }

docker-stop: ## stop the container docker-run started (torchserve --stop inside it, then remove it)
	-$(RUNTIME) exec $(IMAGE) torchserve --stop
	-$(RUNTIME) rm -f $(IMAGE) >/dev/null 2>&1

k8s-config: $(BIN)/torchserve ## render the proxy sidecar's nginx.conf into deploy/k8s/ (then kubectl apply -k deploy/k8s, or -k deploy/k8s-gpu)
	$(PY) proxy.py pod-conf --out $(K8S_CONF) $(if $(MODEL_NAME),--model $(MODEL_NAME))

kserve-bundle: $(ARCHIVED) ## lay out KSERVE_DIR (config/ + model-store/) for KServe's storageUri
	rm -rf $(KSERVE_DIR)
	mkdir -p $(KSERVE_DIR)/config $(KSERVE_DIR)/model-store
	cp deploy/kserve/config/config.properties $(KSERVE_DIR)/config/
	cp $(MAR) $(KSERVE_DIR)/model-store/cifar10.mar

test: $(BIN)/torchserve ## run the test suite (handler, training, archive, a real TorchServe)
	$(PY) -m pytest $(TESTS)

docker-test: $(BIN)/torchserve ## build the image, serve from it, check answers and scaling, stop it (minutes)
	$(PY) -m pytest -m container tests/test_container.py

clean: ## remove build outputs (the archive, logs, run files)
	rm -rf $(MAR) $(K8S_CONF) $(BUILD) logs $(RUN_DIR) .pytest_cache dist

# ---------------------------------------------- releases (release.py, docs/operations.md
# "Releasing a new model"): make release WEIGHTS=path/to/new.pt beside make serve-proxy.
# The gate's check set (an ImageFolder of real held-out images) and how far (a fraction) the new
# version's accuracy on it may fall below the serving version's
RELEASE_CHECK_DIR ?= $(CHECK_DIR)
RELEASE_MARGIN ?= 0.01
# Percent of /predictions and /explanations requests the canary gets, and for how many seconds
# (CANARY_SHARE=0: no canary, promoted once the gate passes)
CANARY_SHARE ?= 10
CANARY_SECONDS ?= 60
# The tokens of the TorchServe released to (it writes them where it starts), the release's record,
# more release.py flags (python release.py release --help)
KEY_FILE    ?= key_file.json
RELEASE_STATE ?= $(RUN_DIR)/release.json
RELEASE_ARGS ?=
RELEASE_FLAGS = --ts-config $(TS_CONFIG) --key-file $(KEY_FILE) --proxy-dir $(PROXY_DIR) \
                --state $(RELEASE_STATE)

.PHONY: release rollback
release: $(BIN)/torchserve ## archive WEIGHTS as the next version, gate it, canary it through the proxy, promote it or take it down
	$(PY) release.py release $(WEIGHTS) $(RELEASE_FLAGS) --check-dir $(RELEASE_CHECK_DIR) \
	  --margin $(RELEASE_MARGIN) --canary-share $(CANARY_SHARE) \
	  --canary-seconds $(CANARY_SECONDS) $(RELEASE_ARGS)

rollback: $(BIN)/torchserve ## the previous version back as the default (registered again, warm); the current one drained and unregistered
	$(PY) release.py rollback $(RELEASE_FLAGS)
