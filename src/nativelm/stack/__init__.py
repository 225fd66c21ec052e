"""The local stack: an MLflow tracking server and a Prefect server as background processes.

``up`` / ``down`` / ``status`` manage them (pid files and logs under ``stack.state_dir``);
``mlflow_url``, ``prefect_api_url``, ``prefect_ui_url`` and ``client_env`` tell clients where
they are; ``render`` turns the returned statuses into lines for the CLI. Only the standard
library is imported here, so importing the package is cheap.
"""

from nativelm.stack.manage import ServiceStatus, down, is_running, render, status, up
from nativelm.stack.process import ProcState
from nativelm.stack.services import (
    SERVICE_NAMES,
    client_env,
    mlflow_url,
    prefect_api_url,
    prefect_ui_url,
    stack_dir,
    state_root,
)

__all__ = [
    "SERVICE_NAMES",
    "ProcState",
    "ServiceStatus",
    "client_env",
    "down",
    "is_running",
    "mlflow_url",
    "prefect_api_url",
    "prefect_ui_url",
    "render",
    "stack_dir",
    "state_root",
    "status",
    "up",
]
