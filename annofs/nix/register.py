"""Registering store paths in a Nix database, so the real Nix sees them as valid.

A path annofs adds to a store directory (`nix fetch`, `nix add-source`) is only a tree
until Nix's database (`ValidPaths`, `Refs`) lists it: `nix-store --verify-path` says
"not valid", builds do not use it. Registration runs the real `nix-store` of the Nix
root `R` (`--store local?root=R`, R/nix/store being the store directory; `/` is the
system's store) with `--load-db`, which reads what `--dump-db` writes: path, NarHash,
NarSize, deriver, the number of references, the references.

Why `--load-db` and not `--register-validity --hash-given`: Nix 2.8's register-validity
canonicalises the metadata of `/nix/store/<path>` as printed, i.e. on the host's own
/nix/store even for a chroot store (changing an unrelated host path, or failing when
the host has none); load-db only writes the database. annofs writes Nix's canonical
metadata itself (nar.restore_nar_into, `canonical`). Paths Nix already holds as valid
are left alone: load-db would re-register them and drop the signatures Nix keeps.

References must be valid first (Nix refuses a path whose reference it does not know):
callers pass paths references first, as `nix fetch` orders a closure.

Signatures and content addresses, which `--load-db` cannot carry, are written right
after into the same database (nix/nixdb.py): each path's verified `Sig`s merged into
`ValidPaths.sigs`, its checked `CA` into `.ca`. A preflight (`nixdb.check`) comes
first: a database that is missing, of an unknown schema or locked past the timeout is
an error before Nix's database is touched.

If the process dies between `--load-db` and that update (or another writer holds the
database past the timeout in that instant: exit 2, and the message says so), Nix holds
the paths valid without their signatures: still the right trees (load-db wrote what
annofs verified), but vouched for by nothing in Nix's database, so a gate on
`nix-database` counts only annofs's own statements for them. A re-run repairs it: the
paths are then valid, not loaded again, and `record` merges the signatures and CA into
their rows (it runs for every path, new or not).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from annofs.errors import RefusedError, UsageError
from annofs.nix import nixdb

STORE_DIR = "/nix/store"
# nix-store of a big closure reads and writes SQLite; generous, but never for ever.
_TIMEOUT = 300


@dataclass(frozen=True)
class Registration:
    """What Nix's database records for one valid path."""

    path: str  # /nix/store/<hash>-<name>
    nar_hash: str  # sha256:<nix base32>
    nar_size: int
    references: tuple[str, ...] = ()  # full store paths
    deriver: str | None = None  # full store path of the .drv, if known
    sigs: tuple[str, ...] = ()  # `name:base64`, only those annofs verified
    ca: str | None = None  # `fixed:r:sha256:...` / `text:sha256:...`, checked

    def load_db_text(self) -> str:
        """The record in `nix-store --dump-db` / `--load-db` format."""
        lines = [self.path, self.nar_hash, str(self.nar_size), self.deriver or "",
                 str(len(self.references)), *sorted(self.references)]
        return "".join(f"{ln}\n" for ln in lines)


def nix_root_of(store_dir: Path) -> Path | None:
    """R when `store_dir` is R/nix/store (a chroot store's or the system's), else None."""
    p = Path(os.path.abspath(store_dir))
    if p.name == "store" and p.parent.name == "nix":
        return p.parent.parent
    return None


def store_uri(root: Path) -> str:
    """The `--store` argument for Nix root `root`."""
    return "local" if Path(os.path.abspath(root)) == Path("/") else f"local?root={root}"


def _nix_store() -> str:
    exe = shutil.which("nix-store")
    if exe is None:
        raise UsageError("nix-store: not found on PATH (install Nix to register store "
                         "paths, or leave out --nix-root)")
    return exe


def _run(root: Path, args: Sequence[str], stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_nix_store(), "--store", store_uri(root), *args], input=stdin,
                          capture_output=True, text=True, timeout=_TIMEOUT, check=False)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def invalid_paths(root: Path, paths: Sequence[str]) -> set[str]:
    """Those of `paths` Nix's database at `root` does not hold as valid."""
    if not paths:
        return set()
    res = _run(root, ["--check-validity", "--print-invalid", *paths])
    if res.returncode != 0:
        raise RefusedError(f"{root}: nix-store --check-validity failed: "
                           f"{_last_line(res.stderr)}")
    return {ln.strip() for ln in res.stdout.splitlines() if ln.strip()}


@dataclass(frozen=True)
class Registered:
    """What `register` did to one path."""

    path: str
    new: bool  # registered now (else it was valid already)
    sigs: tuple[str, ...]  # key names whose signatures were added to Nix's database
    ca: str | None  # the content address recorded now, if any


def register(root: Path, regs: Sequence[Registration]) -> list[Registered]:
    """Register `regs` (references first) in the Nix database of root `root`, with their
    signatures and content addresses; what changed, per path (nothing for a path that
    was valid with all of them). RefusedError (one line, Nix's reason) if Nix refuses:
    e.g. a reference it does not hold as valid. UsageError (exit 2) if the database is
    missing, of an unknown schema or locked past the timeout: nothing registered."""
    for r in regs:
        if not r.path.startswith(STORE_DIR + "/"):
            raise UsageError(f"{r.path}: not a path in {STORE_DIR}")
    if not regs:
        return []
    nixdb.check(root, regs)
    new = invalid_paths(root, [r.path for r in regs])
    todo = [r for r in regs if r.path in new]
    if todo:
        res = _run(root, ["--load-db"], "".join(r.load_db_text() for r in todo))
        if res.returncode != 0:
            raise RefusedError(f"{root}: Nix did not register "
                               f"{', '.join(r.path for r in todo)}: {_last_line(res.stderr)}")
    # Dying here leaves `todo` valid without sigs and CA; a re-run records them (see the
    # module docstring): `record` looks at every path, not only the new ones.
    recorded = {x.path: x for x in nixdb.record(root, regs)}
    out = []
    for r in regs:
        x = recorded.get(r.path)
        if r.path in new or x is not None:
            out.append(Registered(r.path, r.path in new, x.sigs if x else (),
                                  x.ca if x else None))
    return out
