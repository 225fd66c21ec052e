"""ONNX vs PyTorch: the checks an export must pass before it replaces the previous one.

- **Held-out parity**: windows of the validation split (evenly spaced, the same every run) go
  through the PyTorch model (eval mode) and through the ONNX model (whole sequence, empty KV cache);
  figures: top-1 agreement of the next-token prediction, perplexity of both and their relative
  difference, logit differences. MatMulNBits at accuracy_level 4 quantizes activations to int8 per
  block of K where BitLinear quantizes per token, and 2-bit QMoE runs an approximate LUT kernel, so a
  ternary export is close to, not bit-identical with, PyTorch: thresholds, not equality. A PTQ
  export (`nativelm.export.ptq`) is measured against the model it came from (the fp model): the
  figures say what quantizing after training cost and are recorded, not gated (`gated_checks`);
  beside them, the same figures against the quantized PyTorch twin the graph computes.
- **KV cache**: greedy decoding token by token with the cache must choose the tokens that full
  recomputation chooses. Checked teacher-forced (one forward over prompt + generated tokens gives the
  full-recomputation logits at every step at once): same argmax at every step, logits within
  ``max_cache_logit_rel_diff``.
- **Golden continuations**: greedy continuations of fixed prompts computed with ONNX (with the
  cache, as a board runs it), stored in the manifest for board health checks; how many leading tokens
  PyTorch's greedy decoding shares is recorded beside them (information, not a gate).
- **Kernel paths**: one profiled run tells which MatMulNBits / QMoE nodes had their weights prepacked
  (ORT's fast kernels) — `kernels.profile_kernels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import torch

from nativelm.errors import NativelmError
from nativelm.export import kernels
from nativelm.export.kernels import QUANTIZED_OPS
from nativelm.formats import export_folder as io
from nativelm.runtime.scoring import token_nll

if TYPE_CHECKING:
    import onnx
    from tokenizers import Tokenizer

    from nativelm.model import NativeLM
    from nativelm.params.export import ExportParams


class OnnxDecoder:
    """An exported decoder in an ONNX Runtime CPU session: full forward and greedy decoding with the cache.

    Layer count, KV heads and head size are read from the graph's `past_key_values.*` inputs.
    `library`: nativelm's operator library, registered for a graph on its operators.
    """

    def __init__(self, model: str | Path | bytes, threads: int = 0, library: str | None = None) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns of the optional num_logits_to_keep input
        if threads:
            options.intra_op_num_threads = threads
        if library is not None:  # nativelm's operator library (the ternary-ops graph)
            options.register_custom_ops_library(library)
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.past_shapes: dict[str, tuple[int, int]] = {}
        for meta in self.session.get_inputs():
            if meta.name.startswith("past_key_values."):
                _, kv_heads, _, head_dim = meta.shape
                self.past_shapes[meta.name] = (int(kv_heads), int(head_dim))
        self.n_layers = len(self.past_shapes) // 2
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, kv, 0, hd), np.float32) for name, (kv, hd) in self.past_shapes.items()}

    def forward(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """ids (B, S) after `past` (None: empty cache) -> logits (B, S, V) and the next cache (as `past` feeds)."""
        ids = np.asarray(ids, dtype=np.int64)
        past = past if past is not None else self.empty_past(ids.shape[0])
        past_len = next(iter(past.values())).shape[2] if past else 0
        feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: np.ones((ids.shape[0], past_len + ids.shape[1]), np.int64), **past}
        outputs = dict(zip(self.output_names, self.session.run(None, feeds)))
        present = {}
        for i in range(self.n_layers):
            present[io.PAST_KEY % i] = outputs[io.PRESENT_KEY % i]
            present[io.PAST_VALUE % i] = outputs[io.PRESENT_VALUE % i]
        return outputs[io.LOGITS], present

    def greedy(self, prompt: Sequence[int], n: int) -> tuple[list[int], np.ndarray]:
        """Greedy continuation of `prompt` (n tokens) with the KV cache: (tokens, logits of each step (n, V))."""
        logits, past = self.forward(np.array([list(prompt)], np.int64))
        steps, tokens = [logits[0, -1]], [int(logits[0, -1].argmax())]
        while len(tokens) < n:
            logits, past = self.forward(np.array([[tokens[-1]]], np.int64), past)
            steps.append(logits[0, -1])
            tokens.append(int(logits[0, -1].argmax()))
        return tokens, np.stack(steps)


# --------------------------------------------------------------------------- held-out parity


def torch_logits(model: NativeLM, ids: np.ndarray) -> np.ndarray:
    """Logits (B, S, V) of the PyTorch model in eval mode, float32 numpy."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.float().cpu().numpy()
    finally:
        model.train(was_training)


