"""`annofs nix serve` against the real Nix (Debian's nix-bin 2.8): a path fetched from a
real cache is served on loopback, and `nix copy --from http://...` with `require-sigs`
copies it (and its reference) into a chroot store, byte for byte what Nix built; a
policy that refuses the path (an untrusted signer, a patched file) takes it away and
the copy fails; annofs signs as a cache of its own with --key; it serves beside a
mount's daemon; and `annofs nix fetch --cache http://...` from it round-trips.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd
from t4_nix_real import NIX, NixWorld, annofs, nix_dump_sha256, nixw, run, store, write_policy

__all__ = ["nixw", "store"]  # pytest fixtures, found by name in this module


@contextmanager
def serving(store: Path, *args: str, proc_out: list[subprocess.Popen[str]] | None = None
            ) -> Iterator[tuple[str, list[str]]]:
    """`annofs nix serve --listen 127.0.0.1:0 ARGS` running; (its URL, its stderr lines
    so far; the process appended to `proc_out`). Stopped with SIGINT, as Ctrl-C would."""
    proc = subprocess.Popen(annofs_cmd("--store", str(store), "nix", "serve", "--listen",
                                       "127.0.0.1:0", *args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    m = re.match(r"nix serve: (http://127\.0\.0\.1:\d+) ", first)
    if m is None:
        proc.wait(10)
        raise AssertionError(f"no URL printed: {first}{proc.stderr.read()}")
    if proc_out is not None:
        proc_out.append(proc)
    lines: list[str] = []
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    try:
        yield m.group(1), lines
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, lines
        drain.join(10)


def nix_copy(url: str, root: Path, path: str, trusted: str,
             cache_home: Path) -> subprocess.CompletedProcess[str]:
    """`nix copy --from URL --to local?root=ROOT` checking signatures against `trusted`."""
    return run([*NIX, "copy", "--from", url, "--to", f"local?root={root}", "--option",
                "require-sigs", "true", "--option", "trusted-public-keys", trusted,
                "--option", "substituters", "", path],
               env={**os.environ, "XDG_CACHE_HOME": str(cache_home)})  # no narinfo cache


def fetched_store(w: NixWorld, store: Path, pol: Path) -> None:
    res = annofs(store, "nix", "fetch", "--cache", str(w.caches["xz"]), "--policy", str(pol),
                 "--recursive", w.top)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_real_nix_copies_from_annofs_with_require_sigs(nixw: NixWorld, store: Path,
                                                       tmp_path: Path, compression: str) -> None:
    pol = write_policy(tmp_path / "policy.toml", nixw)
    fetched_store(nixw, store, pol)
    root = tmp_path / "root"
    with serving(store, "--policy", str(pol), "--compression", compression) as (url, _):
        res = nix_copy(url, root, nixw.top, nixw.pub("cache-a-1"), tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    copied = root / nixw.top.lstrip("/")
    assert nix_dump_sha256(copied) == nix_dump_sha256(nixw.top)
    assert nix_dump_sha256(root / nixw.dep.lstrip("/")) == nix_dump_sha256(nixw.dep)
    refs = run(["nix-store", "--store", f"local?root={root}", "-q", "--references",
                nixw.top], check=True).stdout.split()
    assert refs == [nixw.dep]


def test_annofs_signs_as_a_cache_of_its_own(nixw: NixWorld, store: Path,
                                            tmp_path: Path) -> None:
    """Nix trusts only annofs's key (made by Nix): the copy needs annofs's Sig lines."""
    pol = write_policy(tmp_path / "policy.toml", nixw)
    fetched_store(nixw, store, pol)
    sec, pub = tmp_path / "serve-1.sec", tmp_path / "serve-1.pub"
    run(["nix-store", "--generate-binary-cache-key", "serve-1", str(sec), str(pub)],
        check=True)
    root = tmp_path / "root"
    with serving(store, "--policy", str(pol)) as (url, _):
        without = nix_copy(url, tmp_path / "other", nixw.top, pub.read_text().strip(),
                           tmp_path / "cache1")
    assert without.returncode != 0 and "lacks a valid signature" in without.stderr
    with serving(store, "--policy", str(pol), "--key", str(sec)) as (url, _):
        res = nix_copy(url, root, nixw.top, pub.read_text().strip(), tmp_path / "cache2")
    assert res.returncode == 0, res.stderr
    assert nix_dump_sha256(root / nixw.top.lstrip("/")) == nix_dump_sha256(nixw.top)


@pytest.mark.parametrize("case", ["untrusted-signer", "patched-file"])
def test_a_refused_path_is_not_offered(nixw: NixWorld, store: Path, tmp_path: Path,
                                       case: str) -> None:
    pol = write_policy(tmp_path / "policy.toml", nixw)
    fetched_store(nixw, store, pol)
    if case == "untrusted-signer":
        pol = write_policy(tmp_path / "strict.toml", nixw, keys=("cache-b-1",))
    else:
        host = tmp_path / "share"
        host.mkdir()
        (host / "greeting").write_text("patched\n")
        name = nixw.top.split("/")[-1]
        assert annofs(store, "import", str(host), f"/nix/store/{name}/share").returncode == 0
    root = tmp_path / "root"
    with serving(store, "--policy", str(pol)) as (url, lines):
        res = nix_copy(url, root, nixw.top, nixw.pub("cache-a-1"), tmp_path / "cache")
        again = nix_copy(url, root, nixw.top, nixw.pub("cache-a-1"), tmp_path / "cache2")
    assert res.returncode != 0 and again.returncode != 0
    assert "no substituter that can build it" in res.stderr, res.stderr
    assert not (root / nixw.top.lstrip("/")).exists()
    # Said once per tree version on stderr, and recorded in the events log.
    said = [ln for ln in lines if f"not offering {nixw.top}" in ln]
    assert len(said) == 1, lines
    events = annofs(store, "events").stdout
    assert "nix serve: not offered" in events and "greeting" in events


@pytest.mark.expected_log()
def test_serves_beside_a_mounts_daemon(mounted: Mount, nixw: NixWorld,
                                       tmp_path: Path) -> None:
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = annofs(mounted.store, "nix", "fetch", "--cache", str(nixw.caches["zstd"]),
                 "--policy", str(pol), "--recursive", nixw.top)
    assert res.returncode == 0, res.stderr
    root = tmp_path / "root"
    # --dest as the mount's path: the same store, reached through its mountpoint.
    with serving(mounted.store, "--policy", str(pol), "--dest",
                 str(mounted.path / "nix" / "store")) as (url, _):
        copied = nix_copy(url, root, nixw.top, nixw.pub("cache-a-1"), tmp_path / "cache")
        assert copied.returncode == 0, copied.stderr
        # The mount keeps answering meanwhile, and what it shows is what was served.
        inside = mounted.path / nixw.top.lstrip("/")
        assert nix_dump_sha256(inside) == nix_dump_sha256(root / nixw.top.lstrip("/"))
        # A patch through the mount takes the path away at once.
        narinfo = f"{url}/{nixw.top.split('/')[-1][:32]}.narinfo"
        with urllib.request.urlopen(narinfo, timeout=30) as r:
            assert r.status == 200
        with open(inside / "share" / "greeting", "a") as f:
            f.write("patched\n")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(narinfo, timeout=30)
        assert e.value.code == 404


def test_nix_fetch_from_annofs_serve_round_trips(nixw: NixWorld, store: Path,
                                                 tmp_path: Path) -> None:
    pol = write_policy(tmp_path / "policy.toml", nixw)
    fetched_store(nixw, store, pol)
    second = tmp_path / "second"
    assert annofs(second, "init").returncode == 0
    with serving(store, "--policy", str(pol)) as (url, _):
        res = annofs(second, "nix", "fetch", "--cache", url, "--policy", str(pol),
                     "--recursive", nixw.top)
    assert res.returncode == 0, res.stderr
    assert f"fetched {nixw.top}" in res.stdout and "signed by cache-a-1" in res.stdout
    ok = annofs(second, "verify", "--policy", str(pol), "/nix/store")
    assert ok.returncode == 0, ok.stdout
    out = tmp_path / "export"
    assert annofs(second, "export", f"/nix/store/{nixw.top.split('/')[-1]}",
                  str(out)).returncode == 0
    assert nix_dump_sha256(out) == nix_dump_sha256(nixw.top)


def test_a_real_substituter_with_require_sigs(nixw: NixWorld, store: Path,
                                              tmp_path: Path) -> None:
    """Nix substituting (not copying): `nix-store --realise` of the path into an empty
    chroot store, with annofs as its only substituter."""
    pol = write_policy(tmp_path / "policy.toml", nixw)
    fetched_store(nixw, store, pol)
    root = tmp_path / "root"
    with serving(store, "--policy", str(pol)) as (url, _):
        res = run(["nix-store", "--store", f"local?root={root}", "--realise", nixw.top,
                   "--option", "substituters", url, "--option", "require-sigs", "true",
                   "--option", "trusted-public-keys", nixw.pub("cache-a-1")],
                  env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert nix_dump_sha256(root / nixw.top.lstrip("/")) == nix_dump_sha256(nixw.top)


def test_sighup_reloads_the_policy(nixw: NixWorld, store: Path, tmp_path: Path) -> None:
    good = write_policy(tmp_path / "policy.toml", nixw)
    fetched_store(nixw, store, good)
    pol = write_policy(tmp_path / "served.toml", nixw, keys=("cache-b-1",))
    narinfo = nixw.top.split("/")[-1][:32] + ".narinfo"
    procs: list[subprocess.Popen[str]] = []

    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(f"{url}/{narinfo}", timeout=30) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code

    with serving(store, "--policy", str(pol), proc_out=procs) as (url, lines):
        assert status(url) == 404
        pol.write_text("this is not TOML [")
        procs[0].send_signal(signal.SIGHUP)
        wait_for(lambda: any("not reloaded" in ln for ln in lines))
        assert status(url) == 404  # the old policy stays
        shutil.copy(good, pol)
        procs[0].send_signal(signal.SIGHUP)
        wait_for(lambda: any("policy reloaded" in ln for ln in lines))
        assert status(url) == 200


def wait_for(cond: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_substitutes_into_a_chroot_store_on_an_annofs_mount(nixw: NixWorld, store: Path,
                                                           tmp_path: Path) -> None:
    """The whole loop: annofs serves, the real Nix substitutes with require-sigs into
    a chroot store whose /nix/store is another annofs mount (no policy on it), and the
    path is valid there and equal to what Nix built."""
    pol = write_policy(tmp_path / "policy.toml", nixw)
    fetched_store(nixw, store, pol)
    root = tmp_path / "R"
    target = Mount(tmp_path / "target", root / "nix" / "store")
    target.path.mkdir(parents=True)
    assert annofs(target.store, "init").returncode == 0
    target.start()
    try:
        with serving(store, "--policy", str(pol)) as (url, _):
            res = run(["nix-store", "--store", f"local?root={root}", "--realise", nixw.top,
                       "--option", "substituters", url, "--option", "require-sigs", "true",
                       "--option", "trusted-public-keys", nixw.pub("cache-a-1")],
                      env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert res.returncode == 0, res.stderr
        valid = run(["nix-store", "--store", f"local?root={root}", "--verify-path", nixw.top])
        assert valid.returncode == 0, valid.stderr
        assert nix_dump_sha256(root / nixw.top.lstrip("/")) == nix_dump_sha256(nixw.top)
    finally:
        target.stop()
    assert target.log_problems() == []
