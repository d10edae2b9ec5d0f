"""SSH signatures (SSHSIG) and allowed_signers, against the real OpenSSH both ways.

Plain ed25519 keys are made and used by the real `ssh-keygen`; FIDO keys
(sk-ssh-ed25519@openssh.com) by a software authenticator written here exactly as
PROTOCOL.u2f and PROTOCOL.sshsig say, whose signatures the real `ssh-keygen -Y verify`
must accept: so the verifier in annofs and OpenSSH agree on what a token's signature is.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import subprocess
from pathlib import Path

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annofs.errors import UsageError
from annofs.trust.allowed_signers import load_allowed_signers, parse_allowed_signers
from annofs.trust.sshsig import (
    FLAG_USER_PRESENT,
    FLAG_USER_VERIFIED,
    MAGIC,
    SK_ED25519,
    SshPublicKey,
    SshSigError,
    parse_signature,
    sign_with_ssh_keygen,
    verify,
)

MESSAGE = b'{"_type": "https://in-toto.io/Statement/v1", "subject": []}\n'


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def ssh_keygen(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ssh-keygen", *args], input=input, capture_output=True, check=False)


@pytest.fixture
def ed_key(tmp_path: Path) -> Path:
    key = tmp_path / "id_ed25519"
    assert ssh_keygen("-q", "-t", "ed25519", "-N", "", "-C", "alice@example",
                      "-f", str(key)).returncode == 0
    return key


class SoftToken:
    """A FIDO authenticator in software: an Ed25519 key behind an application string,
    signing what PROTOCOL.u2f says a token signs, with chosen flags and counter."""

    def __init__(self, application: str = "ssh:") -> None:
        self.sk = nacl.signing.SigningKey.generate()
        self.application = application
        self.counter = 0

    @property
    def public(self) -> SshPublicKey:
        return SshPublicKey(SK_ED25519, bytes(self.sk.verify_key), self.application)

    def sshsig(self, message: bytes, namespace: str = "annofs",
               flags: int = FLAG_USER_PRESENT, hash_algorithm: str = "sha512") -> str:
        h = hashlib.new(hash_algorithm, message).digest()
        signed_data = (MAGIC + _string(namespace.encode()) + _string(b"")
                       + _string(hash_algorithm.encode()) + _string(h))
        self.counter += 1
        u2f = (hashlib.sha256(self.application.encode()).digest() + bytes([flags])
               + struct.pack(">I", self.counter) + hashlib.sha256(signed_data).digest())
        raw = self.sk.sign(u2f).signature
        sig_blob = (_string(SK_ED25519.encode()) + _string(raw) + bytes([flags])
                    + struct.pack(">I", self.counter))
        blob = (MAGIC + struct.pack(">I", 1) + _string(self.public.blob)
                + _string(namespace.encode()) + _string(b"") + _string(hash_algorithm.encode())
                + _string(sig_blob))
        b64 = base64.b64encode(blob).decode()
        lines = [b64[i:i + 70] for i in range(0, len(b64), 70)]
        return "\n".join(["-----BEGIN SSH SIGNATURE-----", *lines,
                          "-----END SSH SIGNATURE-----"]) + "\n"


def openssh_verifies(tmp_path: Path, public: str, signature: str, message: bytes,
                     principal: str = "alice", options: str = "") -> bool:
    signers = tmp_path / "allowed_signers"
    signers.write_text(f"{principal} {options + ' ' if options else ''}{public}\n")
    sig = tmp_path / "msg.sig"
    sig.write_text(signature)
    proc = ssh_keygen("-Y", "verify", "-f", str(signers), "-I", principal, "-n", "annofs",
                      "-s", str(sig), input=message)
    return proc.returncode == 0


def test_an_ssh_keygen_signature_verifies_here(ed_key: Path) -> None:
    armored = sign_with_ssh_keygen(ed_key, MESSAGE)
    sig = parse_signature(armored)
    ok = verify(sig, MESSAGE)
    public = SshPublicKey.from_text(ed_key.with_suffix(".pub").read_text())
    assert ok.public_key == public and ok.user_present
    listed = ssh_keygen("-l", "-E", "sha256", "-f", str(ed_key.with_suffix(".pub")))
    assert public.fingerprint == listed.stdout.decode().split()[1]
    with pytest.raises(SshSigError, match="does not verify"):
        verify(sig, MESSAGE + b" ")
    with pytest.raises(SshSigError, match="namespace 'annofs', not 'git'"):
        verify(sig, MESSAGE, namespace="git")


def test_a_software_fido_signature_is_accepted_by_openssh_and_here(tmp_path: Path) -> None:
    token = SoftToken()
    armored = token.sshsig(MESSAGE, flags=FLAG_USER_PRESENT | FLAG_USER_VERIFIED)
    assert openssh_verifies(tmp_path, token.public.to_text(), armored, MESSAGE)
    assert not openssh_verifies(tmp_path, token.public.to_text(), armored, MESSAGE + b"x")
    ok = verify(parse_signature(armored), MESSAGE)
    assert ok.user_present and ok.user_verified and ok.public_key == token.public


def test_a_signature_made_without_a_touch_says_so(tmp_path: Path) -> None:
    token = SoftToken()
    armored = token.sshsig(MESSAGE, flags=0)
    # OpenSSH 9.2's `-Y verify` accepts it (it does not look at the flags: only sshd
    # does, for authorized_keys); annofs reports the missing touch, and a policy rule
    # with user-presence refuses it.
    assert openssh_verifies(tmp_path, token.public.to_text(), armored, MESSAGE)
    ok = verify(parse_signature(armored), MESSAGE)
    assert not ok.user_present and not ok.user_verified


def test_the_application_is_bound(tmp_path: Path) -> None:
    token = SoftToken("ssh:work")
    armored = token.sshsig(MESSAGE)
    sig = parse_signature(armored)
    assert verify(sig, MESSAGE).public_key.application == "ssh:work"
    # The same key claimed under another application is another key, and fails.
    other = SshPublicKey(SK_ED25519, token.public.key, "ssh:")
    forged = type(sig)(other, sig.namespace, sig.hash_algorithm, sig.signature, sig.flags,
                       sig.counter)
    with pytest.raises(SshSigError, match="does not verify"):
        verify(forged, MESSAGE)


def test_rsa_and_ecdsa_keys_are_refused_by_name(tmp_path: Path) -> None:
    for kind, name in (("rsa", "ssh-rsa"), ("ecdsa", "ecdsa-sha2-nistp256")):
        key = tmp_path / f"id_{kind}"
        assert ssh_keygen("-q", "-t", kind, "-N", "", "-f", str(key)).returncode == 0
        with pytest.raises(SshSigError, match=f"{name} keys are not supported"):
            SshPublicKey.from_text(key.with_suffix(".pub").read_text())
        armored = sign_with_ssh_keygen(key, MESSAGE)
        with pytest.raises(SshSigError, match=f"{name} keys are not supported"):
            parse_signature(armored)


def test_signing_with_a_missing_key_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="ssh-keygen could not sign") as e:
        sign_with_ssh_keygen(tmp_path / "missing", MESSAGE)
    assert "\n" not in str(e.value)


def test_malformed_signatures_are_one_line_errors() -> None:
    token = SoftToken()
    good = token.sshsig(MESSAGE)
    body = "".join(good.splitlines()[1:-1])
    raw = base64.b64decode(body)
    cases = {
        "not an SSHSIG": b"XXXXXX" + raw[6:],
        "cut short": raw[:-3],
        "trailing bytes": raw + b"\0",
        "version 2": raw[:6] + struct.pack(">I", 2) + raw[10:],
    }
    for expect, data in cases.items():
        with pytest.raises(SshSigError, match=expect):
            parse_signature(data)
    with pytest.raises(SshSigError, match="not base64"):
        parse_signature("-----BEGIN SSH SIGNATURE-----\n!!!\n-----END SSH SIGNATURE-----")
    with pytest.raises(SshSigError, match="too large"):
        parse_signature(b"x" * 20_000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        parse_signature(data)
    except SshSigError as e:
        assert "\n" not in str(e)


def test_allowed_signers_lines_as_openssh_writes_them(tmp_path: Path, ed_key: Path) -> None:
    pub = ed_key.with_suffix(".pub").read_text().split()
    token = SoftToken()
    text = f"""# the team
