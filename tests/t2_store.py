"""The store, content and namespace layers, called directly on a real LMDB store.

Every test that uses `vol` ends with `check_consistency(vol)`: the reference counts and
link counts the layers keep must always agree with what is actually stored.
"""

from __future__ import annotations

import dataclasses
import io
import random
import stat
from array import array
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from store_damage import KINDS, damage

from annofs.content import workers
from annofs.content.history import ancestry
from annofs.content.ingest import ingest_stream
from annofs.content.versions import EMPTY_DIGEST, EMPTY_VERSION
from annofs.errors import (
    CorruptionError,
    ExistsError,
    InvalidOperationError,
    IsADirectoryError_,
    NameTooLongError,
    NotADirectoryError_,
    NotEmptyError,
    NotFoundError,
    StoreError,
    UsageError,
)
from annofs.maintenance.fsck import check_store
from annofs.namespace.tree import new_file_attrs
from annofs.store import FORMAT_VERSION
from annofs.store.keys import HASH_SIZE, u64
from annofs.store.records import (
    Attrs,
    DirHeader,
    Link,
    Version,
    encode_dir,
    encode_link,
    encode_version,
)
from annofs.volume import Volume
from chunker import DEFAULT_PARAMS, ChunkParams, cut_lengths

# -- the consistency check -----------------------------------------------------------------


def check_consistency(vol: Volume) -> None:
    """Fail unless `annofs fsck`'s checker finds the store consistent."""
    rep = check_store(vol)
    assert rep.ok, "store inconsistent:\n" + "\n".join(rep.problems)


@pytest.fixture
def vol(vol: Volume) -> Iterator[Volume]:
    """The conftest store, checked for consistency after the test."""
    yield vol
    check_consistency(vol)


# -- helpers -------------------------------------------------------------------------------

REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def store_bytes(vol: Volume, data: bytes, parent: int = EMPTY_VERSION,
                digest: bool = True) -> Version:
    """Chunk and store `data` as a new version derived from `parent`."""
    got = ingest_stream(vol.store, vol.fragments, io.BytesIO(data), vol.params)
    with vol.store.write() as txn:
        return vol.versions.create(txn, parent, got.hashes, got.lengths,
                                   got.digest if digest else None)


def read_all(vol: Volume, v: Version) -> bytes:
    with vol.store.read() as txn:
        return vol.versions.read(txn, v, 0, v.size)


def file_attrs(v: Version) -> Attrs:
    return dataclasses.replace(new_file_attrs(REG, 0, 0), target=v.id, size=v.size)


def dir_attrs() -> Attrs:
    return new_file_attrs(DIR, 0, 0)


def P(path: str) -> list[bytes]:
    return [p.encode() for p in path.strip("/").split("/") if p]


def dump_tree(vol: Volume, path: str = "/") -> dict[str, tuple]:
    """Every entry below `path`: relative path -> (type, mode, size, content or target)."""
    out: dict[str, tuple] = {}
    with vol.store.read() as txn:
        ns = vol.namespace

        def walk(dir_id: int, prefix: str) -> None:
            for name, a in ns.listdir(txn, dir_id):
                rel = prefix + name.decode(errors="surrogateescape")
                if a.is_dir:
                    out[rel] = ("d", a.mode, 0, None)
                    walk(int(a.target), rel + "/")
                elif a.is_reg:
                    v = vol.versions.get(txn, int(a.target))
                    out[rel] = ("f", a.mode, a.size, vol.versions.read(txn, v, 0, v.size))
                else:
                    out[rel] = ("o", a.mode, a.size, a.target)

        top = ns.resolve(txn, P(path))
        walk(int(top.target), "")
    return out


def count_rows(vol: Volume, name: str) -> int:
    with vol.store.read() as txn:
        return txn.stat(vol.store.db[name])["entries"]


def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- fragments -----------------------------------------------------------------------------


def test_same_bytes_are_stored_once(vol: Volume) -> None:
    data = rand(1, 300_000)
    got1 = ingest_stream(vol.store, vol.fragments, io.BytesIO(data), vol.params)
    got2 = ingest_stream(vol.store, vol.fragments, io.BytesIO(data), vol.params)
    assert got1.new_bytes == len(data) and got2.new_bytes == 0
    assert got1.hashes == got2.hashes and got1.digest == blake3.blake3(data).digest()
    with vol.store.write() as txn:
        v1 = vol.versions.create(txn, EMPTY_VERSION, got1.hashes, got1.lengths, got1.digest)
        v2 = vol.versions.create(txn, EMPTY_VERSION, got2.hashes, got2.lengths, got2.digest)
    assert v1.id != v2.id
    nfrag = len(set(v1.hashes[i : i + HASH_SIZE] for i in range(0, len(v1.hashes), HASH_SIZE)))
    assert count_rows(vol, "fragindex") == nfrag
    with vol.store.read() as txn:
        assert all(vol.fragments.refcount(txn, v1.fragment_hash(i)) == 2 for i in range(v1.count))
    assert read_all(vol, v1) == read_all(vol, v2) == data


