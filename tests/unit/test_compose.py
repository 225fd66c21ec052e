"""The team stack (docker-compose.yml): it cannot run here (no Docker engine), so check what can be
checked without one: files and build contexts exist, clients point at the servers and ports that
exist, credentials agree, the boards are wired so the private key never reaches one, the boards'
inventory loads through the project's schema, and the stack's scripts do what they say."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from nativelm.fleet.inventory import load_inventory
from nativelm.params.root import load_params

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "infra" / "docker"
BOARDS = ("board-1", "board-2", "board-3")


def with_defaults(text: str) -> str:
    """The compose file as `docker compose` reads it with no .env: every ${VAR:-default} is its default."""
    text = re.sub(r"(?<!\$)\$\{\w+:-([^}]*)\}", r"\1", text)
    bare = re.findall(r"(?<!\$)\$\{?\w+", text)
    assert not bare, f"variables without a default: {bare}"
    return text


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(with_defaults((REPO / "docker-compose.yml").read_text()))


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def inventory_raw() -> dict:
    return yaml.safe_load((REPO / "infra" / "fleet.compose.yaml").read_text())


def mounts(service: dict) -> dict[str, str]:
    """container path -> source (volume name or ./path), with ':ro' kept on the target's side."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":", 1)
        out[target] = source
    return out


def dockerfile_lines(path: Path) -> list[str]:
    """Instructions of a Dockerfile, continuation lines joined."""
    return [line.strip() for line in path.read_text().replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_services_build_from_files_that_exist(services: dict, compose: dict) -> None:
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker", "fleet-keys", *BOARDS} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = REPO / build["context"]
            dockerfile = context / build["dockerfile"]
            assert context.is_dir() and dockerfile.is_file(), name
            for line in dockerfile_lines(dockerfile):
                if line.startswith("COPY "):
                    *sources, _ = shlex.split(line)[1:]
                    for source in sources:
                        assert source == "." or (context / source).exists(), f"{name}: {line}"
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for target, source in mounts(service).items():
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def test_worker_build_context_leaves_local_state_out() -> None:
    ignored = (DOCKER / "worker.Dockerfile.dockerignore").read_text().split()
    assert {".venv/", ".nativelm/", "test-artifacts/"} <= set(ignored)
    assert ".git" not in ignored and ".git/" not in ignored  # DVC needs the repository


def test_clients_point_at_the_servers_and_ports_that_exist(services: dict) -> None:
    worker = services["worker"]["environment"]
    api = urlsplit(worker["PREFECT_API_URL"])
    assert (api.hostname, api.path) == ("prefect-server", "/api")
    assert f"{api.port}:{api.port}" in services["prefect-server"]["ports"]
    tracking = urlsplit(worker["MLFLOW_TRACKING_URI"])
    assert tracking.hostname == "mlflow"
    assert f"--port {tracking.port}" in services["mlflow"]["command"]
    assert f"mlflow:{tracking.port}" in services["mlflow"]["command"]  # --allowed-hosts lets the worker in
    minio = services["minio"]["environment"]
    for name in ("mlflow", "worker"):
        env = services[name]["environment"]
        endpoint = urlsplit(env["MLFLOW_S3_ENDPOINT_URL"])
        assert endpoint.hostname == "minio" and f"{endpoint.port}:{endpoint.port}" in services["minio"]["ports"], name
        assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"], name
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]), name
    assert "s3://mlflow" in services["mlflow"]["command"] and "local/mlflow" in services["buckets"]["command"][0]


def test_database_urls_name_the_postgres_service_and_carry_no_password(services: dict) -> None:
    db = services["postgres"]["environment"]
    created = re.findall(r"CREATE DATABASE (\w+);", (DOCKER / "postgres-init.sql").read_text())
    urls = {"mlflow": services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"],
            "prefect-server": services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]}
    drivers = {"mlflow": "postgresql+psycopg2", "prefect-server": "postgresql+asyncpg"}
    for name, url in urls.items():
        parts = urlsplit(url)
        assert (parts.scheme, parts.hostname, parts.port) == (drivers[name], "postgres", 5432), name
        assert parts.username == db["POSTGRES_USER"] and parts.password is None, name
        assert parts.path.lstrip("/") in created, name
        assert services[name]["environment"]["PGPASSWORD"] == db["POSTGRES_PASSWORD"], name
        assert db["POSTGRES_PASSWORD"] not in str(services[name].get("command", "")), name
    assert "psycopg2-binary" in (DOCKER / "mlflow.Dockerfile").read_text()


def test_boards_have_their_own_host_key_and_never_the_controller_key(services: dict) -> None:
    worker = mounts(services["worker"])
    assert worker["/run/nativelm/fleet"] == "fleet-controller"
    assert worker["/run/nativelm/pins:ro"] == "fleet-pins"  # the worker reads pins, cannot forge them
    keys = mounts(services["fleet-keys"])
    assert keys["/run/nativelm/fleet"] == "fleet-controller" and keys["/run/nativelm/authorized"] == "fleet-authorized"
    hostkey_volumes = set()
    for name in BOARDS:
        board = services[name]
        assert board["build"]["dockerfile"] == "board.Dockerfile"
        assert board["environment"]["BOARD_NAME"] == board["hostname"] == name
        assert board["depends_on"]["fleet-keys"]["condition"] == "service_completed_successfully"
        volumes = mounts(board)
        assert "fleet-controller" not in volumes.values(), f"{name} must not see the controller's private key"
        assert volumes["/run/nativelm/authorized:ro"] == "fleet-authorized"
        assert volumes["/run/nativelm/pins"] == "fleet-pins"
        hostkey_volumes.add(volumes["/var/lib/nativelm-board"])
        assert name in services["worker"]["depends_on"]
    assert len(hostkey_volumes) == len(BOARDS)  # one host key per board


