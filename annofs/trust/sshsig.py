"""OpenSSH signatures (SSHSIG) over annofs statements, verified in process.

Developers already hold SSH keys, many on a FIDO token, and sign git with them
(`gpg.format = ssh`). annofs verifies their signatures itself, without a process per
check, for the two key types worth trusting here:

- `ssh-ed25519`: the signature is Ed25519 over the SSHSIG "signed data" blob;
- `sk-ssh-ed25519@openssh.com` (a FIDO key): the token signs
  `SHA256(application) || flags || counter || SHA256(signed data)` (PROTOCOL.u2f), and
  the signature carries the flags: bit 0x01 "user present" (the touch), bit 0x04 "user
  verified" (a PIN or a fingerprint). A verifier must look at them: a signature the
  token made without a touch is valid Ed25519 all the same.

RSA and ECDSA keys are refused with a clear message: they would need another
implementation of their own, and the people annofs serves use ed25519 keys.

The formats (PROTOCOL.sshsig):

    signature = "SSHSIG" || uint32 1 || string publickey || string namespace
                || string reserved || string hash_algorithm || string signature
    signed data = "SSHSIG" || string namespace || string reserved
                  || string hash_algorithm || string H(message)

armored between `-----BEGIN SSH SIGNATURE-----` and `-----END SSH SIGNATURE-----`.
Signing goes through `ssh-keygen -Y sign` (sign_with_ssh_keygen), so a FIDO key's touch
is asked for by OpenSSH as usual, and a key in ssh-agent works as OpenSSH makes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from annofs.errors import UsageError

MAGIC = b"SSHSIG"
ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
ARMOR_END = "-----END SSH SIGNATURE-----"
ED25519 = "ssh-ed25519"
SK_ED25519 = "sk-ssh-ed25519@openssh.com"
KEY_TYPES = (ED25519, SK_ED25519)
NAMESPACE = "annofs"
FLAG_USER_PRESENT = 0x01
FLAG_USER_VERIFIED = 0x04
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
# Far above any real signature (an sk-ed25519 one is ~200 bytes armored): the parser
# never reads an attacker's megabytes into memory.
MAX_SIGNATURE = 16 * 1024


class SshSigError(ValueError):
    """A malformed or unverifiable SSH signature or key: one line saying which and why."""


class _Reader:
    """SSH wire format (RFC 4251): uint32 and length-prefixed strings, strictly."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise SshSigError(f"{self.what}: cut short")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def string(self) -> bytes:
        return self.take(self.u32())

    def text(self) -> str:
        raw = self.string()
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise SshSigError(f"{self.what}: a name that is not ASCII") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise SshSigError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


@dataclass(frozen=True)
class SshPublicKey:
    """An ed25519 or sk-ed25519 public key, as OpenSSH encodes it."""

    key_type: str
    key: bytes  # the 32-byte Ed25519 public key
    application: str | None  # sk keys: the FIDO application ("ssh:" by default)

    @property
    def blob(self) -> bytes:
        """The key in SSH wire format (what fingerprints and signatures carry)."""
        out = _string(self.key_type.encode()) + _string(self.key)
        if self.application is not None:
            out += _string(self.application.encode())
        return out

    @property
    def fingerprint(self) -> str:
        """`SHA256:<base64, unpadded>`, as `ssh-keygen -l` prints it."""
        digest = base64.b64encode(hashlib.sha256(self.blob).digest()).decode()
        return "SHA256:" + digest.rstrip("=")

    def to_text(self) -> str:
        """`TYPE BASE64`, as in authorized_keys and allowed_signers."""
        return f"{self.key_type} {base64.b64encode(self.blob).decode()}"

    @classmethod
    def from_blob(cls, blob: bytes, what: str = "SSH public key") -> SshPublicKey:
        """Parse a key in wire format; other key types are refused by name."""
        r = _Reader(blob, what)
        key_type = r.text()
        if key_type not in KEY_TYPES:
            raise SshSigError(f"{what}: {key_type} keys are not supported (use an "
                              f"ed25519 or ed25519-sk key)")
        key = r.string()
        if len(key) != 32:
            raise SshSigError(f"{what}: an Ed25519 key is 32 bytes, not {len(key)}")
        application = r.text() if key_type == SK_ED25519 else None
        r.end()
        return cls(key_type, key, application)

    @classmethod
    def from_text(cls, text: str, what: str = "SSH public key") -> SshPublicKey:
        """Parse `TYPE BASE64 [COMMENT]` (a .pub file's line); type and blob must agree."""
        fields = text.split()
        if len(fields) < 2:
            raise SshSigError(f"{what}: expected 'TYPE BASE64 [COMMENT]'")
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except binascii.Error:
            raise SshSigError(f"{what}: the key is not base64") from None
        key = cls.from_blob(blob, what) if fields[0] in KEY_TYPES else None
        if key is None:
            raise SshSigError(f"{what}: {fields[0]} keys are not supported (use an "
                              f"ed25519 or ed25519-sk key)")
        if key.key_type != fields[0]:
            raise SshSigError(f"{what}: says {fields[0]} but holds a {key.key_type} key")
        return key


