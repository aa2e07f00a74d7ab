# tumorseg image: the pipeline and CLI on a slim CPU base, installed through the same
# constraints file as `make run` (torch first and pinned, then the tested set).
#
#   docker build -t tumorseg .
#   docker run --rm -v "$PWD/data:/app/data" -v "$PWD/mlruns:/app/mlruns" tumorseg dvc repro
#
# GPU image: build on a CUDA base and take torch from the CUDA wheel index, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t tumorseg:cuda .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLBACKEND=Agg \
    PREFECT_HOME=/app/.prefect

RUN apt-get update \
    && apt-get install -y --no-install-recommends git python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Same order as the Makefile: pinned torch first, then everything through constraints.txt.
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY pipelines ./pipelines
RUN pip install --upgrade "pip>=24" setuptools wheel \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install -c constraints.txt .

COPY params.yaml dvc.yaml dvc.lock ./
COPY .dvc/config .dvc/config

RUN useradd --create-home tumorseg && chown -R tumorseg /app
USER tumorseg

HEALTHCHECK --interval=30s --timeout=10s --retries=3 CMD ["tumorseg", "--help"]
ENTRYPOINT []
CMD ["tumorseg", "--help"]
