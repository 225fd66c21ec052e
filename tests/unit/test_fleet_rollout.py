"""Rollout logic that needs no board: release folders, spec parsing, waves and aborts, the result log,
the progress lines and the summary table. Deploys on real sshd boards are in tests/integration."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import threading
from datetime import UTC
from pathlib import Path

import pytest

from nativelm.fleet.board_job import BoardContext, BoardResult, DeployHooks, lock_age_s
from nativelm.fleet.inventory import Board
from nativelm.fleet.progress import Progress
from nativelm.fleet.release import LocalRelease, RegistrySpec, ReleaseError, load_release, parse_spec
from nativelm.fleet.rollout import render_rollout, rollout
from nativelm.fleet.rollout_log import log_finished, new_rollout_id
from nativelm.fleet.waves import StopRules, Wave, plan_waves, run_waves
from nativelm.fleet.stopping import Interrupted, stopping
from nativelm.formats import release as release_format
from nativelm.formats.release import MANIFEST as RELEASE_MANIFEST
from nativelm.formats.release import RUNTIME_FILE
from nativelm.fsutil import sha256_file
from nativelm.params.fleet import FleetParams
from tests.unit.runtime_model import Export


def build_release(folder: Path, export_dir: Path, note: str = "test") -> Path:
    """A release folder as `nativelm evaluate` builds it (same builder), from an export folder."""
    release_format.build_release(folder, export_dir, {"git_commit": "test", "note": note})
    return folder


def board(name: str, *groups: str) -> Board:
    return Board(name=name, host="127.0.0.1", port=2200, user="nativelm", key="key", groups=list(groups))


# --------------------------------------------------------------------------------------------
# release folders


@pytest.fixture(scope="module")
def release_dir(export: Export, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_release(tmp_path_factory.mktemp("release") / "release", export.folder)


def test_release_folder_is_described_and_named_by_its_manifest(release_dir: Path) -> None:
    release = load_release(release_dir)
    meta_sha = sha256_file(release_dir / RELEASE_MANIFEST)
    assert release.name == f"sha-{meta_sha[:12]}"
    assert set(release.files) == {"model.onnx", "tokenizer.json", "genai_config.json", "manifest.json",
                                  RUNTIME_FILE, RELEASE_MANIFEST}
    path, sha, size = release.files["model.onnx"]
    assert (sha, size) == (sha256_file(path), path.stat().st_size)
    assert release.total_bytes == sum(f.size for f in release.files.values())
    assert load_release(release_dir, version=7).name == "v7"


def test_release_folder_that_does_not_verify_is_refused(release_dir: Path, tmp_path: Path) -> None:
    damaged = Path(shutil.copytree(release_dir, tmp_path / "damaged"))
    with open(damaged / "tokenizer.json", "ab") as handle:
        handle.write(b" ")
    with pytest.raises(ReleaseError, match=r"hash mismatch: tokenizer\.json"):
        load_release(damaged)
    (damaged / "tokenizer.json").unlink()
    with pytest.raises(ReleaseError, match=r"missing file tokenizer\.json"):
        load_release(damaged)
    with pytest.raises(ReleaseError, match="has no release.json"):
        load_release(tmp_path)


def test_release_json_with_unsafe_names_is_refused(release_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(release_dir, tmp_path / "r"))
    meta = json.loads((folder / RELEASE_MANIFEST).read_text())
    meta["sha256"]["../escape"] = "0" * 64
    (folder / RELEASE_MANIFEST).write_text(json.dumps(meta))
    with pytest.raises(ReleaseError, match="not a plain file name"):
        load_release(folder)


def test_spec_parsing(release_dir: Path) -> None:
    assert parse_spec("3", "nativelm") == RegistrySpec("nativelm", version=3)
    assert parse_spec("models:/other/12", "nativelm") == RegistrySpec("other", version=12)
    assert parse_spec("models:/nativelm@champion", "nativelm") == RegistrySpec("nativelm", alias="champion")
    assert parse_spec("champion", "nativelm") == RegistrySpec("nativelm", alias="champion")
    assert parse_spec(str(release_dir), "nativelm") == release_dir
    assert parse_spec("models/release", "nativelm") == Path("models/release")  # a path, even if missing
    assert str(RegistrySpec("nativelm", version=3)) == "models:/nativelm/3"


# --------------------------------------------------------------------------------------------
# waves and aborts


def test_waves_put_canaries_first_then_chunks() -> None:
    boards = [board("b1"), board("c1", "canary"), board("b2"), board("b3"), board("c2", "canary", "fleet"),
              board("b4"), board("b5")]
    waves = plan_waves(boards, max_parallel=2)
    assert [(w.name, [b.name for b in w.boards], w.gate) for w in waves] == [
        ("canary", ["c1", "c2"], True), ("wave 2", ["b1", "b2"], False), ("wave 3", ["b3", "b4"], False),
        ("wave 4", ["b5"], False)]
    assert [w.name for w in plan_waves([board("x"), board("y")], 4)] == ["wave 1"]


def outcomes(failing: set[str], seen: list[str] | None = None):
    def run_one(b: Board) -> BoardResult:
        if seen is not None:
            seen.append(b.name)
        if b.name in failing:
            return BoardResult(b.name, "failed", phase="upload", reason="boom")
        return BoardResult(b.name, "updated")
    return run_one


def test_failed_canary_aborts_and_skips_the_rest() -> None:
    waves = plan_waves([board("c1", "canary"), board("b1"), board("b2")], 4)
    seen: list[str] = []
    results, abort = run_waves(waves, outcomes({"c1"}, seen), max_parallel=4, rules=StopRules(5))
    assert seen == ["c1"]
    assert abort == "canary failed on c1"
    assert [(r.board, r.outcome) for r in results] == [("c1", "failed"), ("b1", "skipped"), ("b2", "skipped")]
    assert "rollout aborted: canary failed on c1" in results[1].reason


def test_abort_once_more_boards_failed_than_allowed() -> None:
    waves = plan_waves([board(f"b{i}") for i in range(1, 7)], 2)
    seen: list[str] = []
    results, abort = run_waves(waves, outcomes({"b1", "b3"}, seen), max_parallel=2, rules=StopRules(1))
    assert sorted(seen) == ["b1", "b2", "b3", "b4"]  # the second failure ends wave 2; wave 3 never starts
    assert abort is not None and "2 boards failed" in abort
    assert [r.outcome for r in results] == ["failed", "updated", "failed", "updated", "skipped", "skipped"]
    results, abort = run_waves(waves, outcomes({"b1"}), max_parallel=2, rules=StopRules(1))
    assert abort is None and [r.outcome for r in results].count("updated") == 5


def test_waves_run_boards_in_parallel_up_to_the_bound() -> None:
    barrier = threading.Barrier(3, timeout=30)  # passes only if 3 boards of one wave run at the same time

    def run_one(b: Board) -> BoardResult:
        barrier.wait()
        return BoardResult(b.name, "updated")

    results, abort = run_waves([Wave("w", tuple(board(f"b{i}") for i in range(3)))], run_one,
                               max_parallel=3, rules=StopRules(0))
    assert abort is None and [r.outcome for r in results] == ["updated"] * 3


def test_a_crashing_board_job_is_a_failed_board_not_a_crashed_rollout() -> None:
    def run_one(b: Board) -> BoardResult:
        raise KeyError("oops")

    results, abort = run_waves(plan_waves([board("b1")], 1), run_one, max_parallel=1, rules=StopRules(0))
    assert (results[0].outcome, results[0].phase) == ("failed", "internal") and "KeyError" in results[0].reason
    assert abort is not None


# --------------------------------------------------------------------------------------------
# the result log, progress and table


def test_rollout_writes_the_result_log_and_reports_progress(release_dir: Path, tmp_path: Path) -> None:
    release = load_release(release_dir, version=3)
    boards = [board("c1", "canary"), board("b1"), board("b2")]
    calls: list[tuple] = []

    def fake_deploy(b: Board, ctx: BoardContext, rel: LocalRelease) -> BoardResult:
        calls.append((b.name, rel.name, ctx.owner))
        ctx.hooks.on_phase(b.name, "upload", "model.onnx")
        for sent in (0, 40, 80, 100):
            ctx.hooks.on_progress(b.name, "model.onnx", sent, 100)
        if b.name == "b2":
            return BoardResult(b.name, "failed", phase="verify", reason="hash mismatch: model.onnx",
                               release=rel.name, live="v2")
        return BoardResult(b.name, "updated", release=rel.name, live=rel.name, bytes_sent=100, files_sent=1)

    stream = io.StringIO()
    seen_progress: list[int] = []
    user_hooks = DeployHooks(on_progress=lambda b, f, sent, total: seen_progress.append(sent))
    result = rollout(None, boards, release, FleetParams(max_parallel=1, max_failed_boards=0), tmp_path,
                     hooks=user_hooks, progress=Progress([b.name for b in boards], stream, live=False),
                     deploy=fake_deploy)
    assert [c[0] for c in calls] == ["c1", "b1", "b2"] and {c[2] for c in calls} == {result.rollout_id}
    assert seen_progress == [0, 40, 80, 100] * 3  # the caller's hooks still run behind the display
    log = json.loads(result.log_path.read_text())
    assert result.log_path == tmp_path / "rollouts" / f"{result.rollout_id}.json"
    assert log["finished"] is True and log["release"] == "v3" and log["version"] == 3
    assert log["aborted"] and "1 boards failed" in log["aborted"]
    assert {b["board"]: (b["outcome"], b["reason"]) for b in log["boards"]} == {
        "c1": ("updated", ""), "b1": ("updated", ""), "b2": ("failed", "hash mismatch: model.onnx")}
    assert log_finished(tmp_path, result.rollout_id)
    assert not result.ok and [r.board for r in result.failed] == ["b2"]
    lines = stream.getvalue().splitlines()
    assert "c1  upload         model.onnx 40%" in lines
    assert "c1  upload         model.onnx 20%" not in lines  # plain lines only at each quarter
    assert "b2  done           failed: verify: hash mismatch: model.onnx" in lines
    table = render_rollout(result)
    assert table[0].split() == ["board", "outcome", "live", "sent", "files", "linked", "seconds", "reason"]
    assert table[3].startswith("b2") and table[3].endswith("verify: hash mismatch: model.onnx")
    assert "1 failed, 2 updated" in table[-2] and "ABORTED" in table[-2]


def test_an_interrupted_rollout_stops_its_boards_and_finishes_its_log(release_dir: Path, tmp_path: Path) -> None:
    """SIGTERM mid-rollout: the running boards stop at their next step and unlock (their `finally`), the
    boards not started are skipped, the log is finished as "interrupted", and the exit code is 143.

    Deterministic: the signal is sent only once both boards of the first wave are inside their step,
    and it always lands in the main thread, which waits for the wave in `run_waves`.
    """
    release = load_release(release_dir, version=3)
    boards = [board("b1"), board("b2"), board("b3")]
    running = threading.Barrier(3, timeout=30)  # both boards of wave 1, and the thread that signals
    unlocked: list[str] = []

    def stoppable_deploy(b: Board, ctx: BoardContext, rel: LocalRelease) -> BoardResult:
        try:  # "locked"
            running.wait()
            assert ctx.stop.wait(30), "the rollout never set its stop event"
            return BoardResult(b.name, "interrupted", phase="upload", reason="interrupted before upload")
        finally:
            unlocked.append(b.name)

    def signal_when_running() -> None:
        running.wait()
        os.kill(os.getpid(), signal.SIGTERM)

    signaller = threading.Thread(target=signal_when_running)
    signaller.start()
    with pytest.raises(Interrupted) as caught, stopping():
        rollout(None, boards, release, FleetParams(max_parallel=2), tmp_path, deploy=stoppable_deploy)
    signaller.join(30)
    assert caught.value.exit_code == 143 and caught.value.signal_name == "SIGTERM"
    assert sorted(unlocked) == ["b1", "b2"]
    result = caught.value.result
    log = json.loads(result.log_path.read_text())
    assert (log["finished"], log["outcome"], log["aborted"]) == (True, "interrupted", "interrupted by SIGTERM")
    assert {b["board"]: b["outcome"] for b in log["boards"]} == {"b1": "interrupted", "b2": "interrupted",
                                                                 "b3": "skipped"}
    assert "ABORTED: interrupted by SIGTERM" in render_rollout(result)[-2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_live_progress_draws_one_line_per_board() -> None:
    stream = io.StringIO()
    progress = Progress(["board-1", "board-10"], stream, live=True)
    hooks = progress.hooks()
    hooks.on_phase("board-1", "upload", "model.onnx")
    hooks.on_progress("board-1", "model.onnx", 50, 100)
    shown = stream.getvalue()
    progress.done(BoardResult("board-10", "failed", phase="connect", reason="connection refused"))
    progress.close()
    assert "board-1   [##########..........]  upload model.onnx 50%" in shown
    assert "board-10  [....................]  failed: connect: connection refused" in stream.getvalue()


def test_rollback_refuses_a_release_name_a_board_would_not_take(tmp_path: Path) -> None:
    from nativelm.errors import NativelmError
    from nativelm.fleet.rollout import rollback

    with pytest.raises(NativelmError, match="not a release name"):
        rollback(None, [board("b1")], FleetParams(), tmp_path, to="../../etc")
    assert not (tmp_path / "rollouts").exists()


def test_log_finished_only_for_finished_rollouts_of_this_controller(tmp_path: Path) -> None:
    rid = new_rollout_id()
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "rollouts" / f"{rid}.json").write_text(json.dumps({"finished": False}))
    assert not log_finished(tmp_path, rid)
    (tmp_path / "rollouts" / f"{rid}.json").write_text(json.dumps({"finished": True}))
    assert log_finished(tmp_path, rid)
    assert not log_finished(tmp_path, "../rollouts/" + rid)  # owners come from boards: never a path
    assert not log_finished(tmp_path, "rollout-20250101-000000-abcdef")


def test_lock_age_reads_iso_and_epoch_times() -> None:
    import time
    from datetime import datetime

    iso = datetime.fromtimestamp(time.time() - 100, UTC).isoformat(timespec="seconds")
    assert 98 < lock_age_s({"since": iso}) < 200
    assert 48 < lock_age_s({"since": time.time() - 50}) < 150
    assert lock_age_s({"since": "yesterday"}) is None and lock_age_s({}) is None


# --------------------------------------------------------------------------------------------
# on-board benchmark figures


def test_bench_metrics_table_and_chart(tmp_path: Path) -> None:
    from nativelm.fleet.onboard_bench import (
        BenchRow,
        bench_chart,
        bench_csv,
        bench_markdown,
        bench_metrics,
        render_bench,
    )

    figures = {"prefill_tokens_per_s": 900.0, "decode_tokens_per_s": 120.5, "time_to_first_token_ms": 12.25,
               "peak_rss_mb": 80.0, "threads": 2}
    rows = [BenchRow("board-1", "v3", "aarch64", {**figures, "ops": "nativelm:neon-dot"}),
            BenchRow("board-2", "v3", "x86_64", {**figures, "decode_tokens_per_s": 60.5, "ops": "fallback"}),
            BenchRow("board-3", error="connect: connection refused by 127.0.0.1:2222")]
    metrics = bench_metrics(rows)
    assert metrics["board.board-1.decode_tokens_per_s"] == 120.5
    assert metrics["board.board-2.threads"] == 2.0
    assert not any(key.startswith("board.board-3.") for key in metrics)
    assert (metrics["fleet.boards_benched"], metrics["fleet.boards_failed"]) == (2.0, 1.0)
    assert (metrics["fleet.decode_tokens_per_s_min"], metrics["fleet.decode_tokens_per_s_median"]) == (60.5, 90.5)
    table = render_bench(rows)
    assert table[0].split()[:4] == ["board", "release", "arch", "ops"]
    assert table[1].split() == ["board-1", "v3", "aarch64", "nativelm:neon-dot", "900.0", "120.5", "12.2", "80.0"]
    assert table[2].split()[3] == "fallback"
    assert table[3].split()[:4] == ["board-3", "-", "-", "-"] and table[3].endswith("connection refused by 127.0.0.1:2222")
    assert bench_markdown(rows).splitlines()[2].startswith("| board-1 | v3 | aarch64 | nativelm:neon-dot | 900.0 | 120.5 |")
    csv_lines = bench_csv(rows).splitlines()
    assert csv_lines[0].startswith("board,release,arch,ops,prefill_tokens_per_s,decode_tokens_per_s")
    assert csv_lines[3].startswith("board-3,,,,") and csv_lines[3].endswith("connect: connection refused by 127.0.0.1:2222")
    chart = bench_chart(rows, tmp_path / "bench.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
