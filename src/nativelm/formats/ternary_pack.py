"""Packed ternary weights: five trits per byte, the layout the `nativelm` custom operators read.

Layout (docs/kernels.md explains why it decodes fast in SIMD): a row of K ternary codes is cut
into blocks of 160 codes stored in 32 bytes; the last block holds the r = K mod 160 remaining
codes in ceil(r / 5) bytes. In a block of `nb` bytes (32, or the tail's), byte j holds the five
codes at positions j + nb·i (i = 0..4) of the block, as the base-3 number

    v = sum_i (t_i + 1) · 3^(4 - i)          (code i is the most significant digit, v in 0..242)

stored as the fixed-point fraction q = ceil(v · 256 / 243), so digit i is recovered with byte
arithmetic only: floor(3 · (q · 3^i mod 256) / 256). Positions past K hold code 0. A row takes
ceil(K / 5) bytes: 1.6 bits per weight plus at most 6.4 / K for the tail (<= 1.7 from K = 64).
"""

from __future__ import annotations

import numpy as np

TRITS_PER_BYTE = 5
BLOCK_BYTES = 32
BLOCK = BLOCK_BYTES * TRITS_PER_BYTE  # 160 codes per full block
_POWERS = np.array([81, 27, 9, 3, 1], dtype=np.int32)  # 3^(4 - i): digit i's weight in v


def packed_row_bytes(K: int) -> int:
    """Bytes of one packed row of K codes (ceil(K / 5): full blocks and the tail both pack 5 per byte)."""
    if K < 1:
        raise ValueError(f"a ternary row needs K >= 1 codes, got K={K}")
    return -(-K // TRITS_PER_BYTE)


def bits_per_weight(K: int) -> float:
    """Storage cost of a K-code row in bits per weight (the issue's target: <= 1.7)."""
    return 8.0 * packed_row_bytes(K) / K


def _block_spans(K: int) -> list[tuple[int, int]]:
    """(first code, bytes) of each block of a K-code row: full 160-code blocks, then the tail."""
    full, tail = divmod(K, BLOCK)
    spans = [(b * BLOCK, BLOCK_BYTES) for b in range(full)]
    if tail:
        spans.append((full * BLOCK, packed_row_bytes(tail)))
    return spans


def code_positions(K: int) -> np.ndarray:
    """(packed_row_bytes(K), 5) code index held by each digit of each byte; K marks padding."""
    rows = []
    for start, nb in _block_spans(K):
        pos = start + np.arange(nb)[:, None] + nb * np.arange(TRITS_PER_BYTE)[None, :]
        rows.append(np.where(pos < min(start + BLOCK, K), pos, K))
    return np.concatenate(rows)


def pack_ternary(codes: np.ndarray) -> np.ndarray:
    """uint8 (..., N, packed_row_bytes(K)) of int codes (..., N, K) in {-1, 0, 1}."""
    codes = np.asarray(codes)
    if codes.ndim < 2:
        raise ValueError(f"pack_ternary needs codes of shape (..., N, K), got shape {codes.shape}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("pack_ternary: codes must be in {-1, 0, 1}")
    K = codes.shape[-1]
    padded = np.concatenate([codes.astype(np.int32) + 1, np.ones(codes.shape[:-1] + (1,), np.int32)], axis=-1)
    digits = padded[..., code_positions(K)]  # (..., N, bytes, 5), padding -> digit 1 (code 0)
    v = digits @ _POWERS
    return ((v * 256 + 242) // 243).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, K: int) -> np.ndarray:
    """int8 codes (..., N, K) of packed rows (..., N, packed_row_bytes(K)): the inverse of pack_ternary."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim < 2 or packed.shape[-1] != packed_row_bytes(K):
        raise ValueError(f"unpack_ternary: expected uint8 (..., N, {packed_row_bytes(K)}) for K={K}, "
                         f"got {packed.dtype} {packed.shape}")
    q = packed.astype(np.int32)[..., None] * (3 ** np.arange(TRITS_PER_BYTE))  # q · 3^i
    digits = ((q & 0xFF) * 3) >> 8  # (..., N, bytes, 5)
    pos = code_positions(K)
    out = np.zeros(packed.shape[:-1] + (K + 1,), np.int8)
    out[..., pos] = (digits - 1).astype(np.int8)
    return out[..., :K]
