"""params.yaml validation: every bad file gives one ParamsError line naming the key; good files load."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nativelm.errors import ParamsError
from nativelm.params.root import Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


def test_repository_params_equal_embedded_defaults() -> None:
    assert load_params(REPO / "params.yaml") == Params()


def test_every_knob_in_params_yaml_has_a_comment() -> None:
    """Every leaf key line in params.yaml carries a comment (its meaning), as the README promises."""
    uncommented = []
    previous = ""
    for number, line in enumerate((REPO / "params.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        # same line, the line above, or an item of a list whose key line is documented
        documented = "#" in line or previous.startswith("#") or stripped.startswith("- ")
        if stripped and not stripped.startswith("#") and not stripped.endswith(":") and not documented:
            uncommented.append(f"{number}: {stripped}")
        previous = stripped or previous
    assert not uncommented, uncommented


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("data: {tokenizer: {vocab_size: '4096'}}", "data.tokenizer.vocab_size"),
        ("data: {tokenizer: {vocab_size: 12}}", "data.tokenizer.vocab_size"),
        ("data: {toknizer: {}}", "data.toknizer: unknown key"),
        ("seed: -3", "seed"),
        ("stack: {mlflow_port: 80}", "stack.mlflow_port"),
        ("data: {split: {val_fraction: 0.9}}", "data.split.val_fraction"),
        ("data: {source: {kind: ftp}}", "data.source.kind"),
        ("data: {source: {kind: local}}", "needs `paths`"),
        ("data: {source: {kind: url, url: 'ssh://x'}}", "url must start"),
        ("data: {source: {sha256: abc}}", "data.source.sha256"),
        ("seed: 1\nseed: 2\n", "given twice"),
        ("data: [1, 2", "invalid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_values_name_the_key(text: str, fragment: str) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(text, "p.yaml")
    message = str(info.value)
    assert fragment in message
    assert message.startswith("p.yaml")
    assert "\n" not in message


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"seed: \xff\xfe\n")
    with pytest.raises(ParamsError, match="not UTF-8"):
        load_params(bad)
    with pytest.raises(ParamsError, match="is a folder"):
        load_params(tmp_path)


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_paths(value, (*prefix, key)))
    return out


DEFAULTS = Params().model_dump(mode="json")
KEY_PATHS = _paths(DEFAULTS)
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
    st.text(string.printable, max_size=12), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(path=st.sampled_from(KEY_PATHS), value=junk)
def test_any_replaced_value_loads_or_fails_with_one_line(path: tuple, value: object) -> None:
    """Replacing any value with junk either validates or raises ParamsError naming that key."""
    tree = yaml.safe_load(yaml.safe_dump(DEFAULTS))
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    text = yaml.safe_dump(tree)
    try:
        parse_params(text, "h.yaml")
    except ParamsError as exc:
        message = str(exc)
        assert "\n" not in message
        dotted = ".".join(path)
        assert dotted.split(".")[0] in message  # the section is named at least
        assert message.startswith("h.yaml")


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(KEY_PATHS), name=st.text(string.ascii_lowercase + "_", min_size=1, max_size=10))
def test_unknown_keys_are_refused(path: tuple, name: str) -> None:
    tree = yaml.safe_load(yaml.safe_dump(DEFAULTS))
    node = tree
    for key in path[:-1]:
        node = node[key]
    if not isinstance(node, dict) or name in node:
        return
    node[name] = 1
    with pytest.raises(ParamsError, match="unknown key"):
        parse_params(yaml.safe_dump(tree), "h.yaml")


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=200) | st.text(max_size=200))
def test_garbage_files_never_crash(blob: bytes | str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("g") / "params.yaml"
    if isinstance(blob, str):
        path.write_text(blob, encoding="utf-8")
    else:
        path.write_bytes(blob)
    try:
        load_params(path)
    except ParamsError as exc:
        assert "\n" not in str(exc)
