"""`nativelm run`: execute the pipeline flow from pipelines/ against the local stack."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from nativelm.config import Params
from nativelm.errors import NativelmError

FLOW_FILE = "pipelines/retrain.py"
FLOW_NAME = "retrain"
# the figures the summary shows (all metrics are in MLflow)
SUMMARY_METRICS = (
    "prepare/documents_kept", "prepare/tokens_train", "prepare/tokens_val",
    "train/val_loss", "train/val_perplexity", "train/unigram_entropy_val", "train/neuron_sparsity",
    "train/expert_load_cv", "train/tokens_per_s", "train/wall_time_s",
    "export/top1_agreement", "export/ppl_rel_diff", "export/model_bytes", "export/bits_per_weight",
    "evaluate/ppl_onnx", "evaluate/decode_tokens_per_s", "evaluate/model_version",
)


def load_flow_module(project_dir: Path, relpath: str) -> ModuleType:
    """Import a flow file from the project's pipelines/ folder (it is not an installed package)."""
    path = project_dir / relpath
    if not path.exists():
        raise NativelmError(f"{path}: flow file not found (run from the project folder)")
    spec = importlib.util.spec_from_file_location(f"nativelm_pipelines_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use_local_stack(params: Params) -> None:
    """Point this process's Prefect and MLflow clients at the running local stack, or say how to start it."""
    from nativelm import stack

    missing = [name for name in ("mlflow", "prefect") if not stack.is_running(params, name)]
    if missing:
        raise NativelmError(f"local stack not running ({', '.join(missing)}): start it with `nativelm stack up`")
    os.environ.update(stack.client_env(params))


def summary_lines(params: Params, result: dict[str, Any], seconds: float) -> list[str]:
    """Human summary of one pipeline run: what ran, key figures, where to look."""
    from nativelm import stack

    lines = [f"pipeline finished in {seconds:.1f} s"]
    for stage, state in result.get("stages", {}).items():
        lines.append(f"  stage {stage}: {state}")
    metrics = result.get("metrics", {})
    for key in SUMMARY_METRICS:
        if key in metrics:
            lines.append(f"  {key} = {metrics[key]:.6g}")
    if result.get("mlflow_run_id"):
        lines.append(f"  MLflow run: {stack.mlflow_url(params)}/#/experiments/{result['experiment_id']}"
                     f"/runs/{result['mlflow_run_id']}")
    lines.append(f"  MLflow UI:  {stack.mlflow_url(params)}")
    lines.append(f"  Prefect UI: {stack.prefect_ui_url(params)}")
    lines.append(f"  outputs:    {params.data.out_dir}/, {params.train.model_file}, {params.export.out_dir}/, "
                 f"{params.evaluate.release_dir}/, "
                 f"metrics/, {params.train.plots_dir}/")
    return lines


def run_pipeline(params: Params, params_path: Path, project_dir: Path) -> list[str]:
    """Run the flow in-process (it reports to the Prefect server) and return the summary lines."""
    use_local_stack(params)
    module = load_flow_module(project_dir, FLOW_FILE)
    started = time.monotonic()
    result = getattr(module, FLOW_NAME)(params_path=str(params_path), project_dir=str(project_dir))
    return summary_lines(params, result, time.monotonic() - started)
