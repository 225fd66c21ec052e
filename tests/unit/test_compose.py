"""The team stack file: it cannot run here (no Docker engine), so check what can be checked statically."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_parses_and_build_files_exist() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (REPO / build["context"]).is_dir(), name
            assert (REPO / build["context"] / build["dockerfile"]).is_file(), name
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source}"


def test_clients_point_at_the_servers_they_expect() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    worker_env = services["worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "5000:5000" in services["mlflow"]["ports"] and "4200:4200" in services["prefect-server"]["ports"]
    assert "postgresql" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "postgresql+asyncpg" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
