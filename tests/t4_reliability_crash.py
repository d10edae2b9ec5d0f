"""Crash consistency, SPEC §9: `kill -9` at any moment loses no fsynced data and leaves a
store that mounts and passes `annofs fsck`: of the daemon under a writer process, and of
`annofs import` and `annofs gc` (offline, and gc under a mount).

Short by default; ANNOFS_FULL=1 runs the full counts (50 daemon kills). The seed is
printed; ANNOFS_CRASH_SEED repeats a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import blake3
import pytest
from conftest import Mount, annofs_cmd
from fuse_helpers import annofs

from annofs.content.fragments import fragment_hash
from annofs.content.versions import EMPTY_VERSION
from annofs.volume import Volume
from benchmarks.reliability import CrashLoop, digest, verify

FULL = os.environ.get("ANNOFS_FULL") == "1"
CYCLES = int(os.environ.get("ANNOFS_CRASH_CYCLES", "50" if FULL else "8"))
KILLS = 12 if FULL else 3  # kills of import and of gc, each


def seed() -> int:
    s = int(os.environ.get("ANNOFS_CRASH_SEED") or random.SystemRandom().randrange(1 << 31))
    print(f"ANNOFS_CRASH_SEED={s}")
    return s


def fsck_ok(store: Path) -> None:
    res = annofs("--store", str(store), "fsck", check=False)
    assert res.returncode == 0, f"annofs fsck:\n{res.stdout}{res.stderr}"


def test_kill_9_under_a_fsyncing_writer(mounted: Mount, tmp_path: Path) -> None:
    loop = CrashLoop(mounted.store, mounted.path, tmp_path, mounted.start,
                     lambda: mounted.proc.pid, mounted.kill,  # type: ignore[union-attr]
                     lambda *a: annofs(*a, check=False), seed())
    rep = loop.run(CYCLES)
    assert not rep.problems, "\n".join(rep.problems)
    assert rep.survived == CYCLES
    assert rep.synced >= CYCLES, "the writer fsynced almost nothing: the test proved little"
    mounted.stop()
    fsck_ok(mounted.store)


def test_the_crash_check_catches_loss_tearing_and_strays(tmp_path: Path) -> None:
    """verify() itself: what it must allow and what it must refuse."""
    d = {k: digest(k.encode()) for k in ("a0", "a1", "a2", "b1")}
    journal = tmp_path / "j"
    records = [{"seq": 1, "intent": {"a": d["a1"]}}, {"synced": 1},
               {"seq": 2, "intent": {"a": d["a2"], "b": d["b1"]}},
               {"seq": 3, "intent": {"b": None}}]
    journal.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = {"a": d["a0"], "old": d["a0"]}
    ok = [{"a": d["a1"], "old": d["a0"]}, {"a": d["a2"], "b": d["b1"], "old": d["a0"]}]
    for seen in ok:
        assert not verify(base, journal, seen).problems, seen
    bad = {"older than what was fsynced": {"a": d["a0"], "old": d["a0"]},
           "was never written": {"a": digest(b"torn"), "old": d["a0"]},
           "never made it": {"a": d["a1"], "old": d["a0"], "stray": d["a0"]},
           "lost: absent": {"a": d["a1"]}}
    for why, seen in bad.items():
        problems = verify(base, journal, seen).problems
        assert len(problems) == 1 and why in problems[0], (why, problems)


# -- import and gc, killed ------------------------------------------------------------------


def host_tree(root: Path, rnd: random.Random, files: int) -> None:
    """Files of mixed sizes in nested directories."""
    for i in range(files):
        d = root / f"d{i % 7}" / f"e{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        size = rnd.choice([0, 100, 3_000, 40_000, 200_000])
        (d / f"f{i}").write_bytes(rnd.randbytes(size))


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): blake3.blake3(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def store_tree(store: Path, dest: str, out: Path) -> dict[str, str] | None:
    """What `annofs export` gives for `dest` (None if it does not exist)."""
    shutil.rmtree(out, ignore_errors=True)
    res = annofs("--store", str(store), "export", dest, str(out), check=False)
    if res.returncode != 0:
        assert "no such" in (res.stderr + res.stdout).lower(), res.stderr
        return None
    return tree_digests(out)


def kill_at_random(argv: list[str], delay: float) -> bool:
    """Run a command and kill -9 it after `delay` seconds; True if it was still running.

    Its stderr goes to a file, not a pipe: helper processes of a killed command (import's
    readers) could hold a pipe open after it died."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
            time.sleep(0.5)
            left = group_members(proc.pid)
            if left:  # a known bug of import's reader pool (see the report); not ours to keep
                print(f"{len(left)} processes of the killed command still ran: {left}")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            return True
        err.seek(0)
        assert proc.returncode == 0, err.read().decode()
    return False


def startup() -> float:
    """How long the annofs command takes to start (a kill before that proves nothing)."""
    return timed(annofs_cmd("--help"))


def timed(argv: list[str]) -> float:
    """Run a command to its end; how long it took."""
    t = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=300)
    return time.monotonic() - t


