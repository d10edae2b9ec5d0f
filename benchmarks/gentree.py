"""A synthetic source tree shaped like nixpkgs, so the import figure runs anywhere.

nixpkgs (a checkout without .git) holds about 40k files: deep directories
(pkgs/CATEGORY/SUBCATEGORY/NAME/...), mostly small text (default.nix files, patches,
scripts of a few KiB), and a long tail of large ones (generated package sets, test data,
lock files of several MiB). `make_tree` writes such a tree deterministically: the same
seed gives the same names and bytes on every machine (`random.Random`'s `randbytes`,
`randrange`, `choices` and `random` are stable across CPython versions).

    python -m benchmarks.gentree DIR [--files N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path

KIB = 1 << 10
MIB = 1 << 20

NIXPKGS_FILES = 40_000
CATEGORIES = ("applications", "data", "desktops", "development", "games", "misc", "os-specific",
              "servers", "shells", "tools", "top-level", "build-support", "by-name")
# Shares of files by kind (by count): small text dominates, a tail of large files.
LARGE_SHARE = 0.003  # 120 of 40k files: 256 KiB - 4 MiB, half text, half binary
MEDIUM_SHARE = 0.03  # 16 - 128 KiB text
SMALL_SIZES = (64, 12 * KIB)  # default.nix, patches, scripts
_WORDS = 3000
_LINES = 20_000
MARKER = ".gentree-complete"


@dataclass(frozen=True)
class TreeFacts:
    """What was written."""

    files: int
    dirs: int
    bytes: int


class _Text:
    """Nix-like lines drawn from a fixed vocabulary: compressible, chunkable text."""

    def __init__(self, rng: random.Random) -> None:
        letters = string.ascii_lowercase + "-"
        words = ["".join(rng.choices(letters, k=rng.randrange(2, 12))) for _ in range(_WORDS)]
        shapes = ("  {0} = {1};", "  {0} = \"{1}-{2}\";", "    {0}.{1} = [ {2} {3} ];",
                  "{0} {1} {2}", "  inherit ({0}) {1} {2};", "  # {0} {1} {2} {3}")
        self.lines = [rng.choice(shapes).format(*rng.choices(words, k=4)).encode()
                      for _ in range(_LINES)]
        self.rng = rng

    def make(self, size: int) -> bytes:
        out: list[bytes] = []
        n = 0
        while n < size:
            line = self.lines[self.rng.randrange(_LINES)]
            out.append(line)
            n += len(line) + 1
        return b"\n".join(out)[:size]


def _size(rng: random.Random) -> tuple[int, bool]:
    """A file size and whether the file is binary (only in the large tail)."""
    r = rng.random()
    if r < LARGE_SHARE:
        return int(256 * KIB * (16 ** rng.random())), rng.random() < 0.5
    if r < LARGE_SHARE + MEDIUM_SHARE:
        return rng.randrange(16 * KIB, 128 * KIB), False
    # Log-uniform between the small bounds: many tiny files, fewer of a dozen KiB.
    lo, hi = SMALL_SIZES
    return int(lo * ((hi / lo) ** rng.random())), False


def make_tree(root: Path, files: int = NIXPKGS_FILES, seed: int = 1) -> TreeFacts:
    """Write a nixpkgs-shaped tree of `files` files under `root` (which must not exist)."""
    rng = random.Random(seed)
    text = _Text(rng)
    names = ["".join(rng.choices(string.ascii_lowercase, k=rng.randrange(3, 14)))
             for _ in range(4000)]
    root.mkdir(parents=True)
    dirs: set[Path] = set()
    total = 0
    written = 0
    # Groups of packages under categories, some one level deeper (as in nixpkgs).
    groups = [["pkgs", rng.choice(CATEGORIES), rng.choice(names)] for _ in range(400)]
    groups += [[*rng.choice(groups), rng.choice(names)] for _ in range(300)]
    # Packages: 1-6 files each (default.nix, patches, a script).
    while written < files:
        parts = [*rng.choice(groups), f"{rng.choice(names)}-{written}"]
        pkg = root.joinpath(*parts)
        pkg.mkdir(parents=True, exist_ok=True)
        dirs.update([pkg, *pkg.relative_to(root).parents])
        for i in range(min(rng.randrange(1, 7), files - written)):
            size, binary = _size(rng)
            name = "default.nix" if i == 0 else f"{rng.choice(names)}{rng.choice(EXTS)}"
            data = rng.randbytes(size) if binary else text.make(size)
            (pkg / name).write_bytes(data)
            total += len(data)
            written += 1
    (root / MARKER).write_text(f"{files} {seed}\n")
    return TreeFacts(written, len(dirs), total)


EXTS = (".nix", ".patch", ".sh", ".json", ".py", ".md", ".toml", ".lock", ".c", ".diff")


def cached_tree(cache: Path, files: int = NIXPKGS_FILES, seed: int = 1) -> Path:
    """The tree for (files, seed) under `cache`, written once and reused by later runs."""
    root = cache / f"gentree-{files}-{seed}"
    if (root / MARKER).exists():
        return root
    partial = cache / f".gentree-{files}-{seed}-partial"
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    cache.mkdir(parents=True, exist_ok=True)
    make_tree(partial, files, seed)
    os.rename(partial, root)
    return root


def main() -> None:
    """Write a tree from the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--files", type=int, default=NIXPKGS_FILES)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    facts = make_tree(args.dir, args.files, args.seed)
    print(f"{args.dir}: {facts.files} files, {facts.dirs} directories, {facts.bytes} bytes")


if __name__ == "__main__":
    main()
