"""gc --keep-last / --keep-within on a Volume: synthetic histories, timestamps set by the
test, and what must never go (named, held, signed versions, the empty root)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from t2_trust import ALICE, P, sign, write

from annofs.content.history import ancestry
from annofs.content.versions import EMPTY_VERSION
from annofs.errors import UsageError
from annofs.maintenance.fsck import check_store
from annofs.maintenance.gc import collect
from annofs.maintenance.retention import Retention, parse_duration, retention_from
from annofs.store.keys import u64
from annofs.store.records import encode_version
from annofs.transfer.import_tree import TreeImporter
from annofs.volume import Volume

HOUR = 3600 * 10**9
NOW = 1_800_000_000 * 10**9  # the "now" every test measures ages from


@pytest.fixture
def vol(vol: Volume) -> Iterator[Volume]:
    yield vol
    rep = check_store(vol)
    assert rep.ok, "\n".join(rep.problems)


def contents(n: int, seed: int = 0) -> list[bytes]:
    """n distinct contents, each sharing nothing with the others."""
    rnd = random.Random(seed)
    return [rnd.randbytes(30_000 + 1000 * i) for i in range(n)]


def history(vol: Volume, tmp_path: Path, path: str, data: list[bytes]) -> list[int]:
    """A file at `path` whose versions are `data` in order; version ids, oldest first.
    Version i is stamped (len(data) - 1 - i) hours before NOW: the head is NOW."""
    src = tmp_path / "host"
    src.mkdir(exist_ok=True)
    name = path.strip("/").split("/")[-1]
    (src / name).write_bytes(data[0])
    TreeImporter(vol).run(src, P(path)[:-1])
    (src / name).unlink()
    with vol.store.read() as txn:
        ids = [int(vol.namespace.resolve(txn, P(path)).target)]
    ids += [write(vol, P(path), d).id for d in data[1:]]
    for i, vid in enumerate(ids):
        stamp(vol, vid, NOW - (len(ids) - 1 - i) * HOUR)
    return ids


def stamp(vol: Volume, vid: int, created_ns: int) -> None:
    """Set a version's creation time (the test controls the clock of the history)."""
    with vol.store.write() as txn:
        v = vol.versions.get(txn, vid)
        txn.put(u64(vid), encode_version(dataclasses.replace(v, created_ns=created_ns)),
                db=vol.store.db["versions"])


def chain(vol: Volume, path: str) -> list[int]:
    """What `annofs log` walks: the named version and its ancestors, newest first."""
    with vol.store.read() as txn:
        head = int(vol.namespace.resolve(txn, P(path)).target)
        return [v.id for v in ancestry(txn, vol.versions, head)]


def content(vol: Volume, vid: int) -> bytes:
    with vol.store.read() as txn:
        v = vol.versions.get(txn, vid)
        return vol.versions.read(txn, v, 0, v.size)


def exists(vol: Volume, vid: int) -> bool:
    with vol.store.read() as txn:
        return vol.versions.exists(txn, vid)


def test_keep_last_keeps_the_newest_n_and_reparents(vol: Volume, tmp_path: Path) -> None:
    data = contents(6)
    ids = history(vol, tmp_path, "/d/f", data)
    assert chain(vol, "/d/f") == [*reversed(ids), EMPTY_VERSION]
    rep = collect(vol, retention=Retention(keep_last=3), now_ns=NOW)
    assert rep.versions_freed == 3
    assert rep.bytes_freed >= sum(len(d) for d in data[:3])
    assert chain(vol, "/d/f") == [ids[5], ids[4], ids[3], EMPTY_VERSION]
    for i in (3, 4, 5):
        assert content(vol, ids[i]) == data[i]
    for i in (0, 1, 2):
        assert not exists(vol, ids[i])
    with vol.store.read() as txn:
        oldest = vol.versions.get(txn, ids[3])
    # Re-derived from the empty root: its edit adds all it holds, removes nothing.
    assert oldest.edit is not None and oldest.edit.removed == 0
    # Run again: nothing more goes (the rule is already met).
    assert collect(vol, retention=Retention(keep_last=3), now_ns=NOW).versions_freed == 0


def test_keep_within_keeps_what_is_younger(vol: Volume, tmp_path: Path) -> None:
    ids = history(vol, tmp_path, "/d/f", contents(6))  # 5h, 4h, ... 0h old
    collect(vol, retention=Retention(keep_within_ns=parse_duration("2h30m")), now_ns=NOW)
    assert chain(vol, "/d/f") == [ids[5], ids[4], ids[3], EMPTY_VERSION]
    # Later, all of those are older than the window: only the named version stays.
    collect(vol, retention=Retention(keep_within_ns=HOUR), now_ns=NOW + 10 * HOUR)
    assert chain(vol, "/d/f") == [ids[5], EMPTY_VERSION]


