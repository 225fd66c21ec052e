"""Load an export folder on a board: verify every file, open the tokenizer and the ONNX session.

An export folder holds `model.onnx` (and any external-data files), `tokenizer.json`,
`genai_config.json` and `manifest.json`, which records the sha256 of every other file (`folder`).
`load_model` refuses, with one line naming the file, a folder where a listed file is missing or
altered, where ONNX Runtime cannot load the model, or where the tokenizer's vocabulary is not the
model's.

The model follows the usual decoder convention (onnxruntime-genai's): inputs `input_ids` int64
[B, S], `attention_mask` int64 [B, total_len], `past_key_values.{i}.key/.value` [B, kv_heads,
past_len, head_dim]; outputs `logits` [B, S, V] and `present.{i}.key/.value` holding the full cache
[B, kv_heads, total_len, head_dim]. An optional `position_ids` input is fed too, and an optional
`num_logits_to_keep` int64 [1] (nativelm's exports since it was added; default 0: every position) is
fed 1 when the caller wants the last position's logits only (generation), so that the LM head runs
on one row per sequence. Decoding keeps the cache in place where the export allows it (`kvcache`;
`Model.kv_cache`: shared or copied).

A folder may hold two decoders (export variant ``ternary-ops``, `nativelm.export.custom_graph`):
manifest.json's ``graphs.nativelm`` names the graph on nativelm's own operators and
``graphs.fallback`` the contrib-operator graph. `load_model` opens the first when the operator
library loads here (`custom_ops.find_ops_library`; ``NATIVELM_CUSTOM_OPS=off`` hides it) and the second
otherwise; `Model.ops` says which: ``nativelm:<kernel>``, ``fallback`` (the library is missing, or
the custom graph would not open: `Model.ops_reason`) or ``contrib`` (a folder with one graph).

Only numpy, onnxruntime and tokenizers (and the stdlib-only `nativelm.jsonfile`, shipped with the
runtime) are imported: this module ships to boards.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import custom_ops, kvcache
from .errors import (IntegrityError, MissingFile, ModelLoadError, RuntimeFailure, TokenizerMismatch, first_line,
                     ort_reason)
from .folder import MANIFEST, MODEL, TOKENIZER, manifest_hashes, read_json, read_manifest, verify_folder
from .threads import check_threads, default_threads

GENAI_CONFIG = "genai_config.json"
LOGITS_TO_KEEP = "num_logits_to_keep"  # the optional input of the module docstring
EOT = "<|endoftext|>"

CUSTOM_GRAPH = "nativelm"  # manifest["graphs"] key of the graph on nativelm's operators
FALLBACK_GRAPH = "fallback"  # ... and of the contrib-operator graph beside it
CONTRIB_OPS = "contrib"  # Model.ops of a folder with a single (contrib-operator) graph

KVCache = list[tuple[np.ndarray, np.ndarray]]
"""One (key, value) pair per layer, each [B, kv_heads, length, head_dim]."""

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


# --------------------------------------------------------------------------- metadata helpers


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _eos_ids(manifest: dict[str, Any], genai: dict[str, Any], tokenizer: Any) -> tuple[int, ...]:
    eos = manifest.get("eos")
    raw = _first(manifest.get("eos_token_id"), manifest.get("eos_id"), eos.get("id") if isinstance(eos, dict) else None,
                 _section(manifest, "model").get("eos_token_id"), _section(genai, "model").get("eos_token_id"))
    if raw is None:
        token_id = tokenizer.token_to_id(EOT)
        raw = [] if token_id is None else [token_id]
    ids = raw if isinstance(raw, (list, tuple)) else [raw]
    try:
        return tuple(int(i) for i in ids)
    except (TypeError, ValueError):
        raise RuntimeFailure(f"manifest/genai_config: eos token id {raw!r} is not an integer") from None


def _section(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    """mapping[key] when it is a JSON object, else {} (a config missing a section is not an error)."""
    value = mapping.get(key)
    return value if isinstance(value, dict) else {}


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


# --------------------------------------------------------------------------- the model


class Model:
    """An export folder, verified and loaded: tokenizer, ONNX Runtime session and their metadata.

    `forward` runs one step of the decoder (the copying KV cache), `shared_cache` gives the cache kept
    in place; generation lives in `generate.py`.
    """

    def __init__(self, folder: Path, session: Any, tokenizer: Any, manifest: dict[str, Any],
                 genai_config: dict[str, Any], model_file: Path, threads: int, ops: str = CONTRIB_OPS,
                 ops_reason: str | None = None) -> None:
        self.folder = folder
        self.session = session
        self.ops = ops  # which graph runs: nativelm:<kernel>, fallback or contrib (module docstring)
        self.ops_reason = ops_reason  # why a folder's custom-operator graph is not the one running
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.genai_config = genai_config
        self.model_file = model_file
        self.threads = threads
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        for name in ("input_ids", "attention_mask"):
            if name not in inputs:
                raise ModelLoadError(f"{model_file}: has no input {name!r} (inputs: {', '.join(inputs)})")
        if "logits" not in outputs:
            raise ModelLoadError(f"{model_file}: has no output 'logits' (outputs: {', '.join(outputs)})")
        layers = sorted({int(m.group(1)) for m in map(_PAST.match, inputs) if m})
        if layers != list(range(len(layers))):
            raise ModelLoadError(f"{model_file}: past_key_values inputs are not numbered 0..n-1 ({layers})")
        for i in layers:
            for part in ("key", "value"):
                if f"past_key_values.{i}.{part}" not in inputs or f"present.{i}.{part}" not in outputs:
                    raise ModelLoadError(f"{model_file}: layer {i} lacks past_key_values.{i}.{part} "
                                         f"or present.{i}.{part}")
        self.n_layers = len(layers)
        self.has_position_ids = "position_ids" in inputs
        overridable = {i.name for i in session.get_overridable_initializers()}  # inputs with a default
        self.has_logits_to_keep = LOGITS_TO_KEEP in inputs or LOGITS_TO_KEEP in overridable
        self._output_names = ["logits"] + [f"present.{i}.{p}" for i in layers for p in ("key", "value")]
        model_cfg = _section(genai_config, "model")
        decoder = _section(model_cfg, "decoder")
        self.kv_heads = self.head_dim = 0
        self.kv_dtype: Any = np.float32
        if layers:
            past = inputs["past_key_values.0.key"]
            self.kv_dtype = _ORT_DTYPES.get(past.type, np.float32)
            shape = list(past.shape) + [None] * 4
            self.kv_heads = _positive_int(shape[1]) or _positive_int(decoder.get("num_key_value_heads")) or 0
            self.head_dim = _positive_int(shape[3]) or _positive_int(decoder.get("head_size")) or 0
            if not self.kv_heads or not self.head_dim:
                raise ModelLoadError(f"{model_file}: KV cache shape {past.shape} is symbolic and "
                                     f"{GENAI_CONFIG} gives no num_key_value_heads/head_size")
        self.context_length = _positive_int(_first(model_cfg.get("context_length"), manifest.get("context_length"),
                                                   _section(manifest, "model").get("context_length")))
        self.eos_ids = _eos_ids(manifest, genai_config, tokenizer)
        # shared (the cache bound in place, `kvcache`) or copied (`forward`), and why not shared
        self.kv_cache, self.kv_cache_reason = kvcache.choose(genai_config, self.context_length, self.n_layers)
        logits_shape = list(outputs["logits"].shape)
        self.vocab_size = (_positive_int(logits_shape[-1]) if logits_shape else None) \
            or _positive_int(model_cfg.get("vocab_size")) or self._probe_vocab()

    @property
    def golden(self) -> Any:
        """The golden continuations of the graph that runs (the custom graph's greedy tokens are its own)."""
        if self.ops.startswith(f"{CUSTOM_GRAPH}:"):
            return _section(_section(self.manifest, "graphs"), CUSTOM_GRAPH).get("golden")
        return self.manifest.get("golden")

    # ----------------------------------------------------------------- running

    def empty_cache(self, batch: int = 1) -> KVCache:
        """A KV cache with no positions yet (past_len 0)."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [(empty, empty) for _ in range(self.n_layers)]

    def shared_cache(self, batch: int = 1) -> kvcache.SharedCache:
        """A KV cache of `context_length` positions bound in place across steps (only where
        `kv_cache` is ``shared``: `kvcache`)."""
        if self.kv_cache != kvcache.SHARED:
            raise RuntimeFailure(f"{self.model_file}: its KV cache cannot be shared ({self.kv_cache_reason})")
        return kvcache.SharedCache(self.session, self.n_layers, self.kv_heads, self.head_dim,
                                   int(self.context_length or 0), batch, self.kv_dtype, self.has_position_ids,
                                   str(self.model_file), self.has_logits_to_keep)

    def forward(self, input_ids: np.ndarray, past: KVCache | None = None,
                last_only: bool = False) -> tuple[np.ndarray, KVCache]:
        """Run the decoder on `input_ids` [B, S] after `past` (None: an empty cache).

        Returns logits [B, S, V] ([B, 1, V] with `last_only` on a graph that takes `num_logits_to_keep`)
        and the present cache (past followed by the S new positions).
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise RuntimeFailure(f"forward: input_ids must be [batch, seq>0], got shape {input_ids.shape}")
        batch, seq = input_ids.shape
        past = self.empty_cache(batch) if past is None else past
        past_len = past[0][0].shape[2] if past else 0
        total = past_len + seq
        feed: dict[str, np.ndarray] = {"input_ids": input_ids,
                                       "attention_mask": np.ones((batch, total), dtype=np.int64)}
        if self.has_position_ids:
            feed["position_ids"] = np.broadcast_to(np.arange(past_len, total, dtype=np.int64), (batch, seq)).copy()
        if last_only and self.has_logits_to_keep:
            feed[LOGITS_TO_KEEP] = np.ones(1, dtype=np.int64)
        for i, (key, value) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = key
            feed[f"past_key_values.{i}.value"] = value
        try:
            results = self.session.run(self._output_names, feed)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelLoadError(f"{self.model_file}: ONNX Runtime failed to run it "
                                 f"(batch {batch}, {seq} new + {past_len} cached tokens): {ort_reason(exc)}") from None
        logits, flat = results[0], results[1:]
        present = [(flat[2 * i], flat[2 * i + 1]) for i in range(self.n_layers)]
        return logits, present

    def _probe_vocab(self) -> int:
        logits, _ = self.forward(np.zeros((1, 1), dtype=np.int64))
        return int(logits.shape[-1])

    # ----------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens (eos) left out."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def file_bytes(self) -> int:
        """Bytes on disk of the model file and its external-data files (`model.onnx*`)."""
        stem = self.model_file.name
        return sum(p.stat().st_size for p in self.model_file.parent.iterdir()
                   if p.is_file() and p.name.startswith(stem))

    def __repr__(self) -> str:
        return (f"Model({str(self.folder)!r}, layers={self.n_layers}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, vocab={self.vocab_size}, context={self.context_length})")



def load_tokenizer(path: Path) -> Any:
    """tokenizer.json as a `tokenizers.Tokenizer`; missing or unreadable is one clear line."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise MissingFile(f"{path}: missing (the model's tokenizer)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise TokenizerMismatch(f"{path}: not a readable tokenizer ({first_line(exc)})") from None


def open_session(path: Path, threads: int, library: str | None = None) -> Any:
    """An ONNX Runtime CPU session on `path` (with nativelm's operator `library` registered when given);
    a file ORT cannot load is one line naming it."""
    import onnxruntime as ort

    if not path.is_file():
        raise MissingFile(f"{path}: missing (the model file)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: warnings would interleave with generated text
    if library is not None:
        custom_ops.load_library(options, Path(library))
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        size = path.stat().st_size
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({size} bytes; truncated or corrupt?): "
                             f"{ort_reason(exc)}") from None


def _open_graph(folder: Path, fallback: str, custom: Any, threads: int) -> tuple[Path, Any, str, str | None]:
    """(model file, session, ops, why not the custom graph) of the graph this machine runs (module docstring)."""
    if not custom:
        return folder / fallback, open_session(folder / fallback, threads), CONTRIB_OPS, None
    try:
        library = custom_ops.find_ops_library()
        if library is None:
            reason = f"nativelm's operator library is not available here ({custom_ops.OPS_ENV} or not installed)"
        else:
            session = open_session(folder / str(custom), threads, library.path)
            return folder / str(custom), session, f"{CUSTOM_GRAPH}:{library.kernel}", None
    except ModelLoadError as exc:  # a library of another architecture, a damaged build: the fallback still runs
        reason = str(exc)
    return folder / fallback, open_session(folder / fallback, threads), FALLBACK_GRAPH, reason


def load_model(folder: str | os.PathLike[str], threads: int | None = None, verify: bool = True) -> Model:
    """Verify (sha256 of every file in the manifest) and load an export folder.

    `threads`: ONNX Runtime intra-op threads (default: every CPU this process may use).
    `verify=False` skips the hashes (and tolerates a folder without manifest.json).
    """
    threads = default_threads() if threads is None else check_threads(int(threads))
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFile(f"{folder}: no such model folder")
    if verify:
        manifest = verify_folder(folder, required=(TOKENIZER,))
    else:
        manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else {}
    genai = read_json(folder / GENAI_CONFIG, "onnxruntime-genai config") if (folder / GENAI_CONFIG).is_file() else {}
    decoder = _section(_section(genai, "model"), "decoder")
    model_name = str(decoder.get("filename") or MODEL)
    custom_name = _section(_section(manifest, "graphs"), CUSTOM_GRAPH).get("file")
    hashes = manifest_hashes(manifest, folder / MANIFEST) if verify else {}
    for name in [model_name] + ([str(custom_name)] if custom_name else []):
        if verify and name not in hashes:
            raise IntegrityError(f"{folder / MANIFEST}: has no sha256 for {name}, so it cannot be verified")
    tokenizer = load_tokenizer(folder / TOKENIZER)
    model_file, session, ops, reason = _open_graph(folder, model_name, custom_name, threads)
    model = Model(folder, session, tokenizer, manifest, genai, model_file, threads, ops, reason)
    token_count = tokenizer.get_vocab_size(with_added_tokens=True)
    if token_count != model.vocab_size:
        raise TokenizerMismatch(f"{folder / TOKENIZER}: has {token_count} tokens but {model_file.name} predicts "
                                f"{model.vocab_size}: a tokenizer from another model")
    return model