def test_board_image_paths_agree_between_dockerfile_entrypoint_sshd_and_scripts() -> None:
    dockerfile = (DOCKER / "board.Dockerfile").read_text()
    entrypoint = (DOCKER / "board-entrypoint.sh").read_text()
    sshd = dict(line.split(None, 1) for line in (DOCKER / "board-sshd.conf").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert f"key={sshd['HostKey']}\n" in entrypoint and sshd["HostKey"].startswith("/var/lib/nativelm-board/")
    assert sshd["AuthorizedKeysFile"] == "/etc/ssh/authorized_keys/%u" and "/etc/ssh/authorized_keys/nativelm" in entrypoint
    assert (sshd["AllowUsers"], sshd["PasswordAuthentication"], sshd["PermitRootLogin"]) == ("nativelm", "no", "no")
    assert "useradd --create-home --shell /bin/bash nativelm" in dockerfile and "EXPOSE 22" in dockerfile
    assert "python3-venv" in dockerfile and "rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*" in dockerfile
    assert "controller_pub=/run/nativelm/authorized/controller.pub" in entrypoint
    assert 'authorized=/run/nativelm/authorized' in (DOCKER / "fleet-keys.sh").read_text()


def test_inventory_boards_are_the_compose_boards(services: dict, inventory_raw: dict) -> None:
    boards = inventory_raw["boards"]
    assert [b["host"] for b in boards] == [b["name"] for b in boards] == list(BOARDS)
    assert all(b["port"] == 22 and b["user"] == "nativelm" for b in boards)
    assert [b["name"] for b in boards if "canary" in b["groups"]] == ["board-1"]
    controller_dir = next(t for t, s in mounts(services["worker"]).items() if s == "fleet-controller")
    assert Path(inventory_raw["known_hosts"]).parent == Path(controller_dir)
    assert {Path(b["key"]).parent for b in boards} == {Path(controller_dir)}
    assert "id_ed25519" in (DOCKER / "fleet-keys.sh").read_text() and all(b["key"].endswith("/id_ed25519") for b in boards)


def test_inventory_loads_through_the_fleet_schema(inventory_raw: dict, tmp_path: Path) -> None:
    # known_hosts lives in the worker's volume: point a copy at an empty local file to load the rest
    (tmp_path / "known_hosts").write_text("")
    copy = tmp_path / "fleet.compose.yaml"
    copy.write_text(yaml.safe_dump({**inventory_raw, "known_hosts": "known_hosts"}))
    inventory = load_inventory(copy)
    assert [(b.name, b.address, b.user, b.python) for b in inventory.boards] == [
        (name, name, "nativelm", "python3") for name in BOARDS]
    assert inventory.groups == ["canary"]
    assert inventory.key_path(inventory.boards[0]) == Path("/run/nativelm/fleet/id_ed25519")


def test_worker_params_point_at_the_compose_inventory_and_change_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "params.yaml"
    target.write_bytes((REPO / "params.yaml").read_bytes())
    done = subprocess.run([sys.executable, str(DOCKER / "compose_params.py"), str(target)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    before, after = load_params(REPO / "params.yaml"), load_params(target)
    assert after.fleet.inventory == "infra/fleet.compose.yaml"
    assert after.model_dump() == before.model_copy(
        update={"fleet": before.fleet.model_copy(update={"inventory": "infra/fleet.compose.yaml"})}).model_dump()
    assert (REPO / after.fleet.inventory).is_file()
    assert "RUN python infra/docker/compose_params.py params.yaml" in (DOCKER / "worker.Dockerfile").read_text()


def publish(pins: Path, board: str, tmp_path: Path) -> str:
    """What a board's entrypoint publishes: `board ssh-ed25519 AAAA...` for a fresh host key."""
    key = tmp_path / f"{board}-{len(list(tmp_path.iterdir()))}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    line = f"{board} {' '.join(key.with_suffix('.pub').read_text().split()[:2])}\n"
    (pins / f"{board}.known_hosts").write_text(line)
    return line


def pin_boards(pins: Path, known_hosts: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(DOCKER / "pin-boards.sh"), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PINS_DIR": str(pins), "KNOWN_HOSTS": str(known_hosts)})


def test_pin_boards_pins_only_when_asked_and_refuses_a_changed_key(tmp_path: Path) -> None:
    pins, known_hosts = tmp_path / "pins", tmp_path / "known_hosts"
    pins.mkdir()
    known_hosts.write_text("")
    assert pin_boards(pins, known_hosts).returncode == 1  # nothing published yet
    lines = [publish(pins, board, tmp_path) for board in ("board-1", "board-2")]

    shown = pin_boards(pins, known_hosts)
    assert shown.returncode == 0 and shown.stdout.count("not pinned yet") == 2 and known_hosts.read_text() == ""
    assert "SHA256:" in shown.stdout
    assert pin_boards(pins, known_hosts, "--yes").returncode == 0
    assert known_hosts.read_text() == "".join(lines)
    again = pin_boards(pins, known_hosts, "--yes")
    assert again.stdout.count("already pinned") == 2 and known_hosts.read_text() == "".join(lines)

    publish(pins, "board-2", tmp_path)  # board-2 now shows another key
    changed = pin_boards(pins, known_hosts, "--yes")
    assert changed.returncode == 1 and "board-2: publishes ssh-ed25519" in changed.stderr and "refused" in changed.stderr
    assert known_hosts.read_text() == "".join(lines)  # never replaced
