"""`.narinfo` files of a Nix binary cache: a strict parser, the signed fingerprint,
checking `Sig` lines against a policy, and writing a narinfo back with one more `Sig`.

A narinfo is `Key: value` lines, each ending in a newline, e.g. what `nix copy --to
file://DIR` writes:

    StorePath: /nix/store/hmmcv5niyd3ys36pvvhps7ayndghchjb-hello
    URL: nar/1p8rzxhwyab09ip2rcac00cp13bjiv91szb9dwgp6397ddw3nl94.nar.xz
    Compression: xz
    FileHash: sha256:1p8rzxhwyab09ip2rcac00cp13bjiv91szb9dwgp6397ddw3nl94
    FileSize: 268
    NarHash: sha256:1rjhwpkpdkd5c91afyrv8xyydxyvpx4bcvmf0k6klsg52bn7mzaw
    NarSize: 1072
    References:
    Deriver: np9vl8w6g11fghw68hv37hlii8x5iikx-hello.drv
    Sig: cache-a-1:bC2zvvtG+Ccy1moty542SJ4/Hao8q/E3GwxCorkZeKVcuPHCKcyiQwBF48f...AdAQ==

(Nix writes `References: ` with a space and nothing after it when there are none.)

What a `Sig` signs is only the fingerprint (Nix's `ValidPathInfo::fingerprint`):

    1;<StorePath>;sha256:<NarHash in nix base32>;<NarSize>;<References as sorted full paths, ",">

so NarHash is normalised to nix base32 whatever encoding the file used (hex is common
outside Nix), References are resolved against the store directory of StorePath, and a
path without references ends in a bare `;`. Everything else in the file (URL,
Compression, FileHash, Deriver, ...) is unsigned: it only says where to find the NAR,
and the NAR itself is then checked against the signed NarHash and NarSize.

Stricter than Nix (which ignores what it does not understand and lets a repeated key
win): a repeated key other than `Sig`, a malformed line, a value Nix would misread, an
URL that leaves the cache directory are errors, one line each, `FILE:LINE: FIELD:
PROBLEM`. Keys this parser does not know are kept and ignored, as Nix does: caches add
fields (`System`, `Provenance`), and none of them is signed.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass

from annofs.errors import UsageError
from annofs.transfer.nixbase32 import decode as nix32_decode
from annofs.transfer.nixbase32 import encode as nix32_encode
from annofs.trust.keys import SIGNATURE_SIZE, SecretKey, check_key_name, verify_signature
from annofs.trust.policy import Policy

COMPRESSIONS = ("none", "xz", "bzip2", "zstd")
MAX_NARINFO = 4 << 20  # far above any real narinfo (cache.nixos.org's largest are ~100 KiB)
MAX_SIZE = (1 << 63) - 1
SHA256_SIZE = 32

HASH_CHARS = "0123456789abcdfghijklmnpqrsvwxyz"  # nix base32: no e, o, t, u
HASH_PART_LEN = 32
_HASH_PART = re.compile(f"[{HASH_CHARS}]{{{HASH_PART_LEN}}}")
# Nix's store path names: these characters, at most 211 of them, not starting with '.'.
_NAME = re.compile(r"[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,210}")
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_STORE_DIR = re.compile(r"(/[A-Za-z0-9+\-._?=]+)+")
_URL_PART = re.compile(r"[A-Za-z0-9+\-._~=,]+")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

# Keys that may appear once. `Sig` may repeat; any other key is kept and ignored.
_SINGLE = ("StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
           "References", "Deriver", "CA", "System")
_REQUIRED = ("StorePath", "URL", "NarHash", "NarSize")


class _Bad(Exception):
    """A field-level problem; the parser adds the file and line."""


@dataclass(frozen=True)
class StorePath:
    """A store path: its store directory and its base name `<hash>-<name>`."""

    store_dir: str
    base: str

    @property
    def hash_part(self) -> str:
        """The 32 nix base32 characters before the first '-'."""
        return self.base[:HASH_PART_LEN]

    @property
    def name(self) -> str:
        """What follows `<hash>-`."""
        return self.base[HASH_PART_LEN + 1:]

    @property
    def full(self) -> str:
        """`/nix/store/<hash>-<name>`."""
        return f"{self.store_dir}/{self.base}"

    def __str__(self) -> str:
        return self.full


def check_base_name(text: str) -> str:
    """A store path's base name `<32 nix base32>-<name>`; raises _Bad saying what is wrong."""
    h, dash, name = text[:HASH_PART_LEN], text[HASH_PART_LEN:HASH_PART_LEN + 1], \
        text[HASH_PART_LEN + 1:]
    if not _HASH_PART.fullmatch(h) or dash != "-":
        raise _Bad(f"{_show(text)} is not a store path name (<32 nix base32 characters>-<name>)")
    if not _NAME.fullmatch(name):
        raise _Bad(f"{_show(text)}: the name after the hash must be 1 to 211 of "
                   f"A-Z a-z 0-9 + - . _ ? =, not starting with '.'")
    return text


