"""Serving a store at a mountpoint: checks, daemonising once ready, clean shutdown."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from annofs.daemon import deadmount, registry
from annofs.daemon.commands import DaemonCommands
from annofs.daemon.control import ControlServer
from annofs.daemon.events import EventLog
from annofs.daemon.invalidate import Invalidator
from annofs.daemon.policy_holder import PolicyHolder, check_policy_location
from annofs.daemon.readahead import raise_readahead
from annofs.daemon.registry import STATE_FILE, MountInfo, read_state
from annofs.dashboard.server import (
    URL_FILE,
    ListenAddress,
    access_url,
    bind,
    bound_address,
    new_token,
    remove_url_file,
    serve_for_mount,
    write_url_file,
)
from annofs.errors import AnnofsError, StoreError, UsageError
from annofs.fs.operations import Operations
from annofs.printable import one_line
from annofs.store.lock import store_lock
from annofs.store.warm import start_warming
from annofs.volume import Volume

log = logging.getLogger("annofs.daemon")

# Tasks reading and answering FUSE requests at most (pyfuse3's default is 99). A request
# waiting for its uid's hashing threads holds one, up to HASH_WAITERS_PER_UID (64) per
# uid (fs/enforce.py): room for several uids' worst and everyone else. pyfuse3 starts
# them as requests come and lets idle ones end.
FUSE_WORKERS = 512

# An idle request loop polls /dev/fuse this long before it sleeps in the event loop
# (scripts/pyfuse3-spin.patch). A client such as tar sends its next request some tens of
# microseconds after a reply; found asleep, the daemon pays an epoll round, trio's
# scheduler and a cross-CPU wake-up for each. Only with more than one CPU: on one, the
# poll would keep the client from sending.
FUSE_SPIN_NS = 200_000

# Read replies of at least this many bytes are written to /dev/fuse by a thread of their
# own (scripts/pyfuse3-reply-thread.patch): the kernel's copy of a reply into the page
# cache was half the loop's time in a cold sequential read, and overlaps with the next
# request there (cold 1 GiB: 863-1100 against 606-977 MB/s). Small replies (tar's files)
# are written inline: a hand-off costs more than their copy. Only with more than one CPU.
# Reads as large are handed to pyfuse3 as checked replies (Operations.use_checked_replies):
# that thread hashes their fragments too, the other half of the loop's time.
REPLY_THREAD_BYTES = 256 << 10

# Committed transactions reach the disk at least this often (fsync forces it sooner).
SYNC_INTERVAL = 1.0
BUNDLE_REFRESH = 300.0  # seconds between trust bundle updates (ANNOFS_BUNDLE_REFRESH)


@dataclass(frozen=True)
class MountOptions:
    """What `annofs mount` was asked for."""

    store: Path
    mountpoint: Path
    foreground: bool = False
    allow_other: bool = False
    policy: Path | None = None
    dashboard: ListenAddress | None = None


def clear_dead_mounts(opts: MountOptions) -> list[str]:
    """Clear dead mounts in the way of this one: at the mountpoint (an annofs mount whose
    daemon is gone), and where this store's killed daemon left its mount; one line each."""
    said = []
    stale = registry.stale_state(opts.store)
    places = [opts.mountpoint]
    if stale is not None and Path(stale["mountpoint"]) != opts.mountpoint:
        places.append(Path(stale["mountpoint"]))
    for mp in places:
        if registry.lookup(mp) is None and deadmount.is_dead(mp):
            deadmount.clear(mp)
            registry.unregister(mp)
            said.append(f"{mp}: its daemon was gone (killed?); cleared the dead mount")
    if stale is not None:
        with contextlib.suppress(FileNotFoundError):
            (opts.store / STATE_FILE).unlink()
    return said


