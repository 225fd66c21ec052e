"""On-board benchmark: prefill and decode speed, latency, memory, size, and the machine it ran on.

One warm-up run, then `repeats` timed runs of: prefill a `prompt_len`-token prompt (fixed
pseudo-random ids, never eos), then greedily decode `new_tokens` tokens with the KV cache, eos
ignored so every run does the same work. Reported (JSON with `--json`):

- prefill_tokens_per_s, decode_tokens_per_s: medians over the repeats
- time_to_first_token_ms: prefill plus choosing the first token (median)
- inter_token_latency_p50_ms / _p95_ms: over every decode step of every repeat
- peak_rss_mb (getrusage ru_maxrss), rss_mb (VmRSS of /proc/self/status, now)
- ops (which graph ran), kv_cache (``shared``: kept in place, or ``copied`` every step: `kvcache`)
- model_file_bytes, bits_per_weight (from the manifest, else computed from what it records)
- onnxruntime_version, threads, cpu_model, machine, python_version
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadArgument
from .generate import Decoder, Sampler
from .session import Model, load_model

BENCH_SEED = 0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation, as numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """Resident memory now (VmRSS of /proc/self/status); None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU (x86: 'model name'), or the board (device-tree model: 'Raspberry Pi 5 Model B ...')."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in fields and value.strip():
                    fields[key.strip()] = value.strip()
    except OSError:
        pass
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if key in fields:
            return fields[key]
    try:
        board = Path("/sys/firmware/devicetree/base/model").read_bytes().rstrip(b"\0").decode("utf-8", "replace")
        if board.strip():
            return board.strip()
    except OSError:
        pass
    if "CPU part" in fields:
        return f"{platform.machine()} (CPU implementer {fields.get('CPU implementer', '?')}, part {fields['CPU part']})"
    return platform.processor() or platform.machine() or "unknown"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value > 0 else None


def _find(manifest: dict[str, Any], *keys: str) -> Any:
    """The first of `keys` found at the top of the manifest or in one of its sections."""
    for key in keys:
        if key in manifest:
            return manifest[key]
    for section in manifest.values():
        if isinstance(section, dict):
            for key in keys:
                if key in section:
                    return section[key]
    return None


def _param_count(manifest: dict[str, Any]) -> float | None:
    value = _find(manifest, "parameters", "params", "param_counts", "parameter_count", "n_params", "num_params")
    if isinstance(value, dict):  # {"total": N, ...}
        value = _first_number(value, "total", "all", "total_params", "parameters")
    return _number(value)


def _first_number(mapping: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        number = _number(mapping.get(key))
        if number:
            return number
    return None


def bits_per_weight(model: Model) -> float | None:
    """Bits per weight: the manifest's own figure, else (initializer or model-file bytes) x 8 / parameters."""
    manifest = model.manifest
    weights = manifest.get("weights") if isinstance(manifest.get("weights"), dict) else {}
    recorded = _number(weights.get("bits_per_weight")) or _number(_find(manifest, "bits_per_weight", "bpw"))
    if recorded:
        return recorded
    params = _param_count(manifest)
    if not params:
        return None
    weight_bytes = _number(_find(manifest, "initializer_bytes", "weight_bytes", "weights_bytes")) or model.file_bytes()
    return weight_bytes * 8 / params


def _bench_prompt(model: Model, length: int) -> list[int]:
    rng = np.random.default_rng(BENCH_SEED)
    usable = np.setdiff1d(np.arange(model.vocab_size, dtype=np.int64), np.array(model.eos_ids, dtype=np.int64))
    return [int(i) for i in rng.choice(usable, size=length)]


def _one_run(model: Model, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    decoder, sample = Decoder(model), Sampler()
    start = time.perf_counter()
    logits = decoder.prefill(prompt)
    prefill_s = time.perf_counter() - start
    token = sample(logits)
    first_token_s = time.perf_counter() - start
    gaps: list[float] = []
    last = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = sample(decoder.step(token))
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return {"prefill_s": prefill_s, "ttft_s": first_token_s, "gaps": gaps}


def benchmark(model: Model | str | os.PathLike[str], prompt_len: int = 64, new_tokens: int = 32,
              repeats: int = 3, threads: int | None = None, warmup: int = 1) -> dict[str, Any]:
    """Measure `model` (a loaded Model, or an export folder loaded with `threads`); a flat dict of results."""
    if prompt_len < 1 or new_tokens < 2 or repeats < 1 or warmup < 0:
        raise BadArgument(f"bench needs prompt-len >= 1, new-tokens >= 2, repeats >= 1 "
                          f"(got {prompt_len}, {new_tokens}, {repeats})")
    if not isinstance(model, Model):
        model = load_model(model, threads=threads)
    if model.context_length and prompt_len + new_tokens > model.context_length:
        raise BadArgument(f"prompt-len {prompt_len} + new-tokens {new_tokens} exceeds the model's context "
                          f"of {model.context_length} tokens")
    import onnxruntime as ort

    prompt = _bench_prompt(model, prompt_len)
    for _ in range(warmup):
        _one_run(model, prompt, min(new_tokens, 4))
    runs = [_one_run(model, prompt, new_tokens) for _ in range(repeats)]
    gaps = [gap for run in runs for gap in run["gaps"]]
    manifest = model.manifest
    return {
        "model": str(model.folder),
        "model_version": manifest.get("version") or manifest.get("model_version"),
        "variant": manifest.get("variant"),
        "ops": model.ops,
        "kv_cache": model.kv_cache,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_tokens_per_s": float(np.median([prompt_len / r["prefill_s"] for r in runs])),
        "decode_tokens_per_s": float(np.median([len(r["gaps"]) / sum(r["gaps"]) for r in runs])),
        "time_to_first_token_ms": float(np.median([r["ttft_s"] for r in runs])) * 1e3,
        "inter_token_latency_p50_ms": percentile(gaps, 50) * 1e3,
        "inter_token_latency_p95_ms": percentile(gaps, 95) * 1e3,
        "peak_rss_mb": peak_rss_mb(),
        "rss_mb": current_rss_mb(),
        "model_file_bytes": model.file_bytes(),
        "bits_per_weight": bits_per_weight(model),
        "vocab_size": model.vocab_size,
        "n_layers": model.n_layers,
        "onnxruntime_version": ort.__version__,
        "threads": model.threads,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "python_version": platform.python_version(),
    }
