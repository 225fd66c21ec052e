"""The benchmark's numbers: every field present and sane (timings are not asserted, only their sense)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nativelm.runtime import RuntimeFailure, benchmark, load_model
from nativelm.runtime.bench import bits_per_weight, cpu_model, current_rss_mb, peak_rss_mb
from tests.unit.runtime_model import Export, update_manifest

NUMBERS = ["prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_ms", "inter_token_latency_p50_ms",
           "inter_token_latency_p95_ms", "peak_rss_mb", "rss_mb", "model_file_bytes", "bits_per_weight",
           "threads", "vocab_size", "n_layers", "prompt_len", "new_tokens", "repeats"]


def check_results(results: dict, export: Export) -> None:
    for key in NUMBERS:
        value = results[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, (key, value)
    assert results["inter_token_latency_p95_ms"] >= results["inter_token_latency_p50_ms"]
    assert results["peak_rss_mb"] >= results["rss_mb"] * 0.5  # both in MB, same order of magnitude
    assert 10 < results["peak_rss_mb"] < 100_000
    assert results["model_file_bytes"] == (export.folder / "model.onnx").stat().st_size
    for key in ("onnxruntime_version", "cpu_model", "machine", "python_version"):
        assert isinstance(results[key], str) and results[key], key


def test_benchmark_fields(export: Export) -> None:
    import onnxruntime

    results = benchmark(export.folder, prompt_len=16, new_tokens=8, repeats=2, threads=1)
    check_results(results, export)
    assert (results["prompt_len"], results["new_tokens"], results["repeats"]) == (16, 8, 2)
    assert results["threads"] == 1 and results["onnxruntime_version"] == onnxruntime.__version__
    assert results["bits_per_weight"] == 32.0  # as the manifest records it


def test_bits_per_weight_from_the_manifest_counts(export: Export, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(export.folder, tmp_path / "export"))
    manifest = update_manifest(folder, bits_per_weight=None)
    params = manifest["parameters"]["total"]
    model = load_model(folder, threads=1)
    assert bits_per_weight(model) == pytest.approx(model.file_bytes() * 8 / params)  # fp32 weights + graph
    assert 32 <= bits_per_weight(model) < 40
    update_manifest(folder, initializer_bytes=params // 4)  # as a 2-bit export would record
    assert bits_per_weight(load_model(folder, threads=1)) == pytest.approx(2.0)
    update_manifest(folder, parameters=None, initializer_bytes=None)
    assert bits_per_weight(load_model(folder, threads=1)) is None


def test_bench_refuses_what_does_not_fit(export: Export) -> None:
    model = load_model(export.folder, threads=1)
    with pytest.raises(RuntimeFailure, match="exceeds the model's context of 64 tokens"):
        benchmark(model, prompt_len=60, new_tokens=8)
    with pytest.raises(RuntimeFailure, match="new-tokens >= 2"):
        benchmark(model, prompt_len=8, new_tokens=1)


def test_machine_facts() -> None:
    assert peak_rss_mb() > 1
    assert current_rss_mb() is None or current_rss_mb() > 1
    assert cpu_model()
