"""Post-training quantization (PTQ) and variant ``native``: what the graph computes, how it is labelled.

A ternary PTQ export must compute what absmean-ternarizing the fp model's weights (8-bit per-token
activations) computes in PyTorch, within the thresholds native exports are held to; against the
fp model it came from its held-out figures are recorded, not gated. The label reaches the manifest,
the metrics file, MLflow, release.json and the registry, never the graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nativelm.errors import NativelmError, ParamsError
from nativelm.export import parity, ptq
from nativelm.export.graph import build_graph, check_model
from nativelm.export.stage import run_export
from nativelm.formats import prepared as prepared_format
from nativelm.formats.export_folder import MANIFEST, TOKENIZER_FILE
from nativelm.model import ModelParams, build_model
from nativelm.params.export import ExportParams
from nativelm.train.loop import torch_threads
from tests.unit.test_export_graph import TINY, attrs, nodes_by_op, shard, train_briefly, write_prepared

SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, "window": 16,
         "nope_every": 2, "n_experts": 4, "expert_ffn": 32, "top_k": 2}
FP = {"quantize": False}
EIGHT = {"bit_schedule": [[0.0, 8.0]]}
TERNARY_METHOD = "absmean-ternary per-matrix, int8 activations"
INT4_METHOD = "int4 block-wise symmetric, block 128, experts block 64"
# the stage on few tokens; thresholds are the defaults (what a native export is held to)
QUICK = {"parity_tokens": 256, "cache_check_tokens": 24, "golden_tokens": 4, "golden_prompts": ["anna sees"],
         "threads": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("ptq") / "prepared")


@pytest.fixture(scope="module")
def fp_model(prepared: Path) -> torch.nn.Module:
    """The tiny MoE shape trained briefly in full precision (model.quantize: false)."""
    vocab = json.loads((prepared / MANIFEST).read_text())["vocab_size"]
    with torch_threads(1):
        return train_briefly(build_model(ModelParams(**{**TINY, **FP}), vocab), shard(prepared, "train"))


def write_model(model: torch.nn.Module, prepared: Path, path: Path) -> Path:
    """A trained-model file of `model`, as `nativelm train` leaves it."""
    from nativelm.formats import trained_model

    tokenizer_sha = json.loads((prepared / MANIFEST).read_text())["sha256"][TOKENIZER_FILE]
    return trained_model.write(path, model.state_dict(), model.params, model.vocab_size,
                               {"step": 60, "weight_bits": float(model.weight_bits), "tokenizer_sha256": tokenizer_sha})


@pytest.fixture(scope="module")
def fp_file(fp_model: torch.nn.Module, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(fp_model, prepared, tmp_path_factory.mktemp("fp") / "model.pt")


def small(**overrides: Any) -> torch.nn.Module:
    return build_model(ModelParams(**{**SMALL, **overrides}), 96, seed=3).eval()


def windows(prepared: Path, length: int) -> np.ndarray:
    return prepared_format.validation_windows([shard(prepared, "val")], 512, length)


# --------------------------------------------------------------------------- the twin and the graph


def _per_token_int8(x: np.ndarray, eps: float) -> np.ndarray:
    step = np.maximum(np.abs(x).max(-1, keepdims=True), eps) / 127.0
    return np.clip(np.round(x / step), -128, 127) * step


def test_the_twin_ternarizes_each_matrix_by_its_absmean_and_quantizes_activations_to_8_bits() -> None:
    fp = small(**FP, act_bits=4)  # an fp model's act_bits means nothing: its twin quantizes to 8 bits
    twin = ptq.ternarized(fp)
    assert twin.params.quantize and twin.weight_bits == 1.58 and twin.params.act_bits == 8
    layer, fp_layer = twin.blocks[0].attn.q_proj, fp.blocks[0].attn.q_proj
    w = fp_layer.weight.detach().numpy().astype(np.float64)
    scale = np.abs(w).mean()
    codes = np.clip(np.round(w / scale), -1, 1)
    got_codes, got_scale = layer.weight_codes()
    np.testing.assert_array_equal(got_codes.numpy(), codes)
    assert float(got_scale) == pytest.approx(scale, rel=1e-6)
    assert layer.norm is None  # an fp model has no BitLinear gains to keep
    x = np.random.default_rng(0).normal(size=(5, SMALL["d_model"])).astype(np.float32)
    expected = _per_token_int8(x, layer.eps) @ (codes * scale).T
    with torch.no_grad():
        np.testing.assert_allclose(layer(torch.from_numpy(x)).numpy(), expected, rtol=1e-4, atol=1e-5)
    experts = fp.blocks[1].ffn.experts.up.weight.detach().numpy()
    expert_codes, expert_scales = twin.blocks[1].ffn.experts.up.weight_codes()
    np.testing.assert_allclose(expert_scales.numpy(), np.abs(experts).mean(axis=(1, 2)), rtol=1e-6)
    assert twin.blocks[1].ffn.experts.weight_only and set(np.unique(expert_codes.numpy())) <= {-1, 0, 1}
    for name, value in fp.state_dict().items():  # everything else is the trained model's
        torch.testing.assert_close(twin.state_dict()[name], value, rtol=0, atol=0)


def test_the_twin_of_a_quantized_model_keeps_its_norms_and_activation_width() -> None:
    model = small(**EIGHT, act_bits=6)
    twin = ptq.ternarized(model)
    assert twin.weight_bits == 1.58 and model.weight_bits == 8.0 and twin.params.act_bits == 6
    torch.testing.assert_close(twin.blocks[0].attn.k_proj.gain, model.blocks[0].attn.k_proj.gain)
    assert ptq.ptq_method(model, ExportParams(variant="ternary")) == "absmean-ternary per-matrix, int6 activations"


def test_a_ternary_ptq_graph_is_the_native_graph_of_the_twin(fp_model: torch.nn.Module) -> None:
    graph = build_graph(fp_model, ExportParams(variant="ternary", ptq=True))
    native = build_graph(ptq.ternarized(fp_model), ExportParams(variant="ternary"))
    assert graph.model.SerializeToString() == native.model.SerializeToString()
    ops_used = nodes_by_op(graph.model)
    linears = [attrs(n) for n in ops_used["MatMulNBits"] if n.name != "lm_head"]
    assert {(a["bits"], a["accuracy_level"]) for a in linears} == {(2, 4)}
    assert {attrs(n)["expert_weight_bits"] for n in ops_used["QMoE"]} == {2}
    assert graph.notes == [] and "ptq" not in graph.model.doc_string.lower()
    assert all("ptq" not in p.key for p in graph.model.metadata_props)


def test_a_ternary_ptq_export_computes_the_ternarized_model_within_native_thresholds(
        fp_model: torch.nn.Module, prepared: Path) -> None:
    graph = build_graph(fp_model, ExportParams(variant="ternary", ptq=True))
    decoder = parity.OnnxDecoder(graph.model.SerializeToString(), threads=1)
    rows = windows(prepared, fp_model.params.max_seq_len)
    twin_figures = parity.held_out_parity(ptq.ternarized(fp_model), decoder, rows)
    native = ExportParams()
    assert twin_figures["top1_agreement"] >= native.min_top1_agreement, twin_figures
    assert twin_figures["ppl_rel_diff"] <= native.max_ppl_rel_diff, twin_figures
    assert twin_figures["ppl_torch"] < 20  # a trained model: agreement is not luck
    # against the fp model the same graph is another function: the quantization is what differs
    fp_figures = parity.held_out_parity(fp_model, decoder, rows)
    assert fp_figures["max_abs_logit_diff"] > 10 * twin_figures["max_abs_logit_diff"]


# --------------------------------------------------------------------------- native, labels, refusals


@pytest.mark.parametrize(("model", "variant"), [
    ({}, "ternary"), ({"bit_schedule": [[0.0, 2.0]]}, "ternary"), ({"bit_schedule": [[0.0, 3.0]]}, "int4"),
    ({"bit_schedule": [[0.0, 8.0], [0.5, 4.0]]}, "int4"), ({"bit_schedule": [[0.0, 5.0]]}, "fp32"),
    (EIGHT, "fp32"), (FP, "fp32"),
])
def test_native_resolves_to_the_precision_the_model_was_trained_in(model: dict, variant: str) -> None:
    built = small(**model)
    if len(model.get("bit_schedule", [])) > 1:  # the end of the schedule is the width it was trained to
        from nativelm.model import set_weight_bits

        set_weight_bits(built, float(model["bit_schedule"][-1][1]))
    assert ptq.native_variant(built) == variant
    on_ops = {"ternary": "ternary-ops"}.get(variant, variant)  # a ternary MoE: nativelm's operators represent it
    assert build_graph(built, ExportParams(variant="native")).variant == on_ops
    plan = check_model(built, ExportParams(variant="native"))
    assert not plan.ptq and plan.reason.startswith(ptq.native_reason(built))


@pytest.mark.parametrize(("model", "export", "method"), [
    (FP, {"ptq": True}, TERNARY_METHOD),
    (EIGHT, {"ptq": True}, TERNARY_METHOD),
    ({"bit_schedule": [[0.0, 3.0]]}, {"ptq": True}, TERNARY_METHOD),
    (FP, {"variant": "int4"}, INT4_METHOD),  # no opt-in needed: it worked before, now it says what it is
    (EIGHT, {"variant": "int4"}, INT4_METHOD),
    (FP, {"variant": "int4", "comparison_weights": "latent"}, INT4_METHOD),  # an fp model's only weights
    (FP, {"variant": "int4", "block_size": 32}, "int4 block-wise symmetric, block 32, experts block 64"),
    ({"bit_schedule": [[0.0, 4.0]]}, {"variant": "int4"}, None),  # its own codes: exact
    ({}, {"variant": "int4"}, None),
    ({}, {"ptq": True}, None),
    (FP, {"variant": "fp32"}, None),
    (EIGHT, {"variant": "native"}, None),
    ({}, {"variant": "int4", "comparison_weights": "latent"}, None),  # the latent-weights study, as before
])
def test_the_ptq_label_says_what_quantization_after_training_did(model: dict, export: dict,
                                                                 method: str | None) -> None:
    plan = check_model(small(**model), ExportParams(**export))
    assert plan.method == method and plan.ptq == (method is not None)
    assert plan.label() == ({"ptq": True, "ptq_method": method} if method else {"ptq": False})


def test_dense_int4_ptq_names_no_expert_block() -> None:
    plan = check_model(small(**FP, ffn="dense", dense_ffn=64), ExportParams(variant="int4"))
    assert plan.method == "int4 block-wise symmetric, block 128"


@pytest.mark.parametrize("model", [FP, EIGHT])
def test_ternary_without_ptq_is_refused_with_one_line_naming_export_ptq(model: dict) -> None:
    with pytest.raises(ParamsError, match=r"set export\.ptq: true") as caught:
        check_model(small(**model), ExportParams(variant="ternary"))
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_held_out_thresholds_do_not_gate_a_ptq_export_but_the_cache_check_does() -> None:
    held = {"top1_agreement": 0.2, "ppl_rel_diff": 0.9, "tokens": 64, "ppl_onnx": 9.0, "ppl_torch": 2.0}
    cache = {"match": True, "first_mismatch": None, "steps": 4, "max_rel_logit_diff": 0.0}
    figures = {"held_out": held, "kv_cache": cache}
    assert parity.gated_checks(True) == ["kv_cache"]
    parity.check_thresholds(figures, ExportParams(), parity.gated_checks(True))
    with pytest.raises(NativelmError, match="top-1 agreement"):
        parity.check_thresholds(figures, ExportParams(), parity.gated_checks(False))
    cache["max_rel_logit_diff"] = 0.5
    with pytest.raises(NativelmError, match="max_cache_logit_rel_diff"):
        parity.check_thresholds(figures, ExportParams(), parity.gated_checks(True))


# --------------------------------------------------------------------------- the stage


def test_run_export_of_an_fp_model_as_ternary_ptq_is_labelled_and_records_its_parity(
        prepared: Path, fp_file: Path, tmp_path: Path) -> None:
    ep = ExportParams(variant="ternary", out_dir=str(tmp_path / "onnx"), metrics_file=str(tmp_path / "export.json"),
                      ptq=True, **QUICK)
    result = run_export(fp_file, prepared, ep)
    manifest = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    assert manifest == result.manifest
    assert (manifest["variant"], manifest["variant_requested"]) == ("ternary", "ternary")
    assert manifest["ptq"] is True and manifest["ptq_method"] == TERNARY_METHOD
    figures = manifest["parity"]
    assert figures["gated"] == ["kv_cache"] and figures["passed"] and figures["kv_cache"]["match"]
    held, twin = figures["held_out"], figures["quantized_reference"]
    # against the fp model this export would fail the native thresholds: recorded, not gated
    assert held["top1_agreement"] < ep.min_top1_agreement or held["ppl_rel_diff"] > ep.max_ppl_rel_diff, held
    assert twin["top1_agreement"] >= ep.min_top1_agreement and twin["ppl_rel_diff"] <= ep.max_ppl_rel_diff
    assert held["ppl_onnx"] == pytest.approx(twin["ppl_onnx"]) and held["ppl_torch"] != twin["ppl_torch"]
    metrics = json.loads((tmp_path / "export.json").read_text())
    assert metrics["ptq"] is True and metrics["ptq_method"] == TERNARY_METHOD and metrics["variant"] == "ternary"
    assert metrics["ppl_torch"] == held["ppl_torch"]  # the fp model's perplexity


def test_run_export_refuses_ternary_of_an_fp_model_without_ptq_and_writes_nothing(
        prepared: Path, fp_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ep = ExportParams(variant="ternary", out_dir=str(tmp_path / "onnx"), metrics_file=str(tmp_path / "export.json"),
                      **QUICK)
    with pytest.raises(ParamsError, match="export.ptq: true"):
        run_export(fp_file, prepared, ep)
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().err == ""


def test_run_export_native_and_int4_of_an_fp_model(prepared: Path, fp_file: Path, tmp_path: Path) -> None:
    common = {**QUICK, "metrics_file": str(tmp_path / "export.json")}
    native = run_export(fp_file, prepared, ExportParams(variant="native", out_dir=str(tmp_path / "a"), **common))
    assert (native.manifest["variant"], native.manifest["variant_requested"]) == ("fp32", "native")
    assert native.manifest["variant_reason"] == "the model was trained without quantization (model.quantize: false)"
    assert native.manifest["ptq"] is False and "ptq_method" not in native.manifest
    assert native.manifest["parity"]["gated"] == ["held_out", "kv_cache"]
    int4 = run_export(fp_file, prepared, ExportParams(variant="int4", out_dir=str(tmp_path / "b"), **common))
    assert int4.manifest["ptq"] is True and int4.manifest["ptq_method"] == INT4_METHOD
    assert int4.manifest["parity"]["gated"] == ["kv_cache"] and "quantized_reference" not in int4.manifest["parity"]
    assert int4.metrics["ptq"] is True