def parse_store_path(text: str) -> StorePath:
    """`/store/dir/<hash>-<name>`; raises _Bad."""
    store_dir, slash, base = text.rpartition("/")
    if not slash or not _STORE_DIR.fullmatch(store_dir) or any(
            p in (".", "..") for p in store_dir.split("/")[1:]):
        raise _Bad(f"{_show(text)} is not an absolute store path (/nix/store/<hash>-<name>)")
    return StorePath(store_dir, check_base_name(base))


NIX_STORE_DIR = "/nix/store"


def parse_nix_store_path(text: str) -> StorePath:
    """A store path directly in /nix/store, as Nix requires of a narinfo's StorePath (it
    refuses others: "not in the Nix store"); raises _Bad. What is fetched is installed
    at /nix/store/<base name>: a narinfo signed for another path must not be."""
    sp = parse_store_path(text)
    if sp.store_dir != NIX_STORE_DIR:
        raise _Bad(f"{_show(text)} is not in the Nix store {NIX_STORE_DIR}")
    return sp


def store_path_arg(text: str) -> str:
    """A STOREPATH argument: a full store path, a base name, or a bare hash part.

    Returns the hash part (what names the narinfo file); UsageError if it is none of those.
    """
    try:
        if _HASH_PART.fullmatch(text):
            return text
        if text.startswith("/"):
            return parse_store_path(text.rstrip("/")).hash_part
        return check_base_name(text)[:HASH_PART_LEN]
    except _Bad as e:
        raise UsageError(f"{text}: not a store path ({e})") from None


