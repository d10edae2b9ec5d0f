"""`nix fetch` on a real store, from binary caches this test writes (NARs from annofs's
own dump, signed with generated keys): every refusal adds nothing, every compression
streams, agreeing caches add signers. The same against the real Nix is in t4_nix_real."""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import socket
import time
from pathlib import Path

import pytest
import zstandard

from annofs.errors import RefusedError, UsageError
from annofs.nix.fetch import fetch
from annofs.nix.narinfo import HASH_CHARS, fingerprint, format_sha256
from annofs.transfer.nar import dump_host, dump_volume, nar_hash
from annofs.trust.annotations import AnnotationStore
from annofs.trust.gate import TrustGate
from annofs.trust.keys import SecretKey, generate_key
from annofs.trust.policy import Policy, parse_policy
from annofs.trust.signing import collect_files
from annofs.volume import Volume

A = generate_key("cache-a-1")
B = generate_key("cache-b-1")
M = generate_key("mallory-1")
H1 = "1" * 32
H2 = "2" * 32
_COMPRESS = {"none": (lambda b: b, ".nar"), "xz": (lzma.compress, ".nar.xz"),
             "bzip2": (bz2.compress, ".nar.bz2"),
             "zstd": (lambda b: zstandard.ZstdCompressor().compress(b), ".nar.zst")}
assert set(H1 + H2) <= set(HASH_CHARS)


def make_tree(root: Path, text: str = "hello\n") -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "share").mkdir()
    (root / "share" / "greeting").write_text(text)
    (root / "bin" / "hi").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "hi").chmod(0o755)
    (root / "empty").mkdir()
    os.symlink("../share/greeting", root / "bin" / "link")
    return root


def add_to_cache(cache: Path, hash_part: str, name: str, nar: bytes, keys: list[SecretKey],
                 *, compression: str = "xz", refs: tuple[str, ...] = (),
                 signed_nar: bytes | None = None, signed_size: int | None = None,
                 store_dir: str = "/nix/store") -> Path:
    """Write nar/<file> and <hash>.narinfo, signed by `keys` over `signed_nar`'s hash."""
    (cache / "nar").mkdir(parents=True, exist_ok=True)
    compress, ext = _COMPRESS[compression]
    data = compress(nar)
    url = f"nar/{hashlib.sha256(data).hexdigest()}{ext}"
    (cache / url).write_bytes(data)
    target = signed_nar if signed_nar is not None else nar
    digest = hashlib.sha256(target).digest()
    size = signed_size if signed_size is not None else len(target)
    path = f"{store_dir}/{hash_part}-{name}"
    fp = fingerprint(path, digest, size, [f"{store_dir}/{r}" for r in refs])
    lines = [f"StorePath: {path}", f"URL: {url}", f"Compression: {compression}",
             f"FileHash: {format_sha256(hashlib.sha256(data).digest())}",
             f"FileSize: {len(data)}", f"NarHash: {format_sha256(digest)}",
             f"NarSize: {size}", f"References: {' '.join(refs)}"]
    for k in keys:
        import base64
        lines.append(f"Sig: {k.name}:{base64.b64encode(k.sign(fp.encode())).decode()}")
    info = cache / f"{hash_part}.narinfo"
    info.write_text("".join(ln + "\n" for ln in lines))
    return info


def policy(tmp: Path, signers: int = 1, revoked: str = "") -> Policy:
    keys = ", ".join(f'"{k.public_key().to_text()}"' for k in (A, B))
    return parse_policy(f'''mode = "enforce"
trusted-public-keys = [{keys}]
revoked-keys = [{revoked}]
[[rules]]
path = "/nix/store/**"
signers = {signers}
claims = ["built"]
''', tmp / "policy.toml")


def nothing_added(vol: Volume) -> bool:
    with vol.store.read() as txn:
        names = [n for n, _ in vol.namespace.listdir(txn, int(vol.namespace.root(txn).target))]
        staging = vol.namespace.staging_roots(txn)
        statements = AnnotationStore(vol.store).count(txn)
        # The NAR is checked whole before the restore stores anything: not even fragments.
        fragments = vol.fragments.count(txn)
    return names == [] and staging == [] and statements == 0 and fragments == 0