class _Unseekable(io.RawIOBase):
    """A stream that can only be read (a pipe's): no size to fit a buffer to."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        return self._f.readinto(b)


@pytest.mark.parametrize("seekable", [True, False])
def test_a_stream_of_several_blocks_from_where_it_stands(vol: Volume, seekable: bool) -> None:
    # Several chunker blocks (each hashed whole in a pool thread while this one hashes its
    # fragments); a seekable stream read from its current position, not its start.
    data = rand(7, (9 << 20) + 12345)
    stream: io.RawIOBase | io.BytesIO
    if seekable:
        stream = io.BytesIO(b"skipped" + data)
        stream.seek(7)
    else:
        stream = _Unseekable(data)
    got = ingest_stream(vol.store, vol.fragments, stream, vol.params)  # type: ignore[arg-type]
    assert got.size == len(data) and got.digest == blake3.blake3(data).digest()
    assert list(got.lengths) == cut_lengths(data, vol.params)
    at = 0
    with vol.store.read() as txn:
        for i, n in enumerate(got.lengths):
            h = got.hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE]
            assert vol.fragments.get(txn, h) == data[at:at + n]
            at += n


def test_a_stream_is_stored_alike_without_a_thread_pool(vol: Volume,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = rand(8, 6 << 20)
    with monkeypatch.context() as m:
        m.setattr(workers, "helpers", lambda: 0)  # one CPU: everything on the caller
        assert workers.pool() is None
        alone = ingest_stream(vol.store, vol.fragments, io.BytesIO(data), vol.params)
    assert alone.new_bytes == len(data) and alone.digest == blake3.blake3(data).digest()
    v = store_bytes(vol, data)
    assert v.hashes == alone.hashes and read_all(vol, v) == data


def test_repeated_fragment_within_a_file_is_stored_once(vol: Volume) -> None:
    data = bytes(1 << 20)  # zeros: every fragment is cut at max_size and identical
    v = store_bytes(vol, data)
    assert v.count == (1 << 20) // vol.params.max_size
    assert count_rows(vol, "fragindex") == 1
    with vol.store.read() as txn:
        assert vol.fragments.refcount(txn, v.fragment_hash(0)) == v.count
    assert read_all(vol, v) == data


def test_read_ranges(vol: Volume) -> None:
    data = rand(2, 250_000)
    v = store_bytes(vol, data)
    assert v.count > 3
    with vol.store.read() as txn:
        starts = [0]
        for n in v.lengths:
            starts.append(starts[-1] + n)
        cases = [(0, 1), (0, len(data)), (starts[1] - 3, 10), (starts[2], starts[3] - starts[2]),
                 (len(data) - 5, 100), (len(data), 10), (len(data) + 7, 1), (12345, 0),
                 (starts[1], 3 * 65536)]
        for off, n in cases:
            assert vol.versions.read(txn, v, off, n) == data[off : off + n], (off, n)


def test_version_delete_drops_unshared_fragments(vol: Volume) -> None:
    a = rand(3, 200_000)
    b = a[:100_000] + rand(4, 100_000)
    va, vb = store_bytes(vol, a), store_bytes(vol, b)
    with vol.store.write() as txn:
        freed = vol.versions.delete(txn, vb)
    assert 0 < freed < 150_000  # only what b did not share with a
    assert read_all(vol, va) == a
    with vol.store.read() as txn:
        assert not vol.versions.exists(txn, vb.id)


@pytest.mark.parametrize("kind", KINDS)
def test_corrupted_fragment_is_never_data(vol: Volume, kind: str) -> None:
    data = rand(5, 200_000)
    v = store_bytes(vol, data, digest=False)
    bad = 1
    undo = damage(vol, v.fragment_hash(bad), kind)
    start = sum(v.lengths[:bad])
    with vol.store.read() as txn:
        named = "file .* missing" if kind == "pack-missing" else v.fragment_hash(bad).hex()
        with pytest.raises(CorruptionError, match=named):
            vol.versions.read(txn, v, 0, v.size)
        with pytest.raises(CorruptionError):
            vol.versions.read(txn, v, start + 10, 1)
        with pytest.raises(CorruptionError):
            vol.fragments.get(txn, v.fragment_hash(bad))
        with pytest.raises(CorruptionError):
            b"".join(vol.versions.iter_bytes(txn, v))
        with pytest.raises(CorruptionError):
            vol.versions.compute_digest(txn, v)
        # Fragments around it are checked on their own and still readable (unless the
        # whole pack is gone).
        if kind != "pack-missing":
            assert vol.versions.read(txn, v, 0, start) == data[:start]
    with pytest.raises(CorruptionError):
        vol.versions.ensure_digest(v)
    with vol.store.read() as txn:
        assert vol.versions.get(txn, v.id).digest is None  # nothing recorded from bad data
    # Repaired, it reads again (and the store is whole for the consistency check).
    undo()
    assert read_all(vol, v) == data


# -- the edit graph ------------------------------------------------------------------------


def _hash_list(v: Version) -> list[bytes]:
    return [v.fragment_hash(i) for i in range(v.count)]


def test_create_with_parent_records_the_edit(vol: Volume) -> None:
    a = rand(6, 400_000)
    b = bytearray(a)
    b[200_000:200_010] = b"0123456789"
    v1 = store_bytes(vol, a)
    v2 = store_bytes(vol, bytes(b), parent=v1.id)
    assert v2.parent == v1.id and v2.id > v1.id
    old, new = _hash_list(v1), _hash_list(v2)
    prefix = next(i for i in range(len(old)) if old[i] != new[i])
    suffix = next(i for i in range(1, len(old)) if old[-i] != new[-i]) - 1
    assert v2.edit is not None
    assert v2.edit.start == prefix > 0
    assert v2.edit.removed == len(old) - prefix - suffix
    assert v2.edit.added == len(new) - prefix - suffix
    assert 1 <= v2.edit.removed <= 3 and 1 <= v2.edit.added <= 3
    # The first version's edit replaces the (empty) root's nothing with everything.
    assert v1.edit is not None
    assert (v1.edit.start, v1.edit.removed, v1.edit.added) == (0, 0, v1.count)
    # Stored, it reads back the same and directly (no replay).
    with vol.store.read() as txn:
        got = vol.versions.get(txn, v2.id)
    assert got.edit == v2.edit and got.parent == v1.id
    assert read_all(vol, got) == bytes(b)


def test_edits_at_both_ends(vol: Volume) -> None:
    a = rand(7, 300_000)
    v1 = store_bytes(vol, a)
    appended = store_bytes(vol, a + b"tail", parent=v1.id)
    assert appended.edit is not None and appended.edit.start == v1.count - 1
    assert appended.edit.removed == 1
    cut = store_bytes(vol, a[: v1.lengths[0]], parent=v1.id)
    assert cut.edit is not None
    assert (cut.edit.start, cut.edit.removed, cut.edit.added) == (1, v1.count - 1, 0)
    empty = store_bytes(vol, b"", parent=v1.id)
    assert empty.size == 0 and empty.digest == EMPTY_DIGEST
    assert empty.edit is not None
    assert (empty.edit.start, empty.edit.removed, empty.edit.added) == (0, v1.count, 0)


def test_unchanged_content_adds_no_version(vol: Volume) -> None:
    a = rand(8, 100_000)
    v1 = store_bytes(vol, a)
    rows = count_rows(vol, "versions")
    again = store_bytes(vol, a, parent=v1.id)
    assert again.id == v1.id
    assert count_rows(vol, "versions") == rows


def test_ancestry_newest_first_to_the_empty_root(vol: Volume) -> None:
    contents = [rand(9, 50_000)]
    for i in range(3):
        contents.append(contents[-1] + f"change {i}\n".encode())
    chain = [store_bytes(vol, contents[0])]
    for c in contents[1:]:
        chain.append(store_bytes(vol, c, parent=chain[-1].id))
    with vol.store.read() as txn:
        got = ancestry(txn, vol.versions, chain[-1].id)
        assert [v.id for v in got] == [v.id for v in reversed(chain)] + [EMPTY_VERSION]
        for v, c in zip(got, [*reversed(contents), b""], strict=True):
            assert vol.versions.read(txn, v, 0, v.size) == c
        assert [v.id for v in ancestry(txn, vol.versions, EMPTY_VERSION)] == [EMPTY_VERSION]
        with pytest.raises(NotFoundError):
            ancestry(txn, vol.versions, 10_000)


def test_ancestry_cycle_is_corruption(vol: Volume) -> None:
    v1 = store_bytes(vol, b"one")
    v2 = store_bytes(vol, b"two", parent=v1.id)
    with vol.store.write() as txn:
        looped = dataclasses.replace(vol.versions.get(txn, v1.id), parent=v2.id)
        txn.put(u64(v1.id), encode_version(looped), db=vol.store.db["versions"])
    with vol.store.read() as txn, pytest.raises(CorruptionError, match="cycle"):
        ancestry(txn, vol.versions, v2.id)
    assert any("ancestry is a cycle" in p for p in check_store(vol).problems)
    with vol.store.write() as txn:  # undo the damage for the after-test check
        txn.put(u64(v1.id), encode_version(v1), db=vol.store.db["versions"])


def test_deferred_digest_is_computed_once(vol: Volume) -> None:
    data = rand(10, 120_000)
    v = store_bytes(vol, data, digest=False)
    assert v.digest is None
    done = vol.versions.ensure_digest(v)
    assert done.digest == blake3.blake3(data).digest()
    with vol.store.read() as txn:
        assert vol.versions.get(txn, v.id).digest == done.digest
    assert vol.versions.ensure_digest(v).digest == done.digest


# -- the namespace -------------------------------------------------------------------------


def test_create_lookup_list_remove(vol: Volume) -> None:
    ns = vol.namespace
    v = store_bytes(vol, b"hello\n")
    with vol.store.write() as txn:
        root = ns.writable_dir(txn, [])
        ns.create(txn, root, b"d", dir_attrs())
        d = ns.writable_dir(txn, P("d"))
        for name in (b"c", b"a", b"b"):
            ns.create(txn, d, name, file_attrs(v))
        ns.create(txn, d, b"link", dataclasses.replace(
            new_file_attrs(stat.S_IFLNK | 0o777, 0, 0), target=b"a", size=1))
        with pytest.raises(ExistsError):
            ns.create(txn, d, b"a", file_attrs(v))
    with vol.store.read() as txn:
        d_attrs = ns.resolve(txn, P("d"))
        assert [n for n, _ in ns.listdir(txn, d_attrs.target)] == [b"a", b"b", b"c", b"link"]
        assert [n for n, _ in ns.listdir(txn, d_attrs.target, after=b"b")] == [b"c", b"link"]
        assert ns.resolve(txn, P("d/link")).target == b"a"
        assert ns.nlink(txn, d_attrs) == 2
        assert ns.nlink(txn, ns.root(txn)) == 3
        with pytest.raises(NotFoundError, match="/d/zz"):
            ns.resolve(txn, P("d/zz"))
        with pytest.raises(NotADirectoryError_):
            ns.resolve(txn, P("d/a/x"))
    with vol.store.write() as txn:
        d = ns.writable_dir(txn, P("d"))
        with pytest.raises(IsADirectoryError_):
            ns.remove(txn, ns.writable_dir(txn, []), b"d", want_dir=False)
        with pytest.raises(NotADirectoryError_):
            ns.remove(txn, d, b"a", want_dir=True)
        ns.remove(txn, d, b"a", want_dir=False)
        with pytest.raises(NotFoundError):
            ns.remove(txn, d, b"a")
    assert set(dump_tree(vol, "/d")) == {"b", "c", "link"}


def test_rmdir_of_non_empty_is_refused(vol: Volume) -> None:
    ns = vol.namespace
    with vol.store.write() as txn:
        ns.make_dirs(txn, P("a/b"), 0, 0)
    with vol.store.write() as txn:
        root = ns.writable_dir(txn, [])
        with pytest.raises(NotEmptyError):
            ns.remove(txn, root, b"a", want_dir=True)
    assert set(dump_tree(vol)) == {"a", "a/b"}
    with vol.store.write() as txn:
        ns.remove(txn, ns.writable_dir(txn, P("a")), b"b", want_dir=True)
        ns.remove(txn, ns.writable_dir(txn, []), b"a", want_dir=True)
    assert dump_tree(vol) == {}
    assert count_rows(vol, "dirs") == 1  # only the root's node is left


@pytest.mark.parametrize("n", [255, 256, 1000])
def test_name_length_limit(vol: Volume, n: int) -> None:
    ns = vol.namespace
    name = b"x" * n
    with vol.store.write() as txn:
        root = ns.writable_dir(txn, [])
        if n <= 255:
            ns.create(txn, root, name, dir_attrs())
            ns.make_dirs(txn, [name, b"z" * n], 0, 0)
            return
        for op in (
            lambda: ns.create(txn, root, name, dir_attrs()),
            lambda: ns.attach(txn, root, name, dir_attrs()),
            lambda: ns.make_dirs(txn, [name], 0, 0),
        ):
            with pytest.raises(NameTooLongError):
                op()
    assert dump_tree(vol) == {}


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0b"])
def test_invalid_names_are_refused(vol: Volume, name: bytes) -> None:
    with vol.store.write() as txn:
        root = vol.namespace.writable_dir(txn, [])
        with pytest.raises(UsageError):
            vol.namespace.create(txn, root, name, dir_attrs())
    assert dump_tree(vol) == {}


def test_make_dirs(vol: Volume) -> None:
    ns = vol.namespace
    empty = store_bytes(vol, b"")
    with vol.store.write() as txn:
        deep = ns.make_dirs(txn, P("a/b/c"), 0, 0)
        again = ns.make_dirs(txn, P("a/b/c"), 0, 0)
        assert deep == again
        ns.make_dirs(txn, P("a/x"), 0, 0)
        ns.create(txn, ns.writable_dir(txn, P("a")), b"f", file_attrs(empty))
    with vol.store.write() as txn, pytest.raises(NotADirectoryError_):
        ns.make_dirs(txn, P("a/f/g"), 0, 0)
    assert set(dump_tree(vol)) == {"a", "a/b", "a/b/c", "a/x", "a/f"}
    with vol.store.read() as txn:
        assert ns.nlink(txn, ns.resolve(txn, P("a"))) == 4  # . .. b x


def test_rename_by_detach_and_attach(vol: Volume) -> None:
    ns = vol.namespace
    v = store_bytes(vol, b"content")
    with vol.store.write() as txn:
        ns.make_dirs(txn, P("src/sub"), 0, 0)
        ns.make_dirs(txn, P("dst"), 0, 0)
        ns.create(txn, ns.writable_dir(txn, P("src/sub")), b"f", file_attrs(v))
    with vol.store.write() as txn:
        src = ns.writable_dir(txn, P("src"))
        moved = ns.detach(txn, src, b"sub")
        ns.attach(txn, ns.writable_dir(txn, P("dst")), b"renamed", moved)
        f_dir = ns.writable_dir(txn, P("dst/renamed"))
        ns.attach(txn, f_dir, b"g", ns.detach(txn, f_dir, b"f"))
    assert dump_tree(vol) == {
        "src": ("d", DIR, 0, None),
        "dst": ("d", DIR, 0, None),
        "dst/renamed": ("d", DIR, 0, None),
        "dst/renamed/g": ("f", REG, 7, b"content"),
    }
    with vol.store.read() as txn:
        assert ns.header(txn, ns.resolve(txn, P("src")).target).nsubdirs == 0
        assert ns.header(txn, ns.resolve(txn, P("dst")).target).nsubdirs == 1


def test_hard_links(vol: Volume) -> None:
    ns = vol.namespace
    v1, v2 = store_bytes(vol, b"one"), store_bytes(vol, b"two!")
    with vol.store.write() as txn:
        ns.make_dirs(txn, P("a"), 0, 0)
        ns.make_dirs(txn, P("b"), 0, 0)
        a, b = ns.writable_dir(txn, P("a")), ns.writable_dir(txn, P("b"))
        ns.create(txn, a, b"f", file_attrs(v1))
        ns.hard_link(txn, a, b"f", b, b"g")
        ns.hard_link(txn, b, b"g", a, b"h")  # a third name, made from the second
        with pytest.raises(ExistsError):
            ns.hard_link(txn, a, b"f", b, b"g")
        with pytest.raises(InvalidOperationError):
            ns.hard_link(txn, ns.writable_dir(txn, []), b"a", b, b"dir-link")
        with pytest.raises(NotFoundError):
            ns.hard_link(txn, a, b"missing", b, b"x")
    with vol.store.read() as txn:
        link_id = ns.link_id_at(txn, ns.resolve(txn, P("a")).target, b"f")
        assert link_id and link_id == ns.link_id_at(txn, ns.resolve(txn, P("b")).target, b"g")
        assert ns.get_link(txn, link_id).nlink == 3
    # A change through one name shows through the others.
    with vol.store.write() as txn:
        ns.set_attrs(txn, ns.writable_dir(txn, P("b")), b"g",
                     lambda x: dataclasses.replace(x, target=v2.id, size=v2.size))
    tree = dump_tree(vol)
    assert tree["a/f"] == tree["b/g"] == tree["a/h"] == ("f", REG, 4, b"two!")
    with vol.store.write() as txn:
        ns.remove(txn, ns.writable_dir(txn, P("a")), b"f")
        ns.remove(txn, ns.writable_dir(txn, P("a")), b"h")
    with vol.store.read() as txn:
        assert ns.get_link(txn, link_id).nlink == 1
    assert dump_tree(vol, "/b")["g"] == ("f", REG, 4, b"two!")
    with vol.store.write() as txn:
        ns.remove(txn, ns.writable_dir(txn, P("b")), b"g")
    assert count_rows(vol, "links") == 0


def test_remove_tree_frees_every_node(vol: Volume) -> None:
    ns = vol.namespace
    v = store_bytes(vol, b"x")
    with vol.store.write() as txn:
        for d in ("t/a/b", "t/a/c", "t/d"):
            ns.make_dirs(txn, P(d), 0, 0)
        ns.create(txn, ns.writable_dir(txn, P("t/a/b")), b"f", file_attrs(v))
        ns.hard_link(txn, ns.writable_dir(txn, P("t/a/b")), b"f",
                     ns.writable_dir(txn, P("t/d")), b"g")
    assert count_rows(vol, "dirs") == 6
    with vol.store.write() as txn:
        ns.remove_tree(txn, ns.writable_dir(txn, []), b"t")
    assert dump_tree(vol) == {}
    assert count_rows(vol, "dirs") == 1
    assert count_rows(vol, "entries") == 0
    assert count_rows(vol, "links") == 0


# -- copy-on-write clones ------------------------------------------------------------------


def _build_tree(vol: Volume) -> None:
    ns = vol.namespace
    files = {path: store_bytes(vol, data) for path, data in (
        ("a/top", b"top"), ("a/sub/f", b"f"), ("a/sub/deep/g", b"g"), ("a/other/h", b"h"))}
    with vol.store.write() as txn:
        for d in ("a/sub/deep", "a/other", "a/empty"):
            ns.make_dirs(txn, P(d), 0, 0)
        for path, v in files.items():
            *parent, name = P(path)
            ns.create(txn, ns.writable_dir(txn, parent), name, file_attrs(v))


def _clone(vol: Volume, src: str, dst: str) -> None:
    ns = vol.namespace
    with vol.store.write() as txn:
        *sp, sname = P(src)
        *dp, dname = P(dst)
        raw = ns.raw_entry(txn, ns.resolve(txn, sp).target, sname)
        assert raw is not None
        ns.clone_entry(txn, raw, ns.writable_dir(txn, dp), dname)


def _write(vol: Volume, path: str, data: bytes) -> None:
    ns = vol.namespace
    *parent, name = P(path)
    with vol.store.read() as txn:
        old = ns.resolve(txn, P(path))
    v = store_bytes(vol, data, parent=int(old.target))
    with vol.store.write() as txn:
        ns.set_attrs(txn, ns.writable_dir(txn, parent), name,
                     lambda a: dataclasses.replace(a, target=v.id, size=v.size))


def test_clone_is_o1_and_copy_on_write(vol: Volume) -> None:
    ns = vol.namespace
    _build_tree(vol)
    before = dump_tree(vol, "/a")
    rows = {name: count_rows(vol, name) for name in ("dirs", "entries", "versions")}
    _clone(vol, "/a", "/b")
    # O(1): one new entry (the clone's name), no directory node or version copied.
    assert count_rows(vol, "dirs") == rows["dirs"]
    assert count_rows(vol, "entries") == rows["entries"] + 1
    assert count_rows(vol, "versions") == rows["versions"]
    with vol.store.read() as txn:
        a, b = ns.resolve(txn, P("a")), ns.resolve(txn, P("b"))
        assert a.target == b.target
        assert ns.header(txn, a.target).refcount == 2
    check_consistency(vol)
    assert dump_tree(vol, "/b") == before

    # Changes on the clone's side...
    _write(vol, "/b/sub/deep/g", b"g changed in b")
    n = store_bytes(vol, b"n")
    with vol.store.write() as txn:
        ns.create(txn, ns.writable_dir(txn, P("b/sub")), b"new", file_attrs(n))
        ns.remove_tree(txn, ns.writable_dir(txn, P("b")), b"other")
    check_consistency(vol)
    assert dump_tree(vol, "/a") == before
    # ...and on the original's side.
    _write(vol, "/a/top", b"top changed in a")
    with vol.store.write() as txn:
        ns.remove_tree(txn, ns.writable_dir(txn, P("a/sub")), b"deep")
        ns.make_dirs(txn, P("a/empty/now-not"), 0, 0)
    check_consistency(vol)
    b_tree = dump_tree(vol, "/b")
    assert b_tree["top"] == ("f", REG, 3, b"top")
    assert b_tree["sub/deep/g"] == ("f", REG, 14, b"g changed in b")
    assert "other" not in b_tree and "sub/new" in b_tree and "empty/now-not" not in b_tree
    a_tree = dump_tree(vol, "/a")
    assert a_tree["top"][3] == b"top changed in a"
    assert "sub/deep" not in a_tree and "other/h" in a_tree and "sub/new" not in a_tree
    # A directory neither side changed is still one shared node.
    with vol.store.read() as txn:
        assert ns.resolve(txn, P("a/sub/f")).target == ns.resolve(txn, P("b/sub/f")).target

    # Dropping one side frees only what the other does not use.
    with vol.store.write() as txn:
        ns.remove_tree(txn, ns.writable_dir(txn, []), b"a")
    check_consistency(vol)
    assert dump_tree(vol, "/b") == b_tree


def test_clone_of_a_clone_and_a_file(vol: Volume) -> None:
    _build_tree(vol)
    _clone(vol, "/a", "/b")
    _clone(vol, "/b", "/c")
    _clone(vol, "/a/top", "/a/top-copy")
    _write(vol, "/c/sub/f", b"c only")
    _write(vol, "/a/top-copy", b"copy only")
    check_consistency(vol)
    assert dump_tree(vol, "/a/sub")["f"][3] == b"f"
    assert dump_tree(vol, "/b/sub")["f"][3] == b"f"
    assert dump_tree(vol, "/c/sub")["f"][3] == b"c only"
    assert dump_tree(vol, "/a")["top"][3] == b"top"
    with pytest.raises(ExistsError):
        _clone(vol, "/a", "/b")


def test_clone_with_hard_links_is_copy_on_write(vol: Volume) -> None:
    """A hard-linked pair inside a cloned tree: the copy is a separate file on each side
    (as `cp -a` of the tree gives), so a change through one tree does not show in the
    other, and each side's st_nlink stays 2 whatever the other side does."""
    ns = vol.namespace
    v = store_bytes(vol, b"shared")
    with vol.store.write() as txn:
        ns.make_dirs(txn, P("a"), 0, 0)
        a = ns.writable_dir(txn, P("a"))
        ns.create(txn, a, b"f", file_attrs(v))
        ns.hard_link(txn, a, b"f", a, b"g")
    _clone(vol, "/a", "/b")
    _write(vol, "/b/f", b"changed in b")
    check_consistency(vol)
    assert dump_tree(vol, "/b")["g"][3] == b"changed in b"  # the pair is still linked in b
    with vol.store.read() as txn:
        a_dir = ns.resolve(txn, P("a")).target
        nlink_a = ns.nlink(txn, ns.raw_entry(txn, a_dir, b"f"))
    problems = []
    if dump_tree(vol, "/a")["f"][3] != b"shared":
        problems.append("a change to /b/f showed in /a/f")
    if nlink_a != 2:
        problems.append(f"/a/f has st_nlink {nlink_a}, not 2")
    assert not problems, "; ".join(problems)