def _show(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_sha256(text: str) -> bytes:
    """`sha256:` + nix base32 (52), hex (64) or base64 (44), or SRI `sha256-<base64>`."""
    if text.startswith("sha256-"):
        body, kinds = text[7:], ("base64",)
    elif text.startswith("sha256:"):
        body, kinds = text[7:], ("nix32", "hex", "base64")
    else:
        raise _Bad(f"{_show(text)}: expected sha256:<nix base32 or hex>")
    if "nix32" in kinds and len(body) == 52:
        try:
            raw = nix32_decode(body)
        except (ValueError, UsageError) as e:
            raise _Bad(f"{_show(text)}: not nix base32 ({e})") from None
    elif "hex" in kinds and len(body) == 64:
        if not _HEX64.fullmatch(body):
            raise _Bad(f"{_show(text)}: not hexadecimal")
        raw = bytes.fromhex(body)
    elif len(body) == 44:
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise _Bad(f"{_show(text)}: not base64") from None
        if base64.b64encode(raw).decode() != body:
            raise _Bad(f"{_show(text)}: not canonical base64")
    else:
        raise _Bad(f"{_show(text)}: a sha256 hash is 52 nix base32, 64 hex or 44 base64 "
                   f"characters, this one is {len(body)}")
    if len(raw) != SHA256_SIZE:
        raise _Bad(f"{_show(text)}: a sha256 hash is 32 bytes")
    return raw


def format_sha256(raw: bytes) -> str:
    """`sha256:<nix base32>`, as Nix writes NarHash and as the fingerprint carries it."""
    return "sha256:" + nix32_encode(raw)


def _size(text: str, field: str, *, positive: bool) -> int:
    if not _DECIMAL.fullmatch(text) or len(text) > 19 or int(text) > MAX_SIZE:
        raise _Bad(f"{_show(text)}: expected a whole number of bytes")
    n = int(text)
    if positive and n == 0:
        raise _Bad("must be more than 0")
    return n


def _url(text: str) -> str:
    """The NAR's place relative to the cache directory; it may not leave it."""
    parts = text.split("/")
    if not text or text.startswith("/") or any(
            p in ("", ".", "..") or not _URL_PART.fullmatch(p) for p in parts):
        raise _Bad(f"{_show(text)}: must be a relative path inside the cache (e.g. "
                   f"nar/<hash>.nar.xz)")
    return text


@dataclass(frozen=True)
class NarSig:
    """One `Sig: NAME:BASE64` line."""

    key_name: str
    sig: bytes
    line: int

    @property
    def text(self) -> str:
        """The line's value, as written back."""
        return f"{self.key_name}:{base64.b64encode(self.sig).decode()}"


def parse_sig(text: str) -> NarSig:
    """A `NAME:BASE64(64-byte ed25519 signature)` value; raises _Bad."""
    name, sep, b64 = text.partition(":")
    if not sep:
        raise _Bad(f"{_show(text)}: expected KEYNAME:BASE64")
    try:
        check_key_name(name, "Sig")
    except UsageError as e:
        raise _Bad(str(e)) from None
    try:
        sig = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _Bad(f"{_show(text)}: the signature is not base64") from None
    if base64.b64encode(sig).decode() != b64:
        raise _Bad(f"{_show(text)}: the signature is not canonical base64")
    if len(sig) != SIGNATURE_SIZE:
        raise _Bad(f"an ed25519 signature is {SIGNATURE_SIZE} bytes, this one is {len(sig)}")
    return NarSig(name, sig, 0)


@dataclass(frozen=True)
class NarInfo:
    """A parsed narinfo. `lines` are the file's lines as read (for writing back)."""

    source: str
    store_path: StorePath
    url: str
    compression: str
    file_hash: bytes | None
    file_size: int | None
    nar_hash: bytes
    nar_size: int
    references: tuple[str, ...]  # base names, as written
    deriver: str | None
    sigs: tuple[NarSig, ...]
    ca: str | None
    lines: tuple[str, ...]

    @property
    def nar_hash_text(self) -> str:
        """`sha256:<nix base32>`."""
        return format_sha256(self.nar_hash)

    def reference_paths(self) -> list[str]:
        """The references as full store paths, sorted (as the fingerprint lists them)."""
        return sorted(f"{self.store_path.store_dir}/{r}" for r in set(self.references))

    def fingerprint(self) -> str:
        """What a `Sig` signs: `1;PATH;sha256:NIX32;SIZE;REF,REF` (bare `;` if no refs)."""
        return fingerprint(self.store_path.full, self.nar_hash, self.nar_size,
                           self.reference_paths())

    def with_sig(self, sig: NarSig) -> str:
        """The narinfo text with one more `Sig` line, all other lines as they were.

        The line goes after the last `Sig` (where Nix writes them), else before `CA`,
        else at the end.
        """
        lines = list(self.lines)
        at = len(lines)
        sig_lines = [i for i, ln in enumerate(lines) if ln.startswith("Sig:")]
        if sig_lines:
            at = sig_lines[-1] + 1
        else:
            ca = [i for i, ln in enumerate(lines) if ln.startswith("CA:")]
            if ca:
                at = ca[0]
        lines.insert(at, f"Sig: {sig.text}")
        return "".join(ln + "\n" for ln in lines)


def fingerprint(store_path: str, nar_hash: bytes, nar_size: int,
                references: Iterable[str]) -> str:
    """Nix's path fingerprint; `references` are full store paths (sorted here)."""
    return (f"1;{store_path};{format_sha256(nar_hash)};{nar_size};"
            f"{','.join(sorted(set(references)))}")


def parse_narinfo(data: bytes, source: str) -> NarInfo:
    """Parse a narinfo's bytes; UsageError `SOURCE:LINE: FIELD: PROBLEM` if malformed."""
    if len(data) > MAX_NARINFO:
        raise UsageError(f"{source}: {len(data)} bytes is too large for a narinfo")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"{source}:{line}: not UTF-8 text") from None
    if not text:
        raise UsageError(f"{source}: empty file (a narinfo has StorePath, URL, NarHash, "
                         f"NarSize lines)")
    if not text.endswith("\n"):
        line = text.count("\n") + 1
        raise UsageError(f"{source}:{line}: the last line does not end with a newline "
                         f"(truncated?)")
    lines = text[:-1].split("\n")
    values: dict[str, tuple[str, int]] = {}
    sigs: list[NarSig] = []
    for no, line in enumerate(lines, 1):
        key, sep, rest = line.partition(":")
        where = f"{source}:{no}"
        if not sep or not _KEY.fullmatch(key):
            raise UsageError(f"{where}: expected 'Key: value', got {_show(line)}")
        if rest and not rest.startswith(" "):
            raise UsageError(f"{where}: {key}: expected a space after ':'")
        value = rest[1:]
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise UsageError(f"{where}: {key}: contains a control character")
        if key == "Sig":
            try:
                s = parse_sig(value)
            except _Bad as e:
                raise UsageError(f"{where}: Sig: {e}") from None
            if all(s.text != o.text for o in sigs):
                sigs.append(NarSig(s.key_name, s.sig, no))
            continue
        if key in _SINGLE:
            if key in values:
                raise UsageError(f"{where}: {key}: appears twice (first at line "
                                 f"{values[key][1]})")
            values[key] = (value, no)
    for key in _REQUIRED:
        if key not in values:
            raise UsageError(f"{source}: {key}: missing")
    return _build(source, values, tuple(sigs), tuple(lines))


