"""`annofs nix serve` in process: the narinfo a path gets (NarHash, References, the cache
signatures `nix fetch` recorded and fresh ones by --key, all over Nix's fingerprint),
the NARs (none and zstd), and refusals (an untrusted signer, a patched file) as 404.
The same against the real Nix is in t4_nix_serve."""

from __future__ import annotations

import hashlib
import io
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import zstandard
from starlette.testclient import TestClient
from t2_nix_fetch import H1, H2, A, B, M, add_to_cache, make_tree, policy
from t2_trust import sign

from annofs.dashboard.binary_cache import create_cache_app
from annofs.dashboard.server import bind, parse_listen, serve
from annofs.errors import UsageError
from annofs.nix.fetch import fetch
from annofs.nix.narinfo import HASH_CHARS, check_signatures, distinct_signers, parse_narinfo
from annofs.nix.serve import HASH_PART_LEN, MAX_CANDIDATES, Offer, RefScanner, ServedStore
from annofs.transfer.import_tree import TreeImporter
from annofs.transfer.nar import dump_host, dump_volume, nar_hash
from annofs.trust.keys import generate_key
from annofs.trust.policy import parse_policy
from annofs.volume import Volume

BASE = "http://127.0.0.1:8081"
S = generate_key("annofs-serve-1")  # annofs as a signing cache


def served_policy(tmp: Path, keys: tuple[object, ...] = (A, B, S)):  # type: ignore[no-untyped-def]
    listed = ", ".join(f'"{k.public_key().to_text()}"' for k in keys)  # type: ignore[attr-defined]
    return parse_policy(f'''mode = "enforce"
trusted-public-keys = [{listed}]
[[rules]]
path = "/nix/store/**"
signers = 1
claims = ["built"]
''', tmp / "served.toml")


@pytest.fixture
def fetched(vol: Volume, tmp_path: Path) -> bytes:
    """/nix/store/<H1>-hello fetched from a cache signed by cache-a-1; its NAR."""
    nar = b"".join(dump_host(make_tree(tmp_path / "tree")))
    add_to_cache(tmp_path / "cache", H1, "hello", nar, [A])
    fetch(vol, policy(tmp_path), [tmp_path / "cache"], [H1])
    return nar


def client(served: ServedStore, **kw: object) -> TestClient:
    app = create_cache_app(served, allowed_hosts=["127.0.0.1"], **kw)  # type: ignore[arg-type]
    return TestClient(app, base_url=BASE)


def test_the_narinfo_text_and_fingerprint() -> None:
    from annofs.transfer import nixbase32 as base32
    from annofs.transfer.nar import NarHash

    nar = NarHash(bytes(range(32)), 1072)
    h32 = base32.encode(nar.sha256)
    offer = Offer(f"{H1}-hello", nar, (f"{H1}-hello", f"{H2}-dep"), ("k-1:c2ln",))
    assert offer.fingerprint() == (f"1;/nix/store/{H1}-hello;sha256:{h32};1072;"
                                   f"/nix/store/{H1}-hello,/nix/store/{H2}-dep")
    assert offer.narinfo("none") == (
        f"StorePath: /nix/store/{H1}-hello\n"
        f"URL: nar/{H1}-{h32}.nar\n"
        "Compression: none\n"
        f"FileHash: sha256:{h32}\n"
        "FileSize: 1072\n"
        f"NarHash: sha256:{h32}\n"
        "NarSize: 1072\n"
        f"References: {H1}-hello {H2}-dep\n"
        "Sig: k-1:c2ln\n")
    zstd = offer.narinfo("zstd")
    assert f"URL: nar/{H1}-{h32}.nar.zst\nCompression: zstd\nNarHash:" in zstd
    assert "FileHash" not in zstd and "FileSize" not in zstd
    # No references: `References: ` with nothing after it, as Nix writes it.
    bare = Offer(f"{H1}-hello", nar, (), ()).narinfo("zstd")
    assert "\nReferences: \n" in bare and "Sig:" not in bare


