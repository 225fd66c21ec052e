"""The export folder (`export` writes it; `evaluate`, releases and the board runtime read it).

Files: ``model.onnx`` (weights inline below ~1.8 GB, else in ``model.onnx.data`` beside it),
``tokenizer.json``, ``genai_config.json`` and ``tokenizer_config.json`` (onnxruntime-genai) and ``manifest.json``: variant,
sizes, parity figures, the PTQ label (`ptq_label`), golden continuations and the sha256 of every
other file. The decoder's inputs and outputs follow the onnxruntime-genai decoder convention named
below. The board runtime (`nativelm.runtime`, which may not import this package) keeps its own copies of the
names it needs; a test checks they are equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nativelm.formats import envelope

FORMAT = "nativelm-onnx-export"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
GENAI_CONFIG = "genai_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # what onnxruntime-genai reads beside tokenizer.json
MANIFEST = "manifest.json"
EOS_TOKEN_ID = 0  # <|endoftext|> (nativelm.formats.prepared.EOT_ID)

# decoder I/O: input_ids int64 [batch, sequence], attention_mask int64 [batch, total],
# past_key_values.{i}.key/value float [batch, kv_heads, past, head_dim] -> logits [batch, sequence,
# vocab], present.{i}.key/value [batch, kv_heads, total, head_dim]
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
# optional input int64 [1]: logits of the last N positions only (default 0: every position); generation
# feeds 1, so the LM head runs on one row per sequence; scoring and onnxruntime-genai leave it out
LOGITS_TO_KEEP = "num_logits_to_keep"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """manifest.json into a folder being built (the board runtime's `verify_folder` reads it)."""
    return envelope.write_json(Path(folder) / MANIFEST, manifest)


# the manifest's post-training-quantization label (`nativelm.export.ptq`): copied to the metrics, the
# release.json and, as strings, the MLflow runs and the registry version


def ptq_label(manifest: dict[str, Any]) -> dict[str, Any]:
    """ptq (bool) and, for a PTQ export, ptq_method, as the manifest holds them (older manifests: not PTQ)."""
    label: dict[str, Any] = {"ptq": bool(manifest.get("ptq", False))}
    if manifest.get("ptq_method"):
        label["ptq_method"] = str(manifest["ptq_method"])
    return label


def ptq_tags(manifest: dict[str, Any]) -> dict[str, str]:
    """The PTQ label as MLflow tags: ptq "true" / "false", ptq_method when PTQ."""
    return {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in ptq_label(manifest).items()}
