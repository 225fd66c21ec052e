"""A tiny decoder export folder for the runtime tests, built here from scratch (no exporter code).

The model is written with standard ONNX ops and random weights but follows the export's I/O
convention exactly: `input_ids` [B, S], `attention_mask` [B, total], `past_key_values.{i}.key/value`
[B, kv_heads, past, head_dim] in; `logits` [B, S, V] and `present.{i}.key/value` (past and new
positions concatenated: the full cache) out. Positions come from the past length (learned position
embeddings), so a wrong cache shows up as different logits. `reference_logits` is the same network
in numpy over the whole sequence: the golden continuations in the manifest come from it, not from
the runtime under test.

The tokenizer is a byte-level BPE trained on a few sentences, `<|endoftext|>` id 0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SENTENCES = [
    "The king spoke to the queen of the northern lands.",
    "A noble heart is worth more than a golden crown.",
    "The night was long and the sword was cold.",
    "Café au lait, naïve façade, jalapeño: accents are bytes too.",
    "日本語のテキストも少しあります。",
    "Good morning, my lord; the world is young and the day is fair.",
] * 4

GOLDEN_PROMPTS = ["The king", "A noble heart", "café 日本"]
EOT = "<|endoftext|>"


@dataclass
class Dims:
    d_model: int = 32
    n_heads: int = 2
    n_kv_heads: int = 2  # < n_heads only with attention="gqa"
    n_layers: int = 2
    ffn: int = 64
    context: int = 64
    # "standard": attention from plain ONNX ops (MatMul, Softmax, Concat of past and new K/V);
    # "gqa": ORT's com.microsoft GroupQueryAttention, as the exporter emits it (no rotary here)
    attention: str = "standard"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def train_tokenizer(vocab_size: int = 320, sentences: list[str] | None = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sentences or SENTENCES, trainer=trainer)
    assert tokenizer.token_to_id(EOT) == 0
    return tokenizer


def make_weights(vocab: int, dims: Dims, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = dims.d_model

    def normal(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"embed": normal(vocab, d, scale=1.0), "pos": normal(dims.context, d, scale=0.5),
         "head": normal(d, vocab, scale=2.0 / np.sqrt(d))}
    kv = dims.n_kv_heads * dims.head_dim
    for i in range(dims.n_layers):
        for name, width in (("q", d), ("k", kv), ("v", kv), ("o", d)):
            w[f"l{i}.{name}"] = normal(d, width, scale=1.0 / np.sqrt(d))
        w[f"l{i}.up"] = normal(d, dims.ffn, scale=1.0 / np.sqrt(d))
        w[f"l{i}.down"] = normal(dims.ffn, d, scale=1.0 / np.sqrt(dims.ffn))
    return w


def build_onnx(weights: dict[str, np.ndarray], dims: Dims) -> Any:
    """The decoder as an onnx.ModelProto (opset 17, standard ops only)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    vocab = weights["embed"].shape[0]
    h, kvh, hd, d = dims.n_heads, dims.n_kv_heads, dims.head_dim, dims.d_model
    assert dims.attention == "gqa" or h == kvh, "standard-op attention has as many KV heads as heads"
    inits = [numpy_helper.from_array(v, name=k) for k, v in weights.items()]

    def const(name: str, value: Any, dtype: Any = np.int64) -> str:
        inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name=name))
        return name

    const("zero", 0), const("one", 1), const("ax0", [0]), const("ax1", [1]), const("ax12", [1, 2])
    const("heads_shape", [0, 0, h, hd]), const("model_shape", [0, 0, d])
    const("scale", 1.0 / np.sqrt(hd), np.float32), const("neg", -1e9, np.float32)
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["tok"]),
        helper.make_node("Shape", ["past_key_values.0.key"], ["past_len1"], start=2, end=3),
        helper.make_node("Squeeze", ["past_len1", "ax0"], ["past_len"]),
        helper.make_node("Shape", ["attention_mask"], ["total1"], start=1, end=2),
        helper.make_node("Squeeze", ["total1", "ax0"], ["total"]),
        helper.make_node("Range", ["past_len", "total", "one"], ["positions"]),
        helper.make_node("Gather", ["pos", "positions"], ["pos_emb"]),
        helper.make_node("Add", ["tok", "pos_emb"], ["x0"]),
        # query i (absolute position past+i) sees keys j <= past+i that the attention mask keeps
        helper.make_node("Range", ["zero", "total", "one"], ["key_pos"]),
        helper.make_node("Unsqueeze", ["positions", "ax1"], ["rows"]),
        helper.make_node("Unsqueeze", ["key_pos", "ax0"], ["cols"]),
        helper.make_node("LessOrEqual", ["cols", "rows"], ["causal"]),
        helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["mask4"]),
        helper.make_node("Cast", ["mask4"], ["mask_bool"], to=TensorProto.BOOL),
        helper.make_node("And", ["causal", "mask_bool"], ["allowed"]),
        # GroupQueryAttention's view of the mask: last valid index per row, and the total length
        helper.make_node("ReduceSum", ["attention_mask", "ax1"], ["valid"], keepdims=0),
        helper.make_node("Sub", ["valid", "one"], ["last"]),
        helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Cast", ["total"], ["total_i32"], to=TensorProto.INT32),
    ]
    x = "x0"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])]
    for i in range(dims.n_layers):
        p = f"l{i}"
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{part}", TensorProto.FLOAT,
                                                        ["batch", kvh, "past_sequence_length", hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{part}", TensorProto.FLOAT,
                                                         ["batch", kvh, "total_sequence_length", hd]))
        if dims.attention == "gqa":
            nodes += [helper.make_node("MatMul", [x, f"{p}.{name}"], [f"{p}.{name}_flat"]) for name in "qkv"]
            nodes += [
                helper.make_node("GroupQueryAttention",
                                 [f"{p}.q_flat", f"{p}.k_flat", f"{p}.v_flat", f"past_key_values.{i}.key",
                                  f"past_key_values.{i}.value", "seqlens_k", "total_i32"],
                                 [f"{p}.ctx_flat", f"present.{i}.key", f"present.{i}.value"],
                                 domain="com.microsoft", num_heads=h, kv_num_heads=kvh),
            ]
        for name in ("q", "k", "v") if dims.attention != "gqa" else ():
            nodes += [helper.make_node("MatMul", [x, f"{p}.{name}"], [f"{p}.{name}_flat"]),
                      helper.make_node("Reshape", [f"{p}.{name}_flat", "heads_shape"], [f"{p}.{name}_bshd"]),
                      helper.make_node("Transpose", [f"{p}.{name}_bshd"], [f"{p}.{name}_new"], perm=[0, 2, 1, 3])]
        nodes += [] if dims.attention == "gqa" else [
            helper.make_node("Concat", [f"past_key_values.{i}.key", f"{p}.k_new"], [f"present.{i}.key"], axis=2),
            helper.make_node("Concat", [f"past_key_values.{i}.value", f"{p}.v_new"], [f"present.{i}.value"], axis=2),
            helper.make_node("Transpose", [f"present.{i}.key"], [f"{p}.kT"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [f"{p}.q_new", f"{p}.kT"], [f"{p}.raw"]),
            helper.make_node("Mul", [f"{p}.raw", "scale"], [f"{p}.scores"]),
            helper.make_node("Where", ["allowed", f"{p}.scores", "neg"], [f"{p}.masked"]),
            helper.make_node("Softmax", [f"{p}.masked"], [f"{p}.probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}.probs", f"present.{i}.value"], [f"{p}.ctx"]),
            helper.make_node("Transpose", [f"{p}.ctx"], [f"{p}.ctx_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{p}.ctx_t", "model_shape"], [f"{p}.ctx_flat"]),
        ]
        nodes += [
            helper.make_node("MatMul", [f"{p}.ctx_flat", f"{p}.o"], [f"{p}.attn"]),
            helper.make_node("Add", [x, f"{p}.attn"], [f"{p}.x_attn"]),
            helper.make_node("MatMul", [f"{p}.x_attn", f"{p}.up"], [f"{p}.up_out"]),
            helper.make_node("Tanh", [f"{p}.up_out"], [f"{p}.act"]),
            helper.make_node("MatMul", [f"{p}.act", f"{p}.down"], [f"{p}.ffn"]),
            helper.make_node("Add", [f"{p}.x_attn", f"{p}.ffn"], [f"{p}.out"]),
        ]
        x = f"{p}.out"
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"]))
    graph = helper.make_graph(nodes, "tiny-decoder", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17)]
    if dims.attention == "gqa":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def reference_logits(weights: dict[str, np.ndarray], dims: Dims, ids: list[int]) -> np.ndarray:
    """The same network in numpy (float64), whole sequence, no cache: logits [S, V]."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    n, h, kvh, hd = len(ids), dims.n_heads, dims.n_kv_heads, dims.head_dim
    x = w["embed"][ids] + w["pos"][:n]
    causal = np.tril(np.ones((n, n), dtype=bool))
    for i in range(dims.n_layers):
        q = (x @ w[f"l{i}.q"]).reshape(n, h, hd).transpose(1, 0, 2)
        # grouped-query attention: query head j reads KV head j // (h // kvh)
        k, v = ((x @ w[f"l{i}.{m}"]).reshape(n, kvh, hd).transpose(1, 0, 2).repeat(h // kvh, axis=0) for m in "kv")
        scores = np.where(causal, q @ k.transpose(0, 2, 1) / np.sqrt(hd), -1e9)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + (probs @ v).transpose(1, 0, 2).reshape(n, -1) @ w[f"l{i}.o"]
        x = x + np.tanh(x @ w[f"l{i}.up"]) @ w[f"l{i}.down"]
    return x @ w["head"]


def reference_greedy(weights: dict[str, np.ndarray], dims: Dims, ids: list[int], n: int) -> list[int]:
    seq, out = list(ids), []
    for _ in range(n):
        token = int(np.argmax(reference_logits(weights, dims, seq)[-1]))
        out.append(token)
        seq.append(token)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """manifest.json with the sha256 of every other file in the folder (recomputed now)."""
    manifest = dict(manifest)
    manifest["sha256"] = {p.name: sha256(p) for p in sorted(folder.iterdir())
                          if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def update_manifest(folder: Path, **changes: Any) -> dict[str, Any]:
    """Change manifest keys (None deletes one) and re-hash the folder's files."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    write_manifest(folder, manifest)
    return manifest