def test_nix_cache_info(vol: Volume, tmp_path: Path) -> None:
    c = client(ServedStore(vol, served_policy(tmp_path)), priority=41)
    r = c.get("/nix-cache-info")
    assert r.status_code == 200
    assert r.text == "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n"
    assert c.head("/nix-cache-info").status_code == 200


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_a_fetched_path_is_served_with_its_cache_signature(
        vol: Volume, tmp_path: Path, fetched: bytes, compression: str) -> None:
    served = ServedStore(vol, served_policy(tmp_path), [S])
    c = client(served, compression=compression)
    r = c.get(f"/{H1}.narinfo")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/x-nix-narinfo")
    info = parse_narinfo(r.content, "served")
    assert info.store_path.full == f"/nix/store/{H1}-hello"
    assert info.nar_hash == hashlib.sha256(fetched).digest() and info.nar_size == len(fetched)
    assert info.references == () and info.compression == compression
    # cache-a-1's signature as recorded by fetch, and a fresh one by annofs's key: both
    # verify over Nix's fingerprint.
    checks = check_signatures(info, served_policy(tmp_path))
    assert sorted(distinct_signers(checks).values()) == ["annofs-serve-1", "cache-a-1"]
    assert all(ch.counts for ch in checks)
    nar = c.get(f"/{info.url}")
    assert nar.status_code == 200
    body = nar.content
    if compression == "zstd":
        assert info.url.endswith(".nar.zst") and info.file_hash is None
        body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
    else:
        assert info.url.endswith(".nar") and info.file_size == len(fetched)
        assert nar.headers["content-length"] == str(len(fetched))
    assert body == fetched
    head = c.head(f"/{info.url}")
    assert head.status_code == 200 and head.content == b""
    assert c.head(f"/{H1}.narinfo").status_code == 200


@pytest.mark.expected_log(r"not offering /nix/store/1{32}-hello: .* is refused: .*\(and 2 more\)")
def test_only_what_the_policy_lets_be_read_is_offered(vol: Volume, tmp_path: Path,
                                                      fetched: bytes) -> None:
    # cache-a-1 is not trusted here: the path's files would be refused, so it is not there.
    refused: list[str] = []
    served = ServedStore(vol, served_policy(tmp_path, (B, M)), [S],
                         on_refused=lambda p, v: refused.append(p))
    c = client(served)
    assert c.get(f"/{H1}.narinfo").status_code == 404
    ok = ServedStore(vol, served_policy(tmp_path), [S])
    url = parse_narinfo(client(ok).get(f"/{H1}.narinfo").content, "ok").url
    assert c.get(f"/{url}").status_code == 404 and c.head(f"/{url}").status_code == 404
    # Logged once for this tree version, however often asked; every refused file named.
    assert sorted(refused) == [f"/nix/store/{H1}-hello/bin/hi", f"/nix/store/{H1}-hello/bin/link",
                               f"/nix/store/{H1}-hello/share/greeting"]


@pytest.mark.expected_log("not offering /nix/store/1{32}-hello: .*greeting is refused")
def test_a_patched_file_takes_the_path_away(vol: Volume, tmp_path: Path,
                                            fetched: bytes) -> None:
    served = ServedStore(vol, served_policy(tmp_path), [S])
    c = client(served)
    before = parse_narinfo(c.get(f"/{H1}.narinfo").content, "before")
    host = tmp_path / "share"
    host.mkdir()
    (host / "greeting").write_text("patched\n")
    TreeImporter(vol).run(host, [b"nix", b"store", f"{H1}-hello".encode(), b"share"])
    assert c.get(f"/{H1}.narinfo").status_code == 404
    assert c.get(f"/{before.url}").status_code == 404  # the NAR offered before is gone too
    assert c.get(f"/{H1}.narinfo").status_code == 404  # (logged once: see the marker)


def test_unknown_and_malformed_requests_are_404(vol: Volume, tmp_path: Path,
                                                fetched: bytes) -> None:
    c = client(ServedStore(vol, served_policy(tmp_path)))
    for path in (f"/{H2}.narinfo", "/", "/index.html", f"/{H1}.narinfo.bak",
                 f"/nar/{H1}-{'0' * 52}.nar", f"/nar/{H1}.nar", "/nar/../db/data.mdb",
                 f"/{H1[:-1]}e.narinfo"):
        assert c.get(path).status_code == 404, path
    assert c.post(f"/{H1}.narinfo").status_code == 405
    # A DNS name rebound to 127.0.0.1 is not this cache's host.
    assert c.get("/nix-cache-info", headers={"host": "evil.example"}).status_code == 400


