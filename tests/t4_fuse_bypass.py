"""Ways around the policy enforced at open(), each tried on a real mount (SECURITY.md
lists them with their results; the basic ones are in t4_fuse_trust.py).

Every test starts from t4_fuse_trust's `signed` mount: /src/proj signed by alice-1, a
rule requiring one signer under /src/**, none under /scratch/**.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd
from t4_fuse_trust import refused, signed, write_policy

__all__ = ["signed"]  # the fixture, used by name

PATCH = b"int evil(void) { return 666; }\n"


def patch_in_place(f: Path) -> None:
    """Overwrite the start of `f`, write-only (beside judged readers of a guarded file a
    read-write open is EBUSY)."""
    fd = os.open(f, os.O_WRONLY)
    try:
        os.write(fd, PATCH)
    finally:
        os.close(fd)


def proj(m: Mount) -> Path:
    return m.path / "src" / "proj"


def reload(m: Mount) -> None:
    res = subprocess.run(annofs_cmd("policy", "reload", str(m.path)), capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


# -- handles and the page cache ------------------------------------------------------------------


def test_mmap_of_a_verified_file_keeps_the_verified_bytes(signed: Mount) -> None:
    f = proj(signed) / "main.c"
    original = f.read_bytes()
    with open(f, "rb") as r:
        m = mmap.mmap(r.fileno(), 0, prot=mmap.PROT_READ)  # MAP_SHARED
        assert m[:] == original
        patch_in_place(f)  # another handle writes while the mapping lives
        assert m[:] == original
        m.close()
    assert refused(f)


def test_a_new_open_while_a_writer_holds_unflushed_bytes_is_judged_on_them(
        signed: Mount) -> None:
    f = proj(signed) / "main.c"
    with open(f, "r+b", buffering=0) as w:
        w.write(PATCH)  # not closed, not flushed
        with pytest.raises(OSError) as e:  # a judged read-write handle is open: EBUSY
            refused(f)
        assert e.value.errno == errno.EBUSY
    with open(f, "wb", buffering=0) as w:
        w.write(PATCH)  # not closed, not flushed
        assert refused(f)
    assert refused(f)


def test_cached_pages_of_the_verified_version_are_not_served_for_a_patch(
        signed: Mount) -> None:
    f = proj(signed) / "main.c"
    original = f.read_bytes()
    assert f.read_bytes() == original  # the kernel's page cache now holds it
    with open(f, "r+b") as w:
        w.write(b"X" * len(original))
    assert refused(f)
    with open(f, "wb") as w:  # back to the signed bytes (write-only: not judged)
        w.write(original)
    assert f.read_bytes() == original  # allowed again, and those bytes


def test_a_reader_opened_before_a_rename_over_the_path_keeps_its_version(
        signed: Mount) -> None:
    f = proj(signed) / "main.c"
    original = f.read_bytes()
    evil = signed.path / "scratch" / "evil.c"
    evil.parent.mkdir()
    evil.write_bytes(PATCH)
    with open(f, "rb") as r:
        os.rename(evil, f)  # a patched file renamed onto the signed path
        assert r.read() == original
    assert refused(f)


def test_a_verified_read_write_handle_is_the_only_writer(signed: Mount) -> None:
    """A read-write handle is judged at open but reads the file as it is (its own writes
    included): while it is open, no other handle may write what it would read."""
    f = proj(signed) / "main.c"
    original = f.read_bytes()
    with open(f, "r+b", buffering=0) as rw:
        for how in (lambda: os.open(f, os.O_RDWR), lambda: os.open(f, os.O_WRONLY),
                    lambda: os.open(f, os.O_WRONLY | os.O_TRUNC), lambda: os.truncate(f, 1)):
            with pytest.raises(OSError) as e:
                how()
            assert e.value.errno == errno.EBUSY
        assert rw.read() == original  # nothing another handle wrote
        rw.seek(0)
        rw.write(b"/* mine */")  # its own writes it reads back
        rw.seek(0)
        assert rw.read(10) == b"/* mine */"
        os.ftruncate(rw.fileno(), len(original))  # and truncates through itself
    assert refused(f)  # what it wrote is unsigned: the next open is refused
    with open(f, "wb"):  # a writer open first: a read-write open beside it is refused
        with pytest.raises(OSError) as e:
            os.open(f, os.O_RDWR)
        assert e.value.errno == errno.EBUSY


# -- other ways to open ---------------------------------------------------------------------------


def test_o_path_then_proc_fd_reopen_is_judged(signed: Mount) -> None:
    f = proj(signed) / "main.c"
    patch_in_place(f)
    fd = os.open(f, os.O_PATH)  # no FUSE open: nothing is read
    try:
        assert os.fstat(fd).st_size > 0
        with pytest.raises(OSError) as e:
            os.read(fd, 10)
        assert e.value.errno == errno.EBADF
        assert refused(Path(f"/proc/self/fd/{fd}"))  # a real open: judged
    finally:
        os.close(fd)


def test_executing_a_patched_file_is_refused(signed: Mount) -> None:
    script = proj(signed) / "run.sh"
    script.write_text("#!/bin/sh\necho unsigned\n")
    script.chmod(0o755)
    with pytest.raises(PermissionError):
        subprocess.run([str(script)], check=False)
    res = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert res.returncode != 0 and "Permission denied" in res.stderr


def test_name_to_handle_at_offers_no_way_around_open(signed: Mount) -> None:
    """The mount has no export support: no file handle to open by (and opening by handle
    would be a FUSE open too)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint.from_buffer(buf).value = 128
    mount_id = ctypes.c_int()
    rc = libc.name_to_handle_at(-100, os.fsencode(proj(signed) / "main.c"), buf,
                                ctypes.byref(mount_id), 0)
    if rc == 0:  # then opening by the handle must be judged like any open
        patch_in_place(proj(signed) / "main.c")
        mfd = os.open(signed.path, os.O_RDONLY)
        try:
            fd = libc.open_by_handle_at(mfd, buf, os.O_RDONLY)
            if fd >= 0:
                os.close(fd)
            assert fd < 0 and ctypes.get_errno() in (errno.EACCES, errno.ESTALE,
                                                     errno.EOPNOTSUPP), ctypes.get_errno()
        finally:
            os.close(mfd)
    else:
        assert ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOTSUP)


