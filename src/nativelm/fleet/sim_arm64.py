"""The userland of a simulated ARM64 board: Debian's arm64 Python run under qemu-user (docs/fleet.md).

Only the board's Python (and what it loads) is emulated: its sshd is the host's x86-64 OpenSSH, like
every simulated board's. The userland is a folder of Debian arm64 packages, built once and cached
(``fleet.sim.arm64_rootfs``, default ``.nativelm/arm64-rootfs``):

- apt resolves ``ARM64_PACKAGES`` and their dependency closure for arm64 with a private state and
  cache under ``<rootfs>.apt/`` (the host's sources and keys, its dpkg database untouched: no
  ``dpkg --add-architecture``) and downloads the .debs; ``dpkg-deb -x`` unpacks each into the folder
  (no maintainer scripts run, no root needed);
- ``usr/bin/python3-qemu`` is the board's ``python``: a shell script running the arm64
  ``python3.11`` as ``qemu-aarch64 -L <rootfs> -0 <its own path>``. ``-L`` makes the guest find its
  loader, libraries and standard library in the folder; ``-0`` gives Python the wrapper's path as
  ``sys.executable``, so ``python -m venv`` links the venv's ``bin/python`` to the wrapper and
  ``venv/bin/python`` (pip, the runtime) runs emulated too, without binfmt_misc;
- ``proc/cpuinfo`` describes Cortex-A76 cores (the CPU of an RK3588 or a Raspberry Pi 5): under
  ``-L`` the guest reads it instead of the host's x86 one, which ONNX Runtime's CPU probe cannot
  parse on ARM64 (it crashes). qemu's default CPU model ("max") has NEON and the dot-product
  extension, so the operator library runs its ``neon-dot`` kernel.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from nativelm.errors import NativelmError
from nativelm.fsutil import atomic_dir, atomic_write_text
from nativelm.stack.process import file_lock

# python3.11-venv brings ensurepip's wheels; libstdc++6 is what onnxruntime's wheel links against
ARM64_PACKAGES = ("python3.11", "python3.11-venv", "libstdc++6")
WRAPPER = "usr/bin/python3-qemu"
STAMP = ".complete"
TOOLS = {"qemu-aarch64": "qemu-user", "apt-get": "apt", "dpkg-deb": "dpkg"}
_CORE = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
         "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
         "CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n")
_CORES = 256  # more entries than any host has CPUs: the probe keeps those the host's /sys lists


class PackagesUnavailable(NativelmError):
    """apt could not fetch Debian's arm64 packages (no network, no mirror): nothing was built."""


def missing_tools() -> list[str]:
    """The host tools an ARM64 board needs that are not installed, as 'tool (package)'."""
    return [f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]


def wrapper_path(rootfs: Path) -> Path:
    """The board's `python` (the inventory's `python:` of an ARM64 board)."""
    return rootfs / WRAPPER


def rootfs_stamp(rootfs: Path) -> str:
    """What a built userland records: a folder built for other packages, moved, or whose wrapper names
    another qemu is built again."""
    return json.dumps({"packages": list(ARM64_PACKAGES), "folder": str(rootfs), "qemu": shutil.which("qemu-aarch64")})


def ensure_rootfs(rootfs: Path) -> Path:
    """Build the arm64 userland at `rootfs` unless it is there already (module docstring); the wrapper's path.

    NativelmError (one line) when qemu-user or apt is missing or the packages cannot be downloaded; a
    failed build leaves what was there before.
    """
    missing = missing_tools()
    if missing:
        raise NativelmError(f"a simulated ARM64 board needs {', '.join(missing)}: "
                            f"bash infra/setup.sh dev installs them")
    stamp = rootfs_stamp(rootfs)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(rootfs.parent / f".{rootfs.name}.lock"):
        if (rootfs / STAMP).is_file() and (rootfs / STAMP).read_text() == stamp:
            return wrapper_path(rootfs)
        debs = download_packages(rootfs.with_name(rootfs.name + ".apt"))
        with atomic_dir(rootfs) as tmp:
            for deb in debs:
                run_tool(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
            write_wrapper(tmp, rootfs)
            (tmp / "proc").mkdir(exist_ok=True)
            atomic_write_text(tmp / "proc" / "cpuinfo", "\n".join(_CORE.format(i=i) for i in range(_CORES)))
            atomic_write_text(tmp / STAMP, stamp)
    return wrapper_path(rootfs)


def download_packages(work: Path) -> list[Path]:
    """The .debs of ARM64_PACKAGES and their dependency closure for arm64, downloaded into `work`."""
    state, cache = work / "state", work / "cache"
    for folder in (state / "lists" / "partial", cache / "archives" / "partial"):
        folder.mkdir(parents=True, exist_ok=True)
    status = state / "status"  # an empty dpkg database: apt downloads the whole closure
    status.write_text("")
    config = work / "apt.conf"
    atomic_write_text(config, "\n".join([
        'APT::Architecture "arm64";', 'APT::Architectures { "arm64"; };',
        f'Dir::State "{state}";', f'Dir::State::status "{status}";', f'Dir::Cache "{cache}";',
        'Dir::Etc::Preferences "/dev/null";', 'Dir::Etc::PreferencesParts "/dev/null";',
        'APT::Install-Recommends "false";', 'APT::Sandbox::User "root";', ""]))
    env = {"APT_CONFIG": str(config)}
    for old in (cache / "archives").glob("*.deb"):
        old.unlink()
    try:
        run_tool(["apt-get", "-q", "update"], "apt-get update for arm64", env)
        run_tool(["apt-get", "-q", "-y", "--download-only", "install", *ARM64_PACKAGES],
                 f"downloading {' '.join(ARM64_PACKAGES)} for arm64", env)
    except NativelmError as exc:
        raise PackagesUnavailable(str(exc)) from None
    debs = sorted((cache / "archives").glob("*.deb"))
    if not debs:
        raise PackagesUnavailable(f"apt downloaded no arm64 packages into {cache / 'archives'}")
    return debs


def write_wrapper(tmp: Path, rootfs: Path) -> None:
    """The board's `python` in the folder being built at `tmp`, naming the folder's final path `rootfs`."""
    qemu = shutil.which("qemu-aarch64")
    script = "\n".join([
        "#!/bin/sh",
        "# A simulated ARM64 board's python: Debian's arm64 python3.11 under qemu-user (nativelm docs/fleet.md).",
        f"exec {shlex.quote(str(qemu))} -L {shlex.quote(str(rootfs))} -0 \"$0\" "
        f"{shlex.quote(str(rootfs / 'usr/bin/python3.11'))} \"$@\"",
        ""])
    (tmp / WRAPPER).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tmp / WRAPPER, script)
    (tmp / WRAPPER).chmod(0o755)


def run_tool(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run a host tool; NativelmError naming `what` and the tool's last error line when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("E:", "dpkg-deb: error"))]
        raise NativelmError(f"{what} failed: {(errors or lines or [f'exit status {result.returncode}'])[-1]}")
