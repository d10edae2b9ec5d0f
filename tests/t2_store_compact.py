"""Compacting the LMDB file (store.compact): nothing lost, only when alone, crash-safe."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
from conftest import annofs_cmd
from t2_packs import _KILL_POINTS

import annofs.store.compact as compact
from annofs.maintenance.fsck import check_store
from annofs.store.compact import compact_store, env_usage
from annofs.store.env import open_env_readonly, read_synced_meta, write_synced_meta
from annofs.store.lock import store_lock
from annofs.transfer.export_tree import TreeExporter
from annofs.transfer.import_tree import TreeImporter
from annofs.volume import Volume


def write_tree(root: Path, seed: int, n: int = 60) -> dict[str, bytes]:
    """n small files whose contents depend on seed (each release changes every file)."""
    files = {}
    for i in range(n):
        data = (f"file {i} release {seed}\n" * (50 + i)).encode()
        (root / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 4}" / f"f{i}.txt").write_bytes(data)
        files[f"d{i % 4}/f{i}.txt"] = data
    return files


def _free_pages(vol: Volume) -> None:
    """Leave ~3 MiB of free pages in the file: a big value written, then deleted (LMDB
    keeps the pages it had, free)."""
    with vol.store.write() as txn:
        vol.store.put_meta(txn, "scratch", os.urandom(3 << 20))
    with vol.store.write() as txn:
        txn.delete(b"scratch", db=vol.store.db["meta"])


def churn(store: Path, tmp: Path, releases: int = 4) -> dict[str, bytes]:
    """Import several releases to one path, then free pages: a big value written and
    deleted (LMDB keeps its pages in the file, free). Returns the last release."""
    vol = Volume.open(store, create=True)
    try:
        for r in range(releases):
            files = write_tree(tmp / f"rel{r}", r)
            TreeImporter(vol).run(tmp / f"rel{r}", [b"src"])
        _free_pages(vol)
    finally:
        vol.close()
    return files


def all_records(store: Path) -> dict[bytes, list[tuple[bytes, bytes]]]:
    env = open_env_readonly(store)
    try:
        out = {}
        with env.begin() as txn:
            for name, _ in list(txn.cursor()):
                db = env.open_db(name, txn=txn, create=False)
                out[bytes(name)] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
        return out
    finally:
        env.close()


def tree_ok(store: Path, files: dict[str, bytes], out: Path) -> None:
    vol = Volume.open(store)
    try:
        TreeExporter(vol).run([b"src"], out)
        assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
                if p.is_file()} == files
        rep = check_store(vol, verify_data=True)
        assert rep.ok, rep.problems
    finally:
        vol.close()


def test_compaction_keeps_every_record_and_gives_free_pages_back(tmp_path: Path) -> None:
    store = tmp_path / "s"
    files = churn(store, tmp_path)
    before = all_records(store)
    size = (store / "db" / "data.mdb").stat().st_size
    env = open_env_readonly(store)
    try:
        usage = env_usage(env)
    finally:
        env.close()
    assert usage.free_pages * usage.page_size >= 3 << 20
    txnid = usage_txnid(store)
    rep = compact_store(store)
    assert rep is not None and rep.before == size
    # The numbering of transactions goes on (a process that was waiting to open the store
    # during the swap keeps the old file's last id in LMDB's lock file).
    assert usage_txnid(store) == txnid
    assert rep.after < size - (3 << 20)
    assert (store / "db" / "data.mdb").stat().st_size == rep.after
    assert all_records(store) == before
    assert not (store / "db" / "compact.tmp").exists()
    tree_ok(store, files, tmp_path / "out")
    # The compacted store takes writes, and a machine crash after them comes back to its
    # own last sync (the saved synced state is of the new file, not of the old one).
    vol = Volume.open(store)
    try:
        more = write_tree(tmp_path / "rel9", 9)
        TreeImporter(vol).run(tmp_path / "rel9", [b"src"])
    finally:
        vol.close()
    rebooted(store)
    tree_ok(store, more, tmp_path / "out2")
    assert compact_store(store) is None  # nothing worth giving back now


def usage_txnid(store: Path) -> int:
    env = open_env_readonly(store)
    try:
        return env.info()["last_txnid"]
    finally:
        env.close()


def rebooted(store: Path) -> None:
    """What opening after a machine crash does: the saved synced state is put back."""
    saved = read_synced_meta(store)
    if saved is not None:
        write_synced_meta(store, dataclasses.replace(saved, seq=saved.seq + 1,
                                                     boot="a boot before the crash"))


def test_a_failed_copy_leaves_the_store_as_it_was(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s"
    files = churn(store, tmp_path)
    records = all_records(store)
    ino = (store / "db" / "data.mdb").stat().st_ino

    def full(env: lmdb.Environment, tmp: Path, txnid: int) -> None:
        tmp.mkdir()
        (tmp / "data.mdb").write_bytes(b"half a copy")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compact, "_write_copy", full)
    with pytest.raises(OSError, match="No space"):
        compact_store(store)
    assert (store / "db" / "data.mdb").stat().st_ino == ino
    assert not (store / "db" / "compact.tmp").exists()
    assert all_records(store) == records
    tree_ok(store, files, tmp_path / "out")


def test_nothing_happens_while_this_process_has_the_store_open(tmp_path: Path) -> None:
    """LMDB's file locks do not keep a process from itself: a Store of this process would
    go on with the old file's pages."""
    store = tmp_path / "s"
    churn(store, tmp_path)
    ino = (store / "db" / "data.mdb").stat().st_ino
    vol = Volume.open(store)
    try:
        assert compact_store(store) is None
        assert (store / "db" / "data.mdb").stat().st_ino == ino
    finally:
        vol.close()
    assert compact_store(store) is not None


