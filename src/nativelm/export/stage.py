"""The `export` stage: trained model -> ONNX folder for boards, checked against PyTorch.

Reads a trained-model file and a prepared-data folder (tokenizer + validation shards) and writes,
as a whole (a failed check leaves the previous export untouched), ``export.out_dir`` (the layout of
`nativelm.formats.export_folder`):

- ``model.onnx``: the decoder (`graph.build_graph`); weights inside the file below 2 GB, else in
  ``model.onnx.data`` beside it;
- ``tokenizer.json``: copied from the prepared data;
- ``genai_config.json``: the onnxruntime-genai configuration (decoder, context length, heads,
  input/output names, eos id 0, greedy search defaults), and ``tokenizer_config.json``, the
  tokenizer description onnxruntime-genai reads beside ``tokenizer.json``;
- ``manifest.json``: variant (``native`` resolved, and why: ``variant_reason``), the PTQ label
  (`nativelm.export.ptq`), sizes, bits per weight, kernel paths, parity figures, golden continuations
  of fixed prompts (board health checks) and the sha256 of every other file;

and ``export.metrics_file`` (a DVC metrics file).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime
from tokenizers import Tokenizer

from nativelm import __version__
from nativelm.errors import NativelmError
from nativelm.export import custom_graph, ops_choice, parity
from nativelm.export.graph import ExportGraph, build_graph, check_model
from nativelm.export.ptq import ExportPlan
from nativelm.formats import prepared
from nativelm.formats.export_folder import (
    ATTENTION_MASK,
    EOS_TOKEN_ID,
    EXTERNAL_DATA,
    FORMAT,
    FORMAT_VERSION,
    GENAI_CONFIG,
    INPUT_IDS,
    LOGITS,
    MANIFEST,
    MODEL_FILE,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    TOKENIZER_CONFIG,
    TOKENIZER_FILE,
    ptq_label,
    ptq_tags,
    write_manifest,
)
from nativelm.formats.prepared import EOT
from nativelm.fsutil import atomic_dir, atomic_write_text, sha256_file
from nativelm.model.trained import load_trained_model
from nativelm.model.transformer import NativeLM
from nativelm.params.export import ExportParams

if TYPE_CHECKING:
    from nativelm.tracking.runs import RunLogger

MAX_INLINE_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB: keep a margin for the graph itself


@dataclass
class ExportResult:
    """What `run_export` produced."""

    out_dir: Path
    model_path: Path
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    metrics_file: Path


def _note(message: str) -> None:
    print(f"export: {message}", file=sys.stderr, flush=True)


def tokenizer_config(model: NativeLM) -> dict[str, Any]:
    """The Hugging Face tokenizer description onnxruntime-genai needs: a fast tokenizer, <|endoftext|> only."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
            "add_bos_token": False, "add_eos_token": False, "model_max_length": int(model.params.max_seq_len)}


