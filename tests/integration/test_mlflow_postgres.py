"""MLflow (and Prefect) on a real PostgreSQL: the team stack's backends (docker-compose.yml), run here without Docker.

A throwaway PostgreSQL cluster (Debian's `postgresql` package: initdb + pg_ctl, password auth on a
free loopback port) gets its databases from the compose stack's own init script; an MLflow server
uses it as backend store, the way the compose `mlflow` service does (URI without the password,
which comes from PGPASSWORD). The project's tracking code logs a run and registers a version with
an alias; both are read back through MLflow and found in PostgreSQL's own tables. A Prefect server
on the same cluster (asyncpg, password from PGPASSWORD as in the compose file) stores a flow there.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nativelm.stack.process import BackgroundProcess, wait_http
from nativelm.stack.services import mlflow_service, prefect_service
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PG_USER = "nativelm"  # the compose stack's POSTGRES_USER default
INIT_SQL = REPO / "infra" / "docker" / "postgres-init.sql"


def pg_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else from Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} not found: install Debian's postgresql (`bash infra/setup.sh dev` as root)")
    return found


def as_cluster_owner() -> list[str]:
    """Command prefix running a program as the cluster's owner: PostgreSQL refuses to run as root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass(frozen=True)
class Postgres:
    """A running throwaway cluster reachable on loopback with password authentication."""

    port: int
    password: str
    host: str = "127.0.0.1"

    def uri(self, database: str, driver: str = "psycopg2") -> str:
        """SQLAlchemy URI without the password (libpq and asyncpg read it from PGPASSWORD). The driver
        is named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, MLflow's image ships psycopg2."""
        return f"postgresql+{driver}://{PG_USER}@{self.host}:{self.port}/{database}"

    @property
    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}


def run_quiet(argv: list[str], env: dict[str, str] | None = None) -> None:
    """Run a setup command; on failure fail the test with its output (it never holds the password)."""
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv[:6])} failed ({done.returncode}): {(done.stderr or done.stdout)[-800:]}")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """initdb + pg_ctl start on a free port in a temporary folder; stopped and removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="nativelm-pg-"))  # not under pytest's 0700 root-only tmp
    data, pwfile = root / "data", root / "pwfile"
    password = secrets.token_urlsafe(18)
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
    server = Postgres(port=free_port(), password=password)
    owner = as_cluster_owner()
    run_quiet([*owner, pg_bin("initdb"), "-D", str(data), "-U", PG_USER, "--pwfile", str(pwfile),
               "--auth", "scram-sha-256", "-E", "UTF8", "--no-sync"])
    pwfile.unlink()
    options = f"-p {server.port} -k {root} -c listen_addresses={server.host} -c fsync=off"
    run_quiet([*owner, pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "postgres.log"),
               "-w", "-t", "60", "start"])
    try:
        # the compose stack's init script creates its databases (mlflow, prefect): prove it here
        run_quiet(["psql", "-v", "ON_ERROR_STOP=1", "-q", "-h", server.host, "-p", str(server.port),
                   "-U", PG_USER, "-d", "postgres", "-f", str(INIT_SQL)], env=server.env)
        yield server
    finally:
        subprocess.run([*owner, pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundProcess]:
    """The local stack's MLflow server command, with the SQLite backend swapped for PostgreSQL;
    yields the server's process (its record's meta holds the URL)."""
    from nativelm.params.stack import StackParams

    state = tmp_path_factory.mktemp("mlflow-pg")
    svc = mlflow_service(StackParams(state_dir=str(state), mlflow_port=free_port(), prefect_port=free_port()))
    argv = list(svc.argv)
    argv[argv.index("--backend-store-uri") + 1] = postgres.uri("mlflow")
    proc = BackgroundProcess("mlflow-postgres", state / "stack")
    proc.start(argv, env={**svc.env, **postgres.env}, cwd=state, meta={"url": svc.url})
    try:
        wait_http(proc, svc.health_url, timeout_s=120)
        yield proc
    finally:
        proc.stop()


def query(postgres: Postgres, sql: str, *args: object, database: str = "mlflow") -> list[tuple]:
    """Rows of one query, read by PostgreSQL itself (not through the server that wrote them)."""
    import psycopg2

    with psycopg2.connect(host=postgres.host, port=postgres.port, user=PG_USER, password=postgres.password,
                          dbname=database) as conn, conn.cursor() as cursor:
        cursor.execute(sql, args)
        return cursor.fetchall()


def test_run_and_aliased_model_version_are_stored_in_postgres(mlflow_on_postgres: BackgroundProcess,
                                                              postgres: Postgres, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from nativelm.params.root import Params
    from nativelm.params.tracking import TrackingParams
    from nativelm.tracking.registry import register_folder
    from nativelm.tracking.runs import tracked_run

    url = mlflow_on_postgres.record().meta["url"]
    params = Params(tracking=TrackingParams(uri=url, experiment="team-stack"))
    release = tmp_path / "release"
    release.mkdir()
    (release / "manifest.json").write_text('{"model": "tiny"}\n')
    with tracked_run(params, "pipeline-on-postgres", "pipeline") as run:
        run.log_params({"train": {"lr": 0.003}})
        run.log_metrics({"val_loss": 2.25}, step=6)
        version = register_folder(run, release, "nativelm-pg", {"nativelm.gate": "passed"})
        run_id = run.run_id
    client = MlflowClient(url)
    client.set_registered_model_alias("nativelm-pg", "champion", str(version))

    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params["train.lr"] == "0.003" and stored.data.metrics["val_loss"] == 2.25
    champion = client.get_model_version_by_alias("nativelm-pg", "champion")
    assert (int(champion.version), champion.run_id) == (version, run_id)
    assert champion.tags["nativelm.gate"] == "passed"
    fetched = Path(client.download_artifacts(run_id, "release/manifest.json", str(tmp_path / "back")))
    assert fetched.read_text() == '{"model": "tiny"}\n'

    assert query(postgres, "SELECT key, value FROM params WHERE run_uuid = %s", run_id) == [("train.lr", "0.003")]
    assert query(postgres, "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                 "nativelm-pg") == [("champion", version)]
    assert postgres.password not in mlflow_on_postgres.log_path.read_text()  # nor in the server's argv


def test_prefect_server_stores_its_state_in_postgres(postgres: Postgres, tmp_path: Path) -> None:
    import httpx

    from nativelm.params.stack import StackParams

    svc = prefect_service(StackParams(state_dir=str(tmp_path), mlflow_port=free_port(), prefect_port=free_port()))
    url = postgres.uri("prefect", driver="asyncpg")
    proc = BackgroundProcess("prefect-postgres", tmp_path / "stack")
    proc.start(svc.argv, env={**svc.env, "PREFECT_SERVER_DATABASE_CONNECTION_URL": url, **postgres.env}, cwd=tmp_path)
    try:
        wait_http(proc, svc.health_url, timeout_s=120)
        reply = httpx.post(f"{svc.url}/api/flows/", json={"name": "team-stack-check"}, trust_env=False, timeout=30)
        assert reply.status_code in (200, 201), reply.text
        assert query(postgres, "SELECT id::text FROM flow WHERE name = %s", "team-stack-check",
                     database="prefect") == [(reply.json()["id"],)]
        assert postgres.password not in proc.log_path.read_text()
    finally:
        proc.stop()
