"""What the daemon does for commands on its mount (the control channel's handlers).

Each handler makes its change through the same layer calls as the offline command,
then tells the mount's inode table and the kernel what changed.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Any

import trio

from annofs.daemon.invalidate import Invalidator
from annofs.daemon.policy_holder import PolicyHolder, check_policy_location
from annofs.errors import UsageError
from annofs.fs.inodes import ROOT
from annofs.fs.operations import Operations
from annofs.store.lock import imports_running

# gc and the import's staging (annofs.maintenance, annofs.transfer.import_tree) are
# imported by their handlers: nothing needs them before the mount is ready.


def _parts(args: dict[str, Any], key: str) -> list[bytes]:
    raw = args.get(key)
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise UsageError(f"control: '{key}' must be a list of names")
    try:
        parts = [p.encode("utf-8", "surrogateescape") for p in raw]
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raise UsageError(f"control: '{key}' has a name that is not bytes") from None
    if any(p in (b"", b".", b"..") or b"/" in p or b"\0" in p for p in parts):
        raise UsageError(f"control: '{key}' has an invalid name")
    return parts


def check_outside(path: Path, mountpoint: Path, what: str) -> None:
    """Refuse a host path inside the mount (the daemon would read through itself)."""
    try:
        check_policy_location(path, mountpoint)
    except UsageError:
        raise UsageError(f"{path}: {what} must be outside the mount ({mountpoint})") from None


class DaemonCommands:
    """Handlers bound to one mount's Operations."""

    def __init__(self, ops: Operations, invalidator: Invalidator,
                 policy: PolicyHolder) -> None:
        self.ops = ops
        self.inv = invalidator
        self.policy = policy

    def handlers(self) -> dict[str, Any]:
        """op name -> handler, for the ControlServer."""
        return {"ping": self.ping, "cp": self.cp, "policy-reload": self.policy_reload,
                "gc": self.gc, "nix-fetch": self.nix_fetch, "nar-restore": self.nar_restore,
                "import-begin": self.import_begin, "import-finish": self.import_finish,
                "commit": self.commit, "policy-file": self.policy_file}

    async def commit(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """Store what open handles have written, so a command reading the store beside the
        daemon sees what a process reading the mount would (and signs exactly that)."""
        await self.ops.commit_all()
        return {}

    async def policy_file(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """The policy file the mount enforces (None without one): `why` and `verify` of a
        path in the mount judge by it when no --policy is given."""
        return {"file": str(self.policy.file) if self.policy.file is not None else None}

    async def gc(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """gc under the mount: versions held by open handles are roots too.

        A commit stores fragments before the version that uses them, and gc must never
        fall between the two: gc holds the gate exclusively (commits, spills, restores
        and import starts wait), and runs in a worker thread, so lookups, reads and
        every other request go on meanwhile. Fragments of versions still being written
        (spilled ahead of a close) are kept explicitly. Offline writers are refused while
        a store is mounted, so nothing else races it.
        """
        from annofs.maintenance.gc import collect
        from annofs.maintenance.retention import retention_from

        prune = args.get("prune_history", False)
        if not isinstance(prune, bool):
            raise UsageError("control: 'prune_history' must be true or false")
        # The same checks and messages as the command line's (a bad value changes nothing).
        retention = retention_from(args.get("keep_last"), args.get("keep_within"))
        await self.ops.commit_all()
        async with self.ops.gc_gate.exclusive():
            if imports_running(self.ops.vol.store.path):
                # Its fragments and staging tree are not referenced yet: gc would free them.
                raise UsageError(f"{self.ops.vol.store.path}: an import is running; "
                                 f"run gc when it has finished")
            rep = await trio.to_thread.run_sync(functools.partial(
                collect, self.ops.vol, prune_history=prune, retention=retention,
                extra_roots=self.ops.held_versions(),
                keep_fragments=self.ops.unstored_fragments()))
        return dataclasses.asdict(rep)

    async def policy_reload(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """Re-read the policy file, as SIGHUP does; a bad file keeps the old policy.
        A policy with a trust bundle updates it first (in a worker thread)."""
        await self.policy.refresh_bundle()
        message = self.policy.reload()
        # Returned once no FIFO the new policy refuses can be opened through a name the
        # kernel still held (the rest of the invalidations follow).
        await self.inv.everything(self.ops.inodes).wait()
        return {"message": message}

    async def ping(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """Liveness, and which store this is."""
        return {"store": str(self.ops.vol.store.path)}

    async def cp(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """O(1) copy inside the mount; the new name shows at once."""
        src, dst = _parts(args, "src"), _parts(args, "dst")
        await self.ops.commit_all()  # the copy takes what was written, as cp would read it
        vol = self.ops.vol
        with vol.store.write() as txn:
            made = vol.namespace.copy(txn, src, dst)
        self.ops.dirty_since_sync = True
        self.inv.path_changed(self.ops.inodes, made)
        return {"path": [p.decode("utf-8", "surrogateescape") for p in made]}

    async def nix_fetch(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """`annofs nix fetch` into the mount; the new store paths show at once.

        NARs are read, checked and staged in a worker thread, so the mount keeps
        answering; each path's staging tree is swapped in by one transaction run on the
        event loop (the swap changes directory nodes the loop caches: between two
        requests, never during one), so no reader ever sees half a path. The policy is
        the file the command names, else the mount's.
        """
        from annofs.nix.cache import DirectoryCache
        from annofs.nix.fetch import cache_args, fetch, mirror_remote
        from annofs.trust.policy import load_policy

        caches, paths = args.get("caches"), args.get("paths")
        if not isinstance(caches, list) or not all(isinstance(c, str) for c in caches) or \
                not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise UsageError("control: 'caches' and 'paths' must be lists of strings")
        dest = _parts(args, "dest")
        policy_file = args.get("policy")
        cache_list = cache_args(caches)
        # Reading a cache or a policy through this very mount would wait on this handler.
        for c in cache_list:
            if isinstance(c, DirectoryCache):
                check_outside(c.path, self.policy.mountpoint, "the cache")
        if isinstance(policy_file, str):
            check_outside(Path(policy_file), self.policy.mountpoint, "the policy")
            policy = load_policy(Path(policy_file), self.ops.vol.store.path)
        elif self.policy.gate is not None:
            policy = self.policy.gate.policy
        else:
            raise UsageError("no policy: give --policy FILE (this mount has none; its trusted "
                             "keys would decide which cache signatures count)")
        recursive = bool(args.get("recursive", False))
        with tempfile.TemporaryDirectory(dir=self.ops.vol.store.path, prefix="fetch-") as tmp:
            # Remote caches are read in a worker thread: the network must not hold up
            # the mount. What they sent is then fetched, and checked, from local copies.
            local = await trio.to_thread.run_sync(mirror_remote, cache_list, paths, policy,
                                                  recursive, Path(tmp))
            await self.ops.commit_all()
            async with self.ops.gc_gate.shared():  # a gc in its thread would free fragments
                done = await trio.to_thread.run_sync(functools.partial(
                    fetch, self.ops.vol, policy, local, paths, dest=dest,
                    recursive=recursive, swap_on=trio.from_thread.run_sync))
        self.ops.dirty_since_sync = True
        for f in done:
            # Every level: /nix may be new, and the kernel may hold a negative entry for it.
            for i in range(1, len(f.dest) + 1):
                self.inv.path_changed(self.ops.inodes, list(f.dest[:i]))
        return {"fetched": [f.to_json() for f in done]}

    async def nar_restore(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """Unpack a NAR file (a host path the client names) at a new path in the mount.

        The daemon opens the file itself: only the mount's owner or root reach this
        channel, so it reads nothing its caller could not. The file is read, checked and
        staged in a worker thread (a gc, in its thread, cannot start meanwhile); only the
        swap runs on the event loop, so the mount keeps answering.
        """
        from annofs.transfer.nar import RestoredTree, restore_nar_into

        dest = _parts(args, "dest")
        file, source = args.get("file"), args.get("source", "NAR")
        if not isinstance(file, str) or not isinstance(source, str):
            raise UsageError("control: 'file' and 'source' must be strings")
        check_outside(Path(file), self.policy.mountpoint, "the NAR")

        def restore() -> RestoredTree:
            try:
                f = open(file, "rb")  # noqa: SIM115 - closed below
            except OSError as e:
                raise UsageError(f"{source}: {e.strerror}") from None
            with f:
                return restore_nar_into(self.ops.vol, f, dest, source=source,
                                        swap_on=trio.from_thread.run_sync)

        async with self.ops.gc_gate.shared():  # a gc in its thread would free fragments
            tree = await trio.to_thread.run_sync(restore)
        self.ops.dirty_since_sync = True
        for i in range(1, len(dest) + 1):  # parents it made may be cached as missing
            self.inv.path_changed(self.ops.inodes, dest[:i])
        return {"files": len(tree.files), "directories": tree.directories,
                "symlinks": tree.symlinks, "nar_hash": str(tree.nar), "nar_size": tree.nar.size}

    async def import_begin(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """Start an import into the mount: a staging tree cloned from the destination.

        The importing command fills the staging tree itself (in the store, beside the
        daemon: nothing the mount shows refers to it) and asks `import-finish` to swap it
        in, so the mount's caches learn of the change at once.
        """
        from annofs.transfer.import_tree import begin_staging

        dest = _parts(args, "dest")
        if not dest:
            raise UsageError("import: the destination must be below the mount's root")
        gid = _id(args, "gid")
        await self.ops.commit_all()  # the clone takes what was written, as a reader would
        vol = self.ops.vol
        async with self.ops.gc_gate.shared():  # not while a gc runs: it drops staging trees
            with vol.store.write() as txn:
                root = begin_staging(vol, txn, dest, uid, gid)
        self.ops.dirty_since_sync = True
        return {"root": root}

    async def import_finish(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """Swap an import's staging tree in as its destination; the mount shows it at once."""
        from annofs.transfer.import_tree import finish_staging

        dest = _parts(args, "dest")
        root = args.get("root")
        if not dest or not isinstance(root, str):
            raise UsageError("control: import-finish needs 'root' and 'dest'")
        gid = _id(args, "gid")
        await self.ops.commit_all()
        vol = self.ops.vol
        with vol.store.write() as txn:
            finish_staging(vol, txn, root, dest, uid, gid)
        # Directory node ids cached by inodes under the destination are gone.
        vol.namespace.cow_epoch += 1
        self.ops.dirty_since_sync = True
        self._invalidate_tree(dest)
        return {"path": [p.decode("utf-8", "surrogateescape") for p in dest]}

    def _invalidate_tree(self, parts: list[bytes]) -> None:
        """The entry at `parts` was replaced: drop what the kernel caches of it and below."""
        inodes = self.ops.inodes
        for i in range(1, len(parts) + 1):  # parents it made may be cached as missing
            self.inv.path_changed(inodes, parts[:i])
        node = inodes.get(ROOT)
        for name in parts:
            node = inodes.at(node.ino, name) if node is not None else None
        if node is None:
            return
        for other in list(inodes.by_ino.values()):
            if other.ino != node.ino and inodes.is_within(other, node):
                self.inv.entry(other.parent, other.name)
                self.inv.inode(other.ino)
        self.inv.inode(node.ino)


def _id(args: dict[str, Any], key: str) -> int:
    raw = args.get(key)
    if type(raw) is not int or raw < 0:
        raise UsageError(f"control: '{key}' must be a non-negative integer")
    return raw
