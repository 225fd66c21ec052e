"""Parameters of the `export` stage (the `export` section of params.yaml).

The stage turns ``train.model_file`` into an ONNX folder (``out_dir``) that ONNX Runtime (and
onnxruntime-genai) runs on a board: ``model.onnx``, ``tokenizer.json``, ``genai_config.json`` and
``manifest.json``. ``variant`` picks how the weights are stored, so one checkpoint can be exported
three ways and compared (size, speed, quality); every variant is checked against the PyTorch model
with the same parity thresholds before it replaces the previous export. An export at a lower precision
than the model was trained in is post-training quantization (``ptq``): its held-out parity against the
model it came from is recorded, not gated (`nativelm.export.ptq`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nativelm.params.base import StrictModel

Variant = Literal["ternary", "ternary-ops", "fp32", "int4", "native"]
TERNARY_VARIANTS = ("ternary", "ternary-ops")  # the variants that store the ternary codes of the forward
EmbeddingBits = Literal[4, 8, 16, 32]

DEFAULT_GOLDEN_PROMPTS = (
    "To be, or not to be",
    "ROMEO.",
    "The king",
    "What light through yonder window",
)


class ExportParams(StrictModel):
    """The whole `export` section."""

    # ternary: 2-bit MatMulNBits + 2-bit QMoE (the native 1.58-bit model);
    # ternary-ops: nativelm's own TernaryMatMul / TernaryMoE operators (five trits per byte, exact),
    # written as model.nativelm.onnx beside the ternary graph (model.onnx), which stays as the fallback
    # for a board without the operator library;
    # fp32: plain MatMul everywhere, MoE as standard ONNX ops (dense, masked by the routing weights);
    # int4: 4-bit MatMulNBits + 4-bit QMoE, weights quantized symmetric per block;
    # native (the default): the precision the model was trained in (ternary for 1.58 / 2 bits, int4 for
    # 3-4 bits, fp32 for an fp model or 5+ bits; with ptq: true, ternary for any of them), a ternary one as
    # ternary-ops where nativelm's operators represent it and their library is on this machine, else as
    # ternary (`nativelm.export.ops_choice`); the manifest records the variant it resolved to and why
    variant: Variant = Field("native", description="how weights are stored: native (the training precision; "
                                                   "ternary-ops where it fits) | ternary | ternary-ops | fp32 | int4")
    # post-training quantization (PTQ): export a model at a lower precision than it was trained in as
    # ternary (an fp model, or one trained at 3+ bits: absmean ternary weights per matrix, 8-bit
    # per-token activations, as BitLinear computes; variant native then means ternary). false: such a
    # ternary export is refused (native exports such a model at its own precision). int4 of an fp
    # (or 5+-bit) model is PTQ too and needs no opt-in. A PTQ export is labelled ptq (manifest,
    # metrics, MLflow, release.json, registry) and its held-out parity against the model it came
    # from is recorded, not gated (the KV-cache check still is; so is the gate's)
    ptq: bool = Field(False, description="allow ternary post-training quantization of fp / 3+-bit models")
    # what fp32/int4 start from: forward = the weights the PyTorch forward multiplies with (ternary
    # codes x scale for quantized layers, the latent weights for `quantize: false`), so the export
    # computes the same function; latent = the full-precision master weights of a quantized model
    # (a post-training-quantization study: a ternary-trained model's latent weights are a different
    # model and usually fail parity)
    comparison_weights: Literal["forward", "latent"] = Field(
        "forward", description="fp32/int4 weights: forward (what PyTorch computes with) | latent (master weights)")
    # block of K sharing one scale (and one int8 activation scale at accuracy_level 4) in MatMulNBits;
    # 2-bit is fast only for 32/64/128 (128 fastest); ternary scales are per matrix, so it only sets
    # how finely activations are quantized
    block_size: int = Field(128, description="MatMulNBits block size (16..256, power of two; fast: 32/64/128)")
    # block size of QMoE expert weights; if the 2-bit fast-kernel rules (kernels.qmoe_is_fast) fail for it,
    # the exporter tries the other fast blocks, then 4-bit experts, then the exact slow path (recorded)
    moe_block_size: int = Field(64, description="QMoE expert block size (32/64/128; 2-bit needs min(d, ffn) >= 2x)")
    # MatMulNBits/QMoE accuracy_level: 4 = int8 activations per block (the fast 2- and 8-bit kernels);
    # 0 = float activations (2- and 8-bit weights then run on the slow generic kernel)
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="MatMulNBits accuracy level (4: int8 activations)")
    # LM head: 8 / 4 = MatMulNBits (symmetric per block), 16 = fp16 weights (cast to fp32 at load), 32 = fp32;
    # the fp32 variant always uses 32 (embedding too)
    lm_head_bits: EmbeddingBits = Field(8, description="LM head weight bits: 4 | 8 (MatMulNBits) | 16 | 32 (MatMul)")
    # embedding table: 8 / 4 = GatherBlockQuantized, 16 = fp16 Gather, 32 = fp32 Gather; a tied matrix
    # is quantized once per use (table and head are separate initializers)
    embed_bits: EmbeddingBits = Field(8, description="embedding bits: 4 | 8 (GatherBlockQuantized) | 16 | 32 (Gather)")
    # ai.onnx opset of the graph (23 is the first with RMSNormalization; ORT 1.32 knows up to 28)
    opset: int = Field(23, ge=23, le=28, description="ai.onnx opset (23..28)")
    # folder written as a whole: model.onnx, tokenizer.json, genai_config.json, manifest.json
    out_dir: str = Field("models/onnx", min_length=1, description="export folder (replaced atomically)")
    # JSON metrics of the stage (a DVC metrics file)
    metrics_file: str = Field("metrics/export.json", min_length=1, description="metrics JSON of the stage")
    # parity: share of held-out positions where ONNX and PyTorch predict the same next token, a near-tie
    # (top1_tie_rel) counting as the same
    min_top1_agreement: float = Field(0.99, ge=0.0, le=1.0, description="minimum top-1 agreement ONNX vs PyTorch")
    # parity: a position where ONNX picks another token than PyTorch still agrees when PyTorch's logit of
    # that token is within top1_tie_rel x max |logit| of its top one (0: exact agreement only). The
    # quantized kernels round activations per block where BitLinear does per token, which swaps such
    # near-ties more often in larger models
    top1_tie_rel: float = Field(1e-2, ge=0.0, le=0.5, description="near-tie margin of the top-1 agreement")
    # parity: |ppl_onnx - ppl_torch| / ppl_torch on the same held-out tokens
    max_ppl_rel_diff: float = Field(0.01, ge=0.0, description="maximum relative perplexity difference")
    # parity: KV-cache decoding vs full recomputation (ONNX both): max |logit difference| / max |logit|.
    # Not 1e-6: quantized activations round, so a last-bit difference upstream (another summation order
    # for one token than for a whole sequence) can move one activation by a quantization step
    max_cache_logit_rel_diff: float = Field(1e-2, gt=0.0, description="maximum relative logit drift with the KV cache")
    # decoding steps of the KV-cache check (after a 16-token validation prompt), capped by max_seq_len;
    # longer than model.window, so the sliding window is exercised through the cache
    cache_check_tokens: int = Field(96, ge=1, description="greedy steps of the KV-cache check")
    # held-out validation tokens compared (split into sequences of at most the model's max_seq_len)
    parity_tokens: int = Field(1024, ge=16, description="validation tokens of the parity check")
    # prompts whose greedy continuation is recorded for board health checks
    golden_prompts: list[str] = Field(list(DEFAULT_GOLDEN_PROMPTS), min_length=1,
                                      description="prompts of the golden continuations")
    # tokens generated (greedy, with the KV cache) per golden prompt; also the length of the cache check
    golden_tokens: int = Field(16, ge=1, le=4096, description="tokens of each golden continuation")
    # intra-op threads of the ONNX Runtime sessions of the stage (0: ORT's default)
    threads: int = Field(0, ge=0, le=1024, description="ONNX Runtime intra-op threads (0: default)")

    @model_validator(mode="after")
    def _consistent(self) -> ExportParams:
        for name in ("block_size", "moe_block_size"):
            value = getattr(self, name)
            if value < 16 or value > 256 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two from 16 to 256, got {value}")
        if any(not p.strip() for p in self.golden_prompts):
            raise ValueError("golden_prompts must not contain empty prompts")
        return self