def check_mountable(opts: MountOptions) -> None:
    """Every reason a mount would fail that we can name before trying (UsageError)."""
    mp = opts.mountpoint
    try:
        os.stat(mp)
    except FileNotFoundError:
        raise UsageError(f"{mp}: mountpoint does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # another filesystem's dead FUSE mount
            raise UsageError(f"{mp}: a dead FUSE mount of another filesystem; clear it with "
                             f"'fusermount3 -u -z {mp}'") from None
        raise UsageError(f"{mp}: {e.strerror}") from None
    if not mp.is_dir():
        raise UsageError(f"{mp}: mountpoint is not a directory")
    if os.path.ismount(mp):
        raise UsageError(f"{mp}: something is already mounted here")
    if any(mp.iterdir()):
        raise UsageError(f"{mp}: mountpoint is not empty")
    if not (opts.store / "db" / "data.mdb").exists():
        raise StoreError(f"{opts.store}: no annofs store here (run annofs init)")
    running = read_state(opts.store)
    if running is not None:
        raise UsageError(f"{opts.store}: already mounted at {running['mountpoint']} "
                         f"(pid {running['pid']})")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UsageError("/dev/fuse: not available (is the fuse module loaded?)")


def _fuse_options(opts: MountOptions) -> set[str]:
    options = set(pyfuse3.default_options)
    options.add("fsname=annofs")
    options.add("subtype=annofs")
    if opts.allow_other:
        options.add("allow_other")
    return options


class _UnwantedReplies(logging.Filter):
    """Demotes pyfuse3's ERROR for a release answered after the kernel dropped it.

    The kernel sends RELEASE after close() has returned; when an unmount tears the
    connection down first, it aborts the request, and our answer finds nothing (ENOENT).
    Nothing is lost (a release has no answer to wait for); it is worth a debug line only.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            msg = record.getMessage()
            if msg.startswith(("fuse_release(): ", "fuse_releasedir(): ")) and \
                    msg.endswith("No such file or directory"):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


class OneLineFormatter(logging.Formatter):
    """Each record on one line: a message quoting a file name (which may hold a
    newline) cannot forge a log line. A traceback after it keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


def _setup_logging(store: Path, foreground: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    logging.getLogger("pyfuse3").addFilter(_UnwantedReplies())
    fmt = OneLineFormatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    fh = logging.FileHandler(store / "daemon.log")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if foreground:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)


async def _serve(ops: Operations, policy: PolicyHolder, mountpoint: Path,
                 dashboard: socket.socket | None, token: str) -> None:
    invalidator = Invalidator()
    commands = DaemonCommands(ops, invalidator, policy)
    control = ControlServer(ops.vol.store.path, commands.handlers())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sync_loop, ops, policy)
        nursery.start_soon(_signal_loop)
        nursery.start_soon(_reload_loop, policy, invalidator, ops)
        nursery.start_soon(_bundle_loop, policy, invalidator, ops)
        nursery.start_soon(invalidator.run)
        nursery.start_soon(_tune_readahead, ops, mountpoint)
        nursery.start_soon(_warm_store, ops)
        await nursery.start(control.serve)
        if dashboard is not None:
            await nursery.start(serve_for_mount, dashboard, token, ops.vol, policy.guard,
                                policy.gate, mountpoint)
        cpus = len(os.sched_getaffinity(0))
        set_spin = getattr(pyfuse3, "annofs_set_spin", None)
        if set_spin is not None and cpus > 1:
            set_spin(FUSE_SPIN_NS)
            ops.stats["fuse_spin_ns"] = FUSE_SPIN_NS
        set_reply_thread = getattr(pyfuse3, "annofs_set_reply_thread", None)
        if set_reply_thread is not None and cpus > 1:
            set_reply_thread(REPLY_THREAD_BYTES)
            ops.stats["reply_thread_bytes"] = REPLY_THREAD_BYTES
        # The same large reads are checked by pyfuse3 before it writes them: by that
        # thread, on the copy it writes, while the loop goes on (inline, without the GIL,
        # where the thread is off or its queue full).
        if ops.use_checked_replies(REPLY_THREAD_BYTES):
            ops.stats["checked_reply_bytes"] = REPLY_THREAD_BYTES
        await pyfuse3.main(max_tasks=FUSE_WORKERS)
        nursery.cancel_scope.cancel()


async def _tune_readahead(ops: Operations, mountpoint: Path) -> None:
    """Raise the readahead window once FUSE_INIT is answered (the reply resets it)."""
    await ops.init_done.wait()
    await trio.sleep(0)  # the reply is sent in the same call that set the event
    raise_readahead(mountpoint)


async def _warm_store(ops: Operations) -> None:
    """Read the store into the page cache once serving (store.warm), stopped at unmount."""
    await ops.init_done.wait()
    stop = threading.Event()
    start_warming(ops.vol.store.path, stop)
    try:
        await trio.sleep_forever()
    finally:
        stop.set()


async def _sync_loop(ops: Operations, policy: PolicyHolder) -> None:
    while True:
        await trio.sleep(SYNC_INTERVAL)
        # Also when only other processes (an import into the mount) committed: the
        # store's pin on this process's last sync would keep their freed pages from reuse.
        if ops.dirty_since_sync or ops.vol.store.pin_behind():
            await ops.sync()
        policy.events.flush(due_only=True)  # summaries of floods that have stopped


async def _bundle_loop(policy: PolicyHolder, invalidator: Invalidator,
                       ops: Operations) -> None:
    """Refresh the policy's trust bundle at mount and then every BUNDLE_REFRESH seconds
    ($ANNOFS_BUNDLE_REFRESH): new revocations and labels apply at once. In between, a
    cheap look each second at the loaded bundle's expiry (a reload may have brought a
    new one): once past it, refresh at once, so a bundle nobody renews turns stale then
    (on-stale), not at the next tick."""
    interval = float(os.environ.get("ANNOFS_BUNDLE_REFRESH", BUNDLE_REFRESH))
    next_refresh = last_try = 0.0
    while True:
        now = time.time()
        bundle = policy.gate.policy.bundle if policy.gate is not None else None
        expired = (bundle is not None and bundle.stale is None and bundle.expires is not None
                   and now >= bundle.expires and now - last_try >= 5)
        if now >= next_refresh or expired:
            last_try = now
            if await policy.refresh_bundle():
                invalidator.everything(ops.inodes)
            next_refresh = time.time() + interval
        await trio.sleep(min(1.0, interval))


