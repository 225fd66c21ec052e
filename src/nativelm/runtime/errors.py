"""The one exception type of the board runtime.

The runtime ships alone to a board, so it cannot use `nativelm.errors`. Every failure caused by
the export folder, its files or the user's arguments is a `RuntimeFailure` whose message is one
line naming what is wrong and where; the CLI prints it as-is and exits with `exit_code`.
"""

from __future__ import annotations

import re


class RuntimeFailure(RuntimeError):
    """A failure of the model folder, its files or the arguments; the message is one clear line."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class BadArgument(RuntimeFailure):
    """An argument that cannot be used (a negative seed, too many threads, a prompt that is not UTF-8
    text): the caller's mistake, so the exit status is 2 as for any bad input."""

    exit_code = 2


def check_text(text: str, what: str) -> str:
    """`text` if it is valid UTF-8 text; an argument that came from bytes that are not (kept by Python
    as lone surrogates) is a BadArgument naming the first bad position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadArgument(f"{what} is not valid UTF-8 text (bad byte at character {exc.start})") from None
    return text


class MissingFile(RuntimeFailure):
    """A file the folder or its manifest names is not there."""


class IntegrityError(RuntimeFailure):
    """A file's sha256 differs from the one recorded in manifest.json."""


class ModelLoadError(RuntimeFailure):
    """ONNX Runtime could not load or run the model file (truncated, corrupt, wrong I/O)."""


class TokenizerMismatch(RuntimeFailure):
    """tokenizer.json is unreadable or does not belong to the model (vocabulary sizes differ)."""


class HealthCheckFailed(RuntimeFailure):
    """A golden prompt's greedy continuation differs from the one recorded at export."""


def one_line(text: object, limit: int = 400) -> str:
    """`text` squeezed to one line: whitespace runs become one space, long text is cut with '...'."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (ORT messages run over many lines)."""
    for line in str(exc).splitlines():
        if line.strip():
            return one_line(line, limit)
    return type(exc).__name__


def ort_reason(exc: BaseException) -> str:
    """ORT's message without its boilerplate: '[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model
    from PATH failed:Protobuf parsing failed.' -> 'INVALID_PROTOBUF: Protobuf parsing failed.'"""
    text = first_line(exc)
    match = re.match(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*(\w+)\s*:\s*(.*)$", text)
    if match:
        code, text = match.groups()
        text = re.sub(r"^Load model from .* failed:\s*", "", text)
        text = f"{code}: {text}"
    return text
