"""Ed25519 keys in Nix's format, and signing and verifying bytes with them.

A public key file holds `name:base64(32-byte key)`, a secret key file
`name:base64(64-byte secret)` where the secret is libsodium's layout, the 32-byte seed
followed by the 32-byte public key: exactly what `nix-store --generate-binary-cache-key`
writes (no trailing newline; one is tolerated on reading). A key made by either tool
works in both.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from annofs.errors import ExistsError, UsageError
from annofs.userfile import read_user_file

PUBLIC_SIZE = 32
SEED_SIZE = 32
SECRET_SIZE = 64
SIGNATURE_SIZE = 64

# Nix only requires a non-empty name without ':'; we also refuse whitespace and control
# characters, which would not survive nix.conf's space-separated lists.
_NAME = re.compile(r"[^\s:\x00-\x1f\x7f]+")
# `annofs key generate NAME` makes files NAME.secret and NAME.public: a name that is also
# a safe file name (no '/', not starting with '.').
_FILE_NAME = re.compile(r"[A-Za-z0-9_+@][A-Za-z0-9._+@-]*")


def check_key_name(name: str, where: str) -> None:
    """Reject a key name Nix would misread (empty, ':', whitespace)."""
    if not name:
        raise UsageError(f"{where}: the key name is empty (expected NAME:BASE64)")
    if not _NAME.fullmatch(name):
        raise UsageError(f"{where}: key name {name!r} may not contain ':', spaces or "
                         f"control characters")


def _decode_b64(text: str, where: str, what: str) -> bytes:
    """Strict standard base64, as Nix writes it: a typo must not decode to other bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UsageError(f"{where}: the {what} is not valid base64 ({e})") from None
    if base64.b64encode(raw).decode() != text:
        raise UsageError(f"{where}: the {what} is not canonical base64")
    return raw


def _split(text: str, where: str) -> tuple[str, str]:
    text = text.rstrip()  # Nix writes no newline; an editor may add one
    if "\n" in text:
        raise UsageError(f"{where}: a key is one line (NAME:BASE64), found several")
    name, sep, b64 = text.partition(":")
    if not sep:
        raise UsageError(f"{where}: no ':' (a key is NAME:BASE64)")
    check_key_name(name, where)
    if not b64:
        raise UsageError(f"{where}: nothing after ':' (a key is NAME:BASE64)")
    return name, b64


@dataclass(frozen=True)
class PublicKey:
    """A named ed25519 public key. Two keys are the same signer iff `key` is equal."""

    name: str
    key: bytes

    def to_text(self) -> str:
        """`name:base64`, the public key file's content and nix.conf's notation."""
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is this key's ed25519 signature of `message`."""
        return verify_signature(self.key, message, signature)


@dataclass(frozen=True)
class SecretKey:
    """A named ed25519 signing key (seed and the public key derived from it)."""

    name: str
    seed: bytes
    public: bytes

    def public_key(self) -> PublicKey:
        """The matching public key, under the same name."""
        return PublicKey(self.name, self.public)

    def to_text(self) -> str:
        """`name:base64(seed || public)`, the secret key file's content."""
        return f"{self.name}:{base64.b64encode(self.seed + self.public).decode()}"

    def sign(self, message: bytes) -> bytes:
        """The 64-byte ed25519 signature of `message`."""
        return nacl.signing.SigningKey(self.seed).sign(message).signature

    def __repr__(self) -> str:  # never print the seed into a log or a traceback
        return f"SecretKey(name={self.name!r})"


def key_fingerprint(public: bytes) -> str:
    """How a key is shown when no trusted name may be: its public key in base64, as in
    a Nix `*.public` file and `trusted-public-keys` (so it can be looked up, or trusted,
    as it is). One format everywhere a key is printed."""
    return base64.b64encode(public).decode()


def verify_signature(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is the ed25519 signature of `message` by `public`."""
    if len(public) != PUBLIC_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError):
        return False
    return True


def parse_public_key(text: str, where: str) -> PublicKey:
    """Parse `name:base64(32 bytes)`; UsageError naming `where` and the problem."""
    name, b64 = _split(text, where)
    raw = _decode_b64(b64, where, "public key")
    if len(raw) != PUBLIC_SIZE:
        what = " (this looks like a secret key)" if len(raw) == SECRET_SIZE else ""
        raise UsageError(f"{where}: a public key is {PUBLIC_SIZE} bytes, this one is "
                         f"{len(raw)}{what}")
    return PublicKey(name, raw)


def parse_secret_key(text: str, where: str) -> SecretKey:
    """Parse `name:base64(64 bytes)`; the public half must match the seed."""
    name, b64 = _split(text, where)
    raw = _decode_b64(b64, where, "secret key")
    if len(raw) != SECRET_SIZE:
        what = " (this looks like a public key)" if len(raw) == PUBLIC_SIZE else ""
        raise UsageError(f"{where}: a secret key is {SECRET_SIZE} bytes, this one is "
                         f"{len(raw)}{what}")
    seed, public = raw[:SEED_SIZE], raw[SEED_SIZE:]
    derived = nacl.signing.SigningKey(seed).verify_key.encode()
    if derived != public:
        # A corrupted or hand-assembled file: signing with it would give signatures that
        # verify under no published key.
        raise UsageError(f"{where}: the secret key's public half does not match its seed")
    return SecretKey(name, seed, public)


def _read_key_file(path: Path) -> str:
    data = read_user_file(path, "key file")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a key file (not ASCII text)") from None


def load_public_key(path: Path) -> PublicKey:
    """Read a public key file."""
    return parse_public_key(_read_key_file(path), str(path))


def load_secret_key(path: Path) -> SecretKey:
    """Read a secret key file."""
    return parse_secret_key(_read_key_file(path), str(path))


def generate_key(name: str) -> SecretKey:
    """A new random key pair named `name`."""
    check_key_name(name, "key generate")
    sk = nacl.signing.SigningKey.generate()
    return SecretKey(name, bytes(sk), sk.verify_key.encode())


def write_key_pair(key: SecretKey, directory: Path) -> tuple[Path, Path]:
    """Write NAME.secret (mode 0600) and NAME.public into `directory`; never overwrite.

    Both names are checked first and created with O_EXCL, so a race or an existing file
    leaves whatever was there untouched.
    """
    if not _FILE_NAME.fullmatch(key.name):
        raise UsageError(f"{key.name!r}: a key name for 'key generate' is letters, digits "
                         f"and . _ + @ - (not starting with '.' or '-')")
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such directory")
    secret_path = directory / f"{key.name}.secret"
    public_path = directory / f"{key.name}.public"
    for p in (secret_path, public_path):
        if os.path.lexists(p):
            raise ExistsError(f"{p}: already exists (refusing to overwrite a key)")
    made: list[Path] = []
    try:
        for path, text, mode in ((secret_path, key.to_text(), 0o600),
                                 (public_path, key.public_key().to_text(), 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            made.append(path)
            try:
                os.fchmod(fd, mode)  # the umask must not widen nor narrow it
                os.write(fd, text.encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
    except FileExistsError as e:
        for p in made:
            p.unlink(missing_ok=True)
        raise ExistsError(f"{e.filename}: already exists (refusing to overwrite a key)") from None
    except BaseException:
        for p in made:
            p.unlink(missing_ok=True)
        raise
    return secret_path, public_path
