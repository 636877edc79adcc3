# syntax=docker/dockerfile:1.7
# Services image (describer, scorers, pair builder, sampler, trainer CLI). The Triton and CUDA
# trainer images are separate targets added with the deployment work (deploy/k8s/).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/spr
COPY pyproject.toml constraints.txt README.md ./
COPY protos ./protos
COPY services ./services
COPY trainer ./trainer
# torch first (CPU wheel; override TORCH_SPEC for CUDA), then everything else in one resolver run.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN /opt/spr/bin/pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
 && /opt/spr/bin/pip install -c constraints.txt .

FROM ${PYTHON_IMAGE} AS services
RUN groupadd --system --gid 10001 spr && useradd --system --uid 10001 --gid spr --home /home/spr spr
COPY --from=build /opt/spr /opt/spr
ENV PATH=/opt/spr/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /home/spr
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
  CMD ["python", "-c", "import socket,os; socket.create_connection(('127.0.0.1', int(os.environ.get('SPR_GRPC_PORT', '50051'))), 2)"]
ENTRYPOINT ["python", "-m"]