def verdicts(vol: Volume, pol: Policy, top: str) -> dict[str, str]:
    gate = TrustGate(vol, pol)
    return {f.name: gate.verdict(f.path, f.version).status
            for f in collect_files(vol, [[b"nix", b"store", top.encode()]])}


@pytest.fixture
def nar(tmp_path: Path) -> bytes:
    return b"".join(dump_host(make_tree(tmp_path / "tree")))


@pytest.mark.parametrize("compression", ["none", "xz", "bzip2", "zstd"])
def test_fetch_verifies_streams_and_records_signatures(vol: Volume, tmp_path: Path, nar: bytes,
                                                       compression: str) -> None:
    cache = tmp_path / "cache"
    add_to_cache(cache, H1, "hello", nar, [A], compression=compression)
    pol = policy(tmp_path)
    [done] = fetch(vol, pol, [cache], [f"/nix/store/{H1}-hello"])
    assert done.files == 2 and done.signers == ["cache-a-1"] and done.statements == 1
    got = nar_hash(dump_volume(vol, [b"nix", b"store", f"{H1}-hello".encode()]))
    assert got.sha256 == hashlib.sha256(nar).digest() and got.size == len(nar)
    # The symlink is covered as a NAR covers it: by its target (SPEC §4).
    assert verdicts(vol, pol, f"{H1}-hello") == {f"{H1}-hello/bin/hi": "allowed",
                                                 f"{H1}-hello/bin/link": "allowed",
                                                 f"{H1}-hello/share/greeting": "allowed"}
    # Fetching again from the same cache finds the path there and adds nothing new.
    [again] = fetch(vol, pol, [cache], [H1])
    assert again.already and again.statements == 0


def test_two_caches_that_agree_make_two_signers(vol: Volume, tmp_path: Path,
                                                nar: bytes) -> None:
    ca, cb = tmp_path / "a", tmp_path / "b"
    add_to_cache(ca, H1, "hello", nar, [A], compression="xz")
    add_to_cache(cb, H1, "hello", nar, [B], compression="zstd")
    two = policy(tmp_path, signers=2)
    fetch(vol, two, [ca], [H1])
    assert set(verdicts(vol, two, f"{H1}-hello").values()) == {"refused"}  # one is not two
    [done] = fetch(vol, two, [cb], [H1])  # the second builder's signature over the same NAR
    assert done.already and done.statements == 1 and done.signers == ["cache-b-1"]
    assert set(verdicts(vol, two, f"{H1}-hello").values()) == {"allowed"}


def test_both_caches_at_once_and_a_disagreeing_one_counts_for_nothing(
        vol: Volume, tmp_path: Path, nar: bytes) -> None:
    ca, cb, cc = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    add_to_cache(ca, H1, "hello", nar, [A])
    add_to_cache(cb, H1, "hello", nar, [B])
    [done] = fetch(vol, policy(tmp_path, signers=2), [ca, cb], [H1])
    assert done.signers == ["cache-a-1", "cache-b-1"] and done.statements == 2
    other = b"".join(dump_host(make_tree(tmp_path / "other", "HELLO\n")))
    add_to_cache(cc, H2, "hello", nar, [A])
    add_to_cache(cb, H2, "hello", other, [B])
    [d2] = fetch(vol, policy(tmp_path), [cc, cb], [H2])
    assert d2.signers == ["cache-a-1"] and "disagrees" in d2.notes[0]


@pytest.mark.parametrize("case", ["hash", "size-larger", "size-smaller", "flipped", "xz",
                                  "bzip2", "zstd",
                                  "missing-nar", "missing-narinfo", "unsigned", "untrusted",
                                  "revoked", "bad-file-hash"])
