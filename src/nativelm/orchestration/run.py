"""`nativelm run`: the whole loop on the local stack, as the dashboard runs it, and its summary.

Triggers the served `retrain` deployment, follows it, follows the `rollout` its promotion
triggers, and prints per-stage timings, the orchestration overhead, the model's figures and each
board's on-board speed (from MLflow).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from nativelm import stack
from nativelm.errors import NativelmError
from nativelm.orchestration.clients import load_flow_module, use_local_stack
from nativelm.orchestration.loop import (
    follow,
    mlflow_run_of,
    stage_walls,
    trigger,
    wait_triggered,
)
from nativelm.orchestration.serve import deployment_ref, serve_background
from nativelm.params.root import Params
from nativelm.tracking.runs import resolve_tracking_uri, ui_url

# the figures the summary shows (every metric is in MLflow)
SUMMARY_METRICS = (
    "prepare/tokens_train", "train/val_loss", "train/val_perplexity", "train/neuron_sparsity",
    "export/top1_agreement", "export/model_bytes", "export/bits_per_weight",
    "evaluate/ppl_onnx", "evaluate/decode_tokens_per_s", "evaluate/prefill_tokens_per_s",
)
STAGES = ("prepare", "train", "export", "evaluate")
# per-board figures of the on-board benchmark shown in the summary
BOARD_FIGURES = {"decode_tokens_per_s": "decode tok/s", "prefill_tokens_per_s": "prefill tok/s",
                 "time_to_first_token_ms": "TTFT ms", "peak_rss_mb": "peak RSS MB"}
_BOARD_METRIC = re.compile(r"^board[./](?P<board>[^./]+)[./](?P<name>.+)$")


def _board_figures(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per-board metrics (`board.<name>.<metric>` or `board/<name>/<metric>`) grouped by board."""
    boards: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        found = _BOARD_METRIC.match(key)
        if found:
            boards.setdefault(found["board"], {})[found["name"]] = value
    return boards


def timing_lines(client: Any, parent: Any, flow_seconds: float) -> list[str]:
    """Per-stage wall time (through DVC, and the stage's own), and the orchestration overhead ratio."""
    metrics, walls = parent.data.metrics, stage_walls(client, parent)
    lines = []
    for stage in STAGES:
        repro_s = metrics.get(f"timing/{stage}_repro_s")
        if repro_s is None:
            continue
        state = parent.data.tags.get(f"stage.{stage}", "?")
        own = f", stage itself {walls[stage]:.1f} s" if stage in walls and state == "ran" else ""
        lines.append(f"  {stage:<9} {state:<8} {repro_s:7.1f} s through DVC{own}")
    compute = sum(walls[s] for s in STAGES if s in walls and parent.data.tags.get(f"stage.{s}") == "ran")
    if compute > 0:
        lines.append(f"  orchestration overhead (Prefect + DVC + MLflow): {flow_seconds - compute:.1f} s over "
                     f"{compute:.1f} s of stage compute = {(flow_seconds - compute) / compute:.2f}x")
    return lines


def summary_lines(params: Params, headline: str, client: Any, parent: Any, flow_seconds: float,
                  rollout: Any = None, rollout_run: Any = None) -> list[str]:
    """Human summary of one loop: stages, figures, gate, boards, where to look."""
    lines = [headline]
    if parent is not None:
        lines += timing_lines(client, parent, flow_seconds)
        for key in SUMMARY_METRICS:
            if key in parent.data.metrics:
                lines.append(f"  {key} = {parent.data.metrics[key]:.6g}")
        tags = parent.data.tags
        if "model_version" in tags:
            lines.append(f"  model version {tags['model_version']}: {tags.get('gate.status', 'not gated')} "
                         f"({tags.get('gate.reason', '')})")
        if tags.get("dvc_experiment"):
            lines.append(f"  DVC experiment: {tags['dvc_experiment']} (`dvc exp apply {tags['dvc_experiment']}` "
                         "then `dvc repro` rebuilds it)")
        lines.append(f"  MLflow run: {ui_url(stack.mlflow_url(params), parent.info.experiment_id, parent.info.run_id)}")
        lines.append(f"  MLflow experiment: {ui_url(stack.mlflow_url(params), parent.info.experiment_id)}")
    if rollout is not None:
        lines.append(f"  rollout run {rollout.flow_run.name}: {rollout.flow_run.state_name} "
                     f"({rollout.seconds:.1f} s)")
        boards = _board_figures(rollout_run.data.metrics) if rollout_run is not None else {}
        for board, figures in sorted(boards.items()):
            shown = ", ".join(f"{label} {figures[key]:.4g}" for key, label in BOARD_FIGURES.items() if key in figures)
            lines.append(f"    {board}: {shown}")
    lines.append(f"  MLflow UI:  {stack.mlflow_url(params)}")
    lines.append(f"  Prefect UI: {stack.prefect_ui_url(params)}")
    return lines


