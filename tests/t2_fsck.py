"""fsck finds planted damage precisely; --repair fixes bookkeeping and never loses data."""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

from conftest import annofs_cmd

from annofs.maintenance.fsck import check_store
from annofs.maintenance.repair import repair_store
from annofs.store.keys import u64
from annofs.store.records import DirHeader, decode_dir, encode_dir
from annofs.transfer.export_tree import TreeExporter
from annofs.transfer.import_tree import TreeImporter
from annofs.volume import Volume


def make_tree(root: Path) -> Path:
    rnd = random.Random(9)
    for i in range(12):
        d = root / f"d{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rnd.randbytes(rnd.choice([200, 40_000])))
    (root / "d0" / "f0").rename(root / "d0" / "keep")
    (root / "d1" / "hard").hardlink_to(root / "d0" / "keep")
    return root


def first_fragment(vol: Volume) -> bytes:
    with vol.store.read() as txn, txn.cursor(db=vol.store.db["fragments"]) as cur:
        cur.first()
        return bytes(cur.key())


def test_planted_damage_is_found_and_bookkeeping_repaired(vol: Volume, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    TreeImporter(vol).run(src, [b"t"])
    assert check_store(vol).ok
    h = first_fragment(vol)
    with vol.store.read() as txn:
        root_dir = int(vol.namespace.root(txn).target)
        t_dir = int(vol.namespace.resolve(txn, [b"t"]).target)
    with vol.store.write() as txn:
        db = vol.store.db
        txn.put(h, struct.pack(">Q", 99), db=db["fragrefs"])  # a wrong refcount
        hdr = decode_dir(t_dir, txn.get(u64(t_dir), db=db["dirs"]))
        txn.put(u64(t_dir), encode_dir(DirHeader(hdr.refcount + 3, 7)), db=db["dirs"])
        txn.put(u64(424242), encode_dir(DirHeader(1, 0)), db=db["dirs"])  # a lost node
    problems = check_store(vol).problems
    assert any(h.hex() in p and "refcount 99" in p for p in problems)
    assert any(f"directory {t_dir}: refcount" in p for p in problems)
    assert any(f"directory {t_dir}: nsubdirs 7" in p for p in problems)
    assert any("directory 424242" in p for p in problems)
    fixed = repair_store(vol)
    assert any("424242" in f and "dropped" in f for f in fixed)
    assert check_store(vol).ok, check_store(vol).problems
    out = tmp_path / "out"
    TreeExporter(vol).run([b"t"], out)  # every file still there, byte for byte
    for f in src.rglob("*"):
        if f.is_file():
            assert (out / f.relative_to(src)).read_bytes() == f.read_bytes()
    assert (out / "d0" / "keep").stat().st_ino == (out / "d1" / "hard").stat().st_ino
    assert root_dir


def test_corrupt_fragment_is_reported_not_repaired(vol: Volume, tmp_path: Path) -> None:
    TreeImporter(vol).run(make_tree(tmp_path / "src"), [b"t"])
    h = first_fragment(vol)
    with vol.store.write() as txn:
        raw = bytearray(txn.get(h, db=vol.store.db["fragments"]))
        raw[len(raw) // 2] ^= 0x10
        txn.put(h, bytes(raw), db=vol.store.db["fragments"])
    assert f"fragment {h.hex()}: content does not match its hash" in check_store(vol).problems
    repair_store(vol)
    assert f"fragment {h.hex()}: content does not match its hash" in check_store(vol).problems


def test_fsck_command_exit_status(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run = lambda *a: subprocess.run(annofs_cmd("--store", str(store), *a),  # noqa: E731
                                    capture_output=True, text=True)
    assert run("init").returncode == 0
    assert run("import", str(make_tree(tmp_path / "src")), "/t").returncode == 0
    ok = run("fsck")
    assert ok.returncode == 0 and ": ok" in ok.stdout
    vol = Volume.open(store)
    with vol.store.write() as txn:
        txn.put(first_fragment(vol), struct.pack(">Q", 5), db=vol.store.db["fragrefs"])
    vol.close()
    bad = run("fsck")
    assert bad.returncode == 1 and "refcount 5" in bad.stdout
    fixed = run("fsck", "--repair")
    assert fixed.returncode == 0 and "repaired: fragment" in fixed.stdout


class _Interrupted:
    """Staging that is interrupted (Ctrl-C) just before the swap: every file was read
    and stored, nothing names it."""

    def __init__(self, vol: Volume) -> None:
        from annofs.transfer.import_tree import LocalStaging

        self.local = LocalStaging(vol)

    def begin(self, dest: list[bytes]) -> str:
        return self.local.begin(dest)

    def finish(self, root: str, dest: list[bytes]) -> None:
        raise KeyboardInterrupt


def test_fsck_reports_what_an_interrupted_import_left_and_gc_frees_exactly_that(
        vol: Volume, tmp_path: Path) -> None:
    from annofs.maintenance.gc import collect

    TreeImporter(vol).run(make_tree(tmp_path / "kept"), [b"kept"])
    clean = check_store(vol)
    assert clean.ok and not clean.reclaimable
    src = tmp_path / "big"
    rnd = random.Random(3)
    for i in range(30):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}").write_bytes(rnd.randbytes(30_000 + i))
    try:
        TreeImporter(vol).run(src, [b"big"], staging=_Interrupted(vol))
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the import was not interrupted")
    rep = check_store(vol)
    assert rep.ok, rep.problems
    # 30 new files nobody names; their bytes are all new (random), so all reclaimable.
    assert rep.reclaimable_versions == 30
    assert rep.reclaimable_bytes >= sum(30_000 + i for i in range(30))
    freed = collect(vol)
    assert freed.versions_freed == rep.reclaimable_versions
    assert freed.fragments_freed == rep.reclaimable_fragments
    assert freed.bytes_freed == rep.reclaimable_bytes
    after = check_store(vol)
    assert after.ok and not after.reclaimable


def test_fsck_command_names_reclaimable_space_and_the_command_that_frees_it(
        tmp_path: Path) -> None:
    store = tmp_path / "store"
    run = lambda *a: subprocess.run(annofs_cmd("--store", str(store), *a),  # noqa: E731
                                    capture_output=True, text=True)
    assert run("init").returncode == 0
    src = make_tree(tmp_path / "src")
    assert run("import", str(src), "/t").returncode == 0
    assert "reclaimable" not in run("fsck").stdout
    (src / "d2" / "f2").write_bytes(b"changed")
    (src / "d0" / "keep").unlink()
    (src / "d1" / "hard").unlink()
    assert run("import", str(src), "/t").returncode == 0
    out = run("fsck")
    # The replaced versions are history (kept); the removed file's is not.
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reclaimable: 1 versions" in out.stdout and "`annofs gc` frees them" in out.stdout
    assert run("gc").returncode == 0
    assert "reclaimable" not in run("fsck").stdout