def test_refusals_add_nothing(vol: Volume, tmp_path: Path, nar: bytes, case: str) -> None:
    cache = tmp_path / "cache"
    keys, pol = [A], policy(tmp_path)
    kwargs: dict = {"compression": "none"}
    body = nar
    if case == "hash":
        kwargs["signed_nar"] = nar[:-8] + b"\x01" + nar[-7:]
    elif case == "size-larger":
        kwargs["signed_size"] = len(nar) + 8
    elif case == "size-smaller":
        kwargs["signed_size"] = len(nar) - 8
    elif case == "flipped":
        i = nar.index(b"hello\n")
        body = nar[:i] + b"j" + nar[i + 1:]
        kwargs["signed_nar"] = nar
    elif case in ("xz", "bzip2", "zstd"):
        kwargs["compression"] = case
    elif case == "unsigned":
        keys = []
    elif case == "untrusted":
        keys = [M]
    elif case == "revoked":
        pol = policy(tmp_path, revoked='"cache-a-1"')
    info = add_to_cache(cache, H1, "hello", body, keys, **kwargs)
    if case in ("xz", "bzip2", "zstd"):  # a flipped byte inside the compressed stream
        [f] = (cache / "nar").iterdir()
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        f.write_bytes(bytes(raw))
        info.write_text("\n".join(ln for ln in info.read_text().split("\n")
                                  if not ln.startswith("File")))
    elif case == "missing-nar":
        for f in (cache / "nar").iterdir():
            f.unlink()
    elif case == "missing-narinfo":
        info.unlink()
    elif case == "bad-file-hash":
        info.write_text(info.read_text().replace("FileSize: ", "FileSize: 1"))
    with pytest.raises(RefusedError) as e:
        fetch(vol, pol, [cache], [f"/nix/store/{H1}-hello"])
    msg = str(e.value)
    assert "\n" not in msg
    expected = {"hash": "NAR hash mismatch", "size-larger": "NAR size mismatch",
                "size-smaller": "larger than NarSize", "flipped": "NAR hash mismatch",
                "xz": "corrupt", "bzip2": "corrupt", "zstd": "", "missing-nar": "NAR is missing",
                "missing-narinfo": "no 1111", "unsigned": "no Sig line",
                "untrusted": "mallory-1: not a trusted key", "revoked": "key revoked",
                "bad-file-hash": "FileSize mismatch"}[case]
    assert expected in msg
    if case == "zstd":  # no checksum in the frame: the NAR itself is found wrong
        assert "corrupt" in msg or "NAR hash mismatch" in msg or "not the NAR" in msg
    assert nothing_added(vol)


# (not "store_dir": that is conftest's fixture naming the annofs store)
@pytest.mark.parametrize("nix_dir", ["/tmp/evil", "/nix/store/sub", "/gnu/store"])
def test_a_narinfo_for_another_store_dir_is_refused(vol: Volume, tmp_path: Path, nar: bytes,
                                                    nix_dir: str) -> None:
    """Signed by a trusted key, but for a path outside /nix/store: Nix refuses it ("not
    in the Nix store"); so does annofs, rather than install it under /nix/store."""
    cache = tmp_path / "cache"
    add_to_cache(cache, H1, "hello", nar, [A], store_dir=nix_dir)
    with pytest.raises(UsageError) as e:
        fetch(vol, policy(tmp_path), [cache], [H1])
    assert str(e.value) == (f"{cache}/{H1}.narinfo:1: StorePath: '{nix_dir}/{H1}-hello' "
                            f"is not in the Nix store /nix/store")
    assert nothing_added(vol)


def test_a_path_there_with_other_content_is_refused(vol: Volume, tmp_path: Path,
                                                    nar: bytes) -> None:
    ca, cb = tmp_path / "a", tmp_path / "b"
    add_to_cache(ca, H1, "hello", nar, [A])
    fetch(vol, policy(tmp_path), [ca], [H1])
    other = b"".join(dump_host(make_tree(tmp_path / "other", "HELLO\n")))
    add_to_cache(cb, H1, "hello", other, [B])
    with pytest.raises(RefusedError, match="already exists with other content"):
        fetch(vol, policy(tmp_path), [cb], [H1])


