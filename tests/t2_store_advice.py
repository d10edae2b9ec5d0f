"""annofs.store.advice: the LMDB map found in this process, advised random and back."""

from __future__ import annotations

import threading
from pathlib import Path

from annofs.store.advice import MapAdvice, find_map, random_access
from annofs.volume import Volume


def _vma_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping at `addr`, from /proc/self/smaps."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            current = lo <= addr < hi
        elif current and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping at {addr:#x}")


def test_the_map_is_found_and_advised_random_only_inside(vol: Volume) -> None:
    found = find_map(Path(vol.store.path) / "db" / "data.mdb")
    assert found is not None
    addr, length = found
    assert length >= 1 << 30  # LMDB maps its whole map size, not the file
    assert "rr" not in _vma_flags(addr)  # MADV_RANDOM shows as "rr"
    with random_access(vol.store):
        assert "rr" in _vma_flags(addr)
        with random_access(vol.store):  # nested: the outer block still wants it
            pass
        assert "rr" in _vma_flags(addr)
        with vol.store.read() as txn:  # reads still work, and the same
            assert vol.store.get_meta(txn, "format") is not None
    assert "rr" not in _vma_flags(addr)


def test_overlapping_users_in_threads_restore_normal_at_the_end(vol: Volume) -> None:
    advice = MapAdvice(vol.store)
    addr = find_map(Path(vol.store.path) / "db" / "data.mdb")[0]  # type: ignore[index]
    inside = threading.Barrier(3)
    done = threading.Event()

    def user() -> None:
        with advice.random_access():
            inside.wait()
            done.wait(5)

    threads = [threading.Thread(target=user) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert "rr" in _vma_flags(addr)
    done.set()
    for t in threads:
        t.join()
    assert "rr" not in _vma_flags(addr)


def test_no_map_means_no_advice(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "data.mdb").write_bytes(b"")
    assert find_map(tmp_path / "db" / "data.mdb") is None
