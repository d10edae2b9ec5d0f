"""`annofs nix fetch` registers what it adds in the real Nix's database (Nix 2.8, as
root): a chroot store `local?root=R` whose R/nix/store is an annofs mount, fetched into
mounted (from a cache directory and over HTTP) and offline (`--nix-root`); right after,
Nix holds the paths valid, knows their references, and `--verify --check-contents`
passes; the trees carry Nix's canonical metadata."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd
from t4_nix_real import NixWorld, nixw, run, write_policy

__all__ = ["nixw"]  # a pytest fixture, found by name in this module


def nix_store(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(["nix-store", "--store", f"local?root={root}", *args])


def init_nix_root(root: Path) -> Path:
    """Make R's (empty) database, R/nix/var/nix/db, by Nix itself (it also makes
    R/nix/store/.links: after mounting there, in the mount)."""
    ok = nix_store(root, "--check-validity", "--print-invalid")
    assert ok.returncode == 0, ok.stderr
    assert (root / "nix" / "var" / "nix" / "db" / "db.sqlite").is_file()
    return root


def check_valid(root: Path, w: NixWorld) -> None:
    """What the real Nix says of the fetched closure."""
    for p in (w.dep, w.top):
        ok = nix_store(root, "--verify-path", p)
        assert ok.returncode == 0, ok.stderr
    refs = nix_store(root, "-q", "--references", w.top)
    assert refs.returncode == 0 and refs.stdout.split() == [w.dep], refs
    size = nix_store(root, "-q", "--size", w.top)
    assert size.returncode == 0 and int(size.stdout) > 0
    check = nix_store(root, "--verify", "--check-contents")
    assert check.returncode == 0, check.stderr
    assert "corrupted" not in check.stderr and "invalid" not in check.stderr


def check_canonical(tree: Path) -> None:
    """Nix's canonical metadata: no write bits, r-x or r-- for all, mtime 1, our owner."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [".", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            seen += 1
            assert st.st_uid == os.geteuid()
            if stat.S_ISLNK(st.st_mode):
                continue
            assert st.st_mtime == 1, (dirpath, name)
            assert stat.S_IMODE(st.st_mode) in (0o444, 0o555), (dirpath, name, st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                assert stat.S_IMODE(st.st_mode) == 0o555
    assert seen >= 5


@pytest.fixture
def chroot_mount(mounted: Mount, tmp_path: Path) -> Mount:
    """The `mounted` store, mounted again at R/nix/store of a Nix root R."""
    mounted.stop()
    mounted.path = tmp_path / "R" / "nix" / "store"
    mounted.path.mkdir(parents=True)
    mounted.start()
    init_nix_root(tmp_path / "R")
    return mounted


@pytest.mark.parametrize("over", ["directory", "http"])
def test_fetch_into_a_mounted_chroot_store_registers(chroot_mount: Mount, nixw: NixWorld,
                                                      tmp_path: Path, over: str) -> None:
    from cache_server import serve_cache

    root = chroot_mount.path.parent.parent
    pol = write_policy(tmp_path / "policy.toml", nixw)
    # Not valid before: a tree alone is not a store path to Nix.
    assert nix_store(root, "--verify-path", nixw.top).returncode != 0

    def fetch(cache: str) -> subprocess.CompletedProcess[str]:
        # Over HTTP without --dest: a mount at R/nix/store is where store paths go.
        dest = [] if over == "http" else ["--dest", str(chroot_mount.path)]
        return run(annofs_cmd("--store", str(chroot_mount.store), "nix", "fetch", "--cache",
                              cache, "--policy", str(pol), *dest, "--recursive", nixw.top))

    if over == "http":
        with serve_cache(nixw.caches["xz"]) as url:
            res = fetch(url)
    else:
        res = fetch(str(nixw.caches["zstd"]))
    assert res.returncode == 0, res.stderr
    assert f"registered {nixw.dep} in local?root={root}" in res.stdout
    assert f"registered {nixw.top} in local?root={root}" in res.stdout
    check_valid(root, nixw)
    check_canonical(chroot_mount.path / nixw.top.split("/")[-1])
    # Again: present and valid, nothing registered twice.
    again = fetch(str(nixw.caches["none"]))
    assert again.returncode == 0 and "already present" in again.stdout
    assert "registered" not in again.stdout
    check_valid(root, nixw)


def test_offline_fetch_registers_with_nix_root(mounted: Mount, nixw: NixWorld,
                                               tmp_path: Path) -> None:
    """Offline (no daemon), --nix-root R names the database; mounted at R/nix/store
    afterwards, the paths are valid and verify."""
    mounted.stop()
    root = tmp_path / "R"
    (root / "nix" / "store").mkdir(parents=True)
    init_nix_root(root)
    (root / "nix" / "store" / ".links").rmdir()  # the mount goes there
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = run(annofs_cmd("--store", str(mounted.store), "nix", "fetch", "--cache",
                         str(nixw.caches["bzip2"]), "--policy", str(pol), "--nix-root",
                         str(root), "--dest", "/", "--recursive", nixw.top))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("registered ") == 2
    (root / "nix" / "store" / ".links").rmdir()  # Nix made it again, empty
    mounted.path = root / "nix" / "store"
    mounted.start()
    check_valid(root, nixw)
    check_canonical(mounted.path / nixw.top.split("/")[-1])


def test_a_missing_reference_is_not_registered(chroot_mount: Mount, nixw: NixWorld,
                                               tmp_path: Path) -> None:
    """Without --recursive the dependency is not there: Nix refuses to register a path
    whose reference it does not know; one line, exit 1, the tree stays unregistered."""
    root = chroot_mount.path.parent.parent
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = run(annofs_cmd("--store", str(chroot_mount.store), "nix", "fetch", "--cache",
                         str(nixw.caches["none"]), "--policy", str(pol), "--dest",
                         str(chroot_mount.path), nixw.top))
    assert res.returncode == 1, res
    assert f"Nix did not register {nixw.top}" in res.stderr
    assert res.stderr.count("\n") == 1
    assert nix_store(root, "--verify-path", nixw.top).returncode != 0


@pytest.mark.expected_log()
def test_the_mount_answers_while_a_local_cache_is_fetched(mounted: Mount, nixw: NixWorld,
                                                          tmp_path: Path) -> None:
    """A big path from a cache directory is read, checked and staged in a worker thread:
    reads through the mount go on meanwhile (only the final swap is on the event loop)."""
    import time

    src = tmp_path / "big"
    for i in range(40):
        (src / f"d{i % 8}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 8}" / f"blob{i}").write_bytes(os.urandom(4 << 20))
    for i in range(3000):
        (src / f"d{i % 8}" / f"small{i}").write_text(f"small file {i}\n")
    native = tmp_path / "N"
    added = nix_store(native, "--add", str(src))
    assert added.returncode == 0, added.stderr
    path = added.stdout.strip()
    cache = tmp_path / "cache"
    nix = ["nix", "--extra-experimental-features", "nix-command"]
    for cmd in ([*nix, "copy", "--from", f"local?root={native}", "--to",
                 f"file://{cache}?compression=none", path],
                [*nix, "store", "sign", "--key-file", str(nixw.keys / "cache-a-1.sec"),
                 "--store", f"file://{cache}", path]):
        ok = run(cmd)
        assert ok.returncode == 0, ok.stderr
    pol = write_policy(tmp_path / "policy.toml", nixw)
    (mounted.path / "other").write_bytes(b"readable meanwhile\n")
    started = time.monotonic()
    proc = subprocess.Popen(annofs_cmd("--store", str(mounted.store), "nix", "fetch",
                                       "--cache", str(cache), "--policy", str(pol), path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    slowest, probes = 0.0, 0
    while proc.poll() is None:
        t = time.monotonic()
        assert (mounted.path / "other").read_bytes() == b"readable meanwhile\n"
        os.listdir(mounted.path)
        slowest = max(slowest, time.monotonic() - t)
        probes += 1
        time.sleep(0.02)
    took = time.monotonic() - started
    out, err = proc.communicate()
    assert proc.returncode == 0 and f"fetched {path}" in out, err
    assert (mounted.path / path.lstrip("/") / "d0" / "small0").read_text() == "small file 0\n"
    assert took > 1.0 and probes > 10, (took, probes)  # the fetch took a while...
    assert slowest < 0.5, (slowest, took)  # ...and the mount answered all along
