"""Loading an export folder: the model's I/O is read right, and every bad folder is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nativelm.runtime import RuntimeFailure, load_model, verify_folder
from nativelm.runtime.errors import IntegrityError, MissingFile, ModelLoadError, TokenizerMismatch
from tests.unit.runtime_model import Export, train_tokenizer, update_manifest


def failure(folder: Path, **kwargs) -> RuntimeFailure:
    with pytest.raises(RuntimeFailure) as info:
        load_model(folder, threads=1, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return info.value


def test_load_reads_the_model_io_and_metadata(export: Export) -> None:
    model = load_model(export.folder, threads=1)
    dims = export.dims
    assert (model.n_layers, model.kv_heads, model.head_dim) == (dims.n_layers, dims.n_heads, dims.head_dim)
    assert model.vocab_size == export.vocab == model.tokenizer.get_vocab_size()
    assert model.context_length == dims.context
    assert model.eos_ids == (0,)
    assert model.threads == 1
    assert model.file_bytes() == (export.folder / "model.onnx").stat().st_size
    cache = model.empty_cache()
    assert len(cache) == dims.n_layers and cache[0][0].shape == (1, dims.n_heads, 0, dims.head_dim)
    assert model.decode(model.encode("The king spoke")) == "The king spoke"


def test_forward_returns_the_full_cache(export: Export) -> None:
    import numpy as np

    model = load_model(export.folder, threads=1)
    logits, present = model.forward(np.array([[5, 6, 7]]))
    assert logits.shape == (1, 3, export.vocab)
    assert present[0][0].shape == (1, export.dims.n_heads, 3, export.dims.head_dim)
    logits2, present2 = model.forward(np.array([[8]]), present)
    assert logits2.shape == (1, 1, export.vocab) and present2[1][1].shape[2] == 4
    assert np.array_equal(present2[0][0][:, :, :3], present[0][0])
    # a graph without the optional num_logits_to_keep input (written before it existed): every position still
    assert not model.has_logits_to_keep and model.forward(np.array([[5, 6, 7]]), last_only=True)[0].shape[1] == 3


def test_altered_byte_is_a_hash_mismatch_naming_the_file(folder: Path) -> None:
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.onnx").write_bytes(bytes(data))
    error = failure(folder)
    assert isinstance(error, IntegrityError)
    assert "model.onnx" in str(error) and "sha256 mismatch" in str(error)


def test_altered_config_is_caught_too(folder: Path) -> None:
    (folder / "genai_config.json").write_text((folder / "genai_config.json").read_text() + " ")
    assert "genai_config.json: sha256 mismatch" in str(failure(folder))


def test_truncated_model_is_one_line_naming_the_file(folder: Path) -> None:
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    assert isinstance(failure(folder), IntegrityError)  # the manifest catches it first
    update_manifest(folder)  # a manifest written over the broken file: ONNX Runtime must refuse it
    error = failure(folder)
    assert isinstance(error, ModelLoadError)
    assert str(error).startswith(f"{folder / 'model.onnx'}: ONNX Runtime cannot load it")
    assert "[ONNXRuntimeError]" not in str(error)  # boilerplate trimmed
    (folder / "model.onnx").write_bytes(b"")
    update_manifest(folder)
    assert "model.onnx: ONNX Runtime cannot load it (0 bytes" in str(failure(folder))


def test_tokenizer_from_another_model_is_refused(folder: Path) -> None:
    train_tokenizer(vocab_size=300).save(str(folder / "tokenizer.json"))
    update_manifest(folder)
    error = failure(folder)
    assert isinstance(error, TokenizerMismatch)
    assert "tokenizer.json: has 300 tokens but model.onnx predicts 320" in str(error)


def test_unreadable_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    update_manifest(folder)
    error = failure(folder)
    assert isinstance(error, TokenizerMismatch) and "tokenizer.json: not a readable tokenizer" in str(error)


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "genai_config.json"])
def test_missing_listed_file(folder: Path, name: str) -> None:
    (folder / name).unlink()
    error = failure(folder)
    assert isinstance(error, MissingFile)
    assert str(error) == f"{folder / name}: missing (listed in manifest.json)"


def test_missing_manifest_and_folder(folder: Path) -> None:
    (folder / "manifest.json").unlink()
    assert str(failure(folder)) == f"{folder / 'manifest.json'}: missing (every export folder has one)"
    assert load_model(folder, threads=1, verify=False).vocab_size == 320  # --no-verify tolerates it
    assert "no such model folder" in str(failure(folder / "nope"))


def test_manifest_must_cover_the_model_and_be_json(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["sha256"]["model.onnx"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "has no sha256 for model.onnx" in str(failure(folder))
    manifest["sha256"]["../outside"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "'../outside' is not a file name inside the folder" in str(failure(folder))
    (folder / "manifest.json").write_text("{ truncated")
    assert "manifest.json: not readable JSON" in str(failure(folder))


def test_other_manifest_layouts_and_unlisted_files(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    table = manifest.pop("sha256")
    manifest["files"] = [{"path": name, "sha256": digest, "bytes": 1} for name, digest in table.items()]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "nativelm-runtime.pyz").write_bytes(b"not listed, not checked")
    assert verify_folder(folder)["files"]
    assert load_model(folder, threads=1).vocab_size == 320


def test_bad_threads(folder: Path) -> None:
    with pytest.raises(RuntimeFailure, match="threads must be between 1 and .*, got 0"):
        load_model(folder, threads=0)


def test_the_exporters_manifest_layout(folder: Path) -> None:
    """The exporter nests model facts under "model"/"weights" and golden prompts under "golden.prompts"."""
    from nativelm.runtime import check_health
    from nativelm.runtime.bench import bits_per_weight
    from nativelm.runtime.health import golden_entries

    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    manifest = json.loads((folder / "manifest.json").read_text())
    prompts = [{"prompt": g["prompt"], "prompt_ids": train_tokenizer().encode(g["prompt"]).ids,
                "continuation_ids": g["tokens"], "continuation_text": g["text"], "torch_common_prefix": 8}
               for g in manifest["golden"]]
    update_manifest(folder, golden={"greedy": True, "kv_cache": True, "max_new_tokens": 8, "stop_at_eos": False,
                                    "eos_token_id": 0, "prompts": prompts},
                    model={"vocab_size": 320, "num_params": 40000, "context_length": 48, "eos_token_id": 3},
                    weights={"params": 40000, "bits_per_weight": 1.9}, eos_token_id=None, context_length=None,
                    bits_per_weight=None, parameters=None)
    model = load_model(folder, threads=1)
    assert (model.eos_ids, model.context_length, bits_per_weight(model)) == ((3,), 48, 1.9)
    assert [g.prompt for g in golden_entries(model)] == [p["prompt_ids"] for p in prompts]
    assert check_health(model) == 3
    prompts[2]["continuation_ids"][0] += 1
    update_manifest(folder, golden={"prompts": prompts})
    with pytest.raises(RuntimeFailure, match=r"golden prompt 3 of 3 \('café 日本'\) differed at token 1 of 8"):
        check_health(load_model(folder, threads=1))
