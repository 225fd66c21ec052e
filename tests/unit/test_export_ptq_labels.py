"""Where the PTQ label lands (MLflow runs, release.json, the registry, the gate) and `nativelm export` on
models trained at a higher precision than asked for: a refusal is one line, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nativelm.cli import main
from nativelm.evaluate.stage import Provenance, run_evaluate
from nativelm.export.stage import run_export
from nativelm.formats.export_folder import MANIFEST, ptq_tags
from nativelm.formats.release import MANIFEST as RELEASE_MANIFEST
from nativelm.gate.decide import ParityLimits, decide
from nativelm.gate.promote import version_figures
from nativelm.model import ModelParams, build_model
from nativelm.params.evaluate import EvaluateParams
from nativelm.params.export import ExportParams
from nativelm.params.gate import GateParams
from tests.unit.test_export_ptq import (  # noqa: F401 - fixtures
    EIGHT,
    QUICK,
    SMALL,
    TERNARY_METHOD,
    _one_thread,
    fp_file,
    fp_model,
    prepared,
    write_model,
)

FAST_EVALUATE = {"bench_prompt_len": 8, "bench_new_tokens": 4, "bench_repeats": 1, "ppl_tokens": 256, "threads": 1}


def test_ptq_tags_of_a_manifest() -> None:
    assert ptq_tags({}) == {"ptq": "false"}  # an export written before PTQ existed
    assert ptq_tags({"ptq": True, "ptq_method": "m"}) == {"ptq": "true", "ptq_method": "m"}


def test_the_ptq_label_reaches_the_export_run_the_release_the_registry_and_the_gate(
        prepared: Path, fp_file: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from nativelm.tracking.runs import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("ptq", artifact_location=str(tmp_path / "artifacts"))
    export_run = client.create_run(experiment).info.run_id
    export_dir = tmp_path / "onnx"
    run_export(fp_file, prepared, ExportParams(variant="ternary", out_dir=str(export_dir), ptq=True, **QUICK,
                                               metrics_file=str(tmp_path / "export.json")),
               logger=RunLogger(client, export_run))
    data = client.get_run(export_run).data
    assert (data.tags["ptq"], data.tags["ptq_method"], data.tags["variant"]) == ("true", TERNARY_METHOD, "ternary")
    assert data.metrics["ptq"] == 1.0 and data.params["export.ptq"] == "True"

    ev = EvaluateParams(**FAST_EVALUATE, release_dir=str(tmp_path / "release"),
                        metrics_file=str(tmp_path / "evaluate.json"))
    evaluate_run = client.create_run(experiment).info.run_id
    result = run_evaluate(export_dir, prepared, ev, Provenance("test", "unknown", "test"),
                          logger=RunLogger(client, evaluate_run))
    release = json.loads((tmp_path / "release" / RELEASE_MANIFEST).read_text())
    assert release["ptq"] is True and release["ptq_method"] == TERNARY_METHOD and release["variant"] == "ternary"
    assert result.metrics["ptq"] == 1
    version = client.get_model_version(ev.registered_model, str(result.model_version))
    assert version.tags["ptq"] == "true" and version.tags["ptq_method"] == TERNARY_METHOD
    assert version.tags["git_commit"] == "test"

    figures = version_figures(client, ev.registered_model, result.model_version)
    assert figures.ptq == 1.0
    strict = ParityLimits(min_top1_agreement=1.0, max_ppl_rel_diff=0.0)  # no export passes these held-out limits
    decision = decide(figures, None, GateParams(), strict)
    assert decision.promote and "PTQ" in decision.reason


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def eight_bit_file(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab = json.loads((prepared / MANIFEST).read_text())["vocab_size"]
    model = build_model(ModelParams(**{**SMALL, **EIGHT}), vocab, seed=1).eval()
    return write_model(model, prepared, tmp_path_factory.mktemp("eight") / "model.pt")


def write_params(folder: Path, prepared: Path, model_file: Path, **export: object) -> Path:
    params = {"data": {"out_dir": str(prepared)}, "train": {"model_file": str(model_file)},
              "export": {"out_dir": str(folder / "onnx"), "metrics_file": str(folder / "export.json"), **QUICK,
                         **export},
              "tracking": {"uri": "off"}}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize(("source", "export", "variant", "ptq"), [
    ("fp", {"variant": "fp32"}, "fp32", False),
    ("fp", {"variant": "native"}, "fp32", False),
    ("fp", {"variant": "int4"}, "int4", True),
    ("fp", {"variant": "ternary", "ptq": True}, "ternary", True),
    ("eight", {"variant": "ternary", "ptq": True}, "ternary", True),
    ("fp", {"ptq": True}, "ternary-ops", True),  # the default native: ternary by PTQ, on nativelm's operators
])
def test_export_command_exports_and_labels(source: str, export: dict, variant: str, ptq: bool, prepared: Path,
                                           fp_file: Path, eight_bit_file: Path, tmp_path: Path) -> None:
    model_file = fp_file if source == "fp" else eight_bit_file
    assert main(["export", "--params", str(write_params(tmp_path, prepared, model_file, **export))]) == 0
    manifest = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    assert manifest["variant"] == variant and manifest["ptq"] is ptq


@pytest.mark.parametrize("source", ["fp", "eight"])
def test_export_command_refuses_ternary_without_ptq_in_one_line_exit_2(
        source: str, prepared: Path, fp_file: Path, eight_bit_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    model_file = fp_file if source == "fp" else eight_bit_file
    assert main(["export", "--params", str(write_params(tmp_path, prepared, model_file, variant="ternary"))]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("nativelm: error: export ternary: ") and "export.ptq: true" in err
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "export.json").exists()


def test_export_console_script_refusal_has_no_traceback(prepared: Path, fp_file: Path, tmp_path: Path) -> None:
    params = write_params(tmp_path, prepared, fp_file, variant="ternary")
    proc = subprocess.run([Path(sys.executable).parent / "nativelm", "export", "--params", str(params)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "model.quantize: false" in proc.stderr and "export.ptq: true" in proc.stderr


def test_fp_model_weights_are_untouched_by_a_ptq_export(fp_model: torch.nn.Module) -> None:
    from nativelm.export.graph import build_graph

    before = {k: v.clone() for k, v in fp_model.state_dict().items()}
    build_graph(fp_model, ExportParams(ptq=True))
    assert not fp_model.params.quantize
    for name, value in fp_model.state_dict().items():
        assert torch.equal(value, before[name]), name
