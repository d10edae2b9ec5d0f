"""NARs against the real Nix (Debian's nix-bin): dumps byte for byte equal to
`nix-store --dump`, hashes equal to `nix-hash`, restores that dump back to the same
archive; and a malformed archive, found at any point, leaves the store as it was."""

from __future__ import annotations

import io
import os
import random
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blake3
import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nar_cases import MALFORMED, directory, entry, nar, regular, symlink
from store_damage import damage
from t2_store import P, check_consistency, dump_tree

from annofs.errors import ExistsError, NotADirectoryError_, UsageError
from annofs.transfer import nar as nar_module
from annofs.transfer.import_tree import TreeImporter
from annofs.transfer.nar import (
    NarError,
    RestoredTree,
    dump_host,
    dump_volume,
    hash_volume_in,
    nar_hash,
    restore_nar_host,
    restore_nar_into,
)
from annofs.volume import Volume

ODD_NAME = b"odd \x01\xff\xfe\n name"  # control bytes, a newline, not UTF-8


@pytest.fixture
def vol(vol: Volume) -> Iterator[Volume]:
    """The conftest store, checked for consistency after the test."""
    yield vol
    check_consistency(vol)


def make_tree(root: Path, big: int = 3 << 20) -> Path:
    """A tree with every kind of entry a NAR holds, and the bit patterns that matter."""
    rnd = random.Random(7)
    root.mkdir()
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "emptydir").mkdir()
    (root / "hello.txt").write_bytes(b"hello\n")
    (root / "empty").write_bytes(b"")
    (root / "seven").write_bytes(b"1234567")  # padding of 1
    (root / "eight").write_bytes(b"12345678")  # no padding
    (root / "sub" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "sub" / "run.sh", 0o755)
    (root / "sub" / "group-x").write_bytes(b"x")
    os.chmod(root / "sub" / "group-x", 0o654)  # Nix looks at the owner's x bit only
    (root / "sub" / "owner-x").write_bytes(b"x")
    os.chmod(root / "sub" / "owner-x", 0o700)
    (root / "sub" / "deeper" / "big.bin").write_bytes(rnd.randbytes(big))  # many fragments
    (root / "sub" / "deeper" / "mib+3").write_bytes(rnd.randbytes((1 << 20) + 3))
    os.symlink("../hello.txt", root / "sub" / "link")
    os.symlink("/nonexistent/absolute", root / "dangling")
    os.symlink("emptydir", root / "dirlink")
    (root / os.fsdecode(ODD_NAME)).write_bytes(b"odd\n")
    (root / "B-upper").write_bytes(b"sorted before lower case")
    (root / "a.b").write_bytes(b"")
    (root / "a-b").write_bytes(b"")  # '-' < '.' in bytes
    return root


def nix(*args: str) -> bytes:
    return subprocess.run(list(args), check=True, capture_output=True).stdout


@pytest.fixture(scope="module")
def nix_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    """(host tree, its copy added to /nix/store by nix-store --add, Nix's dump of it)."""
    tree = make_tree(tmp_path_factory.mktemp("nar") / "tree")
    store_path = Path(nix("nix-store", "--add", str(tree)).decode().strip())
    return tree, store_path, nix("nix-store", "--dump", str(store_path))


def test_dump_host_is_nix_store_dump(nix_tree: tuple[Path, Path, bytes]) -> None:
    tree, store_path, nix_dump = nix_tree
    assert b"".join(dump_host(store_path)) == nix_dump
    # The host tree itself (modes as made, not canonicalised by the Nix store) too.
    assert b"".join(dump_host(tree)) == nix("nix-store", "--dump", str(tree))
    for part in ("hello.txt", "empty", "sub/run.sh", "sub/link", "dangling",
                 "sub/deeper/big.bin"):
        assert b"".join(dump_host(tree / part)) == nix("nix-store", "--dump", str(tree / part))


def test_dump_volume_is_nix_store_dump(vol: Volume, nix_tree: tuple[Path, Path, bytes]) -> None:
    tree, store_path, nix_dump = nix_tree
    TreeImporter(vol).run(store_path, P("/nix/store/" + store_path.name))
    TreeImporter(vol).run(tree, P("/src/tree"))
    assert b"".join(dump_volume(vol, P("/nix/store/" + store_path.name))) == nix_dump
    assert b"".join(dump_volume(vol, P("/src/tree"))) == nix("nix-store", "--dump", str(tree))
    big = "/src/tree/sub/deeper/big.bin"
    with vol.store.read() as txn:
        v = vol.versions.get(txn, int(vol.namespace.resolve(txn, P(big)).target))
    assert v.count > 3  # the file crosses fragments
    assert b"".join(dump_volume(vol, P(big))) == nix("nix-store", "--dump",
                                                      str(tree / "sub/deeper/big.bin"))


