# syntax=docker/dockerfile:1
#
# ExpertMesh container image: the `expertmesh` package and its CLI on python:3.11-slim. The
# Helm chart (charts/expertmesh) runs it as the KubeRay head, workers and autoscaler; KubeRay
# replaces the entrypoint with `ray start ...` there.
#
#   docker build -t expertmesh:0.1.0 .                                        # CPU torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t expertmesh:0.1.0-cu128 .  # CUDA 12.8 torch
#   docker run --rm expertmesh:0.1.0 --help
#
# The package is installed as the Makefile installs it: torch pinned and installed first (so
# that resolving the package's dependencies never pulls another torch build), then the package
# itself, here as a regular (non-editable) install, whose wheel build generates the protobuf
# stubs from protos/.

ARG PYTHON_VERSION=3.11

# ---- build: a virtual environment with torch, ray and the package --------------------------
FROM python:${PYTHON_VERSION}-slim AS build

# torch release, and its build: "cpu", or a CUDA build such as "cu126" or "cu128" (the
# PyTorch wheel index of that name).
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
# Ray release; keep it equal to the chart's ray.version (KubeRay's rayVersion).
ARG RAY_VERSION=2.60.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/expertmesh/bin:$PATH

RUN python -m venv /opt/expertmesh \
 && pip install --upgrade pip setuptools wheel

RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

# setup.py runs protoc (grpcio-tools) while it builds the wheel, so the wheel is built in this
# environment (--no-build-isolation) rather than in an isolated one that lacks grpcio-tools.
RUN pip install "grpcio-tools>=1.66" "ray[train,serve]==${RAY_VERSION}"

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY services ./services
COPY platform ./platform
RUN pip install --no-build-isolation . \
 && cd / \
 && python -c "from expertmesh.protos import load; load('tensor_pb2')" \
 && expertmesh --help > /dev/null

# ---- runtime -------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim

LABEL org.opencontainers.image.title="expertmesh" \
      org.opencontainers.image.description="Train and serve DeepSeek-V3-style MoE models on a Ray cluster" \
      org.opencontainers.image.licenses="Apache-2.0"

# wget: KubeRay's liveness/readiness probes call it inside Ray containers.
# g++: DeepSpeed compiles its CPU communication op on first use (CPU training).
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget g++ \
 && rm -rf /var/lib/apt/lists/*

# Non-root user; uid/gid 1000 is what the chart's ray.podSecurityContext runs as.
RUN groupadd --gid 1000 expertmesh \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash expertmesh

COPY --from=build /opt/expertmesh /opt/expertmesh

ENV PATH=/opt/expertmesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EXPERTMESH_HOME=/home/expertmesh/.expertmesh

USER expertmesh
WORKDIR /home/expertmesh

# Serve HTTP, Ray dashboard, Ray client, GCS (head).
EXPOSE 8000 8265 10001 6379

ENTRYPOINT ["expertmesh"]
CMD ["--help"]
