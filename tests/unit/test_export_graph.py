"""The exported decoder graph, its parity with PyTorch, and the export stage end to end.

Models are built in the tests (`build_model`), at the ternary tiny shape where it matters for the
kernel path (d_model 256, expert_ffn 128: `kernels.qmoe_is_fast` holds) but with two layers and a small
vocabulary. Parity thresholds are checked on a model trained for a few dozen steps on a synthetic
corpus: with random weights most next-token predictions are near-ties, and a top-1 figure would
measure noise rather than the export.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime_genai as og  # a test extra: what a user may load a release with
import pytest
import torch

from nativelm import runtime
from nativelm.errors import NativelmError
from nativelm.export import graph as export_graph
from nativelm.export import ops, parity
from nativelm.export.graph import build_graph
from nativelm.export.stage import run_export
from nativelm.formats import prepared as prepared_format
from nativelm.formats.export_folder import (
    EXTERNAL_DATA,
    GENAI_CONFIG,
    MANIFEST,
    MODEL_FILE,
    TOKENIZER_CONFIG,
    TOKENIZER_FILE,
)
from nativelm.fsutil import sha256_file
from nativelm.model import ModelParams, build_model
from nativelm.params.data import TokenizerParams
from nativelm.params.export import ExportParams
from nativelm.train.loop import torch_threads

TINY = {"d_model": 256, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "max_seq_len": 128, "window": 16,
        "nope_every": 2, "n_experts": 4, "expert_ffn": 128, "top_k": 2}
NAMES = ["anna", "bert", "clara", "dirk", "emma", "frank"]
VERBS = ["sees", "takes", "paints", "finds", "keeps"]
NOUNS = ["the red boat", "a small house", "the old tree", "a green door", "the long road"]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def corpus(sentences: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"{NAMES[rng.integers(6)]} {VERBS[rng.integers(5)]} {NOUNS[rng.integers(5)]}."
                    for _ in range(sentences))


def write_prepared(folder: Path) -> Path:
    """A prepared folder with a real byte-level BPE tokenizer and train/val shards of a synthetic corpus."""
    from nativelm.data.shards import write_split
    from nativelm.data.tokenizer import save_tokenizer, train_tokenizer
    from nativelm.formats.prepared import build_manifest, write_manifest

    folder.mkdir(parents=True)
    texts = {"train": [corpus(1500, 0)], "val": [corpus(200, 1)]}
    tokenizer = train_tokenizer(texts["train"], TokenizerParams(vocab_size=320))
    save_tokenizer(tokenizer, folder / TOKENIZER_FILE)
    counts = {split: write_split(tokenizer, t, folder, split, 1 << 20, np.dtype("<u2")) for split, t in texts.items()}
    write_manifest(folder, build_manifest(folder, tokenizer.get_vocab_size(), np.dtype("<u2"), 1 << 20, counts,
                                          {"train": 1, "val": 1}))
    return folder


def train_briefly(model: torch.nn.Module, stream: np.ndarray, steps: int = 60, seq: int = 64) -> torch.nn.Module:
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - seq - 1, 8)
        batch = torch.from_numpy(np.stack([stream[s:s + seq + 1] for s in starts]).astype(np.int64))
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("export") / "prepared")


def shard(folder: Path, split: str) -> np.ndarray:
    from nativelm.formats.prepared import load_shards

    return np.concatenate([np.asarray(s) for s in load_shards(folder, split)])


@pytest.fixture(scope="module")
def trained(prepared: Path) -> torch.nn.Module:
    """The tiny ternary MoE shape, trained briefly on the synthetic corpus (confident predictions)."""
    vocab = json.loads((prepared / MANIFEST).read_text())["vocab_size"]
    with torch_threads(1):
        return train_briefly(build_model(ModelParams(**TINY), vocab), shard(prepared, "train"))


@pytest.fixture(scope="module")
def ternary(trained: torch.nn.Module) -> export_graph.ExportGraph:
    return build_graph(trained, ExportParams(variant="ternary"))


@pytest.fixture(scope="module")
def decoder(ternary: export_graph.ExportGraph) -> parity.OnnxDecoder:
    return parity.OnnxDecoder(ternary.model.SerializeToString(), threads=1)


def nodes_by_op(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        found.setdefault(node.op_type, []).append(node)
    return found


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def full_logits(dec: parity.OnnxDecoder, ids: np.ndarray) -> np.ndarray:
    return dec.forward(np.asarray(ids, np.int64))[0]


def random_ids(vocab: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (1, length)).astype(np.int64)


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float) -> None:
    scale = float(np.abs(expected).max())
    diff = float(np.abs(actual - expected).max())
    assert diff <= rel * scale, f"max abs diff {diff:.3e} > {rel:g} x max|ref| {scale:.3e}"


# --------------------------------------------------------------------------- the ternary graph


def test_ternary_graph_operators_and_attributes(trained: torch.nn.Module,
                                                ternary: export_graph.ExportGraph) -> None:
    model = ternary.model
    onnx.checker.check_model(model, full_check=True)
    ops_used = nodes_by_op(model)
    p = trained.params

    linears = [n for n in ops_used["MatMulNBits"] if n.name != "lm_head"]
    assert len(linears) == 4 * p.n_layers  # q, k, v, o: separate nodes, each with its own norm in front
    for node in linears:
        assert attrs(node)["bits"] == 2 and attrs(node)["accuracy_level"] == 4 and node.domain == ops.MS_DOMAIN
        norm = next(n for n in model.graph.node if node.input[0] in n.output)
        assert norm.op_type == "RMSNormalization" and norm.name == f"{node.name}.norm"
    (head,) = [n for n in ops_used["MatMulNBits"] if n.name == "lm_head"]
    assert attrs(head)["bits"] == 8 and list(head.output) == ["logits"]

    assert len(ops_used["QMoE"]) == p.n_layers
    for node in ops_used["QMoE"]:
        a = attrs(node)
        assert (a["expert_weight_bits"], a["k"], a["swiglu_fusion"], a["activation_type"]) == (2, 2, 1, b"swiglu")
        assert a["activation_alpha"] == pytest.approx(1e6) and a["activation_beta"] == 0.0
        # pre-attention routing: the router reads the attention norm's output, computed before attention
        layer = node.name.split(".")[1]
        router = next(n for n in model.graph.node if n.name == f"layers.{layer}.router.logits")
        assert router.input[0] == f"layers.{layer}.attn_norm"
        order = [n.name for n in model.graph.node]
        assert order.index(router.name) < order.index(f"layers.{layer}.attn.gqa")

    gqa = sorted(ops_used["GroupQueryAttention"], key=lambda n: n.name)
    assert [(attrs(n)["do_rotary"], attrs(n)["local_window_size"]) for n in gqa] == [(1, 16), (0, -1)]
    assert all(len(n.input) == 9 for n in gqa[:1]) and len(gqa[1].input) == 7  # cos/sin caches only with RoPE
    assert all((attrs(n)["num_heads"], attrs(n)["kv_num_heads"]) == (8, 2) for n in gqa)

    # the only plain MatMuls are the fp32 routers
    assert sorted(n.name for n in ops_used["MatMul"]) == [f"layers.{i}.router.logits" for i in range(p.n_layers)]
    assert [n.name for n in ops_used["GatherBlockQuantized"]] == ["embed"]
    assert len(ops_used["SkipSimplifiedLayerNormalization"]) == 2 * p.n_layers  # ffn norms, next attn norm, final
    assert "SimplifiedLayerNormalization" not in ops_used  # checker-clean RMSNormalization instead

    inputs = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
    assert inputs[:2] == [("input_ids", onnx.TensorProto.INT64), ("attention_mask", onnx.TensorProto.INT64)]
    assert [i[0] for i in inputs[2:-1]] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert inputs[-1] == ("num_logits_to_keep", onnx.TensorProto.INT64)  # optional: an initializer holds its 0
    assert [o.name for o in model.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(2)
                                                                 for kv in ("key", "value")]
    assert ternary.choices["moe"]["expert_weight_bits"] == 2 and ternary.choices["moe"]["fast_kernel"]
    assert ternary.notes == []


def test_num_logits_to_keep_cuts_the_logits_to_the_last_positions(decoder: parity.OnnxDecoder) -> None:
    ids = random_ids(300, 12)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **decoder.empty_past()}
    every = decoder.session.run(["logits"], feeds)[0]  # not fed: the default, every position (scoring, parity)
    assert every.shape[:2] == (1, 12)
    for keep, positions in ((1, 1), (5, 5), (0, 12), (40, 12)):
        kept = decoder.session.run(["logits"], {**feeds, "num_logits_to_keep": np.array([keep], np.int64)})[0]
        assert kept.shape == (1, positions, every.shape[2])
        np.testing.assert_allclose(kept, every[:, 12 - positions:], rtol=0, atol=1e-5 * float(np.abs(every).max()))


def test_ternary_tiny_shape_runs_every_quantized_node_prepacked(ternary: export_graph.ExportGraph) -> None:
    dec = parity.OnnxDecoder(ternary.model.SerializeToString(), threads=1)
    ids = random_ids(300, 8)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **dec.empty_past()}
    report = parity.kernel_paths(ternary.model, ternary.model.SerializeToString(), ternary.quantized_nodes, feeds)
    assert report["all_prepacked"], report
    assert report["checked"] == len(ternary.quantized_nodes) == 4 * 2 + 2 + 1  # linears, QMoE, LM head
    assert report["nodes"]["layers.0.moe"]["prepacked_inputs"] == ["layers.0.moe.fc1.weight", "layers.0.moe.fc2.weight"]


def test_ternary_parity_within_thresholds(trained: torch.nn.Module, decoder: parity.OnnxDecoder,
                                          prepared: Path) -> None:
    windows = prepared_format.validation_windows([shard(prepared, "val")], 512, trained.params.max_seq_len)
    assert windows.shape == (4, 128)
    figures = parity.held_out_parity(trained, decoder, windows)
    params = ExportParams()
    assert figures["top1_agreement"] >= params.min_top1_agreement, figures
    assert figures["ppl_rel_diff"] <= params.max_ppl_rel_diff, figures
    assert figures["ppl_torch"] < 20  # the briefly trained model predicts well: agreement is not luck
    assert figures["max_abs_logit_diff"] > 0  # int8 block activations and LUT experts: close, not identical


def test_kv_cache_decoding_equals_full_recomputation_beyond_the_window(decoder: parity.OnnxDecoder,
                                                                       prepared: Path) -> None:
    prompt = shard(prepared, "val")[:10].tolist()
    figures = parity.cache_consistency(decoder, prompt, 60)  # 70 positions: well past the window of 16
    assert figures["match"] and figures["first_mismatch"] is None
    assert figures["max_rel_logit_diff"] < ExportParams().max_cache_logit_rel_diff
    # and literally: greedy by full recomputation, one whole forward per token
    tokens, _ = decoder.greedy(prompt, 24)
    ids = list(prompt)
    for _ in range(24):
        ids.append(int(full_logits(decoder, np.array([ids]))[0, -1].argmax()))
    assert ids[len(prompt):] == tokens


class _SwappingDecoder:
    """Cached and full logits equal but for step 1, where the two best tokens are `gap` apart and swap."""

    def __init__(self, gap: float) -> None:
        self.full = np.zeros((3, 4), np.float32)
        self.full[:, 0] = 10.0
        self.full[1, 1] = 10.0 + gap  # full recomputation picks token 1 at step 1
        self.cached = self.full.copy()
        self.cached[1, 1] = 10.0 - gap  # the cached step picks token 0

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
        return self.cached.argmax(-1).tolist(), self.cached

    def forward(self, ids: np.ndarray, past: object = None) -> tuple[np.ndarray, None]:
        return np.concatenate([np.zeros((1, 4), np.float32), self.full])[None], None


def test_kv_cache_check_tells_a_near_tie_from_a_divergence() -> None:
    tie = parity.cache_consistency(_SwappingDecoder(0.01), [5, 6], 3, tie_rel=0.01)  # 0.02 apart < 0.01 x 10
    assert tie["match"] and tie["ties"] == 1
    wrong = parity.cache_consistency(_SwappingDecoder(1.0), [5, 6], 3, tie_rel=0.01)
    assert not wrong["match"] and wrong["first_mismatch"] == 1 and wrong["ties"] == 0
    assert not parity.cache_consistency(_SwappingDecoder(0.01), [5, 6], 3)["match"]  # no tolerance, no tie


class _FixedLogits(torch.nn.Module):
    """A 'model' whose logits for any (1, 3) window are `logits`: the PyTorch side of a parity check."""

    def __init__(self, logits: np.ndarray) -> None:
        super().__init__()
        self.logits = torch.from_numpy(logits)

    def forward(self, ids: torch.Tensor) -> object:
        return type("Out", (), {"logits": self.logits[None]})()


class _FixedDecoder:
    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits

    def forward(self, ids: np.ndarray, past: object = None) -> tuple[np.ndarray, None]:
        return self.logits[None], None


def test_top1_agreement_counts_a_near_tie_as_agreeing_and_a_real_difference_not() -> None:
    reference = np.array([[10.0, 9.95, 0, 0], [10.0, 5.0, 0, 0], [0, 10.0, 0, 0]], np.float32)
    near_tie = np.array([[9.9, 10.0, 0, 0], [10.0, 5.0, 0, 0], [0, 10.0, 0, 0]], np.float32)  # swaps 0.05 apart
    real = near_tie.copy()
    real[1] = [5.0, 10.0, 0, 0]  # and picks a token 5 logits below PyTorch's best
    windows = np.zeros((1, 3), np.int64)
    tie = parity.held_out_parity(_FixedLogits(reference), _FixedDecoder(near_tie), windows, tie_rel=0.01)
    assert tie["top1_exact_agreement"] == pytest.approx(2 / 3) and tie["top1_agreement"] == 1.0
    wrong = parity.held_out_parity(_FixedLogits(reference), _FixedDecoder(real), windows, tie_rel=0.01)
    assert wrong["top1_exact_agreement"] == pytest.approx(1 / 3) and wrong["top1_agreement"] == pytest.approx(2 / 3)
    exact = parity.held_out_parity(_FixedLogits(reference), _FixedDecoder(near_tie), windows)
    assert exact["top1_agreement"] == exact["top1_exact_agreement"] == pytest.approx(2 / 3)


def test_golden_continuation_matches_pytorch_greedy(trained: torch.nn.Module, decoder: parity.OnnxDecoder,
                                                    prepared: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(prepared / TOKENIZER_FILE))
    (golden,) = parity.golden_continuations(decoder, tokenizer, ["anna sees"], 12, 128, trained)
    assert golden["prompt_ids"] == tokenizer.encode("anna sees").ids and len(golden["continuation_ids"]) == 12
    assert golden["continuation_text"] == tokenizer.decode(golden["continuation_ids"])
    assert golden["torch_common_prefix"] == 12


# --------------------------------------------------------------------------- other variants and shapes


def test_fp32_variant_matches_an_unquantized_model_closely() -> None:
    model = build_model(ModelParams(**{**TINY, "quantize": False}), 300, seed=1).eval()
    graph = build_graph(model, ExportParams(variant="fp32"))
    onnx.checker.check_model(graph.model, full_check=True)
    ops_used = nodes_by_op(graph.model)
    assert not {"MatMulNBits", "QMoE", "GatherBlockQuantized"} & set(ops_used)
    assert set(ops_used) & {"TopK", "ScatterElements", "Softmax"} == {"TopK", "ScatterElements", "Softmax"}
    ids = random_ids(300, 40)
    logits = full_logits(parity.OnnxDecoder(graph.model.SerializeToString(), threads=1), ids)
    assert_close(logits, parity.torch_logits(model, ids), 1e-4)


def test_fp32_variant_of_a_ternary_model_is_its_forward_op_for_op(trained: torch.nn.Module) -> None:
    graph = build_graph(trained, ExportParams(variant="fp32"))
    assert "Round" in nodes_by_op(graph.model)  # BitLinear's per-token 8-bit activations
    ids = random_ids(trained.vocab_size, 48, seed=2)
    logits = full_logits(parity.OnnxDecoder(graph.model.SerializeToString(), threads=1), ids)
    reference = parity.torch_logits(trained, ids)
    assert_close(logits, reference, 1e-3)
    assert (logits.argmax(-1) == reference.argmax(-1)).all()


def test_int4_variant_uses_4_bit_operators_and_stays_close(trained: torch.nn.Module) -> None:
    graph = build_graph(trained, ExportParams(variant="int4"))
    ops_used = nodes_by_op(graph.model)
    assert {attrs(n)["bits"] for n in ops_used["MatMulNBits"] if n.name != "lm_head"} == {4}
    assert {attrs(n)["expert_weight_bits"] for n in ops_used["QMoE"]} == {4}
    ids = random_ids(trained.vocab_size, 48, seed=3)
    logits = full_logits(parity.OnnxDecoder(graph.model.SerializeToString(), threads=1), ids)
    assert_close(logits, parity.torch_logits(trained, ids), 0.05)
    # the latent master weights are another (post-training-quantized) model: allowed, and different
    latent = build_graph(trained, ExportParams(variant="int4", comparison_weights="latent"))
    latent_logits = full_logits(parity.OnnxDecoder(latent.model.SerializeToString(), threads=1), ids)
    assert np.abs(latent_logits - logits).max() > np.abs(logits - parity.torch_logits(trained, ids)).max()


@pytest.mark.parametrize(("d_model", "expert_ffn", "bits", "block", "fast"), [
    (128, 32, 4, 32, True),  # 2-bit rules fail (hidden % 128 ok, but K=32 < 2 blocks): exact 4-bit codes
    (64, 24, 2, None, False),  # no block divides 24: row-wise 2-bit, exact but slow
])
def test_qmoe_falls_back_when_fast_rules_fail_and_says_so(d_model: int, expert_ffn: int, bits: int,
                                                          block: int | None, fast: bool) -> None:
    params = ModelParams(**{**TINY, "d_model": d_model, "n_heads": 4, "expert_ffn": expert_ffn})
    model = build_model(params, 200, seed=4).eval()
    graph = build_graph(model, ExportParams(variant="ternary", block_size=32))
    choice = graph.choices["moe"]
    assert (choice["expert_weight_bits"], choice["block_size"], choice["fast_kernel"]) == (bits, block, fast)
    assert len(graph.notes) == 1 and "QMoE" in graph.notes[0]
    (node, *_) = nodes_by_op(graph.model)["QMoE"]
    assert attrs(node)["expert_weight_bits"] == bits
    # both fallbacks are exact for ternary experts: only the int8 block activations of the linears differ
    ids = random_ids(200, 24, seed=5)
    logits = full_logits(parity.OnnxDecoder(graph.model.SerializeToString(), threads=1), ids)
    assert_close(logits, parity.torch_logits(model, ids), 0.05)


def test_dense_ffn_model_exports_its_reglu_as_ternary_matmuls() -> None:
    model = build_model(ModelParams(**{**TINY, "ffn": "dense", "dense_ffn": 256}), 200, seed=6).eval()
    graph = build_graph(model, ExportParams(variant="ternary"))
    ops_used = nodes_by_op(graph.model)
    assert "QMoE" not in ops_used and "MatMul" not in ops_used  # no router either
    outputs = {n.name: list(n.output) for n in ops_used["MatMulNBits"]}
    assert outputs["layers.0.ffn.gate"] == ["layers.0.ffn.gate"] and outputs["layers.0.ffn.down"] == ["layers.0.ffn"]
    assert all(attrs(n)["bits"] == 2 for n in ops_used["MatMulNBits"] if n.name != "lm_head")
    ids = random_ids(200, 24, seed=7)
    logits = full_logits(parity.OnnxDecoder(graph.model.SerializeToString(), threads=1), ids)
    assert_close(logits, parity.torch_logits(model, ids), 0.05)


def test_bitlinear_experts_are_refused_by_qmoe_and_exact_in_fp32() -> None:
    model = build_model(ModelParams(**{**TINY, "expert_quant": "bitlinear", "d_model": 64, "n_heads": 4,
                                       "expert_ffn": 32}), 200, seed=8).eval()
    for variant in ("ternary", "int4"):
        with pytest.raises(NativelmError, match="QMoE .*cannot represent"):
            build_graph(model, ExportParams(variant=variant))
    graph = build_graph(model, ExportParams(variant="fp32"))
    ids = random_ids(200, 24, seed=9)
    logits = full_logits(parity.OnnxDecoder(graph.model.SerializeToString(), threads=1), ids)
    assert_close(logits, parity.torch_logits(model, ids), 1e-3)


def test_models_the_ternary_variant_cannot_represent_are_refused() -> None:
    small = {**TINY, "d_model": 64, "n_heads": 4, "expert_ffn": 32}
    with pytest.raises(NativelmError, match="quantize: false"):
        build_graph(build_model(ModelParams(**small, quantize=False), 100), ExportParams(variant="ternary"))
    eight_bit = build_model(ModelParams(**small, bit_schedule=[[0.0, 8.0]]), 100)
    with pytest.raises(NativelmError, match="8.0 bits"):
        build_graph(eight_bit, ExportParams(variant="ternary"))
    build_graph(eight_bit, ExportParams(variant="fp32"))  # the comparison variants take any width


def test_export_params_are_validated() -> None:
    from pydantic import ValidationError

    for bad in ({"block_size": 96}, {"moe_block_size": 8}, {"golden_prompts": [" "]}, {"variant": "int2"},
                {"opset": 21}, {"lm_head_bits": 2}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            ExportParams.model_validate(bad)
    assert ExportParams().out_dir == "models/onnx" and ExportParams().min_top1_agreement == 0.99


def test_thresholds_name_the_failing_figure() -> None:
    held = {"top1_agreement": 0.95, "ppl_rel_diff": 0.0, "tokens": 64, "ppl_onnx": 2.0, "ppl_torch": 2.0}
    cache = {"match": True, "first_mismatch": None, "steps": 4, "max_rel_logit_diff": 0.0}
    with pytest.raises(NativelmError, match="top-1 agreement 0.9500 < min_top1_agreement 0.99"):
        parity.check_thresholds({"held_out": held, "kv_cache": cache}, ExportParams())
    held.update(top1_agreement=1.0, ppl_rel_diff=0.5)
    with pytest.raises(NativelmError, match="max_ppl_rel_diff 0.01"):
        parity.check_thresholds({"held_out": held, "kv_cache": cache}, ExportParams())
    held.update(ppl_rel_diff=0.0)
    cache.update(match=False, first_mismatch=2)
    with pytest.raises(NativelmError, match="KV cache .* step 2"):
        parity.check_thresholds({"held_out": held, "kv_cache": cache}, ExportParams())


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def model_file(trained: torch.nn.Module, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nativelm.formats import trained_model

    tokenizer_sha = json.loads((prepared / MANIFEST).read_text())["sha256"][TOKENIZER_FILE]
    path = tmp_path_factory.mktemp("trained") / "model.pt"
    return trained_model.write(path, trained.state_dict(), trained.params, trained.vocab_size,
                               {"step": 60, "weight_bits": 1.58, "tokenizer_sha256": tokenizer_sha})




def test_run_export_writes_a_verified_folder(prepared: Path, model_file: Path, tmp_path: Path) -> None:
    export = ExportParams(variant="ternary", out_dir=str(tmp_path / "onnx"),
                          metrics_file=str(tmp_path / "metrics/export.json"), parity_tokens=256,
                          golden_prompts=["anna sees", "the old"], golden_tokens=8, cache_check_tokens=40, threads=1)
    result = run_export(model_file, prepared, export)
    folder = tmp_path / "onnx"
    assert sorted(p.name for p in folder.iterdir()) == sorted([MODEL_FILE, TOKENIZER_FILE, GENAI_CONFIG,
                                                               TOKENIZER_CONFIG, MANIFEST])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest == result.manifest
    assert manifest["sha256"] == {n: sha256_file(folder / n)
                                  for n in (GENAI_CONFIG, MODEL_FILE, TOKENIZER_CONFIG, TOKENIZER_FILE)}
    assert (folder / TOKENIZER_FILE).read_bytes() == (prepared / TOKENIZER_FILE).read_bytes()
    assert manifest["variant"] == "ternary" and manifest["kernels"]["all_prepacked"]
    assert manifest["parity"]["passed"] and manifest["parity"]["kv_cache"]["match"]
    assert manifest["parity"]["held_out"]["top1_agreement"] >= 0.99
    assert manifest["sizes"]["files"][MODEL_FILE] == (folder / MODEL_FILE).stat().st_size
    weights = manifest["weights"]
    assert 2.0 < weights["parts"]["attention"]["bits_per_weight"] < 3.0
    assert 2.0 < weights["parts"]["ffn"]["bits_per_weight"] < 3.0
    assert weights["parts"]["lm_head"]["bits_per_weight"] == pytest.approx(8.25)

    # the golden continuations replay on the written model, as a board's health check would
    dec = parity.OnnxDecoder(folder / MODEL_FILE, threads=1)
    for golden in manifest["golden"]["prompts"]:
        assert dec.greedy(golden["prompt_ids"], 8)[0] == golden["continuation_ids"]

    config = json.loads((folder / GENAI_CONFIG).read_text())
    decoder_cfg = config["model"]["decoder"]
    assert config["model"]["type"] == "decoder" and config["model"]["eos_token_id"] == 0
    assert config["model"]["context_length"] == 128 and config["search"]["max_length"] == 128
    assert (decoder_cfg["num_hidden_layers"], decoder_cfg["num_attention_heads"],
            decoder_cfg["num_key_value_heads"], decoder_cfg["head_size"]) == (2, 8, 2, 32)
    assert decoder_cfg["inputs"]["past_key_names"] % 1 == "past_key_values.1.key"
    assert decoder_cfg["outputs"]["present_value_names"] % 0 == "present.0.value"

    metrics = json.loads((tmp_path / "metrics/export.json").read_text())
    assert metrics == result.metrics
    assert metrics["kv_cache_match"] == 1 and metrics["all_prepacked"] == 1
    assert metrics["model_bytes"] == (folder / MODEL_FILE).stat().st_size


def test_onnxruntime_genai_generates_what_the_board_runtime_does(prepared: Path, model_file: Path,
                                                                  tmp_path: Path) -> None:
    """The export folder is an onnxruntime-genai model as it is: same greedy continuation as the runtime."""
    run_export(model_file, prepared, ExportParams(out_dir=str(tmp_path / "onnx"), variant="int4", threads=1,
                                                 metrics_file=str(tmp_path / "export.json"), parity_tokens=64,
                                                 cache_check_tokens=16))
    assert_genai_matches_board(tmp_path / "onnx", "anna sees the", 12)


def assert_genai_matches_board(folder: Path, prompt: str, new: int) -> None:
    """onnxruntime-genai loads the export folder and continues `prompt` greedily as the board runtime does."""
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(prompt)
    search = og.GeneratorParams(model)
    search.set_search_options(max_length=len(ids) + new, do_sample=False)
    generator = og.Generator(model, search)
    generator.append_tokens(ids)
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    board = runtime.generate(runtime.load_model(folder, threads=1), prompt, new, runtime.Sampling(temperature=0.0))
    assert list(ids) == list(board.prompt_ids)
    assert tokens[:len(board.token_ids)] == list(board.token_ids) and len(board.token_ids) > 0
    assert tokenizer.decode(tokens[:len(board.token_ids)]) == board.text


def test_parity_failure_keeps_the_previous_export(prepared: Path, model_file: Path, tmp_path: Path) -> None:
    common: dict[str, Any] = {"out_dir": str(tmp_path / "onnx"), "metrics_file": str(tmp_path / "export.json"),
                              "parity_tokens": 128, "golden_prompts": ["anna"], "golden_tokens": 4,
                              "cache_check_tokens": 8, "threads": 1}
    run_export(model_file, prepared, ExportParams(variant="fp32", **common))
    before = {p.name: p.read_bytes() for p in (tmp_path / "onnx").iterdir()}
    metrics_before = (tmp_path / "export.json").read_bytes()
    with pytest.raises(NativelmError, match="perplexity relative difference .* > max_ppl_rel_diff 0.0"):
        run_export(model_file, prepared, ExportParams(variant="ternary", min_top1_agreement=0.0, max_ppl_rel_diff=0.0,
                                                      **common))
    assert {p.name: p.read_bytes() for p in (tmp_path / "onnx").iterdir()} == before
    assert (tmp_path / "export.json").read_bytes() == metrics_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "onnx"]


def test_large_models_keep_their_weights_in_external_data(prepared: Path, model_file: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from nativelm.export import stage

    monkeypatch.setattr(stage, "MAX_INLINE_BYTES", 1)  # as if the weights passed protobuf's 2 GB limit
    export = ExportParams(variant="ternary", out_dir=str(tmp_path / "onnx"), metrics_file=str(tmp_path / "export.json"),
                          parity_tokens=128, golden_prompts=["anna"], golden_tokens=4, cache_check_tokens=8,
                          threads=1)
    manifest = run_export(model_file, prepared, export).manifest
    folder = tmp_path / "onnx"
    assert (folder / MODEL_FILE).stat().st_size < 100_000 < (folder / EXTERNAL_DATA).stat().st_size
    assert manifest["sha256"][EXTERNAL_DATA] == sha256_file(folder / EXTERNAL_DATA)
    assert manifest["sizes"]["model_bytes"] == sum((folder / n).stat().st_size for n in (MODEL_FILE,
                                                                                         EXTERNAL_DATA))
    assert manifest["kernels"]["all_prepacked"] and manifest["parity"]["passed"]


def test_run_export_refuses_a_tokenizer_the_model_was_not_trained_with(prepared: Path, trained: torch.nn.Module,
                                                                       tmp_path: Path) -> None:
    from nativelm.formats import trained_model

    path = trained_model.write(tmp_path / "model.pt", trained.state_dict(), trained.params, trained.vocab_size,
                               {"tokenizer_sha256": "0" * 64})
    with pytest.raises(NativelmError, match="not the tokenizer the model was trained with"):
        run_export(path, prepared, ExportParams(out_dir=str(tmp_path / "onnx")))
    assert not (tmp_path / "onnx").exists()


def test_variants_compare_in_size(trained: torch.nn.Module, ternary: export_graph.ExportGraph) -> None:
    sizes = {"ternary": ternary.part_bytes()}
    for variant in ("int4", "fp32"):
        sizes[variant] = build_graph(trained, ExportParams(variant=variant)).part_bytes()
    for part in ("attention", "ffn"):
        assert sizes["ternary"][part] < sizes["int4"][part] < sizes["fp32"][part]
    assert Counter(ternary.parts.values())["ffn"] == 4 * trained.params.n_layers  # fc1/fc2 weights + scales
