"""The controller's signing helpers with the real ssh-keygen: keys, signatures, allowed_signers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nativelm.fleet.agent import SIGNER, SIGNING_NAMESPACE
from nativelm.fleet.signing import (
    SigningError,
    allowed_signers_line,
    allowed_signers_text,
    create_signing_key,
    sign_manifest,
)


def verifies(manifest: Path, signature: Path, signers: Path) -> bool:
    with open(manifest, "rb") as stdin:
        return subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(signers), "-I", SIGNER, "-n",
                               SIGNING_NAMESPACE, "-s", str(signature)], stdin=stdin,
                              capture_output=True, check=False).returncode == 0


def test_a_created_key_signs_what_its_allowed_signers_line_accepts(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "release"
    assert create_signing_key(key) is True
    before = key.read_bytes()
    assert create_signing_key(key) is False and key.read_bytes() == before  # never replaced
    manifest = tmp_path / "release.json"
    manifest.write_text('{"format": 1}')
    signature = sign_manifest(manifest, key, tmp_path / "release.json.sig")
    assert signature.read_text().startswith("-----BEGIN SSH SIGNATURE-----")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys", "release.json", "release.json.sig"]
    signers = tmp_path / "allowed_signers"
    other = tmp_path / "other"
    create_signing_key(other)
    signers.write_text(allowed_signers_text([f"{other}.pub", f"{key}.pub"]))  # rotation: both accepted
    assert verifies(manifest, signature, signers)
    signers.write_text(allowed_signers_text([f"{other}.pub"]))
    assert not verifies(manifest, signature, signers)


def test_allowed_signers_line_limits_the_key_to_release_signatures(tmp_path: Path) -> None:
    pub = tmp_path / "k.pub"
    pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB4x someone@host\n")
    assert allowed_signers_line(pub) == (
        'nativelm-release namespaces="nativelm-release,nativelm-channel" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB4x')


@pytest.mark.parametrize(("content", "problem"), [
    (None, "cannot read the public key"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "not an OpenSSH public key"),
    ("ssh-ed25519 AAAA\nssh-ed25519 BBBB", "not an OpenSSH public key"),
])
def test_a_bad_public_key_is_one_line_naming_the_file(tmp_path: Path, content: str | None, problem: str) -> None:
    pub = tmp_path / "k.pub"
    if content is not None:
        pub.write_text(content)
    with pytest.raises(SigningError, match=problem) as caught:
        allowed_signers_text([str(pub)])
    assert str(pub) in str(caught.value) and "\n" not in str(caught.value)


def test_signing_without_a_key_names_the_missing_key(tmp_path: Path) -> None:
    manifest = tmp_path / "release.json"
    manifest.write_text("{}")
    with pytest.raises(SigningError, match="no signing key there"):
        sign_manifest(manifest, tmp_path / "absent", tmp_path / "release.json.sig")
    assert not (tmp_path / "release.json.sig").exists()
