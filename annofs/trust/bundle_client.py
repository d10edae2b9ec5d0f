"""The client's side of a trust bundle: `annofs bundle update`, and the stored state.

The bundle is fetched with python-tuf's `ngclient.Updater`, which does every check TUF's
client workflow asks for: root rotation one version at a time, each new root signed by
the old root's threshold and its own; signature thresholds of every role; version
numbers never going back (rollback); expiry of every role (freeze); snapshot and
timestamp naming the exact versions and hashes of what they cover (mix-and-match);
lengths bounded before and while downloading (endless data).

The first root is pinned by the policy (`trust-bundle-root = "sha256:<hex>"`): the
client fetches `1.root.json` and refuses it unless its sha256 is the pin.

The trusted state lives in the store, `<store>/bundle/<pin prefix>/current` (a symlink
to one state directory). An update works on a copy and swaps the symlink only when
everything verified, so a refused update leaves the old trusted state exactly as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from annofs.errors import UsageError
from annofs.printable import one_line
from annofs.trust.bundle_content import TARGET_NAME, BundleContent, parse_content
from annofs.trust.keys import key_fingerprint
from annofs.trust.tufkeys import public_of

_PIN = re.compile(r"sha256:([0-9a-f]{64})")
# Bounds on what one update may download (TUF's endless-data attack): metadata is small.
CONFIG = UpdaterConfig(max_root_rotations=64, root_max_length=256 * 1024,
                       timestamp_max_length=16 * 1024, snapshot_max_length=256 * 1024,
                       targets_max_length=4 * 1024 * 1024)
TRUST_MAX_LENGTH = 16 * 1024 * 1024  # a trust file's length is in signed targets anyway


class UpdateError(UsageError):
    """An update was refused; the old trusted state is kept. A "no" (exit 1), as a
    refused verification is."""

    exit_status = 1


def policy_bundle(path: Path) -> tuple[str, str]:
    """The (source, pin hex) a policy file names, read without loading the rest (so an
    update can run even while the stored bundle makes the policy fail to load)."""
    import tomllib

    from annofs.userfile import read_user_file

    try:
        doc = tomllib.loads(read_user_file(path, "policy file").decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(one_line(f"{path}: {e}")) from None
    source, pin = doc.get("trust-bundle"), doc.get("trust-bundle-root")
    if not isinstance(source, str) or not source:
        raise UsageError(f"{path}: names no trust bundle (trust-bundle = \"URL or DIR\")")
    if not isinstance(pin, str):
        raise UsageError(f"{path}: trust-bundle-root: missing (sha256:<hex> of the first "
                         f"root.json)")
    if not source.startswith(("http://", "https://", "/")):
        source = os.path.abspath(path.parent / source)
    return source, parse_pin(pin, f"{path}: trust-bundle-root")


def parse_pin(text: str, where: str) -> str:
    """The hex of `sha256:<64 hex>`."""
    m = _PIN.fullmatch(text)
    if not m:
        raise UsageError(f"{where}: {text!r} is not a root pin (sha256:<64 lowercase hex>, "
                         f"as annofs bundle publish prints it)")
    return m.group(1)


def state_root(store: Path, pin: str) -> Path:
    """Where the bundle pinned by `pin` keeps its trusted state in a store."""
    return store / "bundle" / pin[:16]


class DirectoryFetcher(FetcherInterface):
    """ngclient's fetcher for a repository in a local directory (`file://` URLs).

    Files are opened without blocking and must be regular: a FIFO named timestamp.json
    must not hang the update. A missing file is HTTP's 404 to ngclient (the end of the
    root versions)."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = unquote(urlparse(url).path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise tuf_errors.DownloadHTTPError(f"{path}: no such file", 404) from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise tuf_errors.DownloadError(f"{path}: not a regular file")
            while chunk := f.read(65536):
                yield chunk


def _urls(source: str) -> tuple[str, str, FetcherInterface | None]:
    if source.startswith(("http://", "https://")):
        base = source.rstrip("/")
        return f"{base}/metadata/", f"{base}/targets/", None
    path = Path(source.removeprefix("file://")).absolute()
    if not path.is_dir():
        raise UsageError(f"{source}: no such directory (a trust bundle is a directory or "
                         f"an http(s) URL)")
    return f"file://{path}/metadata/", f"file://{path}/targets/", DirectoryFetcher()


