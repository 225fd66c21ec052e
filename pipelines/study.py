"""Prefect flow `study`: native against compressed on the project's data (the dashboard's form).

Thin on purpose: the form's fields override params.yaml's `study` section for this run; each cell of
the study (one training at one learning rate and seed, with the rows that export it) is a Prefect
task, `parallel` of them at a time (one per GPU or worker; 1 on a CPU). The logic lives in
nativelm.study; a study started again continues from what its folder holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NONE

from nativelm.params.root import load_params
from nativelm.params.study import RowName
from nativelm.study.runner import Cell, Study
from nativelm.study.stage import run_study

PROJECT_DIR = Path(__file__).resolve().parents[1]


@task(name="study-cell", task_run_name="study-{cell.slug}", cache_policy=NONE)
def run_cell(runner: Study, cell: Cell, on_result: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """One training and the rows that export it."""
    return runner.run_cell(cell, on_result)


def as_tasks(parallel: int) -> Callable[[Study, Callable[[dict[str, Any]], None]], list[dict[str, Any]]]:
    """Run the cells as Prefect tasks, at most `parallel` at a time, results in the cells' order."""

    def run_cells(runner: Study, on_result: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        futures = []
        for cell in runner.cells():
            if len(futures) >= parallel:
                futures[len(futures) - parallel].wait()
            futures.append(run_cell.submit(runner, cell, on_result))
        return [result for future in futures for result in future.result()]

    return run_cells


@flow(name="study", log_prints=True)
def study(
    rows: list[RowName] | None = None,
    preset: Literal["tiny", "gpu"] | None = None,
    steps: int | None = None,
    seeds: list[int] | None = None,
    learning_rates: list[float] | None = None,
    device: Literal["auto", "cpu", "cuda"] | None = None,
    name: str | None = None,
    boards: list[str] | None = None,
    parallel: int = 1,
) -> dict:
    """Train, export and compare the study's rows; empty fields keep params.yaml's `study` values.

    Args:
        rows: rows to run (study.rows)
        preset: model shape and run size of every row: tiny (CPU) or gpu (study.preset)
        steps: optimizer steps of every row (study.steps)
        seeds: seeds; several give mean and spread (study.seeds)
        learning_rates: the grid each row is trained at (study.lrs)
        device: auto, cpu or cuda (study.device)
        name: the study's name: its folder and MLflow run (study.name)
        boards: boards of the fleet every row is also benchmarked on, never made live; [all]: every board
            (study.boards)
        parallel: cells trained at the same time (one per GPU or worker); with study.devices in params.yaml,
            one cell per device instead
    """
    params = load_params(PROJECT_DIR / "params.yaml")
    section = params.study.with_overrides(
        {"rows": rows, "preset": preset, "steps": steps, "seeds": seeds, "lrs": learning_rates,
         "device": device, "name": name, "boards": boards}, "study (params.yaml and the form)")
    result = run_study(params, section, None if section.devices else as_tasks(max(1, parallel)))
    return {"folder": str(result.folder), "rows": [s.row for s in result.summaries],
            "best": {s.row: {"lr": s.lr, "ppl_onnx": s.ppl_onnx.mean} for s in result.summaries}}


if __name__ == "__main__":
    study()
