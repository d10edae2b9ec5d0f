"""`annofs bundle ...`: trust bundles published as TUF repositories (trust/bundle_*.py).

The publisher's commands work on a repository directory (`--repo DIR`, default the
current directory); `update` and `status` are the client's, on the store.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import click

from annofs.cli.context import store_path
from annofs.daemon.registry import read_state
from annofs.errors import UsageError

REPO_HELP = "The bundle repository directory (default: $ANNOFS_BUNDLE_REPO, else .)."


def _repo(path: Path | None):  # type: ignore[no-untyped-def]
    from annofs.trust.bundle_repo import Repository

    repo = Repository(path or Path(os.environ.get("ANNOFS_BUNDLE_REPO", ".")))
    repo.check()
    return repo


def _public(text: str, name: str | None = None):  # type: ignore[no-untyped-def]
    """A public key from a file (NAME.public or .secret), or NAME:BASE64 text."""
    from annofs.trust.keys import PublicKey, load_public_key, load_secret_key, parse_public_key

    path = Path(text)
    if path.is_file():
        key = (load_secret_key(path).public_key() if path.suffix == ".secret"
               else load_public_key(path))
    elif ":" in text:
        key = parse_public_key(text, "key")
    else:
        raise UsageError(f"{text}: no such key file (give a .public file or NAME:BASE64)")
    return PublicKey(name, key.key) if name is not None else key


repo_option = click.option("--repo", "repo_dir", type=click.Path(path_type=Path),
                           default=None, help=REPO_HELP)


@click.group("bundle")
def bundle_group() -> None:
    """Trust bundles: keys, revocations and labels as a signed, versioned TUF repository."""


@bundle_group.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--root-key", "root_keys", multiple=True, required=True,
              help="A root key holder's public key file (repeat; held offline).")
@click.option("--threshold", type=int, required=True,
              help="How many root keys must sign a root.")
@click.option("--targets-key", "targets_keys", multiple=True,
              help="Keys that sign the trust content (default: the root keys).")
@click.option("--targets-threshold", type=int, default=None)
@click.option("--expires", "expires", multiple=True,
              help="ROLE=PERIOD, e.g. timestamp=1d, snapshot=7d, targets=90d, root=365d.")
def bundle_init_cmd(directory: Path, root_keys: tuple[str, ...], threshold: int,
                    targets_keys: tuple[str, ...], targets_threshold: int | None,
                    expires: tuple[str, ...]) -> None:
    """Make a new bundle repository in DIRECTORY (root v1 staged, to be signed)."""
    from annofs.trust.bundle_repo import init_repository, parse_expires

    init_repository(directory, [_public(k) for k in root_keys], threshold,
                    [_public(k) for k in targets_keys] or None, targets_threshold,
                    parse_expires(expires))
    click.echo(f"{directory}: trust bundle repository; root v1 staged: each of {threshold} "
               f"root key holders runs 'annofs bundle sign root --key FILE', the targets "
               f"key holders 'annofs bundle sign targets --key FILE', then 'annofs bundle "
               f"publish'")


@bundle_group.command("add-key")
@click.argument("name")
@click.argument("pubkey")
@repo_option
def bundle_add_key_cmd(name: str, pubkey: str, repo_dir: Path | None) -> None:
    """Trust PUBKEY (a .public file or BASE64) under NAME, in the next version."""
    from annofs.trust.keys import check_key_name

    repo = _repo(repo_dir)
    check_key_name(name, "add-key")
    text = pubkey if Path(pubkey).is_file() or ":" in pubkey else f"{name}:{pubkey}"
    key = _public(text, name)
    content = repo.content()
    if any(k.name == name and k.key != key.key for k in content.keys):
        raise UsageError(f"{name}: the bundle already has another key by this name")
    content.keys = [k for k in content.keys if k.key != key.key or k.name != name] + [key]
    repo.set_content(content)
    click.echo(f"staged: key {name}; sign targets and publish")


def _find_key(content, text: str):  # type: ignore[no-untyped-def]
    for k in content.keys:
        if k.name == text:
            return k
    return _public(text)


@bundle_group.command("revoke")
@click.argument("key")
@click.option("--reason", required=True, help="Why (shown with every refusal it causes).")
@click.option("--since", default=None,
              help="UTC time (2026-12-01T00:00:00Z) from which the key's statements are "
                   "refused; default: all of them.")
@repo_option
def bundle_revoke_cmd(key: str, reason: str, since: str | None, repo_dir: Path | None) -> None:
    """Revoke KEY (a name in the bundle, a key file or NAME:BASE64)."""
    from annofs.trust.bundle_content import Revocation, parse_time

    repo = _repo(repo_dir)
    content = repo.content()
    pk = _find_key(content, key)
    when = parse_time(since, "--since") if since is not None else None
    content.revocations = [r for r in content.revocations if r.key.key != pk.key]
    content.revocations.append(Revocation(pk, reason, when))
    repo.set_content(content)
    click.echo(f"staged: revocation of {pk.name}; sign targets and publish")


@bundle_group.command("label")
@click.argument("digest")
@click.argument("label")
@repo_option
def bundle_label_cmd(digest: str, label: str, repo_dir: Path | None) -> None:
    """Label content (blake3:<hex>, as `annofs log` and `verify --json` show it)."""
    from annofs.trust.statement import check_word, parse_digest

    repo = _repo(repo_dir)
    check_word(label, "label")
    raw = parse_digest(digest, "label")
    content = repo.content()
    if (raw, label) not in content.labels:
        content.labels.append((raw, label))
    repo.set_content(content)
    click.echo(f"staged: label {label} on blake3:{raw.hex()}; sign targets and publish")


@bundle_group.command("rules")
@click.argument("file", type=click.Path(path_type=Path))
@repo_option
def bundle_rules_cmd(file: Path, repo_dir: Path | None) -> None:
    """Share the [[rules]] of a TOML FILE (they follow each policy's own rules)."""
    import tomllib

    repo = _repo(repo_dir)
    try:
        doc = tomllib.loads(file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{file}: {e}") from None
    rules = doc.get("rules", [])
    if set(doc) - {"rules"} or not isinstance(rules, list):
        raise UsageError(f"{file}: only [[rules]] tables may be shared")
    content = repo.content()
    content.rules = rules
    repo.set_content(content)
    click.echo(f"staged: {len(rules)} shared rules; sign targets and publish")


@bundle_group.command("sign")
@click.argument("role", type=click.Choice(["root", "targets"]))
@click.option("--key", "key_file", required=True, type=click.Path(path_type=Path))
@repo_option
def bundle_sign_cmd(role: str, key_file: Path, repo_dir: Path | None) -> None:
    """Add your signature to the staged version of ROLE."""
    from annofs.trust.keys import load_secret_key

    click.echo(_repo(repo_dir).sign(role, load_secret_key(key_file)))


@bundle_group.command("rotate-root")
@click.option("--root-key", "root_keys", multiple=True, required=True)
@click.option("--threshold", type=int, required=True)
@repo_option
def bundle_rotate_root_cmd(root_keys: tuple[str, ...], threshold: int,
                           repo_dir: Path | None) -> None:
    """Stage a new root with these keys (signed by the old threshold and the new)."""
    click.echo(_repo(repo_dir).rotate_root([_public(k) for k in root_keys], threshold))


@bundle_group.command("publish")
@click.option("--expires", "expires", multiple=True,
              help="ROLE=PERIOD for this publication (snapshot, timestamp).")
@repo_option
def bundle_publish_cmd(expires: tuple[str, ...], repo_dir: Path | None) -> None:
    """Publish the staged versions and new snapshot and timestamp (run it again before
    the timestamp expires)."""
    from annofs.trust.bundle_repo import parse_expires

    repo = _repo(repo_dir)
    for line in repo.publish(parse_expires(expires)):
        click.echo(f"published: {line}")
    first = repo.metadata / "1.root.json"
    click.echo(f"trust-bundle-root = \"sha256:{hashlib.sha256(first.read_bytes()).hexdigest()}\"")


def _client_args(policy_file: Path | None, source: str | None,
                 root: str | None) -> tuple[str, str]:
    from annofs.cli.trust_cmds import POLICY_ENV
    from annofs.trust.bundle_client import parse_pin, policy_bundle

    if source is not None:
        if root is None:
            raise UsageError("--root sha256:<hex> is needed with a SOURCE")
        return source, parse_pin(root, "--root")
    if policy_file is None and os.environ.get(POLICY_ENV):
        policy_file = Path(os.environ[POLICY_ENV])
    if policy_file is None:
        raise UsageError(f"give --policy FILE (or ${POLICY_ENV}), or SOURCE --root sha256:...")
    return policy_bundle(policy_file)


@bundle_group.command("update")
@click.argument("source", required=False)
@click.option("--root", default=None, help="sha256:<hex> of SOURCE's first root.json.")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path), default=None,
              help="Update the bundle this policy names.")
