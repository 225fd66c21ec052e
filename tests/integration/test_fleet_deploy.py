"""Rollouts on real sshd boards (the session's simulated fleet): update, unchanged re-rollout, shared
files linked not re-sent, prune, rollback, the `deploy` / `rollback` / `bench` commands, and a
registered version downloaded from a real MLflow server and benchmarked into one MLflow run.

The helpers here (releases built by the evaluate stage's own builder, `serving`, `logged`) are
shared with test_fleet_faults.py.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from nativelm.fleet.board_job import BoardResult
from nativelm.fleet.inventory import Inventory
from nativelm.fleet.release import LocalRelease, load_release, resolve_release
from nativelm.fleet.rollout import render_rollout, rollback, rollout
from nativelm.fleet.rollout_log import RolloutResult
from nativelm.fleet.signing import signed
from nativelm.fleet.ssh import BoardSession
from nativelm.formats.release import RUNTIME_FILE
from nativelm.params.fleet import FleetParams
from nativelm.params.root import Params
from tests.integration.conftest import SimFleet
from tests.unit.runtime_model import Dims, make_export, update_manifest
from tests.unit.test_fleet_rollout import build_release

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# about 1.9 MB of model: several upload chunks (resume is observable), still quick to check
FLEET_DIMS = Dims(d_model=128, ffn=512)
# the test model's context is 64 tokens
BENCH = {"bench_prompt_len": 8, "bench_new_tokens": 4, "bench_repeats": 1}


class Releases(NamedTuple):
    old: LocalRelease
    new: LocalRelease
    bad: LocalRelease  # consistent hashes, wrong golden continuation: fails its health check


def fleet_release(root: Path, seed: int, note: str, wrong_golden: bool = False) -> LocalRelease:
    """A release of the fleet tests' architecture (tokenizer, genai config and runtime always the same bytes)."""
    export = make_export(root / f"export-{note}", seed=seed, dims=FLEET_DIMS)
    if wrong_golden:
        golden = json.loads((export.folder / "manifest.json").read_text())["golden"]
        for entry in golden:
            entry["tokens"] = [(t + 1) % export.vocab for t in entry["tokens"]]
        update_manifest(export.folder, golden=golden)
    return load_release(build_release(root / f"release-{note}", export.folder, note))


def build_releases(root: Path, seeds: tuple[int, int, int] = (0, 1, 2)) -> Releases:
    """Old, new and bad releases; other `seeds` give releases no other test module has put on the
    session's shared boards (release names are content hashes)."""
    return Releases(fleet_release(root, seeds[0], "old"), fleet_release(root, seeds[1], "new"),
                    fleet_release(root, seeds[2], "bad", wrong_golden=True))


def serving(inventory: Inventory, fleet: FleetParams, boards: list[str] | None = None) -> dict[str, str]:
    """{board: live release}, after the agent verified every file of that release on the board."""
    live = {}
    for board in inventory.boards:
        if boards is not None and board.name not in boards:
            continue
        with BoardSession(board, inventory, fleet) as session:
            current = session.agent("facts")["current"]
            assert current, f"{board.name} serves no release"
            assert session.agent("verify", current)["ok"]
            live[board.name] = current
    return live


def logged(result: RolloutResult) -> dict[str, dict]:
    """The result log of a rollout, by board."""
    log = json.loads(result.log_path.read_text())
    assert log["finished"] is True and log["id"] == result.rollout_id
    return {row["board"]: row for row in log["boards"]}


def by_board(result: RolloutResult) -> dict[str, BoardResult]:
    return {r.board: r for r in result.boards}


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return build_releases(tmp_path_factory.mktemp("releases"))


@pytest.fixture(scope="module")
def fleet_params(sim_fleet: SimFleet) -> FleetParams:
    return sim_fleet.params.fleet.model_copy(update={"keep_releases": 2, **BENCH})


def state_dir(sim_fleet: SimFleet) -> Path:
    return Path(sim_fleet.params.stack.state_dir)


