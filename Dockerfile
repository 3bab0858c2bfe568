# The lora-flow image for the Docker and Kubernetes work pools (prefect.yaml builds and pushes it):
#   docker build -t lora-flow .                          # CPU torch (default)
#   docker build -t lora-flow:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# CUDA torch wheels carry their own CUDA runtime (nvidia-* wheels), so the slim Python base serves GPUs too: the
# host only needs the NVIDIA driver plus the container toolkit (Docker) or device plugin (Kubernetes).
# BASE_IMAGE swaps the base, e.g. an nvidia/cuda devel image for kernels compiled at run time; it must have
# python3.11 and pip on PATH.
# Every package is installed with constraints.txt, the pins CI runs with (tests/unit/test_work_pools.py checks).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# CPU wheels by default; cu128 (or another index of download.pytorch.org) for GPUs. `torch==2.13.0` in
# constraints.txt accepts the index's local builds (2.13.0+cpu, 2.13.0+cu128).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/opt/lora-flow/.cache/huggingface

# prefect.yaml's pull step sets this same folder as the working directory of every flow run
WORKDIR /opt/lora-flow

# dependencies first, so editing the code does not reinstall torch
COPY pyproject.toml constraints.txt README.md ./
RUN python -m pip install -c constraints.txt --index-url "${TORCH_INDEX}" torch \
 && mkdir -p lora_core tasks flows ops \
 && touch lora_core/__init__.py tasks/__init__.py flows/__init__.py ops/__init__.py \
 && python -m pip install -c constraints.txt -e . \
 && rm -rf lora_core tasks flows ops

COPY lora_core lora_core
COPY tasks tasks
COPY flows flows
COPY ops ops
COPY recipes recipes
COPY data data
COPY mlflow mlflow

# outputs/ (stage outputs, checkpoints, Prefect results) and .cache/ (converted base model) are volumes in
# prefect.yaml: they outlive the container, so a retried or re-run flow resumes and hits its caches
RUN mkdir -p outputs .cache
CMD ["lora-flow", "--help"]
