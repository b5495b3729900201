# The CIFAR-10 classifier served by TorchServe 0.12, on the official pytorch/torchserve image.
#   make archive && make docker                  # CPU image cifar10-torchserve:cpu
#   make docker IMAGE_TAG=gpu                    # GPU image on pytorch/torchserve:0.12.0-gpu
#   make docker-run                              # ports published on 127.0.0.1 only
# Compiles nothing: the .mar (weights, net, handler, model-config.yaml) comes from `make archive`.
ARG BASE=pytorch/torchserve:0.12.0-cpu
FROM ${BASE}

# The base image's non-root user, restated so no later line runs as root by accident.
USER model-server
WORKDIR /home/model-server

# TorchServe's wheel does not declare pyyaml, yet workers need it to read the archive's
# model-config.yaml: install the repo's pinned version, only where the image lacks it.
COPY requirements.txt /tmp/requirements.txt
RUN python -c "import yaml" 2>/dev/null \
    || python -m pip install --no-cache-dir "$(grep -i '^pyyaml==' /tmp/requirements.txt)"
# The handler's `runtime: int8` / `onnx` forwards on the CPU (without it the worker falls back to torch).
RUN python -m pip install --no-cache-dir "$(grep -i '^onnxruntime==' /tmp/requirements.txt)"
# Fail the build, not the first request, when the handler's imports are missing.
RUN python -c "import numpy, PIL, torch, yaml, onnxruntime"
# deploy/k8s/deployment.yaml runs the pod as UID 1000 (the kubelet verifies runAsNonRoot only
# against a number): stop here if this image's model-server has another UID.
RUN test "$(id -u)" = 1000 \
    || { echo "model-server is UID $(id -u): change runAsUser in deploy/k8s/deployment.yaml"; exit 1; }

COPY --chown=model-server deploy/docker/config.properties /home/model-server/config.properties
COPY --chown=model-server model_store/cifar10.mar /home/model-server/model-store/cifar10.mar

# Inference, management (token-protected), metrics: deploy/docker/config.properties.
EXPOSE 8080 8081 8082

# The base image's entrypoint starts TorchServe in the background and then tails /dev/null, so a
# crashed server leaves a running container. In the foreground the container lives and dies with
# the server, and a restart policy (Kubernetes', `docker run --restart`) brings it back.
# --ncs: no config snapshots written, none restored.
ENTRYPOINT []
CMD ["torchserve", "--start", "--foreground", "--ncs", \
     "--ts-config", "/home/model-server/config.properties", \
     "--models", "cifar10=cifar10.mar"]
