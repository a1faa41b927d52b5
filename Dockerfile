# flowspeed on NVIDIA GPUs: the image the Kubernetes templates (deploy/k8s/, `flowspeed k8s template`) run.
#   docker build -t REGISTRY/flowspeed:0.1.0 .
# The install is the README's (Install): the pinned builds of constraints.txt plus the `gpu` extra
# (nvidia-ml-py: GPU utilisation and memory in MLflow's system metrics). torch's CUDA runtime comes with its
# wheels; the base image gives the CUDA user-space the driver pairs with. Ascend NPUs: deploy/docker/Dockerfile.ascend.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's Python (3.12) in a venv (PEP 668 forbids installing into the system one); git for Prefect's pull steps.
# Versions are left to the base image's release: pinning Ubuntu package builds breaks once the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# The source stays in the image: Prefect deployments load their flows from files (flows/stages.py:train), so
# `prefect deploy` is run from here (its pull step records this directory).
WORKDIR /opt/flowspeed
COPY . .
RUN pip install -c constraints.txt '.[gpu]'

# Pods run `flowspeed ...` or Prefect's `prefect flow-run execute` in the shared volume (the templates set the
# working directory); nothing is written into the image at run time.
CMD ["flowspeed", "--help"]
