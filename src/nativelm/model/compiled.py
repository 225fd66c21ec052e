"""Compiled quantizer kernels, checked against eager: which functions run ``torch.compile``d.

`fused_call` runs a function through its ``torch.compile``d twin where `FUSE` asks for it. Each
compiled function is checked once per input signature against its eager version (outputs and
gradients, on the first real inputs); a compile failure or a mismatch falls back to eager for good.
The functions compiled are the BitLinear quantizers (:mod:`nativelm.model.bitlinear`) and the
experts' ReGLU (:mod:`nativelm.model.moe`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

FUSE = "auto"
"""Quantizer kernels: ``auto`` = the quantizers (weights; BitLinear's RMSNorm + activations) and the
experts' ReGLU run ``torch.compile``d on CUDA, a few fused kernels instead of about ten memory
passes each, and eagerly elsewhere (CPU stays bit-exact and deterministic); ``off`` = eager
everywhere; ``on`` = compiled on every device (tests). Same math either way. Each compiled
function is checked once against its eager version (forward and gradients, on the first real
inputs); a compile failure or a mismatch falls back to eager for good, with a note on stderr."""

RECOMPILE_LIMIT = 64
"""Compiled variants kept per function: one per weight shape and grad mode, and openelm's layers each
have their own widths (12 layers -> 24 variants); at dynamo's default of 8 the rest ran eagerly."""

_COMPILED: dict[str, Callable] = {}
_COMPILE_FAILED: set[str] = set()
_CHECKED: set[tuple] = set()


def fused_call(fn: Callable, cuda: bool, *args: Any) -> Any:
    """fn(*args), through its torch.compile'd twin where `FUSE` asks for it (`cuda`: the data is on CUDA)."""
    name = fn.__name__
    use = FUSE == "on" or (FUSE == "auto" and cuda)
    # inside a model-wide torch.compile the eager function is simply traced in place
    if not use or name in _COMPILE_FAILED or torch.compiler.is_compiling():
        return fn(*args)
    compiled = _COMPILED.get(name)
    if compiled is None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        compiled = _COMPILED[name] = torch.compile(fn, dynamic=None, options=_eager_numerics())
    try:
        key = (name, *_signature(args))
        if key not in _CHECKED:
            problem = _compare_compiled(fn, compiled, args)
            if problem:
                raise RuntimeError(f"compiled and eager versions differ: {problem}")
            _CHECKED.add(key)
        return compiled(*args)
    except Exception as exc:  # noqa: BLE001 - a missing toolchain or a compiler bug must not stop training
        _COMPILE_FAILED.add(name)
        print(f"nativelm.model.compiled: torch.compile of {name} unusable ({type(exc).__name__}: "
              f"{str(exc)[:300]}); using the eager version", file=sys.stderr, flush=True)
        return fn(*args)


def _flat(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [y for x in obj for y in _flat(x)]
    return [obj]


def _signature(args: tuple) -> list[Any]:
    """What tells one compiled variant from another: tensors' dtype, device, requires_grad; other values."""
    return [(a.dtype, a.device.type, a.requires_grad) if isinstance(a, Tensor) else a for a in _flat(args)]


def _leaves(obj: Any) -> Any:
    """A copy of the tensors of `obj` (nested lists) as fresh leaves, requiring grad where they did."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(_leaves(x) for x in obj)
    if isinstance(obj, Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad and obj.is_floating_point())
    return obj


def _compare_compiled(fn: Callable, compiled: Callable, args: tuple, tol: float = 2e-2) -> str:
    """'' when compiled(*args) matches fn(*args), outputs and gradients (random cotangents), else what differs."""
    with torch.inference_mode(False), torch.enable_grad():
        results = []
        for f in (fn, compiled):
            copies = _leaves(args)
            outs = [o for o in _flat(f(*copies)) if isinstance(o, Tensor)]
            inputs = [t for t in _flat(copies) if isinstance(t, Tensor) and t.requires_grad]
            diff = [o for o in outs if o.requires_grad]
            cot = []
            for o in diff:  # fixed cotangents, without touching the global RNG
                gen = torch.Generator(device=o.device).manual_seed(len(cot))
                cot.append(torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype))
            grads = torch.autograd.grad(diff, inputs, cot, allow_unused=True) if diff and inputs else []
            results.append(([o.detach() for o in outs], [g if g is not None else torch.zeros_like(t)
                                                         for g, t in zip(grads, inputs)]))
    (outs_e, grads_e), (outs_c, grads_c) = results

    def rel(a: Tensor, b: Tensor) -> float:
        a, b = a.double(), b.double()
        if not bool(torch.isfinite(a).all()):
            return math.inf
        return float((a - b).norm() / b.norm().clamp_min(1e-30)) if b.norm() > 0 else float(a.norm())

    if len(outs_e) != len(outs_c) or len(grads_e) != len(grads_c):
        return "different numbers of outputs or gradients"
    for i, (a, b) in enumerate(zip(outs_c, outs_e)):
        if a.shape != b.shape or a.dtype != b.dtype or rel(a, b) > tol:
            return f"output {i}"
    for i, (a, b) in enumerate(zip(grads_c, grads_e)):
        if rel(a, b) > tol:
            return f"gradient {i} (relative difference {rel(a, b):.3g})"
    return ""


def _eager_numerics() -> dict[str, bool]:
    """Inductor options that make compiled code round like eager PyTorch: IEEE division (Triton's `/`
    is approximate), so the compiled quantizer gives exactly the codes `weight_codes` (and the
    exporter) give, and intermediate casts to bf16 kept."""
    # imported here, not at the top: loading the inductor package adds seconds to every start, and
    # only a compile (CUDA, or FUSE = "on") needs it
    import torch._inductor.config as inductor_config

    options = {}
    if hasattr(inductor_config, "emulate_divison_rounding"):  # sic: the spelling up to PyTorch 2.11
        options["emulate_divison_rounding"] = True
    elif hasattr(getattr(inductor_config, "eager_numerics", None), "division_rounding"):  # later releases
        options["eager_numerics.division_rounding"] = True
    if hasattr(inductor_config, "emulate_precision_casts"):
        options["emulate_precision_casts"] = True
    return options
