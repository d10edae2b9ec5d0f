"""`annofs log`, `cat`, `diff`: a file's versions along the edit graph."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import sys
from pathlib import Path

import click
import lmdb

from annofs.cli.context import open_volume, store_path
from annofs.cli.paths import VersionedPath, resolve_target, split_version
from annofs.cli.stores import settle
from annofs.content.history import ancestry
from annofs.content.versions import TooLargeToHashError
from annofs.errors import NotFoundError, UsageError
from annofs.store.records import Version
from annofs.volume import Volume


def _file_version(vol: Volume, vp: VersionedPath) -> Version:
    """The version a PATH[@VERSION] names; the version must be in the file's history."""
    with vol.store.read() as txn:
        try:
            a = vol.namespace.resolve(txn, vp.parts)
        except NotFoundError:
            _not_a_version(vol, txn, vp)
            raise
        if not a.is_reg:
            raise UsageError(f"{vp.text}: not a regular file")
        current = int(a.target)
        if vp.version is None:
            return vol.versions.get(txn, current)
        for v in ancestry(txn, vol.versions, current):
            if v.id == vp.version:
                return v
    raise UsageError(f"{vp.text}: version {vp.version} is not in this file's history "
                     f"(see annofs log)")


def _not_a_version(vol: Volume, txn: lmdb.Transaction, vp: VersionedPath) -> None:
    """PATH@WORD where PATH exists and WORD is not a number: say so (UsageError), rather
    than that no file is named PATH@WORD. A name with '@' in it stays a name otherwise."""
    path, sep, word = vp.text.rpartition("@")
    if not sep or not path or not vp.parts or not vp.parts[-1].endswith(b"@" + word.encode(
            "utf-8", "surrogateescape")):
        return
    head = [*vp.parts[:-1], vp.parts[-1][:-len(word.encode("utf-8", "surrogateescape")) - 1]]
    if head[-1]:
        try:
            vol.namespace.resolve(txn, head)
        except NotFoundError:
            return
        raise UsageError(f"{vp.text}: version {word!r} is not a number (PATH@VERSION takes "
                         f"a version id from annofs log)")


def _target(ctx: click.Context, text: str) -> tuple[Path, VersionedPath]:
    """PATH[@VERSION] as (store, path in it): a host path inside a mount, or a store path.

    These commands only read, and LMDB serves readers in other processes beside the
    daemon, so a mounted store is read directly (after the daemon has stored what open
    handles wrote).
    """
    path, version = split_version(text)
    t = resolve_target(path, store_path(ctx))
    settle(t)
    return t.store, VersionedPath(text, t.parts, version)


def _when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@click.command("log")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per version, per line (no header).")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path), default=None,
              help="Name trusted signers as this policy does (default: $ANNOFS_POLICY if "
                   "set; else every name is only what the statement claims).")
@click.argument("path")
@click.pass_context
def log_cmd(ctx: click.Context, path: str, as_json: bool, policy_file: Path | None) -> None:
    """The file's versions along the edit graph, newest first, with who signed each."""
    import os

    from annofs.cli.trust_cmds import POLICY_ENV
    from annofs.trust.annotations import AnnotationStore
    from annofs.trust.policy import load_policy, statement_signer

    if policy_file is None and os.environ.get(POLICY_ENV):
        policy_file = Path(os.environ[POLICY_ENV])
    policy = load_policy(policy_file) if policy_file is not None else None
    store, vp = _target(ctx, path)
    with open_volume(ctx, store=store) as vol:
        head = _file_version(vol, vp)
        ann = AnnotationStore(vol.store)
        with vol.store.read() as txn:
            chain = ancestry(txn, vol.versions, head.id)
        if not as_json:
            click.echo(f"{'VERSION':>8}  {'TIME (UTC)':<19}  {'SIZE':>12}  "
                       f"{'DIGEST':<71}  EDIT, SIGNATURES")
        for v in chain:
            # A sparse file too large to hash keeps no digest: shown as such, unsignable.
            with contextlib.suppress(TooLargeToHashError):
                v = vol.versions.ensure_digest(v)
            sigs: list[tuple[str, str, str, str | None]] = []
            if v.digest is not None:
                with vol.store.read() as txn:
                    # Without a policy no key is trusted: a name is only what the statement
                    # claims, so the key is shown with it (an SSH key by its fingerprint).
                    sigs = [(ss.statement.signer if policy is None
                             else statement_signer(policy, ss),
                             ss.key_id if ss.statement.ssh_key is not None
                             else base64.b64encode(ss.statement.public_key).decode(),
                             ss.statement.claim, ss.statement.label)
                            for ss in ann.for_digest(txn, v.digest)]
            if as_json:
                click.echo(json.dumps(log_json(v, sigs)))
                continue
            digest = (f"blake3:{v.digest.hex()}" if v.digest is not None
                      else "(sparse: too large to hash, unsignable)")
            edit = ""
            if v.edit is not None:
                edit = (f"  edit: fragments {v.edit.start}..{v.edit.start + v.edit.removed} "
                        f"-> {v.edit.added} new")
            signed = ""
            if sigs:
                signed = "  signed: " + ", ".join(
                    f"{who} [key {key[:15] if key.startswith('SHA256:') else key[:8]}...] "
                    f"({f'label {label}' if label is not None else claim})"
                    for who, key, claim, label in sigs)
            click.echo(f"{v.id:>8}  {_when(v.created_ns)}  {v.size:>12}  "
                       f"{digest}{edit}{signed}")