@dataclass(frozen=True)
class SshSignature:
    """A parsed SSHSIG signature (not yet verified)."""

    public_key: SshPublicKey
    namespace: str
    hash_algorithm: str
    signature: bytes  # 64 bytes of Ed25519
    flags: int | None  # sk keys: the token's flags
    counter: int | None  # sk keys: the token's signature counter

    def signed_data(self, message: bytes) -> bytes:
        """The blob the key signed for `message` (PROTOCOL.sshsig)."""
        h = _HASHES[self.hash_algorithm](message).digest()
        return (MAGIC + _string(self.namespace.encode()) + _string(b"")
                + _string(self.hash_algorithm.encode()) + _string(h))


def parse_signature(data: bytes | str, what: str = "SSH signature") -> SshSignature:
    """Parse an armored (or raw binary) SSHSIG signature; strict, one-line errors."""
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    if len(data) > MAX_SIGNATURE:
        raise SshSigError(f"{what}: {len(data)} bytes is too large for a signature")
    text = data.decode("ascii", "replace").strip()
    if text.startswith(ARMOR_BEGIN):
        if not text.endswith(ARMOR_END):
            raise SshSigError(f"{what}: no '{ARMOR_END}' line")
        body = "".join(text[len(ARMOR_BEGIN):-len(ARMOR_END)].split())
        try:
            data = base64.b64decode(body, validate=True)
        except binascii.Error:
            raise SshSigError(f"{what}: the armored body is not base64") from None
    r = _Reader(data, what)
    if r.take(6) != MAGIC:
        raise SshSigError(f"{what}: not an SSHSIG signature")
    version = r.u32()
    if version != 1:
        raise SshSigError(f"{what}: version {version} (this reads version 1)")
    key = SshPublicKey.from_blob(r.string(), f"{what}: public key")
    namespace = r.text()
    r.string()  # reserved
    hash_algorithm = r.text()
    if hash_algorithm not in _HASHES:
        raise SshSigError(f"{what}: hash algorithm {hash_algorithm!r} (sha256 or sha512)")
    sig = _Reader(r.string(), f"{what}: signature")
    r.end()
    sig_type = sig.text()
    if sig_type != key.key_type:
        raise SshSigError(f"{what}: a {sig_type} signature by a {key.key_type} key")
    raw = sig.string()
    if len(raw) != 64:
        raise SshSigError(f"{what}: an Ed25519 signature is 64 bytes, not {len(raw)}")
    flags = counter = None
    if key.key_type == SK_ED25519:
        flags, counter = sig.u8(), sig.u32()
    sig.end()
    return SshSignature(key, namespace, hash_algorithm, raw, flags, counter)


@dataclass(frozen=True)
class Verified:
    """A signature that holds: who made it, and what the token says it checked."""

    public_key: SshPublicKey
    user_present: bool  # always True for plain ed25519 keys (no token to ask)
    user_verified: bool


