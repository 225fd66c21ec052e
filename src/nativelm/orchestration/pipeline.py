"""One pipeline run = one MLflow parent run; DVC stages run under it and log nested runs."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nativelm.orchestration.dvc import (
    ReproResult,
    exp_save,
    lock_out_hash,
    read_metrics,
    repro,
)
from nativelm.params.root import Params
from nativelm.tracking.runs import PARENT_ENV, URI_ENV, RunLogger, tracked_run

if TYPE_CHECKING:
    from nativelm.gate.promote import GateResult


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

    def run_stage(self, stage: str, metrics_file: str) -> ReproResult:
        """`dvc repro` one stage, then copy its DVC metrics into the parent run as `<stage>/<name>`."""
        started = time.perf_counter()
        result = repro(stage, self.project_dir, self.child_env())
        self.run.log_metrics({f"timing/{stage}_repro_s": time.perf_counter() - started})
        self.stages[stage] = "skipped" if result.skipped else "ran"
        stage_metrics = {f"{stage}/{k}": v for k, v in read_metrics(self.project_dir, metrics_file).items()}
        self.metrics.update(stage_metrics)
        self.run.log_metrics(stage_metrics)
        self.run.set_tags({f"stage.{stage}": self.stages[stage]})
        return result

    def summary(self) -> dict[str, object]:
        """What the flow returns: stage outcomes, metrics, and where the MLflow run is."""
        return {"stages": dict(self.stages), "metrics": dict(self.metrics),
                "mlflow_run_id": self.run.run_id, "experiment_id": self.run.experiment_id, **self.summary_extra}

    def save_experiment(self, name: str) -> str:
        """Save the workspace as DVC experiment `name` and tag the run with it (how to reproduce the run)."""
        rev = exp_save(name, self.project_dir)
        self.run.set_tags({"dvc_experiment": name, "dvc_experiment_rev": rev})
        self.summary_extra["dvc_experiment"] = name
        return rev

    def gate(self, version: int) -> GateResult:
        """Gate the registered `version`; on promotion announce it (the rollout deployment reacts)."""
        from nativelm.gate.promote import gate_version
        from nativelm.orchestration.events import emit_promotion

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

    def tag_data_hash(self, stage: str, out_path: str) -> None:
        """Tag the run with the DVC hash of a stage output (which data the model came from)."""
        digest = lock_out_hash(self.project_dir, stage, out_path)
        if digest:
            self.run.set_tags({"data_hash": digest})


def _flow_run_tags() -> dict[str, str]:
    try:
        from prefect.runtime import flow_run

        return {"prefect.flow_run_id": str(flow_run.id)} if flow_run.id else {}
    except Exception:  # not inside a Prefect flow run
        return {}


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
