"""Signing files of the namespace: which files, under which subject names, and storing it.

`annofs sign` and `annofs label` make ONE statement over every file they are given: a
file or symlink argument contributes itself (a symlink is not followed), a directory
every regular file and symlink below it: statements cover the tree, as a NAR does, and
a symlink's subject is its target (trust/symlink.py). A subject's
name is its path relative to the PARENT of the argument it came from:

    annofs sign /src/proj           ->  proj/README, proj/src/main.c, ...
    annofs sign /src/proj/README    ->  README

so a statement says the same thing wherever the tree is later copied or imported, and
the top directory's name keeps the subjects of a tree apart from those of a lone file.
Names only describe; what the signature binds is each subject's digest.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from annofs.errors import UsageError
from annofs.namespace.tree import Namespace
from annofs.store.records import Attrs
from annofs.trust.annotations import AnnotationStore
from annofs.trust.keys import SecretKey
from annofs.trust.pathglob import path_text  # defined with the globs it feeds
from annofs.trust.sshsig import SshPublicKey, signing_key_public
from annofs.trust.statement import (
    SignedStatement,
    Subject,
    make_ssh_statement,
    make_statement,
    sign_statement,
    sign_statement_ssh,
)
from annofs.trust.symlink import Content, Symlink, symlink_content
from annofs.volume import Volume


def _subject_name(parts: Sequence[bytes]) -> str:
    # Statements are JSON text: a name that is not UTF-8 is shown with \\xNN escapes.
    return "/".join(p.decode("utf-8", "backslashreplace") for p in parts)


@dataclass(frozen=True)
class FileRef:
    """A regular file found from a PATH argument, with its current version (digest set),
    or a symlink, with its target as its content."""

    path: tuple[bytes, ...]
    name: str  # the subject name (see the module docstring)
    version: Content

    @property
    def digest(self) -> bytes:
        """The content's digest: BLAKE3 of a file, `symlink_digest` of a symlink."""
        assert self.version.digest is not None
        return self.version.digest

    @property
    def is_symlink(self) -> bool:
        """Whether this is a symlink (its content is its target)."""
        return isinstance(self.version, Symlink)

    @property
    def target(self) -> bytes | None:
        """A symlink's target; None for a regular file."""
        return self.version.target if isinstance(self.version, Symlink) else None

    @property
    def subject(self) -> Subject:
        """The statement subject this file or symlink becomes."""
        return Subject(self.name, self.digest, self.is_symlink)

    @property
    def text(self) -> str:
        """The store path, for messages."""
        return path_text(self.path)


def collect_files(vol: Volume, paths: Sequence[Sequence[bytes]], *,
                  unique_names: bool = False) -> list[FileRef]:
    """Every regular file and symlink at or under `paths`, in argument then name order,
    each once (symlinks are not followed).

    Digests deferred at write time are computed here (and recorded), after every path
    was found and, with `unique_names`, after checking that no two files would have the
    same subject name: a mistake in the arguments changes nothing in the store.
    """
    # (path, subject name, version id of a file or target of a symlink)
    found: list[tuple[tuple[bytes, ...], str, int | bytes]] = []
    seen: set[tuple[bytes, ...]] = set()
    ns: Namespace = vol.namespace
    with vol.store.read() as txn:
        for arg in paths:
            arg = tuple(arg)
            a = ns.resolve(txn, arg)
            base = max(len(arg) - 1, 0)
            if a.is_reg or a.is_symlink:
                if arg not in seen:
                    seen.add(arg)
                    found.append((arg, _subject_name(arg[base:]), _content_key(a)))
                continue
            if not a.is_dir:
                raise UsageError(f"{path_text(arg)}: not a regular file, symlink or "
                                 f"directory")
            # Depth-first, names in order: the statement lists files as `find` would.
            stack = [(arg, int(a.target))]
            while stack:
                dir_path, dir_id = stack.pop()
                subdirs = []
                for name, child, _link in ns.iter_entries(txn, dir_id):
                    p = (*dir_path, name)
                    if (child.is_reg or child.is_symlink) and p not in seen:
                        seen.add(p)
                        found.append((p, _subject_name(p[base:]), _content_key(child)))
                    elif child.is_dir:
                        subdirs.append((p, int(child.target)))
                stack.extend(reversed(subdirs))
        versions: list[Content] = [
            symlink_content(key) if isinstance(key, bytes) else vol.versions.get(txn, key)
            for _, _, key in found]
    if unique_names:
        first: dict[str, tuple[bytes, ...]] = {}
        for p, n, _ in found:
            if n in first:
                raise UsageError(f"{path_text(first[n])} and {path_text(p)}: both would be "
                                 f"subject {n!r}; sign them in separate statements, or sign "
                                 f"a common parent")
            first[n] = p
    return [FileRef(p, n, v if isinstance(v, Symlink) else vol.versions.ensure_digest(v))
            for (p, n, _), v in zip(found, versions, strict=True)]


