"""Find and load nativelm's ONNX Runtime operator library (the `nativelm` domain; docs/kernels.md).

The library is looked for, in order: the path in $NATIVELM_OPS_LIBRARY; `libnativelm_ops.so` next to
the runtime zipapp; `<prefix>/lib/libnativelm_ops.so` of the interpreter running it (on a board:
`<root>/venv/lib/`, where `nativelm fleet provision` puts the board's build); the source checkout's
`native/build/<triple>/libnativelm_ops.so` (what `native/build.sh` writes). A missing library is no
error: `load_library` returns None and the caller runs the contrib-operator graph instead. A library
that is there but cannot be loaded (wrong architecture, truncated, a bad $NATIVELM_OPS_KERNEL) is one
clear `ModelLoadError`.

Only the standard library is imported here (onnxruntime's SessionOptions comes from the caller):
this module ships to boards.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ModelLoadError, first_line

LIBRARY = "libnativelm_ops.so"
ENV_LIBRARY = "NATIVELM_OPS_LIBRARY"
ENV_KERNEL = "NATIVELM_OPS_KERNEL"  # "portable" forces the C fallback (read by the library itself)
OPS_ENV = "NATIVELM_CUSTOM_OPS"  # "off" (or 0 / no / false): ignore the operator library, run the fallback
TRIPLES = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu",
           "arm64": "aarch64-linux-gnu"}


def _zipapp_dir(here: Path) -> Path | None:
    """The folder holding the zipapp this module runs from (None when it runs from plain files)."""
    for parent in here.parents:
        if parent.is_file():
            return parent.parent
    return None


def source_build(machine: str) -> Path | None:
    """Where the source checkout's `native/build.sh` writes the build for CPU architecture `machine`
    (`uname -m`); None for an architecture it does not build or when this module runs from a zipapp."""
    here = Path(__file__).resolve()
    triple = TRIPLES.get(machine.lower())
    if triple is None or _zipapp_dir(here) is not None or len(here.parents) <= 3:
        return None
    return here.parents[3] / "native" / "build" / triple / LIBRARY


def candidates() -> list[Path]:
    """Where the library may be, in the order they are tried."""
    found = [Path(os.environ[ENV_LIBRARY])] if os.environ.get(ENV_LIBRARY) else []
    zip_dir = _zipapp_dir(Path(__file__).resolve())
    if zip_dir is not None:
        found.append(zip_dir / LIBRARY)
    found.append(Path(sys.prefix) / "lib" / LIBRARY)
    build = source_build(platform.machine())
    if build is not None:
        found.append(build)
    return found


def find_library() -> Path | None:
    """The first candidate that exists, or None."""
    return next((path for path in candidates() if path.is_file()), None)


def kernel_name(path: Path) -> str:
    """The kernel the library at `path` would run now (e.g. "avxvnni", "neon-dot", "portable")."""
    try:
        lib = ctypes.CDLL(str(path))
        lib.nativelm_ops_kernel.restype = ctypes.c_char_p
    except (OSError, AttributeError) as exc:
        raise ModelLoadError(f"{path}: not a loadable nativelm operator library ({first_line(exc)})") from exc
    name = lib.nativelm_ops_kernel()
    if name is None:
        lib.nativelm_ops_kernels.restype = ctypes.c_char_p
        choices = lib.nativelm_ops_kernels().decode()
        raise ModelLoadError(f"{ENV_KERNEL}={os.environ.get(ENV_KERNEL)!r}: not a kernel this CPU runs "
                             f"(choose from: {choices})")
    return name.decode()


def load_library(options: Any, path: Path | None = None) -> str | None:
    """Register the library with an onnxruntime SessionOptions; the chosen kernel's name, or None when
    there is no library (the model must then be the contrib-operator export)."""
    path = path or find_library()
    if path is None:
        return None
    name = kernel_name(path)
    try:
        options.register_custom_ops_library(str(path))
    except Exception as exc:  # onnxruntime raises its own (non-exported) error types
        raise ModelLoadError(f"{path}: onnxruntime refused the operator library ({first_line(exc)})") from exc
    return name


class OpsLibrary(NamedTuple):
    """nativelm's operator library as found on this machine."""

    path: str  # the shared library ONNX Runtime registers
    kernel: str  # the kernel it chose for this CPU (e.g. avx2, neon, portable)


def find_ops_library() -> OpsLibrary | None:
    """The operator library and its kernel, or None when it is not here or `OPS_ENV` hides it; one that
    is here but will not load is a ModelLoadError."""
    if os.environ.get(OPS_ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return None
    path = find_library()
    return None if path is None else OpsLibrary(str(path), kernel_name(path))