def _rollout(params: Params, parent: Any, since: Any) -> Any:
    """Follow the rollout of this run's version: the one its promotion triggered, else start one.

    A version that already was the champion triggers nothing; rolling it out again is a hash check per
    board (boards that miss it get it), so the loop always ends with the fleet on the champion.
    """
    sp = params.serve
    tags = parent.data.tags
    version = tags.get("model_version")
    if version is None or tags.get("gate.status") != params.gate.champion_alias:
        return None
    ref = deployment_ref("rollout")
    if tags.get("gate.changed") == "true":
        run = wait_triggered(ref, since, lambda r: str(r.parameters.get("model")) == version, sp.rollout_timeout_s)
        print(f"rollout: started by the promotion event: flow run {run.name}", flush=True)
    else:
        run = trigger(ref, {"model": version})
        print(f"rollout: version {version} already was the champion: checking the fleet (flow run {run.name})",
              flush=True)
    return follow(run.id, sp.rollout_timeout_s, prefix="rollout: ")


def run_pipeline(params: Params, params_path: Path, project_dir: Path) -> list[str]:
    """Trigger the served retrain deployment, follow it and the rollout it causes; return the summary."""
    serve_background(params, params_path, project_dir)  # points this process at the stack too
    since = datetime.now(UTC)
    started = time.monotonic()
    run = trigger(deployment_ref("retrain"), {})
    print(f"retrain: flow run {run.name}: {stack.prefect_ui_url(params)}/runs/flow-run/{run.id}", flush=True)
    retrain = follow(run.id, params.serve.retrain_timeout_s)
    if not retrain.ok:
        message = retrain.flow_run.state.message if retrain.flow_run.state else ""
        raise NativelmError(f"retrain run {retrain.flow_run.name} ended {retrain.flow_run.state_name}: {message}")
    client = _mlflow(params)
    parent = mlflow_run_of(client, run.id, params.tracking.experiment) if client else None
    rollout = _rollout(params, parent, since) if parent is not None else None
    rollout_run = mlflow_run_of(client, rollout.flow_run.id, params.tracking.experiment) if rollout and client else None
    headline = (f"loop finished in {time.monotonic() - started:.1f} s (retrain run {retrain.flow_run.name}: "
                f"{retrain.flow_run.state_name}, {retrain.seconds:.1f} s)")
    lines = summary_lines(params, headline, client, parent, retrain.seconds, rollout, rollout_run)
    if rollout is not None and not rollout.ok:
        failed = f"rollout run {rollout.flow_run.name} ended {rollout.flow_run.state_name}"
        raise NativelmError("\n".join([*lines, failed]))
    return lines


def _mlflow(params: Params) -> Any:
    """An MLflow client of the tracking server, or None when tracking is off."""
    uri = resolve_tracking_uri(params)
    return MlflowClient(tracking_uri=uri) if uri else None


def run_local(params: Params, params_path: Path, project_dir: Path) -> list[str]:
    """Run the retrain flow in this process (no runner, no rollout); return the summary lines."""
    use_local_stack(params)
    retrain = load_flow_module(project_dir, "pipelines/retrain.py").retrain
    started = time.monotonic()
    result = retrain()
    seconds = time.monotonic() - started
    client = _mlflow(params)
    parent = client.get_run(result["mlflow_run_id"]) if client and result.get("mlflow_run_id") else None
    return summary_lines(params, f"pipeline finished in {seconds:.1f} s", client, parent, seconds)