def genai_config(model: NativeLM, context_length: int | None = None) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for the exported decoder (greedy search by default)."""
    p = model.params
    context = int(context_length or p.max_seq_len)
    return {
        "model": {
            "bos_token_id": EOS_TOKEN_ID,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": p.head_dim,
                "hidden_size": p.d_model,
                "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                           "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
                "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
                "num_attention_heads": p.n_heads,
                "num_hidden_layers": p.n_layers,
                "num_key_value_heads": p.n_kv_heads,
            },
            "eos_token_id": EOS_TOKEN_ID,
            "pad_token_id": EOS_TOKEN_ID,
            "type": "decoder",
            "vocab_size": int(model.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def weight_report(graph: ExportGraph, model: NativeLM, model_bytes: int) -> dict[str, Any]:
    """Bytes and bits per weight, for the whole file and per part (a tied matrix counts in both of its uses)."""
    sizes = graph.part_bytes()
    parts = {}
    for part, n in sorted(graph.part_params.items()):
        stored = sizes.get(part, 0)
        parts[part] = {"params": n, "bytes": stored, "bits_per_weight": 8.0 * stored / n if n else None}
    non_embedding = [p for p in graph.part_params if p not in ("embedding", "lm_head")]
    ne_params = sum(graph.part_params[p] for p in non_embedding)
    ne_bytes = sum(sizes.get(p, 0) for p in non_embedding)
    total = model.num_params()
    return {"params": total, "non_embedding_params": ne_params,
            "bits_per_weight": 8.0 * model_bytes / total,
            "bits_per_weight_non_embedding": 8.0 * ne_bytes / ne_params if ne_params else None,
            "overhead_bytes": {k: v for k, v in sizes.items() if k not in graph.part_params}, "parts": parts}


def _save_model(graph: ExportGraph, folder: Path, name: str = MODEL_FILE) -> list[str]:
    """Write `name` (weights inline below ~1.8 GB, else in `name`.data beside it); the files written.

    Saving with external data moves the weights out of `graph.model` (onnx does it in place).
    """
    path = folder / name
    if sum(graph.part_bytes().values()) < MAX_INLINE_BYTES:
        onnx.checker.check_model(graph.model)
        onnx.save_model(graph.model, path)
        return [name]
    data = EXTERNAL_DATA if name == MODEL_FILE else f"{name}.data"
    onnx.save_model(graph.model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    onnx.checker.check_model(str(path))  # the checker reads the external weights from the path
    return [name, data]


def _check_tokenizer(data_dir: Path, info: dict[str, Any], vocab_size: int) -> Path:
    manifest = prepared.read_manifest(data_dir)
    path = data_dir / TOKENIZER_FILE
    if not path.is_file():
        raise NativelmError(f"{path}: not found (run `nativelm prepare` first)")
    expected = info.get("tokenizer_sha256")
    if expected and manifest.get("sha256", {}).get(TOKENIZER_FILE) != expected:
        raise NativelmError(f"{path}: not the tokenizer the model was trained with (sha256 differs from the model "
                            "file's tokenizer_sha256); run prepare and train again, or point data.out_dir at the "
                            "prepared data of this model")
    if int(manifest.get("vocab_size", vocab_size)) > vocab_size:
        raise NativelmError(f"{path}: vocabulary of {manifest['vocab_size']} tokens exceeds the model's {vocab_size}")
    return path


@dataclass(frozen=True)
class ExportSource:
    """The trained model, its file's other fields and its export plan (`ptq.plan`), checked."""

    model: NativeLM
    info: dict[str, Any]
    plan: ExportPlan


def load_source(model_file: Path, ep: ExportParams) -> ExportSource:
    """Load `model_file` and refuse a variant that does not fit it (one ParamsError line), so a caller can
    check before it opens a tracking run or prints anything."""
    model, info = load_trained_model(model_file)
    return ExportSource(model, info, check_model(model, ep))



