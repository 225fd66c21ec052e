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
artifact folder, tagged with git_commit, data_hash and params_hash.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nativelm.errors import NativelmError
from nativelm.params.evaluate import EvaluateParams
from nativelm.fsutil import atomic_dir, atomic_write_text, sha256_file

if TYPE_CHECKING:
    from nativelm.params import Params
    from nativelm.tracking.runs import RunLogger

RELEASE_MANIFEST = "release.json"
RUNTIME_FILE = "nativelm-runtime.pyz"
RELEASE_FORMAT = "nativelm-release"
RELEASE_FORMAT_VERSION = 1
REGISTRY_TAGS = ("git_commit", "data_hash", "params_hash")


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


def evaluate_params(params: Params) -> EvaluateParams:
    section = getattr(params, "evaluate", None)
    return section if isinstance(section, EvaluateParams) else EvaluateParams()


def _verify_export(folder: Path) -> dict[str, Any]:
    """The export manifest, after every file it lists matched its sha256 (one line otherwise)."""
    from nativelm.runtime import RuntimeFailure, verify_folder

    try:
        return verify_folder(folder)
    except RuntimeFailure as exc:
        raise NativelmError(f"evaluate: export folder {folder} does not verify: {exc} "
                            "(run `nativelm export` again)") from None


def onnx_perplexity(model_path: Path, data_dir: Path, n_tokens: int, max_len: int, threads: int) -> dict[str, Any]:
    """Perplexity of the ONNX decoder (empty KV cache, whole windows) on validation tokens (0: all of them)."""
    from nativelm.data.shards import load_shards
    from nativelm.export import parity

    val = load_shards(data_dir, "val")
    total = sum(len(s) for s in val)
    wanted = total if n_tokens == 0 else n_tokens
    try:
        windows = parity.validation_windows(val, wanted, max_len)
    except NativelmError as exc:
        raise NativelmError(f"evaluate: ppl_tokens {n_tokens}: {str(exc).split(': ', 1)[-1]}") from None
    decoder = parity.OnnxDecoder(model_path, threads)
    nll = []
    for row in windows:
        logits = decoder.forward(row[None])[0][0]
        nll.append(parity._nll(logits[:-1], row[1:]))
    scored = np.concatenate(nll)
    mean = float(scored.mean())
    return {"ppl_onnx": float(np.exp(mean)), "nll_onnx": mean, "ppl_tokens_scored": int(scored.size),
            "ppl_windows": int(windows.shape[0]), "ppl_window_length": int(windows.shape[1])}


def release_files(folder: Path) -> dict[str, str]:
    """{file name: sha256} of every file of a release folder but release.json."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != RELEASE_MANIFEST}


def build_release(release_dir: Path, export_dir: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write a release folder atomically (export files + board runtime + release.json); return release.json.

    Public because the fleet's tests build real releases with it, exactly as the stage does.
    """
    from nativelm.runtime.pack import build_zipapp

    with atomic_dir(release_dir) as folder:
        for path in sorted(export_dir.iterdir()):
            if path.is_file():
                shutil.copyfile(path, folder / path.name)
        build_zipapp(folder / RUNTIME_FILE)
        release = {"format": RELEASE_FORMAT, "format_version": RELEASE_FORMAT_VERSION, **provenance,
                   "sha256": release_files(folder)}
        (folder / RELEASE_MANIFEST).write_text(json.dumps(release, indent=2, sort_keys=True) + "\n",
                                               encoding="utf-8")
    return release


def run_evaluate(params: Params, logger: RunLogger | None = None) -> EvaluateResult:
    """Evaluate `export.out_dir`, build `evaluate.release_dir`, register it; see the module docstring."""
    from nativelm import runtime
    from nativelm.orchestration.dvc import lock_out_hash
    from nativelm.tracking.flatten import params_hash
    from nativelm.tracking.runs import git_commit

    started = time.perf_counter()
    ev = evaluate_params(params)
    export_dir, data_dir = Path(params.export.out_dir), Path(params.data.out_dir)
    release_dir, metrics_file = Path(ev.release_dir), Path(ev.metrics_file)
    if not export_dir.is_dir():
        raise NativelmError(f"evaluate: {export_dir}: no export folder (run `nativelm export` first)")
    manifest = _verify_export(export_dir)
    model_cfg = manifest.get("model", {})
    max_len = int(model_cfg.get("context_length") or model_cfg.get("max_seq_len") or 0)
    if max_len < 2:
        raise NativelmError(f"evaluate: {export_dir / 'manifest.json'}: records no context length")

    _note(f"ONNX perplexity on {'all' if ev.ppl_tokens == 0 else ev.ppl_tokens} validation tokens")
    ppl = onnx_perplexity(export_dir / "model.onnx", data_dir, ev.ppl_tokens, max_len, ev.threads)

    _note(f"benchmark: prompt {ev.bench_prompt_len} tokens, {ev.bench_new_tokens} new tokens, "
          f"{ev.bench_repeats} repeats")
    try:
        bench = runtime.benchmark(export_dir, prompt_len=ev.bench_prompt_len, new_tokens=ev.bench_new_tokens,
                                  repeats=ev.bench_repeats, threads=ev.threads or None)
    except runtime.RuntimeFailure as exc:
        raise NativelmError(f"evaluate: benchmark: {exc}") from None

    parity = manifest.get("parity", {})
    held, cache = parity.get("held_out", {}), parity.get("kv_cache", {})
    sizes, weights = manifest.get("sizes", {}), manifest.get("weights", {})
    metrics: dict[str, Any] = {
        "variant": manifest.get("variant"),
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

    commit = git_commit()
    data_hash = lock_out_hash(Path.cwd(), "prepare", params.data.out_dir) or "unknown"
    p_hash = params_hash(params.model_dump(mode="json"))
    provenance = {
        "git_commit": commit, "data_hash": data_hash, "params_hash": p_hash,
        "source_model_sha256": manifest.get("source", {}).get("model_sha256"),
        "variant": manifest.get("variant"), "runtime_version": runtime.__version__,
        "export_manifest_sha256": sha256_file(export_dir / "manifest.json"),
    }
    _note(f"building the release folder {release_dir}")
    release = build_release(release_dir, export_dir, provenance)
    metrics["release_bytes"] = sum((release_dir / n).stat().st_size for n in release["sha256"])

    version = None
    if logger is not None and logger.active:
        logger.log_params({"evaluate": ev.model_dump(mode="json")})
        logger.set_tags({"git_commit": commit, "data_hash": data_hash, "params_hash": p_hash})
        from nativelm.tracking.registry import register_folder

        version = register_folder(logger, release_dir, ev.registered_model,
                                   {"git_commit": commit, "data_hash": data_hash, "params_hash": p_hash})
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
