"""A release is activated only if its release.json carries a signature by a provisioned key; a pull
channel is followed only if its channel.json does (docs/fleet.md, docs/fleet-at-scale.md).

The board checks with OpenSSH's own `ssh-keygen -Y verify` (nothing else to install), against
<root>/keys/allowed_signers, which `nativelm fleet provision` writes (docs/fleet.md, key rotation).
Releases and channels are signed in different namespaces, so one can never pass for the other.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import RELEASE_MANIFEST, SIGNATURE, SIGNER, SIGNING_NAMESPACE, AgentError
from .files import Layout

VERIFY_TIMEOUT_S = 60


def check_signed(lay: Layout, data: Path, signature: Path, namespace: str, what: str) -> None:
    """Raise `<what> refused: ...` (one line) unless `signature` is a signature of `data` in `namespace`
    by a key of allowed_signers."""
    signers = lay.allowed_signers
    if not signers.is_file():
        raise AgentError(f"{what} refused: no {signers.name} on this board (run `nativelm fleet provision`)")
    if not signature.is_file():
        raise AgentError(f"{what} refused: not signed (no {signature.name})")
    argv = ["ssh-keygen", "-Y", "verify", "-f", str(signers), "-I", SIGNER, "-n", namespace, "-s", str(signature)]
    with open(data, "rb") as signed_file:
        done = subprocess.run(argv, stdin=signed_file, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
    if done.returncode != 0:
        why = ((done.stderr + done.stdout).strip().splitlines() or ["ssh-keygen failed"])[-1]
        raise AgentError(f"{what} refused: {data.name} signature does not verify against {signers.name} ({why})")


def check_signature(lay: Layout, release: str) -> None:
    """Raise one line unless the release's release.json.sig verifies against allowed_signers."""
    folder = lay.release(release)
    check_signed(lay, folder / RELEASE_MANIFEST, folder / SIGNATURE, SIGNING_NAMESPACE, f"release {release}")
