"""fsck finds planted damage precisely; --repair fixes bookkeeping and never loses data."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from conftest import annofs_cmd
from store_damage import damage, first_fragment, put_refcount

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
        put_refcount(vol, txn, h, 99)  # a wrong refcount
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
    damage(vol, h, "bit-flip")
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
        put_refcount(vol, txn, first_fragment(vol), 5)
    vol.close()
    bad = run("fsck")
    assert bad.returncode == 1 and "refcount 5" in bad.stdout
    fixed = run("fsck", "--repair")
    assert fixed.returncode == 0 and "repaired: fragment" in fixed.stdout


def test_an_interrupted_import_is_reported_reclaimable_and_gc_frees_exactly_that(
        vol: Volume, tmp_path: Path) -> None:
    """Ctrl-C during an import leaves its fragments; a killed import also its staging tree
    and versions. fsck says ok, and how much gc would free; gc then frees exactly that."""
    from annofs.maintenance.gc import collect

    src = make_tree(tmp_path / "src")
    TreeImporter(vol).run(src, [b"t"])
    rep = check_store(vol)
    assert rep.ok and not rep.reclaimable.any
    big = tmp_path / "big"
    rnd = random.Random(3)
    for i in range(40):
        (big / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (big / f"d{i % 4}" / f"f{i}").write_bytes(rnd.randbytes(30_000))
    seen = [0]

    def interrupt(files: int, nbytes: int) -> None:
        seen[0] += files
        if seen[0] >= 20:
            raise KeyboardInterrupt

    try:
        TreeImporter(vol, progress=interrupt, workers=1).run(big, [b"u"])
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the import was not interrupted")
    # Killed (kill -9) just before the staging tree would have been swapped in.
    killed = subprocess.run([sys.executable, "-c", f"""
import os
from pathlib import Path
from annofs.transfer.import_tree import LocalStaging, TreeImporter
from annofs.volume import Volume
class Killed(LocalStaging):
    def finish(self, root, dest):
        os._exit(9)
vol = Volume.open(Path({str(vol.store.path)!r}))
TreeImporter(vol).run(Path({str(tmp_path / "src")!r}), [b"v"], staging=Killed(vol))
"""], check=False)
    assert killed.returncode == 9
    rep = check_store(vol)
    assert rep.ok, rep.problems
    r = rep.reclaimable
    assert r.staging_trees == 1 and r.versions >= 1 and r.bytes >= 20 * 30_000
    res = subprocess.run(annofs_cmd("--store", str(vol.store.path), "fsck"),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == (
        f"reclaimable: {r.bytes} bytes in {r.fragments} fragments, {r.versions} versions "
        f"nothing refers to, 1 staging tree of interrupted imports; 'annofs gc' frees them")
    got = collect(vol)
    assert got.staging_dropped == 1
    assert (got.versions_freed, got.fragments_freed, got.bytes_freed) == \
        (r.versions, r.fragments, r.bytes)
    after = check_store(vol)
    assert after.ok and not after.reclaimable.any
    res = subprocess.run(annofs_cmd("--store", str(vol.store.path), "fsck", "--json"),
                         capture_output=True, text=True)
    j = json.loads(res.stdout)
    assert j["ok"] and j["reclaimable"] == {"versions": 0, "fragments": 0, "bytes": 0,
                                            "staging_trees": 0, "pack_bytes": 0}