def test_nothing_happens_while_a_writer_holds_the_store_lock(tmp_path: Path) -> None:
    store = tmp_path / "s"
    churn(store, tmp_path)
    ino = (store / "db" / "data.mdb").stat().st_ino
    with store_lock(store, exclusive=False, what="import"):
        assert compact_store(store) is None
    assert (store / "db" / "data.mdb").stat().st_ino == ino


def test_nothing_happens_while_another_process_has_the_store_open(tmp_path: Path) -> None:
    """A reader that takes no lock (annofs log, nix serve) would keep reading the old file
    after a swap: compaction waits until nobody has the environment open."""
    store = tmp_path / "s"
    churn(store, tmp_path)
    ino = (store / "db" / "data.mdb").stat().st_ino
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys; from annofs.volume import Volume; "
         "v = Volume.open(sys.argv[1]); print('open', flush=True); sys.stdin.read()",
         str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "open\n"
        assert compact_store(store) is None
        assert (store / "db" / "data.mdb").stat().st_ino == ino
    finally:
        reader.communicate("")
    assert compact_store(store) is not None  # alone now
    assert (store / "db" / "data.mdb").stat().st_ino != ino


_COMPACT = """
import os, signal, sys
from pathlib import Path
import annofs.store.compact as compact
""" + _KILL_POINTS + """
for owner, name in [(compact, "_write_copy"), (compact, "_set_txnid"),
                    (compact, "_fsync_file"), (compact, "fsync_dir"), (os, "unlink"),
                    (os, "rename")]:
    wrap(owner, name)
print(compact.compact_store(Path(sys.argv[1])), flush=True)
"""


def test_kill_9_or_a_machine_crash_at_every_step_loses_nothing(tmp_path: Path) -> None:
    store = tmp_path / "s"
    files = churn(store, tmp_path)
    records = all_records(store)
    size = (store / "db" / "data.mdb").stat().st_size
    kills = 0
    for k in range(1, 60):
        child = subprocess.run([sys.executable, "-c", _COMPACT, str(store), str(k)],
                               capture_output=True, text=True, timeout=120)
        if child.returncode == 0:  # done (None: a killed run had swapped the file in)
            assert child.stdout.startswith(("CompactReport(", "None")), child.stdout
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        kills += 1
        # Killed, then the machine restarted: whichever file is there, with whatever synced
        # state is saved beside it, must open whole.
        rebooted(store)
        assert all_records(store) == records
        tree_ok(store, files, tmp_path / f"out{k}")
    else:
        raise AssertionError("compaction never finished")
    assert kills >= 8, "few kill points: the test proved little"
    assert (store / "db" / "data.mdb").stat().st_size < size - (3 << 20)
    assert all_records(store) == records
    assert not (store / "db" / "compact.tmp").exists()


def test_gc_and_import_commands_compact_when_alone(tmp_path: Path) -> None:
    store = tmp_path / "s"
    churn(store, tmp_path)
    env = {**os.environ, "ANNOFS_STORE": str(store)}
    size = (store / "db" / "data.mdb").stat().st_size
    subprocess.run(annofs_cmd("gc"), env=env, check=True, capture_output=True)
    after_gc = (store / "db" / "data.mdb").stat().st_size
    assert after_gc < size - (2 << 20)
    vol = Volume.open(store)
    try:
        _free_pages(vol)
    finally:
        vol.close()
    assert (store / "db" / "data.mdb").stat().st_size > after_gc + (2 << 20)
    files = write_tree(tmp_path / "new", 7)
    subprocess.run(annofs_cmd("import", str(tmp_path / "new"), "/src"), env=env, check=True,
                   capture_output=True)
    assert (store / "db" / "data.mdb").stat().st_size < after_gc + (1 << 20)
    tree_ok(store, files, tmp_path / "out")


def test_lmdb_usage_accounts_for_every_page(tmp_path: Path) -> None:
    store = tmp_path / "s"
    churn(store, tmp_path, releases=2)
    env = lmdb.open(str(store / "db"), readonly=True, max_dbs=32, lock=False)
    try:
        u = env_usage(env)
    finally:
        env.close()
    assert {"versions", "fragindex", "entries", "(main)"} <= set(u.dbs)
    assert u.used_pages + u.free_pages == u.file_pages
    assert u.dbs["fragindex"].entries > 0
    assert u.lines()[-1].startswith("free pages ")
