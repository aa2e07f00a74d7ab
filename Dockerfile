# tumorseg image: the CLI and the HTTP service (`tumorseg serve`) on a slim CPU base, installed
# through the same constraints file as `make venv` (pinned torch first, then the tested set).
#
# Serve the champion from a mounted MLflow store (default target). The service binds 0.0.0.0, so it
# needs bearer tokens (`tumorseg token create NAME` writes .tumorseg/tokens.json) or --insecure:
#   docker build -t tumorseg .
#   docker run --rm -p 8000:8000 -v "$PWD/mlruns:/app/mlruns:ro" -v "$PWD/.tumorseg:/app/.tumorseg:ro" tumorseg
# Serve any model: a mounted model folder or checkpoint, or a tracking server:
#   docker run --rm -p 8000:8000 -v "$PWD/export/champion:/model:ro" tumorseg \
#       tumorseg serve --host 0.0.0.0 --port 8000 --model /model
#   docker run --rm -p 8000:8000 -e MLFLOW_TRACKING_URI=http://mlflow:5000 tumorseg
# Bake a model into the image (an MLflow model folder, e.g. exported with
#   MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db mlflow artifacts download -u models:/tumorseg@champion -d export/champion):
#   docker build --target baked --build-arg MODEL_DIR=export/champion -t tumorseg:champion .
# Run the pipeline instead of the service:
#   docker run --rm -v "$PWD/data:/app/data" -v "$PWD/mlruns:/app/mlruns" tumorseg dvc repro
#
# GPU image: build on a CUDA base and take torch from the CUDA wheel index, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t tumorseg:cuda .
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- runtime: the installed package
FROM ${BASE_IMAGE} AS runtime

ARG TORCH_VERSION=2.13.0
# CPU wheels: PyPI's Linux torch wheel pulls gigabytes of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLBACKEND=Agg \
    PREFECT_HOME=/app/.prefect \
    MLFLOW_DISABLE_TELEMETRY=true

RUN apt-get update \
    && apt-get install -y --no-install-recommends git python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Same order as the Makefile and the README: pinned torch first, then everything through constraints.txt.
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY pipelines ./pipelines
RUN python -m pip install --upgrade "pip>=24" setuptools wheel \
    && python -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && python -m pip install -c constraints.txt .

COPY params.yaml dvc.yaml dvc.lock ./
COPY .dvc/config .dvc/config

RUN useradd --create-home tumorseg && chown -R tumorseg /app
USER tumorseg

EXPOSE 8000
# CUDA base images set an entrypoint script; the commands below are the whole command line.
ENTRYPOINT []
# Healthy once the model is loaded and /health answers (no curl in a slim image: Python's urllib).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=8).status == 200 else 1)"]

# ---------------------------------------------------------------- baked: a model folder inside the image
FROM runtime AS baked
ARG MODEL_DIR
COPY --chown=tumorseg ${MODEL_DIR} /app/model
CMD ["tumorseg", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/app/model"]

# ---------------------------------------------------------------- serve (default): model from params.yaml / --model
FROM runtime AS serve
CMD ["tumorseg", "serve", "--host", "0.0.0.0", "--port", "8000"]
