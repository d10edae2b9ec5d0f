"""A machine crash (power loss), simulated on the LMDB file: SPEC §2 and §9 promise that
fsynced data survives it and that the store is consistent afterwards.

Commits do not fsync, so after a power loss the disk holds the last synced state plus any
subset of the pages written since, meta pages included, in any order. The crash images
here are exactly that: the data file as it was at a sync, with a random subset of the
4 KiB pages that later commits changed. Without the saved meta pages every such image
was unreadable (MDB_CORRUPTED, MDB_PAGE_NOTFOUND, LMDB assertions aborting the process,
or an empty store); with them, the store opens at the synced state, and fsck passes.
Pack files (store.packs) are as they were at the sync, with any part of what was appended
since, or garbage, past that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import stat
import subprocess
import sys
from array import array
from pathlib import Path

import blake3
import pytest

from annofs.content.fragments import fragment_hash
from annofs.content.versions import EMPTY_VERSION
from annofs.namespace.tree import new_file_attrs
from annofs.store.env import boot_id, read_synced_meta, write_synced_meta
from annofs.volume import Volume

PAGE = 4096
IMAGES = 40 if os.environ.get("ANNOFS_FULL") == "1" else 12


def put_file(vol: Volume, name: bytes, data: bytes) -> None:
    """One file at the root, in its own transaction (as the mount commits a close)."""
    h = fragment_hash(data)
    vol.fragments.put_many([(h, data)])
    with vol.store.write() as txn:
        v = vol.versions.create(txn, EMPTY_VERSION, h, array("I", [len(data)]),
                                blake3.blake3(data).digest())
        d = vol.namespace.writable_dir(txn, [])
        if vol.namespace.get(txn, d, name) is not None:
            vol.namespace.remove(txn, d, name, want_dir=False)
        vol.namespace.create(txn, d, name, dataclasses.replace(
            new_file_attrs(stat.S_IFREG | 0o644, 0, 0), target=v.id, size=len(data)))


# Run in a child: a damaged LMDB may abort the process in an assertion.
_PROBE = """
import json, sys
from pathlib import Path
from annofs.maintenance.fsck import check_store
from annofs.volume import Volume
vol = Volume.open(Path(sys.argv[1]))
rep = check_store(vol)
files = {}
with vol.store.read() as txn:
    root = int(vol.namespace.root(txn).target)
    for name, a in vol.namespace.listdir(txn, root):
        v = vol.versions.get(txn, int(a.target))
        files[name.decode()] = b"".join(vol.versions.iter_bytes(txn, v)).hex()
vol.close()
print(json.dumps({"problems": rep.problems, "files": files}))
"""


def probe(store: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", _PROBE, str(store)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, f"opening the crash image failed ({res.returncode}):\n" \
                                f"{res.stderr[-3000:]}"
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The data file at a sync (with its saved meta) and after later unsynced commits."""
    base = tmp_path_factory.mktemp("powerloss")
    rnd = random.Random(1)
    vol = Volume.open(base / "s", create=True)
    synced: dict[str, bytes] = {}
    try:
        for i in range(300):
            synced[f"a{i}"] = rnd.randbytes(rnd.randrange(1, 3000))
            put_file(vol, f"a{i}".encode(), synced[f"a{i}"])
        vol.store.sync()  # what fsync through the mount does
        s0 = (base / "s" / "db" / "data.mdb").read_bytes()
        p0 = pack_files(base / "s")
        saved = read_synced_meta(base / "s")
        assert saved is not None and saved.boot == boot_id()
        vol.store.sync_interval = None  # nothing synced from here: the crash window
        later = dict(synced)
        for i in range(300):
            later[f"b{i}"] = rnd.randbytes(rnd.randrange(1, 3000))
            put_file(vol, f"b{i}".encode(), later[f"b{i}"])
        for i in range(0, 300, 2):
            later[f"a{i}"] = b"changed after the sync"
            put_file(vol, f"a{i}".encode(), later[f"a{i}"])
        s1 = (base / "s" / "db" / "data.mdb").read_bytes()  # the page cache: all commits
        p1 = pack_files(base / "s")
    finally:
        vol.close()
    assert p0 and any(len(p1[n]) > len(p0.get(n, b"")) for n in p1), "no pack grew"
    return {"base": base, "s0": s0, "s1": s1, "p0": p0, "p1": p1, "saved": saved,
            "synced": synced, "later": later}


def pack_files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (store / "packs").iterdir()}


def crashed_packs(states: dict, rnd: random.Random) -> dict[str, bytes]:
    """Each pack as fsynced at the sync, then any prefix of what was appended since (or as
    much garbage): the disk may have written any of it."""
    out = {}
    for name, later in states["p1"].items():
        synced = states["p0"].get(name)
        if synced is None and rnd.random() < 0.5:
            continue  # created after the sync, never reached the disk
        synced = synced or b""
        tail = later[len(synced):][:rnd.randrange(len(later) - len(synced) + 1)]
        if rnd.random() < 0.3:
            tail = rnd.randbytes(len(tail))
        out[name] = synced + tail
    return out