def fifos_under(vol: Volume, paths: Sequence[Sequence[bytes]]) -> list[tuple[bytes, ...]]:
    """Every FIFO at or under `paths` (`verify` reports those a rule that needs signers
    covers: nothing can judge their bytes, see TrustGate.fifo_refusal)."""
    found: list[tuple[bytes, ...]] = []
    ns: Namespace = vol.namespace
    with vol.store.read() as txn:
        for arg in paths:
            a = ns.resolve(txn, tuple(arg))
            if stat.S_ISFIFO(a.mode):
                found.append(tuple(arg))
            if not a.is_dir:
                continue
            stack = [(tuple(arg), int(a.target))]
            while stack:
                dir_path, dir_id = stack.pop()
                for name, child, _link in ns.iter_entries(txn, dir_id):
                    if stat.S_ISFIFO(child.mode):
                        found.append((*dir_path, name))
                    elif child.is_dir:
                        stack.append(((*dir_path, name), int(child.target)))
    return sorted(set(found))


def _content_key(a: Attrs) -> int | bytes:
    """A regular file's version id, or a symlink's target."""
    if a.is_symlink:
        assert isinstance(a.target, bytes)
        return a.target
    return int(a.target)


@dataclass(frozen=True)
class SshSigningKey:
    """An SSH key to sign with (`--ssh-key`): the file `ssh-keygen -Y sign -f` is given,
    and the public key and name (its comment, a claim) the statement will carry."""

    file: Path
    key: SshPublicKey
    name: str

    @classmethod
    def load(cls, file: Path) -> SshSigningKey:
        """Find the public key before anything is signed (UsageError if unreadable)."""
        key, comment = signing_key_public(file)
        return cls(file, key, comment)

    @property
    def shown(self) -> str:
        """How the CLI names the signer: the fingerprint, and the name it claims."""
        return f"{self.key.fingerprint} ({self.name or 'no comment'})"


def sign_files(vol: Volume, files: Sequence[FileRef], key: SecretKey | SshSigningKey,
               claim: str, *,
               label: str | None = None, when: int | None = None,
               annotations: AnnotationStore | None = None) -> tuple[SignedStatement, bool]:
    """Make, sign and store one statement over `files`; index their fragments.

    Returns the statement and whether it was new. One write transaction: either the
    statement and all its index entries are stored, or nothing is.
    """
    if not files:
        raise UsageError("nothing to sign: no regular files or symlinks in the given paths")
    if isinstance(key, SshSigningKey):
        # Signed before the write transaction: OpenSSH may wait for a passphrase or a touch.
        st = make_ssh_statement((f.subject for f in files), claim, key.key, key.name,
                                label=label, when=when)
        ss = sign_statement_ssh(st, key.file)
    else:
        st = make_statement((f.subject for f in files), claim, key, label=label, when=when)
        ss = sign_statement(st, key)
    ann = annotations or AnnotationStore(vol.store)
    with vol.store.write() as txn:
        added = ann.add(txn, ss)
        done: set[bytes] = set()
        for f in files:
            if f.digest not in done and not f.is_symlink:  # a symlink has no fragments
                done.add(f.digest)
                ann.index_fragments(txn, f.digest, f.version.hashes)
    return ss, added
