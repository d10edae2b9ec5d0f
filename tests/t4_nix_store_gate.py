"""The real Nix (Debian's nix-bin, 2.8, as root, no daemon) using an annofs mount as its
store behind the policy the product exists for: `/nix/store/**` needs two trusted
signers with claim `built`, or a content address (`content-addressed`), and the policy
names Nix's database (`nix-database`), so the gate judges the store as Nix does
(annofs/trust/nixstore.py).

Layout: the volume's /nix/store (mount M, `--allow-other`: builds run as nixbld1) is
bind-mounted at R/nix/store of a chroot store `--store local?root=R`; Nix's database is
R/nix/var/nix/db/db.sqlite on the host disk. Builds run sandboxed (as nixbld1, the
store's inputs hard-linked or bind-mounted into X.drv.chroot); Debian's /bin/sh is
dynamic, so /bin, /lib, /lib64 and /usr are extra sandbox paths.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd, fail_on_daemon_log
from fuse_helpers import NOBODY, as_user, errno_of, read_at, run_as

from annofs.daemon.events import read_events

pytestmark = pytest.mark.skipif(shutil.which("nix-build") is None,
                                reason="the real Nix (nix-bin) is not installed")

NIX = ["nix", "--extra-experimental-features", "nix-command"]
SANDBOX = ["--option", "extra-sandbox-paths", "/bin /lib /lib64 /usr"]
DRV = """
let
  dep = builtins.derivation {
    name = "gate-dep-@TAG@"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo 'a dependency' > $out"];
  };
