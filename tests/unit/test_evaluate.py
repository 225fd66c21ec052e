"""The `evaluate` stage on a tiny exported model: metrics, the release folder, and a corrupted export.

The registration path (MLflow model registry) runs against a real server in
tests/integration/test_pipeline.py.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from nativelm.errors import NativelmError
from nativelm.evaluate.stage import Provenance, run_evaluate
from nativelm.export.stage import run_export
from nativelm.formats.export_folder import MANIFEST, MODEL_FILE, TOKENIZER_FILE
from nativelm.formats.release import MANIFEST as RELEASE_MANIFEST
from nativelm.formats.release import RUNTIME_FILE
from nativelm.fsutil import sha256_file
from nativelm.model import ModelParams, build_model
from nativelm.params.data import DataParams
from nativelm.params.evaluate import EvaluateParams
from nativelm.params.export import ExportParams
from nativelm.params.root import Params
from nativelm.params.tracking import TrackingParams
from nativelm.params.train import TrainParams
from nativelm.train.loop import torch_threads
from tests.unit.test_export_graph import write_prepared

SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, "window": 16,
         "nope_every": 2, "n_experts": 4, "expert_ffn": 32, "top_k": 2}
FAST = {"bench_prompt_len": 8, "bench_new_tokens": 4, "bench_repeats": 1, "ppl_tokens": 256, "threads": 1}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with prepared data, an (untrained) model and its export, as the stages leave them."""
    import torch

    from nativelm.formats import trained_model

    root = tmp_path_factory.mktemp("evaluate")
    prepared = write_prepared(root / "data/prepared")
    manifest = json.loads((prepared / MANIFEST).read_text())
    with torch_threads(1):
        torch.manual_seed(0)
        model = build_model(ModelParams(**SMALL), manifest["vocab_size"]).eval()
        trained_model.write(root / "models/model.pt", model.state_dict(), model.params, model.vocab_size,
                            {"step": 0, "weight_bits": 1.58, "tokenizer_sha256": manifest["sha256"][TOKENIZER_FILE]})
        run_export(root / "models/model.pt", root / "data/prepared", ExportParams(
            out_dir=str(root / "models/onnx"), metrics_file=str(root / "metrics/export.json"),
            min_top1_agreement=0.5, max_ppl_rel_diff=0.05, parity_tokens=64, cache_check_tokens=8,
            golden_tokens=4, golden_prompts=["anna sees"], threads=1))
    return root


def _evaluate(params: Params):  # the stage as the CLI calls it
    return run_evaluate(Path(params.export.out_dir), Path(params.data.out_dir), params.evaluate,
                        Provenance("test", "unknown", "test"))


def _params(root: Path, **evaluate: object) -> Params:
    return Params(data=DataParams(out_dir=str(root / "data/prepared")),
                  train=TrainParams.model_validate({"model_file": str(root / "models/model.pt")}),
                  export=ExportParams(out_dir=str(root / "models/onnx"), metrics_file=str(root / "metrics/export.json")),
                  evaluate=EvaluateParams(**{**FAST, "release_dir": str(root / "models/release"),
                                             "metrics_file": str(root / "metrics/evaluate.json"), **evaluate}),
                  tracking=TrackingParams(uri="off"))


def test_evaluate_writes_metrics_and_a_verified_release(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    result = _evaluate(_params(project))
    release = project / "models/release"
    export = project / "models/onnx"
    names = sorted(p.name for p in release.iterdir())
    assert names == sorted([p.name for p in export.iterdir()] + [RUNTIME_FILE, RELEASE_MANIFEST])
    assert not [p for p in release.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    for path in export.iterdir():
        assert (release / path.name).read_bytes() == path.read_bytes()
    manifest = json.loads((release / RELEASE_MANIFEST).read_text())
    assert manifest == result.release
    assert manifest["sha256"] == {n: sha256_file(release / n) for n in names if n != RELEASE_MANIFEST}
    export_manifest = json.loads((export / MANIFEST).read_text())
    assert manifest["source_model_sha256"] == export_manifest["source"]["model_sha256"]
    assert manifest["source_model_sha256"] == sha256_file(project / "models/model.pt")
    assert {"git_commit", "data_hash", "params_hash"} <= set(manifest) and "version" not in manifest
    with zipfile.ZipFile(release / RUNTIME_FILE) as archive:
        assert "nativelm/runtime/session.py" in archive.namelist()

    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert metrics == result.metrics and result.model_version is None and "model_version" not in metrics
    for key in ("ppl_onnx", "model_bytes", "bits_per_weight", "prefill_tokens_per_s", "decode_tokens_per_s",
                "time_to_first_token_ms", "inter_token_latency_p50_ms", "inter_token_latency_p95_ms",
                "peak_rss_mb", "top1_agreement", "parity_ppl_torch"):
        assert metrics[key] > 0, key
    assert metrics["ppl_tokens_scored"] == 256 - metrics["ppl_windows"]  # 4 windows of 64, one target fewer each
    assert metrics["top1_agreement"] == export_manifest["parity"]["held_out"]["top1_agreement"]
    assert metrics["model_bytes"] == (export / MODEL_FILE).stat().st_size
    # the default export (native) is ternary-ops: the benchmark ran its custom-operator graph
    assert export_manifest["variant"] == "ternary-ops" and metrics["ops"].startswith("nativelm:"), metrics["ops"]


def test_whole_validation_split_when_ppl_tokens_is_zero(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    monkeypatch.chdir(project)
    result = _evaluate(_params(project, ppl_tokens=0, release_dir=str(tmp_path / "release"),
                                  metrics_file=str(tmp_path / "evaluate.json")))
    assert result.metrics["ppl_tokens_scored"] > 256 and result.metrics["ppl_onnx"] > 0


def test_a_corrupted_export_stops_with_one_line_and_keeps_the_release(project: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.chdir(project)
    copy = tmp_path / "onnx"
    shutil.copytree(project / "models/onnx", copy)
    params = _params(project, release_dir=str(tmp_path / "release"), metrics_file=str(tmp_path / "evaluate.json"))
    params = params.model_copy(update={"export": params.export.model_copy(update={"out_dir": str(copy)})})
    _evaluate(params)
    before = {p.name: p.read_bytes() for p in (tmp_path / "release").iterdir()}

    data = bytearray((copy / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(NativelmError) as failure:
        _evaluate(params)
    message = str(failure.value)
    assert "\n" not in message and MODEL_FILE in message and "sha256" in message
    assert {p.name: p.read_bytes() for p in (tmp_path / "release").iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_evaluate_params_are_validated() -> None:
    from nativelm.errors import ParamsError
    from nativelm.params.root import parse_params

    assert parse_params("evaluate: {bench_repeats: 2}").evaluate.bench_repeats == 2
    with pytest.raises(ParamsError, match="evaluate.bench_new_tokens"):
        parse_params("evaluate: {bench_new_tokens: 1}")
    with pytest.raises(ParamsError, match="evaluate.colour: unknown key"):
        parse_params("evaluate: {colour: red}")


def test_generate_command_prints_a_continuation(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nativelm.cli import main

    assert main(["generate", "--model", str(project / "models/onnx"), "--prompt", "anna sees",
                 "--max-new-tokens", "5", "--threads", "1"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", "--model", str(project / "models/onnx"), "--prompt", "anna sees",
                 "--max-new-tokens", "5", "--threads", "1", "--stream"]) == 0
    assert capsys.readouterr().out == greedy
    assert main(["generate", "--model", str(project / "nowhere"), "--prompt", "x"]) != 0
    assert "nowhere" in capsys.readouterr().err
