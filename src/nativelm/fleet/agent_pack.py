"""The board agent as it ships: one zipapp of the `nativelm.fleet.agent` package (built with the
runtime's reproducible zip builder, so an unchanged agent has unchanged bytes and is not re-sent),
and the same archive wrapped in a Python source for boards that have no agent yet.

Controller-side only: nothing on a board imports this module.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

from nativelm.fleet import agent
from nativelm.runtime.pack import zip_bytes

PACKAGE = "nativelm_agent"  # the agent package's name inside the archive (it imports only relatively)
MAIN = f'''"""nativelm board agent (zipapp): python3 {agent.AGENT_NAME} [--root DIR] COMMAND ARGS"""
from {PACKAGE}.cli import run

run()
'''

# Piped to `python3 - --root DIR COMMAND ARGS` (fleet/ssh.py, agent(inline=True)): imports the
# archive's modules from memory, so nothing is written on the board; they have no __file__ then.
INLINE = '''"""nativelm board agent, piped to python3 - --root DIR COMMAND ARGS: its zipapp, from memory."""
import base64
import importlib.util
import io
import sys
import zipfile

ARCHIVE = zipfile.ZipFile(io.BytesIO(base64.b64decode(%r)))


class MemoryImporter:
    """A meta path finder and loader for the modules in ARCHIVE."""

    def find_spec(self, name, path=None, target=None):
        base = name.replace(".", "/")
        for file, package in ((base + "/__init__.py", True), (base + ".py", False)):
            if file in ARCHIVE.namelist():
                return importlib.util.spec_from_loader(name, self, origin=file, is_package=package)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        origin = module.__spec__.origin
        exec(compile(ARCHIVE.read(origin), origin, "exec"), module.__dict__)


sys.meta_path.insert(0, MemoryImporter())
from %s.cli import run  # noqa: E402

run()
'''


def archive_files() -> dict[str, bytes]:
    """{name in the archive: content}: the zipapp's __main__.py and the agent package's modules."""
    package = Path(agent.__file__).resolve().parent
    files = {"__main__.py": MAIN.encode("utf-8")}
    for source in sorted(package.glob("*.py")):
        files[f"{PACKAGE}/{source.name}"] = source.read_bytes()
    return files


@functools.cache
def agent_bytes() -> bytes:
    """The agent zipapp (runnable as `python3 nativelm-agent.pyz COMMAND ARGS`)."""
    return zip_bytes(archive_files())


def inline_source() -> bytes:
    """A Python source that runs the agent when piped to `python3 - --root DIR COMMAND ARGS`."""
    return (INLINE % (base64.b64encode(agent_bytes()).decode("ascii"), PACKAGE)).encode("utf-8")

