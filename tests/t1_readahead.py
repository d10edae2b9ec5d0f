"""annofs.daemon.readahead: finding the mount's device and raising its readahead window."""

from __future__ import annotations

from pathlib import Path

from annofs.daemon.readahead import mount_device, raise_readahead

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
42 22 0:39 / /tmp/a\\040b rw,nosuid,nodev,relatime - fuse.annofs annofs rw,user_id=0
43 42 0:40 / /tmp/a\\040b rw,nosuid,nodev,relatime - fuse.annofs annofs rw,user_id=0
44 22 0:41 / /tmp/other rw - fuse.annofs annofs rw
"""


def test_mount_device_is_the_topmost_mount_at_the_escaped_path(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert mount_device(Path("/tmp/a b"), info) == "0:40"
    assert mount_device(Path("/tmp/other"), info) == "0:41"
    assert mount_device(Path("/tmp/none"), info) is None


def test_raise_readahead_raises_never_lowers_and_gives_up_quietly(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    bdi = tmp_path / "bdi"
    (bdi / "0:41").mkdir(parents=True)
    knob = bdi / "0:41" / "read_ahead_kb"
    knob.write_text("128\n")
    assert raise_readahead(Path("/tmp/other"), 4096, bdi, info) == 4096
    assert knob.read_text() == "4096"
    knob.write_text("8192\n")
    assert raise_readahead(Path("/tmp/other"), 4096, bdi, info) == 8192  # not lowered
    assert raise_readahead(Path("/tmp/a b"), 4096, bdi, info) is None  # no such knob
    assert raise_readahead(Path("/tmp/none"), 4096, bdi, info) is None
