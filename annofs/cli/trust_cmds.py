"""`annofs key`, `sign`, `label`, `attest`, `verify`, `policy check`: the trust commands.

PATH arguments are host paths inside a live mount, or paths in the --store's namespace
(`/src/foo`); see `annofs.cli.stores` for how a mounted store is reached. Every input
is read and checked (keys, policy, envelopes, paths) before the store is written, so a
bad one is a one-line error, exit 2, and an unchanged store. As for every writing
command, a mounted store is not written through --store paths (`sign` and `label`
refuse them: give the paths in the mount).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from annofs.cli.context import store_path
from annofs.cli.stores import (
    StoreArgs,
    group_targets,
    mount_policy,
    mounted_store,
    one_store,
    reading,
    writing,
)
from annofs.errors import UsageError
from annofs.printable import one_line

if TYPE_CHECKING:
    from annofs.trust.policy import Policy
    from annofs.trust.verdict import Verdict

# The trust modules (nacl, tomllib, msgpack) load inside each command: every other
# command's start-up stays as quick as it was.

POLICY_ENV = "ANNOFS_POLICY"


def given_policy(policy_file: Path | None, target: StoreArgs | None = None) -> Policy:
    """The policy of --policy FILE, else (paths given through a mount) the mount's, else
    of $ANNOFS_POLICY; UsageError if none."""
    from annofs.trust.policy import load_policy

    if policy_file is None and target is not None:
        policy_file = mount_policy(target)
    if policy_file is None:
        env = os.environ.get(POLICY_ENV)
        if not env:
            has_none = (f" (the mount at {target.mount.mountpoint} has none)"
                        if target is not None and target.mount is not None else "")
            raise UsageError(f"no policy: give --policy FILE or set ${POLICY_ENV}{has_none}")
        policy_file = Path(env)
    # The store holds the trust bundle's verified state, if the policy names a bundle.
    store = target.store if target is not None else store_path(click.get_current_context())
    return load_policy(policy_file, store)


# -- keys ---------------------------------------------------------------------------------


@click.group("key")
def key_group() -> None:
    """Signing keys, in Nix's format."""


@key_group.command("generate")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=Path("."),
              show_default=True, help="Where to write NAME.secret and NAME.public.")
def key_generate_cmd(name: str, directory: Path) -> None:
    """Write NAME.secret (mode 0600) and NAME.public; never overwrites."""
    from annofs.trust.keys import generate_key, write_key_pair

    key = generate_key(name)
    secret, public = write_key_pair(key, directory)
    click.echo(f"wrote {secret} and {public}")
    click.echo(key.public_key().to_text())


# -- sign and label -------------------------------------------------------------------------


def _sign(ctx: click.Context, key_file: Path | None, ssh_key: Path | None,
          paths: tuple[str, ...], claim: str, label: str | None) -> None:
    from annofs.trust.keys import SecretKey, load_secret_key
    from annofs.trust.signing import SshSigningKey, collect_files, sign_files

    if not paths:
        raise UsageError("no PATH given")
    key: SecretKey | SshSigningKey
    if key_file is not None and ssh_key is None:
        key = load_secret_key(key_file)
    elif ssh_key is not None and key_file is None:
        key = SshSigningKey.load(ssh_key)  # finds the public key; signs after collecting
    else:
        raise UsageError("give exactly one of --key SECRET (a Nix key) and --ssh-key PATH")
    target = one_store(ctx, paths)
    with writing(ctx, target, "label" if label is not None else "sign") as vol:
        files = collect_files(vol, target.parts, unique_names=True)
        ss, added = sign_files(vol, files, key, claim, label=label)
    what = f"labelled {label}" if label is not None else f"signed ({claim})"
    links = sum(f.is_symlink for f in files)
    n = len(files) - links
    kinds = f"{n} file{'s' if n != 1 else ''}" + (
        f" and {links} symlink{'s' if links != 1 else ''}" if links else "")
    by = key.shown if isinstance(key, SshSigningKey) else key.name
    click.echo(f"{what}: {kinds} by {by}, statement "
               f"{ss.id.hex()[:16]}" + ("" if added else " (already stored)"))


@click.command("sign")
@click.option("--key", "key_file", type=click.Path(path_type=Path),
              metavar="SECRET", help="The secret key file (Nix format).")
@click.option("--ssh-key", "ssh_key", type=click.Path(path_type=Path), metavar="PATH",
              help="Sign with an SSH key (ed25519 or ed25519-sk): a private key file, or "
                   "a .pub file whose private half is in ssh-agent.")
