"""Deploy and bench: the fleet operations that record in MLflow, one implementation for the `nativelm`
commands and the Prefect flows (the rest, which never loads MLflow, is nativelm.fleet.service).

deploy: roll the resolved release out (canary first, waves, abort on failures) -> benchmark the
boards that serve it -> record it in MLflow: one run per rollout, nested under the pipeline run
that registered the version, whose own row also gets the per-board figures (so two pipeline runs
compare side by side, boards included). bench: the on-board benchmark of the live release, one
run for the lot. Boards run in this process's threads unless the caller passes an `Executor`
(the `rollout` flow: one Prefect task per board); the plans and the abort rules stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mlflow import MlflowClient

from nativelm.fleet.board_job import BoardResult
from nativelm.fleet.inventory import Board
from nativelm.fleet.onboard_bench import (
    BenchOne,
    BenchRow,
    bench_fleet,
    bench_metrics,
    in_threads,
    log_bench_run,
    render_bench,
)
from nativelm.fleet.progress import Progress
from nativelm.fleet.release import LocalRelease, resolve_release
from nativelm.fleet.rollout import RolloutPlan, plan_rollout, serving_boards
from nativelm.fleet.rollout_log import RolloutResult, new_rollout_id
from nativelm.fleet.waves import Wave
from nativelm.fleet.service import PRINT_CONSOLE, Console, FleetChoice, run_plan
from nativelm.fleet.signing import signed
from nativelm.params.root import Params
from nativelm.tracking.runs import RunLogger, resolve_tracking_uri


class Executor(Protocol):
    """Runs the boards of one wave elsewhere (Prefect tasks); results in wave order. None: this process's threads."""

    def deploy_wave(self, plan: RolloutPlan, wave: Wave) -> list[BoardResult]: ...

    def bench_wave(self, bench_one: BenchOne, boards: Sequence[Board]) -> list[BenchRow]: ...


@dataclass
class DeployReport:
    """A deploy: the release, the rollout's result, the on-board benchmark and the MLflow run (None: none)."""

    release: LocalRelease
    rollout: RolloutResult
    bench: list[BenchRow] = field(default_factory=list)
    mlflow_run: str | None = None

    @property
    def ok(self) -> bool:
        return self.rollout.ok

    def summary(self) -> dict[str, Any]:
        """What the rollout flow returns (and shows in the Prefect UI)."""
        result = self.rollout
        return {"rollout_id": result.rollout_id, "release": result.release, "ok": result.ok,
                "aborted": result.aborted, "counts": result.counts(),
                "boards": {r.board: {"outcome": r.outcome, "live": r.live, "reason": r.reason} for r in result.boards},
                "decode_tokens_per_s": {row.board: row.value("decode_tokens_per_s") for row in self.bench}}

    def failure(self) -> str:
        """One line saying why the deploy failed ('' when it did not)."""
        result = self.rollout
        if result.ok:
            return ""
        return (f"rollout {result.rollout_id} of {result.release}: {len(result.failed)} board(s) failed"
                + (f"; aborted: {result.aborted}" if result.aborted else ""))


@dataclass
class BenchReport:
    """An on-board benchmark: one row per board and the MLflow run (None: none)."""

    rows: list[BenchRow]
    mlflow_run: str | None = None

    @property
    def ok(self) -> bool:
        return not any(row.error for row in self.rows)


def resolve(params: Params, model: str | None) -> LocalRelease:
    """The verified local release `model` names (version, alias, models:/ URI, folder; None: evaluate.release_dir)."""
    return resolve_release(model or params.evaluate.release_dir, params)


def plan_deploy(params: Params, choice: FleetChoice, release: LocalRelease,
                progress: Progress | None = None) -> RolloutPlan:
    """The rollout of `release` to the chosen boards: canary wave first, then waves of fleet.max_parallel."""
    return plan_rollout(choice.inventory, choice.boards, release, params.fleet, Path(params.stack.state_dir),
                        progress=progress)