@pytest.mark.parametrize("batch", [nar_module._BATCH, 1, 40_000])
def test_hash_volume_in_is_nix_hash(vol: Volume, nix_tree: tuple[Path, Path, bytes],
                                    monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """The NAR hash without the dump (fragments read across files, hashed in another
    thread in runs) is Nix's, whether a run holds one fragment, a few files or all."""
    tree, _store_path, _nix_dump = nix_tree
    monkeypatch.setattr(nar_module, "_BATCH", batch)
    TreeImporter(vol).run(tree, P("/src/tree"))
    want = nix("nix-hash", "--type", "sha256", "--base32", str(tree)).decode().strip()
    with vol.store.read() as txn:
        for part in ("", "/sub/deeper/big.bin", "/empty", "/sub/link", "/emptydir"):
            got = hash_volume_in(vol, txn, P("/src/tree" + part))
            assert got == nar_hash([nix("nix-store", "--dump", str(tree) + part)]), part
        assert str(hash_volume_in(vol, txn, P("/src/tree"))) == "sha256:" + want


def test_hash_volume_in_refuses_a_damaged_fragment(vol: Volume, tmp_path: Path) -> None:
    """A fragment whose stored bytes were changed is CorruptionError naming it, never a
    NAR hash of wrong bytes, in the first, a middle or the last run of the tree."""
    from annofs.errors import CorruptionError

    host = tmp_path / "t"
    host.mkdir()
    rnd = random.Random(9)
    for i in range(30):
        (host / f"f{i:02}").write_bytes(rnd.randbytes(3000 + i))
    TreeImporter(vol).run(host, P("/t"))
    with vol.store.read() as txn:
        versions = [vol.versions.get(txn, int(vol.namespace.resolve(
            txn, P(f"/t/f{i:02}")).target)) for i in range(30)]
        good = hash_volume_in(vol, txn, P("/t"))
    assert good == nar_hash(dump_host(host))
    for k in (0, 13, 29):
        undo = damage(vol, versions[k].hashes, "bit-flip")
        try:
            with vol.store.read() as txn, pytest.raises(CorruptionError) as e:
                hash_volume_in(vol, txn, P("/t"))
            assert versions[k].hashes.hex() in str(e.value)
        finally:
            undo()


def test_nar_hash_is_nix_hash(vol: Volume, nix_tree: tuple[Path, Path, bytes]) -> None:
    _tree, store_path, nix_dump = nix_tree
    TreeImporter(vol).run(store_path, P("/imported"))
    want = "sha256:" + nix("nix-hash", "--type", "sha256", "--base32", str(store_path)).decode()\
        .strip()
    assert str(nar_hash(dump_volume(vol, P("/imported")))) == want
    assert str(nar_hash(dump_host(store_path))) == want
    # ... and the NarHash Nix itself recorded for the path.
    info = nix("nix-store", "--query", "--hash", str(store_path)).decode().strip()
    assert info == want
    assert nar_hash([nix_dump]).size == len(nix_dump)


def test_restore_of_nix_dump_dumps_identical(vol: Volume,
                                            nix_tree: tuple[Path, Path, bytes]) -> None:
    _tree, store_path, nix_dump = nix_tree
    dest = P("/nix/store/" + store_path.name)
    got = restore_nar_into(vol, io.BytesIO(nix_dump), dest)
    assert b"".join(dump_volume(vol, dest)) == nix_dump
    assert got.nar == nar_hash([nix_dump])
    assert got.kind == "directory" and got.dest == tuple(dest)
    assert got.symlinks == 3 and got.directories == 4
    # Every regular file is listed, with the version that holds it and its digest.
    files = {f.path: f for f in got.files}
    host_files = {tuple(os.fsencode(p.relative_to(store_path)).split(b"/")): p
                  for p in store_path.rglob("*") if p.is_file() and not p.is_symlink()}
    assert files.keys() == host_files.keys()
    with vol.store.read() as txn:
        for rel, f in files.items():
            data = host_files[rel].read_bytes()
            assert f.digest == blake3.blake3(data).digest() and f.size == len(data)
            assert vol.namespace.resolve(txn, [*dest, *rel]).target == f.version
            assert f.executable == bool(host_files[rel].stat().st_mode & 0o100)
    with vol.store.read() as txn:
        assert vol.namespace.staging_roots(txn) == []


def test_restore_host_of_nix_dump(tmp_path: Path, nix_tree: tuple[Path, Path, bytes]) -> None:
    _tree, _store_path, nix_dump = nix_tree
    h = restore_nar_host(io.BytesIO(nix_dump), tmp_path / "out")
    assert h == nar_hash([nix_dump])
    assert nix("nix-store", "--dump", str(tmp_path / "out")) == nix_dump
    with pytest.raises(UsageError, match="already exists"):
        restore_nar_host(io.BytesIO(nix_dump), tmp_path / "out")


def test_restore_single_file_and_symlink(vol: Volume) -> None:
    for name, data in ((b"f", nar(regular(b"data", executable=True))),
                       (b"l", nar(symlink(b"/some/where")))):
        got = restore_nar_into(vol, io.BytesIO(data), [b"top", name])
        assert b"".join(dump_volume(vol, [b"top", name])) == data
        assert got.kind == ("regular" if name == b"f" else "symlink")
    assert dump_tree(vol, "/top")["f"][1] & 0o777 == 0o755
    f = restore_nar_into(vol, io.BytesIO(nar(regular(b"data"))), [b"g"]).files
    assert [(x.path, x.size, x.executable) for x in f] == [((), 4, False)]


def test_restore_refuses_existing_dest_unless_replace(vol: Volume) -> None:
    data = nar(directory(entry(b"a", regular(b"1"))))
    restore_nar_into(vol, io.BytesIO(data), P("/x/y"))
    before = dump_tree(vol)
    with pytest.raises(ExistsError, match="/x/y: already exists"):
        restore_nar_into(vol, io.BytesIO(nar(regular(b"2"))), P("/x/y"))
    assert dump_tree(vol) == before
    restore_nar_into(vol, io.BytesIO(nar(regular(b"2"))), P("/x/y"), replace=True)
    assert dump_tree(vol, "/x")["y"][3] == b"2"
    with pytest.raises(NotADirectoryError_, match="/x/y: not a directory"):
        restore_nar_into(vol, io.BytesIO(data), P("/x/y/z"))


def test_before_swap_sees_the_hash_and_can_refuse(vol: Volume) -> None:
    data = nar(directory(entry(b"a", regular(b"1")), entry(b"b", regular(b"22"))))
    seen: list[RestoredTree] = []

    def refuse(txn: lmdb.Transaction, tree: RestoredTree) -> None:
        seen.append(tree)
        raise UsageError("NarHash mismatch")

    before = dump_tree(vol)
    with pytest.raises(UsageError, match="NarHash mismatch"):
        restore_nar_into(vol, io.BytesIO(data), P("/nix/store/x"), before_swap=refuse)
    assert seen[0].nar == nar_hash([data]) and len(seen[0].files) == 2
    assert dump_tree(vol) == before
    with vol.store.read() as txn:
        assert vol.namespace.staging_roots(txn) == []


def _no_trace(vol: Volume, before: dict) -> None:
    assert dump_tree(vol) == before
    with vol.store.read() as txn:
        assert vol.namespace.staging_roots(txn) == []


@pytest.mark.parametrize(("case", "data", "message"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_nar_writes_nothing(vol: Volume, case: str, data: bytes, message: str) -> None:
    restore_nar_into(vol, io.BytesIO(nar(regular(b"old"))), P("/keep/me"))
    before = dump_tree(vol)
    with pytest.raises(NarError, match=re.escape(message)):
        restore_nar_into(vol, io.BytesIO(data), P("/new/tree"), source="bad.nar")
    _no_trace(vol, before)


def test_fault_after_many_batches_writes_nothing(vol: Volume) -> None:
    # More entries than one batch holds, then a bad name at the very end.
    names = [f"f{i:05}".encode() for i in range(5000)]
    good = nar(directory(*(entry(n, regular(n)) for n in names)))
    bad = nar(directory(*(entry(n, regular(n)) for n in names), entry(b"f99999/x", regular(b""))))
    before = dump_tree(vol)
    with pytest.raises(NarError, match="contains '/'"):
        restore_nar_into(vol, io.BytesIO(bad), P("/many"))
    _no_trace(vol, before)
    with pytest.raises(NarError, match="trailing bytes"):
        restore_nar_into(vol, io.BytesIO(good + b"\0"), P("/many"))
    _no_trace(vol, before)
    got = restore_nar_into(vol, io.BytesIO(good), P("/many"))
    assert len(got.files) == 5000
    assert b"".join(dump_volume(vol, P("/many"))) == good


def test_dump_refuses_what_a_nar_cannot_hold(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match="a FIFO cannot be put in a NAR"):
        b"".join(dump_host(tmp_path))


class Pipe:
    """A stream that cannot seek, as stdin from a pipe or a decompressor."""

    def __init__(self, data: bytes) -> None:
        self._b = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._b.read(n)

    def seekable(self) -> bool:
        return False


def every_key(vol: Volume) -> dict[tuple[str, bytes], bytes]:
    with vol.store.read() as txn:
        return {(name, bytes(k)): bytes(v) for name, db in vol.store.db.items()
                for k, v in txn.cursor(db=db)}


def test_checked_before_anything_is_written(vol: Volume) -> None:
    # A fault at the very end, read from a pipe: not one key of the store changes.
    data = nar(directory(*(entry(f"f{i:02}".encode(), regular(os.urandom(5000)))
                           for i in range(50))))
    before = every_key(vol)
    with pytest.raises(NarError, match="trailing bytes"):
        restore_nar_into(vol, Pipe(data + b"\0"), P("/x"))  # type: ignore[arg-type]
    assert every_key(vol) == before
    seen = []

    def verify(h: object) -> None:
        seen.append(h)
        raise UsageError("NarHash does not match the narinfo")

    for stream in (io.BytesIO(data), Pipe(data)):
        with pytest.raises(UsageError, match="does not match"):
            restore_nar_into(vol, stream, P("/x"), verify=verify)  # type: ignore[arg-type]
        assert every_key(vol) == before
    assert seen == [nar_hash([data])] * 2
    assert not [p for p in vol.store.path.iterdir() if "spool" in p.name]
    got = restore_nar_into(vol, Pipe(data), P("/x"), verify=seen.append)  # type: ignore[arg-type]
    assert got.nar == seen[-1] == nar_hash([data])
    assert b"".join(dump_volume(vol, P("/x"))) == data


RESTORE_FUZZ = max(20, int(os.environ.get("ANNOFS_FUZZ_EXAMPLES", "300")) // 6)


@settings(max_examples=RESTORE_FUZZ, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                max_size=3), st.booleans())
def test_fuzz_restore_adds_a_whole_tree_or_nothing(vol: Volume, flips: list[tuple[int, int]],
                                                   pipe: bool) -> None:
    from nar_cases import GOOD

    data = bytearray(GOOD)
    for pos, value in flips:
        data[pos % len(data)] = value
    before = dump_tree(vol)
    dest = P(f"/fuzz/{len(before)}")
    stream = Pipe(bytes(data)) if pipe else io.BytesIO(bytes(data))
    try:
        got = restore_nar_into(vol, stream, dest)  # type: ignore[arg-type]
    except NarError as e:
        assert "\n" not in str(e)
        _no_trace(vol, before)
    else:
        assert b"".join(dump_volume(vol, dest)) == bytes(data)
        assert got.nar == nar_hash([bytes(data)])


def test_dump_of_a_sparse_file_is_nix_store_dump_of_its_zeros(vol: Volume,
                                                                 tmp_path: Path) -> None:
    """Holes are dumped as zeros, streamed (never a whole hole in memory): the dump equals
    Nix's of the same sparse host file, which reads its zeros, and so does the hash."""
    import tracemalloc

    host = tmp_path / "sparse"
    host.mkdir()
    rnd = random.Random(4)
    with open(host / "f", "wb") as f:
        f.write(rnd.randbytes(70_000))
        f.seek(40 << 20)
        f.write(rnd.randbytes(5000))
        f.truncate(96 << 20)
    TreeImporter(vol).run(host, P("/sparse"))
    with vol.store.read() as txn:
        v = vol.versions.get(txn, int(vol.namespace.resolve(txn, P("/sparse/f")).target))
    assert v.stored_size < 1 << 20, "imported as data, not holes"
    want = nix("nix-store", "--dump", str(host))
    tracemalloc.start()
    try:
        got = nar_hash(dump_volume(vol, P("/sparse")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"the dump held {peak} bytes: a hole was materialised"
    assert got == nar_hash([want])
    tracemalloc.start()
    try:
        with vol.store.read() as txn:
            assert hash_volume_in(vol, txn, P("/sparse")) == got
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"hash_volume_in held {peak} bytes: a hole was materialised"
    assert b"".join(dump_volume(vol, P("/sparse"))) == want
    assert str(got) == "sha256:" + nix("nix-hash", "--type", "sha256", "--base32",
                                       str(host)).decode().strip()
