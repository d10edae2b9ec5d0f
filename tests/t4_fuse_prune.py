"""Many random rewrites of one file through a real mount, then `gc --keep-last 3` under the
mount: the history shrinks to three versions, the space comes back, the store stays
consistent and the file reads as written (issue 18: rewrites kept every version forever).
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

from conftest import Mount
from fuse_helpers import annofs, new_mount, stop_and_check

from annofs.daemon.client import request

SIZE = 8 << 20
ROUND = 300  # rewrites per round


def du(store: Path) -> int:
    """Bytes the store takes on disk (allocated blocks, as `du` counts them)."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(store)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


def rewrite(f: Path, data: bytearray, rnd: random.Random, n: int) -> None:
    """n random overwrites, each through its own open/write/close (a version each)."""
    for _ in range(n):
        off = rnd.randrange(SIZE - 65536)
        chunk = rnd.randbytes(rnd.randrange(1, 65536))
        with open(f, "r+b") as h:
            h.seek(off)
            h.write(chunk)
        data[off:off + len(chunk)] = chunk


def fsck_json(store: Path) -> dict[str, object]:
    return json.loads(annofs("--store", str(store), "fsck", "--json").stdout)


def gc(store: Path, *args: str) -> dict[str, int]:
    return json.loads(annofs("--store", str(store), "gc", "--json", *args).stdout)


def settle(m: Mount) -> None:
    """Have the daemon store what open handles wrote (closes may still be pending)."""
    request(m.store, "commit")


def test_keep_last_under_the_mount_gives_the_space_back(mounted: Mount, tmp_path: Path) -> None:
    # The same rewrites into a second store that is never collected: what gc is measured
    # against (LMDB keeps its file size and reuses freed pages, a store of packs compacts:
    # either way the collected store must end well below the one that keeps everything).
    (tmp_path / "control").mkdir()
    control = new_mount(tmp_path / "control")
    try:
        stores = {}
        for m, seed in ((mounted, 18), (control, 18)):
            rnd = random.Random(seed)
            f = m.path / "f"
            data = bytearray(rnd.randbytes(SIZE))
            f.write_bytes(data)
            rewrite(f, data, rnd, ROUND)
            settle(m)
            stores[m.store] = (f, data, rnd)
        f, data, rnd = stores[mounted.store]
        before = fsck_json(mounted.store)
        assert before["ok"] and before["versions"] == ROUND + 2  # + the first write, the root

        rep = gc(mounted.store, "--keep-last", "3")
        assert rep["versions_freed"] == ROUND - 2 and rep["versions_kept"] == 4
        after = fsck_json(mounted.store)
        assert after["ok"], after["problems"]
        assert after["versions"] == 4
        # What the store holds is back near the file's size (three versions share most).
        assert after["fragment_bytes"] < SIZE * 1.2 < before["fragment_bytes"] / 2
        assert f.read_bytes() == data
        log = annofs("log", "--json", str(f)).stdout.splitlines()
        assert len(log) == 4 and json.loads(log[-1])["version"] == 0

        # More rounds of rewrites, gc after each in one store only.
        for _ in range(3):
            for m in (mounted, control):
                cf, cdata, crnd = stores[m.store]
                rewrite(cf, cdata, crnd, ROUND)
                settle(m)
            gc(mounted.store, "--keep-last", "3")
        collected, kept_all = du(mounted.store), du(control.store)
        assert collected < 0.8 * kept_all, (collected, kept_all)
        assert f.read_bytes() == data
        assert (control.path / "f").read_bytes() == stores[control.store][1]
    finally:
        stop_and_check(control)
    stop_and_check(mounted)


def test_keep_last_keeps_the_history_of_what_an_open_handle_holds(mounted: Mount) -> None:
    """A file unlinked while open: no name refers to its versions, the open handle does.
    gc --keep-last 2 keeps the held version and its parent (the rule applies to held
    versions as to named ones); once the handle is closed, the next gc frees both."""
    f = mounted.path / "f"
    contents = [random.Random(i).randbytes(3 << 20) for i in range(4)]
    for data in contents:
        f.write_bytes(data)
    ids = [json.loads(line)["version"] for line in
           annofs("log", "--json", str(f)).stdout.splitlines()]
    reader = open(f, "rb")  # noqa: SIM115 - held open across the gc on purpose
    try:
        f.unlink()
        rep = gc(mounted.store, "--keep-last", "2")
        assert rep["versions_freed"] == 2 and rep["versions_kept"] == 3  # + the empty root
        assert reader.read() == contents[-1]
        assert ok_cat(mounted, ids[1]) == contents[2]  # the held version's parent, kept
    finally:
        reader.close()
    rep = gc(mounted.store, "--keep-last", "2")
    assert rep["versions_freed"] == 2 and rep["bytes_freed"] >= 2 * (3 << 20)
    stop_and_check(mounted)


def ok_cat(m: Mount, vid: int) -> bytes:
    """A stored version's bytes, read from the store beside the daemon (no name has it)."""
    from annofs.volume import Volume

    vol = Volume.open(m.store)
    try:
        with vol.store.read() as txn:
            v = vol.versions.get(txn, vid)
            return vol.versions.read(txn, v, 0, v.size)
    finally:
        vol.close()