def _build(source: str, values: dict[str, tuple[str, int]], sigs: tuple[NarSig, ...],
           lines: tuple[str, ...]) -> NarInfo:
    def field(key: str) -> tuple[str, str]:
        value, no = values[key]
        return value, f"{source}:{no}: {key}"

    def get(key: str, convert, default=None):  # type: ignore[no-untyped-def]
        if key not in values:
            return default
        value, where = field(key)
        try:
            return convert(value)
        except _Bad as e:
            raise UsageError(f"{where}: {e}") from None

    store_path = get("StorePath", parse_nix_store_path)
    compression = get("Compression", _compression, "bzip2")  # Nix's default when absent
    refs = get("References", _references, ())
    deriver = get("Deriver", lambda v: None if v == "unknown-deriver" else check_base_name(v))
    ca = get("CA", _ca)
    return NarInfo(
        source=source,
        store_path=store_path,
        url=get("URL", _url),
        compression=compression,
        file_hash=get("FileHash", parse_sha256),
        file_size=get("FileSize", lambda v: _size(v, "FileSize", positive=False)),
        nar_hash=get("NarHash", parse_sha256),
        nar_size=get("NarSize", lambda v: _size(v, "NarSize", positive=True)),
        references=refs,
        deriver=deriver,
        sigs=sigs,
        ca=ca,
        lines=lines,
    )


def _references(value: str) -> tuple[str, ...]:
    if not value:
        return ()
    names = value.split(" ")
    if "" in names:
        raise _Bad(f"{_show(value)}: names separated by single spaces, none leading or "
                   f"trailing")
    return tuple(check_base_name(r) for r in names)


def _compression(value: str) -> str:
    if value not in COMPRESSIONS:
        raise _Bad(f"{_show(value)}: not supported (one of {', '.join(COMPRESSIONS)})")
    return value


def _ca(value: str) -> str:
    if not re.fullmatch(r"(fixed|text):[!-~]+", value):
        raise _Bad(f"{_show(value)}: expected fixed:... or text:...")
    return value


# -- signatures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigCheck:
    """What one `Sig` line is worth under a policy."""

    sig: NarSig
    key: bytes | None  # the trusted public key it verified under, if any
    problem: str  # "" when it counts

    @property
    def counts(self) -> bool:
        """A valid signature by a trusted, unrevoked key."""
        return not self.problem


def check_signatures(info: NarInfo, policy: Policy) -> list[SigCheck]:
    """Check every `Sig` over the fingerprint with the policy's trusted keys.

    A Sig names its key; the name is only a hint for finding the public key among the
    trusted ones (a name bound to no trusted key makes the Sig not count). Distinct
    signers are then distinct public keys: see `distinct_signers`.
    """
    by_name: dict[str, list[bytes]] = {}
    for key, names in policy.trusted.items():
        for n in names:
            by_name.setdefault(n, []).append(key)
    message = info.fingerprint().encode()
    out = []
    for s in info.sigs:
        keys = by_name.get(s.key_name, [])
        good = [k for k in keys if verify_signature(k, message, s.sig)]
        if not keys:
            out.append(SigCheck(s, None, f"{s.key_name}: not a trusted key"))
        elif not good:
            out.append(SigCheck(s, None, f"{s.key_name}: the signature does not verify (the "
                                         f"narinfo was changed, or signed by another key)"))
        elif good[0] in policy.revoked:
            out.append(SigCheck(s, good[0], f"{s.key_name}: key revoked"))
        else:
            out.append(SigCheck(s, good[0], ""))
    return out


def distinct_signers(checks: Iterable[SigCheck]) -> dict[bytes, str]:
    """Public key -> key name, for the signatures that count (one entry per key)."""
    out: dict[bytes, str] = {}
    for c in checks:
        if c.counts and c.key is not None:
            out.setdefault(c.key, c.sig.key_name)
    return out


def sign_narinfo(info: NarInfo, key: SecretKey) -> NarSig:
    """`key`'s signature over the narinfo's fingerprint, as a Sig value."""
    return NarSig(key.name, key.sign(info.fingerprint().encode()), 0)
