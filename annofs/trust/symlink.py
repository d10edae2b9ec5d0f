"""Symlinks as signed content: what the policy judges when a symlink is read.

Statements cover the tree, as a NAR does (SPEC §4): a symlink's content is its target
string, its digest `statement.symlink_digest` (a BLAKE3 mode of its own, so no file's
digest is ever a symlink's). Under a rule that needs signers an unsigned symlink is
refused like an unsigned file, at the moment its target is read: the filesystem's
`readlink` asks `judge_symlink`, and the kernel reads the target through READLINK on
every path walk, so a refused symlink cannot be followed either.

A path reached through a symlink is judged where the symlink is (here) and again where
it leads: the kernel walks the target and opens the file it names, which the mount
judges by the rule at that name. What a signer approves is the target string. An
absolute target means the same wherever the symlink is: it leads where the signer
approved (outside the mount, beyond any rule: signing a symlink to /tmp/x approves
whatever is there, as signing a script that runs /tmp/x would). A relative target's
meaning depends on where the symlink is, and content-bound approval lets anyone who may
write under the rule put the same string at another depth (`../../x` from a shallower
directory lands elsewhere). So under a rule that needs signers a relative target must
also land, lexically from the symlink's directory, under a rule at least as strict
(`position_verdict`): never out of the mount, never into a looser place. Each symlink on
the way is judged at its own readlink, so a `dir/..` that the kernel resolves through
another symlink meets the same check there.

`Symlink` stands beside `Version` as the content a verdict is about: it has the fields
the verdict's consumers read (`digest`, `id`, `size`), no fragments, and its target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import lmdb

from annofs.store.records import Version
from annofs.trust.gate import TrustGate
from annofs.trust.nixstore import Caller
from annofs.trust.pathglob import path_text
from annofs.trust.policy import Mode, Policy, Rule, signers_needed
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
                  txn: lmdb.Transaction | None = None, *, caller: Caller | None = None
                  ) -> tuple[Sequence[bytes], Symlink, Verdict]:
    """The verdict for reading the symlink to `target` known by `paths` (every name the
    caller knows for it, the primary first; a symlink can be hard-linked, and the
    strictest verdict holds, as for a file). Returns the deciding path, the content and
    the verdict; the caller records it and refuses if it is not allowed."""
    link = symlink_content(target)
    policy = gate.policy
    path = paths[0]
    mount = gate.mountpoint
    # A Nix store's evidence (gate.nix_verdict) adds to each name's verdict; a symlink's
    # landing place is checked on the result.
    verdict = position_verdict(policy, path, target, gate.nix_verdict(
        txn, path, link, gate.verdict(path, link, txn), caller), mount)
    for other in paths[1:]:
        if not verdict.allowed:
            break
        other_verdict = position_verdict(policy, other, target, gate.nix_verdict(
            txn, other, link, gate.verdict(other, link, txn), caller), mount)
        if not other_verdict.allowed:
            path, verdict = other, other_verdict
    return path, link, verdict


def content_verdict(gate: TrustGate, path: Sequence[bytes], content: Content,
                    txn: lmdb.Transaction | None = None) -> Verdict:
    """The verdict for a file's version or a symlink's content at `path` (for commands
    that judge a tree, as `annofs verify`: the same answer the mount gives); `txn`, a
    read transaction to judge in (a file's digest must then be known)."""
    if isinstance(content, Symlink):
        return judge_symlink(gate, [path], content.target, txn)[2]
    # In a Nix store, as a stranger's open would be judged (trust/nixstore.py).
    return gate.nix_verdict(txn, path, content, gate.verdict(path, content, txn))


def lexical_destination(path: Sequence[bytes], target: bytes) -> tuple[bytes, ...] | None:
    """Where a relative `target` of the symlink at store path `path` lands, lexically
    (`..` removes a name; symlinks on the way are not followed); None if it climbs
    above the root, i.e. out of the mount."""
    parts = list(path[:-1])
    for comp in target.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(comp)
    return tuple(parts)


def _at_least_as_strict(policy: Policy, dest: Rule | None, here: Rule | None) -> bool:
    """Whether content allowed under `dest` would be allowed under `here`'s demands:
    as many signers, and claims and keys no looser (a subset, if `here` limits them)."""
    if dest is here:
        return True
    if signers_needed(policy, dest) < signers_needed(policy, here):
        return False
    if here is None:
        return True
    for mine, theirs in ((here.claims, dest.claims if dest else None),
                         (here.keys, dest.keys if dest else None)):
        if mine is not None and (theirs is None or not theirs <= mine):
            return False
    return True


def mount_destination(mount: Sequence[bytes], target: bytes) -> tuple[bytes, ...] | None:
    """The store path an absolute `target` names if it leads into the mount whose host
    mountpoint has the components `mount` (`..` and `.` resolved as text); None if it
    leads elsewhere."""
    parts: list[bytes] = []
    for name in target.split(b"/"):
        if name in (b"", b"."):
            continue
        if name == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(name)
    if tuple(parts[:len(mount)]) != tuple(mount):
        return None
    return tuple(parts[len(mount):])


def position_verdict(policy: Policy, path: Sequence[bytes], target: bytes,
                     verdict: Verdict, mount: Sequence[bytes] | None = None) -> Verdict:
    """`verdict` (the symlink's content judged at `path`), refused as well when it is
    under a rule that needs signers and its target lands, lexically, out of the mount (a
    relative one) or under a looser rule (see the module docstring). An absolute target
    is placed only where the mountpoint is known (`mount`, its host components: the
    daemon's gate): one into the mount is judged like a relative one; one elsewhere
    approves what the signer pointed at."""
    if not verdict.satisfied or verdict.needed == 0:
        return verdict
    if target.startswith(b"/"):
        if mount is None:
            return verdict
        dest = mount_destination(mount, target)
        if dest is None:
            return verdict
        kind = "absolute"
    else:
        dest = lexical_destination(path, target)
        kind = "relative"
    if dest is None:
        problem = "its relative target leads out of the mount"
    else:
        dest_rule = policy.rule_at(dest)
        if _at_least_as_strict(policy, dest_rule, policy.rule_at(path)):
            return verdict
        shown = dest_rule.label if dest_rule is not None else f"default {policy.default.value}"
        problem = (f"its {kind} target leads to {path_text(dest)}, under a looser rule "
                   f"({shown})")
    missing = f"signed, but {problem}"
    reason = f"{verdict.rule}: {missing}"
    if policy.mode is Mode.WARN:
        reason = f"would be refused (mode warn): {reason}"
    return dataclasses.replace(verdict, allowed=policy.mode is not Mode.ENFORCE,
                               satisfied=False, missing=missing, reason=reason)