alice@example.org,alice {pub[0]} {pub[1]} laptop
bob namespaces="git,annofs",valid-after="20260101",valid-before="20270101Z" {token.public.to_text()}
carol namespaces="git" {pub[0]} {pub[1]}
"""
    path = tmp_path / "allowed_signers"
    path.write_text(text)
    alice, bob, carol = load_allowed_signers(path)
    assert alice.name == "alice@example.org" and alice.key.key_type == "ssh-ed25519"
    assert alice.allows_namespace() and alice.valid_at(0)
    assert bob.key == token.public and bob.allows_namespace()
    assert not bob.valid_at(1_700_000_000) and bob.valid_at(1_780_000_000)
    assert not bob.valid_at(1_800_000_000)  # 2027-01-15: past valid-before
    assert not carol.allows_namespace()
    # The real ssh-keygen reads the same file: bob's line verifies his signature.
    sig = tmp_path / "m.sig"
    sig.write_text(token.sshsig(MESSAGE))
    proc = ssh_keygen("-Y", "verify", "-f", str(path), "-I", "bob", "-n", "annofs",
                      "-s", str(sig), input=MESSAGE)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("line", "problem"), [
    ("alice", "expected 'PRINCIPALS"),
    ('alice cert-authority ssh-ed25519 AAAA', "cert-authority lines are not supported"),
    ('alice valid-after="2026" ssh-ed25519 AAAA', "expected YYYYMMDD"),
    ('alice frobnicate="x" ssh-ed25519 AAAA', "unknown option 'frobnicate'"),
    ("alice ssh-ed25519 !!!", "not base64"),
    ('alice namespaces="git ssh-ed25519 AAAA', "quote is not closed"),
])
def test_bad_allowed_signers_lines_name_file_and_line(line: str, problem: str) -> None:
    with pytest.raises(UsageError, match=problem) as e:
        parse_allowed_signers(f"# first\n{line}\n", "signers")
    assert str(e.value).startswith("signers:2: ")
