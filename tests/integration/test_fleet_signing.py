"""Signed releases on real sshd boards: a board activates only a release.json signed by a provisioned key.

Refused with one line, the board keeping what it had: a release signed by a key the board does not
list, a manifest changed after it was signed, a release sent without its signature. Key rotation
as docs/fleet.md describes it: add the new key, provision, switch the signing key, remove the old.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nativelm.fleet.agent import SIGNATURE
from nativelm.fleet.board_job import BoardContext, BoardResult, on_board
from nativelm.fleet.deploy import BoardDeploy
from nativelm.fleet.inventory import Board
from nativelm.fleet.provision import provision
from nativelm.fleet.release import LocalRelease, ReleaseFile, load_release
from nativelm.fleet.rollout import rollout
from nativelm.fleet.rollout_log import RolloutResult
from nativelm.fleet.signing import create_signing_key, sign_manifest
from nativelm.fleet.trial import trial_on
from nativelm.fleet.ssh import BoardSession
from nativelm.fsutil import sha256_file
from nativelm.params.fleet import FleetParams
from tests.integration.conftest import SimFleet
from tests.integration.test_fleet_deploy import BENCH, Releases, build_releases, serving

pytestmark = [pytest.mark.integration]

BOARD = "board-3"


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return build_releases(tmp_path_factory.mktemp("signed-releases"), seeds=(30, 31, 32))  # this module's own


@pytest.fixture(scope="module")
def live_old(sim_fleet: SimFleet, releases: Releases) -> FleetParams:
    """board-3 serving the old release (signed by the fleet's key); the fleet settings used."""
    fleet = sim_fleet.params.fleet.model_copy(update=BENCH)
    assert one_board(sim_fleet, releases.old, fleet).boards[0].outcome in ("updated", "unchanged")
    return fleet


def one_board(sim_fleet: SimFleet, release: LocalRelease, fleet: FleetParams, **kwargs: object) -> RolloutResult:
    inv = sim_fleet.inventory
    return rollout(inv, [inv.board(BOARD)], release, fleet, Path(sim_fleet.params.stack.state_dir), **kwargs)


def refused(result: RolloutResult, why: str) -> None:
    """The board failed in verify with one line saying `why`, and still serves the old release."""
    board = result.boards[0]
    assert (board.outcome, board.phase) == ("failed", "verify"), board
    assert why in board.reason and "\n" not in board.reason


def test_a_release_signed_by_an_unknown_key_is_refused(sim_fleet: SimFleet, releases: Releases,
                                                      live_old: FleetParams, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger-key"
    create_signing_key(stranger)
    result = one_board(sim_fleet, releases.new, live_old.model_copy(update={"signing_key": str(stranger)}))
    refused(result, f"release {releases.new.name} refused: release.json signature does not verify")
    assert serving(sim_fleet.inventory, live_old, [BOARD]) == {BOARD: releases.old.name}


def test_a_manifest_changed_after_signing_is_refused(sim_fleet: SimFleet, releases: Releases,
                                                     live_old: FleetParams, tmp_path: Path) -> None:
    copy = tmp_path / "tampered"
    shutil.copytree(releases.new.folder, copy)
    manifest = json.loads((copy / "release.json").read_text())
    (copy / "release.json").write_text(json.dumps({**manifest, "note": "changed after signing"}))
    tampered = load_release(copy)  # consistent hashes: only the signature can tell
    signature = sign_manifest(releases.new.folder / "release.json", Path(live_old.signing_key),
                              tmp_path / SIGNATURE)  # made over the manifest as it was
    tampered = LocalRelease(tampered.folder, tampered.name, tampered.manifest,
                            {**tampered.files, SIGNATURE: ReleaseFile(signature, sha256_file(signature), signature.stat().st_size)})
    refused(one_board(sim_fleet, tampered, live_old), f"release {tampered.name} refused: release.json signature")
    assert serving(sim_fleet.inventory, live_old, [BOARD]) == {BOARD: releases.old.name}


class UnsignedDeploy(BoardDeploy):
    """A controller that sends the release without its signature."""

    def sign(self) -> None:
        self.note("sign", "skipped")


def test_a_release_without_signature_is_refused(sim_fleet: SimFleet, releases: Releases,
                                                live_old: FleetParams) -> None:
    def unsigned(board: Board, ctx: BoardContext, release: LocalRelease) -> BoardResult:
        return on_board(board, ctx, lambda session: UnsignedDeploy(session, ctx, release).run(), release.name)

    board = sim_fleet.inventory.board(BOARD)
    with BoardSession(board, sim_fleet.inventory, live_old) as session:  # no signature left by a test before
        session.agent("discard", releases.new.name)
    result = one_board(sim_fleet, releases.new, live_old, deploy=unsigned)
    refused(result, f"release {releases.new.name} refused: not signed (no release.json.sig)")
    assert serving(sim_fleet.inventory, live_old, [BOARD]) == {BOARD: releases.old.name}


def test_a_trial_signs_what_it_uploads_and_an_unknown_key_is_refused(sim_fleet: SimFleet, releases: Releases,
                                                                     live_old: FleetParams, tmp_path: Path) -> None:
    board = sim_fleet.inventory.board(BOARD)
    ctx = BoardContext(sim_fleet.inventory, live_old, "signing-test")
    tried = trial_on(board, ctx, releases.new)
    assert tried.outcome == "tried", tried
    assert tried.extra["bench"]
    stranger = tmp_path / "stranger-key"
    create_signing_key(stranger)
    ctx = BoardContext(sim_fleet.inventory, live_old.model_copy(update={"signing_key": str(stranger)}), "signing-test")
    refused_trial = trial_on(board, ctx, releases.new)
    assert (refused_trial.outcome, refused_trial.phase) == ("failed", "verify"), refused_trial
    assert "signature does not verify" in refused_trial.reason
    assert serving(sim_fleet.inventory, live_old, [BOARD]) == {BOARD: releases.old.name}


def test_key_rotation(sim_fleet: SimFleet, releases: Releases, live_old: FleetParams, tmp_path: Path) -> None:
    old_key, new_key = Path(live_old.signing_key), tmp_path / "new-release-key"
    create_signing_key(new_key)
    inv, state = sim_fleet.inventory, Path(sim_fleet.params.stack.state_dir)
    both = live_old.model_copy(update={"allowed_signers": [f"{old_key}.pub", f"{new_key}.pub"]})
    assert [r.ok for r in provision(inv, [inv.board(BOARD)], both, state)] == [True]
    switched = both.model_copy(update={"signing_key": str(new_key)})
    assert one_board(sim_fleet, releases.new, switched).boards[0].outcome == "updated"
    only_new = switched.model_copy(update={"allowed_signers": [f"{new_key}.pub"]})
    try:
        assert [r.ok for r in provision(inv, [inv.board(BOARD)], only_new, state)] == [True]
        stale = only_new.model_copy(update={"signing_key": str(old_key)})
        refused(one_board(sim_fleet, releases.old, stale), "signature does not verify")
        assert serving(inv, only_new, [BOARD]) == {BOARD: releases.new.name}
    finally:  # the shared fleet goes back to its own key
        assert [r.ok for r in provision(inv, [inv.board(BOARD)], live_old, state)] == [True]



def test_a_missing_signing_key_is_one_line_before_any_board(sim_fleet: SimFleet, releases: Releases,
                                                           live_old: FleetParams, tmp_path: Path) -> None:
    """`nativelm deploy` (and the rollout flow) sign once, up front: no key, no rollout, no board touched."""
    from nativelm.fleet import deploy_service
    from nativelm.fleet.service import FleetChoice
    from nativelm.fleet.signing import SigningError

    missing = tmp_path / "no-such-key"
    params = sim_fleet.params.model_copy(update={"fleet": live_old.model_copy(update={"signing_key": str(missing)})})
    choice = FleetChoice(sim_fleet.inventory, (sim_fleet.inventory.board(BOARD),))
    logs = set((Path(params.stack.state_dir) / "rollouts").glob("*.json"))
    with pytest.raises(SigningError) as err:
        deploy_service.deploy(params, choice, releases.new, bench=False, record=False)
    assert str(err.value) == f"{missing}: no signing key there (fleet.signing_key; `nativelm fleet sim up` creates one)"
    assert set((Path(params.stack.state_dir) / "rollouts").glob("*.json")) == logs  # no rollout, no board touched
