"""nix/source.py in process: the store path Nix gives a `source` tree, and the NAR hash
cache per tree version (what changes the key, what does not, a damaged cache file)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from annofs.errors import UsageError
from annofs.nix import source
from annofs.nix.source import (
    CACHE_FILE,
    NarHashCache,
    add_source,
    hash_tree,
    make_source_path,
    tree_key,
)
from annofs.transfer.nar import dump_host, nar_hash, restore_nar_into
from annofs.transfer.nixbase32 import decode
from annofs.volume import Volume


def test_the_store_path_is_the_one_nix_store_add_printed() -> None:
    # `nix-store --add DIR/source` (Nix 2.8) of a three-entry tree printed this path
    # for this NAR hash (`nix-store -q --hash`).
    h = decode("0vh8js8iqhkwhj5msasijdvy8nk59d8ak2541rnf50inwyxk0xh6")
    assert make_source_path(h) == "/nix/store/jg7v68m2g785i69c0ghgdxq1gsqd7vcb-source"
    assert make_source_path(h, "other").endswith("-other")
    assert make_source_path(h, "other")[11:43] != "jg7v68m2g785i69c0ghgdxq1gsqd7vcb"


def host_tree(root: Path, data: bytes = b"data\n", exe: bool = True,
              target: str = "a") -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a").write_bytes(data)
    (root / "sub" / "run").write_text("#!/bin/sh\n")
    (root / "sub" / "run").chmod(0o755 if exe else 0o644)
    os.symlink(target, root / "l")
    return root


def put(vol: Volume, host: Path, where: bytes) -> None:
    restore_nar_into(vol, io.BytesIO(b"".join(dump_host(host))), [b"src", where])


def key(vol: Volume, where: list[bytes]) -> bytes:
    with vol.store.read() as txn:
        return tree_key(vol, txn, vol.namespace.resolve(txn, where))


def test_the_key_follows_what_the_nar_holds(vol: Volume, tmp_path: Path) -> None:
    put(vol, host_tree(tmp_path / "a"), b"a")
    put(vol, host_tree(tmp_path / "b", data=b"other\n"), b"b")
    put(vol, host_tree(tmp_path / "c", exe=False), b"c")
    put(vol, host_tree(tmp_path / "d", target="sub"), b"d")
    keys = {key(vol, [b"src", n]) for n in (b"a", b"b", b"c", b"d")}
    assert len(keys) == 4
    with vol.store.write() as txn:  # annofs cp: the same versions, the same key
        vol.namespace.copy(txn, [b"src", b"a"], [b"src", b"e"])
    assert key(vol, [b"src", b"e"]) == key(vol, [b"src", b"a"])
    cache = NarHashCache(vol.store.path)
    with vol.store.read() as txn:
        first = hash_tree(vol, txn, [b"src", b"a"], cache)
        again = hash_tree(vol, txn, [b"src", b"e"], NarHashCache(vol.store.path))
    want = nar_hash(dump_host(tmp_path / "a"))
    assert (first.nar, first.cached) == (want, False)
    assert (again.nar, again.cached) == (want, True)  # from the file, by another reader


def test_add_source_and_a_damaged_cache(vol: Volume, tmp_path: Path) -> None:
    put(vol, host_tree(tmp_path / "a"), b"a")
    made = add_source(vol, [b"src", b"a"], [b"nix", b"store"])
    assert not made.already and not made.cached
    assert made.store_path == make_source_path(nar_hash(dump_host(tmp_path / "a")).sha256)
    assert made.dest == (b"nix", b"store", made.store_path.split("/")[-1].encode())
    assert key(vol, list(made.dest)) == key(vol, [b"src", b"a"])
    (vol.store.path / CACHE_FILE).write_text("{not json")
    again = add_source(vol, [b"src", b"a"], [b"nix", b"store"])
    assert again.already and not again.cached and again.nar == made.nar
    with pytest.raises(UsageError, match="not a directory"):
        add_source(vol, [b"src", b"a", b"a"], [b"nix", b"store"])
    with pytest.raises(UsageError, match="not a Nix store path name"):
        add_source(vol, [b"src", b"a"], [b"nix", b"store"], name="a/b")


@pytest.mark.parametrize("kept", [0, 2, 1000])
def test_the_dump_uses_what_the_key_walk_listed_and_lists_the_rest(
        vol: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kept: int) -> None:
    # The NAR after a cache miss is made from the directories the key's walk kept, up
    # to a bound, and lists the others again: the same bytes either way.
    host = host_tree(tmp_path / "t")
    for d in ("x", "x/y", "z"):
        (host / d).mkdir()
        (host / d / "f").write_text(d)
    put(vol, host, b"t")
    monkeypatch.setattr(source, "_KEPT_ENTRIES", kept)
    with vol.store.read() as txn:
        listings: dict = {}
        tree_key(vol, txn, vol.namespace.resolve(txn, [b"src", b"t"]), listings)
        got = hash_tree(vol, txn, [b"src", b"t"], NarHashCache(tmp_path))
    assert sum(len(v) for v in listings.values()) <= kept
    assert (len(listings) == 5) == (kept == 1000)
    assert got.nar == nar_hash(dump_host(host))
