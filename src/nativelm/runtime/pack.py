"""Pack the board runtime into ONE file: a zipapp runnable as `python nativelm-runtime.pyz ...`.

The archive holds `nativelm/__init__.py` (a stub: only the version), `nativelm/jsonfile.py` (the
bounded manifest reader, standard library only), `nativelm/runtime/*.py`
(this package without `pack.py`) and a `__main__.py` calling the runtime's CLI. On the board it
needs Python with numpy, onnxruntime and tokenizers, nothing else.

The build is reproducible: entries are sorted and stamped with a fixed date, so the same sources
give the same bytes (and the same sha256: a rollout does not re-send an unchanged runtime).

    python -m nativelm.runtime.pack [--out dist/nativelm-runtime.pyz] [--python "/usr/bin/env python3"]

Build-time only: nothing at run time imports this module.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import zipapp
import zipfile
from collections.abc import Sequence
from pathlib import Path

from . import __version__

DEFAULT_OUT = Path("dist/nativelm-runtime.pyz")
DEFAULT_INTERPRETER = "/usr/bin/env python3"
FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip entry can hold
BUILD_ONLY = {"pack.py"}
SHIPPED_LEAVES = ("jsonfile.py",)  # stdlib-only modules of nativelm that the runtime imports  # build and test helpers, never imported on a board

MAIN = '''"""nativelm board runtime (zipapp): python nativelm-runtime.pyz {generate,bench,health} --model DIR ..."""
from nativelm.runtime.__main__ import run

run()
'''
PACKAGE_STUB = f'''"""nativelm, as shipped to a board: only the runtime sub-package."""

__version__ = {__version__!r}
'''


def archive_files() -> dict[str, bytes]:
    """{name in the archive: content} of the runtime as it ships."""
    package = Path(__file__).resolve().parent
    files = {"__main__.py": MAIN.encode("utf-8"), "nativelm/__init__.py": PACKAGE_STUB.encode("utf-8")}
    for shared in SHIPPED_LEAVES:
        files[f"nativelm/{shared}"] = (package.parent / shared).read_bytes()
    for source in sorted(package.glob("*.py")):
        if source.name not in BUILD_ONLY:
            files[f"nativelm/runtime/{source.name}"] = source.read_bytes()
    return files


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A reproducible zip of `files` (sorted, fixed dates); with a `__main__.py` it is a zipapp."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])
    return buffer.getvalue()


def build_zipapp(out: str | os.PathLike[str] = DEFAULT_OUT, interpreter: str | None = DEFAULT_INTERPRETER) -> Path:
    """Write the runtime zipapp to `out` (atomically: a temp file beside it, then a rename); its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_zip = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".zip", dir=out.parent)
    tmp_out = Path(f"{tmp_zip[:-4]}.pyz")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(zip_bytes(archive_files()))
        # from an existing archive create_archive copies it, adding the interpreter line (#!)
        zipapp.create_archive(tmp_zip, tmp_out, interpreter=interpreter)
        if interpreter:  # runnable as ./nativelm-runtime.pyz too
            tmp_out.chmod(0o755)
        os.replace(tmp_out, out)
    finally:
        for leftover in (tmp_zip, tmp_out):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nativelm.runtime.pack", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the .pyz to write (default {DEFAULT_OUT})")
    parser.add_argument("--python", default=DEFAULT_INTERPRETER,
                        help=f"interpreter line of the archive (default {DEFAULT_INTERPRETER!r})")
    args = parser.parse_args(argv)
    path = build_zipapp(args.out, args.python or None)
    print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
