"""Binary caches over HTTP, file:// and hostile directories (nix/cache.py), with `nix
fetch` on a real store: a cache served on loopback answers as a directory does, transient
failures are tried again, and nothing a cache does (a FIFO, a URL out of the cache, a
stall, a lie about its store) hangs the fetch or adds anything."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from cache_server import Faults, serve_cache
from t2_nix_fetch import H1, A, add_to_cache, make_tree, nothing_added, policy

from annofs.errors import RefusedError, UsageError
from annofs.nix.cache import DirectoryCache, HttpCache, open_cache
from annofs.nix.fetch import fetch, mirror_remote
from annofs.transfer.nar import dump_host, dump_volume, nar_hash
from annofs.volume import Volume

CACHE_INFO = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache directory with one signed path (xz) and nix-cache-info."""
    d = tmp_path / "cache"
    nar = b"".join(dump_host(make_tree(tmp_path / "tree")))
    add_to_cache(d, H1, "hello", nar, [A])
    (d / "nix-cache-info").write_bytes(CACHE_INFO)
    return d


def fetched_nar(vol: Volume) -> bytes:
    got = nar_hash(dump_volume(vol, [b"nix", b"store", f"{H1}-hello".encode()]))
    return got.sha256


def no_wait(_seconds: float) -> None:
    pass


def test_an_http_cache_gives_what_the_directory_gives(vol: Volume, cache: Path,
                                                      tmp_path: Path) -> None:
    with serve_cache(cache) as url:
        [done] = fetch(vol, policy(tmp_path), [open_cache(url)], [H1])
    assert done.signers == ["cache-a-1"] and not done.already
    nar = b"".join(dump_host(tmp_path / "tree"))
    assert fetched_nar(vol) == hashlib.sha256(nar).digest()


def test_a_file_url_is_the_directory(vol: Volume, cache: Path, tmp_path: Path) -> None:
    c = open_cache(f"file://{cache}")
    assert isinstance(c, DirectoryCache) and c.path == cache
    [done] = fetch(vol, policy(tmp_path), [c], [H1])
    assert done.files >= 2


def test_transient_failures_are_tried_again(vol: Volume, cache: Path, tmp_path: Path) -> None:
    faults = Faults(statuses={f"{H1}.narinfo": [503, 500]})
    with serve_cache(cache, faults) as url:
        [done] = fetch(vol, policy(tmp_path), [HttpCache(url, sleep=no_wait)], [H1])
    assert faults.requests.count(f"{H1}.narinfo") == 3 and not done.already


def test_a_cache_that_keeps_failing_is_one_line_and_adds_nothing(vol: Volume, cache: Path,
                                                                 tmp_path: Path) -> None:
    faults = Faults(statuses={f"{H1}.narinfo": [502, 502, 502]})
    with serve_cache(cache, faults) as url, \
            pytest.raises(UsageError, match=r"HTTP 502 .*\(tried 3 times\)") as e:
        fetch(vol, policy(tmp_path), [HttpCache(url, sleep=no_wait)], [H1])
    assert "\n" not in str(e.value) and nothing_added(vol)


def test_a_missing_path_over_http_is_a_refusal(vol: Volume, cache: Path, tmp_path: Path) -> None:
    with serve_cache(cache) as url, pytest.raises(RefusedError, match=r"no 2{32}\.narinfo"):
        fetch(vol, policy(tmp_path), [open_cache(url)], ["2" * 32])
    assert nothing_added(vol)


def test_a_server_that_is_not_a_nix_cache(vol: Volume, cache: Path, tmp_path: Path) -> None:
    (cache / "nix-cache-info").unlink()
    with serve_cache(cache) as url, pytest.raises(UsageError, match="not a binary cache"):
        fetch(vol, policy(tmp_path), [open_cache(url)], [H1])
    (cache / "nix-cache-info").write_text("StoreDir: /gnu/store\n")
    with serve_cache(cache) as url, pytest.raises(UsageError, match="'/gnu/store', not /nix"):
        fetch(vol, policy(tmp_path), [open_cache(url)], [H1])
    assert nothing_added(vol)


