# Prefect worker of the team stack: the project itself, serving its deployments (retrain, rollout,
# fleet-health) against the stack's Prefect server and running their flow runs (CPU build of
# PyTorch; use a CUDA base image for GPUs). Its fleet is the compose boards (infra/fleet.compose.yaml).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git openssh-client make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/nativelm
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN pip install --no-cache-dir -c constraints.txt -e .
COPY . .
RUN python infra/docker/compose_params.py params.yaml
