"""One pipeline run = one MLflow parent run and one DVC experiment; the stages log nested runs under it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from nativelm.gate.promote import GateResult, gate_version
from nativelm.orchestration.dvc import (
    ExperimentRun,
    exp_run,
    lock_out_hash,
    read_metrics,
)
from nativelm.orchestration.events import emit_promotion
from nativelm.params.root import Params
from nativelm.tracking.runs import PARENT_ENV, URI_ENV, RunLogger, tracked_run

GATE_LIMIT = "nativelm-gate"  # Prefect global concurrency limit (1, made by `nativelm serve`): gates take turns


class _LogLines(io.TextIOBase):
    """Text written here becomes one log record per line (a progress bar's redraws too: split on CR)."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.logger, self.pending = logger, ""

    def write(self, text: str) -> int:
        *lines, self.pending = re.split(r"[\r\n]", self.pending + text)
        for line in lines:
            if line.strip():
                self.logger.info(line.rstrip())
        return len(text)

    def close(self) -> None:
        self.write("\n")
        super().close()


@contextlib.contextmanager
def stage_output() -> Iterator[io.TextIOBase | Any]:
    """Where DVC's output goes: the Prefect run's log inside a flow (so `nativelm run` and the UI show
    the running stage as it goes, progress included), else this process's stderr."""
    try:
        logger = get_run_logger()
    except MissingContextError:
        yield sys.stderr
        return
    lines = _LogLines(logger)
    try:
        yield lines
    finally:
        lines.close()


@dataclass
class PipelineRun:
    """The parent MLflow run of a pipeline run and what its stages did."""

    params: Params
    project_dir: Path
    run: RunLogger
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "skipped"
    metrics: dict[str, float] = field(default_factory=dict)
    summary_extra: dict[str, object] = field(default_factory=dict)

    def child_env(self) -> dict[str, str]:
        """Environment that makes a stage's own MLflow run a nested run of this one."""
        if not self.run.active:
            return {}
        return {PARENT_ENV: str(self.run.run_id), URI_ENV: str(self.run.uri)}

    def run_experiment(self, name: str, set_params: list[str]) -> ExperimentRun:
        """The pipeline as DVC experiment `name`, then each stage's DVC metrics copied in as `<stage>/<name>`.

        The metrics and the data hash are read at the experiment's commit, so a run in a temporary
        workspace reports its own figures, not the workspace's.
        """
        with stage_output() as echo:
            result = exp_run(name, set_params, self.project_dir, self.child_env(), echo)
        self.run.set_tags({"dvc_experiment": name, "dvc_experiment_rev": result.rev})
        self.summary_extra["dvc_experiment"] = name
        p = self.params
        stage_metrics = {"prepare": p.data.metrics_file, "train": p.train.metrics_file,
                         "export": p.export.metrics_file, "evaluate": p.evaluate.metrics_file}
        for stage, metrics_file in stage_metrics.items():
            self.stages[stage] = result.stages.get(stage, "skipped")
            self.run.log_metrics({f"timing/{stage}_repro_s": result.seconds.get(stage, 0.0)})
            found = {f"{stage}/{k}": v for k, v in read_metrics(self.project_dir, metrics_file, result.rev).items()}
            self.metrics.update(found)
            self.run.log_metrics(found)
        self.run.set_tags({f"stage.{stage}": outcome for stage, outcome in self.stages.items()})
        digest = lock_out_hash(self.project_dir, "prepare", p.data.out_dir, result.rev)
        if digest:
            self.run.set_tags({"data_hash": digest})
        return result

    def summary(self) -> dict[str, object]:
        """What the flow returns: stage outcomes, metrics, and where the MLflow run is."""
        return {"stages": dict(self.stages), "metrics": dict(self.metrics),
                "mlflow_run_id": self.run.run_id, "experiment_id": self.run.experiment_id, **self.summary_extra}

    def gate(self, version: int) -> GateResult:
        """Gate the registered `version`; on promotion announce it (the rollout deployment reacts).

        Retrains running at once take turns here, so each compares against the champion the other left.
        """
        with concurrency(GATE_LIMIT, occupy=1, strict=False):
            result = gate_version(self.params, version)
        self.run.set_tags({"gate.status": result.alias, "gate.reason": result.reason[:5000],
                           "gate.changed": str(result.changed).lower(), "model_version": str(version)})
        self.run.log_metrics({"gate/promoted": float(result.promoted)})
        self.summary_extra["gate"] = {"version": version, "status": result.alias, "reason": result.reason,
                                      "promoted": result.promoted, "changed": result.changed}
        if result.changed:
            event_id = emit_promotion(self.params.gate.event, result)
            self.summary_extra["gate"]["event_id"] = event_id
        return result

    def registered_version(self) -> int | None:
        """The model version the evaluate stage registered (None when tracking was off)."""
        value = self.metrics.get("evaluate/model_version")
        return int(value) if value is not None else None


def _flow_run_tags() -> dict[str, str]:
    return {"prefect.flow_run_id": str(flow_run.id)} if flow_run.id else {}


def experiment_name(flow_run_id: object | None) -> str:
    """A unique DVC experiment name for one pipeline run (time first, so names sort by age)."""
    suffix = str(flow_run_id)[:8] if flow_run_id else f"{os.getpid():x}"
    return f"retrain-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"


@contextlib.contextmanager
def pipeline_run(params: Params, name: str, project_dir: Path,
                 overrides: Mapping[str, Any] | None = None) -> Iterator[PipelineRun]:
    """Open the parent run of one pipeline run, with all params logged once and the overrides tagged."""
    tags = {**_flow_run_tags(), "overrides": json.dumps(dict(overrides or {}), sort_keys=True)[:5000]}
    with tracked_run(params, name, "pipeline", tags=tags) as run:
        run.log_params(params.model_dump(mode="json"))
        yield PipelineRun(params, project_dir, run)
