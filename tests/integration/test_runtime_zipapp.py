"""The runtime zipapp on a "board": a clean virtualenv holding only numpy, onnxruntime and tokenizers
(and what they depend on), at the project's pinned versions.

The wheels are downloaded once (`pip download`) into a cache folder, kept between runs
(NATIVELM_WHEEL_CACHE, default: <tmp>/nativelm-runtime-wheels), and installed with
`--no-index --find-links`, so reruns need no network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from nativelm.runtime.pack import build_zipapp
from tests.unit.runtime_model import make_export

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BOARD_PACKAGES = ("numpy", "onnxruntime", "tokenizers")


def pinned(names: tuple[str, ...]) -> list[str]:
    """`name==version` for each name, as constraints.txt pins it."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M))
    pins = {k.lower(): v for k, v in pins.items()}
    return [f"{name}=={pins[name]}" for name in names]


def wheel_cache(requirements: list[str]) -> Path:
    cache = Path(os.environ.get("NATIVELM_WHEEL_CACHE") or Path(tempfile.gettempdir()) / "nativelm-runtime-wheels")
    marker = cache / ("complete-" + "-".join(r.replace("==", "_") for r in requirements))
    if marker.exists():
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(cache),
                           "--constraint", str(REPO / "constraints.txt"), *requirements],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        pytest.fail(f"cannot download the board's wheels (the package index is part of the set-up): {last}")
    marker.write_text("\n".join(requirements) + "\n")
    return cache


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a clean virtualenv with only the board's packages installed."""
    requirements = pinned(BOARD_PACKAGES)
    cache = wheel_cache(requirements)
    root = tmp_path_factory.mktemp("board")
    run([sys.executable, "-m", "venv", str(root / "venv")], cwd=root)  # no --system-site-packages
    python = root / "venv" / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(cache),
         "--disable-pip-version-check", *requirements], cwd=root)
    return python


def test_zipapp_in_a_clean_virtualenv(board: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    # the environment really is clean: no torch, no onnx, no nativelm
    probe = ("import importlib.util as u; "
             "print([m for m in ('torch', 'onnx', 'pydantic', 'mlflow', 'prefect', 'nativelm') if u.find_spec(m)])")
    missing = run([str(board), "-c", probe], cwd=workdir)
    assert missing.stdout.strip() == "[]"

    export = make_export(tmp_path / "release" / "model")
    pyz = build_zipapp(tmp_path / "release" / "nativelm-runtime.pyz")
    model = str(export.folder)

    golden = json.loads((export.folder / "manifest.json").read_text())["golden"][0]
    assert golden["prompt"] == "The king" and 0 not in golden["tokens"]  # no eos: generate runs to the end
    gen = run([str(board), str(pyz), "generate", "--model", model, "--prompt", "The king", "--max-new-tokens",
               str(len(golden["tokens"])), "--json"], cwd=workdir)
    record = json.loads(gen.stdout)
    assert record["tokens"] == golden["tokens"]  # the numpy reference's greedy continuation
    streamed = run([str(board), str(pyz), "generate", "--model", model, "--prompt", "The king",
                    "--max-new-tokens", str(len(golden["tokens"])), "--stream"], cwd=workdir)
    assert streamed.stdout == record["text"] + "\n"
    sampled = [run([str(board), str(pyz), "generate", "--model", model, "--prompt", "The king", "--temperature", "1",
                    "--top-p", "0.9", "--seed", "4", "--json"], cwd=workdir).stdout for _ in range(2)]
    assert sampled[0] == sampled[1]

    bench = run([str(board), str(pyz), "bench", "--model", model, "--prompt-len", "16", "--new-tokens", "8",
                 "--repeats", "2", "--threads", "1", "--json"], cwd=workdir)
    results = json.loads(bench.stdout)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_ms", "inter_token_latency_p50_ms",
                "inter_token_latency_p95_ms", "peak_rss_mb", "rss_mb", "model_file_bytes", "bits_per_weight"):
        assert results[key] > 0, key
    assert results["threads"] == 1 and results["onnxruntime_version"] == pinned(("onnxruntime",))[0].split("==")[1]

    health = run([str(board), str(pyz), "health", "--model", model], cwd=workdir)
    assert health.stdout == "ok\n" and health.stderr == ""

    broken = Path(shutil.copytree(export.folder, tmp_path / "broken"))
    data = bytearray((broken / "model.onnx").read_bytes())
    data[100] ^= 0x40
    (broken / "model.onnx").write_bytes(bytes(data))
    bad = run([str(board), str(pyz), "health", "--model", str(broken)], cwd=workdir, check=False)
    assert bad.returncode == 1 and bad.stdout == "" and "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {broken / 'model.onnx'}: sha256 mismatch")