def held_out_parity(model: NativeLM, decoder: OnnxDecoder, windows: np.ndarray,
                    tie_rel: float = 0.0) -> dict[str, Any]:
    """Top-1 agreement, perplexities and logit differences of ONNX vs PyTorch on `windows` (rows, length).

    A position where the two pick different tokens still agrees when it is a near-tie: PyTorch's logit
    of ONNX's pick is within `tie_rel` x the window's max |logit| of PyTorch's top logit (rounding in
    the quantized kernels swaps such pairs without changing what the model predicts);
    ``top1_exact_agreement`` counts without ties.
    """
    exact, agree, nll_onnx, nll_torch, max_diff, max_ref = [], [], [], [], 0.0, 0.0
    for row in windows:
        ids = row[None]
        reference = torch_logits(model, ids)[0]
        logits = decoder.forward(ids)[0][0]
        picked, wanted = logits.argmax(-1), reference.argmax(-1)
        positions = np.arange(len(picked))
        margin = reference[positions, wanted] - reference[positions, picked]
        exact.append(picked == wanted)
        agree.append((picked == wanted) | (margin <= tie_rel * float(np.abs(reference).max())))
        nll_onnx.append(token_nll(logits[:-1], row[1:]))
        nll_torch.append(token_nll(reference[:-1], row[1:]))
        max_diff = max(max_diff, float(np.abs(logits - reference).max()))
        max_ref = max(max_ref, float(np.abs(reference).max()))
    ppl_onnx = float(np.exp(np.concatenate(nll_onnx).mean()))
    ppl_torch = float(np.exp(np.concatenate(nll_torch).mean()))
    return {"tokens": int(windows.size), "windows": int(windows.shape[0]), "window_length": int(windows.shape[1]),
            "top1_agreement": float(np.concatenate(agree).mean()),
            "top1_exact_agreement": float(np.concatenate(exact).mean()), "top1_tie_rel": tie_rel,
            "ppl_onnx": ppl_onnx, "ppl_torch": ppl_torch,
            "ppl_rel_diff": abs(ppl_onnx - ppl_torch) / ppl_torch, "max_abs_logit_diff": max_diff,
            "max_abs_logit": max_ref}


# --------------------------------------------------------------------------- KV cache and golden continuations


def cache_consistency(decoder: OnnxDecoder, prompt: Sequence[int], n: int, tie_rel: float = 0.0) -> dict[str, Any]:
    """Greedy with the KV cache vs full recomputation (teacher-forced, one forward over prompt + tokens).

    A step where the two pick different tokens is a mismatch unless it is a tie: the cached logit
    of the token full recomputation picks is within `tie_rel` x max |logit| of the cached maximum.
    Quantized kernels take other paths for one token than for many (ORT's MatMulNBits), so a
    trained model's near-equal candidates can swap without either computation being wrong.
    """
    tokens, cached = decoder.greedy(prompt, n)
    full = decoder.forward(np.array([list(prompt) + tokens[:-1]], np.int64))[0][0, len(prompt) - 1:]
    full_tokens = full.argmax(-1).tolist()
    scale = float(np.abs(full).max()) or 1.0
    swapped = [i for i, (a, b) in enumerate(zip(tokens, full_tokens)) if a != b]
    first = next((i for i in swapped if cached[i, tokens[i]] - cached[i, full_tokens[i]] > tie_rel * scale), None)
    return {"prompt_tokens": len(prompt), "steps": n, "match": first is None, "first_mismatch": first,
            "ties": len(swapped) - (first is not None), "max_rel_logit_diff": float(np.abs(cached - full).max()) / scale}


