"""Parameters of the model: shapes, sparsity, quantization (the `model` section of params.yaml).

The field defaults are the ``tiny`` preset (trains on a 2-core CPU in minutes) of the
``smallthinker`` family. ``PRESETS`` holds named shapes (``tiny``, ``gpu``) that a training config
applies with :func:`with_preset`; ``model.family`` (`params/families.py`) names a set of knobs
filled in when the section is read. Order: preset < family < what params.yaml writes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from nativelm.errors import ParamsError
from nativelm.params.base import StrictModel
from nativelm.params.families import DEFAULT_FAMILY, FAMILY_KEYS, Family, family_knobs
from nativelm.params.layer_scaling import LayerScaling

TERNARY_BITS = 1.58
"""The weight bit width meaning "ternary" ({-1, 0, +1} · absmean scale, BitNet b1.58)."""


def check_bits(bits: float) -> float:
    """Return `bits` if it is a supported weight width (1.58 or a whole number 2..16), else raise."""
    if bits == TERNARY_BITS or (float(bits).is_integer() and 2 <= bits <= 16):
        return float(bits)
    raise ValueError(f"weight bits must be 1.58 (ternary) or a whole number from 2 to 16, got {bits}")


class ModelParams(StrictModel):
    """The whole `model` section: a sparse-MoE, 1.58-bit decoder-only transformer (or a dense family).

    Every dimension has an upper bound far beyond any model this project trains, so a typo'd size is
    one line here; whether a valid shape fits this machine's memory is `model.transformer.check_fits`.
    """

    # named set of the knobs below (params/families.py); a knob written here wins over its family
    family: Family = Field(DEFAULT_FAMILY, description="model family: smallthinker, bitnet, phi3 or openelm")

    # width of the residual stream (embedding size); head_dim = d_model / n_heads
    d_model: int = Field(256, ge=8, le=65536, description="width of the residual stream")
    # number of transformer blocks
    n_layers: int = Field(4, ge=1, le=1024, description="number of transformer blocks")
    # query heads of grouped-query attention; must divide d_model, head_dim must be even (RoPE)
    n_heads: int = Field(8, ge=1, le=1024, description="query heads (must divide d_model)")
    # key/value heads (GQA); must divide n_heads (n_heads == n_kv_heads is plain multi-head)
    n_kv_heads: int = Field(2, ge=1, le=1024, description="key/value heads (must divide n_heads)")
    # longest sequence (positions) the model is built for: size of the RoPE tables
    max_seq_len: int = Field(512, ge=1, le=1 << 20, description="longest sequence the model accepts")
    # RoPE base frequency
    rope_theta: float = Field(10000.0, gt=0.0, description="RoPE base frequency theta")
    # sliding window of the RoPE layers: query i sees keys j with i - window < j <= i; 0 = full causal
    window: int = Field(64, ge=0, le=1 << 20, description="sliding-window size of RoPE layers (0: full causal)")
    # every nope_every-th layer (layers with (i+1) % nope_every == 0) is a NoPE global causal layer; 0 = none
    nope_every: int = Field(4, ge=0, le=1024, description="one NoPE global-attention layer every this many (0: none)")

    # feed-forward kind: fine-grained mixture of ReGLU experts, or one dense ReGLU FFN
    ffn: Literal["moe", "dense"] = Field("moe", description="feed-forward kind: moe or dense")
    # number of (small) experts per MoE layer
    n_experts: int = Field(16, ge=1, le=4096, description="experts per MoE layer")
    # hidden width of each ReGLU expert
    expert_ffn: int = Field(128, ge=1, le=1 << 18, description="hidden width of one expert")
    # experts each token is routed to
    top_k: int = Field(2, ge=1, le=4096, description="experts per token (top-k routing)")
    # hidden width of the dense ReGLU FFN (ffn: dense); top_k * expert_ffn matches the MoE's active width
    dense_ffn: int = Field(256, ge=1, le=1 << 18, description="hidden width of the dense FFN (ffn: dense)")
    # gate activation of the dense FFN: relu (ReGLU, sparse hidden units) or silu (SwiGLU); experts are ReGLU
    ffn_act: Literal["reglu", "swiglu"] = Field("reglu", description="dense FFN: reglu or swiglu")
    # OpenELM layer-wise scaling of query heads and dense FFN widths (params/layer_scaling.py);
    # None or False: off, True: the OpenELM values (alpha 0.5 -> 1.0, beta 0.5 -> 4.0)
    layer_scaling: LayerScaling | Literal[False] | None = Field(
        None, description="per-layer query heads and dense FFN widths (OpenELM); null/false: off"
    )
    # the router reads the layer input before attention (True) or the post-attention state (False)
    pre_attention_routing: bool = Field(True, description="router reads the pre-attention layer input")
    # weight of the Switch-style load-balancing loss n_experts * sum_i f_i * P_i (mean over layers)
    router_aux_weight: float = Field(0.01, ge=0.0, description="load-balancing loss weight")
    # weight of the router z-loss mean(logsumexp(logits)^2) (mean over layers); 0 = off
    router_z_weight: float = Field(0.0, ge=0.0, description="router z-loss weight (0: off)")

    # BitLinear quantization on (ternary weights, 8-bit activations); False = full-precision baseline
    quantize: bool = Field(True, description="quantization-aware BitLinear layers (False: plain fp32 Linear)")
    # activation bits of BitLinear (per-token absmax)
    act_bits: int = Field(8, ge=2, le=16, description="activation bits (per-token absmax)")
    # RMSNorm (own learnable weight) in front of each BitLinear's activation quantizer
    bitlinear_norm: bool = Field(True, description="RMSNorm inside each BitLinear, before the quantizer")
    # experts' linears: "bitlinear" = full BitLinear (own RMSNorm + 8-bit activations + ternary
    # weights); "qmoe" = ternary weights only, fp activations, no inner norm: exactly what ORT
    # QMoE (expert_weight_bits=2) computes, so the export of the MoE is exact; "int8" = ternary
    # weights, expert inputs (x for gate and up, the ReGLU hidden h for down) quantized per row to
    # act_bits as BitLinear does, no inner norm: exactly nativelm's TernaryMoE at act_bits 8 (its
    # integer path), approximated by the contrib graph's QMoE (docs/kernels.md)
    expert_quant: Literal["bitlinear", "qmoe", "int8"] = Field(
        "qmoe", description="expert linears: full BitLinear, weight-only ternary (ORT QMoE-exact), or ternary "
                            "with per-row act_bits activations and no norm (TernaryMoE act_bits 8)"
    )
    # progressive precision: [[fraction_of_training, bits], ...], first at 0.0, fractions increasing;
    # bits are 1.58 (ternary) or whole numbers 2..16, e.g. [[0, 8], [0.25, 4], [0.5, 3], [0.75, 1.58]]
    bit_schedule: list[list[float]] = Field(
        [[0.0, TERNARY_BITS]], min_length=1, description="[[fraction_of_training, weight_bits], ...]"
    )
    # epsilon guarding the quantizer scales (absmean / absmax)
    quant_eps: float = Field(1e-5, gt=0.0, description="epsilon of the quantizer scales")
    # epsilon of every RMSNorm
    norm_eps: float = Field(1e-5, gt=0.0, description="RMSNorm epsilon")

    # the LM head shares the embedding matrix
    tie_embeddings: bool = Field(True, description="LM head shares the embedding matrix")
    # std of the normal init (output projections additionally scaled by 1/sqrt(2 * n_layers))
    init_std: float = Field(0.02, gt=0.0, description="std of the normal weight init")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_preset(cls, data: Any) -> Any:
        """A shape or family key written as null is not written: it takes the family's value, else
        (`with_preset`) the preset's. The family's knobs fill what is not written."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in NULLABLE_KEYS)}
            return {**family_knobs(data.get("family", DEFAULT_FAMILY)), **data}
        return data

    @field_validator("layer_scaling", mode="before")
    @classmethod
    def _true_is_openelm(cls, value: Any) -> Any:
        """`layer_scaling: true` is OpenELM's alpha and beta (the LayerScaling defaults); a mapping is
        validated here, so a bad one is one line about it, not one per member of the field's union."""
        if value is True:
            return LayerScaling()
        if not isinstance(value, dict):
            return value
        try:
            return LayerScaling.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{where}: {first['msg']}" if where else first["msg"].removeprefix("Value error, ")) from None

    @model_validator(mode="after")
    def _consistent(self) -> ModelParams:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.d_model // self.n_heads} must be even (RoPE)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed n_experts ({self.n_experts})")
        if self.ffn != "dense" and self.scaling is not None:
            raise ValueError("layer_scaling scales the dense FFN's width: it needs ffn: dense (or layer_scaling: false)")
        if self.ffn != "dense" and self.ffn_act != "reglu":
            raise ValueError(f"ffn_act {self.ffn_act} is for the dense FFN (ffn: dense); the MoE's experts are ReGLU, "
                             "write ffn_act: reglu with ffn: moe")
        self.schedule_stages()  # raises on a bad bit_schedule
        return self

    def schedule_stages(self) -> list[tuple[float, float]]:
        """`bit_schedule` as validated (fraction, bits) pairs."""
        stages: list[tuple[float, float]] = []
        for i, pair in enumerate(self.bit_schedule):
            if len(pair) != 2:
                raise ValueError(f"bit_schedule[{i}] must be [fraction_of_training, bits], got {pair}")
            frac, bits = float(pair[0]), float(pair[1])
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"bit_schedule[{i}]: fraction must be in [0, 1), got {frac}")
            try:
                check_bits(bits)
            except ValueError as exc:
                raise ValueError(f"bit_schedule[{i}]: {exc}") from None
            if i == 0 and frac != 0.0:
                raise ValueError(f"bit_schedule must start at fraction 0.0, got {frac}")
            if stages and frac <= stages[-1][0]:
                raise ValueError(f"bit_schedule fractions must increase, got {stages[-1][0]} then {frac}")
            stages.append((frac, bits))
        return stages

    @property
    def head_dim(self) -> int:
        """Width of one attention head (the same in every layer, also under layer scaling)."""
        return self.d_model // self.n_heads

    @property
    def scaling(self) -> LayerScaling | None:
        """The layer-wise scaling in force (None when off)."""
        return self.layer_scaling or None

    def layer_heads(self, layer: int) -> int:
        """Query heads of `layer` (n_heads unless layer scaling is on)."""
        s = self.scaling
        return self.n_heads if s is None else s.heads(layer, self.n_layers, self.n_heads, self.n_kv_heads)

    def layer_ffn(self, layer: int) -> int:
        """Hidden width of the dense FFN of `layer` (dense_ffn unless layer scaling is on)."""
        s = self.scaling
        return self.dense_ffn if s is None else s.width(layer, self.n_layers, self.d_model)

    def is_nope_layer(self, layer: int) -> bool:
        """True for the NoPE global-attention layers: (layer + 1) % nope_every == 0."""
        return self.nope_every > 0 and (layer + 1) % self.nope_every == 0


