"""Figure 2, `dedup-releases`: stored bytes after importing consecutive source releases.

SPEC.md §8 and issue 18: stored bytes after importing several releases of a large
project, no more than `borg create --compression zstd,3` at the same chunk sizes, and
below `restic backup` with its default compression. Each release's sdist is unpacked and
imported in order to the same store path with `annofs import` semantics
(`TreeImporter(vol).run(tree, [b"src", b"proj"])`); beside it, if installed, one `borg
create` archive per release into one repository with chunker parameters
`buzhash,12,16,14,4095` (min 4 KiB, max 64 KiB, average about 16 KiB: annofs's
4k/16k/64k) and `--compression zstd,3`, and one `restic backup` snapshot per release
(restic's own chunker, compression auto). The uncompressed ideal is the unique chunk
payload annofs keeps, before compression.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from annofs.store.compact import EnvUsage, compact_store, env_usage
from annofs.store.env import FORMAT_VERSION, open_env_readonly
from annofs.transfer.import_tree import TreeImporter
from annofs.volume import Volume
from benchmarks.registry import Context, FigureResult, Row, Skip, figure

PROJECT = "sqlalchemy"
VERSIONS = ("2.0.30", "2.0.31", "2.0.32", "2.0.33", "2.0.34")
QUICK_RELEASES = 2
DEST = [b"src", b"proj"]
BORG_CHUNKER = "buzhash,12,16,14,4095"
BORG_COMPRESSION = "zstd,3"
TARGET = "<= 1.00"
RESTIC_TARGET = "< 1.00"


# -- releases ------------------------------------------------------------------------------


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _find_sdist(directory: Path, project: str, version: str) -> Path | None:
    wanted = _normal(f"{project}-{version}")
    if not directory.is_dir():
        return None
    for path in directory.iterdir():
        for ext in (".tar.gz", ".zip"):
            if path.name.endswith(ext) and _normal(path.name[: -len(ext)]) == wanted:
                return path
    return None


def fetch_release(cache: Path, project: str, version: str) -> Path:
    """The unpacked source tree of `project==version`, downloaded and unpacked once.

    The sdist comes from `pip download --no-binary :all: --no-deps` into
    `cache/sdist`; it is unpacked under `cache/releases`. Raises Skip if pip fails
    (typically: no network).
    """
    sdists = cache / "sdist"
    sdist = _find_sdist(sdists, project, version)
    if sdist is None:
        sdists.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--quiet", f"{project}=={version}", "-d", str(sdists)],
            capture_output=True, text=True, check=False,
        )
        sdist = _find_sdist(sdists, project, version)
        if proc.returncode != 0 or sdist is None:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise Skip(f"pip download {project}=={version} failed: {last}")
    unpacked = cache / "releases" / f"{_normal(project)}-{version}"
    if not unpacked.exists():
        # Unpack beside, then rename: a concurrent or interrupted run never sees half a tree.
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{unpacked.name}-", dir=unpacked.parent))
        try:
            if sdist.name.endswith(".zip"):
                with zipfile.ZipFile(sdist) as z:
                    z.extractall(partial)
            else:
                with tarfile.open(sdist) as t:
                    t.extractall(partial, filter="data")
            os.rename(partial, unpacked)
        except OSError:
            if not unpacked.exists():
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    tops = [p for p in unpacked.iterdir() if p.is_dir()]
    return tops[0] if len(tops) == 1 else unpacked


def _regular_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under `path` (st_blocks * 512 of every file and directory)."""
    total = path.lstat().st_blocks * 512
    for dirpath, dirs, names in os.walk(path):
        for name in [*dirs, *names]:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


@dataclass
class TreeSizes:
    """Sizes of the releases taken together."""

    files: int
    total: int
    unique: int


def tree_sizes(trees: list[Path]) -> TreeSizes:
    """Total bytes of regular files, and bytes of distinct file contents (by BLAKE3)."""
    files = total = unique = 0
    seen: set[bytes] = set()
    for tree in trees:
        for path in _regular_files(tree):
            data = path.read_bytes()
            files += 1
            total += len(data)
            digest = blake3.blake3(data).digest()
            if digest not in seen:
                seen.add(digest)
                unique += len(data)
    return TreeSizes(files, total, unique)


# -- annofs --------------------------------------------------------------------------------


