"""The decoder-only language model: pre-norm blocks of (GQA attention, MoE or dense ReGLU/SwiGLU FFN).

One block, with pre-attention routing (SmallThinker):

    h      = attn_norm(x)
    logits = router(h)                 # routing decided from the layer input, before attention
    x      = x + attention(h)
    x      = x + moe(ffn_norm(x), logits)

Each block quantizes all its weights (attention and experts) in one fused call per forward and
hands them to its layers. Embeddings and the LM head are plain (higher-precision) nn.Embedding /
nn.Linear, optionally tied. ``forward`` returns a :class:`ModelOutput` with the loss and cheap detached statistics.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nativelm.model.attention import Attention
from nativelm.model.bitlinear import (
    BitLinear,
    ExpertLinear,
    RMSNorm,
    compute_dtype,
    set_weight_bits,
)
from nativelm.model.quantizers import quantize_weight_groups
from nativelm.model.moe import DenseFFN, MoE, load_balancing_loss, z_loss
from nativelm.errors import ParamsError
from nativelm.fsutil import size_text
from nativelm.params.model import ModelParams


@dataclass
class ModelOutput:
    """What one forward pass returns.

    stats: one dict per layer of detached tensors. MoE layers: ``router_prob_mean`` (E,),
    ``expert_counts`` (E,) token-expert assignments, ``router_entropy`` (0-d, mean over tokens,
    nats), ``neuron_sparsity`` (0-d, share of exact zeros of the ReGLU hidden activation among
    the tokens routed to each expert); dense layers: ``neuron_sparsity`` only.
    """

    logits: Tensor  # (B, T, V)
    loss: Tensor | None = None  # ce_loss + aux_loss, None without targets
    ce_loss: Tensor | None = None  # mean cross-entropy over targets != -100
    aux_loss: Tensor | None = None  # router_aux_weight · lb_loss + router_z_weight · z_loss
    lb_loss: Tensor | None = None  # load-balancing loss, mean over MoE layers (unweighted)
    z_loss: Tensor | None = None  # router z-loss, mean over MoE layers (unweighted)
    stats: list[dict[str, Tensor]] = field(default_factory=list)


class Block(nn.Module):
    """Pre-norm transformer block; layer `index` decides RoPE+window vs NoPE."""

    def __init__(self, params: ModelParams, index: int) -> None:
        super().__init__()
        p = params
        self.index = index
        self.nope = p.is_nope_layer(index)
        self.pre_attention_routing = p.pre_attention_routing
        linear_kw = {"quantize": p.quantize, "norm": p.bitlinear_norm, "act_bits": p.act_bits,
                     "eps": p.quant_eps, "norm_eps": p.norm_eps}
        self.attn_norm = RMSNorm(p.d_model, p.norm_eps)
        self.attn = Attention(
            p.d_model, p.layer_heads(index), p.n_kv_heads, rope=not self.nope, window=0 if self.nope else p.window,
            max_seq_len=p.max_seq_len, rope_theta=p.rope_theta, linear_kwargs=linear_kw, head_dim=p.head_dim,
        )
        self.ffn_norm = RMSNorm(p.d_model, p.norm_eps)
        if p.ffn == "moe":
            expert_kw = dict(linear_kw)
            if p.expert_quant == "qmoe":
                expert_kw.update(norm=False, act_bits=None)
            elif p.expert_quant == "int8":
                expert_kw.update(norm=False, act_bits=p.act_bits)
            self.ffn: MoE | DenseFFN = MoE(p.d_model, p.n_experts, p.expert_ffn, p.top_k, expert_kw)
        else:
            self.ffn = DenseFFN(p.d_model, p.layer_ffn(index), linear_kw, p.ffn_act)
        self._quantized = [m for m in self.modules() if isinstance(m, (BitLinear, ExpertLinear)) and m.quantize]
        self._one_width = True

    def quantized_weights(self, dtype: torch.dtype) -> tuple[list[Tensor] | None, list[Tensor] | None]:
        """The quantized weights of the attention and the FFN, all in one fused call (None for a part
        that is not quantized, or when the parts' widths differ: each part then quantizes its own)."""
        layers = self._quantized
        if not layers or not self.one_width():
            return None, None
        attn, ffn = self.attn.quant_groups(), self.ffn.quant_groups()
        out = quantize_weight_groups(attn + ffn, layers[0].q_levels, layers[0].eps, dtype)
        return (out[: len(attn)] or None), (out[len(attn):] or None)

    def one_width(self) -> bool:
        """Whether every quantized layer of the block has the same width and eps. Eagerly checked each
        call; a compiled forward reads the answer `set_weight_bits` left (`_one_width`), because reading
        the widths themselves would make every switch of the schedule a recompile."""
        if torch.compiler.is_compiling():
            return self._one_width
        self._one_width = len({(m.weight_bits, m.eps) for m in self._quantized}) == 1
        return self._one_width

    def forward(self, x: Tensor, offset: int = 0) -> tuple[Tensor, dict[str, Tensor], Tensor | None, Tensor | None]:
        """x (B, T, d) -> (x, stats, lb_loss, z_loss); the losses are None for a dense FFN."""
        w_attn, w_ffn = self.quantized_weights(compute_dtype(x))
        h = self.attn_norm(x)
        moe = isinstance(self.ffn, MoE)
        logits = self.ffn.router(h) if (moe and self.pre_attention_routing) else None
        x = x + self.attn(h, offset, w_attn)
        h = self.ffn_norm(x)
        if not moe:
            y, stats = self.ffn(h, w_ffn)
            return x + y, stats, None, None
        if logits is None:
            logits = self.ffn.router(h)
        y, routing, stats = self.ffn(h, logits, w_ffn)
        return x + y, stats, load_balancing_loss(routing, self.ffn.n_experts), z_loss(routing)


class NativeLM(nn.Module):
    """Sparse-MoE, 1.58-bit decoder-only LM built from :class:`ModelParams`."""

    def __init__(self, params: ModelParams, vocab_size: int) -> None:
        super().__init__()
        self.params, self.vocab_size = params, vocab_size
        self.weight_bits = params.schedule_stages()[0][1]
        self.embed = nn.Embedding(vocab_size, params.d_model)
        self.blocks = nn.ModuleList(Block(params, i) for i in range(params.n_layers))
        self.norm = RMSNorm(params.d_model, params.norm_eps)
        self.lm_head = nn.Linear(params.d_model, vocab_size, bias=False)
        if params.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        set_weight_bits(self, self.weight_bits)

    # ---- init -------------------------------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Deterministic init: N(0, init_std) for every matrix, output projections (o_proj,
        expert/FFN down) scaled by 1/sqrt(2 · n_layers), norms to 1. Same generator state, same model."""
        std = self.params.init_std
        out_std = std / math.sqrt(2 * self.params.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():  # tied weights appear once
                if param.dim() == 1:
                    param.fill_(1.0)
                elif name.endswith(("o_proj.weight", "down.weight")):
                    nn.init.normal_(param, 0.0, out_std, generator=generator)
                else:
                    nn.init.normal_(param, 0.0, std, generator=generator)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, targets: Tensor | None = None, offset: int = 0) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V); with targets (B, T) (-100 = ignored) also the losses.

        `offset` shifts the absolute positions (RoPE) of the sequence.
        """
        x = self.embed(input_ids)
        stats: list[dict[str, Tensor]] = []
        lbs: list[Tensor] = []
        zs: list[Tensor] = []
        for block in self.blocks:
            x, s, lb, z = block(x, offset)
            stats.append(s)
            if lb is not None:
                lbs.append(lb)
                zs.append(z)
        logits = self.lm_head(self.norm(x))
        out = ModelOutput(logits=logits, stats=stats)
        if lbs:
            out.lb_loss = torch.stack(lbs).mean()
            out.z_loss = torch.stack(zs).mean()
        if targets is not None:
            p = self.params
            flat_logits = logits.float().reshape(-1, logits.shape[-1])
            out.ce_loss = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=-100)
            aux = logits.new_zeros((), dtype=torch.float32)
            if lbs:
                if p.router_aux_weight > 0:
                    aux = aux + p.router_aux_weight * out.lb_loss
                if p.router_z_weight > 0:
                    aux = aux + p.router_z_weight * out.z_loss
            out.aux_loss = aux
            out.loss = out.ce_loss + aux
        return out

    # ---- sizes ------------------------------------------------------------------------------
    def _embedding_params(self) -> int:
        n = self.embed.weight.numel()
        return n if self.params.tie_embeddings else n + self.lm_head.weight.numel()

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters (a tied matrix once); non_embedding=True leaves out embedding and LM head."""
        total = sum(p.numel() for p in self.parameters())
        return total - self._embedding_params() if non_embedding else total

    def active_params(self, non_embedding: bool = True) -> int:
        """Parameters used per token: everything except the n_experts - top_k unused experts of
        each MoE layer. By default without embedding and LM head (non_embedding=True)."""
        p = self.params
        total = self.num_params(non_embedding)
        if p.ffn != "moe":
            return total
        per_expert = self.blocks[0].ffn.expert_params()
        return total - p.n_layers * (p.n_experts - p.top_k) * per_expert

    @property
    def bits(self) -> float:
        """Current weight width (32.0 for the unquantized baseline)."""
        return self.weight_bits if self.params.quantize else 32.0


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), None where that cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_fits(params: ModelParams, vocab_size: int, available: int | None = None) -> int:
    """The bytes of the model's fp32 parameters; a ParamsError line when they exceed the available memory.

    Estimated from `param_counts` before anything is allocated: a model too large for the machine
    would otherwise fail inside torch's allocator (a traceback) or push the machine into swap.
    """
    needed = 4 * param_counts(params, vocab_size)["total"]
    available = available_memory() if available is None else available
    if available is not None and needed > available:
        raise ParamsError(f"model (d_model {params.d_model}, n_layers {params.n_layers}, vocabulary {vocab_size}): "
                          f"{size_text(needed)} of fp32 parameters, more than the {size_text(available)} of memory "
                          f"available; choose smaller dimensions")
    return needed


def build_model(params: ModelParams, vocab_size: int, seed: int | torch.Generator = 0) -> NativeLM:
    """The model of `params` for a vocabulary of `vocab_size`, initialised deterministically from `seed`."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    check_fits(params, vocab_size)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):  # building leaves the global RNG untouched
        model = NativeLM(params, vocab_size)
    model.reset_parameters(gen)
    return model


