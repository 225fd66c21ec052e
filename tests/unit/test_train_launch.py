"""`nativelm train --nproc N`: a global batch that does not split is one line before anything starts, and a
failed job's line names the rank that caused it (not the ones the launcher stopped) and where to resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nativelm.cli import main
from nativelm.errors import ParamsError
from nativelm.train import checkpoint as ckpt
from nativelm.train.distributed import PEER_LOST_EXIT, is_peer_loss, peer_lost
from nativelm.train.launch import check_devices, failure_line, first_failure


def test_a_global_batch_that_does_not_split_is_one_line_and_starts_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"train: {{global_batch: 16, checkpoint_dir: {tmp_path / 'ck'}}}\n")
    assert main(["train", "--params", str(params), "--nproc", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("nativelm: error: train.global_batch 16 does not divide over 3 processes x grad_accum 1: "
                   "pick a multiple of 3")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ({0: -15, 1: -9}, (1, -9)),  # rank 1 was killed, the launcher stopped rank 0
        ({0: PEER_LOST_EXIT, 1: 2, 2: -15}, (1, 2)),  # rank 1 failed on its own
        ({0: -15, 1: -15}, (0, -15)),  # only stopped ones: the lowest rank
    ],
)
def test_the_failure_named_is_the_cause(codes: dict[int, int], expected: tuple[int, int]) -> None:
    assert first_failure({rank: SimpleNamespace(exitcode=code) for rank, code in codes.items()}) == expected


def test_the_line_names_the_signal_and_the_checkpoint(tmp_path: Path) -> None:
    assert failure_line(1, -9, 2, tmp_path) == ("train: rank 1 of 2 died (SIGKILL); the other processes were stopped; "
                                                "no checkpoint was written yet: the same command starts over")
    written = ckpt.save_checkpoint(tmp_path, 10, {"model": {"w": torch.zeros(1)}})
    line = failure_line(0, 2, 4, tmp_path)
    assert line == (f"train: rank 0 of 4 failed with exit code 2 (its error is above); the other processes were "
                    f"stopped; the last checkpoint is {written}: the same command resumes from it (train.resume: auto)")


def test_a_lost_peer_is_one_line_with_the_first_line_of_torchs_message() -> None:
    error = peer_lost(0, RuntimeError("Connection closed by peer [127.0.0.1]:1234\n  at frame ...\n  more"))
    assert error.exit_code == PEER_LOST_EXIT and "\n" not in str(error)
    assert str(error).startswith("train: rank 0 lost another process of the job (Connection closed by peer")
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:14245. This is "
                        "typically caused by a remote worker crashing.")
    assert is_peer_loss(gloo) and not is_peer_loss(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))


def test_more_processes_than_gpus_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # no GPU here: the CUDA device count is stubbed (a one-GPU machine)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_devices(1, "auto")
    check_devices(2, "cpu")  # gloo on the CPU: any count
    with pytest.raises(ParamsError, match=r"^--nproc 2 but 1 CUDA device\(s\) visible: DDP on CUDA takes one GPU"):
        check_devices(2, "cuda")


def test_forced_ddp_joins_a_group_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as torch_dist

    from nativelm.train.distributed import FORCE_DDP_ENV, init_distributed, shutdown, wrap_ddp
    from tests.conftest import free_port

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert not init_distributed("cpu").enabled  # a job of one process: no DDP unless forced
    monkeypatch.setenv(FORCE_DDP_ENV, "1")
    ctx = init_distributed("cpu")
    try:
        assert ctx.enabled and ctx.world_size == 1 and torch_dist.is_initialized()
        wrapped = wrap_ddp(torch.nn.Linear(2, 2), ctx, torch.device("cpu"))
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    finally:
        shutdown(ctx)
    assert not torch_dist.is_initialized()
