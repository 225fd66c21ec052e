"""Shared fixtures: free loopback ports, a throwaway DVC project, a real local stack per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_corpus(folder: Path, n_docs: int = 12, seed: int = 0) -> Path:
    """A small synthetic English-like corpus of distinct documents (fast to prepare)."""
    import random

    rng = random.Random(seed)
    words = ("the king queen lord lady love night day sword crown heart world time death life "
             "speak come go see make know hear fair good great noble sweet true old young").split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
                 for _ in range(60)]
        (folder / f"doc_{i:03d}.txt").write_text(f"Document {i}\n\n" + "\n".join(lines) + "\n")
    return folder


BIN = Path(sys.executable).parent


def run_checked(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command as a user would in the project (virtualenv on PATH, no stack variables leaking in)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "NATIVELM_"))}
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"  # as with an activated virtualenv
    proc = subprocess.run(cmd, cwd=cwd, env={**full_env, **(env or {})}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def git(cwd: Path, *args: str) -> str:
    """Run git with a fixed identity (CI machines have none configured)."""
    cmd = ["git", "-c", "user.name=nativelm-test", "-c", "user.email=test@nativelm.invalid", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


# a model and a run small enough for a few seconds of CPU: the pipeline, not the learning, is tested
TINY_TEST_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64,
                   "n_experts": 4, "expert_ffn": 32, "top_k": 2, "dense_ffn": 64, "window": 16}
TINY_TEST_TRAIN = {"seq_len": 32, "batch_size": 4, "max_steps": 6, "warmup_steps": 2, "log_interval": 2,
                   "eval_interval": 3, "eval_batches": 2, "checkpoint_interval": 3, "progress": False}

# a 6-step model has near-tied logits everywhere: parity thresholds are the export tests' business
TINY_TEST_EXPORT = {"min_top1_agreement": 0.5, "max_ppl_rel_diff": 0.05, "parity_tokens": 64,
                    "cache_check_tokens": 8, "golden_tokens": 4, "golden_prompts": ["The king"]}
# a short benchmark on few validation tokens: the stage's wiring, not the figures, is tested
TINY_TEST_EVALUATE = {"bench_prompt_len": 8, "bench_new_tokens": 4, "bench_repeats": 1, "ppl_tokens": 128,
                      "threads": 1}


def code_deps() -> list[str]:
    """Every source path a stage of dvc.yaml depends on."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = {d for stage in stages.values() for d in stage.get("deps", []) if d.startswith("src/")}
    return sorted(deps)


def make_project(root: Path, overrides: dict | None = None) -> Path:
    """A git + DVC repository holding the project's pipeline files and a local-corpus params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    (root / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    for dep in code_deps():  # the DVC stages' code dependencies, as dvc.yaml lists them
        source, target = REPO / dep, root / dep
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            shutil.copyfile(source, target)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    corpus = write_corpus(root / "corpus")
    params["data"]["source"] = {"kind": "local", "paths": [str(corpus)], "members": "*.txt", "sha256": ""}
    params["data"]["tokenizer"]["vocab_size"] = 512
    params["stack"]["state_dir"] = str(root / ".nativelm")
    params["model"].update(TINY_TEST_MODEL)
    params["train"].update(TINY_TEST_TRAIN)
    params["export"].update(TINY_TEST_EXPORT)
    params["evaluate"].update(TINY_TEST_EVALUATE)
    for dotted, value in (overrides or {}).items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text(".nativelm/\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "test project")
    return root


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real MLflow + Prefect stack on free ports for the whole session; stopped at the end."""
    from nativelm import stack
    from nativelm.params.root import Params
    from nativelm.params.stack import StackParams

    state = tmp_path_factory.mktemp("stack")
    section = {"state_dir": str(state), "mlflow_port": free_port(), "prefect_port": free_port()}
    params = Params(stack=StackParams(**section))
    stack.up(params)
    try:
        yield {"params": params, "section": section, "env": stack.client_env(params)}
    finally:
        stack.down(params)