# -- opening the store ---------------------------------------------------------------------


def test_reopen_keeps_everything(store_dir: Path) -> None:
    vol = Volume.open(store_dir, create=True)
    try:
        v = store_bytes(vol, b"persist me")
        with vol.store.write() as txn:
            vol.namespace.create(txn, vol.namespace.writable_dir(txn, []), b"f", file_attrs(v))
        tree = dump_tree(vol)
    finally:
        vol.close()
    again = Volume.open(store_dir, create=True)  # init is idempotent
    try:
        assert dump_tree(again) == tree
        assert again.params == vol.params
        check_consistency(again)
    finally:
        again.close()


def test_chunk_params_are_fixed_at_init(store_dir: Path) -> None:
    small = ChunkParams(64, 256, 1024)
    Volume.open(store_dir, create=True, params=small).close()
    for create in (False, True):
        vol = Volume.open(store_dir, create=create, params=DEFAULT_PARAMS)
        try:
            assert vol.params == small
            v = store_bytes(vol, rand(12, 20_000))
            assert v.count > 20 and max(v.lengths) <= 1024
        finally:
            vol.close()


def test_store_format_mismatch_names_the_path(store_dir: Path) -> None:
    Volume.open(store_dir, create=True).close()
    vol = Volume.open(store_dir)
    with vol.store.write() as txn:
        vol.store.put_meta(txn, "format", str(FORMAT_VERSION + 1).encode())
    vol.close()
    for create in (False, True):
        with pytest.raises(StoreError, match=f"{store_dir}.*format {FORMAT_VERSION + 1}"):
            Volume.open(store_dir, create=create)