def test_a_deferred_digest_is_computed_never_written(vol: Volume, tmp_path: Path,
                                                    fetched: bytes) -> None:
    """A version whose digest the mount has not recorded yet (it defers it after an
    edit): judged by its computed digest (here the signed content: offered), and the
    store is not written (nix serve only reads, beside a daemon)."""
    import dataclasses

    where = [b"nix", b"store", f"{H1}-hello".encode(), b"share"]
    with vol.store.write() as txn:
        share = vol.namespace.resolve(txn, where)
        old = vol.versions.get(txn, int(vol.namespace.get(txn, share.target,
                                                          b"greeting").target))
        new = vol.versions.create(txn, 0, old.hashes, old.lengths, None)  # from empty
        vol.namespace.set_attrs(txn, int(share.target), b"greeting",
                                lambda a: dataclasses.replace(a, target=new.id))
    served = ServedStore(vol, served_policy(tmp_path))
    info = parse_narinfo(client(served).get(f"/{H1}.narinfo").content, "deferred")
    assert info.nar_hash == hashlib.sha256(fetched).digest()
    with vol.store.read() as txn:
        assert vol.versions.get(txn, new.id).digest is None
    assert served._digests == {new.id: old.digest}


def test_a_path_no_nar_can_hold_is_not_offered(vol: Volume, tmp_path: Path) -> None:
    import os

    pol = parse_policy('mode = "enforce"\ndefault = "allow"\n', tmp_path / "open.toml")
    host = tmp_path / "odd"
    host.mkdir()
    (host / "ok").write_text("fine\n")
    os.mkfifo(host / "fifo")
    TreeImporter(vol).run(host, [b"nix", b"store", f"{H1}-odd".encode()])
    assert client(ServedStore(vol, pol)).get(f"/{H1}.narinfo").status_code == 404


def test_an_empty_store_has_nothing(vol: Volume, tmp_path: Path) -> None:
    c = client(ServedStore(vol, served_policy(tmp_path)))
    assert c.get(f"/{H1}.narinfo").status_code == 404  # no /nix/store at all
    assert c.get(f"/nar/{H1}-{'0' * 52}.nar").status_code == 404


def test_references_are_scanned_when_no_cache_signed_the_path(vol: Volume,
                                                             tmp_path: Path) -> None:
    """A path annofs holds no `built` statement for (imported, then signed with `annofs
    sign`): its references are the store paths present whose hash part its NAR
    contains, itself included, as Nix scans; the --key signature covers them."""
    pol = parse_policy(f'''mode = "enforce"
trusted-public-keys = ["{B.public_key().to_text()}"]
[[rules]]
path = "/nix/store/**"
signers = 1
''', tmp_path / "signed.toml")
    dep, top = tmp_path / "dep", tmp_path / "top"
    dep.mkdir()
    (dep / "lib").write_text("a library\n")
    (top / "bin").mkdir(parents=True)
    # The reference straddles 64 KiB NAR chunks: found across a boundary.
    (top / "bin" / "tool").write_bytes(b"x" * 65500 + f"/nix/store/{H2}-dep/lib\n".encode()
                                       + f"self: {H1}\n".encode() + f"absent {'3' * 32}".encode())
    for host, name in ((dep, f"{H2}-dep"), (top, f"{H1}-top")):
        TreeImporter(vol).run(host, [b"nix", b"store", name.encode()])
        sign(vol, B, f"/nix/store/{name}")
    served = ServedStore(vol, pol, [S])
    r = client(served).get(f"/{H1}.narinfo")
    info = parse_narinfo(r.content, "served")
    assert info.references == (f"{H1}-top", f"{H2}-dep")
    [check] = check_signatures(info, served_policy(tmp_path))
    assert check.counts and check.sig.key_name == "annofs-serve-1"
    nar = nar_hash(dump_volume(vol, [b"nix", b"store", f"{H1}-top".encode()]))
    assert info.nar_hash == nar.sha256


def test_a_key_needs_a_policy_that_guards_what_it_signs(vol: Volume, tmp_path: Path) -> None:
    """With --key annofs signs every path it offers: a policy that lets unsigned content
    under /nix/store be read (or does not enforce) would make it sign anything anyone
    wrote there. The key is refused, and a reload to such a policy too."""
    for text in ('mode = "enforce"\ndefault = "allow"\n',
                 'mode = "enforce"\ndefault = "require"\n[[rules]]\npath = "/nix/**"\n'
                 'signers = 0\n',
                 f'''mode = "warn"
trusted-public-keys = ["{A.public_key().to_text()}"]
[[rules]]
path = "/nix/store/**"
signers = 1
'''):
        loose = parse_policy(text, tmp_path / "loose.toml")
        with pytest.raises(UsageError, match=r"--key signs every path served"):
            ServedStore(vol, loose, [S])
        ServedStore(vol, loose)  # without a key it only serves what the policy allows
        guarded = ServedStore(vol, served_policy(tmp_path), [S])
        with pytest.raises(UsageError, match=r"--key signs every path served"):
            guarded.set_policy(loose)
        assert guarded.policy is not loose


