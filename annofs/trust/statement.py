"""Statements: who claims what about which contents, signed as in-toto in DSSE.

A statement lists subjects (a relative path and the content's digest), a claim
(`reviewed`, `built`, `authored`, `reproduced`, or a user word), an optional label (for
`annofs label`: a signed annotation that is not an approval, e.g. `malicious`), the
signer's key name and public key, and the time. Its one canonical form is an in-toto
Statement v1 in a DSSE envelope; the signature is ed25519 over DSSE's pre-authentication
encoding (PAE) of the payload, so what is signed is exactly the payload's bytes and type.

The payload carries the signer's public key as well as its name: every envelope can be
checked on its own (on import, before anything is stored), and the trust decision later
compares public keys, never names (two names for one key are one signer; one name can be
claimed by anybody). The DSSE `keyid` is the key name, an unauthenticated hint; it must
equal the signed `signer` field so that it cannot mislead a reader.

A second kind carries a Nix binary cache's `Sig` (made by `annofs nix fetch`): the same
in-toto statement (claim `built`, subjects the files of the store path) plus the narinfo
`fingerprint` that the cache key signed, in an envelope of its own payload type, whose
signature is over that fingerprint, not over the PAE (the cache never saw the
statement). Its signature is checked like any other, every time it is read: a changed
fingerprint or a signature by another key does not verify. What ties its subjects to
the fingerprint's NarHash is the NAR they were restored from, checked by `nix fetch`;
annofs/nix/fetch.py says why, and why such statements are not taken from `attest import`.

Statements cover the tree, as a NAR does: a subject is a regular file, digest
`{"blake3": <hex>}` (BLAKE3 of its bytes, as `b3sum` prints), or a symlink, digest
`{"annofs-symlink-v1": <hex>}`: BLAKE3 in its key-derivation mode over the target's
bytes, with the context string SYMLINK_DIGEST_CONTEXT (`symlink_digest`). The two modes
differ in the flags of every compression, so no file's digest is any symlink's: a
signed file whose bytes are "/etc/shadow" approves no symlink to /etc/shadow, nor the
reverse. (A tag prefixed to the target in the plain mode would not do: a file could
hold the tagged string.) The digest set's key says which kind a subject is, for tools
outside annofs; annofs matches by digest, which cannot be confused across kinds.

A third kind is signed with an SSH key (`annofs sign --ssh-key`): the same Statement,
whose predicate carries `sshPublicKey` (`ssh-ed25519 BASE64` or
`sk-ssh-ed25519@openssh.com BASE64`, as in a .pub file) INSTEAD of `publicKey`, and
whose DSSE signature is an OpenSSH SSHSIG (binary, PROTOCOL.sshsig; namespace `annofs`)
over the PAE, made by `ssh-keygen -Y sign`. The envelope's keyid is then the key's
`SHA256:` fingerprint (what `ssh-keygen -l` prints) and `signer` is only the name the
key claims (its comment). Nix-key statements are byte for byte what they were. The
statement's `public_key` is the 32-byte Ed25519 key in either case, so signers stay
distinct by key across both kinds; the policy trusts an SSH-signed statement only
through its `trusted-ssh-signers` file (annofs/trust/policy.py).

A fourth kind records a signed git tag or commit (`annofs import --git
--verify-signatures`): claim `source` over the imported files, the predicate's `git`
naming the object type (`tag` or `commit`), the signed object's bytes (the tag or commit
object without its signature), the commit, the tag and the repository, and
`sshPublicKey`; the envelope's signature is the developer's own SSHSIG, namespace `git`,
over those bytes. As for a narinfo signature, what ties the subjects to the commit is
the import that checked the work tree was that commit's, clean: such statements are not
exported nor taken from `attest import`.

Every parser here is strict: a malformed field is a UsageError naming where it was found
and what is wrong, never a KeyError or TypeError.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import contextlib
import gc
import json
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import blake3

from annofs.errors import UsageError
from annofs.trust import sshsig
from annofs.trust.keys import (
    PUBLIC_SIZE,
    SIGNATURE_SIZE,
    SecretKey,
    key_fingerprint,
    verify_signature,
)

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
# Our own predicate type: a URN, so it points at no host we do not own.
PREDICATE_TYPE = "urn:annofs:statement:v1"
# A narinfo signature: not DSSE-signed (the signature is over `fingerprint`), so the
# envelope says so with a payload type no DSSE verifier would take for its own.
NARINFO_PAYLOAD_TYPE = "application/vnd.annofs.nix-narinfo-sig+json"
NARINFO_PREDICATE_TYPE = "urn:annofs:nix-narinfo-sig:v1"
NARINFO_CLAIM = "built"
# A signed git tag or commit, recorded by `annofs import --git --verify-signatures`.
GIT_PAYLOAD_TYPE = "application/vnd.annofs.git-sig+json"
GIT_PREDICATE_TYPE = "urn:annofs:git-sig:v1"
GIT_CLAIM = "source"
GIT_NAMESPACE = "git"
MAX_GIT_OBJECT = 1 << 20
_GIT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# Nix's `1;<store path>;sha256:<nix base32>;<NarSize>;<references, ",">`, printable ASCII.
_FINGERPRINT = re.compile(r"1;/[!-:<-~]+;sha256:[0-9a-df-np-sv-z]{52};[1-9][0-9]{0,18};"
                          r"[!-:<-~]*")
MAX_FINGERPRINT = 1 << 20

KNOWN_CLAIMS = ("reviewed", "built", "authored", "reproduced")
# `annofs label` statements carry this claim: a label is never an approval, so the word is
# reserved (no user claim and no policy `claims` entry may be "label").
LABEL_CLAIM = "label"
MALICIOUS = "malicious"
_WORD = re.compile(r"[a-z][a-z0-9-]{0,31}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_BAD_COMPONENT = re.compile(r"(?:^|/)\.{0,2}(?:/|$)")  # an empty, '.' or '..' component
# A subject name check_subject_name accepts, in the common form: ASCII components that do
# not start with '.' (so none is empty, '.' or '..'), no leading '/'. Others get the full check.
_PLAIN_NAME = re.compile(r"[\w+-][\w.+-]*(?:/[\w+-][\w.+-]*)*", re.ASCII)
_SUBJECT_FIELDS = {"name", "digest"}
_DIGEST_FIELDS = {"blake3"}
# A symlink subject's digest algorithm (in-toto DigestSet key) and BLAKE3 derive_key
# context: see the module docstring. Changing either changes every symlink's digest.
SYMLINK_DIGEST_ALGORITHM = "annofs-symlink-v1"
SYMLINK_DIGEST_CONTEXT = "annofs 2026-12-06 symlink target v1"
_SYMLINK_FIELDS = {SYMLINK_DIGEST_ALGORITHM}
MAX_NAME = 4096  # PATH_MAX: a subject name longer than any path is not a path

DIGEST_PREFIX = "blake3:"


class _Bad(Exception):
    """A field-level problem; the caller adds where it was found."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def check_word(word: str, what: str) -> None:
    """A claim or label: a lowercase word, [a-z][a-z0-9-]{0,31}."""
    if not isinstance(word, str) or not _WORD.fullmatch(word):
        raise UsageError(f"{what} {word!r}: must be a lowercase word matching "
                         f"[a-z][a-z0-9-]{{0,31}}")


