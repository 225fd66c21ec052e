"""Parameters of the `train` stage (the `train` section of params.yaml).

The size-dependent knobs (sequence length, batch, steps, learning rate, warmup, intervals) may
be left at ``null``: they then take the value of the chosen ``preset`` (``tiny``: a CPU run of
a few minutes, ``gpu``: a CUDA run). A value written in params.yaml always wins over the preset.
:meth:`TrainParams.resolved` returns the effective values; everything the stage does reads
those. The preset also picks the model's shape: every shape key of the ``model`` section that
params.yaml leaves out or null takes ``nativelm.params.model.PRESETS[preset]`` (see
``nativelm.params.model.with_preset``); a value written there always wins.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nativelm.errors import ParamsError
from nativelm.params.base import StrictModel

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "radam"]
Schedule = Literal["wsd", "cosine"]
Recipe = Literal["standard", "bitnet"]
DecayShape = Literal["linear", "sqrt", "cosine"]
Resume = Literal["auto", "off", "require"]
Device = Literal["auto", "cpu", "cuda"]
Compile = bool | Literal["auto"]
PresetName = Literal["tiny", "gpu"]

# fields a preset fills when params.yaml leaves them null
PRESET_FIELDS = ("seq_len", "batch_size", "grad_accum", "max_steps", "lr", "warmup_steps",
                 "log_interval", "eval_interval", "eval_batches", "checkpoint_interval")

TRAIN_PRESETS: dict[str, dict[str, int | float]] = {
    # 2-core CPU, ~1.3M-token corpus: whole stage in a few minutes, val loss well below unigram
    "tiny": {"seq_len": 128, "batch_size": 16, "grad_accum": 1, "max_steps": 400, "lr": 3e-3,
             "warmup_steps": 40, "log_interval": 10, "eval_interval": 100, "eval_batches": 8,
             "checkpoint_interval": 100},
    # one CUDA H100/H200 (bf16), with the model's `gpu` shape: tokens per step = 64 x 512 x grad_accum
    # x GPUs; 2000 steps = 65M tokens, meant for a corpus of tens of millions of tokens (on the
    # default 1.5M-token corpus about 300 steps is already 6 epochs)
    "gpu": {"seq_len": 512, "batch_size": 64, "grad_accum": 1, "max_steps": 2000, "lr": 2e-3,
            "warmup_steps": 200, "log_interval": 25, "eval_interval": 200, "eval_batches": 32,
            "checkpoint_interval": 500},
}


class TrainParams(StrictModel):
    """The whole `train` section."""

    preset: PresetName = Field(
        "tiny", description="training preset filling every size knob left null: tiny (CPU, minutes) | gpu (CUDA)")
    seq_len: int | None = Field(
        None, ge=8, le=65536, description="tokens per training sequence (null: preset; tiny 128, gpu 512)")
    batch_size: int | None = Field(
        None, ge=1, le=65536, description="sequences per micro-batch on each process (null: preset; tiny 16, gpu 64; "
                                          "with global_batch set: global_batch / (grad_accum x processes))")
    global_batch: int | None = Field(
        None, ge=1, le=1 << 24, description="sequences per optimizer step over all processes, the same whatever the "
                                            "process count (null: batch_size x grad_accum x processes); needs "
                                            "batch_size null and must divide by grad_accum x processes")
    grad_accum: int | None = Field(
        None, ge=1, le=4096, description="micro-batches accumulated per optimizer step (null: preset; 1)")
    max_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="optimizer steps of the whole run (null: preset; tiny 400, gpu 2000)")
    lr: float | None = Field(
        None, gt=0.0, le=1.0, description="peak learning rate (null: preset; tiny 0.003, gpu 0.002)")
    warmup_steps: int | None = Field(
        None, ge=0, description="linear warmup steps from 0 to the peak rate (null: preset; tiny 40, gpu 200)")
    log_interval: int | None = Field(
        None, ge=1, description="steps between logged training metrics (null: preset; tiny 10, gpu 25)")
    eval_interval: int | None = Field(
        None, ge=1, description="steps between validation passes; the last step is always validated "
                                "(null: preset; tiny 100, gpu 200)")
    eval_batches: int | None = Field(
        None, ge=1, le=100_000, description="fixed validation batches per validation pass, each of "
                                            "batch_size x processes sequences (null: preset; tiny 8, gpu 32)")
    checkpoint_interval: int | None = Field(
        None, ge=1, description="steps between checkpoints; the last step always writes one "
                                "(null: preset; tiny 100, gpu 500)")

    schedule: Schedule = Field(
        "wsd", description="learning-rate schedule: wsd (warmup, stable, decay) | cosine (warmup, cosine decay)")
    decay_frac: float = Field(
        0.2, gt=0.0, le=1.0, description="wsd: share of max_steps spent in the final decay")
    decay_shape: DecayShape = Field(
        "linear", description="wsd: shape of the final decay: linear | sqrt (1-sqrt) | cosine")
    min_lr_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="learning rate at the last step, as a fraction of lr")
    recipe: Recipe = Field(
        "standard", description="standard: the schedule and weight decay as set | bitnet: BitNet b1.58's two "
                                "stages, the learning rate cut to recipe_lr_drop x at recipe_split and weight "
                                "decay off from there (docs/training.md)")
    recipe_split: float = Field(
        0.5, gt=0.0, lt=1.0, description="bitnet recipe: share of max_steps after which the second stage starts")
    recipe_lr_drop: float = Field(
        0.5, gt=0.0, le=1.0, description="bitnet recipe: the second stage's learning rate, as a fraction of the "
                                         "schedule's")
    optimizer: Optimizer = Field(
        "adamw", description="adamw | radam (both with decoupled weight decay)")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1 (first-moment decay)")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="Adam beta2 (second-moment decay)")
    eps: float = Field(1e-8, gt=0.0, le=1.0, description="Adam epsilon")
    weight_decay: float = Field(
        0.1, ge=0.0, le=10.0, description="decoupled weight decay on matrices (>= 2-D weights except embeddings); "
                                          "never on norms, biases or embeddings")
    grad_clip: float = Field(
        1.0, ge=0.0, description="clip the global gradient L2 norm to this value (0: no clipping)")

    precision: Precision = Field(
        "auto", description="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast) | fp16 (CUDA, loss scaling)")
    device: Device = Field("auto", description="auto (CUDA when available) | cpu | cuda")
    compile: Compile = Field(
        "auto", description="torch.compile the model: auto (on CUDA for dense models; a MoE stays eager: its compiled "
                            "gradients were seen wrong, docs/training.md; off on CPU, which stays bit-exact) | true | false")
    threads: int = Field(
        0, ge=0, le=1024, description="CPU threads for torch (0: torch's default); fixed for bit-exact CPU runs")

    resume: Resume = Field(
        "auto", description="auto: continue from the latest checkpoint made with the same settings, else start "
                            "fresh | off: always start fresh | require: fail without such a checkpoint")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="how many of the latest checkpoints to keep")
    progress: bool = Field(True, description="show a progress bar on stderr")

    checkpoint_dir: str = Field(
        "checkpoints", min_length=1, description="folder of periodic checkpoints and the `latest` pointer")
    model_file: str = Field(
        "models/model.pt", min_length=1, description="the trained model: weights, model section, vocabulary size")
    metrics_file: str = Field(
        "metrics/train.json", min_length=1, description="final metrics of the stage (a DVC metrics file)")
    plots_dir: str = Field(
        "plots/train", min_length=1, description="loss curve and expert-load heatmap PNGs")

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        r = self.resolved()
        if r.warmup_steps >= r.max_steps:
            raise ValueError(f"warmup_steps ({r.warmup_steps}) must be smaller than max_steps ({r.max_steps})")
        if self.schedule == "wsd":
            decay = wsd_decay_steps(r.max_steps, self.decay_frac)
            if r.warmup_steps + decay > r.max_steps:
                raise ValueError(f"warmup_steps ({r.warmup_steps}) + decay steps ({decay} = decay_frac "
                                 f"{self.decay_frac} x max_steps) exceed max_steps ({r.max_steps})")
        if self.global_batch is not None:
            if self.batch_size is not None:
                raise ValueError(f"set batch_size ({self.batch_size}) or global_batch ({self.global_batch}), not both: "
                                 "with global_batch each process's batch is global_batch / (grad_accum x processes)")
            if self.global_batch % r.grad_accum:
                raise ValueError(f"global_batch ({self.global_batch}) does not divide by grad_accum ({r.grad_accum})")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("precision fp16 needs CUDA (loss scaling); use fp32 or bf16 on CPU")
        return self

    def resolved(self) -> ResolvedTrain:
        """The effective values: every null size knob replaced by the preset's value."""
        base = TRAIN_PRESETS[self.preset]
        values = {name: (getattr(self, name) if getattr(self, name) is not None else base[name])
                  for name in PRESET_FIELDS}
        values["lr"] = float(values["lr"])
        if self.global_batch is not None:  # one process; ResolvedTrain.for_processes splits it over N
            values["batch_size"] = max(1, self.global_batch // values["grad_accum"])
        return ResolvedTrain(**values, **{k: getattr(self, k) for k in type(self).model_fields
                                          if k not in PRESET_FIELDS and k != "preset"}, preset=self.preset)


class ResolvedTrain(StrictModel):
    """TrainParams with every preset knob filled in (what the stage runs with)."""

    preset: PresetName
    seq_len: int
    batch_size: int
    grad_accum: int
    max_steps: int
    lr: float
    warmup_steps: int
    log_interval: int
    eval_interval: int
    eval_batches: int
    checkpoint_interval: int
    schedule: Schedule
    decay_frac: float
    decay_shape: DecayShape
    min_lr_ratio: float
    recipe: Recipe
    recipe_split: float
    recipe_lr_drop: float
    optimizer: Optimizer
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip: float
    precision: Precision
    device: Device
    compile: Compile
    threads: int
    resume: Resume
    keep_checkpoints: int
    progress: bool
    checkpoint_dir: str
    model_file: str
    metrics_file: str
    plots_dir: str
    # left out of dumps: the resolved batch_size carries its effect, and the keys of earlier results
    # (study rows, MLflow params) stay what they were
    global_batch: int | None = Field(None, exclude=True)

    def for_processes(self, world_size: int) -> ResolvedTrain:
        """These settings for a job of `world_size` processes: with global_batch set, each process's batch_size is
        its share (one clear line when it does not divide); without it, batch_size is per process as written."""
        if self.global_batch is None or world_size == 1:
            return self
        share, left = divmod(self.global_batch, self.grad_accum * world_size)
        if left or share == 0:
            raise ParamsError(f"train.global_batch {self.global_batch} does not divide over {world_size} processes x "
                              f"grad_accum {self.grad_accum}: pick a multiple of {self.grad_accum * world_size}")
        return self.model_copy(update={"batch_size": share})


def recipe_split_step(max_steps: int, split: float) -> int:
    """First optimizer step of the bitnet recipe's second stage (within 1 .. max_steps - 1)."""
    return min(max_steps - 1, max(1, round(max_steps * split)))


def wsd_decay_steps(max_steps: int, decay_frac: float) -> int:
    """Steps of the final decay of a warmup-stable-decay schedule (at least one)."""
    return max(1, round(max_steps * decay_frac))
