"""Real processes on CPU (gloo): a checkpoint written by 2 DDP processes resumes on 1 (the same state, a
close curve) and on 2 (bit-identical), one process with batch 16 and two with global_batch 16 score the
same validation loss, and a SIGKILLed rank under `nativelm train --nproc 2` ends the job with one line
and a checkpoint the same command resumes (docs/training.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nativelm.train.launch import rank_pids
from tests.conftest import free_port
from tests.integration.test_train_resume import _env, _spec
from tests.unit.test_train_data import write_token_data

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DRIVER = '''
import json, os, sys
from pathlib import Path
import torch
from nativelm.model import ModelParams
from nativelm.params.train import TrainParams
from nativelm.train.stage import TrainOutputs, run_train

spec = json.loads(Path(sys.argv[1]).read_text())
train = TrainParams.model_validate(spec["train"])
result = run_train(ModelParams(**spec["model"]), train, 1234, Path(spec["data"]["out_dir"]), TrainOutputs.of(train),
                   stop_after=spec.get("stop_after"))
torch.save(result.model.state_dict(), Path(sys.argv[2]) / f"rank{os.environ.get('RANK', '0')}.pt")
'''

SHORT = {"max_steps": 8, "warmup_steps": 1, "log_interval": 1, "eval_interval": 4, "checkpoint_interval": 4,
         "keep_checkpoints": 3, "device": "cpu", "batch_size": None, "global_batch": 16}


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_data(tmp_path_factory.mktemp("tokens") / "prepared")


def _ddp_spec(folder: Path, token_dir: Path, stop_after: int | None = None, **train: object) -> Path:
    """test_train_resume's spec and a driver that also stops after `stop_after` steps and saves every rank's
    weights."""
    path = _spec(folder, token_dir, **train)
    path.write_text(json.dumps({**json.loads(path.read_text()), "stop_after": stop_after}))
    (folder / "driver.py").write_text(DRIVER)
    return path


def _torchrun(folder: Path, spec: Path, nproc: int) -> subprocess.CompletedProcess:
    """The test driver of test_train_resume under torchrun (nproc > 1) or as one plain process."""
    ranks = folder / "ranks"
    ranks.mkdir(exist_ok=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 f"--master_port={free_port()}", "--master_addr=127.0.0.1"] if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, str(folder / "driver.py"), str(spec), str(ranks)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _as_if_killed_at(source: Path, folder: Path, step: int) -> None:
    """`folder`'s checkpoints: those of `source` up to `step`, as a run killed right after it leaves them."""
    (folder / "checkpoints").mkdir(parents=True)
    for path in (source / "checkpoints").glob("step_*.pt"):
        if int(path.stem.split("_")[1]) <= step:
            shutil.copy(path, folder / "checkpoints" / path.name)


def _val_losses(folder: Path) -> list[float]:
    checkpoint = sorted((folder / "checkpoints").glob("step_*.pt"))[-1]
    history = torch.load(checkpoint, weights_only=True)["history"]
    return [row["val/loss"] for row in history if "val/loss" in row]


def test_two_process_checkpoint_resumes_on_one_and_on_two(token_dir: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight2"
    _torchrun(straight, _ddp_spec(straight, token_dir, **SHORT), 2)
    one = tmp_path / "straight1"
    _torchrun(one, _ddp_spec(one, token_dir, **SHORT), 1)
    # the same global batch: the same windows, so the same validation losses up to rounding
    two_curve, one_curve = _val_losses(straight), _val_losses(one)
    assert len(two_curve) == len(one_curve) == 2
    assert max(abs(a - b) for a, b in zip(two_curve, one_curve, strict=True)) < 2e-3

    final = torch.load(straight / "model.pt", weights_only=True)["state_dict"]
    at_4 = torch.load(straight / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert at_4["world_size"] == 2

    same = tmp_path / "resumed2"
    _as_if_killed_at(straight, same, 4)
    proc = _torchrun(same, _ddp_spec(same, token_dir, **SHORT), 2)
    assert "resumed from" in proc.stderr and "resumed on" not in proc.stderr
    resumed = torch.load(same / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], resumed[k]) for k in final)  # bit-identical on the same process count

    fewer = tmp_path / "resumed1"
    _as_if_killed_at(straight, fewer, 4)
    proc = _torchrun(fewer, _ddp_spec(fewer, token_dir, stop_after=4, **SHORT), 1)
    assert "checkpoint written by 2 process(es), resumed on 1" in proc.stderr
    assert "not bit-identical" in proc.stderr and "(step 4)" in proc.stderr
    restored = torch.load(fewer / "ranks" / "rank0.pt", weights_only=True)
    assert all(torch.equal(at_4["model"][k], restored[k]) for k in restored)  # the state of the resume point
    proc = _torchrun(fewer, _ddp_spec(fewer, token_dir, **SHORT), 1)
    carried_on = torch.load(fewer / "model.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(at_4["model"][k], carried_on[k]) for k in carried_on)
    metrics = [json.loads((d / "train.json").read_text()) for d in (straight, fewer)]
    assert metrics[1]["steps"] == 8 and metrics[1]["tokens"] == metrics[0]["tokens"]
    assert abs(metrics[0]["val_loss"] - metrics[1]["val_loss"]) < 2e-3


def _project(folder: Path, token_dir: Path, **train: object) -> Path:
    """A project folder whose params.yaml trains the small MoE of `_spec` on `token_dir`, tracking off."""
    spec = json.loads(_spec(folder, token_dir, **train).read_text())
    params = {"tracking": {"uri": "off"}, "data": {"out_dir": spec["data"]["out_dir"]}, "model": spec["model"],
              "train": spec["train"]}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def test_a_sigkilled_rank_ends_the_job_with_one_line_and_the_checkpoint_resumes(
        token_dir: Path, tmp_path: Path) -> None:
    folder = _project(tmp_path / "job", token_dir, max_steps=120, warmup_steps=2, checkpoint_interval=5,
                      eval_interval=120, log_interval=40, device="cpu", batch_size=None, global_batch=8, seq_len=32)
    command = [sys.executable, "-m", "nativelm.cli", "train", "--nproc", "2"]
    proc = subprocess.Popen(command, cwd=folder, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = folder / "checkpoints" / "step_0000005.pt"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ranks = rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower() and "Warning" not in line]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith("nativelm: error: train: rank 1 of 2 died (SIGKILL); the other processes were "
                                f"stopped; the last checkpoint is {folder / 'checkpoints'}/step_"), errors
    assert not (folder / "model.pt").exists()

    resumed = subprocess.run(command, cwd=folder, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {folder / 'checkpoints'}/step_" in resumed.stderr
    metrics = json.loads((folder / "train.json").read_text())
    assert metrics["steps"] == 120 and metrics["tokens"] == 120 * 8 * 32
