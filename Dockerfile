# syntax=docker/dockerfile:1.7
# Image for the pipeline's flows (Prefect docker-cpu / docker-gpu work pools, `python -m flows`).
#
#   docker build -t lakehouse-seq2seq .                                   # public base, CPU torch
#   docker build --build-arg TORCH_FLAVOUR=cu128 -t lakehouse-seq2seq:cu128 .   # CUDA torch
#   deployments/engine/build-image.sh                                     # podman, offline base
#
# Nothing machine-specific is baked in: package-index settings may be handed to the pip steps
# as build secrets, which never land in a layer or in the image history:
#   --secret id=pipconf,src=pip.conf   (index-url, extra-index-url, find-links, ...)
#   --secret id=cacert,src=ca.pem      (CA bundle; the pip.conf then says cert=/run/secrets/cacert)
# deployments/engine/build-image.sh writes both from this machine's own pip configuration.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# The dependency list alone, so that edits elsewhere in pyproject.toml (version, tool settings)
# do not invalidate the big dependency layer below (COPY --from is cached by content).
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /requirements.txt

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

# cpu | cu126 | cu128 ...: which PyTorch wheel index torch comes from. Set TORCH_INDEX_URL to ""
# when torch (the constraints.txt pin) is reachable otherwise, e.g. a find-links folder.
ARG TORCH_FLAVOUR=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_FLAVOUR}

ARG PIP_VERSION=26.2.1

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# python3 is /usr/local/bin/python3 on the public image and /usr/bin/python3 on Debian's.
RUN --mount=type=secret,id=pipconf,target=/run/secrets/pipconf \
    --mount=type=secret,id=cacert,target=/run/secrets/cacert \
    python3 -m venv /opt/venv \
 && PIP_CONFIG_FILE=/run/secrets/pipconf /opt/venv/bin/pip install --no-cache-dir "pip==${PIP_VERSION}"
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# 1) Dependencies only: this layer (the big one) is rebuilt only when the pins change.
# Wheels are collected in a wheelhouse on the build cache mount first (one per torch flavour,
# since 2.13.0+cpu and 2.13.0+cu128 both satisfy torch==2.13.0), then installed from there
# without an index: `pip wheel` skips files it already holds and sdists (pyspark) are built
# once, so a re-build after a pin change downloads only what changed, even from indexes whose
# responses carry no HTTP caching headers (pip's own HTTP cache then stores nothing).
COPY constraints.txt ./
COPY --from=requirements /requirements.txt ./
RUN --mount=type=cache,id=pip,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pipconf,target=/run/secrets/pipconf \
    --mount=type=secret,id=cacert,target=/run/secrets/cacert \
    export PIP_CONFIG_FILE=/run/secrets/pipconf \
 && wheels="/root/.cache/pip/wheelhouse-${TORCH_FLAVOUR}" \
 && pip wheel --wheel-dir "$wheels" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
      -c constraints.txt -r requirements.txt \
 && pip install --no-index --find-links "$wheels" -c constraints.txt -r requirements.txt

# 2) The project itself (flows, tasks, blocks, deployments) as a wheel, installed in the runtime
# stage: a code change then rebuilds a few small layers, not the copy of the whole venv.
COPY pyproject.toml ./
COPY flows/ flows/
COPY tasks/ tasks/
COPY blocks/ blocks/
COPY deployments/ deployments/
RUN --mount=type=cache,id=pip,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pipconf,target=/run/secrets/pipconf \
    --mount=type=secret,id=cacert,target=/run/secrets/cacert \
    PIP_CONFIG_FILE=/run/secrets/pipconf \
    pip wheel --no-deps --wheel-dir /dist -c constraints.txt .

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

# Java 17 for Spark, procps (`ps`) for Spark's launch scripts. Debian's base image built by
# deployments/engine/setup-podman.sh already has both, so this is a no-op there.
# DL3008 (pin apt versions) ignored: bookworm point and security releases remove the exact
# versions from the mirror, which would break every build of the public-base image.
# hadolint ignore=DL3008
RUN if ! command -v java >/dev/null || ! command -v ps >/dev/null; then \
      mkdir -p /usr/share/man/man1 \
      && apt-get update \
      && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# Non-root user; numeric USER below so that `runAsNonRoot` checks can verify it.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /bin/bash app \
 && install -d -o app -g app /opt/app

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/app \
    SPARK_LOCAL_IP=127.0.0.1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# DL3064 ignored: a false positive on the name (TOKENizers); the value is the constant `false`.
# hadolint ignore=DL3064
ENV TOKENIZERS_PARALLELISM=false

# Source tree (owned by root, read-only to `app`); /opt/app itself is writable by `app` so
# relative defaults (./lakehouse, ./mlruns, spark-warehouse) work; mount volumes there instead
# for anything that must outlive the container.
WORKDIR /opt/app
COPY pyproject.toml constraints.txt ./
COPY configs/ configs/
COPY data/ data/
COPY blocks/ blocks/
COPY deployments/ deployments/
COPY tasks/ tasks/
COPY flows/ flows/

COPY --from=builder /dist/ /tmp/dist/
RUN pip install --no-deps --no-index --no-cache-dir /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && pip check

USER 10001:10001

# No ENTRYPOINT: Prefect's docker worker sets the command (python -m prefect.engine).
CMD ["python", "-m", "flows", "--help"]
