"""Prefect flow `retrain`: corpus -> tokenizer + shards -> trained model -> quantized ONNX -> release, through DVC.

Thin on purpose: each stage is a `nativelm` command run by `dvc repro` (an unchanged stage is
skipped), and the MLflow conventions (one parent run, nested stage runs) live in
nativelm.orchestration.pipeline.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from nativelm.config import load_params
from nativelm.orchestration.pipeline import PipelineRun, pipeline_run


@task(name="dvc-repro", task_run_name="dvc-repro-{stage}", cache_policy=NONE)
def repro_stage(run: PipelineRun, stage: str, metrics_file: str) -> str:
    """`dvc repro STAGE`; returns 'ran' or 'skipped'."""
    run.run_stage(stage, metrics_file)
    return run.stages[stage]


@flow(name="retrain", log_prints=True)
def retrain(params_path: str = "params.yaml", project_dir: str = ".") -> dict:
    """Prepare, train, export and evaluate under one MLflow pipeline run; return what happened."""
    root = Path(project_dir).resolve()
    params = load_params(root / params_path)
    with pipeline_run(params, "retrain", root) as run:
        print(f"stage prepare: {repro_stage(run, 'prepare', params.data.metrics_file)}")
        run.tag_data_hash("prepare", params.data.out_dir)
        print(f"stage train: {repro_stage(run, 'train', params.train.metrics_file)}")
        print(f"stage export: {repro_stage(run, 'export', params.export.metrics_file)}")
        print(f"stage evaluate: {repro_stage(run, 'evaluate', params.evaluate.metrics_file)}")
        return run.summary()


if __name__ == "__main__":
    retrain()
