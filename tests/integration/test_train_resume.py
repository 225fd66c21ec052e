"""Real processes: a training run killed with SIGKILL and resumed ends bit-identical to an
uninterrupted one (CPU), and DDP under torchrun (2 processes, gloo) keeps ranks in step."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.unit.test_train_data import write_token_data

pytestmark = pytest.mark.slow

DRIVER = '''
import json, sys
from pathlib import Path
import torch
from nativelm.model import ModelParams
from nativelm.params.train import TrainParams
from nativelm.train.stage import TrainOutputs, run_train

spec = json.loads(Path(sys.argv[1]).read_text())
train = TrainParams.model_validate(spec["train"])
result = run_train(ModelParams(**spec["model"]), train, 1234, Path(spec["data"]["out_dir"]), TrainOutputs.of(train))
if len(sys.argv) > 2:  # every rank writes its final weights
    import os
    torch.save(result.model.state_dict(), Path(sys.argv[2]) / f"rank{os.environ.get('RANK', '0')}.pt")
'''

MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "n_experts": 8, "expert_ffn": 32,
         "top_k": 2, "window": 16, "max_seq_len": 64}


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_data(tmp_path_factory.mktemp("tokens") / "prepared")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "NATIVELM_"))}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")])))
    return env


def _spec(folder: Path, token_dir: Path, **train: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"data": {"out_dir": str(token_dir)}, "model": MODEL,
            "train": {"seq_len": 48, "batch_size": 8, "max_steps": 40, "warmup_steps": 4, "log_interval": 5,
                      "eval_interval": 20, "eval_batches": 2, "checkpoint_interval": 10, "threads": 1,
                      "progress": False, "checkpoint_dir": str(folder / "checkpoints"),
                      "model_file": str(folder / "model.pt"), "metrics_file": str(folder / "train.json"),
                      "plots_dir": str(folder / "plots"), **train}}
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    (folder / "driver.py").write_text(DRIVER)
    return path


def _train(folder: Path, spec: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(folder / "driver.py"), str(spec), *extra], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sigkilled_run_resumes_bit_identical(token_dir: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    _train(straight, _spec(straight, token_dir))

    killed = tmp_path / "killed"
    spec = _spec(killed, token_dir)
    proc = subprocess.Popen([sys.executable, str(killed / "driver.py"), str(spec)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = killed / "checkpoints" / "step_0000010.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {stderr[-2000:]}"
    assert first.exists() and not (killed / "model.pt").exists()
    written = sorted(p.name for p in (killed / "checkpoints").glob("step_*.pt"))
    assert "step_0000040.pt" not in written

    resumed = _train(killed, spec)
    assert "resumed from" in resumed.stderr
    a = torch.load(straight / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "train.json").read_text()) for d in (straight, killed))
    assert ma["val_loss"] == mb["val_loss"] and ma["train_loss"] == mb["train_loss"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_gloo_keep_ranks_in_step(token_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ddp"
    spec = _spec(folder, token_dir, max_steps=2, warmup_steps=0, decay_frac=0.5, min_lr_ratio=0.5, checkpoint_interval=1,
                 eval_interval=1, log_interval=1, device="cpu")
    out = folder / "ranks"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", str(folder / "driver.py"), str(spec), str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es)" in proc.stderr
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP averaged the same gradients on both ranks
    metrics = json.loads((folder / "train.json").read_text())  # rank 0 wrote the outputs
    assert metrics["steps"] == 2 and metrics["tokens"] == 2 * 8 * 48 * 2
    checkpoint = torch.load(folder / "checkpoints" / "step_0000002.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and "bit_generator" in checkpoint["sampler"]  # one global sampler state
    initial = torch.load(folder / "checkpoints" / "step_0000001.pt", weights_only=True)["model"]
    assert any(not torch.equal(initial[k], r0[k]) for k in r0)  # the step changed the weights
