"""Grouped-query attention with RoPE + sliding window, or NoPE global causal attention.

Conventions match ONNX Runtime's ``GroupQueryAttention`` (docs/architecture.md, "The export"):
- query head h uses key/value head h // (n_heads / n_kv_heads);
- RoPE is the non-interleaved ("rotate half") form, ``rotary_interleaved=0``, with cos/sin
  tables of shape (max_seq_len, head_dim / 2);
- with a window w, query position i attends key positions j with i - w < j <= i
  (``local_window_size=w``: w keys, itself included); NoPE layers are full causal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nativelm.model.bitlinear import BitLinear, compute_dtype
from nativelm.model.quantizers import norm_quantize_many


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables of shape (max_seq_len, head_dim // 2), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on x (B, H, T, D) with cos/sin (T, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def attention_mask(
    q_len: int, k_len: int | None = None, window: int = 0, offset: int = 0, device: torch.device | None = None
) -> Tensor:
    """Boolean mask (q_len, k_len), True = may attend.

    Query row r sits at absolute position i = offset + r; key column j at position j
    (keys start at 0, so k_len defaults to offset + q_len). Allowed: j <= i and, when
    window > 0, i - window < j.
    """
    k_len = offset + q_len if k_len is None else k_len
    i = torch.arange(q_len, device=device)[:, None] + offset
    j = torch.arange(k_len, device=device)[None, :]
    allowed = j <= i
    if window > 0:
        allowed = allowed & (j > i - window)
    return allowed


class Attention(nn.Module):
    """GQA self-attention; `rope=False` makes it a NoPE layer, `window=0` full causal."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        *,
        rope: bool = True,
        window: int = 0,
        max_seq_len: int = 512,
        rope_theta: float = 10000.0,
        linear_kwargs: dict | None = None,
        head_dim: int | None = None,
    ) -> None:
        """`head_dim` defaults to d_model / n_heads; layer-wise scaling keeps the model's own instead."""
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.rope, self.window, self.max_seq_len = rope, window, max_seq_len
        kw = linear_kwargs or {}
        self.q_proj = BitLinear(d_model, n_heads * self.head_dim, **kw)
        self.k_proj = BitLinear(d_model, n_kv_heads * self.head_dim, **kw)
        self.v_proj = BitLinear(d_model, n_kv_heads * self.head_dim, **kw)
        self.o_proj = BitLinear(n_heads * self.head_dim, d_model, **kw)
        if rope:
            cos, sin = rope_tables(self.head_dim, max_seq_len, rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def extra_repr(self) -> str:
        kind = f"rope, window={self.window}" if self.rope else "nope (global)"
        return f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, {kind}"

    def quant_groups(self) -> list[list[Tensor]]:
        """Latent weights to quantize together (see ``Block``): q, k, v, o; empty when not quantized."""
        projs = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        return [[p.weight] for p in projs] if self.q_proj.quantize else []

    def _qkv(self, x: Tensor, weights: list[Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """The q, k, v projections of x. Quantized: the three inputs (each its own norm gain) come from
        one fused call that reads x once."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if not self.q_proj.quantize:
            return tuple(p(x) for p in projs)
        dtype = compute_dtype(x)
        q = projs[0]
        same = all(p.act_bits == q.act_bits and p.eps == q.eps and (p.norm is None) == (q.norm is None)
                   and (p.norm is None or p.norm.eps == q.norm.eps) for p in projs)
        if not same:
            return tuple(p(x, None if weights is None else w) for p, w in zip(projs, weights or (None,) * 3))
        inputs = norm_quantize_many(x, [p.gain for p in projs], q.norm.eps if q.norm is not None else 0.0,
                                    q.act_bits, q.eps, dtype)
        ws = weights[:3] if weights else [p.quantized_weight(dtype) for p in projs]
        return tuple(F.linear(i, w) for i, w in zip(inputs, ws))

    def forward(self, x: Tensor, offset: int = 0, weights: list[Tensor] | None = None) -> Tensor:
        """x (B, T, d_model) at absolute positions offset .. offset + T - 1 -> (B, T, d_model).

        `offset` only shifts the RoPE positions (no KV cache here: the sequence attends to itself).
        `weights`: the quantized q, k, v, o weights when the caller computed them (see ``Block``).
        """
        b, t, _ = x.shape
        if offset + t > self.max_seq_len:
            raise ValueError(f"sequence of {t} tokens at offset {offset} exceeds max_seq_len {self.max_seq_len}")
        q, k, v = self._qkv(x, weights)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = self.rope_cos[offset : offset + t], self.rope_sin[offset : offset + t]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.window > 0 and self.window < t:
            mask = attention_mask(t, t, self.window, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(y, weights[3] if weights else None)