@dataclass
class AnnofsResult:
    """What importing the releases into one store gave."""

    seconds: list[float]
    new_bytes: list[int]
    payload: int  # stored (compressed) fragment bytes
    ideal: int  # the same fragments uncompressed: the unique chunk payload
    fragments: int
    packs: int
    packs_du: int
    data_mdb: int
    store_du: int
    compact_seconds: list[float]  # part of `seconds`: compacting the LMDB file after each
    lmdb_before: EnvUsage  # after the last import, before its compaction
    lmdb_after: EnvUsage


def _lmdb_usage(store_dir: Path) -> EnvUsage:
    env = open_env_readonly(store_dir)
    try:
        return env_usage(env)
    finally:
        env.close()


def import_releases(trees: list[Path], store_dir: Path) -> AnnofsResult:
    """Import each tree in order to /src/proj of a fresh store, each as one `annofs
    import` does (open, import, close, then compact the LMDB file if worth it); measure
    what is stored."""
    Volume.open(store_dir, create=True).close()
    seconds, new_bytes, compact_seconds = [], [], []
    before = after = None
    for tree in trees:
        start = time.perf_counter()
        vol = Volume.open(store_dir)
        try:
            stats = TreeImporter(vol).run(tree, DEST)
        finally:
            vol.close()
        imported = time.perf_counter()
        before = _lmdb_usage(store_dir)  # not timed: only the report needs it
        t0 = time.perf_counter()
        compact_store(store_dir)
        compacted = time.perf_counter() - t0
        after = _lmdb_usage(store_dir)
        seconds.append(imported - start + compacted)
        compact_seconds.append(compacted)
        new_bytes.append(stats.new_bytes)
    vol = Volume.open(store_dir)
    try:
        with vol.store.read() as txn:
            fragments, payload, ideal = vol.fragments.totals(txn)
    finally:
        vol.close()
    packs = store_dir / "packs"
    assert before is not None and after is not None
    return AnnofsResult(seconds, new_bytes, payload, ideal, fragments,
                        sum(1 for _ in packs.iterdir()), disk_usage(packs),
                        (store_dir / "db" / "data.mdb").stat().st_blocks * 512,
                        disk_usage(store_dir), compact_seconds, before, after)


# -- borg ----------------------------------------------------------------------------------


@dataclass
class BorgResult:
    """What `borg create` of each release into one repository gave."""

    version: str
    seconds: list[float]
    fixed_seconds: float
    repo_du: int
    unique_csize: int
    unique_chunks: int


def borg_releases(borg: str, trees: list[Path], work: Path, names: list[str]) -> BorgResult:
    """`borg init -e none`, then one `borg create --compression zstd,3` per tree, each
    from inside the tree."""
    env = {
        **os.environ,
        "BORG_BASE_DIR": str(work / "borg-base"),
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    }
    repo = work / "borg-repo"
    version = subprocess.run([borg, "--version"], capture_output=True, text=True,
                             check=True, env=env).stdout.strip()
    subprocess.run([borg, "init", "-e", "none", str(repo)], check=True, env=env,
                   capture_output=True)
    # borg's fixed cost per archive (start-up, repository lock and open, cache sync), from
    # an empty directory into a throwaway repository so the measured one stays clean.
    empty, scratch_repo = work / "borg-empty", work / "borg-scratch-repo"
    empty.mkdir()
    subprocess.run([borg, "init", "-e", "none", str(scratch_repo)], check=True, env=env,
                   capture_output=True)
    start = time.perf_counter()
    subprocess.run([borg, "create", "--compression", BORG_COMPRESSION,
                    f"{scratch_repo}::empty", "."],
                   cwd=empty, check=True, env=env, capture_output=True)
    fixed = time.perf_counter() - start
    shutil.rmtree(scratch_repo)
    empty.rmdir()
    seconds = []
    for tree, name in zip(trees, names, strict=True):
        start = time.perf_counter()
        # From inside the tree, so every archive holds the same paths, like the same
        # store path for annofs; files cache off, so every file is read as annofs does.
        subprocess.run(
            [borg, "create", "--compression", BORG_COMPRESSION, "--chunker-params", BORG_CHUNKER,
             "--files-cache", "disabled", f"{repo}::{name}", "."],
            cwd=tree, check=True, env=env, capture_output=True,
        )
        seconds.append(time.perf_counter() - start)
    info = json.loads(subprocess.run([borg, "info", "--json", str(repo)], check=True,
                                     env=env, capture_output=True, text=True).stdout)
    stats = info["cache"]["stats"]
    return BorgResult(version, seconds, fixed, disk_usage(repo), stats["unique_csize"],
                      stats["total_unique_chunks"])


