"""How a training run computes: the forward's autocast precision (with loss scaling for fp16) and
torch's CPU thread count (CPU runs are bit-for-bit reproducible at a fixed thread count)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nativelm.errors import NativelmError


@dataclass
class Precision:
    """How forward passes run: autocast dtype (None: fp32) and whether losses are scaled (fp16)."""

    name: str  # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """auto: bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU; fp16 needs CUDA."""
    if requested == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    else:
        name = requested
    if name == "fp16" and device.type != "cuda":
        raise NativelmError("train.precision fp16 needs a CUDA device (loss scaling); use fp32 or bf16 on CPU")
    return Precision(name, device.type)



@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Fix torch's intra-op thread count for the block (0: leave the default)."""
    if threads <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
