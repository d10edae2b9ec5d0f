"""The fragment store's packs (content.fragments over store.packs): fragments compressed
with zstd unless that does not shrink them, appended to packs that are sealed under their
own hash, one writer per pack (a killed writer's pack is taken over and cut back to what
the index points at), and stores of format 3 converted by `annofs upgrade`."""

from __future__ import annotations

import dataclasses
import io
import os
import random
import signal
import stat
import subprocess
import sys
from pathlib import Path

import blake3
import lmdb
import pytest
from conftest import annofs_cmd
from store_damage import damage, evict_packs

import annofs.store.packs as packs_mod
from annofs.content.fragments import fragment_hash
from annofs.content.ingest import ingest_stream
from annofs.errors import CorruptionError
from annofs.maintenance.fsck import check_store
from annofs.maintenance.gc import collect
from annofs.store.env import read_synced_meta, write_synced_meta
from annofs.store.packs import all_packs
from annofs.transfer.export_tree import TreeExporter
from annofs.transfer.import_tree import TreeImporter
from annofs.volume import Volume


def text(seed: int, n: int) -> bytes:
    """Compressible bytes (words from a small vocabulary), different for each seed."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randrange(2, 8)).hex().encode() for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


def items(data: bytes, size: int = 16384) -> list[tuple[bytes, bytes]]:
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    return [(fragment_hash(c), c) for c in chunks]


def packs_of(vol: Volume) -> list[packs_mod.PackRecord]:
    with vol.store.read() as txn:
        return list(all_packs(txn, vol.store.db["packs"]))


def stored_total(vol: Volume) -> int:
    with vol.store.read() as txn:
        return sum(n for _h, n in vol.fragments.iterate(txn))


def test_compressible_fragments_are_stored_compressed_and_read_back(vol: Volume) -> None:
    data = text(1, 1 << 20)
    frags = items(data)
    assert vol.fragments.put_many(frags) == len(data)
    assert vol.fragments.put_many(frags) == 0  # stored once
    assert stored_total(vol) < len(data) // 2
    with vol.store.read() as txn:
        assert b"".join(vol.fragments.get(txn, h) for h, _ in frags) == data
    assert check_store(vol).ok


def test_incompressible_fragments_are_kept_raw(vol: Volume) -> None:
    data = random.Random(2).randbytes(1 << 20)
    frags = items(data)
    vol.fragments.put_many(frags)
    assert stored_total(vol) == len(data)  # not a byte more than the data
    with vol.store.read() as txn:
        for h, c in frags:
            assert vol.fragments.get(txn, h) == c


def test_a_batch_compressed_in_threads_is_appended_in_its_order(vol: Volume) -> None:
    # Large enough to be compressed in runs on several threads (content.workers): the
    # pack still holds the records in the order given, each with the right codec.
    frags = []
    for i in range(64):
        frags += items(text(i, 1 << 16) if i % 2 else random.Random(i).randbytes(1 << 16))
    assert vol.fragments.put_many(frags) == sum(len(c) for _h, c in frags)
    (pack,) = packs_of(vol)
    fd = os.open(vol.store.path / "packs" / pack.name, os.O_RDONLY)
    try:
        records = list(packs_mod.read_records(fd, pack.end))
    finally:
        os.close(fd)
    assert [h for _at, h, _codec, _stored in records] == [h for h, _c in frags]
    for (_at, _h, codec, stored), (_h2, c) in zip(records, frags, strict=True):
        assert (codec == 1) == (len(stored) < len(c))  # zstd only where it shrank
    with vol.store.read() as txn:
        assert all(vol.fragments.get(txn, h) == c for h, c in frags)
    assert check_store(vol).ok


def test_a_files_fragments_are_read_in_runs_across_packs(
        vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file's fragments lie back to back in its packs: a read of many of them is one
    # pread per pack they are in, each fragment still checked on its own.
    monkeypatch.setattr(packs_mod, "PACK_TARGET", 512 << 10)
    data = random.Random(8).randbytes(3 << 20) + text(9, 1 << 20)
    got = ingest_stream(vol.store, vol.fragments, io.BytesIO(data), vol.params)
    hashes = [got.hashes[i:i + 32] for i in range(0, len(got.hashes), 32)]
    assert len(packs_of(vol)) >= 6
    preads: list[int] = []
    real = packs_mod.PackFiles.pread

    def counted(self: packs_mod.PackFiles, txn: object, pack: int, offset: int,
                length: int, *, nowait: bool = False) -> bytes | bytearray:
        preads.append(length)
        return real(self, txn, pack, offset, length, nowait=nowait)  # type: ignore[arg-type]

    monkeypatch.setattr(packs_mod.PackFiles, "pread", counted)
    with vol.store.read() as txn:
        frags = vol.fragments.get_many(txn, hashes + hashes[:3])  # and some again
        assert b"".join(frags[:len(hashes)]) == data
        assert [bytes(f) for f in frags[len(hashes):]] == [bytes(f) for f in frags[:3]]
    assert len(hashes) > 4 * len(preads) > 0


def test_a_read_that_must_not_wait_for_the_disk_says_so(vol: Volume) -> None:
    # The mount reads on its event loop only what the page cache holds (RWF_NOWAIT), and
    # in a thread what must come from the disk: NotCached tells it which.
    data = random.Random(5).randbytes(1 << 20) + text(6, 1 << 20)
    got = ingest_stream(vol.store, vol.fragments, io.BytesIO(data), vol.params)
    hashes = [got.hashes[i:i + 32] for i in range(0, len(got.hashes), 32)]
    evict_packs(vol)
    with vol.store.read() as txn:
        with pytest.raises(packs_mod.NotCached):
            vol.fragments.get_many(txn, hashes, nowait=True)
        assert b"".join(vol.fragments.get_many(txn, hashes)) == data  # from the disk
        assert b"".join(vol.fragments.get_many(txn, hashes, nowait=True)) == data
        # A byte flipped on the disk is an error whichever way the bytes were read.
        undo = damage(vol, hashes[3], "bit-flip")
        try:
            with pytest.raises(CorruptionError, match=hashes[3].hex()):
                vol.fragments.get_many(txn, hashes, nowait=True)
        finally:
            undo()


def test_reads_that_must_not_wait_work_on_a_store_in_tmpfs(tmp_path: Path) -> None:
    # tmpfs answers RWF_NOWAIT with EOPNOTSUPP (Linux 6.18): a plain read there, and
    # a short pack is still an error, not short bytes.
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        vol = Volume.open(mnt / "store", create=True)
        try:
            data = text(7, 1 << 20)
            got = ingest_stream(vol.store, vol.fragments, io.BytesIO(data), vol.params)
            hashes = [got.hashes[i:i + 32] for i in range(0, len(got.hashes), 32)]
            with vol.store.read() as txn:
                assert b"".join(vol.fragments.get_many(txn, hashes, nowait=True)) == data
            undo = damage(vol, hashes[-1], "truncated-pack")
            try:
                with vol.store.read() as txn, pytest.raises(CorruptionError):
                    vol.fragments.get_many(txn, hashes, nowait=True)
            finally:
                undo()
        finally:
            vol.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _fetched_and_checked(vol: Volume, txn: lmdb.Transaction,
                         hashes: list[bytes]) -> list[bytes | memoryview]:
    """get_many in two steps: the read (in the transaction), then the check (none)."""
    return vol.fragments.check_stored(vol.fragments.fetch_stored(txn, hashes))


@pytest.mark.parametrize("read", ["get_many", "fetch_stored + check_stored"])
def test_a_flipped_byte_anywhere_in_a_run_is_an_error_naming_its_fragment(
        vol: Volume, read: str) -> None:
    # get_many checks each fragment of a run read with one pread: raw ones inline, the
    # compressed ones through their codec; check_stored decompresses all of a call's
    # compressed ones at once. A flipped byte in the first, a middle or the last
    # fragment of the run, raw or compressed, is CorruptionError naming that one.
    from annofs.errors import CorruptionError
    get_many = vol.fragments.get_many if read == "get_many" else \
        lambda txn, hashes: _fetched_and_checked(vol, txn, hashes)
    rnd = random.Random(12)
    data = b"".join(rnd.randbytes(16384) if i % 3 else text(i, 16384) for i in range(12))
    pairs = items(data)
    vol.fragments.put_many(pairs)
    hashes = [h for h, _c in pairs]
    with vol.store.read() as txn:
        assert b"".join(get_many(txn, hashes)) == data
        where = {h: vol.fragments.locate(txn, h) for h in hashes}
    assert len({path for path, _o, _n in where.values()}) == 1  # one run, one pack
    for k in (0, 1, 3, 6, len(hashes) - 1):  # compressed ones: 0, 3, 6
        undo = damage(vol, hashes[k], "bit-flip")
        try:
            with vol.store.read() as txn, pytest.raises(CorruptionError) as e:
                get_many(txn, hashes)
            assert hashes[k].hex() in str(e.value)
        finally:
            undo()
    with vol.store.read() as txn:
        assert b"".join(get_many(txn, hashes)) == data


def test_gc_reports_the_stored_bytes_it_frees(vol: Volume, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(text(3, 400_000))
    TreeImporter(vol).run(src, [b"t"])
    stored = stored_total(vol)
    assert 0 < stored < 200_000
    with vol.store.write() as txn:
        d = vol.namespace.writable_dir(txn, [b"t"])
        vol.namespace.remove(txn, d, b"a.txt", want_dir=False)
    rep = collect(vol)
    assert rep.bytes_freed == stored and stored_total(vol) == 0
    (rec,) = packs_of(vol)
    assert rec.live == 0 and rec.end > 0  # dead bytes, until gc compacts the pack
    assert check_store(vol).ok


_READ_ALL = """
import sys
from pathlib import Path
from annofs.volume import Volume
vol = Volume.open(Path(sys.argv[1]))
with vol.store.read() as txn:
    for h, _n in vol.fragments.iterate(txn):
        vol.fragments.get(txn, h)
        print(h.hex())
