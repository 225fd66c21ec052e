"""Generation: the KV-cache path against full recompute and a numpy reference, sampling, streaming."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from nativelm.runtime import Generation, RuntimeFailure, Sampling, TextStream, generate, load_model, stream
from nativelm.runtime.generate import Decoder, Sampler
from nativelm.runtime.session import Model
from tests.unit.runtime_model import Export, make_export, reference_greedy, reference_logits, update_manifest

PROMPT = "The king spoke"


@pytest.fixture(scope="module")
def model(export: Export) -> Model:
    return load_model(export.folder, threads=1)


def test_greedy_matches_the_numpy_reference(export: Export, model: Model) -> None:
    ids = model.encode(PROMPT)
    result = generate(model, PROMPT, max_new_tokens=12, stop_at_eos=False)
    assert result.prompt_ids == ids
    assert result.token_ids == reference_greedy(export.weights, export.dims, ids, 12)
    assert result.text == model.decode(result.token_ids)


def test_cached_logits_equal_the_whole_sequence_logits(export: Export, model: Model) -> None:
    ids = model.encode(PROMPT)
    decoder = Decoder(model)
    steps = [decoder.prefill(ids)]
    for token in (17, 250, 3, 99):
        steps.append(decoder.step(token))
    full = reference_logits(export.weights, export.dims, decoder.tokens)
    for i, logits in enumerate(steps):
        expected = full[len(ids) - 1 + i]
        assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_greedy_with_cache_equals_full_recompute(model: Model) -> None:
    cached = generate(model, PROMPT, max_new_tokens=40, stop_at_eos=False)
    full = generate(model, PROMPT, max_new_tokens=40, stop_at_eos=False, full_recompute=True)
    assert len(cached.token_ids) == 40
    assert cached.token_ids == full.token_ids and cached.text == full.text


def test_sampling_with_cache_equals_full_recompute(model: Model) -> None:
    sampling = Sampling(temperature=0.9, top_k=50, top_p=0.95, seed=11)
    cached = generate(model, PROMPT, max_new_tokens=30, sampling=sampling)
    full = generate(model, PROMPT, max_new_tokens=30, sampling=sampling, full_recompute=True)
    assert cached.token_ids == full.token_ids


def test_sampling_is_reproducible_with_a_seed(model: Model) -> None:
    runs = [generate(model, PROMPT, 30, Sampling(temperature=1.0, seed=seed), stop_at_eos=False).token_ids
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert runs[0] != generate(model, PROMPT, 30, stop_at_eos=False).token_ids  # it really samples


def test_top_k_one_and_tiny_top_p_equal_greedy(model: Model) -> None:
    greedy = generate(model, PROMPT, 30, stop_at_eos=False).token_ids
    for sampling in (Sampling(temperature=1.5, top_k=1, seed=1), Sampling(temperature=1.5, top_p=1e-6, seed=2),
                     Sampling(temperature=1e-6, seed=3)):
        assert generate(model, PROMPT, 30, sampling, stop_at_eos=False).token_ids == greedy, sampling


def test_sampler_respects_top_k_and_top_p() -> None:
    logits = np.log(np.array([0.05, 0.5, 0.3, 0.15]))
    top2 = Sampler(Sampling(temperature=1.0, top_k=2, seed=0))
    assert {top2(logits) for _ in range(300)} == {1, 2}
    nucleus = Sampler(Sampling(temperature=1.0, top_p=0.85, seed=0))  # 0.5 + 0.3 < 0.85: three tokens
    assert {nucleus(logits) for _ in range(300)} == {1, 2, 3}
    sampler = Sampler(Sampling(temperature=1.0, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=4) / 4000
    assert np.allclose(counts, [0.05, 0.5, 0.3, 0.15], atol=0.03)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.2, seed=5)])
def test_streamed_text_joins_to_the_decoded_text(model: Model, sampling: Sampling) -> None:
    result = Generation([])
    pieces = list(stream(model, PROMPT, 48, sampling, stop_at_eos=False, result=result))
    plain = generate(model, PROMPT, 48, sampling, stop_at_eos=False)
    assert "".join(pieces) == plain.text == result.text
    assert result.token_ids == plain.token_ids and result.finish_reason == "length"
    assert len(pieces) > 1


def test_text_stream_never_splits_a_character(model: Model) -> None:
    text = "café naïve 日本語のテキスト 🙂 done"
    ids = model.encode(text)
    assert any("\ufffd" in model.decode([i]) for i in ids)  # some tokens are parts of characters
    pieces = TextStream(model.tokenizer)
    out = [pieces.push(i) for i in ids] + [pieces.flush()]
    assert "".join(out) == text
    assert not any("\ufffd" in piece for piece in out)
    assert "" in out  # held back while a character was incomplete


def test_text_stream_flushes_an_unfinished_character(model: Model) -> None:
    ids = model.encode("🙂")
    pieces = TextStream(model.tokenizer)
    out = [pieces.push(i) for i in ids[:-1]]
    assert out == [""] * (len(ids) - 1)
    assert pieces.flush() == model.decode(ids[:-1])  # what it is: replacement characters


def test_stops_at_eos(export: Export, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(export.folder, tmp_path / "export"))
    model = load_model(folder, threads=1)
    tokens = generate(model, PROMPT, 10, stop_at_eos=False).token_ids
    update_manifest(folder, eos_token_id=tokens[3])  # pretend the 4th greedy token is eos
    model = load_model(folder, threads=1)
    result = generate(model, PROMPT, 10)
    assert result.finish_reason == "eos"
    assert result.token_ids == tokens[: tokens.index(tokens[3])]
    assert "".join(stream(model, PROMPT, 10)) == result.text


def test_context_length_caps_generation(model: Model) -> None:
    ids = model.encode(PROMPT)
    result = generate(model, PROMPT, 500, stop_at_eos=False)
    assert result.finish_reason == "context"
    assert len(ids) + len(result.token_ids) == model.context_length
    assert generate(model, PROMPT, 0).token_ids == []
    with pytest.raises(RuntimeFailure, match="the prompt is 70 tokens; the model's context is 64"):
        generate(model, [5] * 70, 1)


def test_empty_prompt_starts_a_document(model: Model) -> None:
    result = generate(model, "", 5, stop_at_eos=False)
    assert result.prompt_ids == [0] and len(result.token_ids) == 5
    assert generate(model, [0], 5, stop_at_eos=False).token_ids == result.token_ids


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"top_k": -2}, "top-k must be >= 0"),
    ({"top_p": 0.0}, r"top-p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top-p must be in \(0, 1\]"),
])
def test_bad_sampling_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(RuntimeFailure, match=message):
        Sampling(**kwargs)


def test_negative_max_new_tokens(model: Model) -> None:
    with pytest.raises(RuntimeFailure, match="max-new-tokens must be >= 0"):
        generate(model, PROMPT, -1)


def test_group_query_attention_export(tmp_path: Path) -> None:
    """The same checks on ORT's GroupQueryAttention (4 query heads sharing 2 KV heads), as the exporter emits."""
    from nativelm.runtime import check_health
    from tests.unit.runtime_model import Dims

    export = make_export(tmp_path / "gqa", seed=3, dims=Dims(n_heads=4, n_kv_heads=2, attention="gqa"))
    model = load_model(export.folder, threads=1)
    assert (model.kv_heads, model.head_dim) == (2, 8)
    ids = model.encode(PROMPT)
    cached = generate(model, PROMPT, 30, stop_at_eos=False)
    assert cached.token_ids == generate(model, PROMPT, 30, stop_at_eos=False, full_recompute=True).token_ids
    assert cached.token_ids[:10] == reference_greedy(export.weights, export.dims, ids, 10)
    assert check_health(model) == 3
