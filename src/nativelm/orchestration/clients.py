"""Where this process's Prefect and MLflow clients point, and how the project's flow files load."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from prefect.context import refresh_global_settings_context

from nativelm import stack
from nativelm.errors import NativelmError
from nativelm.params.root import Params
from nativelm.stack.process import http_ok


def load_flow_module(project_dir: Path, relpath: str) -> ModuleType:
    """Import a flow file from the project's pipelines/ folder (it is not an installed package)."""
    path = project_dir / relpath
    if not path.exists():
        raise NativelmError(f"{path}: flow file not found (run from the project folder)")
    spec = importlib.util.spec_from_file_location(f"nativelm_pipelines_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Prefect finds a flow's file through its module when deploying it
    spec.loader.exec_module(module)
    return module


def _external_stack() -> bool:
    """True when $PREFECT_API_URL and $MLFLOW_TRACKING_URI name servers that answer (the team stack)."""
    prefect, mlflow = os.environ.get("PREFECT_API_URL"), os.environ.get("MLFLOW_TRACKING_URI")
    if not (prefect and mlflow and mlflow.startswith(("http://", "https://"))):
        return False
    return all(http_ok(f"{url.rstrip('/')}/health", direct=False) for url in (prefect, mlflow))


def use_local_stack(params: Params) -> None:
    """Point this process's Prefect and MLflow clients at the local stack, or say how to start it.

    With $PREFECT_API_URL and $MLFLOW_TRACKING_URI set to servers that answer (the team stack of
    docker-compose.yml), those are used as they are.
    """
    if _external_stack():
        return
    missing = [name for name in ("mlflow", "prefect") if not stack.is_running(params, name)]
    if missing:
        raise NativelmError(f"local stack not running ({', '.join(missing)}): start it with `nativelm stack up`")
    os.environ.update(stack.client_env(params))
    refresh_global_settings_context()  # Prefect read its settings when it was imported
