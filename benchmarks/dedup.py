"""Figure 2, `dedup-releases`: stored bytes after importing consecutive source releases.

SPEC.md §8: stored bytes after importing several releases of a large project, no more
than borg at the same average chunk size. Each release's sdist is unpacked and imported
in order to the same store path with `annofs import` semantics
(`TreeImporter(vol).run(tree, [b"src", b"proj"])`); beside it, if borg is installed, one
`borg create` archive per release into one repository with chunker parameters
`buzhash,12,16,14,4095` (min 4 KiB, max 64 KiB, average about 16 KiB: annofs's 4k/16k/64k)
and no compression.
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

from annofs.transfer.import_tree import TreeImporter
from annofs.volume import Volume
from benchmarks.registry import Context, FigureResult, Row, Skip, figure

PROJECT = "sqlalchemy"
VERSIONS = ("2.0.30", "2.0.31", "2.0.32", "2.0.33", "2.0.34")
QUICK_RELEASES = 2
DEST = [b"src", b"proj"]
BORG_CHUNKER = "buzhash,12,16,14,4095"
TARGET = "<= 1.00"


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
    payload: int
    fragments: int
    data_mdb: int
    store_du: int
    lmdb: dict[str, int]


def import_releases(trees: list[Path], store_dir: Path) -> AnnofsResult:
    """Import each tree in order to /src/proj of a fresh store; measure what is stored."""
    vol = Volume.open(store_dir, create=True)
    seconds, new_bytes = [], []
    try:
        for tree in trees:
            start = time.perf_counter()
            stats = TreeImporter(vol).run(tree, DEST)
            seconds.append(time.perf_counter() - start)
            new_bytes.append(stats.new_bytes)
        db = vol.store.db["fragments"]
        payload = fragments = 0
        with vol.store.env.begin(buffers=True) as txn:
            with txn.cursor(db=db) as cur:
                for value in cur.iternext(keys=False, values=True):
                    payload += len(value) - 1  # one codec byte before the payload
                    fragments += 1
            frag_stat = txn.stat(db)
            used = 0
            for name in vol.store.db:
                s = txn.stat(vol.store.db[name])
                used += s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
        info = vol.store.env.info()
    finally:
        vol.close()
    data_mdb = (store_dir / "db" / "data.mdb").stat()
    lmdb_facts = {
        "psize": frag_stat["psize"],
        "frag_overflow_pages": frag_stat["overflow_pages"],
        "frag_leaf_pages": frag_stat["leaf_pages"],
        "frag_branch_pages": frag_stat["branch_pages"],
        "used_pages": used,
        "last_pgno": info["last_pgno"],
        "file_size": data_mdb.st_size,
    }
    return AnnofsResult(seconds, new_bytes, payload, fragments, data_mdb.st_blocks * 512,
                        disk_usage(store_dir), lmdb_facts)


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
    """`borg init -e none`, then one `borg create` per tree, each from inside the tree."""
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
    subprocess.run([borg, "create", "--compression", "none", f"{scratch_repo}::empty", "."],
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
            [borg, "create", "--compression", "none", "--chunker-params", BORG_CHUNKER,
             "--files-cache", "disabled", f"{repo}::{name}", "."],
            cwd=tree, check=True, env=env, capture_output=True,
        )
        seconds.append(time.perf_counter() - start)
    info = json.loads(subprocess.run([borg, "info", "--json", str(repo)], check=True,
                                     env=env, capture_output=True, text=True).stdout)
    stats = info["cache"]["stats"]
    return BorgResult(version, seconds, fixed, disk_usage(repo), stats["unique_csize"],
                      stats["total_unique_chunks"])


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
        Row(f"stored payload / total size of {n} releases", _mb(a.payload), _mb(sizes.total),
            a.payload / sizes.total),
        Row("stored payload / unique file bytes", _mb(a.payload), _mb(sizes.unique),
            a.payload / sizes.unique),
        Row("LMDB data.mdb on disk / stored payload", _mb(a.data_mdb), _mb(a.payload),
            a.data_mdb / a.payload),
    ]
    borg_path = shutil.which("borg")
    b: BorgResult | None = None
    if borg_path is not None:
        ctx.log(f"dedup-releases: borg create of {len(trees)} releases")
        b = borg_releases(borg_path, trees, ctx.work,
                          [f"{PROJECT}-{v}" for v in versions])
        shutil.rmtree(ctx.work / "borg-repo")
        shutil.rmtree(ctx.work / "borg-base", ignore_errors=True)
        rows += [
            Row("store on disk / borg repo on disk (4k/16k/64k, no compression)",
                _mb(a.store_du), _mb(b.repo_du), a.store_du / b.repo_du, TARGET),
            Row("stored payload / borg unique chunks", _mb(a.payload), _mb(b.unique_csize),
                a.payload / b.unique_csize),
            Row(f"import time of {n} releases / borg create", f"{sum(a.seconds):.1f} s",
                f"{sum(b.seconds):.1f} s", sum(a.seconds) / sum(b.seconds)),
        ]
    else:
        rows.append(Row("store on disk / borg repo on disk", _mb(a.store_du),
                        "borg not installed", None))
    return FigureResult(rows, _notes(versions, sizes, a, b))


def _notes(versions: list[str], sizes: TreeSizes, a: AnnofsResult, b: BorgResult | None) -> str:
    psize = a.lmdb["psize"]
    overflow = a.lmdb["frag_overflow_pages"] * psize
    used = a.lmdb["used_pages"] * psize
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
{_mb(sizes.unique)}. MB = 10^6 bytes.

annofs: per release {per_release}. At the end the store holds {a.fragments} fragments,
{_mb(a.payload)} of payload (summed from the `fragments` database, codec byte excluded).
LMDB: page size {psize}; the fragments database uses {a.lmdb["frag_overflow_pages"]}
overflow pages ({_mb(overflow)}, {100 * (overflow / a.payload - 1):.1f}% over the payload:
LMDB stores a value larger than about half a page in whole overflow pages, so the last
page of every fragment is partly empty), {a.lmdb["frag_leaf_pages"]} leaf and
{a.lmdb["frag_branch_pages"]} branch pages; all databases together use {_mb(used)} of
pages; the file is {_mb(a.lmdb["file_size"])} long ({a.lmdb["last_pgno"] + 1} pages, the
rest being LMDB's free pages from copy-on-write) and takes {_mb(a.data_mdb)} on disk
(st_blocks * 512). "store on disk" is `du` of the whole store directory
({_mb(a.store_du)})."""
    if b is None:
        return text + "\n\nborg: not installed, so no borg comparison."
    per_borg = ", ".join(f"{s:.1f} s" for s in b.seconds)
    return text + f"""

borg ({b.version}): `borg init -e none`, then per release `borg create --compression none
--chunker-params {BORG_CHUNKER} --files-cache disabled REPO::NAME .` run from inside the
release tree (so archives share paths, like the shared store path), BORG_BASE_DIR in the
scratch directory. Times per archive: {per_borg}; each includes borg's fixed cost per
run (start-up, repository open, cache sync), {b.fixed_seconds:.2f} s for an empty
directory. The repository takes {_mb(b.repo_du)} on disk (`du`: segments, index, hints);
`borg info` counts {b.unique_chunks} unique chunks, {_mb(b.unique_csize)} stored (chunk data
with borg's per-chunk headers). The target row compares whole directories on disk, annofs's
store against borg's repository, both including their metadata."""