def image(states: dict, name: str, pages: bytes, boot: str,
          packs: dict[str, bytes] | None = None) -> Path:
    d = states["base"] / name / "db"
    d.mkdir(parents=True)
    (d / "data.mdb").write_bytes(pages)
    (d.parent / "packs").mkdir()
    for pack, data in (states["p1"] if packs is None else packs).items():
        (d.parent / "packs" / pack).write_bytes(data)
    write_synced_meta(d.parent, dataclasses.replace(states["saved"], boot=boot))
    return d.parent


def hexed(files: dict[str, bytes]) -> dict[str, str]:
    return {k: v.hex() for k, v in files.items()}


@pytest.mark.parametrize("seed", range(IMAGES))
def test_power_loss_comes_back_at_the_last_sync(states: dict, seed: int) -> None:
    s0, s1 = states["s0"], states["s1"]
    s0 = s0 + bytes(len(s1) - len(s0))
    changed = [i for i in range(len(s1) // PAGE) if s1[i * PAGE:(i + 1) * PAGE] !=
               s0[i * PAGE:(i + 1) * PAGE]]
    assert 0 in changed or 1 in changed, "no meta page changed: the window holds no commit"
    rnd = random.Random(seed)
    keep = rnd.choice([0.1, 0.5, 0.9])
    pages = bytearray(s0)
    for i in changed:
        if rnd.random() < keep or (seed % 3 == 0 and i < 2):  # some with the new metas
            pages[i * PAGE:(i + 1) * PAGE] = s1[i * PAGE:(i + 1) * PAGE]
    store = image(states, f"img{seed}", bytes(pages), "a boot before the crash",
                  crashed_packs(states, rnd))
    got = probe(store)
    assert got["problems"] == []
    assert got["files"] == hexed(states["synced"])  # every fsynced file; nothing after it
    assert read_synced_meta(store).boot == boot_id()  # recovered once, in this boot


def test_a_killed_process_keeps_everything_it_committed(states: dict) -> None:
    """Same boot: the page cache held every commit, so nothing is rolled back."""
    store = image(states, "killed", states["s1"], boot_id())
    got = probe(store)
    assert got["problems"] == []
    assert got["files"] == hexed(states["later"])


def test_without_saved_metas_the_images_are_damaged_and_fsck_says_so(states: dict) -> None:
    """What the saved meta pages prevent (so the test above can fail), and that fsck
    answers a damaged LMDB file with a finding, not a traceback (LMDB itself may still
    abort on some damage: SIGABRT, -6)."""
    s0, s1 = states["s0"], states["s1"]
    s0 = s0 + bytes(len(s1) - len(s0))
    codes = []
    for seed in range(6):
        rnd = random.Random(seed)
        pages = bytearray(s0)
        for i in range(len(s1) // PAGE):
            if i < 2 or rnd.random() < 0.5:
                pages[i * PAGE:(i + 1) * PAGE] = s1[i * PAGE:(i + 1) * PAGE]
        d = states["base"] / f"bare{seed}" / "db"
        d.mkdir(parents=True)
        (d / "data.mdb").write_bytes(bytes(pages))
        res = subprocess.run([sys.executable, "-m", "annofs.cli.main", "--store",
                              str(d.parent), "fsck"], capture_output=True, text=True,
                             timeout=120)
        assert "Traceback" not in res.stderr, "\n" + res.stderr[-1500:]
        codes.append(res.returncode)
    assert all(c in (1, 2, -6) for c in codes), codes
    assert any(c in (1, 2) for c in codes), codes


def test_an_older_synced_state_never_replaces_a_newer_record(tmp_path: Path) -> None:
    """Several processes sync one store (an importer and its readers): the record is
    always the newest synced state, whose pages the pins protect."""
    from annofs.store.env import _save_metas, meta_txnid

    vol = Volume.open(tmp_path / "s", create=True)
    try:
        put_file(vol, b"x", b"one")
        vol.store.sync()
        older = read_synced_meta(tmp_path / "s")
        put_file(vol, b"y", b"two")
        vol.store.sync()
        newer = read_synced_meta(tmp_path / "s")
        assert older is not None and newer is not None
        assert meta_txnid(newer.metas) > meta_txnid(older.metas)
        _save_metas(tmp_path / "s", older.metas)  # a slower process's sync, finishing late
        assert read_synced_meta(tmp_path / "s").metas == newer.metas
    finally:
        vol.close()


def test_sync_inside_a_write_transaction_is_an_error_not_a_hang(tmp_path: Path) -> None:
    vol = Volume.open(tmp_path / "s", create=True)
    try:
        with pytest.raises(RuntimeError, match="inside a write transaction"), \
                vol.store.write():
            vol.store.sync()
        vol.store.sync()  # outside: fine
    finally:
        vol.close()
