"""A release is activated only if its release.json carries a signature by a provisioned key.

The board checks with OpenSSH's own `ssh-keygen -Y verify` (nothing else to install), against
<root>/keys/allowed_signers, which `nativelm fleet provision` writes (docs/fleet.md, key rotation).
"""

from __future__ import annotations

import subprocess

from . import RELEASE_MANIFEST, SIGNATURE, SIGNER, SIGNING_NAMESPACE, AgentError
from .files import Layout

VERIFY_TIMEOUT_S = 60


def check_signature(lay: Layout, release: str) -> None:
    """Raise one line unless the release's release.json.sig verifies against allowed_signers."""
    folder = lay.release(release)
    signers = lay.allowed_signers
    if not signers.is_file():
        raise AgentError(f"release {release} refused: no {signers.name} on this board (run `nativelm fleet provision`)")
    signature = folder / SIGNATURE
    if not signature.is_file():
        raise AgentError(f"release {release} refused: not signed (no {SIGNATURE})")
    argv = ["ssh-keygen", "-Y", "verify", "-f", str(signers), "-I", SIGNER, "-n", SIGNING_NAMESPACE,
            "-s", str(signature)]
    with open(folder / RELEASE_MANIFEST, "rb") as manifest:
        done = subprocess.run(argv, stdin=manifest, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
    if done.returncode != 0:
        why = ((done.stderr + done.stdout).strip().splitlines() or ["ssh-keygen failed"])[-1]
        raise AgentError(f"release {release} refused: {RELEASE_MANIFEST} signature does not verify "
                         f"against {signers.name} ({why})")
