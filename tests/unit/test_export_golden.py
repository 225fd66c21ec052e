"""Golden hashes of the exported graphs: a refactor of `nativelm.export` must not change one byte.

Each case builds a tiny NativeLM with a fixed seed, exports it and hashes the serialized ONNX model
(sha256) and, separately, what the builder reports next to it (choices, notes, parts, parameter
counts, quantized nodes, I/O names, part sizes; in insertion order, since the manifest keeps it).
The hashes live in `golden/export_graphs.json`. A change to the exporter that is meant to change
the graph regenerates them on purpose:

    NATIVELM_REGEN_GOLDEN=1 python -m pytest -q tests/unit/test_export_golden.py

and the diff of the JSON file shows which cases moved. Refusals are checked by their one-line message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from nativelm.errors import NativelmError
from nativelm.export.graph import ExportGraph, build_graph
from nativelm.fsutil import atomic_write_text
from nativelm.model import ModelParams, build_model
from nativelm.params.export import ExportParams
from nativelm.train.loop import torch_threads

GOLDEN = Path(__file__).parent / "golden" / "export_graphs.json"
REGEN = os.environ.get("NATIVELM_REGEN_GOLDEN") == "1"
VOCAB = 96

# d_model 128, expert_ffn 128: 2-bit QMoE is fast at the default moe_block_size 64 (kernels.qmoe_is_fast)
BASE: dict[str, Any] = {"d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64,
                        "window": 16, "nope_every": 2, "n_experts": 4, "expert_ffn": 128, "top_k": 2}
DENSE = {"ffn": "dense", "dense_ffn": 128}
SMALL = {"d_model": 64, "expert_ffn": 32}
LATENT = {"comparison_weights": "latent"}
PTQ = {"ptq": True}
NATIVE = {"variant": "native"}


def family(name: str) -> dict[str, Any]:
    """A model family on BASE's shape, with the family's own attention (BASE writes a window)."""
    return {"family": name, "window": 0, "nope_every": 0, "dense_ffn": 128}


# name: (model overrides, export overrides)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "ternary_moe": ({}, {}),
    "ternary_moe_symmetric_2bit": ({"bit_schedule": [[0.0, 2.0]]}, {}),
    "ternary_moe_block_fallback": ({}, {"moe_block_size": 128}),
    "ternary_moe_4bit_fallback": ({"expert_ffn": 32}, {"block_size": 32}),
    "ternary_moe_rowwise_fallback": ({"d_model": 64, "expert_ffn": 24}, {"block_size": 32}),
    "ternary_moe_post_attention_routing": ({"pre_attention_routing": False}, {}),
    "ternary_moe_untied": ({"tie_embeddings": False}, {}),
    "ternary_moe_act_bits_4": ({"act_bits": 4}, {}),
    "ternary_moe_slow_kernels": ({}, {"accuracy_level": 0}),
    "ternary_moe_bits_4": ({}, {"embed_bits": 4, "lm_head_bits": 4}),
    "ternary_moe_bits_16": ({}, {"embed_bits": 16, "lm_head_bits": 16}),
    "ternary_moe_bits_32": ({}, {"embed_bits": 32, "lm_head_bits": 32}),
    "ternary_moe_embed_not_16": ({"d_model": 40, "n_heads": 4, "expert_ffn": 32}, {"block_size": 32}),
    "ternary_moe_opset_28": ({}, {"opset": 28}),
    "ternary_dense": (DENSE, {}),
    "ternary_dense_no_bitlinear_norm": ({**DENSE, "bitlinear_norm": False}, {}),
    "ternary_ops_moe": ({}, {"variant": "ternary-ops"}),
    "ternary_ops_dense": (DENSE, {"variant": "ternary-ops"}),
    "ternary_ops_dense_no_bitlinear_norm": ({**DENSE, "bitlinear_norm": False}, {"variant": "ternary-ops"}),
    "ternary_ops_ptq_unquantized": ({"quantize": False}, {"variant": "ternary-ops", **PTQ}),
    "ternary_ops_int8_experts": ({"expert_quant": "int8"}, {"variant": "ternary-ops"}),
    "ternary_moe_int8_experts": ({"expert_quant": "int8"}, {}),
    "int4_moe": ({}, {"variant": "int4"}),
    "int4_moe_latent": ({}, {"variant": "int4", **LATENT}),
    "int4_moe_3bit": ({"bit_schedule": [[0.0, 3.0]]}, {"variant": "int4"}),
    "int4_moe_8bit": ({"bit_schedule": [[0.0, 8.0]]}, {"variant": "int4"}),
    "int4_moe_unquantized": ({"quantize": False}, {"variant": "int4"}),
    "int4_moe_int8_experts": ({"expert_quant": "int8"}, {"variant": "int4"}),
    "int4_moe_bits_16": ({}, {"variant": "int4", "embed_bits": 16, "lm_head_bits": 16}),
    "int4_dense": (DENSE, {"variant": "int4"}),
    "int4_dense_latent": (DENSE, {"variant": "int4", **LATENT}),
    "int4_dense_unquantized": ({**DENSE, "quantize": False}, {"variant": "int4"}),
    "fp32_moe": ({}, {"variant": "fp32"}),
    "fp32_moe_latent": ({}, {"variant": "fp32", **LATENT}),
    "fp32_moe_unquantized": ({"quantize": False}, {"variant": "fp32"}),
    "fp32_moe_8bit": ({"bit_schedule": [[0.0, 8.0]]}, {"variant": "fp32"}),
    "fp32_moe_bits_ignored": ({}, {"variant": "fp32", "embed_bits": 4, "lm_head_bits": 8}),
    "fp32_moe_bitlinear_experts": ({**SMALL, "expert_quant": "bitlinear"}, {"variant": "fp32"}),
    "fp32_moe_bitlinear_experts_latent": ({**SMALL, "expert_quant": "bitlinear"}, {"variant": "fp32", **LATENT}),
    "fp32_moe_int8_experts": ({"expert_quant": "int8"}, {"variant": "fp32"}),
    "fp32_dense": (DENSE, {"variant": "fp32"}),
    "fp32_dense_unquantized": ({**DENSE, "quantize": False}, {"variant": "fp32"}),
    # model families (params/families.py); smallthinker is the default model, so ternary_moe's hashes
    "ternary_family_smallthinker": ({"family": "smallthinker"}, {}),
    "ternary_family_bitnet": (family("bitnet"), {}),
    "ternary_family_openelm": (family("openelm"), {}),
    "int4_family_openelm": (family("openelm"), {"variant": "int4"}),
    "fp32_family_openelm": (family("openelm"), {"variant": "fp32"}),
    "int4_family_phi3": (family("phi3"), {"variant": "int4"}),
    "fp32_family_phi3": (family("phi3"), {"variant": "fp32"}),
    # post-training quantization: the native graph of the ternarized twin (nativelm.export.ptq)
    "ternary_moe_ptq_unquantized": ({"quantize": False}, PTQ),
    "ternary_moe_ptq_8bit": ({"bit_schedule": [[0.0, 8.0]]}, PTQ),
    "ternary_moe_ptq_4bit": ({"bit_schedule": [[0.0, 4.0]]}, PTQ),
    "ternary_moe_ptq_unquantized_bitlinear_experts": ({"quantize": False, "expert_quant": "bitlinear"}, PTQ),
    "ternary_dense_ptq_unquantized": ({**DENSE, "quantize": False}, PTQ),
    # native (the default): the variant of the training precision, a ternary one on nativelm's operators
    # where they represent it (the operator library is built: tests/unit/test_ternary_ops.py)
    "native_moe": ({}, NATIVE),
    "native_moe_act_bits_4": ({"act_bits": 4}, NATIVE),
    "native_moe_ptq_unquantized": ({"quantize": False}, {**NATIVE, **PTQ}),
    "native_moe_4bit": ({"bit_schedule": [[0.0, 4.0]]}, NATIVE),
    "native_moe_8bit": ({"bit_schedule": [[0.0, 8.0]]}, NATIVE),
    "native_moe_unquantized": ({"quantize": False}, NATIVE),
    "native_moe_int8_experts": ({"expert_quant": "int8"}, NATIVE),
}

# name: (model overrides, export overrides, the message the NativelmError matches)
REFUSALS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "ternary_unquantized": ({**SMALL, "quantize": False}, {}, r"^export ternary: .*\(model.quantize: false\)"),
    "ternary_8bit": ({**SMALL, "bit_schedule": [[0.0, 8.0]]}, {}, r"^export ternary: .* at 8.0 bits"),
    "ternary_bitlinear_experts": ({**SMALL, "expert_quant": "bitlinear"}, {},
                                  r"^export ternary: model.expert_quant is 'bitlinear'.*cannot represent"),
    "int4_bitlinear_experts": ({**SMALL, "expert_quant": "bitlinear"}, {"variant": "int4"},
                               r"^export int4: model.expert_quant is 'bitlinear'.*cannot represent"),
    "ternary_family_phi3": ({**family("phi3"), **SMALL}, {}, r"^export ternary: .*\(model.quantize: false\)"),
    "ternary_unquantized_names_ptq": ({**SMALL, "quantize": False}, {}, r"or set export\.ptq: true to quantize"),
    "ternary_3bit_names_ptq": ({**SMALL, "bit_schedule": [[0.0, 3.0]]}, {}, r"at 3.0 bits.*set export\.ptq: true"),
    "native_bitlinear_experts": ({**SMALL, "expert_quant": "bitlinear"}, NATIVE,
                                 r"^export ternary: model.expert_quant is 'bitlinear'"),
    "ternary_ptq_8bit_bitlinear_experts": ({**SMALL, "expert_quant": "bitlinear", "bit_schedule": [[0.0, 8.0]]}, PTQ,
                                           r"^export ternary: model.expert_quant is 'bitlinear'.*cannot represent"),
}

_computed: dict[str, dict[str, str]] = {}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module", autouse=True)
def _regenerate():
    """With NATIVELM_REGEN_GOLDEN=1, write the hashes the cases computed (all of them, sorted by name)."""
    yield
    if REGEN and set(_computed) == set(CASES):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(GOLDEN, json.dumps(dict(sorted(_computed.items())), indent=2) + "\n")


def export(model_overrides: dict[str, Any], export_overrides: dict[str, Any]) -> ExportGraph:
    """The graph of BASE + `model_overrides`, variant ternary unless `export_overrides` name one."""
    model = build_model(ModelParams(**{**BASE, **model_overrides}), VOCAB, seed=0).eval()
    return build_graph(model, ExportParams(**{"variant": "ternary", **export_overrides}))


def hashes(graph: ExportGraph) -> dict[str, str]:
    """sha256 of the serialized model and of everything the builder reports beside it."""
    report = {"variant": graph.variant, "choices": graph.choices, "notes": graph.notes, "parts": graph.parts,
              "part_params": graph.part_params, "quantized_nodes": graph.quantized_nodes, "io": graph.io,
              "part_bytes": graph.part_bytes()}
    return {"model": hashlib.sha256(graph.model.SerializeToString()).hexdigest(),
            "report": hashlib.sha256(json.dumps(report).encode()).hexdigest()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_graph_matches_its_golden_hashes(name: str) -> None:
    got = hashes(export(*CASES[name]))
    _computed[name] = got
    if REGEN:
        return
    golden = json.loads(GOLDEN.read_text())
    assert name in golden, f"no golden hashes for {name}: regenerate with NATIVELM_REGEN_GOLDEN=1"
    assert got == golden[name]


def test_the_default_family_exports_todays_graph() -> None:
    assert hashes(export({"family": "smallthinker"}, {})) == hashes(export({}, {}))


@pytest.mark.parametrize(("name", "same_as"), [("native_moe", "ternary_ops_moe"),
                                               ("native_moe_act_bits_4", "ternary_moe_act_bits_4"),
                                               ("native_moe_ptq_unquantized", "ternary_ops_ptq_unquantized"),
                                               ("native_moe_unquantized", "fp32_moe_unquantized"),
                                               ("native_moe_int8_experts", "ternary_ops_int8_experts")])
def test_native_is_the_graph_of_the_variant_it_resolves_to(name: str, same_as: str) -> None:
    assert hashes(export(*CASES[name])) == hashes(export(*CASES[same_as]))


def test_golden_file_has_no_stale_cases() -> None:
    if not REGEN:
        assert set(json.loads(GOLDEN.read_text())) == set(CASES)


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_export_refusals_are_one_line(name: str) -> None:
    model_overrides, export_overrides, message = REFUSALS[name]
    with pytest.raises(NativelmError, match=message) as caught:
        export(model_overrides, export_overrides)
    assert "\n" not in str(caught.value)