@click.pass_context
def bundle_update_cmd(ctx: click.Context, source: str | None, root: str | None,
                      policy_file: Path | None) -> None:
    """Fetch and verify the bundle (TUF), store it; exit 1 if refused (old state kept)."""
    from annofs.trust.bundle_client import update

    src, pin = _client_args(policy_file, source, root)
    store = store_path(ctx)
    if not (store / "db").exists():
        raise UsageError(f"{store}: no annofs store here (run annofs init)")
    for line in update(store, src, pin):
        click.echo(line)
    mounted = read_state(store)
    if mounted is not None:
        mp = mounted["mountpoint"]
        click.echo(f"note: the mount at {mp} takes it at its next refresh, or now with "
                   f"'annofs policy reload {mp}'", err=True)


@bundle_group.command("status")
@click.argument("source", required=False)
@click.option("--root", default=None)
@click.option("--policy", "policy_file", type=click.Path(path_type=Path), default=None)
@click.pass_context
def bundle_status_cmd(ctx: click.Context, source: str | None, root: str | None,
                      policy_file: Path | None) -> None:
    """The stored bundle: versions, expiry, root keys and threshold, revocations."""
    from annofs.trust.bundle_client import load_state

    src, pin = _client_args(policy_file, source, root)
    state = load_state(store_path(ctx), pin)
    if state is None:
        raise UsageError(f"{src}: never fetched (annofs bundle update)")
    for line in state.summary():
        click.echo(line)
    stale = state.stale()
    if stale:
        click.echo(f"stale: {stale}")
