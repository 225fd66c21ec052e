"""Health check of an installed model: its files verify and every golden prompt still continues
exactly as it did at export.

manifest.json's `golden` is either a list of entries or `{"prompts": [entries], ...}` (the exporter's
layout, which also records `max_new_tokens` and `stop_at_eos`). An entry has a prompt — `prompt`
(text) and/or `prompt_ids` / `prompt_tokens` (ids, preferred: the exact encoding used at export) —
and what it continued with: `tokens` / `continuation_ids` (ids) or, lacking ids, `text` /
`continuation_text`. With ids, exactly that many tokens are generated greedily, eos not stopping,
and compared id by id; with text only, the greedy continuation must begin with that text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .errors import HealthCheckFailed, RuntimeFailure, one_line
from .generate import GREEDY, generate, stream
from .session import MANIFEST, Model

PROMPT_ID_KEYS = ("prompt_ids", "prompt_tokens")
TOKEN_KEYS = ("tokens", "continuation_ids")
TEXT_KEYS = ("text", "continuation_text")


class Golden(NamedTuple):
    """One golden prompt, normalised."""

    name: str  # 'golden prompt 2 of 3 ('The king')': how failures name it
    prompt: str | list[int]
    tokens: list[int] | None
    text: str | None


def _first_key(entry: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if entry.get(key) is not None:
            return entry[key]
    return None


def _ids(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise RuntimeFailure(f"{MANIFEST}: {what} is not a list of token ids")
    return list(value)


def golden_entries(model: Model) -> list[Golden]:
    """The manifest's golden prompts; none is a failure (there would be nothing to check)."""
    golden = model.golden
    entries = golden.get("prompts") if isinstance(golden, dict) else golden
    if not isinstance(entries, list) or not entries:
        raise HealthCheckFailed(f"{model.folder / MANIFEST}: has no golden prompts to check")
    result = []
    for i, entry in enumerate(entries):
        what = f"golden entry {i + 1}"
        if not isinstance(entry, dict):
            raise RuntimeFailure(f"{MANIFEST}: {what} is not an object")
        ids, text_prompt = _first_key(entry, PROMPT_ID_KEYS), entry.get("prompt")
        if ids is None and not isinstance(text_prompt, str):
            raise RuntimeFailure(f"{MANIFEST}: {what} has no prompt (prompt or prompt_ids)")
        prompt = _ids(ids, f"{what} prompt ids") if ids is not None else text_prompt
        tokens, text = _first_key(entry, TOKEN_KEYS), _first_key(entry, TEXT_KEYS)
        if tokens is None and not isinstance(text, str):
            raise RuntimeFailure(f"{MANIFEST}: {what} has no continuation (tokens or text)")
        shown = repr(one_line(text_prompt, 40)) if isinstance(text_prompt, str) else f"{len(prompt)} token ids"
        result.append(Golden(f"golden prompt {i + 1} of {len(entries)} ({shown})", prompt,
                             None if tokens is None else _ids(tokens, f"{what} tokens"), text))
    return result


def check_entry(model: Model, golden: Golden) -> None:
    """Raise HealthCheckFailed (one line naming the prompt) when `golden` is not reproduced."""
    if golden.tokens is not None:
        expected = golden.tokens
        got = generate(model, golden.prompt, max_new_tokens=len(expected), sampling=GREEDY,
                       stop_at_eos=False).token_ids
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
                      min(len(expected), len(got)))
            want = expected[at] if at < len(expected) else "(end)"
            have = got[at] if at < len(got) else "(end: the model's context is full)"
            raise HealthCheckFailed(f"{golden.name} differed at token {at + 1} of {len(expected)}: "
                                    f"expected {want}, got {have}")
        return
    expected_text = str(golden.text)
    text = ""
    for piece in stream(model, golden.prompt, max_new_tokens=4 * len(expected_text.encode("utf-8")) + 8):
        text += piece
        if len(text) >= len(expected_text):
            break
    if not text.startswith(expected_text):
        at = next((i for i, (a, b) in enumerate(zip(expected_text, text, strict=False)) if a != b), len(text))
        raise HealthCheckFailed(f"{golden.name} differed at character {at + 1}: expected "
                                f"{expected_text[at:at + 20]!r}, got {text[at:at + 20]!r}")


def check_health(model: Model) -> int:
    """Check every golden prompt (the files were verified when the model was loaded); their count."""
    entries = golden_entries(model)
    for golden in entries:
        check_entry(model, golden)
    return len(entries)
