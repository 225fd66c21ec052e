"""Weight packing for ONNX Runtime's quantized contrib operators (pure numpy).

Conventions measured on ONNX Runtime 1.32 (CPU) and checked by tests/unit/test_export_ops.py:

- Codes are unsigned: a signed integer weight w is stored as q = w + zero_point, and every operator
  dequantizes (q - zero_point) * scale. With no zero-point input each operator uses the default
  2**(bits - 1) (2 for 2 bits, 8 for 4 bits, 128 for 8 bits). That default is what this module uses
  everywhere, so one layout serves MatMulNBits, QMoE and GatherBlockQuantized alike: a ternary
  weight {-1, 0, 1} is the 2-bit code {1, 2, 3}, and code 0 is never used.
- Codes are packed along the input-feature axis K, 8 // bits codes per byte, lowest bits first
  (byte = q0 | q1 << 2 | q2 << 4 | q3 << 6 for 2 bits).
- Rows are output features: a PyTorch `nn.Linear.weight` (out, in) packs as it is, no transpose.
- MatMulNBits: B is (N, k_blocks, block_size * bits / 8); K is padded up to whole blocks with the
  zero-point code (it dequantizes to exactly 0); scales are float32 (N * k_blocks,) (ORT 1.32 also
  takes (N, k_blocks)); optional zero points are packed like B, each row padded to a whole byte.
- QMoE: each expert is (N, K * bits / 8), one float32 scale per output row ((E, N)), or per block
  ((E, N, K / block_size)) when the node sets `block_size`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

TERNARY_EPS = 1e-5
"""Floor of the absmean scale, as BitNet's `w.abs().mean().clamp(min=1e-5)`: an all-zero row stays finite."""

SUPPORTED_BITS = (2, 4, 8)