def test_kill_9_during_import_applies_all_or_nothing(tmp_path: Path) -> None:
    rnd = random.Random(seed())
    store = tmp_path / "store"
    subprocess.run(annofs_cmd("--store", str(store), "init"), check=True,
                   stdout=subprocess.DEVNULL)
    src = tmp_path / "src"
    host_tree(src, rnd, 1000)
    took = timed(annofs_cmd("--store", str(store), "import", str(src), "/t"))
    state = {"/t": tree_digests(src)}  # what each destination held after its last import
    killed = 0
    for attempt in range(KILLS * 2):
        # Alternately a first import to a new name and a re-import over /t of a changed tree.
        dest = "/t" if attempt % 2 else f"/n{attempt}"
        for f in rnd.sample(sorted(src.rglob("f*")), 300):
            f.write_bytes(rnd.randbytes(rnd.choice([10, 500_000])))
        (src / f"new{attempt}").write_bytes(rnd.randbytes(1_000_000))
        wanted = tree_digests(src)
        before = state.get(dest)
        done = not kill_at_random(annofs_cmd("--store", str(store), "import", str(src), dest),
                                  rnd.uniform(startup(), took))
        killed += not done
        fsck_ok(store)
        got = store_tree(store, dest, tmp_path / "out")
        if done:
            assert got == wanted
        else:
            assert got in (before, wanted), f"a killed import left a partial {dest}"
        state[dest] = got
    print(f"import takes {took:.2f} s; {killed} of {KILLS * 2} killed before the end")
    assert killed, "no import was killed: each finished first"
    res = annofs("--store", str(store), "gc", check=False)  # drops the crashed imports' staging
    assert res.returncode == 0, res.stderr
    fsck_ok(store)
    m = Mount(store, tmp_path / "mnt")
    m.path.mkdir()
    m.start()
    try:
        for dest, tree in state.items():
            if tree is None:
                assert not (m.path / dest[1:]).exists()
            else:
                assert tree_digests(m.path / dest[1:]) == tree
    finally:
        m.stop()
    fsck_ok(store)


def add_garbage(store: Path, rnd: random.Random, n: int = 60_000) -> None:
    """What gc frees, made in process (fast): chains of versions no name refers to, and
    fragments no version took."""
    vol = Volume.open(store)
    try:
        items = [(fragment_hash(data), data)
                 for data in (rnd.randbytes(rnd.randrange(1, 200)) for _ in range(n))]
        vol.fragments.put_many(items)
        with vol.store.write() as txn:
            parent = EMPTY_VERSION
            for i, (h, data) in enumerate(items):
                if i % 2:
                    continue  # an orphan fragment
                if i % 50 == 0:
                    parent = EMPTY_VERSION
                parent = vol.versions.create(txn, parent, h, array("I", [len(data)]), None).id
    finally:
        vol.close()


def group_members(pgid: int) -> list[str]:
    """Processes still in a process group: 'pid command'."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and os.getpgid(int(d.name)) == pgid:
                out.append(f"{d.name} {(d / 'cmdline').read_bytes()[:80]!r}")
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return out


def garbage_store(tmp_path: Path, rnd: random.Random, mounted: bool = False,
                  garbage: int = 60_000) -> tuple[Path, dict[str, str], float]:
    """A store holding a tree and much garbage; how long a whole gc of it takes (offline,
    which ends by compacting the LMDB file, or `mounted`: through a daemon, which does
    not)."""
    store = tmp_path / "store"
    subprocess.run(annofs_cmd("--store", str(store), "init"), check=True,
                   stdout=subprocess.DEVNULL)
    src = tmp_path / "src"
    host_tree(src, rnd, 40)
    subprocess.run(annofs_cmd("--store", str(store), "import", str(src), "/t"),
                   check=True, stdout=subprocess.DEVNULL)
    add_garbage(store, rnd, garbage)
    probe = tmp_path / "probe"
    shutil.copytree(store, probe)
    pm = Mount(probe, tmp_path / "probe-mnt")
    if mounted:
        pm.path.mkdir()
        pm.start()
    try:
        took = timed(annofs_cmd("--store", str(probe), "gc", "--prune-history"))
    finally:
        pm.stop()
    shutil.rmtree(probe)
    return store, tree_digests(src), took


def test_kill_9_during_offline_gc(tmp_path: Path) -> None:
    rnd = random.Random(seed())
    # A third of the daemon test's garbage: offline, gc still outlasts the start-up.
    store, wanted, took = garbage_store(tmp_path, rnd, garbage=20_000)
    killed = 0
    for _ in range(KILLS):
        gc = annofs_cmd("--store", str(store), "gc", "--prune-history")
        killed += kill_at_random(gc, rnd.uniform(startup(), took))
        fsck_ok(store)
        assert store_tree(store, "/t", tmp_path / "out") == wanted
        add_garbage(store, rnd, 20_000)
    print(f"gc takes {took:.2f} s; {killed} of {KILLS} killed before the end")
    assert killed, "gc always finished before the kill"
    res = annofs("--store", str(store), "gc", "--prune-history", check=False)
    assert res.returncode == 0, res.stderr
    fsck_ok(store)


def test_kill_9_of_the_daemon_during_gc(tmp_path: Path) -> None:
    rnd = random.Random(seed())
    store, wanted, took = garbage_store(tmp_path, rnd, mounted=True)
    m = Mount(store, tmp_path / "mnt")
    m.path.mkdir()
    unfinished = 0
    for i in range(KILLS):
        m.start()
        f = m.path / "t" / "d0" / "e0" / "f0"
        data = f"written under the mount before gc {i}".encode()
        fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        wanted["d0/e0/f0"] = blake3.blake3(data).hexdigest()
        gc = subprocess.Popen(annofs_cmd("--store", str(store), "gc", "--prune-history"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(startup(), took))
        unfinished += gc.poll() is None
        m.kill()
        gc.wait(timeout=60)
        fsck_ok(store)
        assert store_tree(store, "/t", tmp_path / "out") == wanted
        add_garbage(store, rnd)
    print(f"gc takes {took:.2f} s; {unfinished} of {KILLS} daemons killed before its end")
    assert unfinished, "gc always finished before the kill"
    m.start()
    try:
        assert tree_digests(m.path / "t") == wanted
    finally:
        m.stop()
    fsck_ok(store)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))
