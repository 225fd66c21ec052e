"""The board command, run as a user runs it (`python -m nativelm.runtime`), and import isolation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.runtime_model import Export, train_tokenizer, update_manifest

SUBPROCESS_TIMEOUT = 120


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nativelm.runtime", *args], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)


def assert_one_line_failure(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_generate_greedy_stream_and_json(export: Export) -> None:
    from nativelm.runtime import generate, load_model

    expected = generate(load_model(export.folder, threads=1), "The king", 12).text
    base = ("generate", "--model", str(export.folder), "--prompt", "The king", "--max-new-tokens", "12",
            "--threads", "1")
    plain, streamed, as_json = cli(*base), cli(*base, "--stream"), cli(*base, "--json")
    for proc in (plain, streamed, as_json):
        assert proc.returncode == 0, proc.stderr
    assert plain.stdout == expected + "\n" == streamed.stdout
    record = json.loads(as_json.stdout)
    assert record["text"] == expected and len(record["tokens"]) == 12 and record["finish_reason"] == "length"


def test_generate_sampling_is_reproducible(export: Export) -> None:
    base = ("generate", "--model", str(export.folder), "--prompt", "A noble", "--max-new-tokens", "20",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--json")
    first, second, other = cli(*base, "--seed", "1"), cli(*base, "--seed", "1"), cli(*base, "--seed", "2")
    tokens = [json.loads(p.stdout)["tokens"] for p in (first, second, other)]
    assert tokens[0] == tokens[1] != tokens[2]


def test_bench_json(export: Export) -> None:
    proc = cli("bench", "--model", str(export.folder), "--prompt-len", "16", "--new-tokens", "8", "--repeats", "2",
               "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_ms",
                "inter_token_latency_p50_ms", "inter_token_latency_p95_ms", "peak_rss_mb", "rss_mb",
                "model_file_bytes", "bits_per_weight", "threads"):
        assert results[key] > 0, key
    assert results["threads"] == 1 and results["onnxruntime_version"] and results["cpu_model"]
    human = cli("bench", "--model", str(export.folder), "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1")
    assert human.returncode == 0 and "decode_tokens_per_s: " in human.stdout


def test_health_ok(export: Export) -> None:
    proc = cli("health", "--model", str(export.folder))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")


def test_health_names_the_prompt_that_differed(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    golden = manifest["golden"]
    golden[1]["tokens"][2] = (golden[1]["tokens"][2] + 1) % 320
    update_manifest(folder, golden=golden)
    line = assert_one_line_failure(cli("health", "--model", str(folder)),
                                   "golden prompt 2 of 3 ('A noble heart') differed at token 3 of 8")
    assert "ok" not in cli("health", "--model", str(folder)).stdout
    assert line


def test_health_by_text_and_with_nothing_to_check(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    by_text = [{"prompt": g["prompt"], "text": g["text"]} for g in manifest["golden"]]
    update_manifest(folder, golden=by_text)
    assert cli("health", "--model", str(folder)).stdout == "ok\n"
    by_text[0]["text"] = "something else entirely"
    update_manifest(folder, golden=by_text)
    assert_one_line_failure(cli("health", "--model", str(folder)), "golden prompt 1 of 3 ('The king') differed")
    update_manifest(folder, golden=[])
    assert_one_line_failure(cli("health", "--model", str(folder)), "has no golden prompts to check")


@pytest.mark.parametrize("command", ["generate", "bench", "health"])
def test_altered_byte_fails_every_command(folder: Path, command: str) -> None:
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    extra = ("--prompt", "x") if command == "generate" else ()
    proc = cli(command, "--model", str(folder), *extra)
    assert_one_line_failure(proc, f"{folder / 'model.onnx'}: sha256 mismatch")
    assert proc.stdout == ""


def test_truncated_model(folder: Path) -> None:
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 3])
    assert_one_line_failure(cli("health", "--model", str(folder)), "model.onnx: sha256 mismatch")
    update_manifest(folder)
    assert_one_line_failure(cli("generate", "--model", str(folder), "--prompt", "x"),
                            f"{folder / 'model.onnx'}: ONNX Runtime cannot load it")


def test_tokenizer_from_another_model(folder: Path) -> None:
    train_tokenizer(vocab_size=290).save(str(folder / "tokenizer.json"))
    update_manifest(folder)
    assert_one_line_failure(cli("generate", "--model", str(folder), "--prompt", "x"),
                            "tokenizer.json: has 290 tokens but model.onnx predicts 320")


def test_missing_folder_and_files(folder: Path, tmp_path: Path) -> None:
    assert_one_line_failure(cli("health", "--model", str(tmp_path / "nope")), "no such model folder")
    (folder / "tokenizer.json").unlink()
    assert_one_line_failure(cli("health", "--model", str(folder)), "tokenizer.json: missing")
    (folder / "manifest.json").unlink()
    assert_one_line_failure(cli("bench", "--model", str(folder)), "manifest.json: missing")


def test_bad_arguments(export: Export) -> None:
    proc = cli("generate", "--model", str(export.folder), "--prompt", "x", "--top-p", "2")
    assert_one_line_failure(proc, "top-p must be in (0, 1], got 2.0")
    proc = cli("generate", "--model", str(export.folder), "--prompt", "x", "--threads", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = cli("bench", "--model", str(export.folder), "--prompt-len", "100")
    assert_one_line_failure(proc, "exceeds the model's context of 64 tokens")
    assert cli().returncode == 2


ISOLATION = r"""
import sys, sysconfig
import nativelm.runtime
import nativelm.runtime.__main__
from nativelm.runtime import benchmark, check_health, generate, load_model
model = load_model(sys.argv[1], threads=1)
generate(model, "The king", 4)
benchmark(model, prompt_len=4, new_tokens=2, repeats=1)
check_health(model)
site = tuple(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
third_party = sorted({name.split(".")[0] for name, module in list(sys.modules.items())
                      if str(getattr(module, "__file__", "") or "").startswith(site)})
print(" ".join(sorted(sys.modules)))
print(" ".join(third_party))
"""


def test_import_isolation(export: Export) -> None:
    proc = subprocess.run([sys.executable, "-c", ISOLATION, str(export.folder)], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    all_lines = proc.stdout.strip().splitlines()
    modules, third_party = set(all_lines[-2].split()), set(all_lines[-1].split())
    for banned in ("torch", "pydantic", "mlflow", "prefect", "onnx", "yaml", "dvc", "paramiko"):
        assert banned not in modules, banned
    ours = {m for m in modules if m == "nativelm" or m.startswith("nativelm.")}
    shipped = {"nativelm", "nativelm.jsonfile"}  # the zipapp's stub package and the leaf it ships beside the runtime
    assert ours and all(m in shipped or m.startswith("nativelm.runtime") for m in ours), sorted(ours)
    allowed = {"numpy", "onnxruntime", "tokenizers", "_distutils_hack"}  # the last: setuptools' .pth hook
    assert {m for m in third_party if not m.startswith("__editable__")} <= allowed, third_party
