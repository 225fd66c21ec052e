"""On-board benchmark: the runtime's own `bench` on each board's live release, gathered over SSH.

Each board runs ``<root>/venv/bin/python <release>/nativelm-runtime.pyz bench --model <release> --json``
on the release `current` points at (fleet.bench_prompt_len / bench_new_tokens / bench_repeats), and
keeps the JSON as ``<root>/bench/<release>.json`` (agent `save-bench`), which `fleet status` shows.
The controller prints a table and logs one MLflow run per rollout: metrics named
``board.<board>.<metric>`` (plus fleet-wide minimum and median decode speed), the table as
markdown and CSV, the raw JSON and a bar chart. Boards on different hosts run in parallel
(fleet.max_parallel at once); boards on one host (the simulated fleet) share its CPUs, so they are
benchmarked one after the other, for figures worth comparing.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from nativelm.fleet.board_job import StepFailed, connect_failure, failure_line, failures_as_steps
from nativelm.fleet.provision import for_each_board
from nativelm.fleet.ssh import BoardSession
from nativelm.fleet.ssh_trust import BoardError
from nativelm.formats.release import RUNTIME_FILE
from nativelm.tracking.runs import tracked_run

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.params.fleet import FleetParams
    from nativelm.params.root import Params

# runtime bench key -> table column
COLUMNS: dict[str, str] = {
    "prefill_tokens_per_s": "prefill tok/s",
    "decode_tokens_per_s": "decode tok/s",
    "time_to_first_token_ms": "TTFT ms",
    "peak_rss_mb": "peak RSS MB",
}
METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_ms", "inter_token_latency_p50_ms",
           "inter_token_latency_p95_ms", "peak_rss_mb", "rss_mb", "model_file_bytes", "threads")


@dataclass
class BenchRow:
    """One board's benchmark, or why there is none."""

    board: str
    release: str | None = None
    arch: str | None = None
    results: dict[str, Any] = field(default_factory=dict)  # the runtime's JSON
    error: str | None = None  # "phase: reason"

    @property
    def ops(self) -> str | None:
        """The graph the board benchmarked: nativelm:<kernel>, fallback or contrib (None: a runtime predating it)."""
        ops = self.results.get("ops")
        return ops if isinstance(ops, str) else None

    def value(self, key: str) -> float | None:
        value = self.results.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


BenchOne = Callable[["Board"], BenchRow]
BenchWave = Callable[[BenchOne, Sequence["Board"]], list[BenchRow]]


def bench_argv(session: BoardSession, release: str, fleet: FleetParams) -> list[str]:
    folder = session.path("releases", release)
    return [session.runtime_python, f"{folder}/{RUNTIME_FILE}", "bench", "--model", folder, "--json",
            "--prompt-len", str(fleet.bench_prompt_len), "--new-tokens", str(fleet.bench_new_tokens),
            "--repeats", str(fleet.bench_repeats)]


def bench_board(session: BoardSession, fleet: FleetParams) -> BenchRow:
    """Benchmark the live release of one connected board and store the JSON on the board."""
    row = BenchRow(session.board.name)
    phase = "facts"
    try:
        with failures_as_steps(lambda: phase):
            facts = session.agent("facts")
            row.arch, row.release = facts.get("arch"), facts.get("current")
            if not row.release:
                raise StepFailed("facts", "no live release to benchmark (deploy one first)")
            phase = "bench"
            row.results = run_bench(session, row.release, fleet)
            phase = "save-bench"
            session.agent("save-bench", row.release, stdin=json.dumps(row.results).encode())
    except StepFailed as exc:
        row.error = f"{exc.phase}: {exc.reason}"
    return row


def run_bench(session: BoardSession, release: str, fleet: FleetParams) -> dict[str, Any]:
    """The runtime's benchmark of the board's release folder `release` (StepFailed "bench" when it fails)."""
    done = session.run(bench_argv(session, release, fleet), check=False)
    if done.rc != 0:
        raise StepFailed("bench", failure_line(done.stderr or done.stdout))
    return parse_bench(done.stdout)


def parse_bench(stdout: str) -> dict[str, Any]:
    """The runtime's `bench --json` object (StepFailed when the board printed something else)."""
    try:
        results = json.loads(stdout)
    except ValueError:
        results = None
    if not isinstance(results, dict) or "decode_tokens_per_s" not in results:
        raise StepFailed("bench", f"the runtime printed no benchmark JSON (got {stdout[:80]!r})")
    return results


def bench_on(board: Board, inventory: Inventory, fleet: FleetParams) -> BenchRow:
    """Connect to `board` and benchmark it; an unreachable board is a row with its reason."""
    try:
        with BoardSession(board, inventory, fleet) as session:
            return bench_board(session, fleet)
    except BoardError as exc:
        failed = connect_failure(board.name, exc)
        return BenchRow(board.name, error=f"{failed.phase}: {failed.reason}")


def bench_waves(boards: Sequence[Board], parallel: int) -> list[tuple[Board, ...]]:
    """Boards benchmarked at the same time: at most `parallel`, never two on one host (they would share its CPUs)."""
    waves: list[list[Board]] = []
    for board in boards:
        wave = next((w for w in waves if len(w) < parallel and all(b.host != board.host for b in w)), None)
        if wave is None:
            waves.append([board])
        else:
            wave.append(board)
    return [tuple(wave) for wave in waves]


