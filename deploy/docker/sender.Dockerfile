# syntax=docker/dockerfile:1.7
# AEIC edge sender (`aeic-send`): slim, no torch, linux/amd64 and linux/arm64.
#   docker buildx build --platform linux/amd64,linux/arm64 -f deploy/docker/sender.Dockerfile -t aeic-sender .
# constriction publishes no Linux aarch64 wheel and no source distribution on PyPI, so on arm64 it is
# built from its release tag with the Rust toolchain (stage constriction-arm64); amd64 uses the PyPI wheel.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CONSTRICTION_VERSION=0.5.0
ARG TARGETARCH

FROM --platform=$BUILDPLATFORM ${PYTHON_IMAGE} AS wheel
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

# Sample photographs for the simulated edge device: a few of the images scikit-image bundles.
FROM --platform=$BUILDPLATFORM ${PYTHON_IMAGE} AS samples
ARG SKIMAGE_VERSION=0.26.0
RUN pip download --no-cache-dir --no-deps --only-binary=:all: --dest /tmp/dl "scikit-image==${SKIMAGE_VERSION}" \
    && python -c "import glob, os, zipfile; z = zipfile.ZipFile(glob.glob('/tmp/dl/*.whl')[0]); os.makedirs('/samples'); [open('/samples/' + n, 'wb').write(z.read('skimage/data/' + n)) for n in ('astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg', 'motorcycle_left.png')]" \
    && rm -rf /tmp/dl

FROM ${PYTHON_IMAGE} AS constriction-amd64
ARG CONSTRICTION_VERSION
RUN pip download --no-cache-dir --no-deps --only-binary=:all: --dest /wheels "constriction==${CONSTRICTION_VERSION}"

FROM rust:1.91.1-slim-bookworm AS constriction-arm64
ARG CONSTRICTION_VERSION
ARG MATURIN_VERSION=1.9.6
# Debian bookworm's python3 is 3.11, the same minor version (and ABI) as the runtime image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/maturin \
    && /opt/maturin/bin/pip install --no-cache-dir "maturin==${MATURIN_VERSION}"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN git clone --quiet https://github.com/bamler-lab/constriction.git /src
WORKDIR /src
# The release tag that ends in the version (v0.5.0 or 0.5.0); fail loudly when there is none.
RUN tag="$(git tag --list | grep -E "^v?${CONSTRICTION_VERSION}\$" | head -n 1)" \
    && test -n "$tag" \
    && git checkout --quiet "$tag" \
    && /opt/maturin/bin/maturin build --release --strip --features pybindings --interpreter python3 --out /wheels

# hadolint ignore=DL3006
FROM constriction-${TARGETARCH} AS constriction

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY --from=constriction /wheels /tmp/wheels/constriction
COPY --from=wheel /wheels /tmp/wheels/aeic
RUN pip install /tmp/wheels/constriction/*.whl \
    && pip install --constraint /tmp/constraints.txt "$(ls /tmp/wheels/aeic/aeic-*.whl)[sender,camera]" \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && rm -rf /tmp/wheels /tmp/constraints.txt
COPY --from=samples /samples /opt/aeic/samples
COPY --chmod=0755 deploy/docker/edge-sim.sh /usr/local/bin/aeic-edge-sim
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/aeic-sender aeic
USER 10001:10001
WORKDIR /var/lib/aeic-sender
ENV AEIC_MODEL=/models/current
CMD ["aeic-send", "--help"]