def test_the_scanner_finds_windows_across_chunks() -> None:
    s = RefScanner()
    text = b"..." + b"a" * 40 + b"!"
    for i in range(len(text)):
        s.feed(text[i:i + 1])
    assert s.found == {"a" * HASH_PART_LEN}


def test_the_scanner_keeps_only_present_paths_past_its_bound() -> None:
    import random

    rng = random.Random(7)
    noise = "".join(rng.choice(HASH_CHARS) for _ in range(MAX_CANDIDATES + 100))
    asked: list[int] = []

    def present() -> frozenset[str]:
        asked.append(1)
        return frozenset({H2})

    s = RefScanner(present)
    s.feed(f"{H2} {noise} {H1}".encode())
    assert s.filtered and s.found == {H2} and asked == [1]


def test_nar_hashes_are_computed_once_per_tree_version(vol: Volume, tmp_path: Path,
                                                       fetched: bytes) -> None:
    pol = parse_policy('mode = "enforce"\ndefault = "allow"\n', tmp_path / "open.toml")
    served = ServedStore(vol, pol)
    c = client(served)
    first = parse_narinfo(c.get(f"/{H1}.narinfo").content, "1")
    for _ in range(3):
        assert c.get(f"/{H1}.narinfo").status_code == 200
    assert c.get(f"/{first.url}").status_code == 200
    assert served.hashes_computed == 1
    host = tmp_path / "share"
    host.mkdir()
    (host / "greeting").write_text("changed\n")
    TreeImporter(vol).run(host, [b"nix", b"store", f"{H1}-hello".encode(), b"share"])
    second = parse_narinfo(c.get(f"/{H1}.narinfo").content, "2")
    assert second.nar_hash != first.nar_hash and served.hashes_computed == 2
    assert second.nar_hash == nar_hash(dump_volume(
        vol, [b"nix", b"store", f"{H1}-hello".encode()])).sha256
    # The old NAR URL names the old hash: not served from the new tree.
    assert c.get(f"/{first.url}").status_code == 404
    assert c.get(f"/{second.url}").status_code == 200
    # The recorded cache signature is over the old NAR: it is not offered any more.
    assert second.sigs == ()


def test_a_big_hash_does_not_stall_other_requests(vol: Volume, tmp_path: Path,
                                                  fetched: bytes) -> None:
    """A real server (hypercorn on trio, as `annofs nix serve` runs it): while one
    path's NAR hash is being computed, another request is answered (hashing runs in a
    worker thread, not on the loop)."""
    pol = parse_policy('mode = "enforce"\ndefault = "allow"\n', tmp_path / "open.toml")
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(b"\0" * 4096)
    TreeImporter(vol).run(big, [b"nix", b"store", f"{H2}-big".encode()])
    served = ServedStore(vol, pol)
    hashing, release = threading.Event(), threading.Event()
    real_scan = served._scan

    def slow_scan(txn, key, where):  # type: ignore[no-untyped-def]
        # Stands for a NAR hash that takes long: held until the other request is done.
        if where[-1].startswith(H2.encode()):
            hashing.set()
            assert release.wait(20)
        return real_scan(txn, key, where)

    served._scan = slow_scan  # type: ignore[method-assign]
    with real_server(served) as port:
        try:
            got: dict[str, int] = {}

            def get_big() -> None:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/{H2}.narinfo") as r:
                    got["big"] = r.status

            t = threading.Thread(target=get_big)
            t.start()
            assert hashing.wait(20)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{H1}.narinfo",
                                        timeout=10) as r:
                assert r.status == 200  # answered while the big one is still hashing
            assert "big" not in got
            release.set()
            t.join(30)
            assert got == {"big": 200}
        finally:
            release.set()


@contextmanager
def real_server(served: ServedStore, **app: Any) -> Iterator[int]:
    """hypercorn on trio in a thread, as `annofs nix serve` runs it (create_cache_app's
    options in `app`); yields its port."""
    sock = bind(parse_listen("127.0.0.1:0"))
    port = sock.getsockname()[1]
    asgi = create_cache_app(served, **app)
    stop = threading.Event()

    async def until_stopped() -> None:
        while not stop.is_set():
            await trio.sleep(0.05)

    server = threading.Thread(target=trio.run, args=(
        lambda: serve(asgi, sock, shutdown_trigger=until_stopped),))
    server.start()
    try:
        yield port
    finally:
        stop.set()
        server.join(30)