def _reason(e: BaseException) -> str:
    """One line for a refused update: what TUF found, with ngclient's own words."""
    kinds = [
        (tuf_errors.ExpiredMetadataError, "expired (a freeze: the repository serves "
                                          "stale metadata)"),
        (tuf_errors.BadVersionNumberError, "version went back (rollback)"),
        (tuf_errors.UnsignedMetadataError, "not signed by enough trusted keys"),
        (tuf_errors.DownloadLengthMismatchError, "larger than allowed"),
        (tuf_errors.LengthOrHashMismatchError, "does not match what the snapshot or "
                                               "timestamp signed"),
    ]
    if isinstance(e, tuf_errors.BadVersionNumberError) and str(e).startswith("Expected"):
        # ngclient's words for a version other than the one snapshot/timestamp signed.
        return one_line(f"not the version the snapshot or timestamp signed "
                        f"(mix-and-match): {e}")
    for kind, what in kinds:
        if isinstance(e, kind):
            return one_line(f"{what}: {e}")
    cause = e.__cause__
    return one_line(f"{e}" + (f" ({cause})" if cause is not None and str(cause) else ""))


@dataclass
class BundleState:
    """The stored, verified state of one bundle."""

    source: str
    content: BundleContent
    versions: dict[str, int]
    expires: dict[str, datetime]
    root_keys: list[bytes]
    root_threshold: int
    updated: float  # when the last update succeeded (epoch seconds)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def expiry(self) -> datetime:
        """The earliest expiry of the four roles: past it, the state is stale."""
        return min(self.expires.values())

    def stale(self, now: datetime | None = None) -> str | None:
        """Why the state is stale (TUF: no role may be expired), or None."""
        now = now or datetime.now(UTC)
        for role in ("timestamp", "snapshot", "targets", "root"):
            if now >= self.expires[role]:
                return (f"its {role} expired at {self.expires[role]:%Y-%m-%dT%H:%M:%SZ} "
                        f"and no update has succeeded since")
        return None

    def summary(self) -> list[str]:
        """Lines for `bundle status` and the dashboard."""
        v = self.versions
        c = self.content
        return [
            f"bundle {self.source}: root v{v['root']} ({self.root_threshold} of "
            f"{len(self.root_keys)} keys), targets v{v['targets']}, snapshot "
            f"v{v['snapshot']}, timestamp v{v['timestamp']}",
            f"  expires {self.expiry:%Y-%m-%dT%H:%M:%SZ}; {len(c.keys)} keys, "
            f"{len(c.revocations)} revocations, {len(c.labels)} labels, "
            f"{len(c.rules)} rules",
            *(f"  revoked {r.key.name}: {r.reason}" for r in c.revocations),
        ]


def load_state(store: Path, pin: str) -> BundleState | None:
    """The stored state of the bundle pinned by `pin`, or None if never fetched.

    The store is trusted (0700, its owner's): the metadata was verified when stored; the
    trust file is checked again against the stored targets metadata's hash."""
    link = state_root(store, pin) / "current"
    for attempt in range(5):
        if not link.exists():
            return None
        # One state directory for the whole read: an update swaps the link, then
        # removes the old directory; a read that loses that race reads the new one.
        try:
            return _load_dir(link.resolve())
        except FileNotFoundError as e:
            if attempt == 4:
                raise UsageError(one_line(f"{link}: stored bundle unreadable: {e}")) from None
        except (OSError, ValueError, KeyError, TypeError, tuf_errors.RepositoryError) as e:
            # Corrupt state (the store is checked, not trusted blindly): never a traceback.
            raise UsageError(one_line(f"{link}: stored bundle unreadable: {e}")) from None
    return None


def _load_dir(current: Path) -> BundleState:
    md_dir = current / "metadata"
    mds = {role: Metadata.from_file(str(md_dir / f"{role}.json"))
           for role in ("root", "timestamp", "snapshot", "targets")}
    info = mds["targets"].signed.targets.get(TARGET_NAME)
    if info is None:
        raise UsageError(f"{current}: the stored bundle has no {TARGET_NAME}")
    path = current / "targets" / TARGET_NAME
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.hashes.get("sha256"):
        raise UsageError(f"{path}: does not match the stored targets metadata")
    meta = json.loads((current / "state.json").read_text())
    root = mds["root"].signed
    keys = [k for k in (public_of(root.keys[i]) for i in root.roles["root"].keyids)
            if k is not None]
    return BundleState(meta["source"], parse_content(data, str(path)),
                       {r: m.signed.version for r, m in mds.items()},
                       {r: m.signed.expires for r, m in mds.items()},
                       keys, root.roles["root"].threshold, meta["updated"])