def param_counts(params: ModelParams, vocab_size: int) -> dict[str, int]:
    """Parameter counts of the model of `params` without building it (same as num_params / active_params).

    total: all (a tied matrix once); embedding: embedding + untied head; non_embedding = total - embedding;
    active: non-embedding parameters used per token (top_k of n_experts experts).
    """
    p = params
    d, hd = p.d_model, p.head_dim
    bl_norm = p.quantize and p.bitlinear_norm

    def lin(i: int, o: int, norm: bool = bl_norm) -> int:
        return i * o + (i if norm else 0)

    def layer(i: int) -> tuple[int, int]:  # (total, active) of layer i
        q = p.layer_heads(i) * hd
        attn = lin(d, q) + 2 * lin(d, p.n_kv_heads * hd) + lin(q, d) + 2 * d  # + attn_norm, ffn_norm
        if p.ffn == "moe":
            en = bl_norm and p.expert_quant == "bitlinear"
            expert = 2 * lin(d, p.expert_ffn, en) + lin(p.expert_ffn, d, en)
            return attn + d * p.n_experts + p.n_experts * expert, attn + d * p.n_experts + p.top_k * expert
        width = p.layer_ffn(i)
        dense = attn + 2 * lin(d, width) + lin(width, d)
        return dense, dense

    layers = [layer(i) for i in range(p.n_layers)]
    embedding = vocab_size * d * (1 if p.tie_embeddings else 2)
    non_emb = sum(t for t, _ in layers) + d
    active = sum(a for _, a in layers) + d
    return {"total": non_emb + embedding, "embedding": embedding, "non_embedding": non_emb, "active": active,
            "active_with_embedding": active + embedding}