@dataclass
class Export:
    folder: Path
    weights: dict[str, np.ndarray]
    dims: Dims
    tokenizer: Any
    vocab: int


def make_export(folder: Path, seed: int = 0, dims: Dims | None = None, golden_tokens: int = 8) -> Export:
    """Write model.onnx, tokenizer.json, genai_config.json and manifest.json (with golden) to `folder`."""
    import onnx

    dims = dims or Dims()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    weights = make_weights(vocab, dims, seed)
    onnx.save(build_onnx(weights, dims), str(folder / "model.onnx"))
    tokenizer.save(str(folder / "tokenizer.json"))
    genai = {"model": {"bos_token_id": 0, "context_length": dims.context, "eos_token_id": 0, "pad_token_id": 0,
                       "type": "nativelm", "vocab_size": vocab,
                       "decoder": {"filename": "model.onnx", "head_size": dims.head_dim, "hidden_size": dims.d_model,
                                   "num_attention_heads": dims.n_heads, "num_hidden_layers": dims.n_layers,
                                   "num_key_value_heads": dims.n_kv_heads}},
             "search": {"max_length": dims.context, "do_sample": False}}
    (folder / "genai_config.json").write_text(json.dumps(genai, indent=2))
    golden = []
    for prompt in GOLDEN_PROMPTS:
        ids = tokenizer.encode(prompt).ids
        tokens = reference_greedy(weights, dims, ids, golden_tokens)
        golden.append({"prompt": prompt, "tokens": tokens, "text": tokenizer.decode(tokens)})
    n_params = int(sum(v.size for v in weights.values()))
    write_manifest(folder, {"format": "nativelm-onnx-export", "format_version": 1, "eos_token_id": 0,
                            "eos_token": EOT, "vocab_size": vocab, "context_length": dims.context,
                            "bits_per_weight": 32.0, "parameters": {"total": n_params}, "golden": golden})
    return Export(folder, weights, dims, tokenizer, vocab)