PRESETS: dict[str, dict[str, Any]] = {
    # vocab 4096: 8.02M total (1.05M tied embedding), 1.46M active non-embedding params per token.
    # About 0.9 s per step of 16 x 256 tokens on 2 CPU cores. Widths are multiples of 128 (hidden)
    # and 64 (expert) so ORT's fast 2-bit QMoE kernel applies to the export.
    "tiny": {
        "d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "max_seq_len": 512,
        "window": 64, "nope_every": 4, "ffn": "moe", "n_experts": 16, "expert_ffn": 128,
        "top_k": 2, "dense_ffn": 256, "expert_quant": "qmoe",
    },
    # SmallThinker ratios scaled down. vocab 4096: 362.8M total, 61.8M active non-embedding
    # (17% of 359.7M non-embedding); vocab 32000: 384.3M total, 86.4M active incl. embedding (22%)
    "gpu": {
        "d_model": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 4, "max_seq_len": 2048,
        "window": 512, "nope_every": 4, "ffn": "moe", "n_experts": 32, "expert_ffn": 384,
        "top_k": 4, "dense_ffn": 1536, "expert_quant": "qmoe",
    },
}


PRESET_KEYS = frozenset(key for shape in PRESETS.values() for key in shape)  # what a preset may set
NULLABLE_KEYS = PRESET_KEYS | FAMILY_KEYS  # null in params.yaml: the family's, else the preset's value