@click.option("--claim", default="reviewed", show_default=True,
              help="reviewed, built, authored, reproduced, or a word of your own.")
@click.argument("paths", nargs=-1)
@click.pass_context
def sign_cmd(ctx: click.Context, key_file: Path | None, ssh_key: Path | None, claim: str,
             paths: tuple[str, ...]) -> None:
    """Sign the current content of files, or of every file under a tree, as one statement.

    Subject names are paths relative to each argument's parent: /src/proj gives
    proj/README, proj/src/main.c, ...; a file /src/proj/README gives README.
    """
    from annofs.trust.statement import check_claim

    check_claim(claim)
    _sign(ctx, key_file, ssh_key, paths, claim, None)


@click.command("label")
@click.option("--key", "key_file", type=click.Path(path_type=Path),
              metavar="SECRET", help="The secret key file (Nix format).")
@click.option("--ssh-key", "ssh_key", type=click.Path(path_type=Path), metavar="PATH",
              help="Sign with an SSH key (ed25519 or ed25519-sk): a private key file, or "
                   "a .pub file whose private half is in ssh-agent.")
@click.option("--label", "label", required=True,
              help="A word, e.g. malicious (which makes a policy refuse the files).")
@click.argument("paths", nargs=-1)
@click.pass_context
def label_cmd(ctx: click.Context, key_file: Path | None, ssh_key: Path | None, label: str,
              paths: tuple[str, ...]) -> None:
    """Sign an annotation other than approval (e.g. malicious) over files or trees."""
    from annofs.trust.statement import check_word

    check_word(label, "label")
    _sign(ctx, key_file, ssh_key, paths, "label", label)


# -- attestations ---------------------------------------------------------------------------


@click.group("attest")
def attest_group() -> None:
    """Statements as in-toto/DSSE JSON lines, to share (e.g. in a git repository)."""


@attest_group.command("export")
@click.argument("paths", nargs=-1)
@click.pass_context
def attest_export_cmd(ctx: click.Context, paths: tuple[str, ...]) -> None:
    """Write the envelopes covering the files' current content to stdout, one per line."""
    from annofs.trust.annotations import AnnotationStore, export_lines
    from annofs.trust.signing import collect_files
    from annofs.trust.statement import SignedStatement

    if not paths:
        raise UsageError("no PATH given")
    found: dict[bytes, SignedStatement] = {}
    for target in group_targets(ctx, paths):
        with reading(ctx, target) as vol:
            files = collect_files(vol, target.parts)
            ann = AnnotationStore(vol.store)
            with vol.store.read() as txn:
                for f in files:
                    for ss in ann.for_digest(txn, f.digest):
                        found.setdefault(ss.id, ss)
    # A binary cache's signature covers a NAR's fingerprint, not these files: it is only
    # worth something next to the NAR (annofs nix fetch), so attest import refuses it.
    cache_sigs = [ss for ss in found.values() if ss.statement.fingerprint is not None]
    if cache_sigs:
        click.echo(f"annofs: {len(cache_sigs)} binary-cache signature(s) not exported: they "
                   f"sign a NAR, not files (fetch the path again to carry them)", err=True)
    # Likewise a signed git tag or commit signs the commit, not these files.
    git_sigs = [ss for ss in found.values() if ss.statement.git is not None]
    if git_sigs:
        click.echo(f"annofs: {len(git_sigs)} git signature(s) not exported: they sign a "
                   f"commit, not files (import the repository again to carry them)",
                   err=True)
    statements = sorted((ss for ss in found.values() if ss.statement.fingerprint is None
                         and ss.statement.git is None),
                        key=lambda ss: (ss.statement.time, ss.id))
    out = sys.stdout
    for line in export_lines(statements):
        out.write(line + "\n")
    out.flush()


@attest_group.command("import")
@click.argument("file")
@click.pass_context
def attest_import_cmd(ctx: click.Context, file: str) -> None:
    """Add the envelopes of a JSON-lines FILE ('-': stdin); every signature is checked first."""
    from annofs.trust.annotations import AnnotationStore
    from annofs.trust.statement import load_signed
    from annofs.userfile import read_user_file

    if file == "-":
        data, name = sys.stdin.buffer.read(), "<stdin>"
    else:
        data = read_user_file(Path(file), "statements file")
        name = file
    statements = []
    for no, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue  # blank lines (and the final newline) separate nothing
        statements.append(load_signed(line, f"{name}:{no}"))
    if not statements:
        raise UsageError(f"{name}: no statements in the file")
    with writing(ctx, mounted_store(ctx), "attest import") as vol:
        ann = AnnotationStore(vol.store)
        with vol.store.write() as txn:
            added = sum(ann.add(txn, ss) for ss in statements)
    click.echo(f"imported {added} statement{'s' if added != 1 else ''} from {name}"
               + (f" ({len(statements) - added} already stored)"
                  if added != len(statements) else ""))


