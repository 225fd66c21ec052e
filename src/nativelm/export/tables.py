"""The embedding table and the LM head of the decoder, at the bits the variant gives them.

Embedding: 8 / 4 bits = GatherBlockQuantized (a d_model no block of 16+ divides falls back to fp16),
16 = fp16 Gather, 32 = fp32 Gather. LM head: 8 / 4 bits = MatMulNBits (symmetric per block), 16 =
fp16 weights cast to fp32, 32 = fp32 MatMul. A tied matrix is stored once per use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from nativelm.export import kernels, ops, pack
from nativelm.export.builder import GraphBuilder
from nativelm.export.kernels import FAST_BLOCKS
from nativelm.export.weights import as_numpy
from nativelm.formats.export_folder import INPUT_IDS, LOGITS
from nativelm.params.export import ExportParams

if TYPE_CHECKING:
    from nativelm.model import NativeLM

EMBED = "embed"


def embedding(b: GraphBuilder, model: NativeLM, params: ExportParams, bits: int) -> str:
    """The token embedding lookup of `input_ids`; returns its output name."""
    table = as_numpy(model.embed.weight)
    b.count("embedding", table.size)
    d = table.shape[1]
    block = next((x for x in (params.block_size, *FAST_BLOCKS, 16) if d % x == 0), None)
    if bits in (4, 8) and block is None:
        b.notes.append(f"embedding: d_model {d} is not a multiple of 16, so GatherBlockQuantized cannot "
                       f"take it; the table is stored in fp16 instead of {bits} bits")
        bits = 16
    if bits in (4, 8):
        w_int, scales = pack.quantize_symmetric(table, bits, block)
        b.add(ops.gather_block_quantized(EMBED, INPUT_IDS, w_int, scales, bits, block, output=EMBED), "embedding")
        b.choices["embedding"] = {"op": "GatherBlockQuantized", "bits": bits, "block_size": block}
    elif bits == 16:
        b.add(ops.gather_fp16(EMBED, INPUT_IDS, table, output=EMBED), "embedding")
        b.choices["embedding"] = {"op": "Gather", "bits": 16}
    else:
        b.node("Gather", [b.init("embed.weight", table, "embedding"), INPUT_IDS], EMBED, axis=0)
        b.choices["embedding"] = {"op": "Gather", "bits": 32}
    if model.params.tie_embeddings:
        b.choices["embedding"]["tied_with_lm_head"] = True
    return EMBED


def lm_head(b: GraphBuilder, model: NativeLM, params: ExportParams, bits: int, h: str) -> None:
    """The logits of the final hidden state `h`."""
    weight = as_numpy(model.lm_head.weight)
    b.count("lm_head", weight.size)  # a tied matrix counts in both parts (stored once per use)
    block = params.block_size
    if bits in (4, 8):
        w_int, scales = pack.quantize_symmetric(weight, bits, block)
        level = params.accuracy_level
        b.add(b.guard("lm_head", lambda: ops.matmul_nbits("lm_head", h, w_int, scales, bits, block, level,
                                                           output=LOGITS, allow_slow_kernel=True)), "lm_head")
        fast = kernels.matmul_nbits_is_fast(bits, block, level)
        b.choices["lm_head"] = {"op": "MatMulNBits", "bits": bits, "block_size": block, "accuracy_level": level,
                                "fast_kernel": fast}
        if not fast:
            b.notes.append(f"lm_head: MatMulNBits bits={bits} accuracy_level={level} runs on ORT's generic "
                           "(slow) kernel (8 bits needs accuracy_level 4)")
    elif bits == 16:
        w16 = b.init("lm_head.weight", weight.T.astype(np.float16), "lm_head")
        b.node("MatMul", [h, b.node("Cast", [w16], "lm_head.weight_fp32", to=TensorProto.FLOAT)], LOGITS)
        b.choices["lm_head"] = {"op": "MatMul", "bits": 16}
    else:
        b.node("MatMul", [h, b.init("lm_head.weight", weight.T, "lm_head")], LOGITS)
        b.choices["lm_head"] = {"op": "MatMul", "bits": 32}
    if model.params.tie_embeddings:
        b.choices["lm_head"]["tied_with_embedding"] = True