def _parity(source: ExportSource, plan: ExportPlan, decoder: parity.OnnxDecoder, windows: np.ndarray,
            ep: ExportParams, params: ExportParams) -> dict[str, Any]:
    """Held-out parity and the KV-cache check of one saved graph, gated as `plan` says (a NativelmError
    names the first figure outside its threshold and, by `params.variant`, the graph)."""
    model, p = source.model, source.model.params
    _note(f"{params.variant} graph: parity on {windows.size} validation tokens ({windows.shape[0]} x "
          f"{windows.shape[1]})")
    held_out = parity.held_out_parity(model, decoder, windows, ep.top1_tie_rel)
    prompt = windows[0][: min(16, p.max_seq_len // 2)].tolist()
    cache = parity.cache_consistency(decoder, prompt, min(ep.cache_check_tokens, p.max_seq_len - len(prompt)),
                                     ep.max_cache_logit_rel_diff)
    figures = {"held_out": held_out, "kv_cache": cache, "gated": parity.gated_checks(plan.ptq),
               "thresholds": {"min_top1_agreement": ep.min_top1_agreement, "top1_tie_rel": ep.top1_tie_rel,
                              "max_ppl_rel_diff": ep.max_ppl_rel_diff,
                              "max_cache_logit_rel_diff": ep.max_cache_logit_rel_diff}}
    if plan.model is not model:  # ternary PTQ: also against the quantized twin the graph computes
        figures["quantized_reference"] = parity.held_out_parity(plan.model, decoder, windows, ep.top1_tie_rel)
    _note(f"top-1 agreement {held_out['top1_agreement']:.4f} (exact {held_out['top1_exact_agreement']:.4f}), "
          f"perplexity ONNX {held_out['ppl_onnx']:.3f} vs PyTorch {held_out['ppl_torch']:.3f} "
          f"(relative difference {held_out['ppl_rel_diff']:.2e}); "
          f"KV cache {'matches' if cache['match'] else 'DIFFERS from'} full recomputation")
    parity.check_thresholds(figures, params, figures["gated"])
    figures["passed"] = True
    return figures


def run_export(model_file: Path, data_dir: Path, ep: ExportParams, logger: RunLogger | None = None,
               source: ExportSource | None = None) -> ExportResult:
    """Export the trained model `model_file` (already loaded: `source`) as `ep.variant` into `ep.out_dir`;
    see the module docstring.

    A parity failure (or any other error) raises NativelmError and leaves the previous export as it was.
    """
    started = time.perf_counter()
    model_file, data_dir = Path(model_file), Path(data_dir)
    out_dir, metrics_file = Path(ep.out_dir), Path(ep.metrics_file)

    source = source or load_source(model_file, ep)
    model, info, plan = source.model, source.info, source.plan
    tokenizer_path = _check_tokenizer(data_dir, info, model.vocab_size)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    val = prepared.load_shards(data_dir, "val")
    p = model.params
    if ep.golden_tokens >= p.max_seq_len:
        raise NativelmError(f"export.golden_tokens ({ep.golden_tokens}) must be below model.max_seq_len "
                            f"({p.max_seq_len})")
    try:
        windows = prepared.validation_windows(val, ep.parity_tokens, p.max_seq_len)
    except NativelmError as exc:
        raise NativelmError(f"export parity: {exc}; lower export.parity_tokens or prepare more validation data") from None

    variant = plan.params.variant
    if plan.reason is not None:
        _note(f"variant {plan.requested} resolved to {variant}: {plan.reason}")
    _note(f"building the {variant} graph of {model_file} ({p.n_layers} layers, d_model {p.d_model}, "
          f"vocab {model.vocab_size})")
    if plan.ptq:
        _note(f"post-training quantization: {plan.method}; held-out parity against the trained model is recorded, "
              "not gated (the KV-cache check is)")
    graph = build_graph(plan.model, plan.params)
    custom, library = None, None
    if variant == custom_graph.VARIANT:  # the custom-operator graph, and the contrib graph as model.onnx
        library = ops_choice.controller_library()
        custom, graph = graph, build_graph(plan.model, custom_graph.fallback_params(plan.params))
    for line in graph.notes + (custom.notes if custom else []):
        _note(line)

    with atomic_dir(out_dir) as folder:
        files = _save_model(graph, folder)
        shutil.copyfile(tokenizer_path, folder / TOKENIZER_FILE)
        (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(model), indent=2) + "\n", encoding="utf-8")
        (folder / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config(model), indent=2) + "\n", encoding="utf-8")
        files += [TOKENIZER_FILE, GENAI_CONFIG, TOKENIZER_CONFIG]

        decoder = parity.OnnxDecoder(folder / MODEL_FILE, ep.threads)
        probe = windows[0][None, : min(8, windows.shape[1])]
        feeds = {"input_ids": probe, "attention_mask": np.ones_like(probe), **decoder.empty_past()}
        kernels = parity.kernel_paths(graph.model, folder / MODEL_FILE, graph.quantized_nodes, feeds)
        if not kernels["all_prepacked"]:
            _note(f"quantized nodes on a slow kernel: {', '.join(kernels['slow_nodes'] + kernels['not_profiled'])}")

        figures = _parity(source, plan, decoder, windows, ep,
                          plan.params if custom is None else custom_graph.fallback_params(plan.params))
        held_out, cache = figures["held_out"], figures["kv_cache"]
        golden = parity.golden_continuations(decoder, tokenizer, ep.golden_prompts, ep.golden_tokens,
                                             p.max_seq_len, model)
        del decoder
        graphs: dict[str, Any] = {}
        if custom is not None:
            _note(f"the {custom_graph.VARIANT} graph ({custom_graph.MODEL_FILE}) on nativelm's operators "
                  f"({library.kernel})")
            custom_files = _save_model(custom, folder, custom_graph.MODEL_FILE)
            files += custom_files
            decoder = parity.OnnxDecoder(folder / custom_graph.MODEL_FILE, ep.threads, library.path)
            custom_figures = _parity(source, plan, decoder, windows, ep, plan.params)
            custom_golden = parity.golden_continuations(decoder, tokenizer, ep.golden_prompts, ep.golden_tokens,
                                                        p.max_seq_len, model)
            del decoder
            custom_bytes = sum((folder / n).stat().st_size for n in custom_files)
            graphs = custom_graph.manifest_graphs(custom, custom_figures, custom_golden, library.kernel,
                                                  weight_report(custom, model, custom_bytes))

        sizes = {name: (folder / name).stat().st_size for name in files}
        model_bytes = sum(sizes[n] for n in files if n in (MODEL_FILE, EXTERNAL_DATA))  # the contrib graph
        weights = weight_report(graph, model, model_bytes)
        ops_used = Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in graph.model.graph.node)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "variant": variant,
            "variant_requested": plan.requested,
            **({"variant_reason": plan.reason} if plan.reason is not None else {}),
            **plan.label(),
            "nativelm_version": __version__,
            "onnxruntime_version": onnxruntime.__version__,
            "onnx_version": onnx.__version__,
            "opsets": {o.domain or "ai.onnx": o.version for o in graph.model.opset_import},
            "source": {"model_file": str(model_file), "model_sha256": sha256_file(model_file),
                       **{k: info[k] for k in ("step", "weight_bits", "train_fingerprint", "tokenizer_sha256",
                                               "val_loss") if k in info}},
            "model": {**p.model_dump(mode="json"), "vocab_size": int(model.vocab_size),
                      "num_params": model.num_params(), "active_params": model.active_params(),
                      "context_length": p.max_seq_len, "eos_token_id": EOS_TOKEN_ID},
            "io": graph.io,
            "export_params": ep.model_dump(mode="json"),
            "graph": {"choices": graph.choices, "notes": graph.notes, "ops": dict(sorted(ops_used.items())),
                      "quantized_nodes": len(graph.quantized_nodes)},
            "kernels": kernels,
            "sizes": {"files": sizes, "model_bytes": model_bytes, "total_bytes": sum(sizes.values())},
            "weights": weights,
            "parity": figures,
            "golden": {"greedy": True, "kv_cache": True, "max_new_tokens": ep.golden_tokens, "stop_at_eos": False,
                       "eos_token_id": EOS_TOKEN_ID, "prompts": golden},
            **({"graphs": graphs} if graphs else {}),
            "sha256": {name: sha256_file(folder / name) for name in sorted(files)},
        }
        write_manifest(folder, manifest)

    agreement = [g["torch_common_prefix"] / ep.golden_tokens for g in golden]
    metrics = {
        "variant": variant,
        **ptq_label(manifest),
        "model_bytes": model_bytes,
        "total_bytes": manifest["sizes"]["total_bytes"],
        "bits_per_weight": weights["bits_per_weight"],
        "bits_per_weight_non_embedding": weights["bits_per_weight_non_embedding"],
        "top1_agreement": held_out["top1_agreement"],
        "top1_exact_agreement": held_out["top1_exact_agreement"],
        "ppl_onnx": held_out["ppl_onnx"],
        "ppl_torch": held_out["ppl_torch"],
        "ppl_rel_diff": held_out["ppl_rel_diff"],
        "max_abs_logit_diff": held_out["max_abs_logit_diff"],
        "parity_tokens": held_out["tokens"],
        "kv_cache_match": int(cache["match"]),
        "kv_cache_max_rel_logit_diff": cache["max_rel_logit_diff"],
        "all_prepacked": int(kernels["all_prepacked"]),
        "quantized_nodes": len(graph.quantized_nodes),
        "golden_torch_prefix_share": float(np.mean(agreement)),
        **custom_graph.metrics(graphs),
        "export_time_s": time.perf_counter() - started,
    }
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(metrics_file, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if logger is not None:
        logger.log_params({"export": ep.model_dump(mode="json")})
        logger.set_tags({"variant": variant, **ptq_tags(manifest)})
        logger.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        logger.log_artifact(out_dir / MANIFEST)
        logger.log_artifact(out_dir / GENAI_CONFIG)
        logger.log_artifact(metrics_file)
    _note(f"done: {out_dir / MODEL_FILE} ({model_bytes:,} bytes, {weights['bits_per_weight']:.2f} bits per weight); "
          f"metrics in {metrics_file}")
    return ExportResult(out_dir, out_dir / MODEL_FILE, manifest, metrics, metrics_file)
