"""The mount's policy: loaded at mount, reloaded on SIGHUP or `annofs policy reload`.

A policy that fails to load on reload leaves the old one in force, and says so: a typo
must never turn enforcement off. The policy file must live outside the mount, so nothing
that can write through the mount can change what the mount enforces.
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from annofs.daemon.events import Event, EventLog
from annofs.daemon.feed import event_of
from annofs.errors import AnnofsError, UsageError
from annofs.explain.throttle import PerCaller
from annofs.fs.enforce import OpenGuard
from annofs.trust.gate import TrustGate
from annofs.trust.policy import load_policy, permissive_policy
from annofs.trust.symlink import Content
from annofs.trust.verdict import Verdict
from annofs.volume import Volume

# annofs.explain.report (the signed original, the diff) is imported at the first refusal
# it explains, in the worker thread that explains it: not before the mount is ready.
if TYPE_CHECKING:
    from annofs.explain.report import Explanation

log = logging.getLogger("annofs.daemon")
BUNDLE_TIMEOUT = 60.0  # seconds one trust bundle update may take in the daemon
PREWARM_SECONDS = 1.0  # statements parsed at mount, at most this long (AnnotationStore.prewarm)


# Mountpoints as resolved before they were mounted: once mounted, resolving one would
# stat the mount's root, a request to the daemon that is running the check.
_REAL_MOUNTPOINTS: dict[Path, str] = {}


def remember_mountpoint(mountpoint: Path) -> None:
    """Resolve a mountpoint for later checks; call before it is mounted."""
    _REAL_MOUNTPOINTS[mountpoint] = os.path.realpath(mountpoint)


def _within(path: str, mp: str) -> bool:
    return path == mp or path.startswith(mp.rstrip("/") + "/")


def check_policy_location(policy: Path, mountpoint: Path) -> None:
    """Refuse a policy file (or keys dir, or key file) inside the mount it would govern.

    Symlinks are followed by hand, and the path is refused before any step would look
    inside the mount: realpath() would stat through it, and a daemon checking a path
    through its own mount from its event loop waits for itself forever.
    """
    mp = _REAL_MOUNTPOINTS.get(mountpoint) or os.path.realpath(mountpoint)
    inside = UsageError(f"{policy}: the policy must live outside the mount ({mountpoint})")
    pending = list(reversed(Path(os.path.abspath(policy)).parts[1:]))
    cur, hops = "/", 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            cur = os.path.dirname(cur)  # cur has no symlinks: ".." is its parent
            continue
        nxt = os.path.join(cur, part)
        if _within(nxt, mp):
            raise inside
        if not os.path.islink(nxt):
            cur = nxt
            continue
        hops += 1
        if hops > 40:
            raise UsageError(f"{policy}: too many levels of symbolic links")
        target = Path(os.readlink(nxt))
        if target.is_absolute():
            cur = "/"
            pending.extend(reversed(target.parts[1:]))
        else:
            pending.extend(reversed(target.parts))


class PolicyHolder:
    """Owns the mount's TrustGate and its policy file."""

    def __init__(self, vol: Volume, policy_file: Path | None, mountpoint: Path,
                 events: EventLog) -> None:
        remember_mountpoint(mountpoint)
        self.file = policy_file.resolve() if policy_file else None
        self.mountpoint = mountpoint
        self.events = events
        policy = permissive_policy()
        if self.file is not None:
            self._check_locations()
            policy = load_policy(self.file, vol.store.path)
        self.gate = TrustGate(vol, policy) if self.file is not None else None
        if self.gate is not None:
            # As the kernel resolves an absolute symlink target: from the real path.
            real = os.fsencode(os.path.realpath(mountpoint))
            self.gate.mountpoint = tuple(p for p in real.split(b"/") if p)
            if self.gate.enforcing:
                # Before the mount serves: the first opens under a rule must not wait on
                # parsing the statement over their tree (bounded: a second at most).
                with vol.store.read() as txn:
                    parsed = self.gate.annotations.prewarm(txn, PREWARM_SECONDS)
                log.debug("parsed %d statement(s) before serving", parsed)
        self.explained = PerCaller()  # refusals explained, per uid
        self._unexplained = 0
        self.guard = OpenGuard(self.gate, self.record, self.explain_refusal,
                               self.record_refusal)
        self._bundle_error = ""  # the last refused update's reason, recorded once

    async def refresh_bundle(self) -> bool:
        """Update the policy's trust bundle (TUF, in a worker thread: the network never
        holds up the event loop), then reload the policy if what it trusts or whether
        it is stale changed. A refused update keeps the old state and is recorded (once
        per distinct reason) in the events log. True if the policy was replaced."""
        gate = self.gate
        if gate is None or gate.policy.bundle is None or self.file is None:
            return False
        from annofs.trust.bundle_client import update

        view = gate.policy.bundle
        store = gate.volume.store.path
        changed = False
        error = ""
        # A repository that never answers (a hung file system, a slow drip) must not
        # hold up a reload for ever: the update is abandoned after BUNDLE_TIMEOUT.
        with trio.move_on_after(BUNDLE_TIMEOUT) as scope:
            try:
                lines = await trio.to_thread.run_sync(update, store, view.source, view.pin,
                                                      abandon_on_cancel=True)
                changed = any(not line.startswith(("snapshot", "timestamp", "expires",
                                                   "no change")) for line in lines)
                if changed:
                    log.info("trust bundle %s updated: %s", view.source, "; ".join(lines))
                self._bundle_error = ""
            except AnnofsError as e:
                error = str(e)
        if scope.cancelled_caught:
            error = f"{view.source}: no answer within {BUNDLE_TIMEOUT:g} s"
        if error and error != self._bundle_error:
            self._bundle_error = error
            log.warning("trust bundle update failed, its stored state stays: %s", error)
            self.events.record(Event(path=view.source, verdict="bundle-refused", reason=error))
        try:
            policy = await trio.to_thread.run_sync(load_policy, self.file, store)
        except AnnofsError as e:
            log.error("policy reload after a bundle update failed, the old policy stays "
                      "in force: %s", e)
            return False
        new = policy.bundle
        if not changed and new is not None and (new.stale is None) == (view.stale is None):
            return False
        if new is not None and new.stale is not None and view.stale is None:
            stale = new.stale_text()
            log.warning("%s (on-stale %s)", stale, new.on_stale.value)
            self.events.record(Event(path=view.source, verdict="bundle-stale",
                                     reason=f"{stale} (on-stale {new.on_stale.value})"))
        gate.set_policy(policy)
        return True

    def _check_locations(self) -> None:
        """The policy and its keys directory must be outside the mount: else they could be
        edited through it, and a reload would read through the daemon's own mount."""
        assert self.file is not None
        check_policy_location(self.file, self.mountpoint)
        try:
            doc = tomllib.loads(self.file.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return  # load_policy reports it precisely
        keys_dir = doc.get("trusted-keys-dir")
        if isinstance(keys_dir, str) and keys_dir:
            directory = self.file.parent / keys_dir
            check_policy_location(directory, self.mountpoint)
            # Each key file too: a trusted key that lives in the mount could be replaced
            # by anyone who may write there.
            for key_file in sorted(directory.glob("*.public")):
                check_policy_location(key_file, self.mountpoint)
        signers = doc.get("trusted-ssh-signers")
        if isinstance(signers, str) and signers:
            # The allowed_signers file is a list of trusted keys like any other.
            check_policy_location(self.file.parent / signers, self.mountpoint)

    def reload(self) -> str:
        """Re-read the policy file; on error keep the old policy and raise."""
        if self.file is None or self.gate is None:
            raise UsageError("this mount has no policy file (mount with --policy FILE)")
        try:
            self._check_locations()
            policy = load_policy(self.file, self.gate.volume.store.path)
        except AnnofsError as e:
            log.error("policy reload failed, the old policy stays in force: %s", e)
            raise UsageError(f"{e} (the old policy stays in force)") from None
        self.gate.set_policy(policy)
        log.info("policy reloaded from %s", self.file)
        return f"policy reloaded from {self.file}"

    async def explain_refusal(self, path: Sequence[bytes], version: Content,
                              verdict: Verdict, uid: int = 0) -> Explanation | None:
        """The explanation of a refusal (SPEC §5), made in a worker thread; None once
        `uid`'s rate limit is spent, so a flood of refusals costs one line each, not one
        diff. Per uid: one user's flood used to leave everyone's refusals unexplained."""
        if self.gate is None:
            return None
        if self.explained.wait(uid, time.monotonic()):
            self._unexplained += 1
            return None
        if self._unexplained:
            log.info("%d refusal(s) before this one were not explained (rate limit)",
                     self._unexplained)
            self._unexplained = 0
        gate = self.gate
        return await trio.to_thread.run_sync(
            _explain, gate.volume, gate.annotations, gate.policy, path, version, verdict)

    def record_refusal(self, path: str, pid: int, uid: int, reason: str) -> bool:
        """The sink of refusals that are not verdicts (EBUSY from the handle rules, see
        annofs.trust.admission; a FIFO where none may be): to the events log, as
        refusals. False if `uid`'s flood limit held it back."""
        return self.events.record(Event(path=path, verdict="refused", reason=reason,
                                        pid=pid, uid=uid))

    def record(self, path: str, version: Content, verdict: Verdict, pid: int, uid: int,
               explanation: Explanation | None = None) -> bool:
        """The verdict sink: refusals (with their explanation) and warnings go to the
        events log. False if `uid`'s flood limit held it back (see EventLog)."""
        if verdict.allowed and not verdict.flagged:
            return True
        event = event_of(path, version, verdict, pid, explanation)
        event.uid = uid
        return self.events.record(event)


def _explain(*args: object) -> Explanation:
    """annofs.explain.report.explain, imported in the worker thread of the first
    refusal explained rather than on the event loop (or before the mount is ready)."""
    from annofs.explain.report import explain

    return explain(*args)  # type: ignore[arg-type]