# -- names: links, renames, copies ---------------------------------------------------------------


def test_renaming_a_hard_linked_file_across_rules_is_exdev(signed: Mount) -> None:
    os.link(proj(signed) / "main.c", proj(signed) / "twin.c")  # same rule: fine
    (signed.path / "scratch").mkdir()
    with pytest.raises(OSError) as e:
        os.rename(proj(signed) / "twin.c", signed.path / "scratch" / "twin.c")
    assert e.value.errno == errno.EXDEV
    patch_in_place(proj(signed) / "twin.c")  # one content, two names: both refused
    assert refused(proj(signed) / "main.c") and refused(proj(signed) / "twin.c")


def test_a_patched_file_moved_out_is_readable_only_where_the_policy_allows(
        signed: Mount) -> None:
    """Rules are per path: unsigned content is fine under /scratch (signers = 0), so a
    patched file renamed or `annofs cp`ed there reads there, and refused back under /src."""
    f = proj(signed) / "main.c"
    patch_in_place(f)
    scratch = signed.path / "scratch"
    scratch.mkdir()
    subprocess.run(annofs_cmd("cp", str(f), str(scratch / "copy.c")), check=True,
                   capture_output=True)
    assert (scratch / "copy.c").read_bytes().startswith(PATCH)
    os.rename(f, scratch / "moved.c")
    assert (scratch / "moved.c").read_bytes().startswith(PATCH)
    os.rename(scratch / "moved.c", f)
    assert refused(f)


def test_coreutils_cp_inside_the_mount(signed: Mount) -> None:
    f = proj(signed) / "main.c"
    scratch = signed.path / "scratch"
    scratch.mkdir()
    res = subprocess.run(["cp", str(f), str(scratch / "ok.c")], capture_output=True)
    assert res.returncode == 0  # signed: cp may read it
    patch_in_place(f)
    res = subprocess.run(["cp", str(f), str(scratch / "bad.c")], capture_output=True,
                         text=True)
    assert res.returncode != 0 and "Permission denied" in res.stderr
    (scratch / "new.c").write_bytes(PATCH)
    subprocess.run(["cp", str(scratch / "new.c"), str(proj(signed) / "new.c")], check=True)
    assert refused(proj(signed) / "new.c")


def test_symlinks_resolve_to_the_protected_name(signed: Mount) -> None:
    f = proj(signed) / "main.c"
    patch_in_place(f)
    scratch = signed.path / "scratch"
    scratch.mkdir()
    os.symlink("../src/proj/main.c", scratch / "rel.c")
    os.symlink(str(f), scratch / "abs.c")
    assert refused(scratch / "rel.c") and refused(scratch / "abs.c")


# -- attributes ------------------------------------------------------------------------------------


def test_the_computed_xattrs_cannot_be_written(signed: Mount) -> None:
    f = proj(signed) / "main.c"
    patch_in_place(f)
    for name in ("user.annofs.status", "user.annofs.digest", "user.annofs.version",
                 "user.annofs.why", "user.annofs.anything"):
        with pytest.raises(OSError) as e:
            os.setxattr(f, name, b"allowed; signers: alice-1")
        assert e.value.errno == errno.EPERM
        with pytest.raises(OSError) as e:
            os.removexattr(f, name)
        assert e.value.errno in (errno.EPERM, errno.ENODATA)
    for name in ("trusted.annofs.status", "security.annofs"):
        with pytest.raises(OSError) as e:
            os.setxattr(f, name, b"x")
        assert e.value.errno in (errno.EOPNOTSUPP, errno.EPERM)
    os.setxattr(f, "user.signed", b"yes")  # an ordinary attribute changes nothing
    assert refused(f)
    assert os.getxattr(f, "user.annofs.status").startswith(b"refused")


