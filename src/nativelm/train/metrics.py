"""Throughput, model FLOPs utilisation and the fixed metric names of a training run.

FLOPs per token follow the PaLM convention (Chowdhery et al. 2022, appendix B) with the
*active* parameters of a sparse model: ``6 · N + 12 · L · d_attn · ctx`` where

- N is the matmul parameters a token goes through: the non-embedding active parameters
  (attention, router, the top-k experts, norms) plus the LM head (d_model · vocab; an
  embedding lookup costs no FLOPs), so 6 · N is forward + backward;
- the attention term counts QK^T and AV (2 · 2 · ctx · d_attn per token and layer forward, ×3
  with the backward), with ctx = min(window, seq_len) on sliding-window layers and seq_len on
  global (NoPE) layers; not halved for the causal mask, as in PaLM and nanoGPT.

MFU = achieved FLOPs per second per GPU / the GPU's dense bf16 peak, CUDA only (a CPU has no
meaningful peak in the table, so `mfu` is not logged there).
"""

from __future__ import annotations

from typing import Any

import torch

# dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU, by a marker in the device name
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("H100 NVL", 835.0e12),
    ("H100 PCIE", 756.0e12),
    ("H100", 989.4e12),  # SXM / HBM3
    ("H800", 989.4e12),
    ("A100", 312.0e12),
    ("A800", 312.0e12),
    ("L40S", 362.0e12),
    ("A10G", 70.0e12),
    ("RTX 4090", 165.2e12),
)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its name (torch.cuda.get_device_name), None if unknown."""
    upper = device_name.upper()
    for marker, flops in PEAK_BF16_FLOPS:
        if marker in upper:
            return flops
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of a CUDA device; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a NativeLM (see the module docstring)."""
    p = model.params
    n = model.active_params(non_embedding=True) + p.d_model * model.vocab_size
    attn = 0
    for layer in range(p.n_layers):
        ctx = seq_len if (p.is_nope_layer(layer) or p.window <= 0) else min(p.window, seq_len)
        attn += 12 * p.layer_heads(layer) * p.head_dim * ctx
    return float(6 * n + attn)


def mfu(tokens_per_s: float, flops_token: float, peak: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1] per GPU, None without a known peak."""
    if not peak or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_token / (peak * max(1, world_size))


def layer_metric_names(n_layers: int, moe: bool = True) -> list[str]:
    """Per-layer model metrics logged at every log interval."""
    per = ("expert_load_cv", "router_entropy", "neuron_sparsity") if moe else ("neuron_sparsity",)
    return [f"layer{i}/{name}" for i in range(n_layers) for name in per]


TERNARY_NAMES = ("ternary/share_neg", "ternary/share_zero", "ternary/share_pos")
TRAIN_NAMES = ("train/loss", "train/ce_loss", "train/aux_loss", "lr", "grad_norm", "tokens_per_s",
               "step_time_s", "bits")
VAL_NAMES = ("val/loss", "val/perplexity")


def interval_metric_names(n_layers: int, *, moe: bool = True, quantize: bool = True, cuda: bool = False) -> list[str]:
    """Every metric name a log step carries (validation names only on validation steps): the same
    names every run, so MLflow compares runs."""
    names = [*TRAIN_NAMES, *VAL_NAMES, *layer_metric_names(n_layers, moe)]
    if quantize:
        names += TERNARY_NAMES
    if cuda:
        names.append("mfu")
    return sorted(names)


# keys of metrics/train.json (the DVC metrics file of the stage)
FINAL_NAMES = ("train_loss", "train_ce_loss", "val_loss", "val_perplexity", "tokens_per_s", "step_time_s",
               "neuron_sparsity", "expert_load_cv", "router_entropy", "total_params", "active_params",
               "non_embedding_params", "unigram_entropy_train", "unigram_entropy_val", "unigram_xent_val", "steps",
               "tokens", "wall_time_s", "bits")
