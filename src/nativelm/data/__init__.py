"""The `prepare` stage: corpus sources, cleaning, split, tokenizer training, token shards.

`run_prepare` runs the stage; `load_shards` / `read_manifest` are what training reads back.
Imports are lazy: `nativelm.config` imports `data.params`, and loading parameters should not
pull in tokenizers and numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nativelm.lazy import lazy_getattr

if TYPE_CHECKING:
    from nativelm.data.prepare import PrepareResult, run_prepare
    from nativelm.data.shards import load_shards, read_manifest
    from nativelm.data.tokenizer import load_tokenizer

_EXPORTS = {
    "PrepareResult": "nativelm.data.prepare",
    "run_prepare": "nativelm.data.prepare",
    "load_shards": "nativelm.data.shards",
    "read_manifest": "nativelm.data.shards",
    "load_tokenizer": "nativelm.data.tokenizer",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