def _bootstrap(state: Path, pin: str, metadata_base: str,
               fetcher: FetcherInterface) -> bytes:
    """The pinned first root: stored once verified, else fetched and checked."""
    stored = state / "1.root.json"
    if stored.exists():
        data = stored.read_bytes()
        if hashlib.sha256(data).hexdigest() == pin:
            return data
    try:
        data = fetcher.download_bytes(f"{metadata_base}1.root.json", CONFIG.root_max_length)
    except tuf_errors.DownloadError as e:
        raise UpdateError(f"1.root.json: {_reason(e)}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != pin:
        raise UpdateError(f"1.root.json: sha256:{got} is not the pinned root sha256:{pin}")
    state.mkdir(parents=True, exist_ok=True)
    _atomic(stored, data)
    return data


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def update(store: Path, source: str, pin: str) -> list[str]:
    """Fetch and verify the bundle; store it on success. Returns what changed.

    UpdateError (one line) when TUF refuses anything: the stored state is unchanged."""
    metadata_base, targets_base, fetcher = _urls(source)
    from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher
    fetcher = fetcher or Urllib3Fetcher(socket_timeout=20)
    state = state_root(store, pin)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    # One update at a time per bundle (the mount's timer, a command, a reload).
    lock = os.open(state / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _update_locked(store, state, source, pin, metadata_base, targets_base,
                              fetcher)
    finally:
        os.close(lock)


def _update_locked(store: Path, state: Path, source: str, pin: str, metadata_base: str,
                   targets_base: str, fetcher: FetcherInterface) -> list[str]:
    # Work directories an interrupted update left (we hold the lock: none is in use).
    live = os.readlink(state / "current") if (state / "current").is_symlink() else None
    for leftover in state.glob("work-*"):
        if leftover.name != live:
            shutil.rmtree(leftover, ignore_errors=True)
    bootstrap = _bootstrap(state, pin, metadata_base, fetcher)
    try:
        old = load_state(store, pin)
    except UsageError:
        old = None  # unreadable: ngclient skips what does not verify; a good update heals
    current = state / "current"
    work = state / f"work-{os.getpid()}-{time.monotonic_ns()}"
    if current.exists():
        shutil.copytree(current, work, symlinks=True)
    else:
        (work / "metadata").mkdir(parents=True)
    (work / "targets").mkdir(exist_ok=True)
    try:
        try:
            updater = Updater(str(work / "metadata"), metadata_base, str(work / "targets"),
                              targets_base, fetcher, CONFIG, bootstrap=bootstrap)
            updater.refresh()
            info = updater.get_targetinfo(TARGET_NAME)
            if info is None:
                raise UpdateError(f"{source}: the bundle publishes no {TARGET_NAME}")
            if info.length > TRUST_MAX_LENGTH:
                raise UpdateError(f"{source}: {TARGET_NAME} is {info.length} bytes, more "
                                  f"than {TRUST_MAX_LENGTH}")
            path = updater.find_cached_target(info) or updater.download_target(info)
            parse_content(Path(path).read_bytes(), f"{source}: {TARGET_NAME}")
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as e:
            raise UpdateError(one_line(f"{source}: update refused, the trusted state is "
                                       f"kept: {_reason(e)}")) from None
        except ValueError as e:  # a metadata file that does not even parse
            raise UpdateError(one_line(f"{source}: update refused: {e}")) from None
        _atomic(work / "state.json", json.dumps(
            {"source": source, "updated": time.time()}).encode())
        link = state / f".current-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(work.name)
        previous = os.readlink(current) if current.is_symlink() else None
        os.replace(link, current)
        if previous:
            shutil.rmtree(state / previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    new = load_state(store, pin)
    assert new is not None
    return changes(old, new)


def changes(old: BundleState | None, new: BundleState) -> list[str]:
    """What an update changed, a line each."""
    lines = []
    v = new.versions
    if old is None:
        lines.append(f"new bundle: root v{v['root']}, targets v{v['targets']}")
    else:
        for role in ("root", "targets", "snapshot", "timestamp"):
            if old.versions[role] != v[role]:
                lines.append(f"{role} v{old.versions[role]} -> v{v[role]}")
    versions = len(lines)
    before = old.content if old is not None else BundleContent()
    after = new.content
    old_keys = {k.key: k.name for k in before.keys}
    new_keys = {k.key: k.name for k in after.keys}
    lines += [f"key added: {n}" for k, n in new_keys.items() if k not in old_keys]
    lines += [f"key removed: {n}" for k, n in old_keys.items() if k not in new_keys]
    old_rev = {r.key.key for r in before.revocations}
    for r in after.revocations:
        if r.key.key not in old_rev:
            lines.append(f"key revoked: {r.key.name} ({key_fingerprint(r.key.key)}): "
                         f"{r.reason}")
    old_labels = set(before.labels)
    lines += [f"label: {lab} on blake3:{d.hex()}" for d, lab in after.labels
              if (d, lab) not in old_labels]
    if before.rules != after.rules:
        lines.append(f"rules: {len(after.rules)} shared rules")
    if old is not None and len(lines) == versions:
        lines.append("no change to keys, revocations, labels or rules")
    lines.append(f"expires {new.expiry:%Y-%m-%dT%H:%M:%SZ}")
    return lines
