"""The default export (`export.variant: native`): a ternary model on nativelm's operators where they fit.

The model params.yaml trains (the one `make run` releases) resolves to ``ternary-ops``; the stage
writes model.nativelm.onnx beside the contrib graph and its manifest says what ``native`` resolved
to and why. A model the operators cannot represent, or a controller without the operator library,
resolves to the contrib graph (``ternary``) with the reason (`nativelm.export.ops_choice`). The
board runtime asks the graph for the last position's logits only when it generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nativelm.cli import main
from nativelm.errors import ParamsError
from nativelm.export import custom_graph
from nativelm.export.graph import check_model
from nativelm.export.stage import run_export
from nativelm.formats import trained_model
from nativelm.model import ModelParams, build_model
from nativelm.params.export import ExportParams
from nativelm.params.model import with_preset
from nativelm.params.root import load_params
from nativelm.runtime import load_model
from nativelm.runtime.custom_ops import OPS_ENV
from tests.conftest import REPO
from tests.unit.test_export_graph import TINY, model_file, prepared, trained  # noqa: F401

OPS_REASON = "nativelm's operators represent it exactly and their library is on this machine"


def quick(folder: Path) -> ExportParams:
    """The default export section, written to `folder`, on few tokens (the variant left at its default)."""
    return ExportParams(out_dir=str(folder / "onnx"), metrics_file=str(folder / "export.json"), parity_tokens=256,
                        golden_prompts=["anna sees"], golden_tokens=4, cache_check_tokens=24, threads=1)


def test_the_default_variant_is_native_in_the_code_and_in_params_yaml() -> None:
    assert ExportParams().variant == "native" == load_params(REPO / "params.yaml").export.variant


def test_the_model_params_yaml_trains_resolves_to_the_custom_operators() -> None:
    params = load_params(REPO / "params.yaml")
    shape = with_preset(params.model, params.train.resolved().preset)
    model = build_model(shape, params.data.tokenizer.vocab_size, seed=0).eval()
    plan = check_model(model, params.export)
    assert (plan.params.variant, plan.requested, plan.ptq) == (custom_graph.VARIANT, "native", False)
    assert plan.reason == f"the model was trained ternary (1.58 bits); {OPS_REASON}"


def test_the_default_export_writes_the_custom_graph_and_says_why(
        prepared: Path, model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    result = run_export(model_file, prepared, quick(tmp_path))
    folder = tmp_path / "onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (folder / custom_graph.MODEL_FILE).is_file() and (folder / "model.onnx").is_file()
    assert (manifest["variant"], manifest["variant_requested"]) == ("ternary-ops", "native")
    assert manifest["variant_reason"].endswith(OPS_REASON) and manifest["graphs"]["nativelm"]["parity"]["passed"]
    assert result.metrics["variant"] == "ternary-ops"
    err = capsys.readouterr().err
    assert f"export: variant native resolved to ternary-ops: the model was trained ternary (1.58 bits); {OPS_REASON}" \
        in err.splitlines()

    model = load_model(folder, threads=1)  # the board runtime generates from the last position's logits only
    assert model.ops.startswith("nativelm:") and model.has_logits_to_keep
    ids = np.random.default_rng(4).integers(0, model.vocab_size, (2, 9))
    every, cache = model.forward(ids)
    last, last_cache = model.forward(ids, last_only=True)
    assert every.shape == (2, 9, model.vocab_size) and last.shape == (2, 1, model.vocab_size)
    np.testing.assert_allclose(last, every[:, -1:], rtol=0, atol=1e-5 * float(np.abs(every).max()))
    assert all(np.array_equal(a, b) for pair, other in zip(cache, last_cache) for a, b in zip(pair, other))


def test_without_the_library_the_default_export_is_the_contrib_graph_with_the_reason(
        prepared: Path, model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(OPS_ENV, "off")
    run_export(model_file, prepared, quick(tmp_path))
    folder = tmp_path / "onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not (folder / custom_graph.MODEL_FILE).exists() and "graphs" not in manifest
    assert (manifest["variant"], manifest["variant_requested"]) == ("ternary", "native")
    reason = manifest["variant_reason"]
    assert reason.startswith("the model was trained ternary (1.58 bits); the contrib-operator graph, since nativelm's "
                             "operator library is not built on this machine") and "\n" not in reason
    assert f"export: variant native resolved to ternary: {reason}" in capsys.readouterr().err.splitlines()


def test_a_model_the_operators_cannot_represent_resolves_to_the_contrib_graph_with_the_reason() -> None:
    torch.manual_seed(0)
    model = build_model(ModelParams(**{**TINY, "act_bits": 4}), 100).eval()
    plan = check_model(model, ExportParams())
    assert (plan.params.variant, plan.requested) == ("ternary", "native")
    assert plan.reason == ("the model was trained ternary (1.58 bits); the contrib-operator graph, since TernaryMatMul "
                           "quantizes activations to 8 bits; the model quantizes them to 4 (model.act_bits)")
    assert check_model(model, ExportParams(variant="ternary")).reason is None  # a named variant: nothing resolved


def test_a_model_no_ternary_graph_represents_is_still_refused_in_one_line() -> None:
    model = build_model(ModelParams(**{**TINY, "expert_quant": "bitlinear"}), 100).eval()
    with pytest.raises(ParamsError, match="^export ternary: model.expert_quant is 'bitlinear'") as caught:
        check_model(model, ExportParams())
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value) and "export variant fp32" in str(caught.value)


def test_the_export_command_refuses_such_a_model_by_default_in_one_line_exit_2(
        prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    model = build_model(ModelParams(**{**TINY, "expert_quant": "bitlinear"}), 320).eval()
    model_path = trained_model.write(tmp_path / "model.pt", model.state_dict(), model.params, model.vocab_size, {})
    params = {"data": {"out_dir": str(prepared)}, "train": {"model_file": str(model_path)}, "tracking": {"uri": "off"},
              "export": {"out_dir": str(tmp_path / "onnx"), "metrics_file": str(tmp_path / "export.json")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["export", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nativelm: error: export ternary: "), err
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "export.json").exists()
