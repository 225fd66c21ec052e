"""Every model family through the export stage: a briefly trained tiny model of each, exported as
its variant (ternary for smallthinker, bitnet and openelm; fp32 and int4 for phi3), parity-checked
against PyTorch by the stage itself, and the graph's per-layer shapes checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from nativelm.export import custom_graph, ops_choice, parity
from nativelm.export.graph import build_graph
from nativelm.export.stage import run_export
from nativelm.formats import trained_model
from nativelm.formats.export_folder import (
    GENAI_CONFIG,
    MANIFEST,
    MODEL_FILE,
    TOKENIZER_FILE,
)
from nativelm.model import ModelParams, build_model, preset_params
from nativelm.params.export import ExportParams
from nativelm.train.loop import torch_threads
from tests.unit.test_export_graph import (
    assert_genai_matches_board,
    attrs,
    nodes_by_op,
    shard,
    train_briefly,
    write_prepared,
)

SHAPE: dict[str, Any] = {"d_model": 128, "n_layers": 3, "n_heads": 8, "n_kv_heads": 2, "max_seq_len": 128,
                         "window": 16, "nope_every": 3, "n_experts": 4, "expert_ffn": 128, "top_k": 2,
                         "dense_ffn": 256}
DENSE_SHAPE = {k: v for k, v in SHAPE.items() if k not in ("window", "nope_every")}  # the family's attention
OPENELM_HEADS, OPENELM_WIDTHS = [4, 6, 8], [128, 256, 512]  # alpha 0.5 .. 1.0 x 8 heads, beta 0.5 .. 4.0 x 128
CASES = [("smallthinker", "ternary"), ("bitnet", "ternary"), ("openelm", "ternary"), ("phi3", "fp32"),
         ("phi3", "int4")]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def family_params(family: str) -> ModelParams:
    return preset_params("tiny", family=family, **(SHAPE if family == "smallthinker" else DENSE_SHAPE))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("families") / "prepared")


@pytest.fixture(scope="module")
def model_files(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One briefly trained model file per family."""
    manifest = json.loads((prepared / MANIFEST).read_text())
    folder, files = tmp_path_factory.mktemp("family-models"), {}
    for family in sorted({f for f, _ in CASES}):
        with torch_threads(1):
            model = train_briefly(build_model(family_params(family), manifest["vocab_size"]),
                                  shard(prepared, "train"), steps=80)
        info = {"step": 80, "tokenizer_sha256": manifest["sha256"][TOKENIZER_FILE]}
        if model.params.quantize:
            info["weight_bits"] = 1.58
        files[family] = trained_model.write(folder / f"{family}.pt", model.state_dict(), model.params,
                                            model.vocab_size, info)
    return files


