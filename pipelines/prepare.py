"""Prefect flow `prepare`: corpus -> tokenizer + token shards through DVC, logged to MLflow.

Thin on purpose: the work is `nativelm prepare` (run by `dvc repro`, so an unchanged stage is
skipped) and the MLflow conventions live in nativelm.orchestration.pipeline.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from nativelm.config import load_params
from nativelm.orchestration.pipeline import PipelineRun, pipeline_run


@task(name="dvc-repro-prepare", cache_policy=NONE)
def repro_prepare(run: PipelineRun) -> str:
    """`dvc repro prepare`; returns 'ran' or 'skipped'."""
    run.run_stage("prepare", run.params.data.metrics_file)
    run.tag_data_hash("prepare", run.params.data.out_dir)
    return run.stages["prepare"]


@flow(name="prepare", log_prints=True)
def prepare(params_path: str = "params.yaml", project_dir: str = ".") -> dict:
    """Run the `prepare` stage under one MLflow pipeline run and return what happened."""
    root = Path(project_dir).resolve()
    params = load_params(root / params_path)
    with pipeline_run(params, "prepare", root) as run:
        state = repro_prepare(run)
        print(f"stage prepare: {state}")
        return {"stages": dict(run.stages), "metrics": dict(run.metrics),
                "mlflow_run_id": run.run.run_id, "experiment_id": run.run.experiment_id}


if __name__ == "__main__":
    prepare()
