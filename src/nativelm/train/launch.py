"""`nativelm train --nproc N`: start the DDP job from the command itself, and end it with one line.

The processes are started by torch.distributed's own launcher (the API behind `torchrun`, on
this host, rendezvous on a free local port, no restarts); each one runs `nativelm train` as
under `torchrun`, which keeps working as before (docs/training.md). When a process dies (a
SIGKILL, say), the launcher stops the others and this module turns the failure into one line:
which rank died and how, and the checkpoint the same command resumes from. The survivors see
the lost peer as a collective error; under this launcher they leave without a word
(`distributed.PEER_LOST_EXIT`), so the launcher's line is the only one.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from nativelm.errors import NativelmError, ParamsError
from nativelm.train import checkpoint as ckpt
from nativelm.train.distributed import LAUNCHED_ENV, PEER_LOST_EXIT


def _quiet_torch_launcher_logs() -> None:
    """The launcher logs every stop and failure as warnings with tracebacks; the one line replaces them."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def first_failure(failures: dict[int, object]) -> tuple[int, int]:
    """(rank, exit code) of the process that caused the stop: one killed by a signal other than the SIGTERM
    the launcher stops the others with, else one that failed on its own, else the lowest rank."""
    codes = {rank: int(getattr(f, "exitcode", 1)) for rank, f in failures.items()}
    stopped = -int(signal.SIGTERM)
    for wanted in (lambda c: c < 0 and c != stopped, lambda c: c > 0 and c != PEER_LOST_EXIT):
        picked = sorted(rank for rank, code in codes.items() if wanted(code))
        if picked:
            return picked[0], codes[picked[0]]
    rank = min(codes)
    return rank, codes[rank]


def failure_line(rank: int, code: int, nproc: int, checkpoint_dir: Path) -> str:
    """The one line a failed job ends with: who died, how, and where to resume."""
    if code < 0:
        try:
            how = f"died ({signal.Signals(-code).name})"
        except ValueError:
            how = f"died (signal {-code})"
    else:
        how = f"failed with exit code {code} (its error is above)"
    latest = ckpt.latest_checkpoint(checkpoint_dir)
    resume = (f"the last checkpoint is {latest}: the same command resumes from it (train.resume: auto)"
              if latest is not None else "no checkpoint was written yet: the same command starts over")
    return f"train: rank {rank} of {nproc} {how}; the other processes were stopped; {resume}"


def check_devices(nproc: int, device: str) -> None:
    """One process per GPU: more processes than visible CUDA devices is one line before anything starts
    (NCCL refuses two ranks on one device)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if nproc > count:
        raise ParamsError(f"--nproc {nproc} but {count} CUDA device(s) visible: DDP on CUDA takes one GPU per "
                          "process (train.device: cpu trains with gloo on the CPU)")


def launch_training(nproc: int, child_args: Sequence[str], checkpoint_dir: Path) -> int:
    """Run `python -m nativelm.cli <child_args>` as `nproc` DDP processes on this host; 0 when all finish,
    else a NativelmError with `failure_line` (its exit code the failed rank's, 1 for a signal)."""
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torch's launcher loggers read it when first imported
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    _quiet_torch_launcher_logs()
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"nativelm-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, start_method="spawn")
    os.environ[LAUNCHED_ENV] = "1"
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "nativelm.cli", *child_args)
    except ChildFailedError as exc:
        rank, code = first_failure(exc.failures)
        error = NativelmError(failure_line(rank, code, nproc, checkpoint_dir))
        error.exit_code = code if 0 < code < 128 and code != PEER_LOST_EXIT else 1
        raise error from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    return 0


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the processes a launcher started (Linux /proc: their parent and RANK); for the tests and
    the bench that kill one of them."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [int(item[5:]) for item in env if item.startswith(b"RANK=")]
        if parent == launcher_pid and ranks:
            found[ranks[0]] = int(entry.name)
    return found