def test_update_unchanged_link_prune_and_rollback(sim_fleet: SimFleet, releases: Releases,
                                                  fleet_params: FleetParams) -> None:
    inv, names = sim_fleet.inventory, [b.name for b in sim_fleet.inventory.boards]
    first = rollout(inv, inv.boards, releases.old, fleet_params, state_dir(sim_fleet))
    assert first.ok, "\n".join(render_rollout(first))
    assert serving(inv, fleet_params) == dict.fromkeys(names, releases.old.name)

    again = rollout(inv, inv.boards, releases.old, fleet_params, state_dir(sim_fleet))
    assert [r.outcome for r in again.boards] == ["unchanged"] * len(names)
    assert sum(r.bytes_sent for r in again.boards) == 0

    update = rollout(inv, inv.boards, releases.new, fleet_params, state_dir(sim_fleet))
    assert update.ok and serving(inv, fleet_params) == dict.fromkeys(names, releases.new.name)
    for result in update.boards:
        assert (result.outcome, result.previous, result.live) == ("updated", releases.old.name, releases.new.name)
        # tokenizer, genai config and runtime are the old release's bytes: linked on the board, not sent
        assert result.files_linked == 3 and result.files_sent == 4  # the 3 files that differ, and the signature
        shared = sum(releases.new.files[n].size for n in ("tokenizer.json", "genai_config.json", RUNTIME_FILE))
        assert result.bytes_sent == signed(releases.new, Path(fleet_params.signing_key)).total_bytes - shared
    log = logged(update)
    assert {row["outcome"] for row in log.values()} == {"updated"}
    key = inv.key_path(inv.boards[0])
    assert key.name not in update.log_path.read_text()  # the result log names boards, never their keys

    back = rollback(inv, [inv.board("board-2")], fleet_params, state_dir(sim_fleet))
    assert back.ok and by_board(back)["board-2"].outcome == "rolled-back"
    assert serving(inv, fleet_params) == {**dict.fromkeys(names, releases.new.name), "board-2": releases.old.name}
    forward = rollback(inv, [inv.board("board-2")], fleet_params, state_dir(sim_fleet), to=releases.new.name)
    assert forward.ok and serving(inv, fleet_params)["board-2"] == releases.new.name
    missing = rollback(inv, [inv.board("board-2")], fleet_params, state_dir(sim_fleet), to="v999")
    failed = by_board(missing)["board-2"]
    assert (failed.outcome, failed.phase) == ("failed", "verify")
    assert failed.reason == f"v999 does not verify (no release v999 on this board); {releases.new.name} stays live"
    assert logged(missing)["board-2"]["reason"] == failed.reason
    assert serving(inv, fleet_params)["board-2"] == releases.new.name


def test_prune_keeps_live_and_previous(sim_fleet: SimFleet, releases: Releases, fleet_params: FleetParams,
                                       tmp_path: Path) -> None:
    inv = sim_fleet.inventory
    board = [inv.board("board-3")]
    assert rollout(inv, board, releases.new, fleet_params, state_dir(sim_fleet)).ok
    with BoardSession(board[0], inv, fleet_params) as session:
        before = session.agent("facts")["releases"]
    assert releases.old.name in before  # left by the test above: the one to prune
    extra = load_release(build_release(tmp_path / "extra", releases.new.folder, "extra"))  # same files, new name
    result = rollout(inv, board, extra, fleet_params, state_dir(sim_fleet))
    assert result.ok and result.boards[0].bytes_sent < 4096  # only its release.json is new
    assert result.boards[0].extra["pruned"] == [r for r in before if r != releases.new.name]
    with BoardSession(board[0], inv, fleet_params) as session:
        facts = session.agent("facts")
    assert (facts["current"], facts["previous"]) == (extra.name, releases.new.name)
    assert sorted(facts["releases"]) == sorted([extra.name, releases.new.name])  # keep_releases 2