def test_family_params_are_the_families() -> None:
    elm = family_params("openelm")
    assert [elm.layer_heads(i) for i in range(3)] == OPENELM_HEADS
    assert [elm.layer_ffn(i) for i in range(3)] == OPENELM_WIDTHS
    assert (family_params("phi3").quantize, family_params("bitnet").ffn_act) == (False, "swiglu")


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_each_family_exports_with_parity(family: str, variant: str, prepared: Path, model_files: dict[str, Path],
                                         tmp_path: Path) -> None:
    ep = ExportParams(variant=variant, out_dir=str(tmp_path / "onnx"), metrics_file=str(tmp_path / "export.json"),
                      parity_tokens=512, golden_prompts=["anna sees"], golden_tokens=8, cache_check_tokens=40,
                      threads=1)
    result = run_export(model_files[family], prepared, ep)  # raises unless parity holds
    manifest = result.manifest
    assert manifest["parity"]["passed"] and manifest["parity"]["kv_cache"]["match"]
    assert manifest["parity"]["held_out"]["top1_agreement"] >= ep.min_top1_agreement
    assert manifest["parity"]["held_out"]["ppl_torch"] < 30  # trained: agreement is not luck

    graph = onnx.load(str(tmp_path / "onnx" / MODEL_FILE))
    ops_used = nodes_by_op(graph)
    gqa = {n.name: attrs(n) for n in ops_used["GroupQueryAttention"]}
    heads = [gqa[f"layers.{i}.attn.gqa"]["num_heads"] for i in range(3)]
    assert {a["kv_num_heads"] for a in gqa.values()} == {2}
    assert heads == (OPENELM_HEADS if family == "openelm" else [8, 8, 8])
    assert ("QMoE" in ops_used) == (family == "smallthinker")
    assert ("Sigmoid" in ops_used) == (family != "smallthinker")  # SwiGLU: x * Sigmoid(x)
    if variant == "fp32":
        assert "MatMulNBits" not in ops_used and "Round" not in ops_used  # phi3 is not quantized
    else:
        bits = {attrs(n)["bits"] for n in ops_used["MatMulNBits"] if n.name != "lm_head"}
        assert bits == {2 if variant == "ternary" else 4}
        if family == "openelm":  # per-layer widths: q/o by heads, gate/up/down by the FFN width
            shapes = {n.name: (attrs(n)["N"], attrs(n)["K"]) for n in ops_used["MatMulNBits"]}
            for i, (h, w) in enumerate(zip(OPENELM_HEADS, OPENELM_WIDTHS)):
                assert shapes[f"layers.{i}.attn.q_proj"] == (h * 16, 128)
                assert shapes[f"layers.{i}.attn.o_proj"] == (128, h * 16)
                assert shapes[f"layers.{i}.ffn.gate"] == (w, 128) and shapes[f"layers.{i}.ffn.down"] == (128, w)
            assert [c["num_heads"] for c in manifest["graph"]["choices"]["layer_scaling"]] == OPENELM_HEADS
    decoder = json.loads((tmp_path / "onnx" / GENAI_CONFIG).read_text())["model"]["decoder"]
    assert (decoder["num_key_value_heads"], decoder["head_size"], decoder["num_attention_heads"]) == (2, 16, 8)
    # the base heads in genai_config.json: onnxruntime-genai still runs per-layer heads (uniform cache)
    assert_genai_matches_board(tmp_path / "onnx", "anna sees the", 8)


@pytest.mark.parametrize("variant", ["ternary", "ternary-ops", "int4", "fp32"])
@pytest.mark.parametrize("family", ["bitnet", "openelm"])
def test_swiglu_and_layer_scaling_match_pytorch_in_every_variant(family: str, variant: str) -> None:
    model = build_model(family_params(family), 200, seed=5).eval()
    library = str(ops_choice.controller_library().path) if variant == custom_graph.VARIANT else None
    dec = parity.OnnxDecoder(build_graph(model, ExportParams(variant=variant)).model.SerializeToString(), threads=1,
                             library=library)
    ids = np.random.default_rng(6).integers(0, 200, (1, 24)).astype(np.int64)
    logits, reference = dec.forward(ids)[0], parity.torch_logits(model, ids)
    rel = 1e-3 if variant == "fp32" else 0.05  # 8-bit tables (and MatMulNBits' int8 blocks): close, not identical
    assert np.abs(logits - reference).max() <= rel * np.abs(reference).max()


def test_a_relu_in_place_of_the_silu_would_fail_parity() -> None:
    """The check above can fail: the same weights with ReGLU in PyTorch disagree with the SwiGLU graph."""
    model = build_model(family_params("bitnet"), 200, seed=5).eval()
    dec = parity.OnnxDecoder(build_graph(model, ExportParams(variant="fp32")).model.SerializeToString(), threads=1)
    ids = np.random.default_rng(6).integers(0, 200, (1, 24)).astype(np.int64)
    for block in model.blocks:
        block.ffn.ffn.act = torch.relu
    reference = parity.torch_logits(model, ids)
    assert np.abs(dec.forward(ids)[0] - reference).max() > 1e-2 * np.abs(reference).max()