def test_missing_store_names_the_path(store_dir: Path) -> None:
    with pytest.raises(StoreError, match=str(store_dir)):
        Volume.open(store_dir)
    assert not store_dir.exists()


def test_store_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "afile"
    path.write_bytes(b"not a store")
    with pytest.raises(StoreError, match=str(path)):
        Volume.open(path, create=True)
    assert path.read_bytes() == b"not a store"


def test_the_consistency_check_sees_wrong_counts(store_dir: Path) -> None:
    """check_consistency is what the other tests lean on: it must not pass vacuously."""
    vol = Volume.open(store_dir, create=True)
    try:
        ns = vol.namespace
        v = store_bytes(vol, rand(11, 100_000))
        with vol.store.write() as txn:
            ns.make_dirs(txn, P("a/b"), 0, 0)
            a = ns.writable_dir(txn, P("a"))
            ns.create(txn, a, b"f", file_attrs(v))
            ns.hard_link(txn, a, b"f", a, b"g")
            link_id = ns.link_id_at(txn, a, b"f")
        check_consistency(vol)
        db = vol.store.db
        with vol.store.read() as txn:
            a_hdr = ns.header(txn, a)
            link = ns.get_link(txn, link_id)
            refs = vol.fragments.refcount(txn, v.fragment_hash(0))
            index = bytes(txn.get(v.fragment_hash(0), db=db["fragindex"]))  # ends in the count
        damage = [
            (db["dirs"], u64(a), encode_dir(DirHeader(a_hdr.refcount + 1, a_hdr.nsubdirs)),
             "refcount"),
            (db["dirs"], u64(a), encode_dir(DirHeader(a_hdr.refcount, a_hdr.nsubdirs + 1)),
             "nsubdirs"),
            (db["links"], u64(link_id), encode_link(Link(link.nlink + 1, link.attrs)), "nlink"),
            (db["fragindex"], v.fragment_hash(0), index[:-8] + (refs + 1).to_bytes(8, "big"),
             "occurrences"),
        ]
        for dbi, key, bad, what in damage:
            with vol.store.write() as txn:
                good = txn.get(key, db=dbi)
                txn.put(key, bad, db=dbi)
            with pytest.raises(AssertionError, match=what):
                check_consistency(vol)
            with vol.store.write() as txn:
                txn.put(key, good, db=dbi)
            check_consistency(vol)
    finally:
        vol.close()


