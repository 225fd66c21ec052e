"""The train stage end to end on a synthetic prepared folder: outputs, logged metric names,
model file round trip, exact in-process resume, resume rules, the compile flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from nativelm.errors import NativelmError, ParamsError
from nativelm.model import ModelParams
from nativelm.model.trained import load_trained_model
from nativelm.params.train import TrainParams
from nativelm.train.loop import torch_threads
from nativelm.train.metrics import FINAL_NAMES, interval_metric_names
from nativelm.train.stage import TrainOutputs, TrainResult, run_train
from tests.unit.test_train_data import write_token_data

SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "n_experts": 4, "expert_ffn": 16,
         "top_k": 2, "window": 8, "max_seq_len": 64}


SEED = 1234  # params.yaml's default


class StageInputs(NamedTuple):
    """What the stage takes besides the logger, as the CLI resolves it from params.yaml."""

    model: ModelParams
    train: TrainParams
    data_dir: Path


class RecordingLogger:
    """Collects what the stage logs (the RunLogger interface), so names can be checked."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_params(self, values: dict[str, Any]) -> None:
        self.params.update(values)

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(values)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        assert Path(path).is_file()
        self.artifacts.append((Path(path), artifact_path))


def train_stage(inputs: StageInputs, logger: RecordingLogger | None = None, *,
                stop_after: int | None = None) -> TrainResult:
    """The stage as the CLI calls it: the outputs are the train section's paths."""
    return run_train(inputs.model, inputs.train, SEED, inputs.data_dir, TrainOutputs.of(inputs.train), logger,
                     stop_after=stop_after)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_data(tmp_path_factory.mktemp("tokens") / "prepared")


def make_params(token_dir: Path, out: Path, model: dict | None = None, **train: Any) -> StageInputs:
    values = {"seq_len": 32, "batch_size": 8, "max_steps": 40, "warmup_steps": 4, "log_interval": 5,
              "eval_interval": 20, "eval_batches": 2, "checkpoint_interval": 10, "threads": 1, "progress": False,
              "checkpoint_dir": str(out / "checkpoints"), "model_file": str(out / "models/model.pt"),
              "metrics_file": str(out / "metrics/train.json"), "plots_dir": str(out / "plots"), **train}
    return StageInputs(ModelParams(**{**SMALL, **(model or {})}), TrainParams.model_validate(values), token_dir)


def test_stage_writes_model_metrics_plots_and_logs_fixed_names(token_dir: Path, tmp_path: Path) -> None:
    logger = RecordingLogger()
    params = make_params(token_dir, tmp_path, model={"bit_schedule": [[0.0, 8.0], [0.5, 1.58]]}, max_steps=60,
                         lr=1e-2)
    result = train_stage(params, logger)

    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert set(FINAL_NAMES) <= set(metrics)
    assert metrics["steps"] == 60 and metrics["tokens"] == 60 * 8 * 32
    assert metrics["val_loss"] < metrics["unigram_xent_val"] - 0.5  # it learned context, not just frequencies
    assert 0.0 <= metrics["neuron_sparsity"] <= 1.0 and metrics["expert_load_cv"] >= 0.0
    assert metrics["active_params"] < metrics["total_params"]
    assert "mfu" not in metrics  # CPU

    expected = set(interval_metric_names(2))
    final = [values for _, values in logger.metrics if any(k.startswith("final/") for k in values)]
    assert len(final) == 1 and set(final[0]) == {f"final/{k}" for k in FINAL_NAMES}
    interval = [(step, values) for step, values in logger.metrics if values is not final[0]]
    val_steps = {step for step, values in interval if "val/loss" in values}
    assert val_steps == {20, 40, 60}
    for step, values in interval:
        names = set(values) if step in val_steps else set(values) | {"val/loss", "val/perplexity"}
        assert names == expected, (step, sorted(names ^ expected))
    bits = {step: values["bits"] for step, values in interval}
    assert bits[5] == 8.0 and bits[60] == 1.58  # progressive precision is logged
    assert {p.name for p, _ in logger.artifacts} == {"loss.png", "expert_load.png", "train.json"}
    for name in ("loss.png", "expert_load.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert logger.params["resolved"]["train"]["max_steps"] == 60

    model, info = load_trained_model(tmp_path / "models/model.pt")
    assert info["step"] == 60 and info["weight_bits"] == 1.58 and info["vocab_size"] == 128
    x = torch.randint(0, 128, (2, 16))
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, result.model(x).logits)


