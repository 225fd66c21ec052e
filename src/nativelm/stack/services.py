"""The two servers of the local stack: what to run, with which environment, where it keeps data.

Layout under ``stack.state_dir`` (default ``.nativelm/``)::

    stack/mlflow.pid  mlflow.json  mlflow.log      # process bookkeeping (see process.py)
    stack/prefect.pid prefect.json prefect.log
    mlflow/mlflow.db                               # MLflow backend store (SQLite)
    mlflow/artifacts/                              # artifact store, served by the MLflow server
    prefect/                                       # PREFECT_HOME of the server, with prefect.db

Both servers are the executables of the running interpreter's environment, bind
``stack.host``, and have telemetry, analytics and promotional content switched off.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from nativelm.errors import NativelmError

if TYPE_CHECKING:
    from nativelm.params.root import Params
    from nativelm.params.stack import StackParams

    AnyParams = Union[Params, StackParams]

SERVICE_NAMES = ("mlflow", "prefect")

# Switches that keep the servers and their clients off the internet (checked against mlflow 3.17
# and prefect 3.9: DO_NOT_TRACK is honoured by both, "true" being the value both accept).
_NO_TELEMETRY = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}


@dataclass(frozen=True)
class Service:
    """One server of the stack, fully resolved from the parameters."""

    name: str  # "mlflow" | "prefect": also the base name of its pid and log files
    title: str  # for messages: "MLflow tracking server"
    host: str  # address it binds
    port: int
    url: str  # base URL for browsers and clients
    health_url: str  # answers 2xx once the server is ready
    argv: tuple[str, ...]
    env: Mapping[str, str]  # added to the inherited environment
    cwd: Path  # its data folder, so no stray config file of the project is picked up
    port_param: str  # the params.yaml key that sets its port


def stack_params(params: AnyParams) -> StackParams:
    """The `stack:` section, given either the whole Params or the section itself."""
    return getattr(params, "stack", params)  # type: ignore[return-value]


def state_root(params: AnyParams) -> Path:
    """The state folder as an absolute path (relative values are taken from the current folder)."""
    return Path(stack_params(params).state_dir).expanduser().absolute()


def stack_dir(params: AnyParams) -> Path:
    """Where pid files, process records and logs of the servers live."""
    return state_root(params) / "stack"


def connect_host(host: str) -> str:
    """Host a client uses to reach a server bound to `host` (a wildcard bind is reached on loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host


def _base_url(host: str, port: int) -> str:
    host = connect_host(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def mlflow_url(params: AnyParams) -> str:
    """Tracking URI (and UI) of the local MLflow server, e.g. http://127.0.0.1:5000."""
    sp = stack_params(params)
    return _base_url(sp.host, sp.mlflow_port)


def prefect_api_url(params: AnyParams) -> str:
    """PREFECT_API_URL of the local Prefect server, e.g. http://127.0.0.1:4200/api."""
    return prefect_ui_url(params) + "/api"


def prefect_ui_url(params: AnyParams) -> str:
    """The Prefect dashboard, e.g. http://127.0.0.1:4200."""
    sp = stack_params(params)
    return _base_url(sp.host, sp.prefect_port)


def client_env(params: AnyParams) -> dict[str, str]:
    """Environment for child processes that use the stack: MLFLOW_TRACKING_URI, PREFECT_API_URL
    (and the telemetry opt-outs DO_NOT_TRACK, MLFLOW_DISABLE_TELEMETRY)."""
    return {"MLFLOW_TRACKING_URI": mlflow_url(params), "PREFECT_API_URL": prefect_api_url(params), **_NO_TELEMETRY}


def venv_executable(name: str) -> Path:
    """An executable installed next to the running interpreter (same virtualenv)."""
    return Path(sys.executable).parent / name


def check_executable(service: Service) -> None:
    """Raise NativelmError if the service's program is not installed in this environment."""
    exe = Path(service.argv[0])
    if not exe.is_file():
        raise NativelmError(f"{service.name}: {exe} not found (install nativelm's dependencies in the "
                            f"environment of {sys.executable})")


def mlflow_service(params: AnyParams) -> Service:
    """MLflow tracking server: SQLite backend, artifacts proxied by the server, one worker."""
    sp = stack_params(params)
    data = state_root(params) / "mlflow"
    url = mlflow_url(params)
    argv = (
        str(venv_executable("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}",
        # clients upload and download artifacts through the server (mlflow-artifacts:/ URIs)
        "--serve-artifacts", "--artifacts-destination", (data / "artifacts").as_uri(),
        "--host", sp.host, "--port", str(sp.mlflow_port),
        "--workers", "1",
        # one log line per request would bury the server's own messages (every logged metric is one)
        "--uvicorn-opts", "--no-access-log",
    )
    env = {
        **_NO_TELEMETRY,
        # MLflow 3 starts a job runner with seven huey consumers (~600 MB) for GenAI jobs
        # (judges, prompt optimisation, trace rollups) on a SQL backend; this pipeline uses none.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return Service("mlflow", "MLflow tracking server", sp.host, sp.mlflow_port, url, url + "/health",
                   argv, env, data, "stack.mlflow_port")


def prefect_service(params: AnyParams) -> Service:
    """Prefect server: PREFECT_HOME and its SQLite database under the state folder, analytics off."""
    sp = stack_params(params)
    home = state_root(params) / "prefect"
    argv = (str(venv_executable("prefect")), "server", "start",
            "--host", sp.host, "--port", str(sp.prefect_port), "--analytics-off")
    env = {
        **_NO_TELEMETRY,
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_API_URL": prefect_api_url(params),  # also what the UI calls
        "PREFECT_UI_URL": prefect_ui_url(params),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    }
    return Service("prefect", "Prefect server", sp.host, sp.prefect_port, prefect_ui_url(params),
                   prefect_api_url(params) + "/health", argv, env, home, "stack.prefect_port")


def services(params: AnyParams) -> list[Service]:
    """Both servers, in start order."""
    return [mlflow_service(params), prefect_service(params)]


def service(params: AnyParams, name: str) -> Service:
    """One server by name; NativelmError for an unknown name."""
    for svc in services(params):
        if svc.name == name:
            return svc
    raise NativelmError(f"unknown stack service {name!r} (known: {', '.join(SERVICE_NAMES)})")
