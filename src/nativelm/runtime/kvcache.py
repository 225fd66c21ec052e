"""The KV cache kept in place across decode steps (GroupQueryAttention's shared past/present buffer).

The copying path (`Model.forward`) feeds `past_key_values.{i}.key/value` as numpy arrays and gets
`present.{i}.*` back as new arrays: ONNX Runtime allocates and copies the whole cache at every step.
The shared path (`SharedCache`) allocates one buffer [B, kv_heads, max_len, head_dim] per layer and
part once, and binds it through ONNX Runtime's I/O binding as both the past input and the present
output. GroupQueryAttention sees past and present in the same memory, appends only the new positions
and takes how many are valid from seqlens_k / total_sequence_length, which the exported graph derives
from attention_mask (docs/architecture.md, "The export"); nothing in the graph may read past's shape.

A folder runs the shared path when its genai_config.json says the graph allows it
(search.past_present_share_buffer, the flag onnxruntime-genai reads for the same buffer) and gives
a context length (the buffer's size). ``NATIVELM_KV_CACHE=copied`` forces the copying path and
``=shared`` the shared one. `Model.kv_cache` says which runs (``shared`` or ``copied``) and
`Model.kv_cache_reason` why not shared. Both give the same logits.

Only numpy and onnxruntime are used: this module ships to boards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import BadArgument, ModelLoadError, RuntimeFailure, ort_reason

KV_ENV = "NATIVELM_KV_CACHE"
SHARED = "shared"
COPIED = "copied"


def choose(genai_config: Mapping[str, Any], context_length: int | None, n_layers: int) -> tuple[str, str | None]:
    """(``shared`` | ``copied``, why not shared) for a graph described by `genai_config` (module docstring)."""
    forced = os.environ.get(KV_ENV, "").strip().lower()
    if forced not in ("", SHARED, COPIED):
        raise BadArgument(f"{KV_ENV}={forced!r}: expected {SHARED!r} or {COPIED!r}")
    if forced == COPIED:
        return COPIED, f"{KV_ENV}={COPIED}"
    if not n_layers:
        return COPIED, "the graph has no KV cache inputs"
    if not context_length:
        return COPIED, "no context length is recorded, so the shared buffer's size is unknown"
    search = genai_config.get("search")
    if forced != SHARED and not (isinstance(search, Mapping) and search.get("past_present_share_buffer") is True):
        return COPIED, "genai_config.json does not set search.past_present_share_buffer (an export before it)"
    return SHARED, None


class SharedCache:
    """The KV cache of one batch of sequences, preallocated for `max_len` positions and bound in place.

    `run` appends positions: it feeds `input_ids` [B, S] after the `length` positions already cached
    and returns the logits [B, S, V]; `reset` starts a new sequence in the same buffers.
    """

    def __init__(self, session: Any, n_layers: int, kv_heads: int, head_dim: int, max_len: int, batch: int = 1,
                 dtype: Any = np.float32, position_ids: bool = False, where: str = "model",
                 logits_to_keep: bool = False) -> None:
        import onnxruntime as ort

        self.session, self.max_len, self.batch = session, int(max_len), int(batch)
        self.position_ids, self.where = position_ids, where
        # num_logits_to_keep (session.py's docstring) can be bound only where it is a graph input: I/O
        # binding knows no overridable initializer (the exports' form), so there prefill gets every position
        self.logits_to_keep = logits_to_keep and "num_logits_to_keep" in {i.name for i in session.get_inputs()}
        self.length = 0
        shape = (self.batch, kv_heads, self.max_len, head_dim)
        # numpy owns the memory (zeroed, so nothing undefined is ever in it); the OrtValues wrap it
        self._arrays = [np.zeros(shape, dtype=dtype) for _ in range(2 * n_layers)]
        self.binding = session.io_binding()
        self.binding.bind_output("logits")  # first: get_outputs()[0]
        for i in range(n_layers):
            for j, part in enumerate(("key", "value")):
                value = ort.OrtValue.ortvalue_from_numpy(self._arrays[2 * i + j])
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{part}", value)
                self.binding.bind_ortvalue_output(f"present.{i}.{part}", value)

    def reset(self) -> None:
        """Forget the cached positions (a new prompt overwrites the buffers from position 0)."""
        self.length = 0

    def run(self, input_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        """Logits [B, S, V] of `input_ids` [B, S] after the cached positions, which it then extends by S
        ([B, 1, V] with `last_only` on a graph that takes num_logits_to_keep: the LM head on one row)."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] != self.batch:
            raise RuntimeFailure(f"forward: input_ids must be [{self.batch}, seq>0], got shape {input_ids.shape}")
        seq = input_ids.shape[1]
        past, total = self.length, self.length + seq
        if total > self.max_len:
            raise RuntimeFailure(f"{self.where}: {past} cached + {seq} new tokens exceed the KV cache's "
                                 f"{self.max_len} positions (the model's context length)")
        mask = np.ones((self.batch, total), dtype=np.int64)
        self.binding.bind_cpu_input("input_ids", input_ids)
        self.binding.bind_cpu_input("attention_mask", mask)
        if self.position_ids:
            positions = np.broadcast_to(np.arange(past, total, dtype=np.int64), (self.batch, seq)).copy()
            self.binding.bind_cpu_input("position_ids", positions)
        if self.logits_to_keep:
            self.binding.bind_cpu_input("num_logits_to_keep", np.array([1 if last_only else 0], dtype=np.int64))
        self.binding.bind_output("logits")  # a fresh output each run (a prefill's shape is not a step's)
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelLoadError(f"{self.where}: ONNX Runtime failed to run it (batch {self.batch}, {seq} new + "
                                 f"{past} cached tokens, shared KV cache): {ort_reason(exc)}") from None
        self.length = total
        return np.array(self.binding.get_outputs()[0].numpy(), copy=True)