"""


def test_full_packs_are_sealed_under_their_hash(vol: Volume,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs_mod, "PACK_TARGET", 256 << 10)
    data = random.Random(4).randbytes(1 << 20)
    frags = items(data)
    # A reader's snapshot from before the seals: it must still find the renamed packs.
    with vol.store.read() as old:
        vol.fragments.put_many(frags[:4])
        vol.fragments.put_many(frags[4:])
        pdir = vol.store.path / "packs"
        recs = packs_of(vol)
        # Until a sync makes the seals durable, the old names stay: a machine crash comes
        # back to the synced state, whose records name them.
        assert all((pdir / packs_mod.open_name(r.id)).exists() for r in recs)
        vol.store.sync()
        sealed = [r for r in recs if r.state == packs_mod.SEALED]
        assert len(sealed) >= 3
        pdir = vol.store.path / "packs"
        for r in sealed:
            f = pdir / r.name
            assert blake3.blake3(f.read_bytes()).digest() == r.hash
            assert f.stat().st_size == r.end
            assert stat.S_IMODE(f.stat().st_mode) == 0o400
            assert not (pdir / packs_mod.open_name(r.id)).exists()
        assert sorted(p.name for p in pdir.iterdir()) == sorted(r.name for r in recs)
        assert not vol.fragments.has(old, frags[0][0])
    with vol.store.read() as txn:
        assert b"".join(vol.fragments.get(txn, h) for h, _ in frags) == data
    read = subprocess.run([sys.executable, "-c", _READ_ALL, str(vol.store.path)],
                          capture_output=True, text=True, timeout=60)  # nothing cached there
    assert read.returncode == 0, read.stderr
    assert read.stdout.split() == [h.hex() for h in sorted(h for h, _ in frags)]
    assert check_store(vol).ok


_WRITER = """
import os, signal, sys
from pathlib import Path
from annofs.content.fragments import _shared, fragment_hash
from annofs.volume import Volume
vol = Volume.open(Path(sys.argv[1]))
data = [os.urandom(5000) for _ in range(20)]
vol.fragments.put_many([(fragment_hash(d), d) for d in data])
vol.store.sync()
# Killed between an append and the commit that would index it.
_shared(vol.store).writer.append([b"half-written record " * 500])
print(os.path.getsize(next(Path(sys.argv[1], "packs").iterdir())), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writers_pack_is_taken_over_and_cut_back(
        vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    res = subprocess.run([sys.executable, "-c", _WRITER, str(vol.store.path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr
    (rec,) = packs_of(vol)
    assert int(res.stdout) > rec.end  # the unindexed tail is there
    assert check_store(vol).ok
    d = os.urandom(3000)
    vol.fragments.put_many([(fragment_hash(d), d)])
    (after,) = packs_of(vol)  # the same pack, continued from its indexed end
    assert after.id == rec.id and after.end == rec.end + packs_mod.HEADER.size + 3000
    assert (vol.store.path / "packs" / after.name).stat().st_size == after.end
    with vol.store.read() as txn:
        assert vol.fragments.get(txn, fragment_hash(d)) == d
    rep = check_store(vol, verify_data=True)
    assert rep.ok, rep.problems
    # Filled up and sealed by its new writer: named by the hash of all its bytes, the
    # killed writer's included (this writer did not append them, so cannot have hashed
    # them as it went).
    monkeypatch.setattr(packs_mod, "PACK_TARGET", after.end + (128 << 10))
    vol.fragments.put_many(items(random.Random(6).randbytes(256 << 10)))
    assert_sealed_under_their_hash(vol, 1)


def assert_sealed_under_their_hash(vol: Volume, at_least: int) -> None:
    sealed = [r for r in packs_of(vol) if r.state == packs_mod.SEALED]
    assert len(sealed) >= at_least
    for r in sealed:
        f = vol.store.path / "packs" / r.name
        assert blake3.blake3(f.read_bytes()).digest() == r.hash, r


def test_a_seal_after_an_append_that_never_committed_hashes_the_file(
        vol: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs_mod, "PACK_TARGET", 256 << 10)
    frags = items(random.Random(5).randbytes(1 << 20))
    vol.fragments.put_many(frags[:2])
    real = packs_mod.PackWriter.record

    def fail(*_args: object) -> None:
        raise RuntimeError("injected: the indexing transaction fails")

    monkeypatch.setattr(packs_mod.PackWriter, "record", fail)
    lost = os.urandom(5000)
    with pytest.raises(RuntimeError, match="injected"):
        vol.fragments.put_many([(fragment_hash(lost), lost)])
    monkeypatch.setattr(packs_mod.PackWriter, "record", real)
    # The next append overwrites the bytes that were never indexed.
    vol.fragments.put_many(frags[2:])
    assert_sealed_under_their_hash(vol, 2)
    with vol.store.read() as txn:
        assert not vol.fragments.has(txn, fragment_hash(lost))
        assert all(vol.fragments.get(txn, h) == c for h, c in frags)
    assert check_store(vol, verify_data=True).ok


_CONCURRENT = """
import os, sys
from pathlib import Path
from annofs.content.fragments import fragment_hash
from annofs.content.ingest import ingest_stream
from annofs.volume import Volume
vol = Volume.open(Path(sys.argv[1]))
for i in range(40):
    d = os.urandom(20000)
    vol.fragments.put_many([(fragment_hash(d), d)])
vol.close()
"""


def test_concurrent_writers_append_to_packs_of_their_own(vol: Volume) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(vol.store.path)])
             for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    with vol.store.read() as txn:
        assert vol.fragments.count(txn) == 120
    assert check_store(vol, verify_data=True).ok


def test_a_format_3_store_is_refused_then_upgraded(tmp_path: Path) -> None:
    store = tmp_path / "store"
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    files = {"a.txt": text(5, 300_000), "d/b.bin": random.Random(6).randbytes(200_000),
             "d/empty": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    vol = Volume.open(store, create=True)
    try:
        TreeImporter(vol).run(src, [b"t"])
    finally:
        vol.close()
    make_format_3(store)
    run = lambda *a: subprocess.run(annofs_cmd("--store", str(store), *a),  # noqa: E731
                                    capture_output=True, text=True)
    refused = run("cat", "/t/a.txt")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "annofs --store" in refused.stderr \
        and "upgrade" in refused.stderr, refused.stderr
    up = run("upgrade")
    assert up.returncode == 0, up.stderr
    assert "format 3 -> 5" in up.stdout
    assert run("upgrade").stdout.strip().endswith("already format 5")
    fsck = run("fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    vol = Volume.open(store)
    try:
        with vol.store.read() as txn:
            assert vol.fragments.legacy_count(txn) == 0
        out = tmp_path / "out"
        TreeExporter(vol).run([b"t"], out)
        for name, data in files.items():
            assert (out / name).read_bytes() == data, name
        assert check_store(vol, verify_data=True).ok
    finally:
        vol.close()


def make_format_3(store: Path) -> None:
    """Turn a store into format 3's layout: every fragment an LMDB value in `fragments`,
    its refcount in `fragrefs`, no index, no packs (what an annofs before packs left)."""
    vol = Volume.open(store)
    try:
        with vol.store.read() as txn:
            frags = [(h, vol.fragments.get(txn, h)) for h, _n in vol.fragments.iterate(txn)]
            refs = list(vol.fragments.refcounts(txn))
        assert frags and refs
        db = vol.store.db
        with vol.store.write() as txn:
            for h, data in frags:
                txn.put(h, data, db=db["fragments"])
            for h, n in refs:
                txn.put(h, n.to_bytes(8, "big"), db=db["fragrefs"])
            txn.drop(db["fragindex"], delete=False)
            txn.drop(db["packs"], delete=False)
            txn.delete(b"next:pack", db=db["meta"])
            vol.store.put_meta(txn, "format", b"3")
    finally:
        vol.close()
    for p in (store / "packs").iterdir():
        p.unlink()


def make_format_4(store: Path) -> None:
    """Turn a store into format 4's layout: index records without the refcount (25 bytes),
    each count in `fragrefs`."""
    vol = Volume.open(store)
    try:
        db = vol.store.db
        with vol.store.write() as txn:
            index = [(bytes(h), bytes(raw)) for h, raw in txn.cursor(db=db["fragindex"])]
            assert index
            for h, raw in index:
                n = int.from_bytes(raw[25:], "big")
                txn.put(h, raw[:25], db=db["fragindex"])
                if n:
                    txn.put(h, raw[25:], db=db["fragrefs"])
            vol.store.put_meta(txn, "format", b"4")
    finally:
        vol.close()


def index_records(store: Path) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every record of the fragment index and of format 4's refcounts, raw."""
    from annofs.store.env import open_env_readonly

    env = open_env_readonly(store)
    try:
        with env.begin() as txn:
            return {name: [(bytes(k), bytes(v)) for k, v in
                           txn.cursor(db=env.open_db(name.encode(), txn=txn, create=False))]
                    for name in ("fragindex", "fragrefs")}
    finally:
        env.close()


def test_a_format_4_store_is_refused_then_upgraded_record_for_record(tmp_path: Path) -> None:
    store, src = tmp_path / "store", tmp_path / "src"
    files = pack_tree(src, 24)
    (src / "same1").write_bytes(b"twice" * 1000)  # a fragment counted twice
    (src / "same2").write_bytes(b"twice" * 1000)
    files.update({"same1": b"twice" * 1000, "same2": b"twice" * 1000})
    vol = Volume.open(store, create=True)
    try:
        TreeImporter(vol).run(src, [b"t"])
        vol.fragments.put_many(items(b"stored, but no version took it " * 100))
    finally:
        vol.close()
    before = index_records(store)
    assert before["fragrefs"] == []
    counts = {int.from_bytes(raw[25:], "big") for _h, raw in before["fragindex"]}
    assert {0, 1, 2} <= counts, counts
    make_format_4(store)
    run = lambda *a: subprocess.run(annofs_cmd("--store", str(store), *a),  # noqa: E731
                                    capture_output=True, text=True)
    refused = run("cat", "/t/same1")
    assert refused.returncode == 2 and "store format 4 must be converted first" in \
        refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
    up = run("upgrade")
    assert up.returncode == 0 and "format 4 -> 5" in up.stdout, up.stdout + up.stderr
    assert f"{len(before['fragindex'])} refcounts into the fragment index" in up.stdout
    assert index_records(store) == before  # nothing lost, nothing changed
    fsck = run("fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    vol = Volume.open(store)
    try:
        tree_ok(vol, files, tmp_path / "out")
    finally:
        vol.close()


def pack_tree(root: Path, files: int = 48) -> dict[str, bytes]:
    """A tree of random files (incompressible: the packs fill as the bytes say)."""
    root.mkdir(parents=True)
    out = {}
    for i in range(files):
        out[f"f{i:02d}"] = random.Random(100 + i).randbytes(40_000 + i * 500)
        (root / f"f{i:02d}").write_bytes(out[f"f{i:02d}"])
    return out


def remove_most(vol: Volume, files: dict[str, bytes]) -> dict[str, bytes]:
    """Remove three files in four from /t; returns those left."""
    with vol.store.write() as txn:
        d = vol.namespace.writable_dir(txn, [b"t"])
        for name in files:
            if int(name[1:]) % 4:
                vol.namespace.remove(txn, d, name.encode(), want_dir=False)
    return {n: b for n, b in files.items() if int(n[1:]) % 4 == 0}


def tree_ok(vol: Volume, kept: dict[str, bytes], out: Path) -> None:
    TreeExporter(vol).run([b"t"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept
    rep = check_store(vol, verify_data=True)
    assert rep.ok, rep.problems


def test_gc_compacts_mostly_dead_packs(vol: Volume, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs_mod, "PACK_TARGET", 256 << 10)
    files = pack_tree(tmp_path / "src")
    TreeImporter(vol).run(tmp_path / "src", [b"t"])
    before = sum(f.stat().st_size for f in (vol.store.path / "packs").iterdir())
    kept = remove_most(vol, files)
    rep = collect(vol)
    assert rep.packs_compacted >= 4
    recs = packs_of(vol)
    assert all(r.state != packs_mod.DOOMED for r in recs)  # nothing reads them: deleted
    on_disk = sum(f.stat().st_size for f in (vol.store.path / "packs").iterdir())
    assert sorted(p.name for p in (vol.store.path / "packs").iterdir()) == \
        sorted(r.name for r in recs)
    live = sum(r.live for r in recs)
    assert live >= sum(map(len, kept.values()))
    # What is left: the live bytes, plus under half of each sealed pack not compacted
    # and the tail of the pack being written.
    assert on_disk < live + before // 3, (on_disk, live, before)
    tree_ok(vol, kept, tmp_path / "out")


def test_a_reader_keeps_a_compacted_pack_until_it_is_done(vol: Volume, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(packs_mod, "PACK_TARGET", 256 << 10)
    files = pack_tree(tmp_path / "src", 16)
    TreeImporter(vol).run(tmp_path / "src", [b"t"])
    kept = remove_most(vol, files)
    with vol.store.read() as old:  # a snapshot from before the compaction
        hashes = [h for h, _n in vol.fragments.iterate(old)]
        assert collect(vol).packs_compacted >= 1
        assert any(r.state == packs_mod.DOOMED for r in packs_of(vol))
        for h in hashes:  # every fragment the old snapshot knows still reads
            vol.fragments.get(old, h)
    vol.fragments.drop_doomed()
    assert all(r.state != packs_mod.DOOMED for r in packs_of(vol))
    tree_ok(vol, kept, tmp_path / "out")


# Both child scripts below: killed at the k-th (argv[2]) step boundary, before or after
# each call of the functions `wrap`ped.
_KILL_POINTS = """
k, calls = int(sys.argv[2]), [0]
def point():
    calls[0] += 1
    if calls[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
def wrap(owner, name):
    f = getattr(owner, name)
    def w(*a, **kw):
        point()
        r = f(*a, **kw)
        point()
        return r
    setattr(owner, name, w)
"""

_GC = """
import os, signal, sys
from pathlib import Path
import annofs.store.packs as packs
packs.PACK_TARGET = 256 << 10
from annofs.content.fragments import FragmentStore
from annofs.maintenance.gc import collect
from annofs.store.env import Store
from annofs.volume import Volume

# Killed at the k-th step boundary of the run: before or after each append (a move of
# records and its index switch), seal, sync, doom and unlink.
""" + _KILL_POINTS + """
for owner, name in [(FragmentStore, "_append"), (FragmentStore, "_compact_one"),
                    (FragmentStore, "drop_doomed"), (packs.PackWriter, "seal"),
                    (Store, "sync"), (os, "unlink")]:
    wrap(owner, name)
vol = Volume.open(Path(sys.argv[1]))
print(collect(vol).packs_compacted, flush=True)
vol.close()
"""


def test_kill_9_at_every_step_of_compaction_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs_mod, "PACK_TARGET", 256 << 10)
    store = tmp_path / "store"
    files = pack_tree(tmp_path / "src", 64)
    vol = Volume.open(store, create=True)
    try:
        TreeImporter(vol).run(tmp_path / "src", [b"t"])
        kept = remove_most(vol, files)
    finally:
        vol.close()
    kills = leftovers_seen = 0
    for k in range(1, 400):
        child = subprocess.run([sys.executable, "-c", _GC, str(store), str(k)],
                               capture_output=True, text=True, timeout=120)
        if child.returncode == 0:
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        kills += 1
        vol = Volume.open(store)
        try:
            tree_ok(vol, kept, tmp_path / f"out{k}")
            names = {r.name for r in packs_of(vol)}
            leftover = sum(f.stat().st_size for f in (store / "packs").iterdir()
                           if f.name not in names)
            # fsck counts them as what gc gives back, not as problems.
            leftovers_seen += leftover > 0
            assert check_store(vol).reclaimable.pack_bytes >= leftover
        finally:
            vol.close()
    else:
        raise AssertionError("gc never finished")
    assert kills >= 10 and leftovers_seen, "few kill points: the test proved little"
    vol = Volume.open(store)
    try:
        tree_ok(vol, kept, tmp_path / "out-final")
        recs = packs_of(vol)
        assert all(r.state != packs_mod.DOOMED for r in recs)
        assert sorted(p.name for p in (store / "packs").iterdir()) == \
            sorted(r.name for r in recs)  # leftovers of the killed runs are gone
        on_disk = sum(f.stat().st_size for f in (store / "packs").iterdir())
        assert on_disk < 2 * sum(r.live for r in recs) + (256 << 10)
    finally:
        vol.close()


def test_a_machine_crash_after_a_seal_comes_back_to_the_synced_pack(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seal renames the pack; a machine crash comes back to the synced state, whose
    record still names the pack by its old name: that name must still be there."""
    monkeypatch.setattr(packs_mod, "PACK_TARGET", 256 << 10)
    store = tmp_path / "s"
    vol = Volume.open(store, create=True)
    try:
        first = items(random.Random(9).randbytes(100_000))
        vol.fragments.put_many(first)
        vol.store.sync()
        synced_pages = (store / "db" / "data.mdb").read_bytes()
        saved = read_synced_meta(store)
        vol.store.sync_interval = None  # nothing synced from here: the crash window
        vol.fragments.put_many(items(random.Random(10).randbytes(600_000)))
        assert any(r.state == packs_mod.SEALED for r in packs_of(vol))
        # The page cache: every pack file as written (what the disk may hold after).
        on_disk = {p.name: p.read_bytes() for p in (store / "packs").iterdir()}
    finally:
        vol.close()
    img = tmp_path / "img"
    (img / "db").mkdir(parents=True)
    (img / "db" / "data.mdb").write_bytes(synced_pages)
    assert saved is not None
    write_synced_meta(img, dataclasses.replace(saved, boot="a boot before the crash"))
    (img / "packs").mkdir()
    for name, data in on_disk.items():
        (img / "packs" / name).write_bytes(data)
    vol = Volume.open(img)
    try:
        with vol.store.read() as txn:
            for h, c in first:
                assert vol.fragments.get(txn, h) == c
        assert check_store(vol, verify_data=True).ok
        more = items(random.Random(11).randbytes(50_000))
        vol.fragments.put_many(more)  # takes the pack over, cut back to its synced end
        vol.store.sync()
        vol.fragments.drop_doomed()  # gc's last step: drops the sealed copy the crash undid
        names = {r.name for r in packs_of(vol)}
        assert {p.name for p in (img / "packs").iterdir()} == names
        with vol.store.read() as txn:
            for h, c in first + more:
                assert vol.fragments.get(txn, h) == c
        rep = check_store(vol, verify_data=True)
        assert rep.ok, rep.problems
    finally:
        vol.close()


_UPGRADE = """
import os, signal, sys
from pathlib import Path
from annofs.content.fragments import FragmentStore
from annofs.maintenance.upgrade import upgrade_store
from annofs.store.env import Store

FragmentStore.upgrade_batch.__defaults__ = (60_000,)  # many batches
FragmentStore.merge_refs_batch.__defaults__ = (3,)
""" + _KILL_POINTS + """
for owner, name in [(FragmentStore, "put_many"), (FragmentStore, "upgrade_batch"),
                    (FragmentStore, "merge_refs_batch"), (Store, "sync")]:
    wrap(owner, name)
upgrade_store(Path(sys.argv[1]))
"""


def test_kill_9_at_every_step_of_upgrade_loses_nothing(tmp_path: Path) -> None:
    from annofs.content.fragments import FragmentStore
    from annofs.store.env import open_store

    store, src = tmp_path / "store", tmp_path / "src"
    files = pack_tree(src, 12)
    vol = Volume.open(store, create=True)
    try:
        TreeImporter(vol).run(src, [b"t"])
        with vol.store.read() as txn:
            every = {h for h, _n in vol.fragments.iterate(txn)}
            refs = dict(vol.fragments.refcounts(txn))
    finally:
        vol.close()
    make_format_3(store)
    kills = 0
    for k in range(1, 200):
        child = subprocess.run([sys.executable, "-c", _UPGRADE, str(store), str(k)],
                               capture_output=True, text=True, timeout=120)
        if child.returncode == 0:
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        kills += 1
        s = open_store(store, upgrading=True)  # each fragment in one place or both
        try:
            frags = FragmentStore(s)
            with s.read() as txn:
                moved = {h for h, _n in frags.iterate(txn)}
                left = {bytes(h) for h, _v in txn.cursor(db=s.db["fragments"])}
                # each count in fragrefs until it joins its index record, in one of them
                counts = {h: frags.refcount(txn, h) for h in every}
                counts.update((bytes(h), int.from_bytes(v, "big"))
                              for h, v in txn.cursor(db=s.db["fragrefs"]))
            assert moved | left == every
            assert {h: n for h, n in counts.items() if n} == refs
        finally:
            s.close()
    else:
        raise AssertionError("upgrade never finished")
    assert kills >= 5, "few kill points: the test proved little"
    vol = Volume.open(store)
    try:
        with vol.store.read() as txn:
            assert vol.fragments.legacy_count(txn) == 0
            assert dict(vol.fragments.refcounts(txn)) == refs
            assert txn.stat(vol.store.db["fragrefs"])["entries"] == 0
        tree_ok(vol, files, tmp_path / "out")
    finally:
        vol.close()


def test_a_read_handed_on_unverified_is_whole_fragments_checked_only_by_length(
        vol: Volume) -> None:
    # The mount's large reads go to pyfuse3 as checked replies: whole fragments, their
    # hashes, and the read's place in them; pyfuse3 hashes them before writing a byte.
    # Here: they hold exactly `read`'s bytes at [lo, lo + size); a flipped bit comes
    # through (pyfuse3 catches it) but get_many still refuses it; a range with a hole
    # is not handed on (None: read_parts then); a wrong length is refused here already.
    from annofs.content.versions import EMPTY_VERSION
    from annofs.store.records import HOLE

    data = random.Random(21).randbytes(3 << 20) + text(22, 1 << 20)
    got = ingest_stream(vol.store, vol.fragments, io.BytesIO(data), vol.params)
    with vol.store.write() as txn:
        v = vol.versions.create(txn, EMPTY_VERSION, got.hashes, got.lengths, got.digest)
    rng = random.Random(23)
    for off, size in [(0, 1), (0, len(data)), (5, 1 << 20), (len(data) - 7, 100)] + [
            (rng.randrange(len(data)), rng.randrange(1, 3 << 20)) for _ in range(20)]:
        u = vol.versions.read_unverified_snapshot(v, off, size)
        assert u is not None
        joined = b"".join(u.frags)
        assert joined[u.lo:u.lo + u.size] == data[off:off + size]
        assert u.hashes == b"".join(fragment_hash(f) for f in u.frags)
        assert u.reply() == (u.frags, u.hashes, u.lo, u.size)
        if u.frags:  # whole fragments: the first starts at or before off, the last ends past
            assert 0 <= u.lo < len(u.frags[0]) and u.lo + u.size <= len(joined)
            assert len(joined) - (u.lo + u.size) < len(u.frags[-1])
    # Not handed on (read_parts serves them): at or past the end, or too many fragments
    # for one reply.
    assert vol.versions.read_unverified_snapshot(v, len(data), 1 << 20) is None
    assert vol.versions.read_unverified_snapshot(v, len(data) + 5, 1) is None
    spans = len(vol.versions.read_unverified_snapshot(v, 0, 1 << 20).frags)  # type: ignore[union-attr]
    assert vol.versions.read_unverified_snapshot(v, 0, 1 << 20, max_frags=spans) is not None
    assert vol.versions.read_unverified_snapshot(v, 0, 1 << 20, max_frags=spans - 1) is None
    hashes = [got.hashes[i:i + 32] for i in range(0, len(got.hashes), 32)]
    undo = damage(vol, hashes[2], "bit-flip")
    try:
        u = vol.versions.read_unverified_snapshot(v, 0, 1 << 20)
        assert u is not None and fragment_hash(u.frags[2]) != hashes[2]
        with pytest.raises(CorruptionError, match=hashes[2].hex()):
            vol.versions.read_parts_snapshot(v, 0, 1 << 20)
    finally:
        undo()
    lengths = got.lengths
    with vol.store.write() as txn:
        holed = vol.versions.create(txn, v, HOLE + got.hashes[32:], lengths, None)
        liar = vol.versions.create(txn, v, got.hashes[32:64] + got.hashes[32:],
                                   lengths, None)  # fragment 1's bytes where 0's length is
    assert vol.versions.read_unverified_snapshot(holed, 0, 1 << 20) is None
    assert vol.versions.read_unverified_snapshot(holed, lengths[0], 1 << 20) is not None
    assert lengths[0] != lengths[1]  # (seeded data: so the liar's first length is wrong)
    with pytest.raises(CorruptionError, match="bytes, the version"):
        vol.versions.read_unverified_snapshot(liar, 0, 1 << 20)
