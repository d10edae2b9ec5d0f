"""The smallest real-mount check: write, read back, survive a remount."""

from __future__ import annotations

from conftest import Mount


def test_write_read_remount(mounted: Mount) -> None:
    f = mounted.path / "hello.txt"
    f.write_bytes(b"hello, world\n")
    assert f.read_bytes() == b"hello, world\n"
    mounted.stop()
    assert not f.exists()
    mounted.start()
    assert f.read_bytes() == b"hello, world\n"