def test_interrupted_run_resumes_to_identical_weights(token_dir: Path, tmp_path: Path) -> None:
    straight = train_stage(make_params(token_dir, tmp_path / "a"))
    interrupted = make_params(token_dir, tmp_path / "b")
    partial = train_stage(interrupted, stop_after=27)  # stops after step 27; last checkpoint at 20
    assert partial.steps == 27 and not (tmp_path / "b/models/model.pt").exists()
    resumed = train_stage(interrupted)
    assert resumed.resumed_from == 20
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["val_loss"] == straight.metrics["val_loss"]
    # a finished run resumes to the end at once and reports the same figures
    again = train_stage(interrupted)
    assert again.resumed_from == 40 and again.metrics["val_loss"] == straight.metrics["val_loss"]


def test_changed_settings_start_fresh_and_require_refuses(token_dir: Path, tmp_path: Path) -> None:
    train_stage(make_params(token_dir, tmp_path), stop_after=10)
    fresh = train_stage(make_params(token_dir, tmp_path, lr=1e-3, max_steps=10, warmup_steps=2))
    assert fresh.resumed_from is None and fresh.steps == 10
    with pytest.raises(NativelmError, match="made with different settings"):
        train_stage(make_params(token_dir, tmp_path, lr=2e-3, resume="require"))
    with pytest.raises(NativelmError, match="holds no checkpoint"):
        train_stage(make_params(token_dir, tmp_path / "empty", resume="require"))
    off = train_stage(make_params(token_dir, tmp_path, lr=1e-3, max_steps=10, warmup_steps=2, resume="off"))
    assert off.resumed_from is None


def test_unusable_model_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NativelmError, match="model file not found"):
        load_trained_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(NativelmError, match="unreadable model file"):
        load_trained_model(tmp_path / "junk.pt")


def test_seq_len_longer_than_the_model_is_a_params_error(token_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="exceeds model.max_seq_len"):
        train_stage(make_params(token_dir, tmp_path, seq_len=128))


def test_compile_flag_wraps_the_model(token_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[torch.nn.Module] = []

    def fake_compile(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        compiled.append(module)  # compiling for real takes minutes on this CPU; the flag path is what is tested
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    train_stage(make_params(token_dir, tmp_path, compile=True, max_steps=2, warmup_steps=0, decay_frac=0.5))
    assert len(compiled) == 1


@pytest.mark.parametrize(("setting", "device", "model", "expected"), [
    ("auto", "cuda", {"ffn": "dense"}, True), ("auto", "cpu", {"ffn": "dense"}, False), (True, "cpu", {}, True),
    (False, "cuda", {"ffn": "dense"}, False), ("auto", "cuda", {}, False), ("auto", "cuda", {"quantize": False}, False),
    ("auto", "cuda", {"expert_quant": "int8"}, False), ("auto", "cuda", {"quantize": False, "ffn": "dense"}, True),
    (True, "cuda", {"quantize": False}, True)])
def test_compile_auto_means_cuda_only(setting: bool | str, device: str, model: dict, expected: bool) -> None:
    """The default `train.compile: auto` compiles on CUDA (the faster step) and keeps CPU runs eager
    (bit-exact on resume), and a MoE of any experts eager (docs/training.md); an explicit true / false wins."""
    from nativelm.params.model import ModelParams
    from nativelm.train.stage import compiles

    assert compiles(setting, torch.device(device), ModelParams(**model)) is expected


def test_compile_setting_refuses_other_words() -> None:
    from nativelm.params.train import TrainParams

    assert TrainParams(compile="auto").compile == "auto" and TrainParams(compile=False).compile is False
    with pytest.raises(ValueError, match="compile"):
        TrainParams(compile="sometimes")
