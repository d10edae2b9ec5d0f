"""`annofs import --git --verify-signatures`: the work tree's signed tag or commit.

Before the import: the work tree must be a repository's top level with no uncommitted
change to a tracked file (staged or not; `--git` imports only tracked files, so the
imported tree is then exactly HEAD's), and HEAD must carry an SSH signature (git's
`gpg.format = ssh`) by a key the policy's `trusted-ssh-signers` allows in namespace
`git`, valid at the tag's (or commit's) time and now. A signed annotated tag pointing at
HEAD is preferred to the commit's own signature (a release is usually a tag). OpenPGP
signatures are refused by name: annofs verifies SSH signatures only.

What is signed (as git verifies it): a tag object is the object up to its signature,
which git appends at the end of the message; a commit object is the object without its
`gpgsig` header (the header's first line and its continuation lines, which start with a
space).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from annofs.errors import UsageError
from annofs.trust.allowed_signers import AllowedSigner
from annofs.trust.annotations import AnnotationStore
from annofs.trust.pathglob import path_text
from annofs.trust.policy import Policy
from annofs.trust.signing import collect_files
from annofs.trust.sshsig import ARMOR_BEGIN, SshPublicKey, SshSigError, parse_signature, verify
from annofs.trust.statement import GIT_NAMESPACE, GitSource, SignedStatement, git_statement
from annofs.volume import Volume

_PGP = b"-----BEGIN PGP SIGNATURE-----"
_SSH = ARMOR_BEGIN.encode()


@dataclass(frozen=True)
class SignedHead:
    """HEAD's checked signature: what was signed, by which trusted key, when."""

    source: GitSource
    armored: str
    key: SshPublicKey
    signer: AllowedSigner
    when: int  # the tag's or commit's time (seconds since the epoch)

    def describe(self) -> str:
        """One line: `tag v1.0 (commit abc...) signed by NAME (SHA256:...)`."""
        what = (f"tag {self.source.tag} (commit {self.source.commit[:12]})"
                if self.source.tag is not None else f"commit {self.source.commit[:12]}")
        return f"{what} signed by {self.signer.name} ({self.key.fingerprint})"


def _git(src: Path, *args: str) -> bytes:
    try:
        proc = subprocess.run(["git", "-C", str(src), *args], capture_output=True,
                              check=False)
    except FileNotFoundError:
        raise UsageError("--git: the git command is not installed") from None
    if proc.returncode != 0:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UsageError(f"{src}: git {args[0]} failed ({why[-1] if why else 'no reason'})")
    return proc.stdout


def check_clean(src: Path) -> str:
    """The work tree's top level must be `src`, with no uncommitted change to a tracked
    file; returns HEAD's commit id."""
    prefix = _git(src, "rev-parse", "--show-prefix").strip()
    if prefix:
        raise UsageError(f"{src}: not the top of its git work tree (a signature covers the "
                         f"whole commit)")
    changed = _git(src, "status", "--porcelain=v1", "-z", "--untracked-files=no")
    if changed:
        first = changed.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
        raise UsageError(f"{src}: uncommitted changes ({first.strip()}, ...): the files would "
                         f"not be the signed commit's")
    return _git(src, "rev-parse", "HEAD").decode().strip()


def _time_of(obj: bytes, header: bytes) -> int:
    for line in obj.split(b"\n\n", 1)[0].split(b"\n"):
        if line.startswith(header + b" "):
            parts = line.rsplit(b" ", 2)
            if len(parts) == 3 and parts[1].isdigit():
                return int(parts[1])
    return int(time.time())


def _split_tag(obj: bytes) -> tuple[bytes, bytes] | None:
    """(signed part, armored signature) of a tag object, None if unsigned. As git does,
    the signature starts at the LAST line that begins one (a message may quote one)."""
    body = obj.find(b"\n\n")
    i = max(obj.rfind(b"\n" + _SSH), obj.rfind(b"\n" + _PGP))
    if body < 0 or i < body:
        return None
    return obj[:i + 1], obj[i + 1:]