def test_an_unwritable_crash_record_is_a_one_line_store_error(store_dir: Path) -> None:
    Volume.open(store_dir, create=True).close()
    record = store_dir / "db" / "synced-meta"
    record.unlink()
    record.mkdir()  # cannot be opened for writing, as on a read-only filesystem
    with pytest.raises(StoreError, match=f"^{store_dir}: cannot open the store: Is a directory$"):
        Volume.open(store_dir)


def test_versions_from_the_empty_file_count_what_they_add(vol: Volume) -> None:
    """The shortcuts of a first import (a parent with no fragments, a one-fragment file)
    give the edit and the counts of the general path: everything added, once per hash."""
    from annofs.content.versions import compute_edit, own_counts
    from annofs.store.records import HOLE, Edit

    one = blake3.blake3(b"x").digest()
    vol.fragments.put_many([(one, b"x")])
    with vol.store.write() as txn:
        empty = vol.versions.get(txn, EMPTY_VERSION)
        assert compute_edit(empty, one * 3, array("I", [1, 1, 1])) == Edit(0, 0, 3)
        v = vol.versions.create(txn, empty, one, array("I", [1]), one)
        assert v.edit == Edit(0, 0, 1)
        assert own_counts(v) == {one: 1}
        assert vol.fragments.refcount(txn, one) == 1
        hole = dataclasses.replace(v, hashes=HOLE)
        assert own_counts(hole) == {}


@pytest.mark.parametrize("n", [1, DEFAULT_PARAMS.min_size, DEFAULT_PARAMS.min_size + 1,
                               3 * DEFAULT_PARAMS.max_size])
def test_ingest_bytes_cuts_as_the_chunker_does(vol: Volume, n: int) -> None:
    """A file no longer than the smallest fragment skips the chunker: the same one fragment
    and digest as the chunker's cuts give, stored once the batch is flushed."""
    from annofs.content.ingest import FragmentBatch, ingest_bytes

    data = random.Random(n).randbytes(n)
    batch = FragmentBatch(vol.store, vol.fragments)
    got = ingest_bytes(data, DEFAULT_PARAMS, batch)
    assert list(got.lengths) == cut_lengths(data, DEFAULT_PARAMS)
    assert got.digest == blake3.blake3(data).digest() and got.size == n
    batch.flush()
    with vol.store.read() as txn:
        assert b"".join(vol.fragments.get(txn, got.hashes[i:i + HASH_SIZE])
                        for i in range(0, len(got.hashes), HASH_SIZE)) == data
