"""`nativelm study`: run the rows, log them to MLflow, write the table and the charts (docs/study.md).

One MLflow parent run per study (its id is kept in the study's folder, so a resumed study goes on
logging into it) and one nested run per row, seed and learning rate, logged when the row is done:
the retrain pipeline's metric names (``train/…``, ``export/…``, ``evaluate/…``), the validation
curve as ``val/loss`` by step, the figures measured on boards (study.boards) as
``board.<board>.<figure>`` (their median decode speed is ``evaluate/board_decode_tokens_per_s``),
and the tags ``study/row``, ``study/family``, ``study/method``, ``study/ptq``, ``study/lr``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nativelm.fsutil import atomic_write_text
from nativelm.params.root import Params
from nativelm.params.study import StudyParams
from nativelm.study.charts import write_charts
from nativelm.study.devices import on_devices
from nativelm.study.report import RowSummary, failures_of, markdown, summarize, write_tables
from nativelm.study.runner import Study
from nativelm.tracking.runs import RunLogger, tracked_run

PARENT_RUN = "mlflow_run.json"


@dataclass
class StudyResult:
    """What a study produced."""

    folder: Path
    summaries: list[RowSummary]
    results: list[dict[str, Any]]
    files: list[Path]
    run: RunLogger


def _row_run(params: Params, parent: RunLogger, result: dict[str, Any]) -> None:
    """The nested MLflow run of one row result."""
    if not parent.active:
        return
    name = f"{result['row']} lr {result['lr']:g} seed {result['seed']}"
    tags = {"study/row": result["row"], "study/family": result["family"], "study/method": result["method"],
            "study/ptq": str(result["ptq"]).lower(), "study/lr": f"{result['lr']:g}",
            "study/training": result["training"]}
    with tracked_run(params, name, "study-row", parent_run_id=parent.run_id, tags=tags) as run:
        run.log_params({"seed": result["seed"], "lr": result["lr"], "variant": result["variant"],
                        "shape": result["shape"]})
        run.log_metrics({f"{section}/{k}": v for section in ("train", "export", "evaluate")
                         for k, v in result[section].items()})
        run.log_metrics({"study/weight_bytes": result["weight_bytes"],
                         "study/active_bytes_per_token": result["active_bytes_per_token"]})
        run.log_metrics({f"board.{board}.{k}": v for board, figures in result.get("boards", {}).items()
                         for k, v in figures.items() if k != "error"})
        for step, loss in result["curve"]:
            run.log_metrics({"val/loss": loss}, step=int(step))


def _study_tracking(params: Params, study: StudyParams) -> Params:
    return params.model_copy(update={"tracking": params.tracking.model_copy(update={"experiment": study.experiment})})


CellMap = Callable[[Study, Callable[[dict[str, Any]], None]], list[dict[str, Any]]]


def one_after_another(runner: Study, on_result: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """The cells in this process, in order (the CLI's way; the Prefect flow maps them onto tasks)."""
    return runner.run(on_result)


def run_study(params: Params, study: StudyParams, run_cells: CellMap | None = None) -> StudyResult:
    """Every row of `study` (resuming what a previous start finished), then the table and charts; the cells
    run as `run_cells` maps them, by default one per device of study.devices at once, else one after another."""
    if run_cells is None:
        run_cells = on_devices(study.devices) if study.devices else one_after_another
    started = time.perf_counter()
    runner = Study(params, study)
    folder = runner.folder
    folder.mkdir(parents=True, exist_ok=True)
    tracking = _study_tracking(params, study)
    id_file = folder / PARENT_RUN
    previous = json.loads(id_file.read_text()).get("run_id") if id_file.is_file() else None
    with tracked_run(tracking, f"study {study.name}", "study", tags={"study/name": study.name},
                     resume_run_id=previous) as parent:
        if parent.active:
            atomic_write_text(id_file, json.dumps({"run_id": parent.run_id}) + "\n")
            parent.log_params({"study": study.model_dump(mode="json")})
        results = run_cells(runner, lambda result: _row_run(tracking, parent, result))
        summaries, failures = summarize(results), failures_of(results)
        files = write_tables(summaries, folder, failures) + write_charts(summaries, folder)
        for path in files:
            parent.log_artifact(path)
        parent.log_metrics({"study/rows": len(summaries), "study/results": len(results),
                            "study/wall_s": time.perf_counter() - started})
    print(markdown(summaries, failures), end="")
    print(f"study: {len(summaries)} rows, table and charts in {folder}", file=sys.stderr)
    return StudyResult(folder, summaries, results, files, parent)