def _layered(shape: dict[str, Any], written: dict[str, Any]) -> dict[str, Any]:
    """A preset shape under what is written; the keys the family sets are the family's, not the preset's."""
    family = family_knobs(written.get("family", DEFAULT_FAMILY))
    return {**{k: v for k, v in shape.items() if k not in family}, **written}


def with_preset(model: ModelParams, preset: str) -> ModelParams:
    """The `model` section on top of a named preset shape: a value written in params.yaml always wins.

    "Written" is pydantic's ``model_fields_set``: the keys params.yaml (or an override) gave, even
    when a written value equals the tiny default, and the knobs the family filled in (a family wins
    over the preset). ``tiny`` is the field defaults, so it changes nothing.
    """
    if preset not in PRESETS:
        raise ParamsError(f"train.preset {preset!r} has no model preset (known: {', '.join(sorted(PRESETS))})")
    written = {name: getattr(model, name) for name in model.model_fields_set}
    try:
        return ModelParams.model_validate(_layered(PRESETS[preset], written))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ParamsError(f"model (family {model.family}, train.preset {preset}): {first['msg']}") from None


def preset_params(name: str, **overrides: Any) -> ModelParams:
    """ModelParams of a named preset, with `overrides` on top (validated like params.yaml)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return ModelParams.model_validate(_layered(PRESETS[name], overrides))