# -- restic --------------------------------------------------------------------------------


@dataclass
class ResticResult:
    """What `restic backup` of each release into one repository gave."""

    version: str
    seconds: list[float]
    repo_du: int


def restic_releases(restic: str, trees: list[Path], work: Path) -> ResticResult:
    """`restic init`, then one `restic backup .` per tree from inside it (default
    compression: auto, zstd), with a throwaway password and cache in the scratch dir."""
    repo = work / "restic-repo"
    env = {**os.environ, "RESTIC_PASSWORD": "benchmark", "RESTIC_REPOSITORY": str(repo),
           "RESTIC_CACHE_DIR": str(work / "restic-cache")}
    version = subprocess.run([restic, "version"], capture_output=True, text=True,
                             check=True, env=env).stdout.strip()
    subprocess.run([restic, "init"], check=True, env=env, capture_output=True)
    seconds = []
    for tree in trees:
        start = time.perf_counter()
        # --force: read every file, as annofs's first import of each tree does.
        subprocess.run([restic, "backup", "--force", "--quiet", "."], cwd=tree, check=True,
                       env=env, capture_output=True)
        seconds.append(time.perf_counter() - start)
    return ResticResult(version, seconds, disk_usage(repo))


# -- the figure ------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@figure("dedup-releases", "stored bytes after importing consecutive releases")
def dedup_releases(ctx: Context) -> FigureResult:
    """Import the releases into one store; compare with total, unique and borg bytes."""
    versions = list(VERSIONS[:QUICK_RELEASES] if ctx.quick else VERSIONS)
    ctx.log(f"dedup-releases: fetching {PROJECT} {', '.join(versions)}")
    trees = [fetch_release(ctx.cache, PROJECT, v) for v in versions]
    sizes = tree_sizes(trees)
    ctx.log(f"dedup-releases: importing {len(trees)} releases into annofs")
    a = import_releases(trees, ctx.work / "dedup-store")
    shutil.rmtree(ctx.work / "dedup-store")
    n = len(trees)
    rows = [
        Row(f"store on disk / total size of {n} releases", _mb(a.store_du), _mb(sizes.total),
            a.store_du / sizes.total),
        Row("store on disk / uncompressed ideal (unique chunk payload)", _mb(a.store_du),
            _mb(a.ideal), a.store_du / a.ideal),
        Row("stored payload (zstd) / uncompressed ideal", _mb(a.payload), _mb(a.ideal),
            a.payload / a.ideal),
        Row("LMDB data.mdb on disk / store on disk", _mb(a.data_mdb), _mb(a.store_du),
            a.data_mdb / a.store_du),
    ]
    borg_path = shutil.which("borg")
    b: BorgResult | None = None
    if borg_path is not None:
        ctx.log(f"dedup-releases: borg create --compression {BORG_COMPRESSION} of {n} releases")
        b = borg_releases(borg_path, trees, ctx.work,
                          [f"{PROJECT}-{v}" for v in versions])
        shutil.rmtree(ctx.work / "borg-repo")
        shutil.rmtree(ctx.work / "borg-base", ignore_errors=True)
        rows += [
            Row(f"store on disk / borg repo on disk (4k/16k/64k, {BORG_COMPRESSION})",
                _mb(a.store_du), _mb(b.repo_du), a.store_du / b.repo_du, TARGET),
            Row(f"import time of {n} releases / borg create ({BORG_COMPRESSION})",
                f"{sum(a.seconds):.1f} s", f"{sum(b.seconds):.1f} s",
                sum(a.seconds) / sum(b.seconds)),
        ]
    else:
        rows.append(Row("store on disk / borg repo on disk", _mb(a.store_du),
                        "borg not installed", None))
    restic_path = shutil.which("restic")
    r: ResticResult | None = None
    if restic_path is not None:
        ctx.log(f"dedup-releases: restic backup of {n} releases")
        r = restic_releases(restic_path, trees, ctx.work)
        shutil.rmtree(ctx.work / "restic-repo")
        shutil.rmtree(ctx.work / "restic-cache", ignore_errors=True)
        rows += [
            Row("store on disk / restic repo on disk (compression auto)", _mb(a.store_du),
                _mb(r.repo_du), a.store_du / r.repo_du, RESTIC_TARGET),
            Row(f"import time of {n} releases / restic backup", f"{sum(a.seconds):.1f} s",
                f"{sum(r.seconds):.1f} s", sum(a.seconds) / sum(r.seconds)),
        ]
    else:
        rows.append(Row("store on disk / restic repo on disk", _mb(a.store_du),
                        "restic not installed", None))
    return FigureResult(rows, _notes(versions, sizes, a, b, r))


