# syntax=docker/dockerfile:1.7
# Three images from one file (`docker build --target NAME`); deploy/k8s names them in `images:`.
#
#   services  slim Python + CPU PyTorch: describer, scorers, stages, pair builder, sampler, admin
#   cuda      slim Python + CUDA PyTorch (the wheel bundles the CUDA libraries; the node gives the
#             driver): the DPO trainer CronJob and the GPU scorers of the gpu-prod overlay
#   triton    NVIDIA tritonserver 24.10 (Triton 2.51) + the policy model repository (python backend)
#
# Every install goes through constraints.txt (numpy 1.26, protobuf 6.33.6, pyarrow 21 ...), so the
# images run exactly the versions the tests ran. Base images are pinned by version (written out in
# each FROM so that linters see them); a mirror may add @sha256 digests.

ARG TORCH_VERSION=2.13.0

# --- build stages: a venv in /opt/spr, built where compilers may exist, copied into slim runtimes ------

FROM python:3.11.14-slim-bookworm AS venv-base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/spr
COPY pyproject.toml constraints.txt README.md ./
COPY protos ./protos
COPY services ./services
COPY trainer ./trainer

FROM venv-base AS build-cpu
ARG TORCH_VERSION
# torch first and alone (CPU wheel), then the project and everything else in one resolver run.
RUN /opt/spr/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
      "torch==${TORCH_VERSION}" \
 && /opt/spr/bin/pip install --no-cache-dir -c constraints.txt .

FROM venv-base AS build-cuda
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
RUN /opt/spr/bin/pip install --no-cache-dir --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}" \
 && /opt/spr/bin/pip install --no-cache-dir -c constraints.txt .

# --- runtime: services (CPU) -----------------------------------------------------------------------

FROM python:3.11.14-slim-bookworm AS services
LABEL org.opencontainers.image.title="spr-online services" \
      org.opencontainers.image.source="deploy/k8s" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 spr \
 && useradd --system --uid 10001 --gid spr --home-dir /home/spr --create-home spr
COPY --from=build-cpu /opt/spr /opt/spr
# Read-only root filesystem in Kubernetes: no .pyc writes; caches and scratch go to mounted volumes.
ENV PATH=/opt/spr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/var/cache/spr/hf \
    SPR_MODEL_CACHE=/var/cache/spr/tiny-models \
    SPR_HEALTH_PORT=9461
USER 10001:10001
WORKDIR /home/spr
# gRPC ports (describer, admin, localization, semantic) and their metrics ports.
EXPOSE 50061 50071 50081 50091 9461 9471 9481 9491
# Every process serves Prometheus metrics; SPR_HEALTH_PORT names the port of the command run (the
# describer's by default; e.g. 9462 for spr-describer-stage). Kubernetes ignores HEALTHCHECK and
# uses the gRPC/HTTP probes of deploy/k8s instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['SPR_HEALTH_PORT'], timeout=4)"]
CMD ["spr-describer"]

# --- runtime: CUDA PyTorch (trainer, GPU scorers) --------------------------------------------------

FROM python:3.11.14-slim-bookworm AS cuda
LABEL org.opencontainers.image.title="spr-online CUDA (trainer, GPU scorers)" \
      org.opencontainers.image.source="deploy/k8s" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 spr \
 && useradd --system --uid 10001 --gid spr --home-dir /home/spr --create-home spr
COPY --from=build-cuda /opt/spr /opt/spr
ENV PATH=/opt/spr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/var/cache/spr/hf \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/spr
# A trainer round is a batch process without a port: healthy = the interpreter and torch import.
HEALTHCHECK --interval=60s --timeout=30s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import torch, trainer.config"]
ENTRYPOINT ["spr-trainer"]
CMD ["--help"]

# --- runtime: Triton with the policy MLLM ----------------------------------------------------------
# Triton 24.10's system Python is 3.10, the project needs 3.11 (pandas 3), so the policy runs in a
# Python 3.11 venv with the python-backend stub built for 3.11 and Triton 2.51; the nvidia-pytriton
# wheel (pinned in constraints.txt) ships exactly that stub. triton_python_backend_utils of 2.51
# needs numpy < 2, which constraints.txt keeps (numpy 1.26).

FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS triton
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Not version-pinned on purpose: jammy-updates keeps only the latest security build of python3.11,
# so an exact pin breaks the build at the next security update; the base image tag pins the distro.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 spr \
 && useradd --system --uid 10001 --gid spr --home-dir /home/spr --create-home spr
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY protos ./protos
COPY services ./services
COPY trainer ./trainer
RUN python3.11 -m venv /opt/spr \
 && /opt/spr/bin/pip install --no-cache-dir --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}" \
 && /opt/spr/bin/pip install --no-cache-dir -c constraints.txt ".[devstack]" \
 && mkdir -p /models \
 && cp -r services/policy/model_repository/spr_policy /models/spr_policy \
 && cp /opt/spr/lib/python3.11/site-packages/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub \
      /models/spr_policy/triton_python_backend_stub \
 && rm -rf /src
WORKDIR /home/spr
# model.py puts PYTHONPATH on sys.path: the stub then imports torch, transformers and `services`.
ENV PYTHONPATH=/opt/spr/lib/python3.11/site-packages \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/var/cache/spr/hf
USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["tritonserver", "--model-repository=/models", "--strict-readiness=true"]
