# The CIFAR-10 classifier served by TorchServe 0.12, as tested: requirements.txt's pins on Debian
# bookworm's Python 3.11, with Debian's Java 17, the archive from `make archive` and
# deploy/docker/config.properties.
#   make docker                      # cifar10-torchserve:cpu (docker; podman where docker is not)
#   make docker IMAGE_TAG=gpu        # cifar10-torchserve:gpu: the archive built with
#                                    # handler/model-config.gpu.yaml and the pinned CUDA torch
#   make docker-run / make docker-stop
# The CPU image carries PyTorch's CPU-only torch (no CUDA libraries: 1.45 GB rather than 6.4 GB
# to pull on every new node); the GPU image the CUDA build requirements.txt pins. TorchServe's
# worker imports torch even where ONNX Runtime runs the forward, and Captum's explanations need it.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# nginx: deploy/k8s/ runs this image a second time in each pod as TorchServe's proxy (Debian's
# nginx, the one `make serve-proxy` and tests/test_proxy.py run; docs/proxy-and-security.md).
# The policy-rc.d stops its package from starting the system service during the build.
# apt-get clean: a base from deploy/docker/make_base.sh keeps the downloaded packages (~140 MB
# in this layer).
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      openjdk-17-jre-headless python3 python3-venv ca-certificates nginx \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d

# The non-root user TorchServe runs as. deploy/k8s/deployment.yaml runs the pod as this UID (the
# kubelet verifies runAsNonRoot only against a number).
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin model-server

# What serving needs of requirements.txt, at its pins, in a venv (Debian's own Python is
# externally managed); not torchvision, which serving never imports. Build arguments pip reads,
# where given: PIP_EXTRA_INDEX_URL (a local package index holding some pins), PIP_CERT (a proxy's
# CA bundle).
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
# torch first, with its dependencies, from TORCH_INDEX_URL: by default PyTorch's CPU-only index
# (requirements.txt's pin, as its +cpu build); empty: pip's own index (the CUDA build, for the GPU
# image). TORCH, where given, replaces the pin: a CPU-only wheel file, as `make docker` passes one
# it finds on a machine that cannot reach PyTorch's index. captum's `torch>=` then finds it there.
# Last, torch's C++ test programs and headers go (~190 MB): nothing in the image runs them or
# compiles against torch.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
 && pip="/opt/venv/bin/pip install -q --no-cache-dir --disable-pip-version-check" \
 && $pip ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
      "${TORCH:-$(grep -E '^torch==' /tmp/requirements.txt)}" \
 && $pip $(grep -iE '^(torchserve|pyyaml|python-multipart|pillow|numpy|psutil|captum|onnxruntime)==' /tmp/requirements.txt) \
 && rm /tmp/requirements.txt \
 && cd /opt/venv/lib/python3*/site-packages/torch \
 && rm -rf test include bin/*[Tt]est* bin/protoc*
ENV PATH=/opt/venv/bin:$PATH
# Fail the build, not the first request, when the handler's imports are missing; the build log
# names the torch the image carries.
RUN python -c "import numpy, PIL, torch, yaml, onnxruntime, ts, captum, python_multipart" \
 && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

USER model-server
WORKDIR /home/model-server
# The archive: model_store/cifar10.mar, or the GPU one (`make docker IMAGE_TAG=gpu` passes it).
ARG MAR=model_store/cifar10.mar
COPY --chown=model-server deploy/docker/config.properties /home/model-server/config.properties
# The repo's logging: each line once, in rotated files under logs/, and at info on standard
# output, where `docker logs` and `kubectl logs` read it.
COPY --chown=model-server log4j2.xml /home/model-server/log4j2.xml
ENV TS_STDOUT_LOG_LEVEL=info
COPY --chown=model-server ${MAR} /home/model-server/model-store/cifar10.mar

# Inference, management (token-protected), metrics: deploy/docker/config.properties.
EXPOSE 8080 8081 8082

# In the foreground the container lives and dies with the server, and a restart policy
# (Kubernetes', `docker run --restart`) brings it back. --ncs: no config snapshots written or
# restored. `make docker-stop` (and the Deployment's preStop) run `torchserve --stop` inside:
# the launcher, PID 1 here, ignores SIGTERM.
CMD ["torchserve", "--start", "--foreground", "--ncs", \
     "--ts-config", "/home/model-server/config.properties", \
     "--log-config", "/home/model-server/log4j2.xml", \
     "--models", "cifar10=cifar10.mar"]
