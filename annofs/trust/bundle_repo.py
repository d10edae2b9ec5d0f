"""The publisher's side of a trust bundle: a TUF repository in a directory.

```
DIR/metadata/   what clients fetch: N.root.json, root.json, N.targets.json,
                N.snapshot.json, timestamp.json (consistent snapshots)
DIR/targets/    <sha256>.annofs-trust.json, the published trust (bundle_content)
DIR/staged/     the next version being prepared: annofs-trust.json, and root.json /
                targets.json collecting signatures from their key holders
DIR/online/     the snapshot and timestamp keys (0600 in a 0700 directory): never serve it
DIR/bundle.json expiry periods
```

Root and targets are signed offline, each by a threshold of annofs/Nix ed25519 keys:
every holder runs `annofs bundle sign ROLE --key FILE` on the staged version (the
directory can travel between them), and `publish` refuses a role short of its
threshold. A new root must meet the old root's threshold and its own (TUF's rotation).
Snapshot and timestamp are signed by `publish` with the online keys: publishing again
with nothing staged only renews them, which is what keeps clients fresh.

All metadata is made and checked with python-tuf's Metadata API.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from annofs.errors import UsageError
from annofs.trust.bundle_content import TARGET_NAME, BundleContent, parse_content
from annofs.trust.keys import PublicKey, SecretKey, generate_key, load_secret_key
from annofs.trust.tufkeys import NixKeySigner, public_of, tuf_key

ROLES = ("root", "targets", "snapshot", "timestamp")
OFFLINE_ROLES = ("root", "targets")
DEFAULT_PERIODS = {"root": 365 * 86400, "targets": 90 * 86400, "snapshot": 7 * 86400,
                   "timestamp": 86400}
_PERIOD = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_period(text: str) -> int:
    """`30s`, `10m`, `12h`, `7d` as seconds (`0s`: expires at once, for tests)."""
    m = _PERIOD.fullmatch(text.strip())
    if not m:
        raise UsageError(f"{text!r}: an expiry period is a number and s, m, h or d (e.g. 7d)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_expires(items: tuple[str, ...] | list[str]) -> dict[str, int]:
    """`ROLE=PERIOD` options as {role: seconds}."""
    out: dict[str, int] = {}
    for item in items:
        role, sep, period = item.partition("=")
        if not sep or role not in ROLES:
            raise UsageError(f"--expires {item!r}: expected ROLE=PERIOD with ROLE one of "
                             f"{', '.join(ROLES)}")
        out[role] = parse_period(period)
    return out


def _expiry(seconds: int) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file atomically (a temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass
class Repository:
    """A bundle repository directory."""

    dir: Path

    @property
    def metadata(self) -> Path:
        return self.dir / "metadata"

    @property
    def staged(self) -> Path:
        return self.dir / "staged"

    # -- reading ---------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse a directory that is not a bundle repository."""
        if not (self.dir / "bundle.json").is_file():
            raise UsageError(f"{self.dir}: not a trust bundle repository (no bundle.json; "
                             f"annofs bundle init)")

    def periods(self) -> dict[str, int]:
        """Expiry periods per role."""
        doc = json.loads((self.dir / "bundle.json").read_text())
        return {**DEFAULT_PERIODS, **doc.get("expires", {})}

    def _latest(self, role: str) -> Metadata | None:
        if role == "timestamp":
            path = self.metadata / "timestamp.json"
            return Metadata.from_file(str(path)) if path.exists() else None
        versions = [int(p.name.split(".")[0]) for p in self.metadata.glob(f"*.{role}.json")
                    if p.name.split(".")[0].isdigit()]
        if not versions:
            return None
        return Metadata.from_file(str(self.metadata / f"{max(versions)}.{role}.json"))

    def published(self, role: str) -> Metadata | None:
        """The newest published metadata of a role, or None."""
        return self._latest(role)

    def _staged_md(self, role: str) -> Metadata | None:
        path = self.staged / f"{role}.json"
        return Metadata.from_file(str(path)) if path.exists() else None

    def content(self) -> BundleContent:
        """The trust being prepared: the staged file, else the published one, else empty."""
        staged = self.staged / TARGET_NAME
        if staged.exists():
            return parse_content(staged.read_bytes(), str(staged))
        targets = self.published("targets")
        if targets is not None and TARGET_NAME in targets.signed.targets:
            info = targets.signed.targets[TARGET_NAME]
            path = self.dir / "targets" / f"{info.hashes['sha256']}.{TARGET_NAME}"
            return parse_content(path.read_bytes(), str(path))
        return BundleContent()

    def root(self) -> Metadata:
        """The root new metadata is signed under: the staged one, else the published."""
        root = self._staged_md("root") or self.published("root")
        if root is None:
            raise UsageError(f"{self.dir}: no root metadata")
        return root

    # -- writing ---------------------------------------------------------------------------

    def set_content(self, content: BundleContent) -> None:
        """Stage new trust content (signatures on a staged targets role no longer apply)."""
        self.staged.mkdir(exist_ok=True)
        _write(self.staged / TARGET_NAME, content.to_bytes())

    def _staged_targets(self) -> Metadata:
        """The staged targets metadata for the staged content, made anew if the content
        changed since it was staged (its collected signatures were over other bytes)."""
        data = self.content().to_bytes()
        md = self._staged_md("targets")
        fresh = TargetFile.from_data(TARGET_NAME, data, ["sha256"])
        if md is not None and md.signed.targets.get(TARGET_NAME) == fresh:
            return md
        prev = self.published("targets")
        version = prev.signed.version + 1 if prev is not None else 1
        md = Metadata(Targets(version=version,
                              expires=_expiry(self.periods()["targets"]),
                              targets={TARGET_NAME: fresh}))
        return md

    def sign(self, role: str, secret: SecretKey) -> str:
        """Add one key holder's signature to the staged version of `role`."""
        if role not in OFFLINE_ROLES:
            raise UsageError(f"{role}: only root and targets are signed by key holders "
                             f"(snapshot and timestamp are signed by publish)")
        signer = NixKeySigner(secret)
        keyid = signer.public_key.keyid
        if role == "root":
            md = self._staged_md("root")
            if md is None:
                raise UsageError(f"{self.dir}: no staged root to sign (bundle init or "
                                 f"bundle rotate-root first)")
            allowed = set(md.signed.roles["root"].keyids)
            prev = self.published("root")
            if prev is not None:
                allowed |= set(prev.signed.roles["root"].keyids)
        else:
            md = self._staged_targets()
            allowed = set(self.root().signed.roles["targets"].keyids)
        if keyid not in allowed:
            raise UsageError(f"{secret.name}: this key is not one of the {role} role's keys")
        md.sign(signer, append=True)
        self.staged.mkdir(exist_ok=True)
        _write(self.staged / f"{role}.json", md.to_bytes())
        return f"{role} v{md.signed.version}: signed by {secret.name}; {self._tally(role, md)}"

    def _tally(self, role: str, md: Metadata) -> str:
        root = md if role == "root" else self.root()
        result = root.signed.get_verification_result(role, md.signed_bytes, md.signatures)
        line = f"{len(result.signed)} of {result.threshold} signatures"
        if role == "root" and self.published("root") is not None:
            old = self.published("root")
            assert old is not None
            r2 = old.signed.get_verification_result("root", md.signed_bytes, md.signatures)
            line += f" (old root: {len(r2.signed)} of {r2.threshold})"
        return line

    def rotate_root(self, keys: list[PublicKey], threshold: int) -> str:
        """Stage a new root version with these root keys and threshold."""
        prev = self.published("root")
        if prev is None:
            raise UsageError(f"{self.dir}: publish the first root before rotating it")
        _check_threshold(keys, threshold)
        root: Root = Metadata.from_bytes(prev.to_bytes()).signed
        for keyid in list(root.roles["root"].keyids):
            root.revoke_key(keyid, "root")
        for pk in keys:
            root.add_key(tuf_key(pk.key), "root")
        root.roles["root"].threshold = threshold
        root.version = prev.signed.version + 1
        root.expires = _expiry(self.periods()["root"])
        self.staged.mkdir(exist_ok=True)
        _write(self.staged / "root.json", Metadata(root).to_bytes())
        return (f"root v{root.version} staged: {threshold} of {len(keys)} keys; it needs "
                f"{prev.signed.roles['root'].threshold} signatures of the old root's keys "
                f"and {threshold} of the new (bundle sign root --key FILE)")

    def publish(self, expires: dict[str, int] | None = None) -> list[str]:
        """Publish what is staged (root, targets) and new snapshot and timestamp versions.

        Checks every threshold first: nothing is written unless all of it is valid.
        """
        periods = {**self.periods(), **(expires or {})}
        lines: list[str] = []
        new_root = self._staged_md("root")
        old_root = self.published("root")
        if new_root is not None:
            _verify(new_root.signed, new_root, "root", f"root v{new_root.signed.version}")
            if old_root is not None:
                _verify(old_root.signed, new_root, "root",
                        f"root v{new_root.signed.version} (by the old root's keys)")
        root = new_root or old_root
        if root is None:
            raise UsageError(f"{self.dir}: no root to publish")
        new_targets = None
        if (self.staged / TARGET_NAME).exists() or self._staged_md("targets") is not None \
                or self.published("targets") is None:
            new_targets = self._staged_targets()
            _verify(root.signed, new_targets, "targets",
                    f"targets v{new_targets.signed.version}")
        # Everything verifies: write.
        self.metadata.mkdir(exist_ok=True)
        (self.dir / "targets").mkdir(exist_ok=True)
        if new_root is not None:
            data = new_root.to_bytes()
            _write(self.metadata / f"{new_root.signed.version}.root.json", data)
            _write(self.metadata / "root.json", data)
            lines.append(f"root v{new_root.signed.version}")
        targets = new_targets or self.published("targets")
        assert targets is not None
        if new_targets is not None:
            content = self.content().to_bytes()
            info = new_targets.signed.targets[TARGET_NAME]
            _write(self.dir / "targets" / f"{info.hashes['sha256']}.{TARGET_NAME}", content)
            _write(self.metadata / f"{new_targets.signed.version}.targets.json",
                   new_targets.to_bytes())
            lines.append(f"targets v{new_targets.signed.version}")
        snap_prev = self.published("snapshot")
        snapshot = Metadata(Snapshot(
            version=snap_prev.signed.version + 1 if snap_prev else 1,
            expires=_expiry(periods["snapshot"]),
            meta={"targets.json": MetaFile(version=targets.signed.version)}))
        snapshot.sign(self._online("snapshot"))
        snap_bytes = snapshot.to_bytes()
        _write(self.metadata / f"{snapshot.signed.version}.snapshot.json", snap_bytes)
        ts_prev = self.published("timestamp")
        timestamp = Metadata(Timestamp(
            version=ts_prev.signed.version + 1 if ts_prev else 1,
            expires=_expiry(periods["timestamp"]),
            snapshot_meta=MetaFile.from_data(snapshot.signed.version, snap_bytes,
                                             ["sha256"])))
        timestamp.sign(self._online("timestamp"))
        _write(self.metadata / "timestamp.json", timestamp.to_bytes())
        lines.append(f"snapshot v{snapshot.signed.version}, timestamp "
                     f"v{timestamp.signed.version} (expires "
                     f"{timestamp.signed.expires:%Y-%m-%dT%H:%M:%SZ})")
        for name in ("root.json", "targets.json", TARGET_NAME):
            (self.staged / name).unlink(missing_ok=True)
        return lines

    def _online(self, role: str) -> NixKeySigner:
        return NixKeySigner(load_secret_key(self.dir / "online" / f"{role}.secret"))


