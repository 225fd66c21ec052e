"""One pipeline run = one MLflow parent run; DVC stages run under it and log nested runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nativelm.config import Params
from nativelm.orchestration.dvc import ReproResult, lock_out_hash, read_metrics, repro
from nativelm.tracking.runs import PARENT_ENV, URI_ENV, RunLogger, tracked_run


@dataclass
class PipelineRun:
    """The parent MLflow run of a pipeline run and what its stages did."""

    params: Params
    project_dir: Path
    run: RunLogger
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "skipped"
    metrics: dict[str, float] = field(default_factory=dict)

    def child_env(self) -> dict[str, str]:
        """Environment that makes a stage's own MLflow run a nested run of this one."""
        if not self.run.active:
            return {}
        return {PARENT_ENV: str(self.run.run_id), URI_ENV: str(self.run.uri)}

    def run_stage(self, stage: str, metrics_file: str) -> ReproResult:
        """`dvc repro` one stage, then copy its DVC metrics into the parent run as `<stage>/<name>`."""
        result = repro(stage, self.project_dir, self.child_env())
        self.stages[stage] = "skipped" if result.skipped else "ran"
        stage_metrics = {f"{stage}/{k}": v for k, v in read_metrics(self.project_dir, metrics_file).items()}
        self.metrics.update(stage_metrics)
        self.run.log_metrics(stage_metrics)
        self.run.set_tags({f"stage.{stage}": self.stages[stage]})
        return result

    def summary(self) -> dict[str, object]:
        """What the flow returns: stage outcomes, metrics, and where the MLflow run is."""
        return {"stages": dict(self.stages), "metrics": dict(self.metrics),
                "mlflow_run_id": self.run.run_id, "experiment_id": self.run.experiment_id}

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


@contextlib.contextmanager
def pipeline_run(params: Params, name: str, project_dir: Path) -> Iterator[PipelineRun]:
    """Open the parent run of one pipeline run, with all params logged once."""
    with tracked_run(params, name, "pipeline", tags=_flow_run_tags()) as run:
        run.log_params(params.model_dump(mode="json"))
        yield PipelineRun(params, project_dir, run)