def check_claim(claim: str) -> None:
    """A claim a statement may make (anything but the reserved word 'label')."""
    check_word(claim, "claim")
    if claim == LABEL_CLAIM:
        raise UsageError("claim 'label' is reserved for 'annofs label' statements")


def format_digest(digest: bytes) -> str:
    """`blake3:<64 hex>`, as `b3sum` prints the hex."""
    return DIGEST_PREFIX + digest.hex()


def symlink_digest(target: bytes) -> bytes:
    """A symlink's content digest: BLAKE3 derive_key(SYMLINK_DIGEST_CONTEXT) of its target."""
    return blake3.blake3(target, derive_key_context=SYMLINK_DIGEST_CONTEXT).digest()


def format_subject_digest(digest: bytes, symlink: bool) -> str:
    """`blake3:<hex>` for a file, `annofs-symlink-v1:<hex>` for a symlink."""
    return f"{SYMLINK_DIGEST_ALGORITHM}:{digest.hex()}" if symlink else format_digest(digest)


def parse_digest(text: str, where: str) -> bytes:
    """Parse `blake3:<64 hex>` (the bare hex is accepted too)."""
    hexpart = text.removeprefix(DIGEST_PREFIX)
    if not _HEX64.fullmatch(hexpart):
        raise UsageError(f"{where}: {text!r} is not a digest (blake3:<64 lowercase hex>)")
    return bytes.fromhex(hexpart)


