"""`annofs umount` gives LMDB's free pages back once the daemon has let go of the store."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import Mount, annofs_cmd
from t2_store_compact import churn, tree_ok


def test_umount_compacts_the_store_the_daemon_let_go(tmp_path: Path) -> None:
    store, mp = tmp_path / "s", tmp_path / "mnt"
    files = churn(store, tmp_path)  # 3 MiB and more of free pages
    mp.mkdir()
    size = (store / "db" / "data.mdb").stat().st_size
    m = Mount(store, mp)
    m.start()
    try:
        name, data = next(iter(files.items()))
        assert (mp / "src" / name).read_bytes() == data
        (mp / "src" / "new.txt").write_bytes(b"written through the mount\n")
        done = subprocess.run(annofs_cmd("umount", str(mp)), capture_output=True, text=True)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert m.proc is not None
        m.proc.wait(timeout=30)
        m.proc = None
    finally:
        m.stop()
    assert not os.path.ismount(mp)
    assert m.log_problems() == []
    assert (store / "db" / "data.mdb").stat().st_size < size - (3 << 20)
    tree_ok(store, {**files, "new.txt": b"written through the mount\n"}, tmp_path / "out")