def _check_threshold(keys: list[PublicKey], threshold: int) -> None:
    distinct = {k.key for k in keys}
    if len(distinct) != len(keys):
        raise UsageError("a root key is given twice")
    if not 1 <= threshold <= len(distinct):
        raise UsageError(f"--threshold {threshold}: must be between 1 and the number of "
                         f"keys ({len(distinct)})")


def _verify(delegator: Root, md: Metadata, role: str, what: str) -> None:
    """Refuse metadata short of its role's threshold, in one line saying how short."""
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError:
        result = delegator.get_verification_result(role, md.signed_bytes, md.signatures)
        raise UsageError(f"{what}: {len(result.signed)} of {result.threshold} signatures "
                         f"needed (annofs bundle sign {role} --key FILE)") from None


def init_repository(directory: Path, root_keys: list[PublicKey], threshold: int,
                    targets_keys: list[PublicKey] | None = None,
                    targets_threshold: int | None = None,
                    expires: dict[str, int] | None = None) -> Repository:
    """A new repository: staged root v1 and an empty trust file, online keys made.

    The root and targets keys are public keys: their holders sign with
    `Repository.sign` (offline), then `publish`.
    """
    _check_threshold(root_keys, threshold)
    targets_keys = targets_keys or root_keys
    targets_threshold = targets_threshold or (threshold if targets_keys is root_keys else 1)
    _check_threshold(targets_keys, targets_threshold)
    if (directory / "bundle.json").exists():
        raise UsageError(f"{directory}: already a trust bundle repository")
    directory.mkdir(parents=True, exist_ok=True)
    periods = {**DEFAULT_PERIODS, **(expires or {})}
    online = directory / "online"
    online.mkdir(mode=0o700, exist_ok=True)
    os.chmod(online, 0o700)
    root = Root(version=1, expires=_expiry(periods["root"]), consistent_snapshot=True)
    for pk in root_keys:
        root.add_key(tuf_key(pk.key), "root")
    for pk in targets_keys:
        root.add_key(tuf_key(pk.key), "targets")
    root.roles["root"] = Role(root.roles["root"].keyids, threshold)
    root.roles["targets"] = Role(root.roles["targets"].keyids, targets_threshold)
    for role in ("snapshot", "timestamp"):
        key = generate_key(f"bundle-{role}")
        _write(online / f"{role}.secret", key.to_text().encode(), 0o600)
        root.add_key(tuf_key(key.public), role)
    repo = Repository(directory)
    repo.staged.mkdir(exist_ok=True)
    _write(repo.staged / "root.json", Metadata(root).to_bytes())
    _write(directory / "bundle.json",
           (json.dumps({"expires": periods}, indent=1) + "\n").encode())
    repo.set_content(BundleContent())
    return repo


def root_keys_of(root: Root) -> list[bytes]:
    """The ed25519 public keys of a root's root role."""
    out = []
    for keyid in root.roles["root"].keyids:
        raw = public_of(root.keys[keyid])
        if raw is not None:
            out.append(raw)
    return out