def deploy(params: Params, choice: FleetChoice, release: LocalRelease, *, bench: bool = True, record: bool = True,
           progress: Progress | None = None, console: Console = PRINT_CONSOLE, executor: Executor | None = None,
           flow_run_id: str | None = None) -> DeployReport:
    """Roll `release` out, benchmark the boards that serve it, record both in MLflow (`record`).
    The manifest is signed first, once: a missing or unusable fleet.signing_key is one line before
    any board is touched (not a failure per board)."""
    release = signed(release, Path(params.fleet.signing_key))
    plan = plan_deploy(params, choice, release, progress)
    result = run_plan(plan, console, None if executor is None else lambda wave: executor.deploy_wave(plan, wave))
    report = DeployReport(release, result)
    if bench:
        report.bench = bench_boards(params, choice, serving_boards(choice.boards, result, release.name),
                                    console=console, executor=executor)
    if record:
        report.mlflow_run = record_rollout(params, result, report.bench, release, flow_run_id)
        if report.mlflow_run:
            console.table(f"MLflow run of this rollout: {report.mlflow_run}")
    return report


def bench_boards(params: Params, choice: FleetChoice, boards: Sequence[Board], *, parallel: int | None = None,
                 console: Console = PRINT_CONSOLE, executor: Executor | None = None) -> list[BenchRow]:
    """The runtime benchmark on `boards`, in the waves of `bench_waves` (boards of one host one at a time)."""
    if not boards:
        return []
    fleet = params.fleet
    console.note(f"bench: {len(boards)} boards (prompt {fleet.bench_prompt_len} tokens, "
                 f"{fleet.bench_new_tokens} new tokens, {fleet.bench_repeats} repeats)")
    rows = bench_fleet(choice.inventory, boards, fleet, parallel,
                       in_threads if executor is None else executor.bench_wave)
    console.lines(render_bench(rows))
    return rows


def bench(params: Params, choice: FleetChoice, *, parallel: int | None = None, record: bool = True,
          console: Console = PRINT_CONSOLE) -> BenchReport:
    """Benchmark the live release of the chosen boards; one MLflow run for the lot (`record`)."""
    report = BenchReport(bench_boards(params, choice, choice.boards, parallel=parallel, console=console))
    if record and report.rows:
        releases = sorted({row.release for row in report.rows if row.release})
        report.mlflow_run = log_bench_run(params, report.rows, rollout_id=new_rollout_id("bench"),
                                          release=releases[0] if len(releases) == 1 else ",".join(releases))
        if report.mlflow_run:
            console.table(f"bench: MLflow run {report.mlflow_run}")
    return report


def pipeline_run_of_version(client: MlflowClient, model: str, version: int | None) -> str | None:
    """The pipeline (parent) run whose evaluate stage registered `version` of `model`, if there is one."""
    if version is None:
        return None
    found = client.get_model_version(model, str(version))
    return client.get_run(found.run_id).data.tags.get("mlflow.parentRunId") if found.run_id else None


def record_rollout(params: Params, result: RolloutResult, rows: Sequence[BenchRow], release: LocalRelease,
                   flow_run_id: str | None = None) -> str | None:
    """One MLflow run for this rollout (outcome + on-board bench); per-board figures also on the pipeline run."""
    uri = resolve_tracking_uri(params)
    if uri is None:
        return None
    client = MlflowClient(tracking_uri=uri)
    parent = pipeline_run_of_version(client, params.evaluate.registered_model, release.version)
    tags = {"rollout.outcome": "ok" if result.ok else "failed", "rollout.aborted": result.aborted or "",
            **{f"rollout.{k}": str(v) for k, v in result.counts().items()}}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    run_id = log_bench_run(params, rows, rollout_id=result.rollout_id, release=release.name,
                           version=release.version, tags=tags, parent_run_id=parent,
                           name=f"rollout v{release.version}" if release.version is not None else f"rollout {release.name}")
    if run_id is None:
        return None
    rollout_metrics = {"rollout.seconds": result.seconds, "rollout.boards_failed": float(len(result.failed))}
    rollout_run = RunLogger(client, run_id, uri)
    rollout_run.log_metrics(rollout_metrics)
    if result.log_path is not None and Path(result.log_path).exists():
        rollout_run.log_artifact(Path(result.log_path), "rollout")
    if parent is not None:
        RunLogger(client, parent, uri).log_metrics({**bench_metrics(rows), **rollout_metrics})
    return run_id
