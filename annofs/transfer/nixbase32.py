"""Nix's base32: the encoding of store path hashes and of `sha256:...` NAR hashes.

Not RFC 4648: the alphabet omits e, o, t and u, and the bits run the other way. The
bytes are read as one little-endian number, and the characters are its 5-bit digits from
the most significant to the least (Nix's `printHash32`). An encoding of n bytes is
`ceil(8n / 5)` characters; its first character can carry bits beyond the n bytes, which
must be zero (Nix rejects them too): every byte string has exactly one encoding.
"""

from __future__ import annotations

from annofs.errors import UsageError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_DIGITS = {c: i for i, c in enumerate(ALPHABET)}


def encoded_length(size: int) -> int:
    """Characters in the encoding of `size` bytes (52 for a SHA-256, 32 for a store hash)."""
    return (size * 8 - 1) // 5 + 1 if size else 0


def decoded_length(length: int) -> int:
    """Bytes encoded by `length` characters (the inverse of `encoded_length`)."""
    return length * 5 // 8


def encode(data: bytes) -> str:
    """Nix base32 of `data`."""
    n = encoded_length(len(data))
    x = int.from_bytes(data, "little")
    return "".join(ALPHABET[(x >> (5 * i)) & 31] for i in range(n - 1, -1, -1))


def decode(text: str, size: int | None = None, *, what: str = "base32 hash") -> bytes:
    """The bytes `text` encodes; with `size`, it must encode exactly that many.

    Strict: a character outside the alphabet, a length no byte string encodes to, or
    bits set beyond the last byte is a UsageError naming `what` and the problem.
    """
    shown = text if len(text) <= 80 else text[:77] + "..."
    nbytes = decoded_length(len(text))
    if size is not None and len(text) != encoded_length(size):
        raise UsageError(f"{what} {shown!r}: {len(text)} characters, expected "
                         f"{encoded_length(size)} (nix base32 of {size} bytes)")
    if encoded_length(nbytes) != len(text):
        raise UsageError(f"{what} {shown!r}: {len(text)} characters is not the length of "
                         f"any nix base32 encoding")
    x = 0
    for pos, c in enumerate(text):
        d = _DIGITS.get(c)
        if d is None:
            raise UsageError(f"{what} {shown!r}: character {c!r} at {pos} is not nix base32 "
                             f"(alphabet {ALPHABET})")
        x = (x << 5) | d
    if x >> (8 * nbytes):
        raise UsageError(f"{what} {shown!r}: its first character sets bits beyond "
                         f"{nbytes} bytes")
    return x.to_bytes(nbytes, "little")
