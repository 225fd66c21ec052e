"""The `nativelm` command: help on every subcommand, bad parameters -> one line, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nativelm.cli import build_parser, main


def _subcommands() -> list[list[str]]:
    parser = build_parser()
    found: list[list[str]] = []

    def walk(p, prefix: list[str]) -> None:
        for action in p._actions:  # argparse keeps sub-parsers here
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    found.append([*prefix, name])
                    walk(child, [*prefix, name])

    walk(parser, [])
    return found


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _subcommands()
    assert ["prepare"] in commands and ["stack"] in commands
    for command in commands:
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: nativelm {' '.join(command)}"), command
        assert len(out.splitlines()) > 3


def test_console_script_runs() -> None:
    proc = subprocess.run([Path(sys.executable).parent / "nativelm", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "prepare" in proc.stdout


@pytest.mark.parametrize("command", [["prepare"], ["stack", "status"], ["run"]])
@pytest.mark.parametrize(("text", "fragment"), [
    ("data:\n  tokenizer:\n    vocab_size: lots\n", "data.tokenizer.vocab_size"),
    ("data:\n  shard_tokens: 5\n", "data.shard_tokens"),
    ("stak: {}\n", "stak: unknown key"),
])
def test_bad_params_one_line_exit_2_nothing_written(tmp_path: Path, command: list[str], text: str,
                                                    fragment: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    proc = subprocess.run([Path(sys.executable).parent / "nativelm", *command], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_params_option_before_or_after_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "custom.yaml"
    bad.write_text("seed: x\n")
    assert main(["--params", str(bad), "stack", "status"]) == 2
    assert main(["stack", "status", "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count(str(bad)) == 2


@pytest.mark.parametrize("command", [["fleet", "status"], ["fleet", "provision"], ["fleet", "sim", "status"]])
def test_fleet_commands_that_record_nothing_do_not_load_mlflow(command: list[str]) -> None:
    module = build_parser().parse_args(command).handler.split(":")[0]
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow')[:1])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", module
