"""`model.expert_quant: int8`: ternary experts whose inputs (x for gate and up, h for down) are quantized
per row as BitLinear does, without a norm. The PyTorch layer against the operators' numpy reference
(TernaryMoE at act_bits 8), training on CPU, and its exports: exact on ternary-ops (ORT + the library)
and fp32, an approximation noted on the contrib graph (ternary, int4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nativelm.errors import ParamsError
from nativelm.export import parity, ternary_ops
from nativelm.export.graph import build_graph
from nativelm.export.stage import run_export
from nativelm.formats import trained_model
from nativelm.formats.export_folder import MANIFEST, TOKENIZER_FILE
from nativelm.formats.ternary_pack import pack_ternary
from nativelm.formats.ternary_reference import ternary_moe
from nativelm.model import ModelParams, build_model, param_counts
from nativelm.model.bitlinear import ExpertLinear
from nativelm.params.export import ExportParams
from nativelm.runtime.session import CUSTOM_GRAPH
from nativelm.train.loop import torch_threads
from tests.unit.test_export_custom import stage_params
from tests.unit.test_export_graph import TINY, attrs, nodes_by_op, prepared, shard, train_briefly  # noqa: F401
from tests.unit.test_ternary_ops import library  # noqa: F401  (the fixture: the library built from native/)

VOCAB = 320
SMALL = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, expert_ffn=16, top_k=2,
             dense_ffn=32, max_seq_len=32, window=8, nope_every=2, expert_quant="int8")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(ModelParams(**{**TINY, "expert_quant": "int8"}), VOCAB, seed=0).eval()


def _reference(moe: torch.nn.Module, h: torch.Tensor, logits: torch.Tensor, act_bits: int) -> np.ndarray:
    """The operators' numpy TernaryMoE on the layer's packed ternary codes."""
    t = {k: v.numpy() for k, v in moe.ternary_experts().items()}
    packed = [a for m in ("gate", "up", "down") for a in (pack_ternary(t[m]), t[f"{m}_scale"])]
    return ternary_moe(h.numpy(), logits.numpy(), *packed, top_k=moe.top_k, act_bits=act_bits,
                       act_eps=moe.experts.gate.eps)


def assert_exact_up_to_ties(logits: np.ndarray, reference: np.ndarray) -> None:
    """The same logits up to float rounding, except where a rounding tie of the hidden quantizer went the
    other way: h = relu(g) · u is a product of integer sums, so h / s_h can sit exactly on .5, and the
    last bit of the fp32 arithmetic decides its code (one code of one unit moves a row by ~1e-3)."""
    scale = float(np.abs(reference).max())
    per_position = np.abs(logits - reference).max(-1)
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() == 1.0
    assert (per_position <= 1e-5 * scale).mean() >= 0.9
    assert float(per_position.max()) <= 3e-3 * scale


def test_the_layer_is_the_operator_reference_at_act_bits_8(model: torch.nn.Module) -> None:
    moe = model.blocks[0].ffn
    experts = moe.experts
    assert not experts.weight_only and experts.shared_input
    assert all(lin.act_bits == 8 and lin.norm_weights is None for lin in (experts.gate, experts.up, experts.down))
    h = torch.randn(11, TINY["d_model"], generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        logits = moe.router(h)
        got = moe(h[None], logits[None])[0][0].numpy()
    scale = float(np.abs(got).max())
    err8 = float(np.abs(got - _reference(moe, h, logits, 8)).max())
    err0 = float(np.abs(got - _reference(moe, h, logits, 0)).max())
    assert err8 <= 1e-5 * scale
    assert err0 > 100 * err8  # float expert inputs are another computation: the check can tell them apart


def test_gate_and_up_share_one_quantized_input(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(ModelParams(**SMALL), 64)
    experts = model.blocks[0].ffn.experts
    groups = experts.quant_groups()
    assert [[w is experts.gate.weight, w is experts.up.weight] for w in groups[0]] == [[True, False], [False, True]]
    assert groups[1] == [experts.down.weight]
    w_gu, w_down = experts.quantized_weights(torch.float32)
    assert w_gu.shape == (4, 32, 32) and w_down.shape == (4, 32, 16)
    inputs: list[int] = []
    original = ExpertLinear.prepare_input

    def counted(self: ExpertLinear, x: torch.Tensor, row_experts: torch.Tensor) -> torch.Tensor:
        inputs.append(x.shape[-1])
        return original(self, x, row_experts)

    monkeypatch.setattr(ExpertLinear, "prepare_input", counted)
    model(torch.randint(0, 64, (2, 8)))
    assert inputs == [32, 16] * 2  # per layer: x once (gate and up), h once (down)


def test_training_on_cpu_reduces_the_loss_with_gradients_for_every_expert_parameter() -> None:
    params = ModelParams(**SMALL)
    model = build_model(params, 64, seed=0)
    counts = param_counts(params, 64)
    assert counts["total"] == model.num_params() and counts["active"] == model.active_params()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(20):
        out = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        out.loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if ".experts." in n}
            assert len(grads) == 3 * params.n_layers  # gate, up, down weights; no norm gains
            assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
        optimizer.step()
        losses.append(out.ce_loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_ternary_ops_export_is_exact_on_the_library(model: torch.nn.Module, library: Path) -> None:  # noqa: F811
    graph = build_graph(model, ExportParams(variant="ternary-ops", embed_bits=32, lm_head_bits=32))  # fp32 tables
    moes = nodes_by_op(graph.model)["TernaryMoE"]
    assert len(moes) == TINY["n_layers"]
    assert all(attrs(n)["act_bits"] == 8 and attrs(n)["act_eps"] == pytest.approx(1e-5) for n in moes)
    assert graph.choices["moe"]["act_bits"] == 8 and graph.notes == []
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, 24))
    logits = parity.OnnxDecoder(graph.model.SerializeToString(), 1, str(library)).forward(ids)[0]
    assert_exact_up_to_ties(logits, parity.torch_logits(model, ids))


def test_native_resolves_an_int8_expert_model_to_ternary_ops(model: torch.nn.Module) -> None:
    assert build_graph(model, ExportParams(variant="native")).variant == "ternary-ops"


@pytest.mark.parametrize("variant", ["ternary", "int4"])
def test_contrib_graphs_quantize_the_expert_input_and_note_the_approximation(model: torch.nn.Module,
                                                                             variant: str) -> None:
    graph = build_graph(model, ExportParams(variant=variant))
    qmoes = nodes_by_op(graph.model)["QMoE"]
    assert [n.input[0] for n in qmoes] == [f"layers.{i}.moe.act.dequant" for i in range(TINY["n_layers"])]
    assert any("expert_quant: int8" in note and "parity decides" in note for note in graph.notes)
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 24))
    logits = parity.OnnxDecoder(graph.model.SerializeToString(), 1).forward(ids)[0]
    reference = parity.torch_logits(model, ids)
    assert np.isfinite(logits).all()
    assert float(np.abs(logits - reference).max()) <= 0.05 * float(np.abs(reference).max())


def test_fp32_export_quantizes_x_once_and_h_and_is_exact(model: torch.nn.Module) -> None:
    graph = build_graph(model, ExportParams(variant="fp32"))
    names = {n.name for n in graph.model.graph.node}
    assert {"layers.0.moe.gate.act.dequant", "layers.0.moe.down.act.dequant"} <= names
    assert "layers.0.moe.up.act.dequant" not in names  # up reads gate's quantized input
    ids = np.random.default_rng(5).integers(0, VOCAB, (2, 24))
    logits = parity.OnnxDecoder(graph.model.SerializeToString(), 1).forward(ids)[0]
    assert_exact_up_to_ties(logits, parity.torch_logits(model, ids))


def test_ternary_moe_builder_takes_act_bits_8_or_0() -> None:
    codes = {m: np.zeros((2, 5, 5), np.int8) for m in ("gate", "up", "down")}
    scales = {m: np.ones(2, np.float32) for m in codes}
    with pytest.raises(ValueError, match="act_bits 8 or 0, got 4"):
        ternary_ops.ternary_moe("moe", "x", "r", codes, scales, top_k=1, act_bits=4)


def test_ternary_ops_refuses_int8_experts_at_other_activation_bits() -> None:
    model = build_model(ModelParams(**{**TINY, "expert_quant": "int8", "act_bits": 4}), VOCAB).eval()
    with pytest.raises(ParamsError, match=r"^export ternary-ops: .*model\.act_bits") as caught:
        build_graph(model, ExportParams(variant="ternary-ops"))
    assert "\n" not in str(caught.value)


def test_the_export_stage_of_a_trained_int8_model_passes_parity_on_both_graphs(
        prepared: Path, tmp_path: Path) -> None:  # noqa: F811
    manifest = json.loads((prepared / MANIFEST).read_text())
    params = ModelParams(**{**TINY, "expert_quant": "int8"})
    with torch_threads(1):
        trained = train_briefly(build_model(params, manifest["vocab_size"]), shard(prepared, "train"))
    model_file = trained_model.write(tmp_path / "model.pt", trained.state_dict(), params, trained.vocab_size,
                                     {"step": 60, "weight_bits": 1.58,
                                      "tokenizer_sha256": manifest["sha256"][TOKENIZER_FILE]})
    result = run_export(model_file, prepared, stage_params(tmp_path))
    custom = result.manifest["graphs"][CUSTOM_GRAPH]
    assert custom["choices"]["moe"]["act_bits"] == 8 and custom["parity"]["passed"]
    assert custom["parity"]["held_out"]["top1_agreement"] >= 0.999
    fallback = result.manifest["parity"]  # the contrib graph beside it: QMoE on the quantized input
    assert fallback["passed"] and fallback["held_out"]["top1_agreement"] >= 0.95
    assert any("expert_quant: int8" in note for note in result.manifest["graph"]["notes"])
