"""numpy reference of the `nativelm` custom operators (TernaryMatMul, TernaryMoE; docs/kernels.md).

What the C kernels must compute, written plainly: the tests hold the library to it (integer
paths bit for bit) and the exporter checks its graphs against it. Controller and test side only (a
board runs the C library). fp32 throughout, in the order the kernels use, so results are
reproducible: y = (acc · s_x) · s_w.
"""

from __future__ import annotations

import numpy as np

from nativelm.formats.ternary_pack import unpack_ternary

F32 = np.float32


def rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) · gain per row, fp32 (the mean accumulated in fp64, as the kernel does)."""
    x = np.asarray(x, F32)
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True).astype(F32)
    return (x / np.sqrt(ms + F32(eps))) * np.asarray(gain, F32)


def quantize_rows(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """BitLinear's per-row absmax int8: codes q (int32) and scales s_x (..., 1), fp32."""
    x = np.asarray(x, F32)
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True), F32(eps)) / F32(127)
    return np.clip(np.rint(x / s), -128, 127).astype(np.int32), s.astype(F32)


def ternary_matmul(x: np.ndarray, w_packed: np.ndarray, scale: float, K: int, act_bits: int = 8,
                   gain: np.ndarray | None = None, act_eps: float = 1e-5, norm_eps: float = 1e-5) -> np.ndarray:
    """TernaryMatMul: x (..., K) float, w_packed (N, packed_row_bytes(K)) -> (..., N) float32."""
    x = np.asarray(x, F32)
    t = unpack_ternary(w_packed, K).astype(np.int32)  # (N, K)
    if gain is not None:
        x = rms_norm(x, gain, norm_eps)
    s_w = F32(scale)
    if act_bits == 8:
        q, s_x = quantize_rows(x, act_eps)
        acc = q @ t.T  # exact: int32 (|acc| <= 128 · K)
        return (acc.astype(F32) * s_x) * s_w
    if act_bits == 0:
        return (x.astype(np.float64) @ t.T.astype(np.float64)).astype(F32) * s_w
    raise ValueError(f"TernaryMatMul: act_bits must be 8 or 0, got {act_bits}")


def route(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all experts, the top_k (ties: lower index first), renormalised: (experts, weights) (M, k)."""
    lg = np.asarray(logits, F32)
    p = np.exp(lg - lg.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    experts = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, experts, axis=-1)
    return experts, (w / w.sum(axis=-1, keepdims=True)).astype(F32)


def ternary_moe(x: np.ndarray, logits: np.ndarray, w_gate: np.ndarray, s_gate: np.ndarray, w_up: np.ndarray,
                s_up: np.ndarray, w_down: np.ndarray, s_down: np.ndarray, top_k: int, act_bits: int = 0,
                act_eps: float = 1e-5) -> np.ndarray:
    """TernaryMoE: rows x (M, d), router logits (M, E), packed ReGLU experts -> (M, d) float32."""
    x = np.asarray(x, F32)
    d = x.shape[-1]
    hidden = w_gate.shape[1]
    experts, weights = route(logits, top_k)
    y = np.zeros_like(x)
    for m in range(x.shape[0]):
        for e, wk in zip(experts[m], weights[m]):
            row = x[m:m + 1]
            g = ternary_matmul(row, w_gate[e], s_gate[e], d, act_bits, act_eps=act_eps)
            u = ternary_matmul(row, w_up[e], s_up[e], d, act_bits, act_eps=act_eps)
            h = np.maximum(g, F32(0)) * u
            y[m] += wk * ternary_matmul(h, w_down[e], s_down[e], hidden, act_bits, act_eps=act_eps)[0]
    return y