def default_zero_point(bits: int) -> int:
    """The zero point ORT assumes when a node has no zero-point input: 2**(bits - 1)."""
    _check_bits(bits)
    return 1 << (bits - 1)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def _check_int_range(w_int: np.ndarray, bits: int, what: str) -> None:
    if not np.issubdtype(w_int.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, got dtype {w_int.dtype}")
    if w_int.size:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if w_int.min() < low or w_int.max() > high:
            raise ValueError(f"{what} holds values outside [{low}, {high}] for {bits}-bit codes "
                             f"(min {w_int.min()}, max {w_int.max()})")


# --------------------------------------------------------------------------- bit packing


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, 8 // bits per byte, lowest bits first.

    The last axis must be a multiple of 8 // bits (pad with the zero-point code first).
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last axis ({codes.shape[-1]}) must be a multiple of {per_byte} to pack {bits}-bit codes")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for slot in range(per_byte):
        packed |= grouped[..., slot] << np.uint8(bits * slot)
    return packed


def unpack_bits(packed: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """Inverse of `pack_bits`: uint8 codes along the last axis, truncated to `count` if given."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    slots = [(packed >> np.uint8(bits * slot)) & mask for slot in range(per_byte)]
    codes = np.stack(slots, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)
    return codes if count is None else codes[..., :count]


# --------------------------------------------------------------------------- quantizers


def ternarize(w: np.ndarray) -> tuple[np.ndarray, float]:
    """BitNet b1.58 absmean: w ≈ w_int * scale, w_int = RoundClip(w / scale, -1, 1), scale = mean|w|.

    One scale per tensor (what the model's BitLinear uses). Rounding is half-to-even, as torch.round.
    Prefer the model's own quantizer output when exporting; this mirrors it for tests and tools.
    """
    w = np.asarray(w, dtype=np.float32)
    scale = np.float32(max(float(np.abs(w).mean(dtype=np.float64)) if w.size else 0.0, TERNARY_EPS))
    return np.clip(np.round(w / scale), -1, 1).astype(np.int8), float(scale)


def ternarize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absmean ternarization with one scale per output row: (w_int int8 [N, K], scales float32 [N])."""
    w = _as_matrix(w)
    scales = np.maximum(np.abs(w).mean(axis=1, dtype=np.float64), TERNARY_EPS).astype(np.float32)
    return np.clip(np.round(w / scales[:, None]), -1, 1).astype(np.int8), scales


def ternarize_blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Absmean ternarization with one scale per block of `block_size` inputs of a row.

    Returns (w_int int8 [N, K], scales float32 [N, ceil(K / block_size)]); a last partial block
    averages over its real elements only. This is MatMulNBits' native granularity.
    """
    _check_block_size(block_size)
    w = _as_matrix(w)
    padded, counts = _pad_blocks(np.abs(w), block_size)
    sums = padded.reshape(w.shape[0], -1, block_size).sum(axis=2, dtype=np.float64)
    scales = np.maximum(sums / counts, TERNARY_EPS).astype(np.float32)
    w_int = np.clip(np.round(w / expand_block_scales(scales, w.shape[1], block_size)), -1, 1)
    return w_int.astype(np.int8), scales


def quantize_symmetric(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax block quantization (for the 4- and 8-bit comparison exports).

    scale = max|w| / (2**(bits-1) - 1) per block of a row, w_int = round(w / scale) in
    [-(2**(bits-1) - 1), 2**(bits-1) - 1]; returns (w_int int8 [N, K], scales float32 [N, k_blocks]).
    An all-zero block gets scale 1 (its codes are all zero).
    """
    _check_bits(bits)
    _check_block_size(block_size)
    w = _as_matrix(w)
    qmax = (1 << (bits - 1)) - 1
    padded, _ = _pad_blocks(np.abs(w), block_size)
    absmax = padded.reshape(w.shape[0], -1, block_size).max(axis=2)
    scales = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    w_int = np.clip(np.round(w / expand_block_scales(scales, w.shape[1], block_size)), -qmax, qmax)
    return w_int.astype(np.int8), scales


def block_scales(scale: float | np.ndarray, n_rows: int, k: int, block_size: int) -> np.ndarray:
    """Broadcast a per-tensor scale (scalar) or per-row scales ([N]) to per-block scales [N, k_blocks].

    A per-tensor ternary scale simply repeats: MatMulNBits has no coarser granularity than a block.
    """
    _check_block_size(block_size)
    n_blocks = -(-k // block_size)
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == 0:
        return np.full((n_rows, n_blocks), scale, dtype=np.float32)
    if scale.shape == (n_rows,):
        return np.repeat(scale[:, None], n_blocks, axis=1)
    if scale.shape == (n_rows, n_blocks):
        return scale.copy()
    raise ValueError(f"scale shape {scale.shape} is neither scalar, ({n_rows},) nor ({n_rows}, {n_blocks})")


def expand_block_scales(scales: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Per-block scales [N, k_blocks] → per-element scales [N, K] (the last block may be partial)."""
    return np.repeat(np.asarray(scales, dtype=np.float32), block_size, axis=1)[:, :k]


def dequantize_blocks(w_int: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """Float32 weights [N, K] that a block-quantized (w_int, scales) stands for: the numpy reference."""
    w_int = np.asarray(w_int)
    return (w_int.astype(np.float32) * expand_block_scales(scales, w_int.shape[1], block_size)).astype(np.float32)


def int8_block_activations(x: np.ndarray, block_size: int) -> np.ndarray:
    """What MatMulNBits does to its input A with accuracy_level=4: int8 absmax per block of K.

    Each run of `block_size` values along the last axis becomes round(x / s) * s with
    s = max|x| / 127 (half-to-even rounding). A reference matmul of this with the dequantized
    weights matches the fast kernel to float32 rounding (~1e-7 relative).
    Note the model's BitLinear quantizes per token (all of K at once): close, not bit-identical.
    """
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-1]
    n_blocks = -(-k // block_size)
    flat = x.reshape(-1, k)
    padded = np.zeros((flat.shape[0], n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = flat
    blocks = padded.reshape(flat.shape[0], n_blocks, block_size)
    step = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), step, out=np.zeros_like(step), where=step > 0)
    quantized = np.clip(np.round(blocks * inverse), -127, 127) * step
    return quantized.reshape(flat.shape[0], -1)[:, :k].reshape(x.shape).astype(np.float32)


def _as_matrix(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {w.shape}")
    return w


def _pad_blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad K to whole blocks; also return how many real elements each block holds."""
    n, k = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=w.dtype)
    padded[:, :k] = w
    counts = np.full(n_blocks, block_size, dtype=np.float64)
    counts[-1] = k - (n_blocks - 1) * block_size if n_blocks else block_size
    return padded, counts


# --------------------------------------------------------------------------- operator layouts


class MatMulNBitsWeights(NamedTuple):
    """The constant inputs of one MatMulNBits node."""

    B: np.ndarray  # uint8 (N, k_blocks, block_size * bits // 8)
    scales: np.ndarray  # float32 (N * k_blocks,)
    zero_points: np.ndarray | None  # uint8 (N * ceil(k_blocks * bits / 8),), None: default 2**(bits-1)


def pack_matmul_nbits(w_int: np.ndarray, scales: np.ndarray, bits: int, block_size: int,
                      zero_point: int | None = None) -> MatMulNBitsWeights:
    """Lay out signed integer weights w_int (N out, K in) and scales (N, k_blocks) for MatMulNBits.

    `zero_point=None` (recommended) stores q = w + 2**(bits-1) and emits no zero-point tensor; an
    integer stores q = w + zero_point and returns the packed zero points (e.g. 1 for ternary, the
    native variant). Both dequantize exactly and both keep the fast kernel on ORT 1.32.
    """
    _check_bits(bits)
    _check_block_size(block_size)
    w_int = np.asarray(w_int)
    if w_int.ndim != 2 or not np.issubdtype(w_int.dtype, np.integer):
        raise ValueError(f"w_int must be an integer (N, K) matrix, got {w_int.dtype} of shape {w_int.shape}")
    n, k = w_int.shape
    n_blocks = -(-k // block_size)
    scales = np.asarray(scales, dtype=np.float32)
    if scales.shape != (n, n_blocks):
        raise ValueError(f"scales must be (N, k_blocks) = ({n}, {n_blocks}), got {scales.shape}")
    zp = default_zero_point(bits) if zero_point is None else int(zero_point)
    if not 0 <= zp < 1 << bits:
        raise ValueError(f"zero_point {zp} does not fit in {bits} bits")
    codes = np.asarray(w_int, dtype=np.int32) + zp
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"w_int + zero_point ({zp}) leaves [0, {(1 << bits) - 1}]: "
                         f"weights out of range for {bits} bits")
    padded = np.full((n, n_blocks * block_size), zp, dtype=np.uint8)  # padding dequantizes to 0
    padded[:, :k] = codes
    B = pack_bits(padded, bits).reshape(n, n_blocks, block_size * bits // 8)
    zero_points = None
    if zero_point is not None:
        per_byte = 8 // bits
        zp_codes = np.zeros((n, -(-n_blocks // per_byte) * per_byte), dtype=np.uint8)  # padding bits stay 0
        zp_codes[:, :n_blocks] = zp
        zero_points = pack_bits(zp_codes, bits).reshape(-1)
    return MatMulNBitsWeights(B, scales.reshape(-1).copy(), zero_points)


def pack_qmoe_experts(w_int: np.ndarray, scales: np.ndarray, bits: int,
                      block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lay out expert weights w_int (E, N out, K in) for QMoE: (uint8 (E, N, K*bits/8), float32 scales).

    q = w + 2**(bits-1) (QMoE's default zero point), lowest bits first along K. Without
    `block_size`, scales are per row (E, N) or per expert (E,), repeated over rows; with it, per
    block (E, N, K / block_size) or coarser ((E,), (E, N)), repeated over blocks. K must fill whole
    bytes (and whole blocks).
    """
    _check_bits(bits)
    w_int = np.asarray(w_int)
    if w_int.ndim != 3:
        raise ValueError(f"expert weights must be (E, N, K), got shape {w_int.shape}")
    _check_int_range(w_int, bits, "expert weights")
    e, n, k = w_int.shape
    if (k * bits) % 8:
        raise ValueError(f"K={k} with {bits}-bit codes does not fill whole bytes (QMoE needs byte-aligned rows)")
    scales = np.asarray(scales, dtype=np.float32)
    if scales.shape == (e,):
        scales = np.repeat(scales[:, None], n, axis=1)
    if block_size is None:
        if scales.shape != (e, n):
            raise ValueError(f"expert scales must be (E,) or (E, N) = ({e}, {n}) without block_size, "
                             f"got {scales.shape}")
        return pack_bits(w_int.astype(np.int32) + default_zero_point(bits), bits), scales.copy()
    _check_block_size(block_size)
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of block_size {block_size} (QMoE needs whole blocks)")
    if scales.shape == (e, n):
        scales = np.repeat(scales[:, :, None], k // block_size, axis=2)
    if scales.shape != (e, n, k // block_size):
        raise ValueError(f"expert scales must be (E, N, K/block_size) = ({e}, {n}, {k // block_size}), "
                         f"got {scales.shape}")
    packed = pack_bits(w_int.astype(np.int32) + default_zero_point(bits), bits)
    return packed, scales.copy()


def interleave_gate_up(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Rows g0, u0, g1, u1, ...: QMoE's fused-SwiGLU fc1 layout (swiglu_fusion=1), for weights or scales.

    Works on expert weights (E, I, K), row scales (E, I) and block scales (E, I, K/block).
    """
    gate, up = np.asarray(gate), np.asarray(up)
    if gate.shape != up.shape or gate.ndim < 2:
        raise ValueError(f"gate and up must have the same shape (E, I, ...), got {gate.shape} and {up.shape}")
    stacked = np.stack([gate, up], axis=2)
    return stacked.reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:])


def pack_gather_block_quantized(w_int: np.ndarray, scales: np.ndarray, bits: int,
                                block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay out an embedding table w_int (V, H) for GatherBlockQuantized (uint8 data, gather_axis=0).

    Returns (uint8 (V, H * bits / 8), float32 scales (V, H / block_size)); q = w + 2**(bits-1), the
    operator's default zero point for uint8 data. H must be a multiple of block_size.
    """
    _check_bits(bits)
    _check_block_size(block_size)
    w_int = np.asarray(w_int)
    if w_int.ndim != 2:
        raise ValueError(f"embedding table must be (V, H), got shape {w_int.shape}")
    _check_int_range(w_int, bits, "embedding table")
    v, h = w_int.shape
    if h % block_size:
        raise ValueError(f"hidden size {h} must be a multiple of block_size {block_size}")
    scales = np.asarray(scales, dtype=np.float32)
    if scales.shape != (v, h // block_size):
        raise ValueError(f"scales must be (V, H / block_size) = ({v}, {h // block_size}), got {scales.shape}")
    return pack_bits(w_int.astype(np.int32) + default_zero_point(bits), bits), scales.copy()
