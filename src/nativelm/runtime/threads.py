"""How many ONNX Runtime intra-op threads a session runs: every CPU this process may use by default,
and never more than 4 x the CPUs (a request past that is a BadArgument, exit 2).

Standard library only: this module ships to boards.
"""

from __future__ import annotations

import os

from .errors import BadArgument


def default_threads() -> int:
    """The CPUs this process may run on (a board's cores, or a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    """The most intra-op threads a session may ask for: 4 x this machine's CPUs (more only oversubscribes
    the cores; ONNX Runtime would spend minutes creating 100000 threads)."""
    return 4 * max(1, os.cpu_count() or 1)


def check_threads(threads: int) -> int:
    """`threads` if it is between 1 and max_threads(); a BadArgument otherwise."""
    if not 1 <= threads <= max_threads():
        raise BadArgument(f"threads must be between 1 and {max_threads()} (4 x the {os.cpu_count()} CPUs), "
                          f"got {threads}")
    return threads
