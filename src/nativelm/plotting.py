"""matplotlib for the PNGs nativelm writes (training curves, study charts): headless, written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display); imported on first use, it is slow to load."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Save through a temporary file and rename, so a half-written PNG is never left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def figure(path: Path | str, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """(fig, ax) of a new figure, saved to `path` when the block ends without an error, then closed."""
    plt = pyplot()
    fig, ax = plt.subplots(**kwargs)
    try:
        yield fig, ax
        save_png(fig, Path(path))
    finally:
        plt.close(fig)
