"""Turn a forward pass's statistics and the model's weights into flat metrics with stable names.

Names (the same every run, so MLflow compares runs):
- ``layer{i}/expert_load_cv``   coefficient of variation (std / mean) of the expert token counts
- ``layer{i}/router_entropy``   mean router entropy over tokens (nats; uniform = ln n_experts)
- ``layer{i}/neuron_sparsity``  share of exact zeros of the ReGLU hidden activation (active experts)
- ``ternary/share_neg``, ``ternary/share_zero``, ``ternary/share_pos``  over all quantized weights
- ``bits``                      current weight width (32 for the unquantized baseline)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nativelm.model.bitlinear import bitlinears
from nativelm.model.transformer import ModelOutput


def layer_metrics(output: ModelOutput) -> dict[str, float]:
    """Per-layer routing and sparsity metrics of one forward pass (dense layers: sparsity only)."""
    metrics: dict[str, float] = {}
    for i, s in enumerate(output.stats):
        if "expert_counts" in s:
            counts = s["expert_counts"].float()
            mean = counts.mean()
            cv = counts.std(unbiased=False) / mean if mean > 0 else torch.zeros(())
            metrics[f"layer{i}/expert_load_cv"] = float(cv)
            metrics[f"layer{i}/router_entropy"] = float(s["router_entropy"])
        if "neuron_sparsity" in s:
            metrics[f"layer{i}/neuron_sparsity"] = float(s["neuron_sparsity"])
    return metrics


@torch.no_grad()
def weight_code_shares(model: nn.Module) -> dict[str, float]:
    """Shares of negative / zero / positive weight codes over all quantized BitLinear weights
    (at the current width; exactly the ternary values at 1.58 bits). Empty when not quantized."""
    neg = zero = total = 0
    for m in bitlinears(model):
        if not m.quantize:
            continue
        codes, _ = m.weight_codes()
        neg += int((codes < 0).sum())
        zero += int((codes == 0).sum())
        total += codes.numel()
    if total == 0:
        return {}
    return {"ternary/share_neg": neg / total, "ternary/share_zero": zero / total,
            "ternary/share_pos": (total - neg - zero) / total}


def model_metrics(model: nn.Module) -> dict[str, float]:
    """``bits`` and the ternary code shares of `model`."""
    bits = getattr(model, "bits", None)
    out = {"bits": float(bits)} if bits is not None else {}
    out.update(weight_code_shares(model))
    return out


def flat_metrics(output: ModelOutput, model: nn.Module | None = None) -> dict[str, float]:
    """All metrics of one step: losses, per-layer metrics and (with `model`) weight metrics."""
    metrics: dict[str, float] = {}
    for name in ("loss", "ce_loss", "aux_loss", "lb_loss", "z_loss"):
        value = getattr(output, name)
        if value is not None:
            metrics[name] = float(value.detach())
    metrics.update(layer_metrics(output))
    if model is not None:
        metrics.update(model_metrics(model))
    return metrics


def expert_load_matrix(output: ModelOutput | list[ModelOutput]) -> Tensor:
    """Expert load (layers × experts): share of each layer's token-expert assignments per expert,
    summed over the given outputs. Rows sum to 1; empty (0, 0) for a dense model."""
    outputs = output if isinstance(output, list) else [output]
    rows: list[Tensor] | None = None
    for out in outputs:
        counts = [s["expert_counts"].float().cpu() for s in out.stats if "expert_counts" in s]
        rows = counts if rows is None else [a + b for a, b in zip(rows, counts)]
    if not rows:
        return torch.zeros(0, 0)
    mat = torch.stack(rows)
    return mat / mat.sum(1, keepdim=True).clamp_min(1)