def _split_commit(obj: bytes) -> tuple[bytes, bytes] | None:
    """(signed part, armored signature) of a commit object, None if unsigned."""
    header, sep, body = obj.partition(b"\n\n")
    kept, sig, in_sig = [], [], False
    for line in header.split(b"\n"):
        if line.startswith(b"gpgsig "):
            in_sig = True
            sig.append(line[len(b"gpgsig "):])
        elif in_sig and line.startswith(b" "):
            sig.append(line[1:])
        else:
            in_sig = False
            kept.append(line)
    if not sig:
        return None
    return b"\n".join(kept) + sep + body, b"\n".join(sig) + b"\n"


def _repository(src: Path) -> str:
    try:
        url = _git(src, "config", "--get", "remote.origin.url").decode().strip()
    except UsageError:
        url = ""
    return url or str(src.resolve())


def signed_head(src: Path, policy: Policy, now: float | None = None) -> SignedHead:
    """Check the work tree and HEAD's signature (a signed tag at HEAD first, else the
    commit's); UsageError saying what is wrong, before anything is imported."""
    commit = check_clean(src)
    now = time.time() if now is None else now
    candidates: list[tuple[str, str | None, bytes]] = []
    for tag in sorted(_git(src, "tag", "--points-at", "HEAD").decode().split()):
        if _git(src, "cat-file", "-t", tag).strip() == b"tag":
            candidates.append(("tag", tag, _git(src, "cat-file", "tag", tag)))
    candidates.append(("commit", None, _git(src, "cat-file", "commit", commit)))
    problems = []
    for kind, tag, obj in candidates:
        parts = _split_tag(obj) if kind == "tag" else _split_commit(obj)
        what = f"tag {tag}" if tag is not None else f"commit {commit[:12]}"
        if parts is None:
            problems.append(f"{what} is not signed")
            continue
        signed, armored = parts
        if armored.startswith(_PGP):
            problems.append(f"{what} has an OpenPGP signature (annofs verifies SSH "
                            f"signatures only: gpg.format = ssh)")
            continue
        try:
            sig = parse_signature(armored, f"{what}'s signature")
            verify(sig, signed, GIT_NAMESPACE)
        except SshSigError as e:
            problems.append(str(e))
            continue
        when = _time_of(obj, b"tagger" if kind == "tag" else b"committer")
        lines = [ln for ln in policy.ssh_signers.get(sig.public_key.key, ())
                 if ln.key == sig.public_key]
        if not lines:
            problems.append(f"{what} is signed by {sig.public_key.fingerprint}, not a key "
                            f"of the policy's trusted-ssh-signers")
            continue
        if sig.public_key.key in policy.revoked:
            problems.append(f"{what} is signed by {lines[0].name}, whose key is revoked")
            continue
        ok = [ln for ln in lines if ln.allows_namespace(GIT_NAMESPACE)
              and ln.valid_at(when) and ln.valid_at(now)]
        if not ok:
            problems.append(f"{what} is signed by {lines[0].name}, but {lines[0].where} "
                            f"does not allow namespace 'git' at its time and now "
                            f"(namespaces=, valid-after, valid-before)")
            continue
        source = GitSource(kind, signed, commit, tag, _repository(src))
        return SignedHead(source, armored.decode("ascii", "replace"), sig.public_key,
                          ok[0], when)
    raise UsageError(f"{src}: no trusted signature at HEAD: {'; '.join(problems)}")


def record_source(vol: Volume, dest: Sequence[bytes], head: SignedHead
                  ) -> tuple[SignedStatement, int]:
    """Store the `source` statement of `head` over every file and symlink under `dest`
    (subject names relative to its parent, as `annofs sign` names them); returns it and
    the number of subjects. One write transaction."""
    files = collect_files(vol, [dest], unique_names=True)
    if not files:
        raise UsageError(f"{path_text(dest)}: no files to record the signature over")
    ss = git_statement([f.subject for f in files], head.source, head.key, head.armored,
                       head.when, head.signer.name)
    ann = AnnotationStore(vol.store)
    with vol.store.write() as txn:
        ann.add(txn, ss)
        done: set[bytes] = set()
        for f in files:
            if f.digest not in done and not f.is_symlink:
                done.add(f.digest)
                ann.index_fragments(txn, f.digest, f.version.hashes)
    return ss, len(files)