def test_chmod_chown_and_times_do_not_change_the_verdict(signed: Mount) -> None:
    f = proj(signed) / "main.c"
    st = f.stat()
    f.chmod(0o777)
    os.chown(f, 1234, 1234)
    os.utime(f, ns=(0, 0))
    assert not refused(f)  # metadata is not content
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    patch_in_place(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # a patch with the old mtime
    assert refused(f)


# -- the policy -----------------------------------------------------------------------------------


@pytest.mark.expected_log("policy reload failed")
def test_reload_to_enforce_refuses_new_opens_but_not_handles_already_open(
        signed: Mount, tmp_path: Path) -> None:
    f = proj(signed) / "main.c"
    policy = tmp_path / "policy.toml"
    write_policy(policy, mode="off")
    reload(signed)
    patch_in_place(f)
    with open(f, "rb") as r:  # allowed while off
        assert r.read().startswith(PATCH)
        write_policy(policy, mode="enforce")
        reload(signed)
        assert refused(f)  # the kernel's cached pages do not answer an open
        r.seek(0)
        assert r.read().startswith(PATCH)  # documented: open handles are not revoked
    policy.write_text('mode = "off"\nbogus = 1\n')  # a broken policy keeps enforcing
    res = subprocess.run(annofs_cmd("policy", "reload", str(signed.path)), capture_output=True,
                         text=True)
    assert res.returncode == 2
    assert refused(f)


@pytest.mark.expected_log("policy reload failed")
def test_a_key_file_pointing_into_the_mount_is_refused(signed: Mount, tmp_path: Path) -> None:
    """Regression: a trusted key read through the mount could be replaced by anyone who
    may write there, and reading it on reload went through the daemon's own mount."""
    scratch = signed.path / "scratch"
    scratch.mkdir()
    (scratch / "mallory.public").write_text((tmp_path / "keys" / "alice-1.public").read_text())
    os.symlink(scratch / "mallory.public", tmp_path / "keys" / "mallory.public")
    t0 = time.monotonic()
    res = subprocess.run(annofs_cmd("policy", "reload", str(signed.path)), capture_output=True,
                         text=True, timeout=60)
    assert time.monotonic() - t0 < 30
    assert res.returncode == 2 and "outside the mount" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1
    assert (proj(signed) / "main.c").read_bytes()  # the old policy is in force


def test_policy_and_keys_cannot_be_reached_through_the_mount(signed: Mount,
                                                            tmp_path: Path) -> None:
    signed.stop()
    inside = signed.path / "etc"
    res = subprocess.run(annofs_cmd("--store", str(signed.store), "mount", "--policy",
                                    str(tmp_path / "via-link.toml"), str(signed.path)),
                         capture_output=True, text=True)
    assert res.returncode == 2  # no such file yet
    os.symlink(inside / "policy.toml", tmp_path / "via-link.toml")
    res = subprocess.run(annofs_cmd("--store", str(signed.store), "mount", "--policy",
                                    str(tmp_path / "via-link.toml"), str(signed.path)),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "outside the mount" in res.stderr, res.stderr
    signed.start("--policy", str(tmp_path / "policy.toml"))
    assert (proj(signed) / "main.c").read_bytes()


def test_a_directory_moved_across_rules_with_a_hard_link_inside(signed: Mount) -> None:
    """Moving a directory does not look for hard links inside it, so one file can get
    names under two rules after all. Regression: the open through the strict name was
    judged under the loose name (the inode's first), and read the patch; now every name
    of a hard-linked file is judged and the strictest verdict holds."""
    sub = proj(signed) / "sub"
    sub.mkdir()
    (sub / "a.c").write_bytes((proj(signed) / "main.c").read_bytes())
    os.link(sub / "a.c", proj(signed) / "b.c")
    scratch = signed.path / "scratch"
    scratch.mkdir()
    os.rename(sub, scratch / "sub")
    assert os.stat(scratch / "sub" / "a.c").st_nlink == 2
    with open(scratch / "sub" / "a.c", "r+b") as w:
        w.write(PATCH)
    assert refused(proj(signed) / "b.c")
    # Known: while the kernel also knows the strict name, the loose one is refused too.
    assert refused(scratch / "sub" / "a.c")


def test_odd_names_do_not_escape_a_rule(signed: Mount) -> None:
    """Undecodable bytes, a leading dot, a newline, a glob character: each name is still
    under /src/**, and unsigned content there is refused."""
    base = os.fsencode(proj(signed))
    for name in (b"\xff\xfe.c", b".hidden", b"new\nline.c", b"star*.c", b"[x].c", b"..c"):
        path = os.path.join(base, name)
        with open(path, "wb") as w:
            w.write(PATCH)
        assert refused(Path(os.fsdecode(path))), name