def pae(payload_type: bytes, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding; lengths are byte counts, in ASCII decimal."""
    return b"DSSEv1 %d %b %d %b" % (len(payload_type), payload_type, len(body), body)


def format_time(seconds: int) -> str:
    """RFC 3339 UTC with seconds, as in-toto statements usually carry."""
    return time.strftime(_TIME_FORMAT, time.gmtime(seconds))


def _parse_time(text: Any, field: str) -> int:
    if not isinstance(text, str) or not _TIME.fullmatch(text):
        raise _Bad(field, f"expected a UTC time like 2024-05-01T12:00:00Z, got {_show(text)}")
    try:
        return calendar.timegm(time.strptime(text, _TIME_FORMAT))
    except ValueError:
        raise _Bad(field, f"{text!r} is not a valid date and time") from None


def _show(value: Any) -> str:
    """A short rendering of a bad value for a message."""
    text = json.dumps(value) if isinstance(value, str | int | float | bool) or value is None \
        else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _decode_b64(text: Any, field: str) -> bytes:
    """DSSE allows standard or URL-safe base64; verifiers must accept either."""
    if not isinstance(text, str):
        raise _Bad(field, f"expected a base64 string, got {_show(text)}")
    s = text.translate(str.maketrans("-_", "+/"))
    if len(s) % 4 == 1:
        raise _Bad(field, "not valid base64 (bad length)")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _Bad(field, f"not valid base64 ({e})") from None


def check_subject_name(name: Any, field: str) -> None:
    """A subject name: a relative path without empty, '.' or '..' components."""
    if not isinstance(name, str):
        raise _Bad(field, f"expected a relative path, got {_show(name)}")
    if not name or len(name) > MAX_NAME:
        raise _Bad(field, "must be a relative path of 1 to 4096 characters")
    if not _encodable(name):
        raise _Bad(field, "contains an unpaired surrogate (not Unicode text)")
    if name.startswith("/") or "\0" in name:
        raise _Bad(field, f"{name!r} must be relative (no leading '/') and contain no NUL")
    if _BAD_COMPONENT.search(name):
        raise _Bad(field, f"{name!r} has an empty, '.' or '..' component")


# -- the statement ----------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """One file or symlink a statement covers: its path relative to what was signed, and
    its digest (`symlink_digest` of the target for a symlink)."""

    name: str
    digest: bytes
    symlink: bool = False

    def digest_json(self) -> dict[str, str]:
        """The in-toto DigestSet: the algorithm names the kind."""
        return {SYMLINK_DIGEST_ALGORITHM if self.symlink else "blake3": self.digest.hex()}


@dataclass(frozen=True)
class GitSource:
    """A signed git tag or commit: the signed object (without its signature) and what
    the import saw. The tag object names its commit and tag, checked on parsing."""

    kind: str  # "tag" or "commit"
    object: bytes  # the bytes the SSHSIG (namespace git) is over
    commit: str  # hex
    tag: str | None
    repository: str

    def to_json(self) -> dict[str, Any]:
        """The predicate's `git` object."""
        out: dict[str, Any] = {"type": self.kind,
                               "object": base64.b64encode(self.object).decode(),
                               "commit": self.commit, "repository": self.repository}
        if self.tag is not None:
            out["tag"] = self.tag
        return out

    def check(self) -> str | None:
        """What is wrong with it, or None: a tag object must name this commit and tag."""
        if self.kind not in ("tag", "commit"):
            return f"type {self.kind!r} (tag or commit)"
        if not _GIT_ID.fullmatch(self.commit):
            return f"commit {self.commit[:80]!r} is not a git object id"
        if len(self.object) > MAX_GIT_OBJECT:
            return "the git object is larger than 1 MiB"
        if not self.repository or len(self.repository) > MAX_NAME:
            return "repository: 1 to 4096 characters"
        if self.kind == "tag":
            head = self.object.split(b"\n\n", 1)[0].split(b"\n")
            if not head or head[0] != f"object {self.commit}".encode() or \
                    self.tag is None or f"tag {self.tag}".encode() not in head:
                return "the tag object does not name this commit and tag"
        elif self.tag is not None:
            return "a signed commit names no tag"
        return None


@dataclass(frozen=True)
class Statement:
    """What a signer claims about a set of contents (unsigned)."""

    subjects: tuple[Subject, ...]
    claim: str
    signer: str
    public_key: bytes
    time: int  # seconds since the epoch, UTC
    label: str | None = None
    fingerprint: str | None = None  # a narinfo signature's signed fingerprint
    ssh_key: sshsig.SshPublicKey | None = None  # an SSH-signed statement's key
    git: GitSource | None = None  # a signed git tag or commit's statement

    def __post_init__(self) -> None:
        if not self.subjects:
            raise UsageError("a statement needs at least one subject")
        if self.ssh_key is not None and (self.fingerprint is not None
                                         or self.ssh_key.key != self.public_key):
            raise UsageError("an SSH-signed statement's public key is its SSH key's")
        if self.fingerprint is not None:
            if self.label is not None or self.claim != NARINFO_CLAIM:
                raise UsageError("a narinfo signature's statement has claim 'built' and "
                                 "no label")
            if not check_fingerprint(self.fingerprint):
                raise UsageError(f"{self.fingerprint[:80]!r}: not a narinfo fingerprint")
        if self.label is None:
            check_claim(self.claim)
        else:
            check_word(self.label, "label")
            if self.claim != LABEL_CLAIM:
                raise UsageError("a label statement has the claim 'label'")
        seen: set[str] = set()
        for i, s in enumerate(self.subjects):
            try:
                check_subject_name(s.name, f"subject[{i}].name")
            except _Bad as e:
                raise UsageError(str(e)) from None
            if s.name in seen:
                raise UsageError(f"{s.name}: two subjects with the same name")
            seen.add(s.name)
            if len(s.digest) != 32:
                raise UsageError(f"{s.name}: a digest is 32 bytes")
        if len(self.public_key) != PUBLIC_SIZE:
            raise UsageError("a public key is 32 bytes")

    @classmethod
    def checked_already(cls, subjects: tuple[Subject, ...], claim: str, signer: str,
                        public_key: bytes, when: int, label: str | None,
                        fingerprint: str | None = None,
                        ssh_key: sshsig.SshPublicKey | None = None,
                        git: GitSource | None = None) -> Statement:
        """Build without re-validating: for the parser, which checked each field."""
        obj = object.__new__(cls)
        for name, value in (("subjects", subjects), ("claim", claim), ("signer", signer),
                            ("public_key", public_key), ("time", when), ("label", label),
                            ("fingerprint", fingerprint), ("ssh_key", ssh_key),
                            ("git", git)):
            object.__setattr__(obj, name, value)
        return obj

    def to_json(self) -> dict[str, Any]:
        """The in-toto Statement v1 as a JSON object."""
        predicate: dict[str, Any] = {
            "claim": self.claim,
            "signer": self.signer,
            "time": format_time(self.time),
        }
        if self.ssh_key is None:
            predicate["publicKey"] = base64.b64encode(self.public_key).decode()
        else:
            predicate["sshPublicKey"] = self.ssh_key.to_text()
        if self.label is not None:
            predicate["label"] = self.label
        if self.fingerprint is not None:
            predicate["fingerprint"] = self.fingerprint
        if self.git is not None:
            predicate["git"] = self.git.to_json()
        return {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": s.name, "digest": s.digest_json()} for s in self.subjects],
            "predicateType": (NARINFO_PREDICATE_TYPE if self.fingerprint is not None
                              else GIT_PREDICATE_TYPE if self.git is not None
                              else PREDICATE_TYPE),
            "predicate": predicate,
        }

    def payload(self) -> bytes:
        """The canonical payload bytes: sorted keys, no spaces, UTF-8."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope with one signature (annofs statements have one signer each)."""

    payload_type: str
    payload: bytes
    keyid: str
    sig: bytes

    def pae(self) -> bytes:
        """The bytes the signature is over."""
        return pae(self.payload_type.encode("utf-8"), self.payload)

    def to_json(self) -> str:
        """One line of JSON (standard base64), as `attest export` writes it."""
        return json.dumps({
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode(),
            "signatures": [{"keyid": self.keyid, "sig": base64.b64encode(self.sig).decode()}],
        }, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, eq=False)
class SignedStatement:
    """A statement with its envelope. `signature_valid` is checked once, then remembered.

    The statement was read from the envelope's payload, so it says exactly what was
    signed; whether the signature holds is a separate question (`signature_valid`), and
    whether the signer is trusted is the policy's.
    """

    statement: Statement
    envelope: Envelope

    @cached_property
    def id(self) -> bytes:
        """A content address: the same signed statement has the same id everywhere."""
        return blake3.blake3(self.envelope.pae() + self.envelope.sig).digest()

    @cached_property
    def digests(self) -> frozenset[bytes]:
        """Every subject digest, for O(1) 'does it cover this content'."""
        return frozenset(s.digest for s in self.statement.subjects)

    @property
    def key_id(self) -> str:
        """The signer's key as shown when no trusted name may be: an SSH key's `SHA256:`
        fingerprint, a Nix key's base64."""
        ssh_key = self.statement.ssh_key
        return ssh_key.fingerprint if ssh_key is not None else \
            key_fingerprint(self.statement.public_key)

    @cached_property
    def ssh_verified(self) -> sshsig.Verified | None:
        """An SSH-signed statement whose SSHSIG holds: what the token says it checked
        (user presence, verification). None: not SSH-signed, or it does not verify."""
        ssh_key = self.statement.ssh_key
        if ssh_key is None:
            return None
        try:
            sig = sshsig.parse_signature(self.envelope.sig)
            if sig.public_key != ssh_key:
                return None
            git = self.statement.git
            if git is not None:
                return sshsig.verify(sig, git.object, GIT_NAMESPACE)
            return sshsig.verify(sig, self.envelope.pae(), sshsig.NAMESPACE)
        except sshsig.SshSigError:
            return None

    @property
    def signed_message(self) -> bytes:
        """What the signature is over: the PAE, a narinfo signature's fingerprint, or a
        git tag or commit's object."""
        if self.statement.git is not None:
            return self.statement.git.object
        fp = self.statement.fingerprint
        return self.envelope.pae() if fp is None else fp.encode("ascii")

    @cached_property
    def signature_valid(self) -> bool:
        """Whether the signature is the payload's public key's, over `signed_message`."""
        if self.statement.ssh_key is not None:
            return self.ssh_verified is not None
        return verify_signature(self.statement.public_key, self.signed_message,
                                self.envelope.sig)

    def names_of(self, digest: bytes) -> list[str]:
        """The subject names carrying `digest` in this statement."""
        return [s.name for s in self.statement.subjects if s.digest == digest]


def make_statement(subjects: Iterable[tuple[str, bytes] | Subject], claim: str,
                   key: SecretKey, *, label: str | None = None,
                   when: int | None = None) -> Statement:
    """A statement by `key` (unsigned yet) over subjects ((name, digest) pairs are files)."""
    return Statement(
        subjects=tuple(s if isinstance(s, Subject) else Subject(*s) for s in subjects),
        claim=LABEL_CLAIM if label is not None else claim,
        signer=key.name,
        public_key=key.public,
        time=int(time.time()) if when is None else when,
        label=label,
    )


def sign_statement(statement: Statement, key: SecretKey) -> SignedStatement:
    """Sign a statement with `key` (which must be the statement's signer)."""
    if key.public != statement.public_key or key.name != statement.signer:
        raise UsageError(f"{key.name}: not the signer this statement names")
    payload = statement.payload()
    sig = key.sign(pae(PAYLOAD_TYPE.encode(), payload))
    return SignedStatement(statement, Envelope(PAYLOAD_TYPE, payload, key.name, sig))


# What an SSH-signed statement's `signer` says when the key's comment is no key name.
SSH_DEFAULT_NAME = "ssh-key"
_KEY_NAME = re.compile(r"[^:\s\x00-\x1f\x7f]{1,128}")


def make_ssh_statement(subjects: Iterable[tuple[str, bytes] | Subject], claim: str,
                       key: sshsig.SshPublicKey, name: str, *, label: str | None = None,
                       when: int | None = None) -> Statement:
    """A statement by an SSH key (unsigned yet); `name` is only what the key claims to be
    called (its comment), shown as a claim unless the policy trusts the key."""
    if not _KEY_NAME.fullmatch(name):
        name = SSH_DEFAULT_NAME
    return Statement(
        subjects=tuple(s if isinstance(s, Subject) else Subject(*s) for s in subjects),
        claim=LABEL_CLAIM if label is not None else claim, signer=name,
        public_key=key.key, time=int(time.time()) if when is None else when,
        label=label, ssh_key=key)


def ssh_signed(statement: Statement, armored: str) -> SignedStatement:
    """A statement with its SSHSIG (armored, as `ssh-keygen -Y sign` writes it); the
    signature must be the statement's key's, over its PAE, or UsageError."""
    assert statement.ssh_key is not None
    try:
        blob = sshsig.dearmor(armored)
    except sshsig.SshSigError as e:
        raise UsageError(str(e)) from None
    env = Envelope(PAYLOAD_TYPE, statement.payload(), statement.ssh_key.fingerprint, blob)
    ss = SignedStatement(statement, env)
    if not ss.signature_valid:
        made_by = sshsig.parse_signature(blob).public_key.fingerprint
        raise UsageError(f"the SSH signature (by {made_by}) does not verify as "
                         f"{statement.ssh_key.fingerprint}'s over the statement")
    return ss


def sign_statement_ssh(statement: Statement, key_file: Path) -> SignedStatement:
    """Sign with `ssh-keygen -Y sign -n annofs` (a key file, or a .pub whose private
    half is in ssh-agent): OpenSSH asks for a passphrase or a FIDO touch as usual."""
    message = pae(PAYLOAD_TYPE.encode(), statement.payload())
    return ssh_signed(statement, sshsig.sign_with_ssh_keygen(key_file, message))


def git_statement(subjects: Iterable[Subject], git: GitSource, key: sshsig.SshPublicKey,
                  armored: str, when: int, name: str) -> SignedStatement:
    """A signed git tag or commit as a `source` statement over `subjects` (the files the
    import found to be that commit's tree); `armored`: the object's SSHSIG."""
    problem = git.check()
    if problem is not None:
        raise UsageError(f"git signature: {problem}")
    if not _KEY_NAME.fullmatch(name):
        name = SSH_DEFAULT_NAME
    st = Statement(subjects=tuple(subjects), claim=GIT_CLAIM, signer=name,
                   public_key=key.key, time=when, ssh_key=key, git=git)
    try:
        blob = sshsig.dearmor(armored)
    except sshsig.SshSigError as e:
        raise UsageError(str(e)) from None
    ss = SignedStatement(st, Envelope(GIT_PAYLOAD_TYPE, st.payload(), key.fingerprint, blob))
    if not ss.signature_valid:
        raise UsageError(f"the git {git.kind}'s SSH signature does not verify as "
                         f"{key.fingerprint}'s")
    return ss


def check_fingerprint(text: str) -> bool:
    """Whether `text` has the shape of a narinfo fingerprint (annofs/nix/narinfo.py)."""
    return len(text) <= MAX_FINGERPRINT and _FINGERPRINT.fullmatch(text) is not None


def narinfo_statement(subjects: Iterable[tuple[str, bytes] | Subject], signer: str,
                      public_key: bytes, fingerprint: str, sig: bytes,
                      when: int) -> SignedStatement:
    """A narinfo `Sig` (by `signer`'s `public_key`, over `fingerprint`) as a statement
    with claim `built` over subjects ((name, digest) pairs are files). The signature is
    not checked here: `signature_valid` says, as for any statement."""
    st = Statement(subjects=tuple(s if isinstance(s, Subject) else Subject(*s)
                                  for s in subjects), claim=NARINFO_CLAIM,
                   signer=signer, public_key=public_key, time=when, fingerprint=fingerprint)
    return SignedStatement(st, Envelope(NARINFO_PAYLOAD_TYPE, st.payload(), signer, sig))


# -- parsing ------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers reading one duplicated key differently is a known way to make a
    # signature mean two things: refuse the document.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Bad(k, "appears twice")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise _Bad("value", f"{name} is not valid JSON")


def _load_json(data: str | bytes, field: str) -> Any:
    if isinstance(data, bytes):
        # json.loads would guess UTF-16 or UTF-32 from the bytes; a payload is UTF-8.
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(field, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates,
                          parse_constant=_reject_constant)
    except _Bad as e:
        raise _Bad(field, str(e)) from None
    except RecursionError:
        raise _Bad(field, "nested too deeply") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are these
        raise _Bad(field, f"not valid JSON ({e})") from None


def _object(value: Any, field: str, required: Sequence[str],
            optional: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(field, f"expected a JSON object, got {_show(value)}")
    for k in required:
        if k not in value:
            raise _Bad(field, f"missing {k!r}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise _Bad(field, f"unknown field {unknown[0]!r}")
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Bad(field, f"expected a string, got {_show(value)}")
    if not _encodable(value):
        raise _Bad(field, "contains an unpaired surrogate (not Unicode text)")
    return value


def _encodable(text: str) -> bool:
    """JSON can escape lone surrogates that no UTF-8 text (nor our records) can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_envelope(data: str | bytes, where: str) -> Envelope:
    """Parse one DSSE envelope (JSON); UsageError `where: field: problem` if malformed."""
    try:
        return _parse_envelope(data)
    except _Bad as e:
        raise UsageError(f"{where}: {e}") from None


def _parse_envelope(data: str | bytes) -> Envelope:
    doc = _object(_load_json(data, "envelope"), "envelope",
                  ("payloadType", "payload", "signatures"))
    payload_type = _string(doc["payloadType"], "payloadType")
    if payload_type == GIT_PAYLOAD_TYPE:
        # Its subjects are bound to the commit only by the import that checked the tree.
        raise _Bad("payloadType", "a git signature is not imported from a file; "
                                  "'annofs import --git --verify-signatures' records it")
    if payload_type == NARINFO_PAYLOAD_TYPE:
        # Its subjects are bound to the signed NarHash only by the NAR they came from:
        # taking them from a file would let anyone attach a cache's signature to any files.
        raise _Bad("payloadType", "a narinfo signature is not imported from a file; "
                                  "'annofs nix fetch' records it after checking the NAR")
    if payload_type != PAYLOAD_TYPE:
        raise _Bad("payloadType", f"expected {PAYLOAD_TYPE!r}, got {_show(payload_type)}")
    payload = _decode_b64(doc["payload"], "payload")
    sigs = doc["signatures"]
    if not isinstance(sigs, list):
        raise _Bad("signatures", f"expected a list, got {_show(sigs)}")
    if len(sigs) != 1:
        raise _Bad("signatures", f"an annofs statement has exactly one signature, "
                                 f"found {len(sigs)}")
    entry = _object(sigs[0], "signatures[0]", ("keyid", "sig"))
    keyid = _string(entry["keyid"], "signatures[0].keyid")
    sig = _decode_b64(entry["sig"], "signatures[0].sig")
    # 64 bytes of ed25519 (a Nix key), or an SSHSIG blob (an SSH key): which one the
    # payload's key asks for is checked by open_envelope, the SSHSIG parsed there.
    if len(sig) != SIGNATURE_SIZE and not (sig.startswith(sshsig.MAGIC)
                                           and len(sig) <= sshsig.MAX_SIGNATURE):
        raise _Bad("signatures[0].sig", f"an ed25519 signature is 64 bytes, got {len(sig)} "
                                        f"(and it is no SSHSIG signature)")
    return Envelope(payload_type, payload, keyid, sig)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a payload is read.

    A statement over a tree is tens of thousands of objects made at once (the JSON
    document, the subjects), none in a cycle. With the collector on, that burst makes it
    promote the short-lived document and then traverse the whole heap: in the mount
    daemon a full collection took 17 ms of the 45 ms spent reading a 5,000-subject
    statement at the first open under it. Paused, the document is freed by reference
    counting before the collector ever sees it.
    """
    if not gc.isenabled():  # someone else paused it: theirs to resume
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def open_envelope(env: Envelope, where: str) -> SignedStatement:
    """Read the statement an envelope carries (strictly); the signature is not checked."""
    try:
        with _collector_paused():
            st = _parse_statement(_load_json(env.payload, "payload"))
    except _Bad as e:
        raise UsageError(f"{where}: {e}") from None
    except UsageError as e:
        raise UsageError(f"{where}: payload: {e}") from None
    if (env.payload_type == NARINFO_PAYLOAD_TYPE) != (st.fingerprint is not None) or \
            (env.payload_type == GIT_PAYLOAD_TYPE) != (st.git is not None) or \
            env.payload_type not in (PAYLOAD_TYPE, NARINFO_PAYLOAD_TYPE, GIT_PAYLOAD_TYPE):
        raise UsageError(f"{where}: payloadType {env.payload_type!r} does not match the "
                         f"payload's predicateType")
    if st.ssh_key is not None:
        _check_ssh_envelope(env, st.ssh_key, where,
                            GIT_NAMESPACE if st.git is not None else sshsig.NAMESPACE)
    elif len(env.sig) != SIGNATURE_SIZE:
        raise UsageError(f"{where}: signatures[0].sig: the payload names an ed25519 "
                         f"publicKey, whose signature is 64 bytes, not {len(env.sig)}")
    elif env.keyid != st.signer:
        raise UsageError(f"{where}: signatures[0].keyid {env.keyid!r} is not the signer the "
                         f"payload names ({st.signer!r})")
    return SignedStatement(st, env)


def _check_ssh_envelope(env: Envelope, key: sshsig.SshPublicKey, where: str,
                        namespace: str) -> None:
    """An SSH-signed statement's envelope: keyid is the key's fingerprint, the signature
    a well-formed SSHSIG by that key in namespace `annofs` (whether it verifies is
    `signature_valid`'s to say)."""
    if env.keyid != key.fingerprint:
        raise UsageError(f"{where}: signatures[0].keyid {env.keyid!r} is not the "
                         f"fingerprint of the payload's sshPublicKey ({key.fingerprint})")
    try:
        sig = sshsig.parse_signature(env.sig, "signatures[0].sig")
    except sshsig.SshSigError as e:
        raise UsageError(f"{where}: {e}") from None
    if sig.public_key != key:
        raise UsageError(f"{where}: signatures[0].sig: made by {sig.public_key.fingerprint}, "
                         f"not by the payload's sshPublicKey ({key.fingerprint})")
    if sig.namespace != namespace:
        raise UsageError(f"{where}: signatures[0].sig: namespace {sig.namespace!r}, not "
                         f"{namespace!r}")


def _parse_statement(doc: Any) -> Statement:
    doc = _object(doc, "payload", ("_type", "subject", "predicateType", "predicate"))
    if doc["_type"] != STATEMENT_TYPE:
        raise _Bad("payload._type", f"expected {STATEMENT_TYPE!r}, got {_show(doc['_type'])}")
    narinfo = doc["predicateType"] == NARINFO_PREDICATE_TYPE
    gitsig = doc["predicateType"] == GIT_PREDICATE_TYPE
    if doc["predicateType"] != PREDICATE_TYPE and not narinfo and not gitsig:
        raise _Bad("payload.predicateType",
                   f"expected {PREDICATE_TYPE!r}, got {_show(doc['predicateType'])}")
    subjects_raw = doc["subject"]
    if not isinstance(subjects_raw, list) or not subjects_raw:
        raise _Bad("payload.subject", "expected a non-empty list")
    subjects = []
    names: set[str] = set()
    # A statement over a tree has a subject per file, all read at the first open of any
    # of them: the usual shapes are recognised inline, and anything else goes through
    # the general checks (which raise, saying what is wrong) before it is used.
    for i, raw in enumerate(subjects_raw):
        if not (type(raw) is dict and raw.keys() == _SUBJECT_FIELDS):
            _object(raw, f"payload.subject[{i}]", ("name", "digest"))
        name, dig = raw["name"], raw["digest"]
        if not (type(name) is str and len(name) <= MAX_NAME and _PLAIN_NAME.fullmatch(name)):
            check_subject_name(name, f"payload.subject[{i}].name")
        if name in names:
            raise _Bad(f"payload.subject[{i}].name", f"{name!r} appears twice")
        names.add(name)
        symlink = False
        algorithm = "blake3"
        if not (type(dig) is dict and dig.keys() == _DIGEST_FIELDS):
            # A symlink's digest, or else exactly {"blake3": ...} (raises saying what is
            # wrong): never both kinds, never an algorithm we do not know.
            if type(dig) is dict and dig.keys() == _SYMLINK_FIELDS:
                symlink, algorithm = True, SYMLINK_DIGEST_ALGORITHM
            else:
                _object(dig, f"payload.subject[{i}].digest", ("blake3",))
        hexd = dig[algorithm]
        if not isinstance(hexd, str) or not _HEX64.fullmatch(hexd):
            raise _Bad(f"payload.subject[{i}].digest.{algorithm}",
                       f"expected 64 lowercase hex digits, got {_show(hexd)}")
        subjects.append(Subject(name, bytes.fromhex(hexd), symlink))
    pred = doc["predicate"]
    # An SSH-signed statement names its key as sshPublicKey instead of publicKey.
    ssh = gitsig or (type(pred) is dict and "sshPublicKey" in pred and not narinfo)
    pred = _object(pred, "payload.predicate",
                   ("claim", "signer", "sshPublicKey" if ssh else "publicKey", "time",
                    *(("fingerprint",) if narinfo else ()), *(("git",) if gitsig else ())),
                   () if gitsig else ("label",))
    git = _parse_git(pred["git"]) if gitsig else None
    if gitsig and pred["claim"] != GIT_CLAIM:
        raise _Bad("payload.predicate.claim", f"a git signature claims {GIT_CLAIM!r}")
    fingerprint = None
    if narinfo:
        fingerprint = _string(pred["fingerprint"], "payload.predicate.fingerprint")
        if not check_fingerprint(fingerprint):
            raise _Bad("payload.predicate.fingerprint",
                       f"{_show(fingerprint)} is not a narinfo fingerprint")
        if pred["claim"] != NARINFO_CLAIM or "label" in pred:
            raise _Bad("payload.predicate.claim", "a narinfo signature claims 'built', "
                                                  "with no label")
    claim = _string(pred["claim"], "payload.predicate.claim")
    if not _WORD.fullmatch(claim):
        raise _Bad("payload.predicate.claim", f"{claim!r} is not a lowercase word")
    label = pred.get("label")
    if label is not None:
        label = _string(label, "payload.predicate.label")
        if not _WORD.fullmatch(label):
            raise _Bad("payload.predicate.label", f"{label!r} is not a lowercase word")
        if claim != LABEL_CLAIM:
            raise _Bad("payload.predicate.claim", "a statement with a label has claim 'label'")
    elif claim == LABEL_CLAIM:
        raise _Bad("payload.predicate.label", "missing (claim 'label' needs one)")
    signer = _string(pred["signer"], "payload.predicate.signer")
    if not signer or ":" in signer or any(c.isspace() or ord(c) < 32 for c in signer):
        raise _Bad("payload.predicate.signer", f"{signer!r} is not a key name")
    ssh_key = None
    if ssh:
        text = _string(pred["sshPublicKey"], "payload.predicate.sshPublicKey")
        parts = text.split(" ")
        try:
            if len(parts) != 2:
                raise sshsig.SshSigError("expected 'TYPE BASE64'")
            ssh_key = sshsig.SshPublicKey.from_text(text, "payload.predicate.sshPublicKey")
        except sshsig.SshSigError as e:
            raise _Bad("payload.predicate.sshPublicKey", str(e)) from None
        if ssh_key.to_text() != text:  # one spelling per key: no padding variants
            raise _Bad("payload.predicate.sshPublicKey", "not in canonical form")
        pub = ssh_key.key
    else:
        pub = _decode_b64(pred["publicKey"], "payload.predicate.publicKey")
        if len(pub) != PUBLIC_SIZE:
            raise _Bad("payload.predicate.publicKey",
                       f"an ed25519 public key is 32 bytes, got {len(pub)}")
    when = _parse_time(pred["time"], "payload.predicate.time")
    # Every field was checked above, as it was read: skip __post_init__'s second pass
    # (it doubles the cost of reading a statement over a 40,000-file tree).
    return Statement.checked_already(tuple(subjects), claim, signer, pub, when, label,
                                     fingerprint, ssh_key, git)


def _parse_git(raw: Any) -> GitSource:
    doc = _object(raw, "payload.predicate.git", ("type", "object", "commit", "repository"),
                  ("tag",))
    tag = doc.get("tag")
    git = GitSource(_string(doc["type"], "payload.predicate.git.type"),
                    _decode_b64(doc["object"], "payload.predicate.git.object"),
                    _string(doc["commit"], "payload.predicate.git.commit"),
                    None if tag is None else _string(tag, "payload.predicate.git.tag"),
                    _string(doc["repository"], "payload.predicate.git.repository"))
    problem = git.check()
    if problem is not None:
        raise _Bad("payload.predicate.git", problem)
    return git


def load_signed(data: str | bytes, where: str) -> SignedStatement:
    """Parse an envelope line and its statement, and require a valid signature."""
    ss = open_envelope(parse_envelope(data, where), where)
    if not ss.signature_valid:
        raise UsageError(f"{where}: the signature by {ss.statement.signer!r} does not verify "
                         f"(the statement was changed, or signed by another key)")
    return ss
