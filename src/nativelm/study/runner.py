"""Running a study: every row trained, exported and evaluated the same way, resumable (docs/study.md).

Each (training, learning rate, seed) is a *cell* with its own folder under ``<out_dir>/<name>/``:
checkpoints (a killed study resumes mid-training, bit-exact on CPU), the model file, and per row
that exports it an ONNX folder, the evaluation and ``result.json``, written last and atomically.
A row whose result.json holds the same key (its resolved sections and the data) is not run again.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from nativelm.errors import NativelmError, ParamsError
from nativelm.evaluate.stage import Provenance, run_evaluate
from nativelm.export.stage import run_export
from nativelm.fleet.release import load_release
from nativelm.fleet.service import FleetChoice, choose_boards
from nativelm.fleet.trial import try_release
from nativelm.formats.prepared import read_manifest
from nativelm.fsutil import atomic_write_text
from nativelm.params.evaluate import EvaluateParams
from nativelm.params.export import ExportParams
from nativelm.params.model import ModelParams, with_preset
from nativelm.params.root import Params
from nativelm.params.study import StudyParams
from nativelm.params.train import TRAIN_PRESETS, TrainParams
from nativelm.study.devices import bind_device
from nativelm.study.rows import ROWS, TRAININGS, Row, Training, trainings_of
from nativelm.study.sizing import Bytes, bytes_of, export_bytes, size_to_match
from nativelm.tracking.flatten import params_hash
from nativelm.train.stage import TrainOutputs, run_train
from nativelm.yamlio import validation_line

M = TypeVar("M", bound=BaseModel)

RESULT = "result.json"
SIZING = "sizing.json"
BENCH_FIGURES = ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_ms",
                 "inter_token_latency_p50_ms", "peak_rss_mb")
TRAINED = "trained.json"  # a finished training: its key, final metrics and validation curve


def _validated(section: type[M], raw: dict[str, Any], where: str) -> M:
    """`raw` as a `section`, or one ParamsError line naming the row and the key."""
    try:
        return section.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(validation_line(f"study: {where}", exc)) from None


def _note(message: str) -> None:
    print(f"study: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Cell:
    """One training at one learning rate (None: the preset's) and one seed."""

    training: Training
    lr: float | None
    seed: int

    @property
    def slug(self) -> str:
        rate = "preset" if self.lr is None else f"{self.lr:g}"
        return f"{self.training.name}/lr{rate}_s{self.seed}"


class Study:
    """The rows of one study over the project's prepared data."""

    def __init__(self, params: Params, study: StudyParams) -> None:
        self.params, self.study = params, study
        self.folder = Path(study.out_dir) / study.name
        self.data_dir = Path(params.data.out_dir)
        try:
            manifest = read_manifest(self.data_dir)
        except (NativelmError, OSError):
            raise NativelmError(f"study: {self.data_dir}: no prepared data (run `nativelm prepare` first)") from None
        self.vocab_size = int(manifest["vocab_size"])
        self.data_hash = params_hash(manifest.get("sha256", {}))
        self._sized: dict[str, ModelParams] = {}
        # the boards of study.boards (`all`: every board of fleet.inventory), loaded here so that a wrong
        # inventory or board name stops the study before it trains anything
        self.fleet: FleetChoice | None = (
            choose_boards(params, [] if study.boards == ["all"] else list(study.boards)) if study.boards else None)
        self._on_boards = threading.Lock()  # one row on the boards at a time, also when cells run in parallel
        self._exporting = threading.Lock()

    # ---- what each cell and row is --------------------------------------------------------------
    def cells(self) -> list[Cell]:
        rates: list[float | None] = list(self.study.lrs) or [None]
        return [Cell(t, lr, seed) for t in trainings_of(list(self.study.rows)) for lr in rates
                for seed in self.study.seeds]

    def _family_params(self, training: Training) -> ModelParams:
        # evaluated at the length it trains at: a longer ONNX window would score full-attention rows on
        # positions they never saw, and sliding-window rows would not pay for it
        length = self.params.train.seq_len or TRAIN_PRESETS[self.study.preset]["seq_len"]
        raw = {"max_seq_len": int(length), **self.study.model, "family": training.family, **training.model}
        return with_preset(_validated(ModelParams, raw, f"{training.name}: model"), self.study.preset)

    def model_params(self, training: Training) -> ModelParams:
        """The training's model section: the family on the study's shape, sized where it is an equal-bytes row."""
        if training.sized_like is None:
            return self._family_params(training)
        if training.name not in self._sized:
            self._sized[training.name] = self._size(training)
        return self._sized[training.name]

    def _size(self, training: Training) -> ModelParams:
        key = params_hash({"base": self._family_params(training).model_dump(mode="json"), "vocab": self.vocab_size,
                           "target": self._family_params(TRAININGS[training.sized_like]).model_dump(mode="json"),
                           "export": self.params.export.model_dump(mode="json")})
        cache = self.folder / SIZING
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if key in known:
            return ModelParams.model_validate(known[key]["model"])
        target = export_bytes(self._family_params(TRAININGS[training.sized_like]), self.vocab_size,
                              self.export_params("ternary", False))
        sized, got = size_to_match(self._family_params(training), target, self.vocab_size,
                                   self.export_params("int4", False))
        _note(f"{training.name}: {sized.n_experts} experts x {sized.expert_ffn} / dense {sized.dense_ffn} wide: "
              f"int4 {got.total:,} bytes, {got.active_per_token:,.0f} per token against ternary {target.total:,} "
              f"and {target.active_per_token:,.0f} ({100 * got.mismatch(target):.1f}% apart)")
        known[key] = {"training": training.name, "model": sized.model_dump(mode="json"),
                      "int4": vars(got), "ternary_target": vars(target)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(known, indent=2, sort_keys=True) + "\n")
        return sized

    def train_params(self, cell: Cell) -> TrainParams:
        base = self.params.train.model_dump(mode="json")
        folder = self.folder / cell.slug
        raw = {**base, "preset": self.study.preset, "device": self.study.device, "resume": "auto",
               "checkpoint_dir": str(folder / "checkpoints"), "model_file": str(folder / "model.pt"),
               "metrics_file": str(folder / "train.json"), "plots_dir": str(folder / "plots"),
               **cell.training.train}
        if self.study.steps is not None:
            raw["max_steps"] = self.study.steps
            if raw.get("warmup_steps") is None:  # the preset's warmup, shortened for a short study
                warmup = TRAIN_PRESETS[self.study.preset]["warmup_steps"]
                raw["warmup_steps"] = min(int(warmup), self.study.steps // 10)
        if cell.lr is not None:
            raw["lr"] = cell.lr
        return _validated(TrainParams, raw, f"{cell.slug}: train")

    def export_params(self, variant: str, ptq: bool, folder: Path | None = None) -> ExportParams:
        raw = {**self.params.export.model_dump(mode="json"), "variant": variant}
        if ptq and variant == "ternary":
            raw["ptq"] = True
        if folder is not None:
            raw.update(out_dir=str(folder / "onnx"), metrics_file=str(folder / "export.json"))
        return _validated(ExportParams, raw, f"export {variant}")

    def evaluate_params(self, folder: Path) -> EvaluateParams:
        return _validated(EvaluateParams, {**self.params.evaluate.model_dump(mode="json"),
                                           "release_dir": str(folder / "release"),
                                           "metrics_file": str(folder / "evaluate.json")}, "evaluate")

    def row_key(self, row: Row, cell: Cell) -> str:
        """Everything that decides a row's figures; a result with another key is stale."""
        return params_hash({"model": self.model_params(cell.training).model_dump(mode="json"),
                            "train": self.train_params(cell).resolved().model_dump(mode="json"),
                            "export": self.export_params(row.variant, row.ptq).model_dump(mode="json"),
                            "seed": cell.seed, "data": self.data_hash})

    # ---- running ----------------------------------------------------------------------------------
    def finished(self, row: Row, cell: Cell) -> dict[str, Any] | None:
        path = self.folder / cell.slug / row.name / RESULT
        if not path.is_file():
            return None
        result = json.loads(path.read_text())
        return result if result.get("key") == self.row_key(row, cell) else None

    def run_cell(self, cell: Cell, on_result: Callable[[dict[str, Any]], None],
                 label: str = "", device: str | None = None) -> list[dict[str, Any]]:
        """One cell's training (on `device`, else study.device) and every requested row that exports it;
        `on_result` sees each new result. Cells on several devices export one at a time."""
        rows = [ROWS[r] for r in self.study.rows if ROWS[r].training == cell.training.name]
        done = {row.name: self._with_boards(self.finished(row, cell), self.folder / cell.slug / row.name)
                for row in rows}
        if all(done.values()):
            _note(f"{label}{cell.slug}: finished before, kept")
            return [r for r in done.values() if r]
        _note(f"{label}training {cell.slug} ({', '.join(r.name for r in rows)})")
        self.model_params(cell.training)  # an equal-bytes row is sized before it trains
        trained = self._train(cell, device)
        results = []
        for row in rows:
            result = done[row.name]
            if result is None:
                with self._exporting:  # CPU speed figures are measured with no other export beside them
                    result = self._export_and_evaluate(row, cell, trained)
                if "error" not in result:
                    on_result(result)
            results.append(result)
        return results

    def run(self, on_result: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        """Every cell, one after another."""
        cells = self.cells()
        return [result for i, cell in enumerate(cells, 1)
                for result in self.run_cell(cell, on_result, f"[{i}/{len(cells)}] ")]

    def training_key(self, cell: Cell) -> str:
        """Everything that decides a training; a kept model with another key is trained again."""
        return params_hash({"model": self.model_params(cell.training).model_dump(mode="json"),
                            "train": self.train_params(cell).resolved().model_dump(mode="json"),
                            "seed": cell.seed, "data": self.data_hash})

    def _train(self, cell: Cell, device: str | None = None) -> dict[str, Any]:
        """Train a cell (or keep its model); `device` (study.devices) is not part of its key."""
        train = self.train_params(cell)
        if device is not None:
            train = train.model_copy(update={"device": bind_device(device)})
        out = TrainOutputs.of(train)
        record = out.metrics_file.parent / TRAINED
        key = self.training_key(cell)
        if out.model_file.is_file() and record.is_file():
            kept = json.loads(record.read_text())
            if kept.get("key") == key:
                return kept
        result = run_train(self.model_params(cell.training), train, cell.seed, self.data_dir, out)
        curve = [[int(h["step"]), float(h["val/loss"])] for h in result.history if "val/loss" in h]
        trained = {"key": key, "metrics": result.metrics, "curve": curve}
        atomic_write_text(record, json.dumps(trained) + "\n")
        return trained

    def _bench(self, export_dir: Path) -> dict[str, float]:
        """Decode / prefill speed and peak memory of the export in a process of its own, as a board runs it.

        The study's own process has trained and scored other rows, so its peak memory says nothing.
        """
        ev = self.params.evaluate
        command = [sys.executable, "-m", "nativelm.runtime", "bench", "--model", str(export_dir), "--json",
                   "--prompt-len", str(ev.bench_prompt_len), "--new-tokens", str(ev.bench_new_tokens),
                   "--repeats", str(ev.bench_repeats)] + (["--threads", str(ev.threads)] if ev.threads else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NativelmError(f"study: benchmark of {export_dir}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        figures = json.loads(done.stdout)
        return {k: float(figures[k]) for k in BENCH_FIGURES if isinstance(figures.get(k), (int, float))}

    def _export_and_evaluate(self, row: Row, cell: Cell, trained: dict[str, Any]) -> dict[str, Any]:
        folder = self.folder / cell.slug / row.name
        _note(f"{cell.slug}: {row.name}: export {row.variant}{' (post-training quantization)' if row.ptq else ''}")
        export = self.export_params(row.variant, row.ptq, folder)
        try:
            exported = run_export(Path(self.train_params(cell).model_file), self.data_dir, export)
            evaluated = run_evaluate(exported.out_dir, self.data_dir, self.evaluate_params(folder),
                                     Provenance("study", self.data_hash, self.row_key(row, cell)))
            speed = self._bench(exported.out_dir)
        except NativelmError as exc:  # a refused export is the row's result: the study goes on
            _note(f"{cell.slug}: {row.name}: {exc}")
            failed = {"key": self.row_key(row, cell), "row": row.name, "training": cell.training.name,
                      "method": row.method, "lr": self.train_params(cell).resolved().lr, "seed": cell.seed,
                      "error": str(exc)}
            atomic_write_text(folder / RESULT, json.dumps(failed, indent=2, sort_keys=True) + "\n")
            return failed
        model = self.model_params(cell.training)
        parts = {k: v["bytes"] for k, v in exported.manifest["weights"]["parts"].items()}
        weight_bytes: Bytes = bytes_of(parts, model, self.vocab_size)
        result = {
            "key": self.row_key(row, cell), "row": row.name, "training": cell.training.name,
            "family": cell.training.family, "method": row.method, "variant": row.variant, "ptq": row.ptq,
            "lr": self.train_params(cell).resolved().lr, "seed": cell.seed,
            "shape": {k: getattr(model, k) for k in ("d_model", "n_layers", "ffn", "n_experts", "expert_ffn",
                                                     "top_k", "dense_ffn", "quantize")},
            "train": {k: v for k, v in trained["metrics"].items() if isinstance(v, (int, float))},
            "export": {k: v for k, v in exported.metrics.items() if isinstance(v, (int, float))},
            "evaluate": {**{k: v for k, v in evaluated.metrics.items() if isinstance(v, (int, float))}, **speed},
            "weight_bytes": weight_bytes.total, "active_bytes_per_token": weight_bytes.active_per_token,
            "curve": trained["curve"],
        }
        atomic_write_text(folder / RESULT, json.dumps(result, indent=2, sort_keys=True) + "\n")
        return self._with_boards(result, folder)

    # ---- on the boards ------------------------------------------------------------------------------
    def _with_boards(self, result: dict[str, Any] | None, folder: Path) -> dict[str, Any] | None:
        """`result` with the decode speed of its release on every board of study.boards it lacks (saved).

        A board that fails is recorded with its reason and the row keeps its other figures.
        """
        if self.fleet is None or result is None or "error" in result:
            return result
        with self._on_boards:
            return self._measure_on_boards(self.fleet, result, folder)

    def _measure_on_boards(self, chosen: FleetChoice, result: dict[str, Any], folder: Path) -> dict[str, Any]:
        known = result.get("boards", {})
        wanted = [b for b in chosen.boards if "decode_tokens_per_s" not in known.get(b.name, {})]
        if not wanted:
            return result
        _note(f"{result['row']}: on {len(wanted)} board(s), not made live: {', '.join(b.name for b in wanted)}")
        for row in try_release(self.params, chosen, load_release(folder / "release"), wanted):
            known[row.board] = ({"error": row.error} if row.error else
                                {k: row.value(k) for k in BENCH_FIGURES if row.value(k) is not None})
            if row.error:
                _note(f"{result['row']}: {row.board}: {row.error}")
        result["boards"] = known
        speeds = [f["decode_tokens_per_s"] for f in known.values() if "decode_tokens_per_s" in f]
        result["evaluate"].pop("board_decode_tokens_per_s", None)
        if speeds:
            result["evaluate"]["board_decode_tokens_per_s"] = statistics.median(speeds)
        atomic_write_text(folder / RESULT, json.dumps(result, indent=2, sort_keys=True) + "\n")
        return result