in builtins.derivation {
  name = "gate-hello-@TAG@"; system = builtins.currentSystem; builder = "/bin/sh";
  args = ["-c" ''
    /bin/mkdir -p $out/bin $out/share
    echo ${dep} > $out/share/dep-path
    /bin/cat ${dep} > $out/share/copied
    printf '#!/bin/sh\\necho hi\\n' > $out/bin/hi
    /bin/chmod +x $out/bin/hi
    /bin/ln -s ../share/copied $out/bin/link
    /bin/cat $out/share/copied > $out/share/read-back
    /usr/bin/id -u > $out/share/builder-uid
  ''];
}
"""


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


@dataclass
class Keys:
    """Nix signing keys made once: cache-a-1 and cache-b-1 trusted, mallory-1 not."""

    dir: Path

    def sec(self, *names: str) -> str:
        return " ".join(str(self.dir / f"{n}.sec") for n in names)

    def pub(self, name: str) -> str:
        return (self.dir / f"{name}.pub").read_text().strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    for name in ("cache-a-1", "cache-b-1", "mallory-1"):
        run(["nix-store", "--generate-binary-cache-key", name, str(d / f"{name}.sec"),
             str(d / f"{name}.pub")], check=True)
    return Keys(d)


@dataclass
class NixStore:
    """A chroot store R whose R/nix/store is the mount's /nix/store."""

    mount: Mount
    root: Path
    keys: Keys

    @property
    def url(self) -> str:
        return f"local?root={self.root}"

    def nix_store(self, *args: str, sign: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        opts = ["--option", "secret-key-files", self.keys.sec(*sign)] if sign else []
        return run(["nix-store", "--store", self.url, *SANDBOX, *opts, *args])

    def build(self, tag: str, sign: tuple[str, ...]) -> str:
        """nix-build the two-derivation expression (`tag` makes its paths new)."""
        expr = self.root.parent / f"{tag}.nix"
        expr.write_text(DRV.replace("@TAG@", tag))
        opts = ["--option", "secret-key-files", self.keys.sec(*sign)] if sign else []
        res = run(["nix-build", "--store", self.url, *SANDBOX, *opts, str(expr),
                   "--no-out-link"])
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1]

    def check(self, tag: str, sign: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        """`nix-build --check` of what `build(tag)` built: rebuilt in the chroot (under
        the registered output's name) and compared."""
        opts = ["--option", "secret-key-files", self.keys.sec(*sign)] if sign else []
        return run(["nix-build", "--store", self.url, *SANDBOX, *opts, "--check",
                    str(self.root.parent / f"{tag}.nix"), "--no-out-link"])

    def inside(self, store_path: str) -> Path:
        return self.mount.path / store_path.lstrip("/")

    def read_as(self, uid: int, store_path: str, rel: str = "") -> bytes:
        """The file's bytes read by `uid` through the mount (OSError: its errno)."""
        fd = os.open(self.mount.path, os.O_PATH | os.O_DIRECTORY)
        try:
            name = store_path.lstrip("/") + (f"/{rel}" if rel else "")
            return run_as((uid, uid, ()), read_at, fd, name)
        finally:
            os.close(fd)


def write_policy(path: Path, keys: Keys, database: Path) -> Path:
    path.write_text(f'''mode = "enforce"
default = "allow"
trusted-public-keys = ["{keys.pub("cache-a-1")}", "{keys.pub("cache-b-1")}"]
nix-database = "{database}"

[[rules]]
path = "/nix/store/**"
signers = 2
claims = ["built", "content-addressed"]
''')
    return path


@pytest.fixture
def nixs(tmp_path: Path, keys: Keys, request: pytest.FixtureRequest) -> Iterator[NixStore]:
    """A fresh store mounted with the policy (`--allow-other`), its /nix/store bound at
    R/nix/store; the daemon's log is checked as `mounted` does (`fail_on_daemon_log`)."""
    store, mp, root = tmp_path / "store", tmp_path / "mnt", tmp_path / "R"
    mp.mkdir()
    (root / "nix" / "store").mkdir(parents=True)
    # nixbld1 and uid 65534 walk to the store through these.
    for d in (tmp_path, root, root / "nix"):
        d.chmod(0o755)
    pol = write_policy(tmp_path / "policy.toml", keys, root / "nix/var/nix/db/db.sqlite")
    subprocess.run(annofs_cmd("--store", str(store), "init"), check=True,
                   stdout=subprocess.DEVNULL)
    m = Mount(store, mp)
    m.start("--allow-other", "--policy", str(pol))
    bound = False
    try:
        (mp / "nix" / "store").mkdir(parents=True)
        (mp / "nix" / "store").chmod(0o1775)
        subprocess.run(["mount", "--bind", str(mp / "nix" / "store"),
                        str(root / "nix" / "store")], check=True)
        bound = True
        yield NixStore(m, root, keys)
    finally:
        if bound:
            subprocess.run(["umount", str(root / "nix" / "store")], check=True)
        m.stop()
    fail_on_daemon_log(m, request)


def refusal_for(m: Mount, suffix: str) -> str:
    """The reason of the last refusal recorded for a path ending in `suffix`."""
    events = [e for e in read_events(m.store) if e.verdict == "refused"
              and e.path.endswith(suffix)]
    assert events, f"no refusal of ...{suffix} recorded"
    return events[-1].reason + "\n" + events[-1].explanation


# -- trusted paths: Nix works -----------------------------------------------------------


def test_add_add_fixed_build_verify_optimise_gc(nixs: NixStore, tmp_path: Path) -> None:
    """`--add`, `--add-fixed --recursive` (content-addressed: self-certifying), a build
    with a dependency signed by two keys (`secret-key-files`), `--verify
    --check-contents`, `--optimise` (.links), `--gc`: all succeed, and uid 65534 reads
    every path after registration, optimised files included."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a").write_text("a file\n")
    (src / "tool").write_text("#!/bin/sh\n")
    (src / "tool").chmod(0o755)
    (src / "link").symlink_to("sub/a")
    (tmp_path / "single.txt").write_text("a dependency\n")  # same bytes as the build's dep

    added = nixs.nix_store("--add", str(tmp_path / "single.txt"))
    assert added.returncode == 0, added.stderr
    single = added.stdout.strip()
    fixed = nixs.nix_store("--add-fixed", "--recursive", "sha256", str(src))
    assert fixed.returncode == 0, fixed.stderr
    tree = fixed.stdout.strip()
    top = nixs.build("one", ("cache-a-1", "cache-b-1"))
    assert (nixs.inside(top) / "share" / "read-back").read_text() == "a dependency\n"
    # The builder ran sandboxed as a build user (it read its input through the chroot,
    # and its own output back, in flight), not as root: Nix 2.8's sandbox shows the
    # build user (nixbld1 outside, so to the mount) as uid 1000 inside its namespace.
    assert (nixs.inside(top) / "share" / "builder-uid").read_text() == "1000\n"
    checked = nixs.check("one", ("cache-a-1", "cache-b-1"))
    assert checked.returncode == 0, checked.stderr

    assert nixs.read_as(NOBODY, single) == b"a dependency\n"
    assert nixs.read_as(NOBODY, tree, "sub/a") == b"a file\n"
    assert nixs.read_as(NOBODY, tree, "link") == b"a file\n"  # readlink judged too
    assert nixs.read_as(NOBODY, top, "share/copied") == b"a dependency\n"
    assert nixs.read_as(NOBODY, top, "bin/link") == b"a dependency\n"
    drvs = [p.name for p in (nixs.mount.path / "nix/store").iterdir()
            if p.name.endswith(".drv")]
    assert len(drvs) == 2
    for drv in drvs:  # text:sha256 content addresses
        assert nixs.read_as(NOBODY, f"/nix/store/{drv}").startswith(b"Derive(")

    verify = nixs.nix_store("--verify", "--check-contents")
    assert verify.returncode == 0 and "error" not in verify.stderr, verify.stderr
    opt = nixs.nix_store("--optimise")
    assert opt.returncode == 0, opt.stderr
    links = nixs.mount.path / "nix/store/.links"
    assert len(list(links.iterdir())) >= 4
    # Optimised: the dep, the build's copy of it and the --add'ed file are one inode now.
    assert (os.stat(nixs.inside(single)).st_ino
            == os.stat(nixs.inside(top) / "share" / "copied").st_ino)
    for path, rel in ((single, ""), (top, "share/copied"), (tree, "sub/a"),
                      (top, "bin/hi")):
        assert nixs.read_as(NOBODY, path, rel)
    assert nixs.nix_store("--verify", "--check-contents").returncode == 0

    gc = nixs.nix_store("--gc")
    assert gc.returncode == 0, gc.stderr
    assert not nixs.inside(top).exists() and not nixs.inside(single).exists()
    assert list(links.iterdir()) == []


def test_nix_copy_input_addressed_and_content_addressed(nixs: NixStore,
                                                        tmp_path: Path) -> None:
    """`nix copy` from another store: an input-addressed closure carrying two signatures
    (accepted by Nix with require-sigs, and by the gate over the fingerprint with the
    NarHash of the mount's content) and a content-addressed path (no signature)."""
    other = tmp_path / "other"
    keys = nixs.keys
    expr = tmp_path / "copy.nix"
    expr.write_text(DRV.replace("@TAG@", "copied"))
    built = run(["nix-build", "--store", f"local?root={other}", *SANDBOX, "--option",
                 "secret-key-files", keys.sec("cache-a-1", "cache-b-1"), str(expr),
                 "--no-out-link"])
    assert built.returncode == 0, built.stderr
    top = built.stdout.strip().splitlines()[-1]
    (tmp_path / "ca.txt").write_text("content addressed\n")
    ca = run(["nix-store", "--store", f"local?root={other}", "--add",
              str(tmp_path / "ca.txt")], check=True).stdout.strip()
    copy = run([*NIX, "copy", "--from", f"local?root={other}", "--to", nixs.url,
                "--option", "require-sigs", "true", "--option", "trusted-public-keys",
                f"{keys.pub('cache-a-1')} {keys.pub('cache-b-1')}", top, ca])
    assert copy.returncode == 0, copy.stderr
    assert nixs.read_as(NOBODY, top, "share/read-back") == b"a dependency\n"
    assert nixs.read_as(NOBODY, ca) == b"content addressed\n"
    check = nixs.nix_store("--verify", "--check-contents")
    assert check.returncode == 0, check.stderr


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.expected_log()
def test_unsigned_and_half_signed_builds_are_refused_to_others(nixs: NixStore) -> None:
    """Registered without signatures, with one trusted signature, or with an untrusted
    key's: the build itself succeeds (root reads what it writes while in flight), then
    uid 65534 is refused each output and the events log says which evidence fails.
    The .drv files (content-addressed) stay readable."""
    unsigned = nixs.build("unsigned", ())
    one = nixs.build("one-key", ("cache-a-1",))
    mallory = nixs.build("mallory", ("mallory-1", "cache-a-1"))
    for path in (unsigned, one, mallory):
        assert errno_of(nixs.read_as, NOBODY, path, "share/copied") == errno.EACCES
    assert "no signatures in Nix's database" in refusal_for(
        nixs.mount, unsigned.split("/")[-1] + "/share/copied")
    why = refusal_for(nixs.mount, one.split("/")[-1] + "/share/copied")
    assert "registered by Nix" in why
    assert "needs 2 distinct trusted signers, has 1 (cache-a-1)" in why
    why = refusal_for(nixs.mount, mallory.split("/")[-1] + "/share/copied")
    assert "signature by untrusted key mallory-1" in why
    drv = next(p.name for p in (nixs.mount.path / "nix/store").iterdir()
               if p.name.endswith("gate-hello-unsigned.drv"))
    assert nixs.read_as(NOBODY, f"/nix/store/{drv}").startswith(b"Derive(")


@pytest.mark.expected_log()
def test_a_tampered_registered_path_is_refused_and_explained(nixs: NixStore) -> None:
    top = nixs.build("tamper", ("cache-a-1", "cache-b-1"))
    assert nixs.read_as(NOBODY, top, "share/copied") == b"a dependency\n"
    target = nixs.inside(top) / "share" / "copied"
    target.chmod(0o644)
    target.write_text("patched by root\n")
    assert errno_of(nixs.read_as, NOBODY, top, "share/copied") == errno.EACCES
    why = refusal_for(nixs.mount, "share/copied")
    assert f"NarHash differs from the content: {top}/share/copied changed" in why, why
    assert "signatures by cache-a-1, cache-b-1 do not count" in why
    # Root is judged too once the path is registered: Nix's own check fails.
    assert nixs.nix_store("--verify", "--check-contents").returncode != 0


@pytest.mark.expected_log()
def test_in_flight_paths_are_their_writers(nixs: NixStore) -> None:
    """A store path Nix has not registered: root (Nix) reads it; uid 65534 does not. A
    hostile user's own `/nix/store/<hash>-evil` is in flight forever: readable by its
    writer, never by another user."""
    store = nixs.mount.path / "nix" / "store"
    flight = store / "00000000000000000000000000000000-in-flight"
    flight.mkdir()
    (flight / "file").write_text("being written\n")
    assert (flight / "file").read_text() == "being written\n"
    assert errno_of(nixs.read_as, NOBODY, f"/nix/store/{flight.name}", "file") == errno.EACCES
    why = refusal_for(nixs.mount, "in-flight/file")
    assert "in flight: /nix/store/00000000000000000000000000000000-in-flight is not " \
           "registered by Nix" in why

    evil = store / "11111111111111111111111111111111-evil"
    evil.mkdir()
    os.chown(evil, NOBODY, NOBODY)
    fd = os.open(store, os.O_PATH | os.O_DIRECTORY)
    try:
        def write(dirfd: int) -> None:
            with open(os.open(f"{evil.name}/bin", os.O_WRONLY | os.O_CREAT, 0o755,
                              dir_fd=dirfd), "w") as f:
                f.write("#!/bin/sh\nrm -rf ~\n")
        as_user(write, fd)
    finally:
        os.close(fd)
    assert nixs.read_as(NOBODY, "nix/store/" + evil.name, "bin").startswith(b"#!/bin/sh")
    assert errno_of(nixs.read_as, NOBODY - 1, "nix/store/" + evil.name, "bin") == \
        errno.EACCES


def test_nix_processes_at_once_share_a_paths_lock(nixs: NixStore, tmp_path: Path) -> None:
    """Four `nix-store --add` of one directory at once: each opens the path's `.lock`
    read-write (in flight: not an only-writer handle), one adds, all succeed."""
    src = tmp_path / "d"
    src.mkdir()
    (src / "f").write_text("shared\n")
    # Nix 2.8 initialising a fresh store from several processes at once races with
    # itself on R/nix/var ("creating symlink ... gcroots/profiles: File exists"), on
    # any disk: one process makes the store first.
    (tmp_path / "first").write_text("first\n")
    assert nixs.nix_store("--add", str(tmp_path / "first")).returncode == 0
    procs = [subprocess.Popen(["nix-store", "--store", nixs.url, "--add", str(src)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _out, err in outs]
    assert len({out.strip() for out, _err in outs}) == 1
    assert nixs.read_as(NOBODY, outs[0][0].strip(), "f") == b"shared\n"
