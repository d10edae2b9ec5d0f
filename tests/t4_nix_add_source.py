"""`annofs nix add-source` against the real Nix (2.8, as root): a tree in a mount becomes
the store path `nix-store --add` of the same tree named `source` makes, by an O(1) copy,
registered so Nix holds it valid; the NAR hash is cached per tree version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from conftest import Mount, annofs_cmd
from t4_nix_real import run
from t4_nix_register import nix_store


def write_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "flake.nix").write_text("{ outputs = _: { }; }\n")
    (root / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "sub" / "run.sh").chmod(0o755)
    (root / "sub" / "deeper" / "data").write_bytes(os.urandom(300_000))
    os.symlink("../flake.nix", root / "sub" / "link")
    (root / "empty").mkdir()


def nix_add(tree: Path, tmp: Path) -> str:
    """The path the real Nix makes of `tree` named source (in a scratch native store)."""
    copy = tmp / "native-src" / "source"
    shutil.rmtree(copy.parent, ignore_errors=True)
    copy.parent.mkdir()
    shutil.copytree(tree, copy, symlinks=True)
    out = nix_store(tmp / "native", "--add", str(copy))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def add_source(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(annofs_cmd("--store", str(store), "nix", "add-source", *args))


def test_add_source_in_a_mount_is_the_path_nix_makes(mounted: Mount, tmp_path: Path) -> None:
    root = mounted.path  # R: the mount; R/nix/store its store directory
    (root / "nix" / "store").mkdir(parents=True)
    assert nix_store(root, "--check-validity", "--print-invalid").returncode == 0
    proj = root / "proj"
    proj.mkdir()
    write_tree(proj)
    want = nix_add(proj, tmp_path)

    res = add_source(mounted.store, str(proj))
    assert res.returncode == 0, res.stderr
    assert f"{want} -> {root}{want}: copied" in res.stdout
    assert "(NAR hash computed)" in res.stdout
    assert f"registered {want} in local?root={root}" in res.stdout
    assert nix_store(root, "--verify-path", want).returncode == 0
    hashed = nix_store(root, "-q", "--hash", want)
    assert hashed.returncode == 0 and hashed.stdout.strip() in res.stdout
    assert (root / want.lstrip("/") / "sub" / "run.sh").read_text() == "#!/bin/sh\necho hi\n"
    # A flake's path: input of the store path is that very path to Nix.
    meta = run(["nix", "--extra-experimental-features", "nix-command flakes", "--store",
                f"local?root={root}", "flake", "metadata", "--json",
                f"path:{root}{want}"])
    assert meta.returncode == 0 and json.loads(meta.stdout)["path"] == want, meta.stderr

    again = add_source(mounted.store, str(proj))
    assert again.returncode == 0, again.stderr
    assert "already present" in again.stdout and "(NAR hash cached)" in again.stdout
    assert "registered" not in again.stdout

    # One file changes: a new path, as Nix computes it; the old one is unchanged.
    (proj / "sub" / "deeper" / "data").write_bytes(b"changed\n")
    want2 = nix_add(proj, tmp_path)
    assert want2 != want
    res2 = add_source(mounted.store, str(proj))
    assert res2.returncode == 0, res2.stderr
    assert f"{want2} -> " in res2.stdout and "(NAR hash computed)" in res2.stdout
    check = nix_store(root, "--verify", "--check-contents")
    assert check.returncode == 0 and "corrupted" not in check.stderr, check.stderr
    assert len((root / want.lstrip("/") / "sub" / "deeper" / "data").read_bytes()) == 300_000


def test_add_source_offline_and_mistakes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert run(annofs_cmd("--store", str(store), "init")).returncode == 0
    host = tmp_path / "host"
    host.mkdir()
    write_tree(host)
    assert run(annofs_cmd("--store", str(store), "import", str(host), "/src/p")).returncode == 0
    want = nix_add(host, tmp_path)
    res = add_source(store, "/src/p")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{want} -> {want}: copied")
    for args, problem in [(["/src/p/flake.nix"], "not a directory"),
                          (["/src/missing"], "no such file"),
                          (["--name", ".hidden", "/src/p"], "not a Nix store path name")]:
        bad = add_source(store, *args)
        assert bad.returncode == 2 and problem in bad.stderr, bad
        assert bad.stderr.count("\n") == 1


FLAKE = """{
  outputs = { self }: {
    packages.@SYSTEM@.default = derivation {
      name = "from-source"; system = "@SYSTEM@"; builder = "/bin/sh";
      args = [ "-c" ''
        read line < ${self}/data
        echo "$line built" > $out
        echo ${self} >> $out
      '' ];
    };
  };
}
"""


def test_nix_build_of_the_added_source_uses_it_without_copying(mounted: Mount,
                                                               tmp_path: Path) -> None:
    """`nix build path:/nix/store/<hash>-source#default` on the chroot store (R the mount,
    `--allow-other`: the builder runs as nixbld1), after `annofs nix add-source`: Nix
    takes the registered path as the flake's source (a `path:` input naming a valid
    store path called `source` is used as it is), adds no second `-source` path, and
    the build reads its file. A flake with no inputs (no nixpkgs, no network); Nix's
    pure evaluation has no currentSystem, so the system is written in."""
    import platform

    mounted.stop()
    mounted.start("--allow-other")
    for d in (tmp_path, mounted.path):
        d.chmod(0o755)  # nixbld1 walks to the store through these
    root = mounted.path
    (root / "nix" / "store").mkdir(parents=True)
    (root / "nix" / "store").chmod(0o1775)
    assert nix_store(root, "--check-validity", "--print-invalid").returncode == 0
    proj = root / "proj"
    proj.mkdir()
    system = f"{platform.machine()}-linux"
    (proj / "flake.nix").write_text(FLAKE.replace("@SYSTEM@", system))
    (proj / "data").write_text("hello source\n")
    added = add_source(mounted.store, str(proj))
    assert added.returncode == 0, added.stderr
    source = added.stdout.split(" ", 1)[0]
    assert source.endswith("-source") and f"registered {source}" in added.stdout
    info = run(["nix", "--extra-experimental-features", "nix-command", "path-info",
                "--store", f"local?root={root}", "--json", source])
    assert info.returncode == 0, info.stderr
    (registered,) = json.loads(info.stdout)
    assert registered["ca"].startswith("fixed:r:sha256:")  # as Nix's own addToStore
    before = os.stat(root / source.lstrip("/"))

    built = run(["nix", "--extra-experimental-features", "nix-command flakes", "--store",
                 f"local?root={root}", "build", "--no-link", "--json", "--option",
                 "substituters", "", "--option", "extra-sandbox-paths",
                 "/bin /lib /lib64 /usr", f"path:{source}#default"])
    assert built.returncode == 0, built.stderr
    out = json.loads(built.stdout)[0]["outputs"]["out"]
    assert (root / out.lstrip("/")).read_text() == f"hello source built\n{source}\n"
    sources = [p for p in os.listdir(root / "nix" / "store") if p[33:] == "source"]
    assert sources == [source.rsplit("/", 1)[1]]
    after = os.stat(root / source.lstrip("/"))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    again = run(["nix", "--extra-experimental-features", "nix-command", "path-info",
                 "--store", f"local?root={root}", "--json", source])
    assert json.loads(again.stdout)[0]["registrationTime"] == registered["registrationTime"]
