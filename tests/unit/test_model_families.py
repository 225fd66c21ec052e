"""Model families: what each resolves to, written values win, OpenELM's per-layer shapes, SwiGLU,
and a few training steps of every family through the train stage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nativelm.errors import ParamsError
from nativelm.model import ModelParams, build_model, param_counts, preset_params
from nativelm.model.trained import load_trained_model
from nativelm.params.families import FAMILIES
from nativelm.params.layer_scaling import LayerScaling
from nativelm.params.model import PRESETS, with_preset
from nativelm.params.root import parse_params
from nativelm.train.loop import torch_threads
from tests.unit.test_train_data import write_token_data
from tests.unit.test_train_stage import make_params, train_stage

# family -> (ffn, quantize, ffn_act, window, nope_every, layer scaling on)
EXPECTED = {
    "smallthinker": ("moe", True, "reglu", 64, 4, False),
    "bitnet": ("dense", True, "swiglu", 0, 0, False),
    "phi3": ("dense", False, "swiglu", 0, 0, False),
    "openelm": ("dense", True, "swiglu", 0, 0, True),
}
TINY_DENSE = {"d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, "dense_ffn": 64}


def _knobs(m: ModelParams) -> tuple:
    return m.ffn, m.quantize, m.ffn_act, m.window, m.nope_every, m.scaling is not None


def test_the_family_table_names_every_family() -> None:
    assert set(FAMILIES) == set(EXPECTED) and FAMILIES["smallthinker"] == {}
    assert ModelParams.model_fields["family"].default == "smallthinker"


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_family_resolves_to_its_knobs(family: str) -> None:
    resolved = with_preset(parse_params(f"model: {{family: {family}}}\n").model, "tiny")
    assert _knobs(resolved) == EXPECTED[family]
    assert resolved.d_model == PRESETS["tiny"]["d_model"] and resolved.n_layers == PRESETS["tiny"]["n_layers"]


def test_smallthinker_is_todays_model_exactly() -> None:
    assert with_preset(ModelParams(family="smallthinker"), "tiny") == ModelParams()
    assert with_preset(ModelParams(), "gpu") == preset_params("gpu")
    assert with_preset(ModelParams(family="smallthinker"), "gpu") == preset_params("gpu")


def test_a_family_beats_the_preset_and_a_written_value_beats_the_family() -> None:
    gpu_bitnet = with_preset(parse_params("model: {family: bitnet}\n").model, "gpu")
    assert gpu_bitnet.ffn == "dense" and gpu_bitnet.window == 0  # the preset says moe and 512
    assert gpu_bitnet.d_model == PRESETS["gpu"]["d_model"] and gpu_bitnet.dense_ffn == PRESETS["gpu"]["dense_ffn"]
    text = "model: {family: phi3, quantize: true, ffn_act: reglu, window: 16, nope_every: 2}\n"
    written = with_preset(parse_params(text).model, "gpu")
    assert (written.quantize, written.ffn_act, written.window, written.nope_every) == (True, "reglu", 16, 2)
    assert preset_params("gpu", family="bitnet").window == 0 and preset_params("gpu", family="bitnet", window=8).window == 8


def test_null_family_knobs_take_the_family_value() -> None:
    text = "model: {family: phi3, quantize: null, ffn: null, layer_scaling: null}\n"
    resolved = with_preset(parse_params(text).model, "tiny")
    assert _knobs(resolved) == EXPECTED["phi3"]
    assert parse_params("model: {quantize: null}\n").model.quantize is True  # smallthinker: the default


def test_openelm_layer_scaling_can_be_switched_off_or_retuned() -> None:
    off = with_preset(parse_params("model: {family: openelm, layer_scaling: false}\n").model, "tiny")
    assert off.scaling is None and [off.layer_ffn(i) for i in range(4)] == [off.dense_ffn] * 4
    custom = parse_params("model: {family: openelm, layer_scaling: {alpha: [1.0, 1.0], beta: [1.0, 2.0]}}\n").model
    assert custom.scaling == LayerScaling(alpha=[1.0, 1.0], beta=[1.0, 2.0])
    assert parse_params("model: {layer_scaling: true, ffn: dense}\n").model.scaling == LayerScaling()


def test_openelm_per_layer_heads_and_widths_follow_the_formula() -> None:
    p = with_preset(ModelParams(family="openelm"), "gpu")  # d_model 768, 12 heads (head_dim 64), 4 kv heads
    n = p.n_layers
    for i in range(n):
        alpha = 0.5 + 0.5 * i / (n - 1)
        beta = 0.5 + 3.5 * i / (n - 1)
        heads = max(4, 4 * math.floor(alpha * 768 / 64 / 4 + 0.5))
        assert p.layer_heads(i) == heads and heads % p.n_kv_heads == 0
        assert p.layer_ffn(i) == max(128, 128 * math.floor(beta * 768 / 128 + 0.5))
    assert (p.layer_heads(0), p.layer_heads(n - 1)) == (8, 12) and (p.layer_ffn(0), p.layer_ffn(n - 1)) == (384, 3072)
    tiny = with_preset(ModelParams(family="openelm"), "tiny")
    assert [tiny.layer_heads(i) for i in range(4)] == [4, 6, 6, 8]
    assert [tiny.layer_ffn(i) for i in range(4)] == [128, 384, 768, 1024]
    model = build_model(tiny, 64)
    for i, block in enumerate(model.blocks):
        assert block.attn.n_heads == tiny.layer_heads(i) and block.attn.head_dim == tiny.head_dim
        assert block.attn.k_proj.weight.shape[0] == tiny.n_kv_heads * tiny.head_dim
        assert block.ffn.hidden == tiny.layer_ffn(i) and block.ffn.ffn.down.weight.shape == (256, tiny.layer_ffn(i))
    counts = param_counts(tiny, 64)
    assert counts["total"] == model.num_params() and counts["active"] == model.active_params()


@pytest.mark.parametrize(("text", "fragment"), [
    ("model: {ffn_act: swiglu}\n", "ffn_act swiglu is for the dense FFN.*write ffn_act: reglu"),
    ("model: {ffn_act: gelu}\n", "model.ffn_act"),
    ("model: {family: gemma}\n", "model.family"),
    ("model: {family: openelm, ffn: moe}\n", "layer_scaling scales the dense FFN"),
    ("model: {family: openelm, layer_scaling: {alpha: [0.5]}}\n", "layer_scaling.alpha must be [first, last]"),
    ("model: {family: openelm, layer_scaling: {beta: [0.0, 4.0]}}\n", "layer_scaling.beta must be"),
    ("model: {family: openelm, layer_scaling: {width_multiple: 0}}\n", "layer_scaling: Value error, width_multiple: Input"),
    ("model: {family: openelm, layer_scaling: {widht_multiple: 64}}\n", "widht_multiple: Extra inputs"),
])
def test_bad_family_values_are_one_line(text: str, fragment: str) -> None:
    with pytest.raises(ParamsError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as info:
        parse_params(text)
    assert "\n" not in str(info.value) and "more:" not in str(info.value)  # one error, not one per union member


def test_a_family_clash_found_with_the_preset_is_one_params_error_line() -> None:
    model = parse_params("model: {family: bitnet, ffn_act: swiglu}\n").model
    with pytest.raises(ParamsError, match="family bitnet, train.preset gpu.*ffn_act swiglu") as info:
        with_preset(model.model_copy(update={"ffn": "moe"}), "gpu")  # what written ffn: moe would give
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("quantize", [False, True])
def test_swiglu_dense_ffn_forward_is_silu_gate_times_up(quantize: bool) -> None:
    p = ModelParams(**TINY_DENSE, ffn="dense", ffn_act="swiglu", quantize=quantize, bitlinear_norm=False,
                    act_bits=16)
    ffn = build_model(p, 64, seed=3).blocks[0].ffn.ffn
    x = torch.randn(5, 32)
    with torch.no_grad():
        y, zeros = ffn(x)
        g, u = ffn.gate(x), ffn.up(x)
        assert torch.allclose(y, ffn.down(F.silu(g) * u), atol=1e-6)
        reglu = ffn.down(F.relu(g) * u)
        assert (y - reglu).abs().max() > 0.1 * y.abs().max()  # not the ReGLU
    assert zeros == 0  # silu has no exact zeros: no activation sparsity


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_data(tmp_path_factory.mktemp("tokens") / "prepared")


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_every_family_trains_a_few_steps_and_round_trips(family: str, token_dir: Path, tmp_path: Path) -> None:
    shape = {**TINY_DENSE, "family": family, "n_experts": 4, "expert_ffn": 16, "top_k": 2}
    if family == "openelm":  # widths of a 32-wide model on a small multiple
        shape["layer_scaling"] = {"width_multiple": 16}
    inputs = make_params(token_dir, tmp_path, model=shape, max_steps=6, warmup_steps=1, eval_interval=6,
                         checkpoint_interval=6, log_interval=3)
    with torch_threads(1):
        result = train_stage(inputs)
    assert result.steps == 6 and result.metrics["val_loss"] < 6.0
    model, _ = load_trained_model(tmp_path / "models/model.pt")
    ffn, quantize, act, _, nope_every, scaled = EXPECTED[family]
    assert _knobs(model.params) == (ffn, quantize, act, 8, nope_every, scaled)  # window 8 written by SMALL
    assert model.params.family == family
    if family == "openelm":
        assert [b.ffn.hidden for b in model.blocks] == [16, 80, 128]  # beta 0.5, 2.25, 4.0 x 32, multiples of 16
        assert [b.attn.n_heads for b in model.blocks] == [2, 4, 4]  # alpha 0.5, 0.75, 1.0 x 4 heads, kv 2