def verify(sig: SshSignature, message: bytes, namespace: str = NAMESPACE) -> Verified:
    """Check `sig` over `message` in `namespace`; SshSigError if it does not hold.

    For an sk key the flags are returned, not judged: whether a touch (or a PIN) is
    required is the policy's to say (a rule's `user-presence`), as OpenSSH's
    `no-touch-required` option is the allowed_signers file's.
    """
    if sig.namespace != namespace:
        raise SshSigError(f"signature for namespace {sig.namespace!r}, not {namespace!r}")
    data = sig.signed_data(message)
    key = sig.public_key
    if key.key_type == SK_ED25519:
        assert key.application is not None and sig.flags is not None
        assert sig.counter is not None
        data = (hashlib.sha256(key.application.encode()).digest() + bytes([sig.flags])
                + struct.pack(">I", sig.counter) + hashlib.sha256(data).digest())
    try:
        nacl.signing.VerifyKey(key.key).verify(data, sig.signature)
    except nacl.exceptions.BadSignatureError:
        raise SshSigError(f"signature by {key.fingerprint} does not verify") from None
    if key.key_type == SK_ED25519:
        assert sig.flags is not None
        return Verified(key, bool(sig.flags & FLAG_USER_PRESENT),
                        bool(sig.flags & FLAG_USER_VERIFIED))
    return Verified(key, True, False)


def sign_with_ssh_keygen(key_file: Path, message: bytes, namespace: str = NAMESPACE) -> str:
    """Sign `message` with `ssh-keygen -Y sign` (a key file, or a public key file whose
    private half is in ssh-agent); returns the armored signature.

    OpenSSH asks for a passphrase or a FIDO touch on the terminal as it always does.
    """
    try:
        proc = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key_file),
                               "-n", namespace], input=message, capture_output=True,
                              check=False)
    except FileNotFoundError:
        raise UsageError("ssh-keygen: not found (install OpenSSH's client)") from None
    if proc.returncode != 0:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UsageError(f"{key_file}: ssh-keygen could not sign "
                         f"({why[-1] if why else f'exit {proc.returncode}'})")
    return proc.stdout.decode("ascii")


def armor(blob: bytes) -> str:
    """A binary SSHSIG signature in OpenSSH's armor (what `ssh-keygen -Y verify` reads)."""
    body = base64.b64encode(blob).decode()
    lines = [body[i:i + 70] for i in range(0, len(body), 70)]
    return "\n".join([ARMOR_BEGIN, *lines, ARMOR_END]) + "\n"


def dearmor(text: str, what: str = "SSH signature") -> bytes:
    """The binary signature inside an armored one (parsed first: it must be well formed)."""
    parse_signature(text, what)
    body = text.strip()[len(ARMOR_BEGIN):-len(ARMOR_END)]
    return base64.b64decode("".join(body.split()), validate=True)


def signing_key_public(key_file: Path) -> tuple[SshPublicKey, str]:
    """The public key `ssh-keygen -Y sign -f key_file` will sign with, and its comment.

    `key_file` is a .pub file (its private half in ssh-agent), or a private key file
    whose .pub lies next to it, or else a private key `ssh-keygen -y` can read (it asks
    for a passphrase as usual). The caller checks the signature's key against it.
    """
    pub = key_file if key_file.suffix == ".pub" else Path(f"{key_file}.pub")
    if pub.is_file():
        try:
            text = pub.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{pub}: cannot read the public key ({e})") from None
    elif key_file.suffix == ".pub":
        raise UsageError(f"{key_file}: no such public key file")
    else:
        try:
            proc = subprocess.run(["ssh-keygen", "-y", "-f", str(key_file)],
                                  capture_output=True, check=False)
        except FileNotFoundError:
            raise UsageError("ssh-keygen: not found (install OpenSSH's client)") from None
        if proc.returncode != 0:
            why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise UsageError(f"{key_file}: not an SSH key ssh-keygen can read"
                             + (f" ({why[-1]})" if why else ""))
        text = proc.stdout.decode("ascii", "replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1:
        raise UsageError(f"{pub}: expected one public key line")
    try:
        key = SshPublicKey.from_text(lines[0], str(pub))
    except SshSigError as e:
        raise UsageError(str(e)) from None
    fields = lines[0].split()
    return key, fields[2] if len(fields) > 2 else ""
