# Prefect worker that runs nativelm's flows (CPU build of PyTorch; use a CUDA base image for GPUs).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git openssh-client make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/nativelm
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN pip install --no-cache-dir -c constraints.txt -e .
COPY . .