# -- verify and policy ------------------------------------------------------------------------


@click.command("verify")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path), default=None,
              help=f"The policy file (default: the mount's for paths in a mount, else "
                   f"${POLICY_ENV}).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per file, per line (no summary line).")
@click.argument("paths", nargs=-1)
@click.pass_context
def verify_cmd(ctx: click.Context, policy_file: Path | None, as_json: bool,
               paths: tuple[str, ...]) -> None:
    """The verdict for each file and symlink (or each under a tree); exit 1 if any is
    refused.

    Ends with a summary line: how many were judged, allowed, refused, warned.
    """
    import json
    from collections import Counter

    from annofs.trust.gate import TrustGate
    from annofs.trust.signing import collect_files, fifos_under, path_text
    from annofs.trust.symlink import content_verdict, digest_text

    if not paths:
        raise UsageError("no PATH given")
    counts: Counter[str] = Counter()
    for target in group_targets(ctx, paths):
        policy = given_policy(policy_file, target)
        with reading(ctx, target) as vol:
            gate = TrustGate(vol, policy)
            for f in collect_files(vol, target.parts):
                v = content_verdict(gate, f.path, f.version)
                counts[v.status] += 1
                if as_json:
                    click.echo(json.dumps(verify_json(f.text, digest_text(f.version), v,
                                                      f.target)))
                    continue
                # A symlink is judged as content (its target), never followed.
                what = f.text if f.target is None else \
                    f"{f.text} -> {f.target.decode('utf-8', 'backslashreplace')!r}"
                click.echo(one_line(f"{what}: {v.status}: {v.reason}  "
                                    f"[{digest_text(f.version)}]"))
            # A FIFO's bytes are never judged: where a rule needs signers it is refused
            # (the mount does not let it be found).
            for fifo in fifos_under(vol, target.parts):
                why = gate.fifo_refusal(fifo)
                if why is None:
                    continue
                counts["refused"] += 1
                if as_json:
                    click.echo(json.dumps({"path": path_text(fifo), "status": "refused",
                                           "allowed": False, "reason": why}))
                else:
                    click.echo(one_line(f"{why}: refused"))
    if not as_json:
        n = sum(counts.values())
        parts = [f"{counts[s]} {s}" for s in ("allowed", "refused", "warn", "off") if counts[s]]
        click.echo(f"verified {n} file{'s' if n != 1 else ''}: {', '.join(parts) or 'none'}")
    if counts["refused"]:
        sys.exit(1)


def verify_json(path: str, digest: str, v: Verdict,
                target: bytes | None = None) -> dict[str, object]:
    """`verify --json`, one per file or symlink: {"path", "status", "allowed", "rule",
    "needed", "signers", "claims", "labels", "reason", "digest"}, and "target" for a
    symlink (its digest is then `annofs-symlink-v1:<hex>`)."""
    out: dict[str, object] = {
        "path": path, "status": v.status, "allowed": v.allowed, "rule": v.rule,
        "needed": v.needed, "signers": list(v.signers), "claims": list(v.claims),
        "labels": list(v.labels), "reason": v.reason, "digest": digest}
    if target is not None:
        out["target"] = target.decode("utf-8", "surrogateescape")
    return out


@click.group("policy")
def policy_group() -> None:
    """Trust policies."""


@policy_group.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def policy_check_cmd(file: Path) -> None:
    """Validate a policy file and summarise it; exit 2 with the first problem."""
    from annofs.trust.policy import load_policy

    policy = load_policy(file, store_path(click.get_current_context()))
    click.echo(policy.summary())
    for warning in policy.warnings():
        click.echo(f"annofs: warning: {warning}", err=True)


@policy_group.command("reload")
@click.argument("mountpoint", type=click.Path(path_type=Path))
def policy_reload_cmd(mountpoint: Path) -> None:
    """Make a mount re-read its policy file (as SIGHUP does)."""
    from annofs.daemon.client import request
    from annofs.daemon.registry import lookup

    info = lookup(Path(os.path.abspath(mountpoint)))
    if info is None:
        raise UsageError(f"{mountpoint}: not an annofs mount")
    click.echo(request(info.store, "policy-reload")["message"])
