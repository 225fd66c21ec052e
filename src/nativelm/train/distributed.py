"""Distributed data parallel under `nativelm train --nproc N` or `torchrun`: process group, rank-0 duties.

`torchrun --nproc_per_node=N -m nativelm.cli train` (or the launcher of `train/launch.py`) sets
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them and joins
the group (NCCL on CUDA, gloo on CPU). Without them it returns a single-process context and
nothing changes. Each rank reads its slice of one global micro-batch (`data.BatchSampler`),
gradients are averaged by DDP, and only rank 0 logs, writes checkpoints, the model file, metrics
and plots. A process that loses a peer mid-run (it died) ends with one line (`PeerLost`), not a
traceback or a hang (docs/training.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nativelm.errors import NativelmError


# set by `nativelm train --nproc N` (train/launch.py) for its processes; a survivor of a lost peer then
# exits with PEER_LOST_EXIT and no line of its own, and the launcher names the rank that died
LAUNCHED_ENV = "NATIVELM_LAUNCHED"
PEER_LOST_EXIT = 3
# NATIVELM_DDP=1: a job of one process still joins a process group and trains under DDP (NCCL on one GPU),
# so DDP's own cost shows against a plain run (bench/ddp_scaling.py --ddp-one)
FORCE_DDP_ENV = "NATIVELM_DDP"
GLOO_SETTLE_S = 0.2  # `shutdown`: time for gloo's worker to free the last collectives


class PeerLost(NativelmError):
    """A collective failed because another process of the job is gone."""

    exit_code = PEER_LOST_EXIT


# what gloo's and NCCL's errors say when the other end of a collective is gone (gloo raises plain RuntimeErrors)
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote worker",
              "nccl communicator was aborted", "socket closed", "timed out")


def is_peer_loss(exc: BaseException) -> bool:
    """True for the error a collective raises when another process of the job died (not, say, an OOM)."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(m in text for m in _PEER_GONE))


def peer_lost(rank: int, exc: BaseException) -> PeerLost:
    """The one-line error of a rank whose collective broke off (the first line of torch's message)."""
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return PeerLost(f"train: rank {rank} lost another process of the job ({first}); resume from the last "
                    "checkpoint with the same command (train.resume: auto)")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    ddp: bool = False  # joined a process group (always when world_size > 1)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.ddp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ddp_forced() -> bool:
    """NATIVELM_DDP=1: DDP even for one process (`FORCE_DDP_ENV`)."""
    return os.environ.get(FORCE_DDP_ENV) == "1"


def launched_by_torchrun() -> bool:
    """True when the environment names a multi-process job (torchrun / torch.distributed.launch), or a job
    of one process with DDP forced."""
    return (all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
            and (int(os.environ["WORLD_SIZE"]) > 1 or ddp_forced()))


def env_rank() -> int:
    """This process's global rank from the environment (0 outside torchrun), readable before any
    process group exists: the CLI opens the MLflow run only where it is 0."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def init_distributed(device_type: str) -> DistContext:
    """Join the process group described by the environment, or return a single-process context."""
    if not launched_by_torchrun():
        return DistContext()
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise NativelmError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices visible")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend}
        if device_type == "cuda":
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(**kwargs)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, backend=backend, ddp=True)


def shutdown(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group: after a final barrier when the run ended well, at once after an error
    (a barrier with a dead peer would fail again or wait for the timeout).

    After the barrier this thread lets go of the GIL for a moment: gloo's worker thread still frees the
    barrier's work (and the collectives before it), which takes the GIL; had this thread gone on to free
    the group (or DDP's reducer, its last owner), that destructor would join the worker while holding
    the GIL, and the process would hang at its end (seen here on a 2-process run)."""
    if ctx.enabled and dist.is_initialized():
        if clean:
            dist.barrier()
            time.sleep(GLOO_SETTLE_S)
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place; returned for convenience)."""
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_mean(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks."""
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= ctx.world_size
    return values


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DDP around the model when distributed. Every parameter gets a gradient each step (a layer's
    experts are stacked matrices applied by grouped matmuls: an expert without tokens gets exact zeros,
    not no gradient), so DDP need not search the autograd graph for unused parameters after each
    backward (with that search, DDP at world size 1 ran at 0.82x the plain step: gpu preset, one H200,
    docs/training.md)."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
