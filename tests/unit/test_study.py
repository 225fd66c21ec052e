"""The study's pieces: rows, equal-bytes sizing against the real exporter, the table and the frontier."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from nativelm.errors import ParamsError
from nativelm.params.export import ExportParams
from nativelm.params.model import ModelParams
from nativelm.params.root import parse_params
from nativelm.params.study import ALL_ROWS, StudyParams
from nativelm.study.charts import frontier, write_charts
from nativelm.study.report import markdown, summarize, write_tables
from nativelm.study.rows import ROWS, TRAININGS, trainings_of
from nativelm.study.sizing import export_bytes, size_to_match

VOCAB = 512
SHAPE = {"d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, "window": 16,
         "nope_every": 2, "n_experts": 8, "expert_ffn": 128, "top_k": 2}


def test_rows_and_params_name_the_same_rows() -> None:
    assert tuple(ROWS) == ALL_ROWS
    assert all(r.training in TRAININGS for r in ROWS.values())
    assert all(t.sized_like in TRAININGS for t in TRAININGS.values() if t.sized_like)


def test_ptq_rows_share_the_fp_training() -> None:
    needed = [t.name for t in trainings_of(["fp_moe", "fp_moe_int4_ptq", "fp_moe_ternary_ptq", "ternary_moe"])]
    assert needed == ["fp_moe", "ternary_moe"]


def test_study_params_refuse_bad_grids() -> None:
    with pytest.raises(ParamsError, match="learning rate"):
        parse_params("study: {lrs: [0.0]}")
    with pytest.raises(ParamsError, match="twice"):
        parse_params("study: {rows: [fp_moe, fp_moe]}")
    with pytest.raises(ParamsError, match="rows"):
        parse_params("study: {rows: [nope]}")
    assert StudyParams().rows[0] == "fp_moe"


def test_equal_bytes_sizing_matches_the_real_export() -> None:
    """The int4 fp model it picks weighs what the ternary target does, measured by the exporter itself."""
    ternary = ModelParams.model_validate(SHAPE)
    target = export_bytes(ternary, VOCAB, ExportParams(variant="ternary"))
    fp = ModelParams.model_validate({**SHAPE, "quantize": False})
    sized, got = size_to_match(fp, target, VOCAB, ExportParams(variant="int4"))
    assert got == export_bytes(sized, VOCAB, ExportParams(variant="int4"))
    same_shape = export_bytes(fp, VOCAB, ExportParams(variant="int4"))
    assert same_shape.total > 1.3 * target.total  # int4 of the same shape is far heavier
    assert got.mismatch(target) < 0.5 * same_shape.mismatch(target)
    assert sized.expert_ffn < fp.expert_ffn


def _result(row: str, method: str, lr: float, seed: int, nll: float) -> dict:
    return {"row": row, "method": method, "family": "smallthinker", "variant": "ternary", "training": row,
            "ptq": method == "ptq", "lr": lr, "seed": seed, "weight_bytes": 1000, "active_bytes_per_token": 400.0,
            "train": {"val_loss": nll + 0.01}, "export": {"bits_per_weight": 2.1, "model_bytes": 1200},
            "evaluate": {"nll_onnx": nll, "ppl_onnx": 2.718281828 ** nll, "decode_tokens_per_s": 100.0 * seed,
                         "prefill_tokens_per_s": 500.0, "peak_rss_mb": 90.0, "model_bytes": 1200},
            "curve": [[0, 6.0], [10, nll]]}


def test_each_row_is_reported_at_its_best_rate_with_the_spread_of_seeds(tmp_path: Path) -> None:
    results = [_result("a", "native", 0.001, 1, 4.0), _result("a", "native", 0.001, 2, 4.2),
               _result("a", "native", 0.003, 1, 3.9), _result("a", "native", 0.003, 2, 4.0),
               _result("b", "ptq", 0.001, 1, 3.5), _result("b", "ptq", 0.003, 1, 3.6)]
    a, b = summarize(results)
    assert (a.row, a.lr, a.seeds) == ("a", 0.003, 2) and a.nll_onnx.mean == pytest.approx(3.95)
    assert (a.nll_onnx.low, a.nll_onnx.high) == (3.9, 4.0)
    assert a.nll_by_lr == {0.001: pytest.approx(4.1), 0.003: pytest.approx(3.95)}
    assert b.lr == 0.001 and b.seeds == 1
    table = markdown([a, b])
    assert "| a | native | ternary | 0.003 | 2 | 3.9500 ± 0.0500 |" in table
    files = write_tables([a, b], tmp_path) + write_charts([a, b], tmp_path)
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert rows[0]["row"] == "a" and float(rows[0]["nll_onnx_low"]) == 3.9
    assert json.loads(rows[0]["nll_by_lr"]) == {"0.001": pytest.approx(4.1), "0.003": pytest.approx(3.95)}


def test_frontier_keeps_the_points_nothing_beats() -> None:
    points = [(1.0, 10.0), (2.0, 8.0), (3.0, 9.0), (4.0, 5.0)]
    assert frontier(points, more_is_better=False) == [(1.0, 10.0), (2.0, 8.0), (4.0, 5.0)]
    assert frontier(points, more_is_better=True) == [(4.0, 5.0)]


def test_a_refused_row_is_listed_under_the_table_not_measured(tmp_path: Path) -> None:
    failed = {"row": "c", "method": "ptq", "lr": 0.003, "seed": 1, "error": "export int4: parity failed: x"}
    results = [_result("a", "native", 0.003, 1, 3.9), failed]
    summaries = summarize(results)
    assert [s.row for s in summaries] == ["a"]
    write_tables(summaries, tmp_path, [failed])
    assert "- c (lr 0.003, seed 1): export int4: parity failed: x" in (tmp_path / "table.md").read_text()
