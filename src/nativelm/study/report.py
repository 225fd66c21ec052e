"""The study's table: every row at its best learning rate, mean and spread over seeds (docs/study.md).

The best rate of a row is the one with the lowest mean ONNX validation loss over the seeds: the
optimum differs by method, so each is shown at its own. Written as CSV and Markdown.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nativelm.fsutil import atomic_write_text

TABLE_CSV = "table.csv"
TABLE_MD = "table.md"


@dataclass(frozen=True)
class Spread:
    """Mean, lowest and highest of one figure over the seeds."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.fmean(values), min(values), max(values))

    def text(self, digits: int) -> str:
        if self.high - self.low < 10 ** -digits:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {(self.high - self.low) / 2:.{digits}f}"


@dataclass(frozen=True)
class RowSummary:
    """One line of the table."""

    row: str
    method: str
    family: str
    variant: str
    lr: float
    seeds: int
    nll_onnx: Spread
    ppl_onnx: Spread
    val_loss: Spread
    file_bytes: int
    weight_bytes: int
    active_bytes_per_token: float
    bits_per_weight: float
    decode_tokens_per_s: Spread
    prefill_tokens_per_s: Spread
    peak_rss_mb: float
    board_decode_tokens_per_s: Spread | None  # median over study.boards (None: not measured on boards)
    nll_by_lr: dict[float, float]
    curves: list[list[list[float]]]  # the best rate's validation curve of each seed


def _values(results: Sequence[dict[str, Any]], section: str, key: str) -> list[float]:
    return [float(r[section][key]) for r in results if key in r[section]]


def _spread_or_none(values: Sequence[float]) -> Spread | None:
    return Spread.of(values) if values else None


def summarize(results: Sequence[dict[str, Any]]) -> list[RowSummary]:
    """One summary per row, in the order rows first appear in `results`."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for result in (r for r in results if "error" not in r):
        rows.setdefault(result["row"], []).append(result)
    summaries = []
    for name, found in rows.items():
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for result in found:
            by_lr.setdefault(float(result["lr"]), []).append(result)
        nll_by_lr = {lr: statistics.fmean(_values(rs, "evaluate", "nll_onnx")) for lr, rs in sorted(by_lr.items())}
        best = min(nll_by_lr, key=nll_by_lr.__getitem__)
        picked = by_lr[best]
        first = picked[0]
        summaries.append(RowSummary(
            row=name, method=first["method"], family=first["family"], variant=first["variant"], lr=best,
            seeds=len(picked),
            nll_onnx=Spread.of(_values(picked, "evaluate", "nll_onnx")),
            ppl_onnx=Spread.of(_values(picked, "evaluate", "ppl_onnx")),
            val_loss=Spread.of(_values(picked, "train", "val_loss")),
            file_bytes=int(first["evaluate"].get("model_bytes", first["export"].get("model_bytes", 0))),
            weight_bytes=int(first["weight_bytes"]), active_bytes_per_token=float(first["active_bytes_per_token"]),
            bits_per_weight=float(first["export"].get("bits_per_weight", 0.0)),
            decode_tokens_per_s=Spread.of(_values(picked, "evaluate", "decode_tokens_per_s") or [0.0]),
            prefill_tokens_per_s=Spread.of(_values(picked, "evaluate", "prefill_tokens_per_s") or [0.0]),
            peak_rss_mb=max(_values(picked, "evaluate", "peak_rss_mb") or [0.0]),
            board_decode_tokens_per_s=_spread_or_none(_values(picked, "evaluate", "board_decode_tokens_per_s")),
            nll_by_lr=nll_by_lr, curves=[r["curve"] for r in picked]))
    return summaries


COLUMNS = ("row", "method", "variant", "best lr", "seeds", "ONNX val loss", "ONNX ppl", "PyTorch val loss",
           "file MB", "weights read MB/token", "bits/weight", "decode tok/s", "prefill tok/s", "peak RSS MB",
           "val loss by lr")
BOARD_COLUMN = "board decode tok/s"  # after "decode tok/s", when some row was measured on boards


def _cells(s: RowSummary, boards: bool) -> list[str]:
    grid = ", ".join(f"{lr:g}: {nll:.4f}" for lr, nll in s.nll_by_lr.items())
    on_boards = [s.board_decode_tokens_per_s.text(0) if s.board_decode_tokens_per_s else "-"] if boards else []
    return [s.row, s.method, s.variant, f"{s.lr:g}", str(s.seeds), s.nll_onnx.text(4), s.ppl_onnx.text(2),
            s.val_loss.text(4), f"{s.file_bytes / 1e6:.2f}", f"{s.active_bytes_per_token / 1e6:.3f}",
            f"{s.bits_per_weight:.2f}", s.decode_tokens_per_s.text(0), *on_boards, s.prefill_tokens_per_s.text(0),
            f"{s.peak_rss_mb:.0f}", grid]


def markdown(summaries: Sequence[RowSummary], failures: Sequence[dict[str, Any]] = ()) -> str:
    """The table; below it, the rows (rate, seed) whose export or evaluation was refused, and why."""
    boards = any(s.board_decode_tokens_per_s for s in summaries)
    columns = list(COLUMNS)
    if boards:
        columns.insert(columns.index("decode tok/s") + 1, BOARD_COLUMN)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cells(s, boards)) + " |" for s in summaries]
    if failures:
        lines += ["", "Not measured:"]
        lines += [f"- {f['row']} (lr {f['lr']:g}, seed {f['seed']}): {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


def failures_of(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if "error" in r]


def _flat(s: RowSummary) -> dict[str, Any]:
    """A summary as CSV cells: a spread as _mean/_low/_high, the rate grid as JSON."""
    flat: dict[str, Any] = {}
    for key, value in asdict(s).items():
        if key == "curves":
            continue
        if value is None:  # a figure not measured: its three cells empty
            flat.update({f"{key}_{part}": None for part in ("mean", "low", "high")})
        elif isinstance(value, dict) and set(value) == {"mean", "low", "high"}:
            flat.update({f"{key}_{part}": value[part] for part in ("mean", "low", "high")})
        elif key == "nll_by_lr":
            flat[key] = json.dumps({f"{lr:g}": nll for lr, nll in value.items()})
        else:
            flat[key] = value
    return flat


def write_tables(summaries: Sequence[RowSummary], folder: Path, failures: Sequence[dict[str, Any]] = ()) -> list[Path]:
    """table.md (what the README and MLflow show) and table.csv (every figure, unrounded)."""
    rows = [_flat(s) for s in summaries]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / TABLE_CSV, out.getvalue())
    atomic_write_text(folder / TABLE_MD, markdown(summaries, failures))
    return [folder / TABLE_MD, folder / TABLE_CSV]