def _params_file(sim_fleet: SimFleet, tmp_path: Path) -> Path:
    data = sim_fleet.params.model_dump(mode="json")
    data["fleet"].update(BENCH)
    data["tracking"]["uri"] = "off"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_deploy_rollback_and_bench_commands(sim_fleet: SimFleet, releases: Releases, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from nativelm.cli import main

    params = _params_file(sim_fleet, tmp_path)
    assert rollout(sim_fleet.inventory, sim_fleet.inventory.boards[:2], releases.new, sim_fleet.params.fleet,
                   state_dir(sim_fleet)).ok  # whatever ran before: new live, so deploying old changes something
    capsys.readouterr()
    assert main(["deploy", "--params", str(params), "--model", str(releases.old.folder), "--boards",
                 "board-1,board-2", "--no-mlflow"]) == 0
    out = capsys.readouterr()
    assert "board-1  health-current" in out.err  # per-board progress lines (not a terminal: plain lines)
    lines = out.out.splitlines()
    rollout_at = lines.index(next(line for line in lines if line.split()[:2] == ["board", "outcome"]))
    bench_at = lines.index(next(line for line in lines if line.split()[:2] == ["board", "release"]))
    assert [line.split()[:3] for line in lines[rollout_at + 1:rollout_at + 3]] == [
        ["board-1", "updated", releases.old.name], ["board-2", "updated", releases.old.name]]
    assert [line.split()[:3] for line in lines[bench_at + 1:bench_at + 3]] == [
        ["board-1", releases.old.name, "x86_64"], ["board-2", releases.old.name, "x86_64"]]

    assert main(["rollback", "--params", str(params), "--boards", "board-2"]) == 0
    assert serving(sim_fleet.inventory, sim_fleet.params.fleet, ["board-2"]) == {"board-2": releases.new.name}
    capsys.readouterr()

    assert main(["rollback", "--params", str(params)]) == 2  # no boards chosen: refused
    assert "choose the boards" in capsys.readouterr().err
    assert main(["deploy", "--params", str(params), "--model", str(tmp_path / "nothing")]) == 2
    assert "not a release folder" in capsys.readouterr().err

    assert main(["bench", "--params", str(params), "--boards", "board-1", "--no-mlflow"]) == 0
    bench = capsys.readouterr().out.splitlines()
    assert bench[0].split()[:4] == ["board", "release", "arch", "ops"]
    assert bench[1].split()[:4] == ["board-1", releases.old.name, "x86_64", "contrib"]  # one graph: contrib ops
    decode = float(bench[1].split()[5])
    assert decode > 0
    with BoardSession(sim_fleet.inventory.board("board-1"), sim_fleet.inventory, sim_fleet.params.fleet) as s:
        assert s.agent("facts")["last_bench"]["decode_tokens_per_s"] > 0  # kept on the board


def test_registered_version_from_mlflow_rolls_out_and_is_benchmarked(sim_fleet: SimFleet, releases: Releases,
                                                                     local_stack: dict, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from nativelm.fleet.onboard_bench import bench_fleet, log_bench_run
    from nativelm.tracking.registry import register_folder
    from nativelm.tracking.runs import tracked_run

    model = f"fleet-{uuid.uuid4().hex[:8]}"
    data = sim_fleet.params.model_dump(mode="json")
    data["fleet"].update(BENCH)
    data["stack"]["state_dir"] = str(tmp_path / "state")
    data["tracking"] = {"uri": local_stack["env"]["MLFLOW_TRACKING_URI"], "experiment": "fleet-test"}
    data["evaluate"] = {"registered_model": model}
    params = Params.model_validate(data)
    with tracked_run(params, "evaluate", "stage") as run:
        version = register_folder(run, releases.new.folder, model, {"git_commit": "test"})
    client = MlflowClient(tracking_uri=params.tracking.uri)
    client.set_registered_model_alias(model, "champion", str(version))

    release = resolve_release("champion", params)
    assert release.name == f"v{version}" and release.version == version
    assert release.folder == tmp_path / "state" / "releases" / f"v{version}"
    assert {n: f.sha256 for n, f in release.files.items()} == {n: f.sha256 for n, f in releases.new.files.items()}
    assert resolve_release(f"models:/{model}/{version}", params).folder == release.folder  # cached, verified
    with pytest.raises(Exception, match="has no version 99"):
        resolve_release("99", params)

    inv = sim_fleet.inventory
    result = rollout(inv, inv.boards, release, params.fleet, tmp_path / "state")
    assert result.ok, "\n".join(render_rollout(result))
    # the same bytes as the sha-named release already on the boards: every file linked (its
    # signature too: same manifest, same key), nothing sent
    assert all((r.files_linked, r.bytes_sent) == (len(release.files) + 1, 0) for r in result.boards)
    assert serving(inv, params.fleet) == {b.name: release.name for b in inv.boards}

    rows = bench_fleet(inv, inv.boards, params.fleet, parallel=1)
    assert all(row.error is None and row.release == release.name for row in rows)
    run_id = log_bench_run(params, rows, rollout_id=result.rollout_id, release=release.name, version=version)
    logged_run = client.get_run(run_id)
    assert logged_run.data.tags["rollout_id"] == result.rollout_id
    assert logged_run.data.tags["model_version"] == str(version)
    for board in inv.boards:
        assert logged_run.data.metrics[f"board.{board.name}.decode_tokens_per_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(run_id, "bench")}
    assert artifacts == {"bench/bench.md", "bench/bench.csv", "bench/bench.json", "bench/bench.png"}
    # nothing about keys reaches MLflow: not the key's path, not its contents
    key_path = inv.key_path(inv.boards[0])
    secret = key_path.read_text().splitlines()[1]
    logged_text = json.dumps({"params": logged_run.data.params, "tags": logged_run.data.tags})
    local = Path(client.download_artifacts(run_id, "bench", str(tmp_path / "artifacts")))
    logged_text += "".join(p.read_text() for p in local.iterdir() if p.suffix != ".png")
    assert key_path.name not in logged_text and secret not in logged_text
