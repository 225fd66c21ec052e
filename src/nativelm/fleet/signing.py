"""Release signing on the controller: `ssh-keygen -Y sign` of release.json, and allowed_signers.

Each board job signs the release manifest with `fleet.signing_key` and sends release.json.sig
with the release; boards refuse any release whose signature does not verify against the
allowed_signers file provisioning wrote from `fleet.allowed_signers` (docs/fleet.md).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nativelm.errors import NativelmError
from nativelm.fleet.agent import CHANNEL_NAMESPACE, RELEASE_MANIFEST, SIGNATURE, SIGNER, SIGNING_NAMESPACE
from nativelm.fsutil import sha256_file

if TYPE_CHECKING:
    from nativelm.fleet.release import LocalRelease

KEYGEN_TIMEOUT_S = 60
PUBLIC_KEY = re.compile(r"((?:ssh|ecdsa|sk)-[A-Za-z0-9@.-]+) ([A-Za-z0-9+/]+={0,2})(?: .*)?")
_SIGNATURES = tempfile.TemporaryDirectory(prefix="nativelm-signatures-")  # removed at exit


class SigningError(NativelmError):
    """A key that cannot sign or be read: one line naming the file."""


def _keygen(argv: Sequence[str], what: str) -> None:
    done = subprocess.run(["ssh-keygen", *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=KEYGEN_TIMEOUT_S)
    if done.returncode != 0:
        raise SigningError(f"{what}: " + (done.stderr.strip().splitlines() or ["ssh-keygen failed"])[-1])


def create_signing_key(key: Path) -> bool:
    """Create an unencrypted ed25519 key pair at `key` (and key.pub) unless it exists; True if created."""
    if key.is_file():
        return False
    key.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=key.parent) as tmp:
        fresh = Path(tmp) / key.name
        _keygen(["-q", "-t", "ed25519", "-N", "", "-C", SIGNER, "-f", str(fresh)], f"{key}: cannot create")
        fresh.with_name(key.name + ".pub").replace(key.with_name(key.name + ".pub"))
        fresh.replace(key)
    return True


def sign_manifest(manifest: Path, key: Path, into: Path, namespace: str = SIGNING_NAMESPACE) -> Path:
    """Write the signature of `manifest` made with `key` in `namespace` to `into` (a fresh file); return `into`."""
    if not key.is_file():
        raise SigningError(f"{key}: no signing key there (fleet.signing_key; `nativelm fleet sim up` creates one)")
    with tempfile.TemporaryDirectory(dir=into.parent) as tmp:
        copy = Path(tmp) / RELEASE_MANIFEST
        copy.write_bytes(manifest.read_bytes())
        _keygen(["-q", "-Y", "sign", "-f", str(key), "-n", namespace, str(copy)],
                f"{key}: cannot sign {manifest}")
        copy.with_name(SIGNATURE).replace(into)
    return into


def signed(release: LocalRelease, key: Path) -> LocalRelease:
    """`release` with release.json.sig among its files (kept as it is when it carries one already)."""
    from nativelm.fleet.release import ReleaseFile  # here: `fleet sim` commands never load the registry client

    if SIGNATURE in release.files:
        return release
    into = Path(tempfile.mkstemp(dir=_SIGNATURES.name, suffix="." + SIGNATURE)[1])
    sign_manifest(release.files[RELEASE_MANIFEST].path, key, into)
    sig = ReleaseFile(into, sha256_file(into), into.stat().st_size)
    return dataclasses.replace(release, files={**release.files, SIGNATURE: sig})


def allowed_signers_line(public_key: Path) -> str:
    """The allowed_signers line that lets `public_key` sign releases and pull channels (and nothing else)."""
    try:
        text = public_key.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SigningError(f"{public_key}: cannot read the public key ({exc})") from None
    found = PUBLIC_KEY.fullmatch(text)
    if not found:
        raise SigningError(f"{public_key}: not an OpenSSH public key (one line: TYPE BASE64 [COMMENT])")
    return f'{SIGNER} namespaces="{SIGNING_NAMESPACE},{CHANNEL_NAMESPACE}" {found.group(1)} {found.group(2)}'


def allowed_signers_text(public_keys: Sequence[str]) -> str:
    """The whole allowed_signers file: one line per accepted key (several while a key rotates)."""
    if not public_keys:
        raise SigningError("fleet.allowed_signers is empty: boards would accept no release")
    return "".join(allowed_signers_line(Path(key)) + "\n" for key in public_keys)
