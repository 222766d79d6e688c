# syntax=docker/dockerfile:1.7
# AEIC receiver: the API (`aeic-receiver serve`) and the GPU decode worker (`aeic-receiver worker`).
# Build from the repository root:  docker build -f deploy/docker/receiver.Dockerfile -t aeic-receiver .
# torch from PyPI is the CUDA build on linux/amd64 (it brings its own CUDA libraries as wheels); the
# CUDA runtime base supplies the rest of the user-space stack and the NVIDIA container toolkit hooks.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM python:3.12.12-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY aeic ./aeic
COPY shared ./shared
COPY sender ./sender
COPY receiver ./receiver
COPY codec ./codec
COPY training ./training
COPY evaluation ./evaluation
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Ubuntu's python3 (3.12 on 24.04) follows the pinned base image tag; rebuild to pick up its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# The largest layer first, so that code changes do not invalidate it.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY --from=wheel /wheels /tmp/wheels
# onnx + onnxscript: `aeic export` and the demo's provisioning of a model package.
RUN pip install --constraint /tmp/constraints.txt "$(ls /tmp/wheels/aeic-*.whl)[receiver,scale]" onnx onnxscript \
    && rm -rf /tmp/wheels /tmp/constraints.txt
COPY --chmod=0755 deploy/docker/provision.sh /usr/local/bin/aeic-provision
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/aeic aeic \
    && install -d -o aeic -g aeic /models /secrets /opt/aeic/shipped
USER 10001:10001
WORKDIR /var/lib/aeic
ENV AEIC_MODEL=/models/current \
    AEIC_DATA_DIR=/var/lib/aeic/data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["aeic-receiver", "serve", "--host", "0.0.0.0", "--port", "8000"]
