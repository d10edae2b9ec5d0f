"""Signing files of the namespace: which files, under which subject names, and storing it.

`annofs sign` and `annofs label` make ONE statement over every file they are given: a
file argument contributes itself, a directory every regular file below it. A subject's
name is its path relative to the PARENT of the argument it came from:

    annofs sign /src/proj           ->  proj/README, proj/src/main.c, ...
    annofs sign /src/proj/README    ->  README

so a statement says the same thing wherever the tree is later copied or imported, and
the top directory's name keeps the subjects of a tree apart from those of a lone file.
Names only describe; what the signature binds is each subject's digest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from annofs.errors import UsageError
from annofs.namespace.tree import Namespace
from annofs.store.records import Version
from annofs.trust.annotations import AnnotationStore
from annofs.trust.keys import SecretKey
from annofs.trust.pathglob import path_text  # defined with the globs it feeds
from annofs.trust.statement import SignedStatement, make_statement, sign_statement
from annofs.volume import Volume


def _subject_name(parts: Sequence[bytes]) -> str:
    # Statements are JSON text: a name that is not UTF-8 is shown with \\xNN escapes.
    return "/".join(p.decode("utf-8", "backslashreplace") for p in parts)


@dataclass(frozen=True)
class FileRef:
    """A regular file found from a PATH argument, with its current version (digest set)."""

    path: tuple[bytes, ...]
    name: str  # the subject name (see the module docstring)
    version: Version

    @property
    def digest(self) -> bytes:
        """The content's BLAKE3 digest."""
        assert self.version.digest is not None
        return self.version.digest

    @property
    def text(self) -> str:
        """The store path, for messages."""
        return path_text(self.path)


def collect_files(vol: Volume, paths: Sequence[Sequence[bytes]], *,
                  unique_names: bool = False) -> list[FileRef]:
    """Every regular file at or under `paths`, in argument then name order, each once.

    Digests deferred at write time are computed here (and recorded), after every path
    was found and, with `unique_names`, after checking that no two files would have the
    same subject name: a mistake in the arguments changes nothing in the store.
    """
    found: list[tuple[tuple[bytes, ...], str, int]] = []
    seen: set[tuple[bytes, ...]] = set()
    ns: Namespace = vol.namespace
    with vol.store.read() as txn:
        for arg in paths:
            arg = tuple(arg)
            a = ns.resolve(txn, arg)
            base = max(len(arg) - 1, 0)
            if a.is_reg:
                if arg not in seen:
                    seen.add(arg)
                    found.append((arg, _subject_name(arg[base:]), int(a.target)))
                continue
            if not a.is_dir:
                raise UsageError(f"{path_text(arg)}: not a regular file or directory")
            # Depth-first, names in order: the statement lists files as `find` would.
            stack = [(arg, int(a.target))]
            while stack:
                dir_path, dir_id = stack.pop()
                subdirs = []
                for name, child, _link in ns.iter_entries(txn, dir_id):
                    p = (*dir_path, name)
                    if child.is_reg and p not in seen:
                        seen.add(p)
                        found.append((p, _subject_name(p[base:]), int(child.target)))
                    elif child.is_dir:
                        subdirs.append((p, int(child.target)))
                stack.extend(reversed(subdirs))
        versions = [vol.versions.get(txn, vid) for _, _, vid in found]
    if unique_names:
        first: dict[str, tuple[bytes, ...]] = {}
        for p, n, _ in found:
            if n in first:
                raise UsageError(f"{path_text(first[n])} and {path_text(p)}: both would be "
                                 f"subject {n!r}; sign them in separate statements, or sign "
                                 f"a common parent")
            first[n] = p
    return [FileRef(p, n, vol.versions.ensure_digest(v))
            for (p, n, _), v in zip(found, versions, strict=True)]


def sign_files(vol: Volume, files: Sequence[FileRef], key: SecretKey, claim: str, *,
               label: str | None = None, when: int | None = None,
               annotations: AnnotationStore | None = None) -> tuple[SignedStatement, bool]:
    """Make, sign and store one statement over `files`; index their fragments.

    Returns the statement and whether it was new. One write transaction: either the
    statement and all its index entries are stored, or nothing is.
    """
    if not files:
        raise UsageError("nothing to sign: no regular files in the given paths")
    st = make_statement(((f.name, f.digest) for f in files), claim, key, label=label,
                        when=when)
    ss = sign_statement(st, key)
    ann = annotations or AnnotationStore(vol.store)
    with vol.store.write() as txn:
        added = ann.add(txn, ss)
        done: set[bytes] = set()
        for f in files:
            if f.digest not in done:
                done.add(f.digest)
                ann.index_fragments(txn, f.digest, f.version.hashes)
    return ss, added