def test_both_rules_keep_the_union(vol: Volume, tmp_path: Path) -> None:
    ids = history(vol, tmp_path, "/d/f", contents(6))
    stamp(vol, ids[1], NOW - 10 * 60 * 10**9)  # an old version with a recent stamp
    rule = retention_from(2, "30m")
    collect(vol, retention=rule, now_ns=NOW)
    assert chain(vol, "/d/f") == [ids[5], ids[4], ids[1], EMPTY_VERSION]
    assert content(vol, ids[1]) == contents(6)[1]


def test_no_rule_keeps_every_ancestor(vol: Volume, tmp_path: Path) -> None:
    ids = history(vol, tmp_path, "/d/f", contents(4))
    assert collect(vol, retention=Retention(), now_ns=NOW).versions_freed == 0
    assert chain(vol, "/d/f") == [*reversed(ids), EMPTY_VERSION]


def test_each_name_keeps_its_own_history(vol: Volume, tmp_path: Path) -> None:
    """A copy shares the history up to the copy; each name keeps its N newest."""
    data = contents(7)
    ids = history(vol, tmp_path, "/d/f", data[:4])
    with vol.store.write() as txn:
        vol.namespace.copy(txn, P("/d/f"), P("/d/g"))
    g = [write(vol, P("/d/g"), d).id for d in data[4:6]]
    f = write(vol, P("/d/f"), data[6]).id
    collect(vol, retention=Retention(keep_last=2), now_ns=NOW)
    assert chain(vol, "/d/f") == [f, ids[3], EMPTY_VERSION]
    # g's older part is f's: kept for f, so g's history still passes through it.
    assert chain(vol, "/d/g") == [g[1], g[0], ids[3], EMPTY_VERSION]
    assert content(vol, ids[3]) == data[3] and content(vol, g[0]) == data[4]
    assert not any(exists(vol, v) for v in ids[:3])


def test_never_dropped_named_held_signed_root(vol: Volume, tmp_path: Path) -> None:
    data = contents(8)
    ids = history(vol, tmp_path, "/d/f", data[:6])
    other = history(vol, tmp_path, "/e/h", data[6:8])
    sign(vol, ALICE, "/d/f")  # signs the current version of /d/f ...
    signed = ids[5]
    more = write(vol, P("/d/f"), b"after the signature" * 1000).id  # ... then it changes
    # An open handle still reads ids[2] (a version no name refers to any more).
    collect(vol, retention=Retention(keep_last=1), extra_roots={ids[2]}, now_ns=NOW)
    assert exists(vol, signed) and content(vol, signed) == data[5]
    assert exists(vol, ids[2]) and content(vol, ids[2]) == data[2]
    assert exists(vol, EMPTY_VERSION)
    # Kept versions stay linked in their order: the signed one now derives from the held.
    assert chain(vol, "/d/f") == [more, signed, ids[2], EMPTY_VERSION]
    assert chain(vol, "/e/h") == [other[1], EMPTY_VERSION]
    assert not any(exists(vol, v) for v in (ids[0], ids[1], ids[3], ids[4], other[0]))
    # Held with --keep-last 2: the held version's own history keeps its parent too.
    ids2 = history(vol, tmp_path, "/k/f", contents(4, seed=9))
    collect(vol, retention=Retention(keep_last=2), extra_roots={ids2[1]}, now_ns=NOW)
    assert exists(vol, ids2[0]) and exists(vol, ids2[1])


@pytest.mark.parametrize("keep_last,keep_within,message", [
    (-1, None, "--keep-last -1: must be at least 1"),
    (0, None, "--keep-last 0: must be at least 1"),
    (True, None, "--keep-last True: not a whole number"),
    ("3", None, "--keep-last '3': not a whole number"),
    (None, "3x", "--keep-within '3x': not a duration"),
    (None, "7", "--keep-within '7': not a duration"),
    (None, "", "--keep-within '': not a duration"),
    (None, "-1d", "--keep-within '-1d': not a duration"),
    (None, "0h", "--keep-within '0h': must be longer than zero"),
    (None, 5, "--keep-within 5: not a duration"),
])
def test_bad_values_are_refused(keep_last: object, keep_within: object, message: str) -> None:
    with pytest.raises(UsageError) as e:
        retention_from(keep_last, keep_within)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_durations() -> None:
    assert parse_duration("30m") == 30 * 60 * 10**9
    assert parse_duration("12h") == 12 * HOUR
    assert parse_duration("7d") == 7 * 24 * HOUR
    assert parse_duration("2w") == 14 * 24 * HOUR
    assert parse_duration("1d12h") == 36 * HOUR
    assert parse_duration("45s") == 45 * 10**9
