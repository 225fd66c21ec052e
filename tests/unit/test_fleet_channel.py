"""Pull mode's pure parts: the stable wave of a board, the channel document, the next channel of a
publish, a board's pull settings, and the board's SigV4 signature checked against botocore's."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from botocore import auth as botocore_auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from nativelm.fleet.agent import RUNTIME, AgentError
from nativelm.fleet.agent.channel import CHANNEL_FORMAT, in_wave, parse_channel, wanted_release, wave_position
from nativelm.fleet.agent.files import Layout
from nativelm.fleet.agent.pull_fetch import read_config
from nativelm.fleet.agent.store import Credentials, sigv4_headers
from nativelm.fleet.provision import pull_config
from nativelm.fleet.publish import next_channel
from nativelm.formats.release import RUNTIME_FILE
from nativelm.params.fleet import FleetParams, PullParams

BOARDS = [f"board-{i:05d}" for i in range(10000)]


def channel(**fields: object) -> dict:
    return {"format": CHANNEL_FORMAT, "channel": "stable", "serial": 3, "paused": False, "release": "v4",
            "percent": 10, "previous": "v3", **fields}


def test_wave_positions_are_stable_spread_and_nested() -> None:
    positions = [wave_position(b) for b in BOARDS]
    assert positions == [wave_position(b) for b in BOARDS]  # the same on every call (board and controller)
    assert all(0 <= p < 100 for p in positions)
    for percent in (1, 10, 50, 90):
        share = sum(in_wave(b, percent) for b in BOARDS) / len(BOARDS) * 100
        assert abs(share - percent) < 1.5, (percent, share)
    ten, fifty = ({b for b in BOARDS if in_wave(b, p)} for p in (10, 50))
    assert ten < fifty  # widening the ramp keeps every board that already took the release
    assert all(in_wave(b, 100) for b in BOARDS) and not any(in_wave(b, 0) for b in BOARDS)


def test_wanted_release_follows_the_wave() -> None:
    doc = parse_channel(channel(), "stable")
    wanted = {b: wanted_release(doc, b) for b in BOARDS[:500]}
    assert {b for b, r in wanted.items() if r == "v4"} == {b for b in BOARDS[:500] if in_wave(b, 10)}
    assert set(wanted.values()) == {"v3", "v4"}
    first = parse_channel(channel(previous=None, percent=0), "stable")
    assert wanted_release(first, BOARDS[0]) is None  # outside the wave and nothing before: keep what it has


@pytest.mark.parametrize(("fields", "problem"), [
    ({"format": "nativelm-release/1"}, "format is not"),
    ({"channel": "beta"}, "it names channel 'beta'"),
    ({"serial": 0}, "serial 0 is not a positive integer"),
    ({"serial": True}, "serial True"),
    ({"percent": 101}, "percent 101 is not a number in 0..100"),
    ({"percent": float("nan")}, "percent nan"),
    ({"paused": "no"}, "paused 'no' is not true or false"),
    ({"release": None}, "names no release"),
    ({"release": "../v4"}, "release '../v4' is not a release name"),
    ({"previous": "a b"}, "previous 'a b' is not a release name"),
    ({"extra": 1}, "unknown keys ['extra']"),
])
def test_a_bad_channel_is_refused_with_one_line(fields: dict, problem: str) -> None:
    with pytest.raises(AgentError) as caught:
        parse_channel(channel(**fields), "stable")
    assert str(caught.value).startswith("channel stable refused: ") and problem in str(caught.value)
    assert "\n" not in str(caught.value)


def test_next_channel_ramps_and_rolls_back() -> None:
    first = next_channel(None, "v3", 100)
    assert (first["serial"], first["release"], first["previous"]) == (1, "v3", None)
    ramp = next_channel(parse_channel(channel(**first, format=CHANNEL_FORMAT, channel="stable"), "stable"), "v4", 10)
    assert (ramp["serial"], ramp["release"], ramp["percent"], ramp["previous"]) == (2, "v4", 10, "v3")
    wider = next_channel(parse_channel(channel(**ramp), "stable"), "v4", 50)
    assert (wider["serial"], wider["previous"]) == (3, "v3")  # the same release widened: the others keep v3
    back = next_channel(parse_channel(channel(**wider), "stable"), "v3", 100)
    assert (back["serial"], back["release"], back["previous"]) == (4, "v3", "v4")


def test_pull_config_round_trips_and_bad_settings_are_one_line(tmp_path: Path) -> None:
    fleet = FleetParams(mode="pull", pull=PullParams(endpoint="http://store.example:9000", jitter_s=30))
    lay = Layout(tmp_path)
    lay.pull.mkdir()
    (lay.pull / "config.json").write_text(json.dumps(pull_config(fleet, "board-7")))
    config = read_config(lay)
    assert (config.endpoint, config.bucket, config.channel, config.board, config.jitter_s, config.keep) == (
        "http://store.example:9000", "fleet", "stable", "board-7", 30.0, fleet.keep_releases)
    (lay.pull / "config.json").write_text(json.dumps({**pull_config(fleet, "board-7"), "endpoint": "file:///etc"}))
    with pytest.raises(AgentError, match=r"pull/config.json: bad endpoint: 'file:///etc'"):
        read_config(lay)
    (lay.pull / "config.json").unlink()
    with pytest.raises(AgentError, match="pull mode is not set up on this board"):
        read_config(lay)


def test_the_board_signs_a_put_as_botocore_does(monkeypatch: pytest.MonkeyPatch) -> None:
    moment = datetime.datetime(2026, 12, 4, 18, 30, 5, tzinfo=datetime.UTC)
    url, body = "http://127.0.0.1:9000/fleet/status/board-1.json", b'{"outcome": "updated"}'
    ours = sigv4_headers("PUT", url, body, Credentials("board-1", "s3cr3t"), "us-east-1", moment)
    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda: moment.replace(tzinfo=None))
    request = AWSRequest(method="PUT", url=url, data=body)
    botocore_auth.S3SigV4Auth(BotoCredentials("board-1", "s3cr3t"), "s3", "us-east-1").add_auth(request)
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"] == "20261204T183005Z"
    assert "s3cr3t" not in repr(Credentials("board-1", "s3cr3t"))  # the secret never reaches a log line


def test_the_agent_knows_the_runtime_file_name() -> None:
    assert RUNTIME == RUNTIME_FILE  # the board cannot import nativelm.formats
