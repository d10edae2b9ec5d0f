"""Attacks by a hostile peer on the parts that need no mount: `nix fetch` from a
hostile HTTP binary cache. Each test is an attempt that must fail for the attacker."""

from __future__ import annotations

import contextlib
import http.server
import lzma
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from t2_nix_fetch import H1, A, add_to_cache, make_tree, nothing_added, policy

from annofs.errors import RefusedError
from annofs.nix.cache import DirectoryCache, HttpCache
from annofs.nix.fetch import fetch, mirror_remote
from annofs.nix.nar import dump_host
from annofs.volume import Volume

ENDLESS = 256 << 20  # what the hostile cache would send after the NAR, at most


@contextmanager
def endless_cache(cache: Path, sent: list[int]) -> Iterator[str]:
    """Serve `cache`; the NAR file is followed by endless zeros (no Content-Length);
    `sent` gets how many bytes of the NAR answer went out before the client hung up."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            rel = self.path.lstrip("/")
            target = cache / rel
            if not target.is_file():
                self.send_error(404)
                return
            data = target.read_bytes()
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            if not rel.startswith("nar/"):
                self.wfile.write(data)
                return
            n = 0
            with contextlib.suppress(OSError):
                self.wfile.write(data)
                n = len(data)
                block = bytes(1 << 16)
                while n < ENDLESS:
                    self.wfile.write(block)
                    n += len(block)
            sent.append(n)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


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
    sent: list[int] = []
    with endless_cache(cache, sent) as url:
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
    assert sent and sent[0] < ENDLESS, "the client read everything the cache sent"
