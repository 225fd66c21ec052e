"""MLflow runs for pipeline runs and stages.

A Prefect flow opens one *parent* run per pipeline run and hands its id to the stages it starts
(through DVC) in ``NATIVELM_PARENT_RUN_ID``; each stage then logs a *nested* run under it, so
the MLflow UI shows one comparable row per pipeline run with the same metric names every time.
A stage run from the shell without a parent is a top-level run of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from nativelm.errors import NativelmError
from nativelm.stack import is_running, mlflow_url
from nativelm.stack.process import http_ok
from nativelm.tracking.flatten import flatten, params_hash

if TYPE_CHECKING:
    from nativelm.params.root import Params

PARENT_ENV = "NATIVELM_PARENT_RUN_ID"
STAGE_WALL_METRIC = "stage_wall_s"
URI_ENV = "MLFLOW_TRACKING_URI"
# MLflow 3's UI opens an experiment of this kind on its training runs (not on the GenAI overview)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# the metric columns the runs table shows, in this order, when opened through `ui_url`: a view
# MLflow's UI loads from the experiment tag `mlflow.sharedViewState.<key>` for `?viewStateShareKey=<key>`
FIRST_COLUMNS = ("train/val_loss", "evaluate/ppl_onnx", "export/model_bytes", "evaluate/decode_tokens_per_s")
VIEW_KEY = "nativelm"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


def experiment_tags() -> dict[str, str]:
    """The tags every nativelm experiment carries: its kind and the runs view `ui_url` opens."""
    return {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], VIEW_TAG: runs_view()}


def runs_view() -> str:
    """The shared view's JSON: the runs table with FIRST_COLUMNS, newest run first."""
    columns = [f"metrics.`{name}`" for name in FIRST_COLUMNS]
    return json.dumps({"selectedColumns": columns, "columnOrder": columns,
                       "orderByKey": "attributes.start_time", "orderByAsc": False})


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A page of MLflow's UI in its model-training mode (MLflow 3 otherwise opens on its GenAI overview,
    which lists no training runs; the mode then sticks in the user's browser); an experiment opens
    on its runs table with nativelm's columns first (`runs_view`)."""
    if run_id:
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
            "&workflowType=machine_learning")


def resolve_tracking_uri(params: Params) -> str | None:
    """The MLflow server to log to: params, else $MLFLOW_TRACKING_URI, else the running local stack.

    ``tracking.uri: off`` disables tracking; ``auto`` with no server anywhere returns None
    (the stage still writes its DVC metrics file).
    """
    uri = params.tracking.uri
    if uri == "off":
        return None
    if uri != "auto":
        return uri
    if os.environ.get(URI_ENV):
        return os.environ[URI_ENV]
    return mlflow_url(params) if is_running(params, "mlflow") else None


def required_tracking_uri(params: Params, who: str, error: type[NativelmError] = NativelmError,
                          hint: str = "") -> str:
    """The MLflow server `who` cannot work without; one `error` line saying how to get one when there is none."""
    uri = resolve_tracking_uri(params)
    if uri is None:
        raise error(f"{who}: no MLflow server (tracking.uri is off, or none runs: `nativelm stack up` or set "
                    f"{URI_ENV}{hint})")
    return uri


def _check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")) and not http_ok(uri.rstrip("/") + "/health", 3.0, direct=False):
        raise NativelmError(f"MLflow tracking server {uri} does not answer (start it with `nativelm stack up`)")


def git_commit(cwd: Path | None = None) -> str:
    """Commit of the working tree, with '-dirty' when tracked files changed; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@dataclass
class RunLogger:
    """Logs to one MLflow run; with no client (tracking off) every call is a no-op."""
    client: MlflowClient | None = None
    run_id: str | None = None
    uri: str | None = None
    experiment_id: str | None = None
    _step: dict[str, int] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def log_params(self, values: Mapping[str, Any]) -> None:
        if not self.active:
            return
        flat = flatten(dict(values))
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in sorted(values.items())
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for start in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[start:start + 500])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.active:
            return
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in sorted(tags.items())])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created (typed as model development) if it does not exist yet."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, tags=experiment_tags())
        except Exception:  # created concurrently by another stage
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    for key, value in experiment_tags().items():
        if found.tags.get(key) != value:  # an experiment made before nativelm set these
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def base_tags(params: Params, kind: str) -> dict[str, str]:
    """Tags every nativelm run carries, so runs can be filtered and traced back to code and params."""
    return {
        "nativelm.kind": kind,
        "git_commit": git_commit(),
        "params_hash": params_hash(params.model_dump(mode="json")),
    }


def _resumable(client: MlflowClient, experiment_id: str, run_id: str | None) -> Any:
    """The run `run_id`, set running again, if it exists, is not deleted and belongs to the experiment."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        return None
    client.update_run(run_id, status="RUNNING")
    return run


@contextlib.contextmanager
def tracked_run(params: Params, name: str, kind: str, parent_run_id: str | None = None,
                tags: Mapping[str, str] | None = None, resume_run_id: str | None = None) -> Iterator[RunLogger]:
    """Open an MLflow run (nested under `parent_run_id` if given) and close it FINISHED or FAILED.

    `resume_run_id`: continue that run (a resumed study) when it still exists in the experiment.
    """
    uri = resolve_tracking_uri(params)
    if uri is None:
        print(f"nativelm: MLflow tracking off for {name} (no server: `nativelm stack up` or set "
              f"{URI_ENV}); results are in the DVC metrics files", file=sys.stderr)
        yield RunLogger()
        return
    _check_reachable(uri)
    client = _client(uri)
    experiment_id = _experiment_id(client, params.tracking.experiment)
    all_tags = {**base_tags(params, kind), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = _resumable(client, experiment_id, resume_run_id)
    if run is None:
        run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    logger = RunLogger(client, run.info.run_id, uri, experiment_id)
    status = "FAILED"
    try:
        yield logger
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status=status)


@contextlib.contextmanager
def system_metrics(run: RunLogger, every_s: float) -> Iterator[None]:
    """MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU when pynvml is installed)."""
    if not run.active or every_s <= 0:
        yield
        return
    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=every_s, tracking_uri=run.uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextlib.contextmanager
def stage_run(params: Params, stage: str, section: Mapping[str, Any], name: str | None = None,
              with_system_metrics: bool = False) -> Iterator[RunLogger]:
    """The MLflow run of one stage: nested under the pipeline run named in $NATIVELM_PARENT_RUN_ID.

    `name` is the run's name in the MLflow UI (default: the stage); `with_system_metrics` samples the
    machine during the stage (training).
    """
    parent = os.environ.get(PARENT_ENV) or None
    with tracked_run(params, name or stage, "stage", parent_run_id=parent, tags={"nativelm.stage": stage}) as run:
        run.log_params({"seed": params.seed, **section})
        started = time.perf_counter()
        with system_metrics(run, params.tracking.system_metrics_every_s if with_system_metrics else 0.0):
            yield run
        # the stage's own time, without interpreter start-up and imports: what orchestration overhead is measured against
        run.log_metrics({STAGE_WALL_METRIC: time.perf_counter() - started})
