"""Symlinks as signed content: what the policy judges when a symlink is read.

Statements cover the tree, as a NAR does (SPEC §4): a symlink's content is its target
string, its digest `statement.symlink_digest` (a BLAKE3 mode of its own, so no file's
digest is ever a symlink's). Under a rule that needs signers an unsigned symlink is
refused like an unsigned file, at the moment its target is read: the filesystem's
`readlink` asks `judge_symlink`, and the kernel reads the target through READLINK on
every path walk, so a refused symlink cannot be followed either.

A path reached through a symlink is judged where the symlink is (here) and again where
it leads: the kernel walks the target and opens the file it names, which the mount
judges by the rule at that name. A target outside the mount is beyond any rule: signing
a symlink approves pointing there, as signing a script approves what it runs.

`Symlink` stands beside `Version` as the content a verdict is about: it has the fields
the verdict's consumers read (`digest`, `id`, `size`), no fragments, and its target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lmdb

from annofs.store.records import Version
from annofs.trust.gate import TrustGate
from annofs.trust.statement import format_subject_digest, symlink_digest
from annofs.trust.verdict import Verdict


@dataclass(frozen=True)
class Symlink:
    """A symlink's content: its target, and the target's symlink digest."""

    target: bytes
    digest: bytes
    id: int = 0  # not a version: a symlink has no edit graph (events show version 0)
    hashes: bytes = b""  # no fragments

    @property
    def size(self) -> int:
        """The target's length in bytes (lstat's st_size)."""
        return len(self.target)

    @property
    def target_text(self) -> str:
        """The target for messages (bytes that are not UTF-8 as \\xNN)."""
        return self.target.decode("utf-8", "backslashreplace")


# What a verdict is about: a regular file's stored version, or a symlink's target.
Content = Version | Symlink


def symlink_content(target: bytes) -> Symlink:
    """The content of a symlink pointing at `target`."""
    return Symlink(target, symlink_digest(target))


def digest_text(content: Content) -> str:
    """`blake3:<hex>` for a file, `annofs-symlink-v1:<hex>` for a symlink; "" if unknown."""
    if content.digest is None:
        return ""
    return format_subject_digest(content.digest, isinstance(content, Symlink))


def judge_symlink(gate: TrustGate, paths: Sequence[Sequence[bytes]], target: bytes,
                  txn: lmdb.Transaction | None = None
                  ) -> tuple[Sequence[bytes], Symlink, Verdict]:
    """The verdict for reading the symlink to `target` known by `paths` (every name the
    caller knows for it, the primary first; a symlink can be hard-linked, and the
    strictest verdict holds, as for a file). Returns the deciding path, the content and
    the verdict; the caller records it and refuses if it is not allowed."""
    link = symlink_content(target)
    path = paths[0]
    verdict = gate.verdict(path, link, txn)
    for other in paths[1:]:
        if not verdict.allowed:
            break
        other_verdict = gate.verdict(other, link, txn)
        if not other_verdict.allowed:
            path, verdict = other, other_verdict
    return path, link, verdict
