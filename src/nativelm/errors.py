"""Errors that the `nativelm` command turns into one clear line instead of a traceback."""


class NativelmError(Exception):
    """A failure caused by the user's input or environment; its message is shown as-is."""

    exit_code = 1


class ParamsError(NativelmError):
    """params.yaml (or --params PATH) is missing, malformed, or holds an invalid value."""

    exit_code = 2
