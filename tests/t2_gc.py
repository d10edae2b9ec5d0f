"""gc: frees what nothing references, keeps history and what copies still use."""

from __future__ import annotations

import io
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from annofs.content.history import ancestry
from annofs.content.ingest import ingest_stream
from annofs.errors import StoreError
from annofs.maintenance.fsck import check_store
from annofs.maintenance.gc import collect
from annofs.store.lock import store_lock
from annofs.transfer.import_tree import TreeImporter
from annofs.volume import Volume


@pytest.fixture
def vol(vol: Volume) -> Iterator[Volume]:
    yield vol
    rep = check_store(vol)
    assert rep.ok, "\n".join(rep.problems)


def stored_bytes(vol: Volume) -> int:
    with vol.store.read() as txn:
        return sum(n for _h, n in vol.fragments.iterate(txn))


def make_tree(root: Path, seed: int = 1, files: int = 20) -> Path:
    rnd = random.Random(seed)
    for i in range(files):
        d = root / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rnd.randbytes(rnd.choice([100, 5000, 70000])))
    return root


def remove(vol: Volume, path: list[bytes]) -> None:
    with vol.store.write() as txn:
        vol.namespace.remove_tree(txn, vol.namespace.writable_dir(txn, path[:-1]), path[-1])


def test_copy_keeps_what_it_uses_then_everything_goes(vol: Volume, tmp_path: Path) -> None:
    TreeImporter(vol).run(make_tree(tmp_path / "src"), [b"a"])
    with vol.store.write() as txn:
        vol.namespace.copy(txn, [b"a"], [b"b"])
    before = stored_bytes(vol)
    assert before > 0
    remove(vol, [b"a"])
    rep = collect(vol)
    assert rep.bytes_freed == 0 and stored_bytes(vol) == before
    remove(vol, [b"b"])
    rep = collect(vol)
    assert stored_bytes(vol) == 0
    assert rep.bytes_freed == before


def test_history_is_kept_unless_pruned(vol: Volume, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    f = src / "file"
    rnd = random.Random(3)
    for _ in range(3):
        f.write_bytes(rnd.randbytes(50_000))
        os.utime(f, ns=(rnd.randrange(1 << 40), rnd.randrange(1 << 40)))
        TreeImporter(vol).run(src, [b"s"])
    with vol.store.read() as txn:
        head = int(vol.namespace.resolve(txn, [b"s", b"file"]).target)
        assert len(ancestry(txn, vol.versions, head)) == 4  # three imports + the empty root
    collect(vol)
    with vol.store.read() as txn:
        assert len(ancestry(txn, vol.versions, head)) == 4
    rep = collect(vol, prune_history=True)
    assert rep.versions_freed == 2 and rep.bytes_freed >= 100_000
    with vol.store.read() as txn:
        chain = ancestry(txn, vol.versions, head)
    assert [v.id for v in chain] == [head, 0]
    assert chain[0].edit is not None and chain[0].edit.removed == 0  # re-derived from the root


def test_crash_leftovers_are_freed(vol: Volume) -> None:
    # A crashed import: fragments stored but never used, and its staging tree left behind.
    ingest_stream(vol.store, vol.fragments, io.BytesIO(random.Random(5).randbytes(200_000)),
                  vol.params)
    with vol.store.write() as txn:
        vol.namespace.make_staging_root(txn, 0, 0)
    rep = collect(vol)
    assert rep.staging_dropped == 1
    assert rep.bytes_freed == 200_000 and stored_bytes(vol) == 0
    with vol.store.read() as txn:
        assert vol.namespace.staging_roots(txn) == []


def test_gc_needs_the_store_to_itself(vol: Volume, store_dir: Path) -> None:
    with (store_lock(store_dir, exclusive=False, what="import"),
          pytest.raises(StoreError, match="busy"),
          store_lock(store_dir, exclusive=True, what="gc")):
        pass
    with store_lock(store_dir, exclusive=True, what="gc"):
        pass


def test_unreferenced_version_of_a_removed_file_is_freed(vol: Volume, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", files=3)
    TreeImporter(vol).run(src, [b"a"])
    with vol.store.read() as txn:
        a = vol.namespace.resolve(txn, [b"a", b"d0", b"f0"])
    assert stat.S_ISREG(a.mode)
    remove(vol, [b"a", b"d0", b"f0"])
    rep = collect(vol)
    assert rep.versions_freed == 1
    with vol.store.read() as txn:
        assert not vol.versions.exists(txn, int(a.target))


def test_a_small_edit_touches_few_reference_counts(vol: Volume) -> None:
    from array import array

    from annofs.content.fragments import fragment_hash
    from annofs.content.versions import EMPTY_VERSION

    chunks = [random.Random(i).randbytes(100) for i in range(2000)]
    hashes = b"".join(fragment_hash(c) for c in chunks)
    lengths = array("I", [100] * 2000)
    changed = random.Random(50_000).randbytes(100)  # a seed no base chunk used
    vol.fragments.put_many([*zip([hashes[i:i + 32] for i in range(0, len(hashes), 32)],
                                 chunks, strict=True), (fragment_hash(changed), changed)])
    with vol.store.write() as txn:
        base = vol.versions.create(txn, EMPTY_VERSION, hashes, lengths, None)
    with vol.store.read() as txn:
        before = vol.fragments.refcount(txn, fragment_hash(changed))
    edited = hashes[:1000 * 32] + fragment_hash(changed) + hashes[1001 * 32:]
    with vol.store.write() as txn:
        snapshot = dict(vol.fragments.refcounts(txn))
        v = vol.versions.create(txn, base.id, edited, lengths, None)
        after = dict(vol.fragments.refcounts(txn))
    assert v.edit is not None and (v.edit.start, v.edit.removed, v.edit.added) == (1000, 1, 1)
    assert [h for h in after if after[h] != snapshot.get(h)] == [fragment_hash(changed)]
    assert before == 0
    collect(vol, prune_history=True, extra_roots={v.id})  # the base goes; v owns it all
    with vol.store.read() as txn:
        assert not vol.versions.exists(txn, base.id)
        assert vol.versions.get(txn, v.id).parent == EMPTY_VERSION
