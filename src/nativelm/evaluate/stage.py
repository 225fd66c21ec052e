"""The `evaluate` stage: export folder -> figures a board would see + a release folder + a registered version.

Reads ``export.out_dir`` (verified file by file against its manifest first: a corrupted export stops
the stage with one line and leaves the previous release untouched) and ``data.out_dir`` (validation
shards), and writes:

- ``evaluate.metrics_file`` (a DVC metrics file): perplexity of the ONNX model on ``ppl_tokens``
  validation tokens, the export's parity figures (from its manifest), file size and bits per weight,
  CPU speed of the board runtime (`nativelm.runtime.benchmark`: prefill / decode tokens per second,
  time to first token, inter-token latency p50 / p95, peak RSS) and, when registered, the model version;
- ``evaluate.release_dir``, as a whole: the export folder's files, ``nativelm-runtime.pyz`` (the
  board runtime, `nativelm.runtime.pack`) and ``release.json`` — the sha256 of every other file, the
  git commit, the data hash (DVC's hash of ``data.out_dir`` in dvc.lock), the params hash and the
  sha256 of the trained model the export came from. It carries no version number: the same inputs
  give the same release, whatever the registry calls it.

With an active MLflow run (``logger``) the metrics and the release folder (artifacts under
``release/``) are logged, and a new version of ``evaluate.registered_model`` is registered from that
artifact folder, tagged with git_commit, data_hash and params_hash, and the export's PTQ label (ptq,
ptq_method: `nativelm.formats.export_folder.ptq_tags`), which release.json carries too.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nativelm import runtime
from nativelm.errors import NativelmError
from nativelm.formats import prepared
from nativelm.formats.export_folder import MANIFEST, ptq_label, ptq_tags
from nativelm.formats.release import build_release
from nativelm.fsutil import atomic_write_text, sha256_file
from nativelm.params.evaluate import EvaluateParams
from nativelm.runtime.scoring import window_nll
from nativelm.tracking.registry import register_folder
from nativelm.tracking.runs import RunLogger


@dataclass(frozen=True)
class Provenance:
    """Where a release comes from: the registry tags of its version, written into release.json too."""

    git_commit: str
    data_hash: str  # DVC's hash of the prepared data ("unknown" outside a DVC workspace)
    params_hash: str

    def tags(self) -> dict[str, str]:
        return {"git_commit": self.git_commit, "data_hash": self.data_hash, "params_hash": self.params_hash}



@dataclass
class EvaluateResult:
    """What `run_evaluate` produced."""

    release_dir: Path
    release: dict[str, Any]
    metrics: dict[str, Any]
    metrics_file: Path
    model_version: int | None = None


def _note(message: str) -> None:
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


def _load_export(folder: Path, threads: int) -> runtime.Model:
    """The export through the board runtime, after every file it lists matched its sha256 (one line otherwise).

    Loaded once for perplexity and benchmark: every file is hashed here, not again by each use."""
    try:
        runtime.verify_folder(folder)
    except runtime.RuntimeFailure as exc:
        raise NativelmError(f"evaluate: export folder {folder} does not verify: {exc} "
                            "(run `nativelm export` again)") from None
    try:
        return runtime.load_model(folder, threads=threads or None, verify=False)
    except runtime.RuntimeFailure as exc:
        raise NativelmError(f"evaluate: {exc}") from None


def onnx_perplexity(model: runtime.Model, data_dir: Path, n_tokens: int, max_len: int) -> dict[str, Any]:
    """Perplexity of the exported model through the board runtime (empty KV cache, whole windows)
    on validation tokens (0: all of them)."""
    val = prepared.load_shards(data_dir, "val")
    wanted = sum(len(s) for s in val) if n_tokens == 0 else n_tokens
    try:
        windows = prepared.validation_windows(val, wanted, max_len)
    except NativelmError as exc:
        raise NativelmError(f"evaluate: ppl_tokens {n_tokens}: {exc}") from None
    try:
        scored = window_nll(model, windows)
    except runtime.RuntimeFailure as exc:
        raise NativelmError(f"evaluate: {exc}") from None
    mean = float(scored.mean())
    return {"ppl_onnx": float(np.exp(mean)), "nll_onnx": mean, "ppl_tokens_scored": int(scored.size),
            "ppl_windows": int(windows.shape[0]), "ppl_window_length": int(windows.shape[1])}


def run_evaluate(export_dir: Path, data_dir: Path, ev: EvaluateParams, provenance: Provenance,
                 logger: RunLogger | None = None) -> EvaluateResult:
    """Evaluate `export_dir`, build `ev.release_dir`, register it; see the module docstring."""
    started = time.perf_counter()
    export_dir, data_dir = Path(export_dir), Path(data_dir)
    release_dir, metrics_file = Path(ev.release_dir), Path(ev.metrics_file)
    if not export_dir.is_dir():
        raise NativelmError(f"evaluate: {export_dir}: no export folder (run `nativelm export` first)")
    model = _load_export(export_dir, ev.threads)
    manifest = model.manifest
    model_cfg = manifest.get("model", {})
    max_len = int(model_cfg.get("context_length") or model_cfg.get("max_seq_len") or 0)
    if max_len < 2:
        raise NativelmError(f"evaluate: {export_dir / MANIFEST}: records no context length")

    _note(f"ONNX perplexity on {'all' if ev.ppl_tokens == 0 else ev.ppl_tokens} validation tokens")
    ppl = onnx_perplexity(model, data_dir, ev.ppl_tokens, max_len)

    _note(f"benchmark: prompt {ev.bench_prompt_len} tokens, {ev.bench_new_tokens} new tokens, "
          f"{ev.bench_repeats} repeats")
    try:
        bench = runtime.benchmark(model, prompt_len=ev.bench_prompt_len, new_tokens=ev.bench_new_tokens,
                                  repeats=ev.bench_repeats)
    except runtime.RuntimeFailure as exc:
        raise NativelmError(f"evaluate: benchmark: {exc}") from None

    parity = manifest.get("parity", {})
    held, cache = parity.get("held_out", {}), parity.get("kv_cache", {})
    sizes, weights = manifest.get("sizes", {}), manifest.get("weights", {})
    metrics: dict[str, Any] = {
        "variant": manifest.get("variant"),
        "ops": bench.get("ops"),  # the graph evaluated: nativelm:<kernel>, fallback or contrib
        "ptq": int(ptq_label(manifest)["ptq"]),  # the gate does not hold a PTQ export to held-out parity
        **ppl,
        "parity_ppl_torch": held.get("ppl_torch"),
        "parity_ppl_onnx": held.get("ppl_onnx"),
        "top1_agreement": held.get("top1_agreement"),
        "ppl_rel_diff": held.get("ppl_rel_diff"),
        "kv_cache_match": int(bool(cache.get("match"))) if cache else None,
        "model_bytes": sizes.get("model_bytes") or bench["model_file_bytes"],
        "total_bytes": sizes.get("total_bytes"),
        "bits_per_weight": weights.get("bits_per_weight") or bench["bits_per_weight"],
        "bits_per_weight_non_embedding": weights.get("bits_per_weight_non_embedding"),
        "prefill_tokens_per_s": bench["prefill_tokens_per_s"],
        "decode_tokens_per_s": bench["decode_tokens_per_s"],
        "time_to_first_token_ms": bench["time_to_first_token_ms"],
        "inter_token_latency_p50_ms": bench["inter_token_latency_p50_ms"],
        "inter_token_latency_p95_ms": bench["inter_token_latency_p95_ms"],
        "peak_rss_mb": bench["peak_rss_mb"],
        "bench_threads": bench["threads"],
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}

    tags = {**provenance.tags(), **ptq_tags(manifest), "ops": str(bench.get("ops"))}
    _note(f"building the release folder {release_dir}")
    release = build_release(release_dir, export_dir, {
        **provenance.tags(), "source_model_sha256": manifest.get("source", {}).get("model_sha256"),
        "variant": manifest.get("variant"), **ptq_label(manifest), "runtime_version": runtime.__version__,
        "export_manifest_sha256": sha256_file(export_dir / MANIFEST)})
    metrics["release_bytes"] = sum((release_dir / n).stat().st_size for n in release["sha256"])

    version = None
    if logger is not None and logger.active:
        logger.log_params({"evaluate": ev.model_dump(mode="json")})
        logger.set_tags(tags)
        version = register_folder(logger, release_dir, ev.registered_model, tags)
        metrics["model_version"] = version
        _note(f"registered {ev.registered_model} version {version}")
    metrics["evaluate_time_s"] = time.perf_counter() - started

    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(metrics_file, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if logger is not None and logger.active:
        logger.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        logger.log_artifact(metrics_file)
    _note(f"done: ONNX perplexity {ppl['ppl_onnx']:.3f}, decode {bench['decode_tokens_per_s']:.1f} tokens/s, "
          f"release in {release_dir}; metrics in {metrics_file}")
    return EvaluateResult(release_dir, release, metrics, metrics_file, version)