async def _reload_loop(policy: PolicyHolder, invalidator: Invalidator,
                       ops: Operations) -> None:
    """SIGHUP re-reads the policy (a bad file leaves the old one in force)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            await policy.refresh_bundle()
            try:
                policy.reload()
            except AnnofsError:
                continue  # logged by reload
            invalidator.everything(ops.inodes)


async def _signal_loop() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def serve(opts: MountOptions, ready_fd: int | None = None) -> None:
    """Mount and serve until unmounted; report readiness on `ready_fd` (one line)."""
    # Bound first: a taken port must fail the command before anything is mounted.
    dashboard = bind(opts.dashboard) if opts.dashboard is not None else None
    token = new_token()
    lock = contextlib.ExitStack()
    # Held for the mount's life, released by the kernel however the daemon ends: this is
    # how commands know it is alive (registry.daemon_alive). Released last (LIFO).
    lock.callback(os.close, registry.take_mount_lock(opts.store))
    # Held for the mount's life: gc must not run offline under a live daemon.
    lock.enter_context(store_lock(opts.store, exclusive=False, what="mount"))
    vol = Volume.open(opts.store)
    vol.store.sync_interval = None  # _sync_loop syncs, in a thread: not on the event loop
    try:
        policy = PolicyHolder(vol, opts.policy, opts.mountpoint, EventLog(opts.store))
    except BaseException:
        vol.close()
        lock.close()
        raise
    ops = Operations(vol, policy.guard)
    url = None
    if dashboard is not None:
        # Before readiness is reported: `annofs mount` reads the URL from here to print
        # it. The token is never logged (the log is kept; this file goes at unmount).
        url = access_url(bound_address(dashboard), token)
        try:
            write_url_file(opts.store, url)
        except OSError as e:
            vol.close()
            lock.close()
            raise StoreError(f"{opts.store / URL_FILE}: cannot write the dashboard's URL "
                             f"({e.strerror or e})") from None
    try:
        pyfuse3.init(ops, str(opts.mountpoint), _fuse_options(opts))
    except RuntimeError as e:
        if url is not None:
            remove_url_file(opts.store, url)
        vol.close()
        lock.close()
        raise UsageError(f"{opts.mountpoint}: mount failed ({e})") from e
    # Nothing may touch the mountpoint from here until the loop runs: the kernel would
    # send this very process a request it cannot answer yet (opts are resolved already).
    (opts.store / STATE_FILE).write_text(
        json.dumps({"pid": os.getpid(), "mountpoint": str(opts.mountpoint)}))
    registry.register(MountInfo(os.getpid(), opts.store, opts.mountpoint))
    log.info("mounted %s at %s", opts.store, opts.mountpoint)
    if url is not None and ready_fd is None:
        print(f"dashboard: {url}", file=sys.stderr, flush=True)
    if ready_fd is not None:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
    clean = False
    try:
        trio.run(_serve, ops, policy, opts.mountpoint, dashboard, token)
        clean = True
    finally:
        try:
            trio.run(ops.commit_all)
        except Exception:
            log.exception("committing open files at unmount failed")
        try:
            policy.events.flush()  # what the flood limit still holds
        except OSError as e:
            log.warning("writing the events log's last summaries failed: %s", e)
        pyfuse3.close(unmount=True)
        with contextlib.suppress(FileNotFoundError):
            (opts.store / STATE_FILE).unlink()
        registry.unregister(opts.mountpoint)
        if url is not None:
            remove_url_file(opts.store, url)
        vol.close()
        log.info("unmounted %s (%s)", opts.mountpoint, "clean" if clean else "after an error")
        lock.close()  # last: `annofs umount` returns when it sees the lock free


def mount(opts: MountOptions) -> None:
    """`annofs mount`: in the foreground, or daemonised once the mount works."""
    opts = dataclasses.replace(opts, store=opts.store.resolve(),
                               mountpoint=opts.mountpoint.resolve(),
                               policy=opts.policy.resolve() if opts.policy else None)
    if opts.policy is not None:
        check_policy_location(opts.policy, opts.mountpoint)  # the most precise reason first
    for line in clear_dead_mounts(opts):
        print(f"annofs: {line}", file=sys.stderr, flush=True)
    check_mountable(opts)
    registry.runtime_dir()  # refused now if not private, not once mounted
    _setup_logging(opts.store, opts.foreground)
    if opts.foreground:
        serve(opts)
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        with os.fdopen(r) as ready:
            answer = ready.readline().strip()
        if answer != "ok":
            raise UsageError(answer or f"{opts.mountpoint}: the daemon died while mounting "
                             f"(see {opts.store / 'daemon.log'})")
        return
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        serve(opts, ready_fd=w)
    except Exception as e:
        with contextlib.suppress(OSError):
            os.write(w, f"{e}\n".encode())
        if isinstance(e, AnnofsError):  # the user's to fix, said in one line
            log.error("mount failed: %s", e)
        else:
            log.exception("mount failed")
        os._exit(2)
    os._exit(0)