def _usage_lines(u: EnvUsage) -> str:
    return "; ".join(u.lines()) + "."


def _notes(versions: list[str], sizes: TreeSizes, a: AnnofsResult, b: BorgResult | None,
           r: ResticResult | None) -> str:
    per_release = ", ".join(
        f"{v}: {_mb(nb)} new in {s:.1f} s" for v, nb, s in zip(versions, a.new_bytes, a.seconds,
                                                              strict=True)
    )
    text = f"""\
What: the sdists of {PROJECT} {", ".join(versions)} (`pip download --no-binary :all:
--no-deps`, cached in `benchmarks/work/cache/`), unpacked, then imported in that order to
the same store path `/src/proj` of one fresh store with
`annofs.transfer.import_tree.TreeImporter(vol).run(tree, [b"src", b"proj"])`, as
`annofs import` does. Together they hold {sizes.files} files, {_mb(sizes.total)}; the
distinct file contents (whole-file dedup by BLAKE3, what a file-level store keeps) are
{_mb(sizes.unique)}. MB = 10^6 bytes; "on disk" is `du` (st_blocks * 512) of the whole
store or repository directory, metadata included.

annofs (store format {FORMAT_VERSION}): per release {per_release}. At the end the store holds
{a.fragments} fragments, {_mb(a.ideal)} uncompressed (the ideal: unique chunk payload)
stored as {_mb(a.payload)} (each fragment zstd level 3, or raw if that does not shrink
it) in {a.packs} pack files taking {_mb(a.packs_du)}; LMDB's data.mdb (index, versions,
namespace) takes {_mb(a.data_mdb)}; the whole store {_mb(a.store_du)}.

LMDB, pages per database after the last import, before `annofs import`'s compaction
(store.compact: when free pages are at least 25% of the file and 1 MiB, and nobody else
has the store open, every database is rewritten in key order with LMDB's append mode into
a new file, swapped in by one rename), then after it (each compaction took
{", ".join(f"{c * 1000:.0f} ms" for c in a.compact_seconds)}, counted in the import times;
one that found too little free ran in about a millisecond):

Before: {_usage_lines(a.lmdb_before)}

After: {_usage_lines(a.lmdb_after)}

Each release is imported as one `annofs import` command does it: the store opened, the
tree imported, the store closed and compacted (until 2026-12-06 10:54 the figure kept one
store open for all five releases and never compacted: 1.8 s in all, data.mdb 4.5 MB of
which ~2.2 MB free pages, store/borg 1.11)."""
    if b is None:
        text += "\n\nborg: not installed, so no borg comparison."
    else:
        per_borg = ", ".join(f"{s:.1f} s" for s in b.seconds)
        text += f"""

borg ({b.version}): `borg init -e none`, then per release `borg create --compression
{BORG_COMPRESSION} --chunker-params {BORG_CHUNKER} --files-cache disabled REPO::NAME .` run
from inside the release tree (so archives share paths, like the shared store path),
BORG_BASE_DIR in the scratch directory. Times per archive: {per_borg}; each includes
borg's fixed cost per run (start-up, repository open, cache sync), {b.fixed_seconds:.2f} s
for an empty directory. The repository takes {_mb(b.repo_du)} on disk; `borg info` counts
{b.unique_chunks} unique chunks, {_mb(b.unique_csize)} stored."""
    if r is None:
        return text + "\n\nrestic: not installed, so no restic comparison."
    per_restic = ", ".join(f"{s:.1f} s" for s in r.seconds)
    return text + f"""

restic ({r.version}): `restic init` (RESTIC_PASSWORD set, default repository version and
compression auto), then per release `restic backup --force .` from inside the release
tree, its cache in the scratch directory. Times per snapshot: {per_restic}. restic chunks
with its own parameters (512 KiB to 8 MiB, 1 MiB average: larger than annofs's, so less
index but coarser dedup). The repository takes {_mb(r.repo_du)} on disk."""