def test_recursive_follows_references_first(vol: Volume, tmp_path: Path, nar: bytes) -> None:
    cache = tmp_path / "cache"
    lib = tmp_path / "lib.txt"
    lib.write_text("a library\n")
    add_to_cache(cache, H2, "lib", b"".join(dump_host(lib)), [A])
    add_to_cache(cache, H1, "hello", nar, [A], refs=(f"{H2}-lib", f"{H1}-hello"))
    pol = policy(tmp_path)
    done = fetch(vol, pol, [cache], [H1], recursive=True)
    assert [d.store_path for d in done] == [f"/nix/store/{H2}-lib", f"/nix/store/{H1}-hello"]
    assert verdicts(vol, pol, f"{H2}-lib") == {f"{H2}-lib": "allowed"}
    # Without --recursive only the path itself; a missing reference refuses the closure.
    (cache / f"{H2}.narinfo").unlink()
    with pytest.raises(RefusedError, match=f"no {H2}.narinfo"):
        fetch(vol, pol, [cache], [H1], recursive=True, dest=[b"elsewhere"])


def test_built_statements_cover_symlinks(vol: Volume, tmp_path: Path, nar: bytes) -> None:
    """Nix store paths are full of symlinks: each is a subject of the cache's `built`
    statement (by its target), so a symlink put in place of one is refused, and a store
    path that is one symlink is signed too."""
    cache = tmp_path / "cache"
    add_to_cache(cache, H1, "hello", nar, [A])
    (tmp_path / "lonely").parent.mkdir(exist_ok=True)
    os.symlink("/nix/store/" + H1 + "-hello/bin/hi", tmp_path / "lonely")
    add_to_cache(cache, H2, "only-a-link", b"".join(dump_host(tmp_path / "lonely")), [A])
    pol = policy(tmp_path)
    fetch(vol, pol, [cache], [H1, H2])
    link = collect_files(vol, [[b"nix", b"store", f"{H1}-hello".encode(), b"bin", b"link"]])
    [ref] = link
    assert ref.is_symlink and ref.target == b"../share/greeting"
    with vol.store.read() as txn:
        [ss] = AnnotationStore(vol.store).for_digest(txn, ref.digest)
    assert ss.statement.claim == "built" and ss.statement.fingerprint is not None
    assert [s.name for s in ss.statement.subjects if s.symlink] == [f"{H1}-hello/bin/link"]
    assert verdicts(vol, pol, f"{H2}-only-a-link") == {f"{H2}-only-a-link": "allowed"}
    # Swapped for a symlink elsewhere: no statement covers that target.
    gate = TrustGate(vol, pol)
    from annofs.trust.symlink import symlink_content
    assert gate.verdict(ref.path, symlink_content(b"/tmp/evil")).status == "refused"
    # Fetched again (the path is there): nothing new, symlinks included in the match.
    [again] = fetch(vol, pol, [cache], [H1])
    assert again.already and again.statements == 0


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory"])
@pytest.mark.parametrize("which", ["narinfo", "nar"])
def test_a_cache_file_that_is_not_regular_is_refused_at_once(
        vol: Volume, tmp_path: Path, nar: bytes, kind: str, which: str) -> None:
    """A FIFO blocked every read (and in a mount, every request) until someone wrote to
    it; now every cache file is opened without blocking and must be a regular file."""
    cache = tmp_path / "cache"
    info = add_to_cache(cache, H1, "hello", nar, [A])
    victim = info if which == "narinfo" else next((cache / "nar").iterdir())
    victim.unlink()
    held = None
    if kind == "fifo":
        os.mkfifo(victim)
    elif kind == "socket":
        held = socket.socket(socket.AF_UNIX)
        here = os.getcwd()
        os.chdir(victim.parent)  # sun_path is short: bind by a relative name
        try:
            held.bind(victim.name)
        finally:
            os.chdir(here)
    else:
        victim.mkdir()
    started = time.monotonic()
    try:
        with pytest.raises(UsageError) as e:
            fetch(vol, policy(tmp_path), [cache], [f"/nix/store/{H1}-hello"])
    finally:
        if held is not None:
            held.close()
    assert time.monotonic() - started < 5
    name = {"fifo": "a FIFO", "socket": "a socket", "directory": "a directory"}[kind]
    assert str(e.value) == f"{victim}: {name}, not a regular file"
    assert nothing_added(vol)
