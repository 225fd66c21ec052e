"""The KV cache kept in place (`nativelm.runtime.kvcache`) against the copying path, on an exported graph.

The folder holds a graph built by the exporter (`build_graph`, random ternary weights: window 16
on the RoPE layer, a NoPE layer, GQA 8/2) with the exporter's genai_config.json, and the tokenizer
and manifest of the runtime's tiny test export. Both paths run in real ONNX Runtime sessions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from nativelm.export.graph import build_graph
from nativelm.export.stage import genai_config
from nativelm.model import ModelParams, build_model
from nativelm.params.export import ExportParams
from nativelm.runtime import benchmark, generate, load_model
from nativelm.runtime.__main__ import main as runtime_main
from nativelm.runtime.errors import BadArgument, ModelLoadError, RuntimeFailure
from nativelm.runtime.generate import Decoder
from nativelm.runtime.kvcache import COPIED, KV_ENV, SHARED
from nativelm.runtime.session import Model
from tests.unit.runtime_model import Export, update_manifest

TINY = {"d_model": 256, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "max_seq_len": 128, "window": 16,
        "nope_every": 2, "n_experts": 4, "expert_ffn": 128, "top_k": 2}
PROMPT = [5, 61, 7, 200, 13, 90, 42, 8]
STEPS = 40
CONTEXT = len(PROMPT) + STEPS  # the 40th step fills the context exactly


@pytest.fixture(scope="module")
def exported(export: Export, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export's folder with model.onnx and genai_config.json replaced by the exporter's."""
    folder = Path(shutil.copytree(export.folder, tmp_path_factory.mktemp("kvcache") / "export"))
    model = build_model(ModelParams(**TINY), export.vocab, seed=3).eval()
    onnx.save(build_graph(model, ExportParams(variant="ternary")).model, str(folder / "model.onnx"))
    (folder / "genai_config.json").write_text(json.dumps(genai_config(model, CONTEXT)))
    update_manifest(folder, golden=None, context_length=CONTEXT)
    return folder


def load(folder: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> Model:
    monkeypatch.setenv(KV_ENV, mode)
    model = load_model(folder, threads=1)
    monkeypatch.delenv(KV_ENV)
    return model


def decode(model: Model, steps: int) -> np.ndarray:
    """The logits [steps + 1, V] of the prefill and of `steps` fixed pseudo-random tokens fed one by one
    (random weights decode greedily into one repeated id, which would hide a misplaced position)."""
    feed = np.random.default_rng(0).integers(1, model.vocab_size, steps)
    decoder = Decoder(model)
    logits = [decoder.prefill(PROMPT)] + [decoder.step(int(token)) for token in feed]
    return np.stack(logits)


def test_shared_cache_gives_the_copying_paths_logits_up_to_the_context_limit(
        exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared, copied = load(exported, "", monkeypatch), load(exported, COPIED, monkeypatch)
    assert (shared.kv_cache, shared.kv_cache_reason) == (SHARED, None)
    assert copied.kv_cache == COPIED and KV_ENV in str(copied.kv_cache_reason)
    logits, expected = decode(shared, STEPS), decode(copied, STEPS)
    assert logits.shape == (STEPS + 1, shared.vocab_size)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-6)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
    # greedy generation stops at the context in both, with the same tokens
    greedy = generate(shared, PROMPT, 100, stop_at_eos=False)
    assert greedy.token_ids == generate(copied, PROMPT, 100, stop_at_eos=False).token_ids
    assert greedy.finish_reason == "context" and len(greedy.token_ids) == STEPS


def test_a_step_past_the_shared_buffer_is_one_clear_line(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = Decoder(load(exported, "", monkeypatch))
    decoder.prefill(PROMPT * (CONTEXT // len(PROMPT)))
    with pytest.raises(RuntimeFailure, match=r"48 cached \+ 1 new tokens exceed the KV cache's 48 positions"):
        decoder.step(1)
    decoder.prefill(PROMPT)  # a new prompt starts again from position 0
    assert decoder.shared is not None and decoder.shared.length == len(PROMPT)


def test_the_runtime_bench_says_which_cache_ran(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for mode in (SHARED, COPIED):
        result = benchmark(load(exported, mode, monkeypatch), prompt_len=8, new_tokens=4, repeats=1)
        assert result["kv_cache"] == mode and result["decode_tokens_per_s"] > 0


def test_an_export_without_the_flag_copies_and_says_why(export: Export, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load(export.folder, "", monkeypatch)  # genai_config.json without past_present_share_buffer
    assert model.kv_cache == COPIED and "past_present_share_buffer" in str(model.kv_cache_reason)
    with pytest.raises(RuntimeFailure, match="cannot be shared"):
        model.shared_cache()
    monkeypatch.setenv(KV_ENV, "inplace")
    with pytest.raises(BadArgument, match=f"{KV_ENV}='inplace': expected 'shared' or 'copied'"):
        load_model(export.folder, threads=1)


def test_forcing_sharing_on_a_graph_that_reads_past_s_shape_fails_in_one_line(
        export: Export, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny test graph takes positions from Shape(past): a full-size past breaks it, as it would
    any graph without the flag; the failure names the shared cache, never a traceback."""
    model = load(export.folder, SHARED, monkeypatch)
    assert model.kv_cache == SHARED
    with pytest.raises(ModelLoadError, match="shared KV cache") as info:
        generate(model, "The king", 4)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("variant", ["ternary", "ternary-ops", "int4", "fp32"])
def test_every_export_variant_reads_past_only_through_group_query_attention(variant: str) -> None:
    """What lets genai_config.json claim a shared buffer: past feeds GroupQueryAttention's past inputs and
    nothing else (no Shape of it), so a past of max_len positions means what a past of `length` does."""
    model = build_model(ModelParams(**{**TINY, "quantize": variant != "fp32"}), 300, seed=1).eval()
    graph = build_graph(model, ExportParams(variant=variant)).model
    past = {i.name for i in graph.graph.input if i.name.startswith("past_key_values.")}
    uses = [(node.op_type, list(node.input).index(name)) for node in graph.graph.node
            for name in node.input if name in past]
    assert len(past) == 2 * TINY["n_layers"] and len(uses) == len(past)
    assert set(uses) == {("GroupQueryAttention", 3), ("GroupQueryAttention", 4)}
    assert genai_config(model)["search"]["past_present_share_buffer"] is True


def test_health_check_runs_on_the_shared_cache_and_says_so(exported: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Golden continuations recorded on the copying path pass on the shared one; `health --json` names it."""
    copied = load(exported, COPIED, monkeypatch)
    golden = [{"prompt_ids": PROMPT, "tokens": generate(copied, PROMPT, 12, stop_at_eos=False).token_ids}]
    update_manifest(exported, golden=golden)
    try:
        assert runtime_main(["health", "--model", str(exported), "--threads", "1", "--json"]) == 0
        reply = json.loads(capsys.readouterr().out)
        assert (reply["ok"], reply["prompts"], reply["kv_cache"]) == (True, 1, SHARED)
    finally:
        update_manifest(exported, golden=None)