def in_threads(bench_one: BenchOne, wave: Sequence[Board]) -> list[BenchRow]:
    """Every board of a wave at the same time, in this process's threads."""
    return for_each_board(wave, len(wave), bench_one)


def bench_fleet(inventory: Inventory, boards: Sequence[Board], fleet: FleetParams, parallel: int | None = None,
                run_wave: BenchWave = in_threads, bench_one: BenchOne | None = None) -> list[BenchRow]:
    """Benchmark `boards` wave after wave of `bench_waves` (`run_wave` runs one); rows in the order of `boards`.

    `bench_one` measures one board (default: its live release, `bench_on`).
    """
    one = bench_one or (lambda b: bench_on(b, inventory, fleet))
    rows: dict[str, BenchRow] = {}
    for wave in bench_waves(boards, parallel or fleet.max_parallel):
        rows.update((row.board, row) for row in run_wave(one, wave))
    return [rows[b.name] for b in boards]


# --------------------------------------------------------------------------------------------
# table, chart, MLflow


def table_rows(rows: Sequence[BenchRow]) -> tuple[list[str], list[list[str]]]:
    header = ["board", "release", "arch", "ops", *COLUMNS.values(), "error"]
    body = []
    for row in rows:
        figures = [f"{row.value(k):.1f}" if row.value(k) is not None else "-" for k in COLUMNS]
        body.append([row.board, row.release or "-", row.arch or "-", row.ops or "-", *figures, row.error or ""])
    return header, body


def render_bench(rows: Sequence[BenchRow]) -> list[str]:
    """Aligned table lines for the terminal."""
    header, body = table_rows(rows)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *body]]


def bench_markdown(rows: Sequence[BenchRow]) -> str:
    header, body = table_rows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def bench_csv(rows: Sequence[BenchRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["board", "release", "arch", "ops", *METRICS, "error"])
    for row in rows:
        writer.writerow([row.board, row.release or "", row.arch or "", row.ops or "",
                         *["" if row.value(k) is None else row.value(k) for k in METRICS], row.error or ""])
    return out.getvalue()


def bench_chart(rows: Sequence[BenchRow], path: Path) -> Path:
    """Bar chart of prefill and decode tokens/s per board (boards without figures are left out).

    Drawn on a bare Figure (no pyplot): no GUI backend, nothing global, safe in any thread.
    """
    measured = [r for r in rows if r.value("decode_tokens_per_s") is not None]
    names = [r.board for r in measured]
    fig = Figure(figsize=(10, 1.2 + 0.4 * max(1, len(names))))
    axes = fig.subplots(1, 2, squeeze=False)
    for ax, key, title in ((axes[0][0], "prefill_tokens_per_s", "prefill tokens/s"),
                           (axes[0][1], "decode_tokens_per_s", "decode tokens/s")):
        ax.barh(names, [r.value(key) for r in measured], color="#4C72B0")
        ax.set_title(title)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"on-board benchmark ({len(measured)} of {len(rows)} boards)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def bench_metrics(rows: Sequence[BenchRow]) -> dict[str, float]:
    """`board.<name>.<metric>` for every measured figure, and fleet-wide decode speed summaries."""
    metrics: dict[str, float] = {}
    for row in rows:
        for key in METRICS:
            if row.value(key) is not None:
                metrics[f"board.{row.board}.{key}"] = row.value(key)
    decode = [r.value("decode_tokens_per_s") for r in rows if r.value("decode_tokens_per_s") is not None]
    metrics["fleet.boards_benched"] = float(len(decode))
    metrics["fleet.boards_failed"] = float(sum(r.error is not None for r in rows))
    if decode:
        metrics["fleet.decode_tokens_per_s_min"] = min(decode)
        metrics["fleet.decode_tokens_per_s_median"] = statistics.median(decode)
    return metrics


def log_bench_run(params: Params, rows: Sequence[BenchRow], *, rollout_id: str, release: str | None,
                  version: int | None = None, tags: Mapping[str, str] | None = None,
                  parent_run_id: str | None = None, name: str | None = None) -> str | None:
    """One MLflow run for a rollout's benchmark: metrics, table (markdown + CSV), raw JSON, chart.

    `name` is the run's name in the MLflow UI (default ``bench <rollout id>``).

    Returns the run id (None when tracking is off). Nothing from the inventory but board names is logged.
    """
    run_tags = {"rollout_id": rollout_id, "release": release or "", "model_version": "" if version is None
                else str(version), **(tags or {})}
    with tracked_run(params, name or f"bench {rollout_id}", "onboard-bench", parent_run_id=parent_run_id,
                     tags=run_tags) as run:
        if not run.active:
            return None
        fleet = params.fleet
        run.log_params({"bench_prompt_len": fleet.bench_prompt_len, "bench_new_tokens": fleet.bench_new_tokens,
                        "bench_repeats": fleet.bench_repeats, "boards": len(rows)})
        run.log_metrics(bench_metrics(rows))
        with tempfile.TemporaryDirectory(prefix="nativelm-bench-") as tmp:
            folder = Path(tmp)
            (folder / "bench.md").write_text(bench_markdown(rows), encoding="utf-8")
            (folder / "bench.csv").write_text(bench_csv(rows), encoding="utf-8")
            raw = {r.board: {"release": r.release, "arch": r.arch, "error": r.error, **r.results} for r in rows}
            (folder / "bench.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            bench_chart(rows, folder / "bench.png")
            run.log_artifacts(folder, "bench")
        return run.run_id
