"""annofs's Nix-format ed25519 keys as TUF keys (securesystemslib `SSlibKey`, `Signer`).

A trust bundle's root and targets keys are the same files `annofs key generate` (or
`nix-store --generate-binary-cache-key`) writes, so a team holds them as it holds its
signing keys: offline, one file per person. The TUF key is the same 32 bytes: keytype
and scheme `ed25519`, `keyval.public` in hex, the key id the sha256 of its canonical
JSON, as securesystemslib computes it (so other TUF tools read the metadata as theirs).
"""

from __future__ import annotations

from typing import Any

from securesystemslib.signer import Key, Signature, Signer, SSlibKey
from securesystemslib.signer._utils import compute_default_keyid

from annofs.trust.keys import PublicKey, SecretKey


def tuf_key(public: bytes) -> SSlibKey:
    """The TUF key for a 32-byte ed25519 public key."""
    keyval = {"public": public.hex()}
    return SSlibKey(compute_default_keyid("ed25519", "ed25519", keyval), "ed25519",
                    "ed25519", keyval)


def public_of(key: Key) -> bytes | None:
    """The ed25519 public key bytes of a TUF key, or None for another kind of key."""
    if key.keytype != "ed25519" or key.scheme != "ed25519":
        return None
    try:
        raw = bytes.fromhex(str(key.keyval.get("public", "")))
    except ValueError:
        return None
    return raw if len(raw) == 32 else None


class NixKeySigner(Signer):
    """Signs TUF metadata with an annofs/Nix secret key (ed25519, through pynacl)."""

    def __init__(self, secret: SecretKey) -> None:
        self._secret = secret
        self._key = tuf_key(secret.public)

    @property
    def public_key(self) -> Key:
        """The TUF key this signer's signatures verify under."""
        return self._key

    @property
    def name(self) -> str:
        """The key's name in its file."""
        return self._secret.name

    def sign(self, payload: bytes) -> Signature:
        """An ed25519 signature of `payload`, under this key's id."""
        return Signature(self._key.keyid, self._secret.sign(payload).hex())

    @classmethod
    def from_priv_key_uri(cls, priv_key_uri: str, public_key: Key,
                          secrets_handler: Any = None) -> Signer:
        """Not used: annofs loads key files itself (annofs.trust.keys)."""
        raise NotImplementedError("annofs signs with key files, not key URIs")


def key_id(pk: PublicKey | bytes) -> str:
    """The TUF key id of a public key."""
    return tuf_key(pk.key if isinstance(pk, PublicKey) else pk).keyid