def torch_agreement(model: NativeLM, prompt: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading `tokens` (a greedy continuation of `prompt`) PyTorch's greedy decoding also picks.

    Teacher-forced: one forward over prompt + tokens; the first position where PyTorch's argmax differs
    is where its own greedy continuation would leave `tokens` (len(tokens) if never).
    """
    ids = np.array([list(prompt) + list(tokens[:-1])], np.int64)
    choices = torch_logits(model, ids)[0, len(prompt) - 1:].argmax(-1).tolist()
    return next((i for i, (a, b) in enumerate(zip(tokens, choices)) if a != b), len(tokens))


def encode_prompt(tokenizer: Tokenizer, prompt: str, room: int) -> list[int]:
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise NativelmError(f"export: golden prompt {prompt!r} encodes to no tokens")
    if len(ids) > room:
        raise NativelmError(f"export: golden prompt {prompt[:40]!r} has {len(ids)} tokens; with golden_tokens it "
                            f"must fit the model's {room} positions")
    return ids


def golden_continuations(decoder: OnnxDecoder, tokenizer: Tokenizer, prompts: Sequence[str], n: int,
                         max_positions: int, model: NativeLM | None = None) -> list[dict[str, Any]]:
    """Greedy continuations (ONNX, KV cache) of `prompts`: prompt ids, continuation ids and text.

    With `model`, also how many leading tokens PyTorch's greedy continuation shares (`torch_agreement`).
    """
    golden = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, max_positions - n)
        tokens, _ = decoder.greedy(ids, n)
        entry: dict[str, Any] = {"prompt": prompt, "prompt_ids": ids, "continuation_ids": tokens,
                                 "continuation_text": tokenizer.decode(tokens, skip_special_tokens=False)}
        if model is not None:
            entry["torch_common_prefix"] = torch_agreement(model, ids, tokens)
        golden.append(entry)
    return golden


# --------------------------------------------------------------------------- kernel paths


def kernel_paths(model: onnx.ModelProto, source: str | Path | bytes, quantized_nodes: Sequence[str],
                 feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Profile one run of `source` (the saved model) and tell, per MatMulNBits / QMoE node, whether its
    weights were prepacked at session start (ORT's fast kernels). `model` gives the initializers."""
    runs = kernels.profile_kernels(Path(source) if isinstance(source, str) else source, feeds)
    nodes: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run.op_type not in QUANTIZED_OPS:
            continue
        try:
            packed = kernels.prepacked_inputs(model, run)
        except ValueError:  # renamed by a graph optimization: unknown path
            nodes[run.node] = {"op": run.op_type, "provider": run.provider, "prepacked": None}
            continue
        weights = [w for w in packed if w.endswith(".weight")]
        expected = 2 if run.op_type == "QMoE" else 1  # fc1 and fc2, or B
        nodes[run.node] = {"op": run.op_type, "provider": run.provider, "prepacked": len(weights) >= expected,
                           "prepacked_inputs": packed}
    missing = [n for n in quantized_nodes if n not in nodes]
    all_prepacked = not missing and all(v["prepacked"] for v in nodes.values())
    return {"all_prepacked": bool(all_prepacked), "checked": len(nodes), "not_profiled": missing,
            "slow_nodes": sorted(n for n, v in nodes.items() if not v["prepacked"]), "nodes": nodes}


# --------------------------------------------------------------------------- thresholds


ALL_CHECKS = ("held_out", "kv_cache")


def gated_checks(ptq: bool) -> list[str]:
    """The figures an export must pass: held-out parity measures the quantization, so a PTQ export
    (measured against the model it came from) only records it; the KV-cache check tests the graph."""
    return ["kv_cache"] if ptq else list(ALL_CHECKS)


def check_thresholds(figures: dict[str, Any], params: ExportParams, gated: Sequence[str] = ALL_CHECKS) -> None:
    """Raise NativelmError naming the first figure outside its threshold, among the `gated` ones."""
    checks = {"held_out": check_held_out, "kv_cache": check_cache}
    for name in gated:
        checks[name](figures[name], params)


def check_held_out(held: dict[str, Any], params: ExportParams) -> None:
    """Raise NativelmError if top-1 agreement or the perplexity difference is outside its threshold."""
    if held["top1_agreement"] < params.min_top1_agreement:
        raise NativelmError(
            f"export {params.variant}: parity failed: top-1 agreement {held['top1_agreement']:.4f} < "
            f"min_top1_agreement {params.min_top1_agreement} (ONNX vs PyTorch on {held['tokens']} validation tokens, "
            f"near-ties within top1_tie_rel {params.top1_tie_rel} counted as agreeing; exact "
            f"{held.get('top1_exact_agreement', held['top1_agreement']):.4f})")
    if held["ppl_rel_diff"] > params.max_ppl_rel_diff:
        raise NativelmError(
            f"export {params.variant}: parity failed: perplexity relative difference {held['ppl_rel_diff']:.4f} > "
            f"max_ppl_rel_diff {params.max_ppl_rel_diff} (ONNX {held['ppl_onnx']:.3f}, PyTorch "
            f"{held['ppl_torch']:.3f})")


def check_cache(cache: dict[str, Any], params: ExportParams) -> None:
    """Raise NativelmError if KV-cache decoding left full recomputation or its logits drifted too far."""
    if not cache["match"]:
        raise NativelmError(
            f"export {params.variant}: parity failed: greedy decoding with the KV cache left full recomputation at "
            f"step {cache['first_mismatch']} of {cache['steps']}")
    if cache["max_rel_logit_diff"] > params.max_cache_logit_rel_diff:
        raise NativelmError(
            f"export {params.variant}: parity failed: KV-cache logits differ from full recomputation by "
            f"{cache['max_rel_logit_diff']:.2e} (relative) > max_cache_logit_rel_diff "
            f"{params.max_cache_logit_rel_diff}")