def test_a_download_that_stalls_times_out(vol: Volume, cache: Path, tmp_path: Path) -> None:
    nar_url = next(p for p in (cache / "nar").iterdir()).relative_to(cache).as_posix()
    faults = Faults(stall_after={nar_url: 10}, stall_seconds=3.0)
    with serve_cache(cache, faults) as url, \
            pytest.raises((UsageError, RefusedError), match=r"broke off|timed out|corrupt"):
        fetch(vol, policy(tmp_path), [HttpCache(url, timeout=0.5, sleep=no_wait)], [H1])
    assert nothing_added(vol)


def test_a_trickling_download_meets_an_overall_deadline(vol: Volume, cache: Path,
                                                        tmp_path: Path) -> None:
    """Every read answers within its timeout, but the whole NAR takes longer than its
    size allows (grace + bytes at the minimum rate): given up, nothing added
    (SECURITY.md finding 9). The same pause within the allowance is fine."""
    nar_url = next(p for p in (cache / "nar").iterdir()).relative_to(cache).as_posix()
    faults = Faults(stall_after={nar_url: 10}, stall_seconds=1.5)
    with serve_cache(cache, faults) as url, \
            pytest.raises(UsageError, match=r"the download took over 0 s \(too slow"):
        fetch(vol, policy(tmp_path), [HttpCache(url, timeout=5, sleep=no_wait, grace=0.3,
                                                min_rate=1 << 40)], [H1])
    assert nothing_added(vol)
    with serve_cache(cache, faults) as url:
        [done] = fetch(vol, policy(tmp_path), [HttpCache(url, timeout=5, sleep=no_wait,
                                                         grace=5.0)], [H1])
    assert done.files > 0


def test_a_fifo_in_a_directory_cache_never_blocks(vol: Volume, cache: Path,
                                                  tmp_path: Path) -> None:
    os.mkfifo(cache / f"{'2' * 32}.narinfo")
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            fetch(vol, policy(tmp_path), [cache], ["2" * 32])
            result.append(None)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the fetch blocked on a FIFO"
    [err] = result
    assert isinstance(err, UsageError) and "not a regular file" in str(err)
    assert nothing_added(vol)


def test_a_nar_url_out_of_the_cache_is_refused(vol: Volume, cache: Path, tmp_path: Path) -> None:
    info = cache / f"{H1}.narinfo"
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the cache")
    lines = [("URL: ../secret" if ln.startswith("URL: ") else ln)
             for ln in info.read_text().splitlines()]
    info.write_text("\n".join(lines) + "\n")  # URL is not signed: the fingerprint holds
    with pytest.raises(UsageError, match=r"URL: '../secret': must be a relative path inside"):
        fetch(vol, policy(tmp_path), [cache], [H1])
    assert nothing_added(vol)


def test_unsupported_cache_urls_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unsupported cache URL"):
        open_cache("s3://bucket")
    with pytest.raises(UsageError, match="no such cache directory"):
        open_cache(f"file://{tmp_path}/missing")


def test_mirroring_copies_only_what_the_fetch_reads(cache: Path, tmp_path: Path) -> None:
    """What a mount's daemon does off its event loop before fetching from local copies."""
    with serve_cache(cache) as url:
        remote = open_cache(url)
        [local] = mirror_remote([remote], [H1], policy(tmp_path), False, tmp_path / "m")
    assert isinstance(local, DirectoryCache) and local.where == url
    copied = sorted(p.relative_to(local.path).as_posix() for p in local.path.rglob("*")
                    if p.is_file())
    expected = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")
                      if p.is_file() and p.name != "nix-cache-info")
    assert copied == expected
    for rel in copied:
        assert (local.path / rel).read_bytes() == (cache / rel).read_bytes()
