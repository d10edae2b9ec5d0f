"""Attacks by a hostile peer on the parts that need no mount: `nix fetch` from a
hostile HTTP binary cache. Each test is an attempt that must fail for the attacker."""

from __future__ import annotations

import lzma
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from cache_server import Faults, serve_cache
from t2_nix_fetch import H1, H2, A, add_to_cache, make_tree, nothing_added, policy
from t2_nix_serve import real_server

from annofs.errors import RefusedError
from annofs.nix.cache import DirectoryCache, HttpCache
from annofs.nix.fetch import fetch, mirror_remote
from annofs.nix.serve import ServedStore
from annofs.transfer.import_tree import TreeImporter
from annofs.transfer.nar import dump_host
from annofs.trust.policy import parse_policy
from annofs.volume import Volume

ENDLESS = 256 << 20  # what the hostile cache would send after the NAR, at most


def hostile_cache(tmp_path: Path) -> tuple[Path, int]:
    """A cache whose narinfo, signed by trusted cache-a-1, says an unsigned FileSize of
    a terabyte (FileSize and FileHash are not in the signed fingerprint)."""
    nar = b"".join(dump_host(make_tree(tmp_path / "tree")))
    cache = tmp_path / "cache"
    info = add_to_cache(cache, H1, "hello", nar, [A])
    lines = [ln for ln in info.read_text().splitlines()
             if not ln.startswith(("FileSize:", "FileHash:"))]
    info.write_text("\n".join([*lines, "FileSize: 1000000000000"]) + "\n")
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    return cache, len(lzma.compress(nar))


@pytest.mark.parametrize("how", ["fetch", "mirror"])
def test_endless_data_after_the_nar_is_cut_off(vol: Volume, tmp_path: Path, how: str) -> None:
    """A hostile cache sends a valid compressed NAR and then endless bytes, its narinfo
    claiming (unsigned) a terabyte FileSize: the fetch must stop reading at a bound set
    by the signed NarSize (not read for ever, not fill the disk), and add nothing."""
    cache, compressed = hostile_cache(tmp_path)
    faults = Faults(endless_prefix="nar/", endless_bytes=ENDLESS)
    with serve_cache(cache, faults) as url:
        caches: list[HttpCache | DirectoryCache] = [HttpCache(url)]
        if how == "mirror":
            # What a mount's daemon does: copy from the network first (bounded), then
            # fetch from the local copy.
            into = tmp_path / "mirror"
            into.mkdir()
            caches = mirror_remote(caches, [H1], policy(tmp_path), False, into)  # type: ignore[assignment]
            stored = sum(f.stat().st_size for f in into.rglob("*.nar.xz"))
            assert 0 < stored < compressed + (1 << 20)
        with pytest.raises(RefusedError):
            fetch(vol, policy(tmp_path), caches, [H1])
    assert nothing_added(vol)
    assert faults.sent and faults.sent[0] < ENDLESS, \
        "the client read everything the cache sent"


def test_a_runtime_dir_planted_by_another_user_is_refused(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $XDG_RUNTIME_DIR (sudo, cron, a service) the registry lives in
    /tmp/annofs-UID. Another user can make that directory first (world-writable, theirs)
    and plant `<key>.tmp` as a symlink: the daemon (root) then wrote its record through
    it, over any file; and a planted `<key>.json` made commands talk to the planter's
    store and pid. The directory must be refused unless it is the caller's own and
    private, and nothing written through it."""
    import os
    import stat as st

    from annofs.daemon import registry
    from annofs.errors import UsageError

    fake_uid = 40000 + os.getpid() % 20000  # a /tmp/annofs-N nobody else uses
    planted = Path(f"/tmp/annofs-{fake_uid}")
    monkeypatch.delenv("ANNOFS_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(registry.os, "getuid", lambda: fake_uid)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    planted.mkdir(mode=0o700)
    try:
        os.chown(planted, fake_uid, fake_uid)
        mp = tmp_path / "mnt"
        key = registry._record(mp).name  # what the daemon will write
        os.chown(planted, 65534, 65534)  # the attacker's, as they made it
        planted.chmod(0o777)
        os.symlink(victim, planted / key.replace(".json", ".tmp"))
        with pytest.raises(UsageError, match="not private"):
            registry.register(registry.MountInfo(os.getpid(), tmp_path / "store", mp))
        assert victim.read_text() == "precious\n"
        with pytest.raises(UsageError, match="not private"):
            registry.lookup(mp)
        # the caller's own private directory is used as before
        os.unlink(planted / key.replace(".json", ".tmp"))
        os.chown(planted, fake_uid, fake_uid)
        planted.chmod(0o700)
        registry.register(registry.MountInfo(os.getpid(), tmp_path / "store", mp))
        assert st.S_ISREG((planted / key).lstat().st_mode)
        registry.unregister(mp)
    finally:
        import shutil
        shutil.rmtree(planted, ignore_errors=True)


def test_slow_nar_readers_do_not_stall_the_cache_for_others(vol: Volume,
                                                           tmp_path: Path) -> None:
    """Seventeen connections that ask for a big NAR and never read it (a tiny receive
    buffer) must not keep another client from getting a NAR. The server bounds the NARs
    it sends at once (16); before, such readers held every slot for ever and the other
    client's GET timed out after 60 s. A stream stalled past `stall_seconds` while
    another request waits now gives its slot up."""
    pol = parse_policy('mode = "enforce"\ndefault = "allow"\n', tmp_path / "open.toml")
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(24 << 20))
    TreeImporter(vol).run(big, [b"nix", b"store", f"{H2}-big".encode()])
    served = ServedStore(vol, pol)
    offer = served.offer(H2)
    assert offer is not None
    url = offer.narinfo("none").split("URL: ")[1].split("\n")[0]
    with real_server(served, compression="none", stall_seconds=2.0) as port:
        stalled = []
        try:
            for _ in range(17):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect(("127.0.0.1", port))
                s.sendall(f"GET /{url} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                stalled.append(s)  # never read
            time.sleep(1)
            t0 = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{url}", timeout=30) as r:
                assert r.status == 200
                assert len(r.read()) == offer.nar.size
            assert time.monotonic() - t0 < 30
        finally:
            for s in stalled:
                s.close()
