"""O(1) copies through a live mount: the daemon makes them, the kernel sees them at once."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from conftest import Mount, annofs_cmd

from annofs.daemon import client as control
from annofs.errors import UsageError


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(annofs_cmd(*args), capture_output=True, text=True, check=check)


def test_cp_in_the_mount_shows_at_once_and_sides_stay_apart(mounted: Mount) -> None:
    src = mounted.path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("original\n")
    (src / "sub" / "b.txt").write_text("b\n")
    os.listdir(src)  # the kernel now caches the parent's entries and attributes
    run("cp", str(src), str(mounted.path / "copy"))
    copy = mounted.path / "copy"
    assert sorted(os.listdir(mounted.path)) == ["copy", "src"]
    assert (copy / "sub" / "b.txt").read_text() == "b\n"
    (copy / "a.txt").write_text("changed in the copy\n")
    (src / "sub" / "new").write_text("only in src\n")
    assert (src / "a.txt").read_text() == "original\n"
    assert not (copy / "sub" / "new").exists()
    assert (copy / "a.txt").read_text() == "changed in the copy\n"


def test_offline_writes_to_a_mounted_store_are_refused(mounted: Mount) -> None:
    (mounted.path / "f").write_text("x")
    res = run("--store", str(mounted.store), "cp", "/f", "/g", check=False)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "mounted at" in res.stderr
    assert not (mounted.path / "g").exists()


def test_control_channel_refuses_other_users(mounted: Mount) -> None:
    sock = control.socket_path(mounted.store)
    assert (os.stat(sock).st_mode & 0o777) == 0o600
    pid = os.fork()
    if pid == 0:  # a child that drops to nobody and tries to connect
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(sock))
            except PermissionError:
                os._exit(0)
            os._exit(1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_control_channel_answers_bad_requests(mounted: Mount) -> None:
    with pytest.raises(UsageError, match="unknown op"):
        control.request(mounted.store, "frobnicate")
    with pytest.raises(UsageError, match="list of names"):
        control.request(mounted.store, "cp", src="notalist", dst=["x"])
    with pytest.raises(UsageError, match="invalid name"):
        control.request(mounted.store, "cp", src=[".."], dst=["x"])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(control.socket_path(mounted.store)))
    s.sendall(b"{not json\n")
    assert b"not JSON" in s.recv(4096)
    s.close()
    assert control.request(mounted.store, "ping")["store"] == str(mounted.store.resolve())


def test_gc_under_the_mount_keeps_what_open_handles_read(mounted: Mount) -> None:
    f = mounted.path / "big"
    data = os.urandom(3 << 20)
    f.write_bytes(data)
    reader = open(f, "rb")  # noqa: SIM115 - held open across the gc on purpose
    try:
        f.unlink()  # no name refers to the version now; only the open handle
        out = run("--store", str(mounted.store), "gc")
        assert "freed 0 versions" in out.stdout
        assert reader.read() == data
    finally:
        reader.close()
    out = run("--store", str(mounted.store), "gc")
    assert "freed 1 versions" in out.stdout or "freed 2 versions" in out.stdout
    assert int(out.stdout.split("fragments, ")[1].split(" bytes")[0]) >= len(data)