def log_json(v: Version, sigs: list[tuple[str, str, str, str | None]]
             ) -> dict[str, object]:
    """`log --json`, one per version: {"version", "parent", "time_ns", "size", "digest",
    "edit": {"start", "removed", "added"} or null, "statements": [{"signer", "public_key",
    "claim", "label"}]} (signer: the name the statement claims, or with a policy its
    name for a trusted key; public_key: a Nix key's base64, an SSH key's SHA256:
    fingerprint; digest: null for a sparse file too large to hash)."""
    return {"version": v.id, "parent": v.parent, "time_ns": v.created_ns, "size": v.size,
            "digest": None if v.digest is None else f"blake3:{v.digest.hex()}",
            "edit": None if v.edit is None else {"start": v.edit.start,
                                                 "removed": v.edit.removed,
                                                 "added": v.edit.added},
            "statements": [{"signer": who, "public_key": key, "claim": claim, "label": label}
                           for who, key, claim, label in sigs]}


@click.command("cat")
@click.argument("path")
@click.pass_context
def cat_cmd(ctx: click.Context, path: str) -> None:
    """Write a file's bytes (PATH@VERSION: an old version's) to standard output."""
    store, vp = _target(ctx, path)
    out = sys.stdout.buffer
    with open_volume(ctx, store=store) as vol:
        v = _file_version(vol, vp)
        with vol.store.read() as txn:
            for frag in vol.versions.iter_bytes(txn, v):
                out.write(frag)
    out.flush()


DIFF_LIMIT = 1 << 30


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.pass_context
def diff_cmd(ctx: click.Context, a: str, b: str) -> None:
    """The difference between two versions, each PATH[@VERSION]."""
    (store_a, va), (store_b, vb) = _target(ctx, a), _target(ctx, b)
    if store_a != store_b:
        raise UsageError(f"{a} and {b}: not in the same store")
    with open_volume(ctx, store=store_a) as vol:
        ver_a, ver_b = _file_version(vol, va), _file_version(vol, vb)
        for arg, ver in ((a, ver_a), (b, ver_b)):
            if ver.size > DIFF_LIMIT:
                # Read whole to be compared: a sparse petabyte would never fit.
                raise UsageError(f"{arg}: {ver.size} bytes, too large to diff "
                                 f"(at most {DIFF_LIMIT} bytes)")
        with vol.store.read() as txn:
            data_a = vol.versions.read(txn, ver_a, 0, ver_a.size)
            data_b = vol.versions.read(txn, ver_b, 0, ver_b.size)
    from annofs.explain.diff import render_diff  # difflib: only `diff` needs it

    name_a = "/" + b"/".join(va.parts).decode(errors="replace") + f"@{ver_a.id}"
    name_b = "/" + b"/".join(vb.parts).decode(errors="replace") + f"@{ver_b.id}"
    click.echo(render_diff(data_a, data_b, name_a, name_b), nl=False)
