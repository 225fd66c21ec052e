"""The ``ternary-ops`` export: a graph on nativelm's own operators beside the contrib graph as fallback.

The export folder of this variant holds two decoders with the same inputs and outputs:

- ``model.nativelm.onnx``: TernaryMatMul / TernaryMoE (`ternary_ops`, variant `variants.TernaryOps`),
  run by a board whose operator library loads (`nativelm.runtime.session` picks it);
- ``model.onnx``: today's ``ternary`` graph (MatMulNBits / QMoE), for a board without the library
  and for every reader that knows one model file (evaluate, onnxruntime-genai's genai_config.json).

manifest.json's ``graphs`` says which is which: ``graphs.nativelm`` (file, operator domain, the
library kernel parity ran on, its own parity figures, sizes and golden continuations, since its
greedy tokens may differ from the fallback's) and ``graphs.fallback`` (file, variant). Both graphs
pass the same parity thresholds before the folder replaces the previous export. The export needs
the library on the controller (the set-up builds it): an unchecked graph never ships.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nativelm.export import ternary_ops
from nativelm.formats.export_folder import MODEL_FILE as FALLBACK_FILE
from nativelm.params.export import ExportParams
from nativelm.export.ops_choice import FALLBACK_VARIANT, VARIANT
from nativelm.runtime.session import CUSTOM_GRAPH, FALLBACK_GRAPH

if TYPE_CHECKING:
    from nativelm.export.graph import ExportGraph

MODEL_FILE = "model.nativelm.onnx"


def fallback_params(params: ExportParams) -> ExportParams:
    """The export parameters of the fallback graph: the same, as variant ``ternary``."""
    return params.model_copy(update={"variant": FALLBACK_VARIANT})


def manifest_graphs(custom: ExportGraph, figures: dict[str, Any], golden: list[dict[str, Any]], kernel: str,
                    weights: dict[str, Any]) -> dict[str, Any]:
    """manifest.json's ``graphs``: which file is the custom-operator graph and which the fallback."""
    nodes = [n.op_type for n in custom.model.graph.node if n.domain == ternary_ops.DOMAIN]
    return {CUSTOM_GRAPH: {"file": MODEL_FILE, "variant": VARIANT, "domain": ternary_ops.DOMAIN,
                           "opset": ternary_ops.OPSET, "nodes": {op: nodes.count(op) for op in ternary_ops.OP_TYPES},
                           "checked_kernel": kernel, "choices": custom.choices, "weights": weights,
                           "parity": figures, "golden": golden},
            FALLBACK_GRAPH: {"file": FALLBACK_FILE, "variant": FALLBACK_VARIANT}}


def metrics(graphs: dict[str, Any]) -> dict[str, float]:
    """The custom-operator graph's figures for the stage's metrics file (none for other variants)."""
    if CUSTOM_GRAPH not in graphs:
        return {}
    graph = graphs[CUSTOM_GRAPH]
    held = graph["parity"]["held_out"]
    return {"nativelm_top1_agreement": held["top1_agreement"], "nativelm_ppl_rel_diff": held["ppl_rel_diff"],
            "nativelm_ppl_onnx": held["ppl_onnx"],
            "nativelm_bits_per_weight_non_embedding": graph["weights"]["bits_per_weight_non_embedding"]}
