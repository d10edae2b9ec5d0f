"""`annofs nix fetch` and `annofs nix sign` as commands: every mistake is one line and
exit 2, every "no" of verification exit 1, and neither changes the store or the cache."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd
from fuse_helpers import new_mount, stop_and_check
from t2_nix_fetch import H1, A, B, add_to_cache, make_tree

from annofs.transfer.nar import dump_host


def annofs(store: Path, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != "ANNOFS_POLICY"}
    e.update(env or {})
    return subprocess.run(annofs_cmd("--store", str(store), *args), capture_output=True,
                          text=True, env=e)


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    store = tmp_path / "store"
    assert annofs(store, "init").returncode == 0
    cache = tmp_path / "cache"
    nar = b"".join(dump_host(make_tree(tmp_path / "tree")))
    add_to_cache(cache, H1, "hello", nar, [A])
    keys = tmp_path / "keys"
    keys.mkdir()
    for k in (A, B):
        (keys / f"{k.name}.secret").write_text(k.to_text())
        (keys / f"{k.name}.public").write_text(k.public_key().to_text())
    policy = tmp_path / "policy.toml"
    policy.write_text('trusted-keys-dir = "keys"\n')
    return {"store": store, "cache": cache, "keys": keys, "policy": policy}


def one_line(res: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert res.returncode == status, res
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("annofs: "), res.stderr
    assert text in res.stderr, res.stderr


def test_fetch_usage_errors_are_exit_2(world: dict[str, Path], tmp_path: Path) -> None:
    s, c, p = world["store"], str(world["cache"]), str(world["policy"])
    one_line(annofs(s, "nix", "fetch", H1), 2, "--cache")
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", p), 2, "no STOREPATH given")
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", p, "hello"), 2,
             "hello: not a store path")
    one_line(annofs(s, "nix", "fetch", "--cache", str(tmp_path / "nope"), "--policy", p, H1),
             2, "no such cache directory")
    one_line(annofs(s, "nix", "fetch", "--cache", c, H1), 2, "no policy")
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", str(tmp_path / "x.toml"),
                    H1), 2, "no such policy file")
    bad = world["cache"] / f"{H1}.narinfo"
    bad.write_text(bad.read_text().replace("NarSize: ", "NarSize: -"))
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", p, H1), 2,
             f"{bad}:7: NarSize:")


def test_fetch_refusals_are_exit_1_and_success_is_one_line(world: dict[str, Path]) -> None:
    s, c, p = world["store"], str(world["cache"]), str(world["policy"])
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", p, "2" * 32), 1,
             f"no {'2' * 32}.narinfo in {c}")
    other = f"/nix/store/{H1}-other"
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", p, other), 1,
             f"not {other}")
    ok = annofs(s, "nix", "fetch", "--cache", c, H1, env={"ANNOFS_POLICY": p})
    assert ok.returncode == 0 and ok.stderr == ""
    assert ok.stdout == (f"fetched /nix/store/{H1}-hello -> /nix/store/{H1}-hello: 2 files, "
                         f"{ok.stdout.split(', ')[1].split()[0]} NAR bytes; signed by "
                         f"cache-a-1\n")
    # The cache's signature signs the NAR, not the files: attest export leaves it out.
    exported = annofs(s, "attest", "export", f"/nix/store/{H1}-hello")
    assert exported.returncode == 0 and exported.stdout == ""
    assert exported.stderr == ("annofs: 1 binary-cache signature(s) not exported: they sign "
                               "a NAR, not files (fetch the path again to carry them)\n")


def test_sign_errors_and_success(world: dict[str, Path]) -> None:
    s, c, keys = world["store"], str(world["cache"]), world["keys"]
    secret = str(keys / "cache-b-1.secret")
    one_line(annofs(s, "nix", "sign", "--key", str(keys / "nope"), "--cache", c, H1), 2,
             "no such key file")
    one_line(annofs(s, "nix", "sign", "--key", str(keys / "cache-b-1.public"), "--cache", c,
                    H1), 2, "this looks like a public key")
    one_line(annofs(s, "nix", "sign", "--key", secret, "--cache", c, "2" * 32), 1,
             "no " + "2" * 32 + ".narinfo")
    narinfo = world["cache"] / f"{H1}.narinfo"
    before = narinfo.read_text()
    one_line(annofs(s, "nix", "sign", "--key", secret, "--cache", c, H1), 2,
             "no such file or directory")  # not fetched yet: nothing to hash
    assert narinfo.read_text() == before
    assert annofs(s, "nix", "fetch", "--cache", c, "--policy", str(world["policy"]),
                  H1).returncode == 0
    ok = annofs(s, "nix", "sign", "--key", secret, "--cache", c, H1)
    assert ok.returncode == 0 and "signed" in ok.stdout
    after = narinfo.read_text().splitlines()
    assert after[:-1] == before.splitlines() and after[-1].startswith("Sig: cache-b-1:")
    again = annofs(s, "nix", "sign", "--key", secret, "--cache", c, H1)
    assert "already signed" in again.stdout
    assert narinfo.read_text().count("Sig: cache-b-1:") == 1


# -- cache files that would block (issue 16) ---------------------------------------------------


def run_bounded(store: Path, *args: str, env: dict[str, str] | None = None,
                limit: float = 30) -> subprocess.CompletedProcess[str]:
    """annofs(...) that fails the test instead of hanging it."""
    e = {k: v for k, v in os.environ.items() if k != "ANNOFS_POLICY"}
    e.update(env or {})
    return subprocess.run(annofs_cmd("--store", str(store), *args), capture_output=True,
                          text=True, env=e, timeout=limit)


def test_a_fifo_named_like_a_narinfo_is_one_line_and_exit_2(world: dict[str, Path]) -> None:
    s, c, p = world["store"], world["cache"], str(world["policy"])
    info = c / f"{H1}.narinfo"
    info.unlink()
    os.mkfifo(info)
    one_line(run_bounded(s, "nix", "fetch", "--cache", str(c), "--policy", p, H1), 2,
             f"{info}: a FIFO, not a regular file")


def test_a_fifo_in_a_cache_leaves_a_mount_answering(world: dict[str, Path],
                                                    mounted: Mount) -> None:
    """Into a mount the daemon fetches, on its loop: a FIFO used to hang every request of
    the mount, even after the client was killed."""
    assert mounted.store == world["store"]
    c, p = world["cache"], str(world["policy"])
    nar = next((c / "nar").iterdir())
    nar.unlink()
    os.mkfifo(nar)
    res = run_bounded(world["store"], "nix", "fetch", "--cache", str(c), "--policy", p,
                      "--dest", str(mounted.path / "nix" / "store"), H1)
    one_line(res, 2, f"{nar}: a FIFO, not a regular file")
    (mounted.path / "after").write_bytes(b"the mount answers")
    assert (mounted.path / "after").read_bytes() == b"the mount answers"
    assert not (mounted.path / "nix" / "store" / f"{H1}-hello").exists()


def test_a_cache_on_a_hung_file_system_times_out_in_one_line(world: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """A regular file that never answers (here: on a FUSE mount whose daemon is stopped)
    stops the fetch after ANNOFS_CACHE_TIMEOUT seconds."""
    (tmp_path / "hung").mkdir()
    hung = new_mount(tmp_path / "hung")
    try:
        shutil.copytree(world["cache"], hung.path / "cache")
        # Names and attributes cached by the kernel (a change in a directory drops the
        # directory's): then only open() and read() wait on the stopped daemon.
        for f in [*(hung.path / "cache").rglob("*"), hung.path / "cache", hung.path]:
            os.stat(f)
        assert hung.proc is not None
        hung.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            res = run_bounded(world["store"], "nix", "fetch", "--cache",
                              str(hung.path / "cache"), "--policy", str(world["policy"]), H1,
                              env={"ANNOFS_CACHE_TIMEOUT": "1"})
            took = time.monotonic() - started
        finally:
            hung.proc.send_signal(signal.SIGCONT)
    finally:
        stop_and_check(hung)
    one_line(res, 2, f"{hung.path / 'cache' / (H1 + '.narinfo')}: no answer in 1 s")
    assert took < 15
    assert annofs(world["store"], "fsck").returncode == 0
