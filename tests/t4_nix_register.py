"""`annofs nix fetch` registers what it adds in the real Nix's database (Nix 2.8, as
root): a chroot store `local?root=R` whose R/nix/store is an annofs mount, fetched into
mounted (from a cache directory and over HTTP) and offline (`--nix-root`); right after,
Nix holds the paths valid, knows their references, and `--verify --check-contents`
passes; the trees carry Nix's canonical metadata."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd
from fuse_helpers import NOBODY, errno_of
from t4_nix_real import NIX, NixWorld, nixw, run, store, store_is_empty, write_policy
from t4_nix_store_gate import Keys, NixStore, nixs, refusal_for

from annofs.nix.narinfo import parse_narinfo
from annofs.trust.annotations import AnnotationStore
from annofs.volume import Volume

__all__ = ["nixs", "nixw", "store"]  # pytest fixtures, found by name in this module


def nix_store(root: Path, *args: str, stdin: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    return run(["nix-store", "--store", f"local?root={root}", *args], input=stdin)


def init_nix_root(root: Path) -> Path:
    """Make R's (empty) database, R/nix/var/nix/db, by Nix itself (it also makes
    R/nix/store/.links: after mounting there, in the mount)."""
    ok = nix_store(root, "--check-validity", "--print-invalid")
    assert ok.returncode == 0, ok.stderr
    assert (root / "nix" / "var" / "nix" / "db" / "db.sqlite").is_file()
    return root


def check_valid(root: Path, w: NixWorld) -> None:
    """What the real Nix says of the fetched closure."""
    for p in (w.dep, w.top):
        ok = nix_store(root, "--verify-path", p)
        assert ok.returncode == 0, ok.stderr
    refs = nix_store(root, "-q", "--references", w.top)
    assert refs.returncode == 0 and refs.stdout.split() == [w.dep], refs
    size = nix_store(root, "-q", "--size", w.top)
    assert size.returncode == 0 and int(size.stdout) > 0
    check = nix_store(root, "--verify", "--check-contents")
    assert check.returncode == 0, check.stderr
    assert "corrupted" not in check.stderr and "invalid" not in check.stderr


def check_canonical(tree: Path) -> None:
    """Nix's canonical metadata: no write bits, r-x or r-- for all, mtime 1, our owner."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [".", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            seen += 1
            assert st.st_uid == os.geteuid()
            if stat.S_ISLNK(st.st_mode):
                continue
            assert st.st_mtime == 1, (dirpath, name)
            assert stat.S_IMODE(st.st_mode) in (0o444, 0o555), (dirpath, name, st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                assert stat.S_IMODE(st.st_mode) == 0o555
    assert seen >= 5


@pytest.fixture
def chroot_mount(mounted: Mount, tmp_path: Path) -> Mount:
    """The `mounted` store, mounted again at R/nix/store of a Nix root R."""
    mounted.stop()
    mounted.path = tmp_path / "R" / "nix" / "store"
    mounted.path.mkdir(parents=True)
    mounted.start()
    init_nix_root(tmp_path / "R")
    return mounted


@pytest.mark.parametrize("over", ["directory", "http"])
def test_fetch_into_a_mounted_chroot_store_registers(chroot_mount: Mount, nixw: NixWorld,
                                                      tmp_path: Path, over: str) -> None:
    from cache_server import serve_cache

    root = chroot_mount.path.parent.parent
    pol = write_policy(tmp_path / "policy.toml", nixw)
    # Not valid before: a tree alone is not a store path to Nix.
    assert nix_store(root, "--verify-path", nixw.top).returncode != 0

    def fetch(cache: str) -> subprocess.CompletedProcess[str]:
        # Over HTTP without --dest: a mount at R/nix/store is where store paths go.
        dest = [] if over == "http" else ["--dest", str(chroot_mount.path)]
        return run(annofs_cmd("--store", str(chroot_mount.store), "nix", "fetch", "--cache",
                              cache, "--policy", str(pol), *dest, "--recursive", nixw.top))

    if over == "http":
        with serve_cache(nixw.caches["xz"]) as url:
            res = fetch(url)
    else:
        res = fetch(str(nixw.caches["zstd"]))
    assert res.returncode == 0, res.stderr
    assert f"registered {nixw.dep} in local?root={root}" in res.stdout
    assert f"registered {nixw.top} in local?root={root}" in res.stdout
    check_valid(root, nixw)
    check_canonical(chroot_mount.path / nixw.top.split("/")[-1])
    # Again: present and valid, nothing registered twice.
    again = fetch(str(nixw.caches["none"]))
    assert again.returncode == 0 and "already present" in again.stdout
    assert "registered" not in again.stdout
    check_valid(root, nixw)


def test_offline_fetch_registers_with_nix_root(mounted: Mount, nixw: NixWorld,
                                               tmp_path: Path) -> None:
    """Offline (no daemon), --nix-root R names the database; mounted at R/nix/store
    afterwards, the paths are valid and verify."""
    mounted.stop()
    root = tmp_path / "R"
    (root / "nix" / "store").mkdir(parents=True)
    init_nix_root(root)
    (root / "nix" / "store" / ".links").rmdir()  # the mount goes there
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = run(annofs_cmd("--store", str(mounted.store), "nix", "fetch", "--cache",
                         str(nixw.caches["bzip2"]), "--policy", str(pol), "--nix-root",
                         str(root), "--dest", "/", "--recursive", nixw.top))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("registered ") == 2
    (root / "nix" / "store" / ".links").rmdir()  # Nix made it again, empty
    mounted.path = root / "nix" / "store"
    mounted.start()
    check_valid(root, nixw)
    check_canonical(mounted.path / nixw.top.split("/")[-1])


def test_a_missing_reference_is_not_registered(chroot_mount: Mount, nixw: NixWorld,
                                               tmp_path: Path) -> None:
    """Without --recursive the dependency is not there: Nix refuses to register a path
    whose reference it does not know; one line, exit 1, the tree stays unregistered."""
    root = chroot_mount.path.parent.parent
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = run(annofs_cmd("--store", str(chroot_mount.store), "nix", "fetch", "--cache",
                         str(nixw.caches["none"]), "--policy", str(pol), "--dest",
                         str(chroot_mount.path), nixw.top))
    assert res.returncode == 1, res
    assert f"Nix did not register {nixw.top}" in res.stderr
    assert res.stderr.count("\n") == 1
    assert nix_store(root, "--verify-path", nixw.top).returncode != 0


@pytest.mark.expected_log()
def test_the_mount_answers_while_a_local_cache_is_fetched(mounted: Mount, nixw: NixWorld,
                                                          tmp_path: Path) -> None:
    """A big path from a cache directory is read, checked and staged in a worker thread:
    reads through the mount go on meanwhile (only the final swap is on the event loop)."""
    import time

    src = tmp_path / "big"
    for i in range(40):
        (src / f"d{i % 8}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 8}" / f"blob{i}").write_bytes(os.urandom(4 << 20))
    for i in range(3000):
        (src / f"d{i % 8}" / f"small{i}").write_text(f"small file {i}\n")
    native = tmp_path / "N"
    added = nix_store(native, "--add", str(src))
    assert added.returncode == 0, added.stderr
    path = added.stdout.strip()
    cache = tmp_path / "cache"
    nix = ["nix", "--extra-experimental-features", "nix-command"]
    for cmd in ([*nix, "copy", "--from", f"local?root={native}", "--to",
                 f"file://{cache}?compression=none", path],
                [*nix, "store", "sign", "--key-file", str(nixw.keys / "cache-a-1.sec"),
                 "--store", f"file://{cache}", path]):
        ok = run(cmd)
        assert ok.returncode == 0, ok.stderr
    pol = write_policy(tmp_path / "policy.toml", nixw)
    (mounted.path / "other").write_bytes(b"readable meanwhile\n")
    started = time.monotonic()
    proc = subprocess.Popen(annofs_cmd("--store", str(mounted.store), "nix", "fetch",
                                       "--cache", str(cache), "--policy", str(pol), path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    slowest, probes = 0.0, 0
    while proc.poll() is None:
        t = time.monotonic()
        assert (mounted.path / "other").read_bytes() == b"readable meanwhile\n"
        os.listdir(mounted.path)
        slowest = max(slowest, time.monotonic() - t)
        probes += 1
        time.sleep(0.02)
    took = time.monotonic() - started
    out, err = proc.communicate()
    assert proc.returncode == 0 and f"fetched {path}" in out, err
    assert (mounted.path / path.lstrip("/") / "d0" / "small0").read_text() == "small file 0\n"
    assert took > 1.0 and probes > 10, (took, probes)  # the fetch took a while...
    assert slowest < 0.5, (slowest, took)  # ...and the mount answered all along


# -- signatures and content addresses in Nix's database ---------------------------------


def signed_cache(w: NixWorld, dest: Path, *keys: str) -> Path:
    """A copy of the uncompressed cache (signed by cache-a-1), signed by `keys` too."""
    cache = w.copy_cache("none", dest)
    for k in keys:
        ok = run([*NIX, "store", "sign", "--key-file", str(w.keys / f"{k}.sec"), "--store",
                  f"file://{cache}", w.top, w.dep])
        assert ok.returncode == 0, ok.stderr
    return cache


def path_info(root: Path, path: str) -> dict[str, object]:
    """`nix path-info --json` of `path` in the chroot store R."""
    drv = ["--derivation"] if path.endswith(".drv") else []  # the .drv, not its output
    res = run([*NIX, "path-info", "--store", f"local?root={root}", "--json", *drv, path])
    assert res.returncode == 0, res.stderr
    (info,) = json.loads(res.stdout)
    assert info["path"] == path
    return info


def narinfo_sigs(w: NixWorld, cache: Path, path: str) -> dict[str, str]:
    """key name -> the `Sig:` value of the narinfo of `path` in `cache`."""
    info = parse_narinfo(w.narinfo(cache, path).read_bytes(), "n")
    return {s.key_name: s.text for s in info.sigs}


def test_fetch_records_the_verified_signatures_in_nix_database(
        chroot_mount: Mount, nixw: NixWorld, tmp_path: Path) -> None:
    """A cache signed by cache-a-1, cache-b-1 (trusted) and mallory-1 (not): Nix's
    database gets the two trusted signatures of each path, exactly the narinfo's, and
    the real Nix accepts them (`nix store verify --sigs-needed 2` with those keys)."""
    root = chroot_mount.path.parent.parent
    cache = signed_cache(nixw, tmp_path / "cache", "cache-b-1", "mallory-1")
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = run(annofs_cmd("--store", str(chroot_mount.store), "nix", "fetch", "--cache",
                         str(cache), "--policy", str(pol), "--dest", str(chroot_mount.path),
                         "--recursive", nixw.top))
    assert res.returncode == 0, res.stderr
    assert f"registered {nixw.top} in local?root={root}; signatures by cache-a-1, " \
           f"cache-b-1" in res.stdout, res.stdout
    for p in (nixw.dep, nixw.top):
        sigs = narinfo_sigs(nixw, cache, p)
        assert set(sigs) == {"cache-a-1", "cache-b-1", "mallory-1"}
        assert sorted(path_info(root, p)["signatures"]) == sorted(  # type: ignore[arg-type]
            [sigs["cache-a-1"], sigs["cache-b-1"]])
        shown = run([*NIX, "path-info", "--store", f"local?root={root}", "--sigs", p])
        assert shown.returncode == 0, shown.stderr
        assert sigs["cache-a-1"] in shown.stdout and sigs["cache-b-1"] in shown.stdout
        assert "mallory-1" not in shown.stdout
    trusted = f"{nixw.pub('cache-a-1')} {nixw.pub('cache-b-1')}"
    ok = run([*NIX, "store", "verify", "--store", f"local?root={root}", "--option",
              "trusted-public-keys", trusted, "--sigs-needed", "2", "-r", nixw.top])
    assert ok.returncode == 0, ok.stderr
    # One trusted key only: Nix finds one valid signature, not two.
    one = run([*NIX, "store", "verify", "--store", f"local?root={root}", "--option",
               "trusted-public-keys", nixw.pub("cache-a-1"), "--sigs-needed", "2", nixw.top])
    assert one.returncode != 0
    check_valid(root, nixw)


def ca_cache(w: NixWorld, tmp_path: Path) -> tuple[Path, str, str, str]:
    """A cache (signed by cache-a-1) of three content-addressed paths, made by the real
    Nix: a tree added recursively (`fixed:r:sha256:`), a file by its flat hash
    (`fixed:sha256:`) and a derivation (`text:sha256:`)."""
    native = tmp_path / "N"
    src = tmp_path / "ca-src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("content addressed\n")
    (tmp_path / "flat.txt").write_text("flat file\n")
    tree = nix_store(native, "--add", str(src))
    flat = nix_store(native, "--add-fixed", "sha256", str(tmp_path / "flat.txt"))
    (tmp_path / "drv.nix").write_text(
        'builtins.derivation { name = "ca-drv"; system = "x"; builder = "/bin/sh"; }')
    drv = run(["nix-instantiate", "--store", f"local?root={native}",
               str(tmp_path / "drv.nix")])
    assert tree.returncode == 0 and flat.returncode == 0, (tree.stderr, flat.stderr)
    assert drv.returncode == 0, drv.stderr
    paths = [tree.stdout.strip(), flat.stdout.strip(), drv.stdout.strip()]
    cache = tmp_path / "ca-cache"
    for cmd in ([*NIX, "copy", "--from", f"local?root={native}", "--to",
                 f"file://{cache}?compression=xz", *paths[:2]],
                [*NIX, "copy", "--derivation", "--from", f"local?root={native}", "--to",
                 f"file://{cache}?compression=xz", paths[2]],  # the .drv, not its output
                [*NIX, "store", "sign", "--key-file", str(w.keys / "cache-a-1.sec"),
                 "--store", f"file://{cache}", *paths[:2]],
                [*NIX, "store", "sign", "--derivation", "--key-file",
                 str(w.keys / "cache-a-1.sec"), "--store", f"file://{cache}", paths[2]]):
        ok = run(cmd)
        assert ok.returncode == 0, ok.stderr
    return cache, paths[0], paths[1], paths[2]


def test_a_content_addressed_path_gets_its_ca(chroot_mount: Mount, nixw: NixWorld,
                                              tmp_path: Path) -> None:
    """Paths a cache describes with `CA:` (recursive, flat, text) are registered with it:
    `nix path-info --json` shows the narinfo's `ca`, and Nix verifies the contents."""
    root = chroot_mount.path.parent.parent
    cache, tree, flat, drv = ca_cache(nixw, tmp_path)
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = run(annofs_cmd("--store", str(chroot_mount.store), "nix", "fetch", "--cache",
                         str(cache), "--policy", str(pol), "--dest", str(chroot_mount.path),
                         tree, flat, drv))
    assert res.returncode == 0, res.stderr
    for p, prefix in ((tree, "fixed:r:sha256:"), (flat, "fixed:sha256:"),
                      (drv, "text:sha256:")):
        ca = parse_narinfo(nixw.narinfo(cache, p).read_bytes(), "n").ca
        assert ca is not None and ca.startswith(prefix), ca
        assert path_info(root, p)["ca"] == ca
        assert f"registered {p} in local?root={root}; signatures by cache-a-1; ca {ca}" \
            in res.stdout, res.stdout
    check = nix_store(root, "--verify", "--check-contents")
    assert check.returncode == 0, check.stderr


def test_a_false_ca_is_not_recorded(chroot_mount: Mount, nixw: NixWorld,
                                    tmp_path: Path) -> None:
    """`CA:` is not in the signed fingerprint: a cache claiming a content address that
    does not make the path's name gets the path registered without one."""
    root = chroot_mount.path.parent.parent
    cache = nixw.copy_cache("none", tmp_path / "cache")
    info = nixw.narinfo(cache, nixw.dep)
    fake = "fixed:r:sha256:" + "0" * 52
    info.write_text(info.read_text() + f"CA: {fake}\n")
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = run(annofs_cmd("--store", str(chroot_mount.store), "nix", "fetch", "--cache",
                         str(cache), "--policy", str(pol), "--dest", str(chroot_mount.path),
                         nixw.dep))
    assert res.returncode == 0, res.stderr
    assert "ca " not in res.stdout
    assert path_info(root, nixw.dep).get("ca") is None
    assert path_info(root, nixw.dep)["signatures"]


# -- the store-aware gate on Nix's database alone ---------------------------------------


@pytest.fixture(scope="module")
def keys(nixw: NixWorld) -> Keys:
    """t4_nix_store_gate's `nixs` trusts these: the keys that signed nixw's caches."""
    return Keys(nixw.keys)


def without_statements(nixs: NixStore, policy: Path) -> int:
    """Remove every annofs statement of the mounted store (the `built` ones `nix fetch`
    recorded), the mount stopped meanwhile; how many. The bind at R/nix/store follows."""
    bound = nixs.root / "nix" / "store"
    subprocess.run(["umount", str(bound)], check=True)
    nixs.mount.stop()
    vol = Volume.open(nixs.mount.store)
    try:
        ann = AnnotationStore(vol.store)
        with vol.store.write() as txn:
            removed = sum(ann.remove(txn, sid) for sid in list(ann.iter_ids(txn)))
            assert ann.count(txn) == 0
    finally:
        vol.close()
    nixs.mount.start("--allow-other", "--policy", str(policy))
    subprocess.run(["mount", "--bind", str(nixs.mount.path / "nix" / "store"), str(bound)],
                   check=True)
    return removed


def fetch_into(nixs: NixStore, cache: Path, policy: Path, *paths: str
               ) -> subprocess.CompletedProcess[str]:
    """`nix fetch` into the mount's /nix/store, registered in R (bound there)."""
    return run(annofs_cmd("--store", str(nixs.mount.store), "nix", "fetch", "--cache",
                          str(cache), "--policy", str(policy), "--dest",
                          str(nixs.mount.path / "nix" / "store"), "--nix-root",
                          str(nixs.root), "--recursive", *paths))


@pytest.mark.expected_log()
def test_the_gate_trusts_fetched_paths_on_nix_database_alone(
        nixs: NixStore, nixw: NixWorld, tmp_path: Path) -> None:
    """`/nix/store/**` needs 2 signers (claims built, content-addressed; nix-database
    set). Fetched from a cache signed by cache-a-1 and cache-b-1, then every annofs
    statement removed: uid 65534 reads the paths on the two signatures in Nix's database
    alone; a tampered file (NarHash no longer the content's) is refused and explained."""
    init_nix_root(nixs.root)
    cache = signed_cache(nixw, tmp_path / "cache", "cache-b-1")
    res = fetch_into(nixs, cache, write_policy(tmp_path / "fetch.toml", nixw), nixw.top)
    assert res.returncode == 0, res.stderr
    assert without_statements(nixs, tmp_path / "policy.toml") >= 4  # 2 keys x 2 paths
    assert nixs.read_as(NOBODY, nixw.top, "share/greeting") == b"hello\n"
    assert nixs.read_as(NOBODY, nixw.dep) == b"a dependency\n"
    why = os.getxattr(nixs.inside(nixw.top) / "share" / "greeting", "user.annofs.why")
    assert b"signed by cache-a-1, cache-b-1 in Nix's database" in why, why
    assert nix_store(nixs.root, "--verify", "--check-contents").returncode == 0

    target = nixs.inside(nixw.top) / "share" / "greeting"
    target.chmod(0o644)
    target.write_text("patched by root\n")
    assert errno_of(nixs.read_as, NOBODY, nixw.top, "share/greeting") == errno.EACCES
    why_text = refusal_for(nixs.mount, "share/greeting")
    assert f"NarHash differs from the content: {nixw.top}/share/greeting changed" \
        in why_text, why_text
    assert "signatures by cache-a-1, cache-b-1 do not count" in why_text
    assert nixs.read_as(NOBODY, nixw.dep) == b"a dependency\n"  # untouched: still read


@pytest.mark.expected_log()
def test_the_gate_refuses_a_path_signed_in_nix_database_by_an_untrusted_key(
        nixs: NixStore, nixw: NixWorld, tmp_path: Path) -> None:
    """Fetched under a policy that trusts mallory-1 too, Nix's database holds cache-a-1's
    and mallory-1's signatures; the mount's policy trusts cache-a-1 and cache-b-1 and
    needs 2: with no annofs statement, uid 65534 is refused and told why."""
    init_nix_root(nixs.root)
    cache = signed_cache(nixw, tmp_path / "cache", "mallory-1")
    lax = write_policy(tmp_path / "fetch.toml", nixw, keys=("cache-a-1", "mallory-1"))
    res = fetch_into(nixs, cache, lax, nixw.top)
    assert res.returncode == 0, res.stderr
    assert "signatures by cache-a-1, mallory-1" in res.stdout, res.stdout
    without_statements(nixs, tmp_path / "policy.toml")
    assert errno_of(nixs.read_as, NOBODY, nixw.top, "share/greeting") == errno.EACCES
    why = refusal_for(nixs.mount, "share/greeting")
    assert "signature by untrusted key mallory-1" in why, why
    assert "needs 2 distinct trusted signers, has 1 (cache-a-1)" in why, why


# -- errors: Nix's database missing, locked, unknown; a crash half-way ---------------------


def offline_root(tmp_path: Path) -> Path:
    """A Nix root R with its database (made by Nix), its store directory empty."""
    root = tmp_path / "R"
    (root / "nix" / "store").mkdir(parents=True)
    return init_nix_root(root)


def offline_fetch(store: Path, nixw: NixWorld, pol: Path, root: Path,
                  **env: str) -> subprocess.CompletedProcess[str]:
    return run(annofs_cmd("--store", str(store), "nix", "fetch", "--cache",
                          str(nixw.caches["none"]), "--policy", str(pol), "--nix-root",
                          str(root), "--dest", "/", "--recursive", nixw.top),
               env={**os.environ, **env})


def registered(root: Path, *paths: str) -> bool:
    """Whether Nix's database at R holds all `paths` valid (the database alone)."""
    res = nix_store(root, "--check-validity", *paths)
    return res.returncode == 0


@pytest.mark.parametrize("case", ["missing", "locked", "schema"])
def test_a_database_missing_locked_or_unknown_changes_nothing(
        store: Path, nixw: NixWorld, tmp_path: Path, case: str) -> None:
    """Exit 2, one line naming the database and the problem; nothing fetched into the
    annofs store, nothing registered."""
    pol = write_policy(tmp_path / "policy.toml", nixw)
    if case == "missing":
        root = tmp_path / "R"
        (root / "nix" / "store").mkdir(parents=True)
        res = offline_fetch(store, nixw, pol, root)
        expected = f"{root}/nix/var/nix/db/db.sqlite: no Nix database there"
    elif case == "locked":
        root = offline_root(tmp_path)
        holder = sqlite3.connect(root / "nix/var/nix/db/db.sqlite", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another writer, in the middle of its work
        try:
            res = offline_fetch(store, nixw, pol, root, ANNOFS_NIX_DB_TIMEOUT="0.5")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        expected = (f"{root}/nix/var/nix/db/db.sqlite: locked by another process for more "
                    f"than 0.5 s; nothing registered")
    else:
        root = offline_root(tmp_path)
        (root / "nix/var/nix/db/schema").write_text("11")
        res = offline_fetch(store, nixw, pol, root)
        expected = f"{root}/nix/var/nix/db/db.sqlite: unknown Nix database schema (version 11"
    assert res.returncode == 2, res
    assert expected in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stdout == ""
    assert store_is_empty(store)
    if case != "missing":
        (root / "nix/var/nix/db/schema").write_text("10")
        assert not registered(root, nixw.dep) and not registered(root, nixw.top)


_DIES_BEFORE_RECORD = """
import os, signal, sys
import annofs.nix.nixdb as nixdb

def die(*args, **kwargs):  # after --load-db registered the paths, before sigs and CA
    os.kill(os.getpid(), signal.SIGKILL)

nixdb.record = die
sys.argv = ["annofs", *sys.argv[1:]]
from annofs.cli.main import main
main()
"""


def test_killed_between_load_db_and_the_signatures_a_rerun_repairs(
        store: Path, nixw: NixWorld, tmp_path: Path) -> None:
    """kill -9 right after `--load-db`: Nix holds the paths valid without signatures (the
    documented half state); running the same fetch again records them."""
    import sys

    root = offline_root(tmp_path)
    pol = write_policy(tmp_path / "policy.toml", nixw)
    args = ["--store", str(store), "nix", "fetch", "--cache", str(nixw.caches["none"]),
            "--policy", str(pol), "--nix-root", str(root), "--dest", "/", "--recursive",
            nixw.top]
    died = run([sys.executable, "-c", _DIES_BEFORE_RECORD, *args])
    assert died.returncode == -9, died
    assert registered(root, nixw.dep, nixw.top)
    assert not path_info(root, nixw.top).get("signatures")
    again = run(annofs_cmd(*args))
    assert again.returncode == 0, again.stderr
    for p in (nixw.dep, nixw.top):
        assert f"recorded in local?root={root} for {p}; signatures by cache-a-1" \
            in again.stdout, again.stdout
        assert path_info(root, p)["signatures"] == [
            narinfo_sigs(nixw, nixw.caches["none"], p)["cache-a-1"]]
    assert "registered" not in again.stdout
    # A third run: nothing left to do, nothing said.
    third = run(annofs_cmd(*args))
    assert third.returncode == 0 and "recorded in local" not in third.stdout, third


def test_a_locked_database_adds_nothing_to_the_mount(chroot_mount: Mount, nixw: NixWorld,
                                                     tmp_path: Path) -> None:
    """Mounted (the daemon fetches): the database is checked before the daemon is asked,
    so a locked one leaves the mount as it was."""
    root = chroot_mount.path.parent.parent
    before = sorted(os.listdir(chroot_mount.path))
    pol = write_policy(tmp_path / "policy.toml", nixw)
    holder = sqlite3.connect(root / "nix/var/nix/db/db.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        res = run(annofs_cmd("--store", str(chroot_mount.store), "nix", "fetch", "--cache",
                             str(nixw.caches["none"]), "--policy", str(pol), "--dest",
                             str(chroot_mount.path), "--recursive", nixw.top),
                  env={**os.environ, "ANNOFS_NIX_DB_TIMEOUT": "0.5"})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert res.returncode == 2 and "locked by another process" in res.stderr, res
    assert sorted(os.listdir(chroot_mount.path)) == before
    assert not registered(root, nixw.top)


def test_a_path_nix_holds_with_another_nar_hash_is_refused_before_loading(
        store: Path, nixw: NixWorld, tmp_path: Path) -> None:
    """Nix already holds the dependency, registered with another NarHash: its
    signatures could never count there, so the fetch refuses (exit 1, one line) before
    `--load-db`: the top path stays unregistered, the dependency's row unchanged."""
    root = offline_root(tmp_path)
    other = "sha256:" + "1" * 52
    loaded = nix_store(root, "--load-db", stdin=f"{nixw.dep}\n{other}\n128\n\n0\n")
    assert loaded.returncode == 0, loaded.stderr
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = offline_fetch(store, nixw, pol, root)
    assert res.returncode == 1, res
    assert f"{nixw.dep} is registered there with another NarHash" in res.stderr
    assert res.stderr.count("\n") == 1
    assert not registered(root, nixw.top)
    assert not path_info(root, nixw.dep).get("signatures")


def test_signatures_merge_with_those_nix_already_holds(store: Path, nixw: NixWorld,
                                                       tmp_path: Path) -> None:
    """Nix's own signature (`nix store sign` on the registered path) is kept; a later
    fetch from a cache signed by cache-a-1 and cache-b-1 adds only cache-b-1's; each
    signature once, sorted as Nix keeps its set."""
    root = offline_root(tmp_path)
    pol = write_policy(tmp_path / "policy.toml", nixw)
    first = offline_fetch(store, nixw, pol, root)
    assert first.returncode == 0, first.stderr
    signed = run([*NIX, "store", "sign", "--store", f"local?root={root}", "--key-file",
                  str(nixw.keys / "mallory-1.sec"), nixw.top])
    assert signed.returncode == 0, signed.stderr
    (mallory,) = [s for s in path_info(root, nixw.top)["signatures"]  # type: ignore[union-attr]
                  if s.startswith("mallory-1:")]
    cache = signed_cache(nixw, tmp_path / "cache", "cache-b-1")
    again = run(annofs_cmd("--store", str(store), "nix", "fetch", "--cache", str(cache),
                           "--policy", str(pol), "--nix-root", str(root), "--dest", "/",
                           "--recursive", nixw.top))
    assert again.returncode == 0, again.stderr
    assert f"recorded in local?root={root} for {nixw.top}; signatures by cache-b-1\n" \
        in again.stdout, again.stdout
    sigs = narinfo_sigs(nixw, cache, nixw.top)
    conn = sqlite3.connect(f"file:{root}/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    try:
        (text,) = conn.execute("SELECT sigs FROM ValidPaths WHERE path = ?",
                               (nixw.top,)).fetchone()
    finally:
        conn.close()
    assert text == " ".join(sorted([sigs["cache-a-1"], sigs["cache-b-1"], mallory]))


_LOCKED_AT_RECORD = """
import sqlite3, sys
import annofs.nix.nixdb as nixdb

original = nixdb.record

def locked_then_record(root, regs):  # another writer takes the lock after --load-db
    holder = sqlite3.connect(f"{root}/nix/var/nix/db/db.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        return original(root, regs)
    finally:
        holder.execute("ROLLBACK")
        holder.close()

nixdb.record = locked_then_record
sys.argv = ["annofs", *sys.argv[1:]]
from annofs.cli.main import main
main()
"""


def test_locked_after_load_db_says_so_and_a_rerun_repairs(store: Path, nixw: NixWorld,
                                                          tmp_path: Path) -> None:
    """Another writer holds the database past the timeout right after `--load-db`: exit
    2, one line saying the paths are valid without their signatures and to run again;
    the re-run records them."""
    import sys

    root = offline_root(tmp_path)
    pol = write_policy(tmp_path / "policy.toml", nixw)
    args = ["--store", str(store), "nix", "fetch", "--cache", str(nixw.caches["none"]),
            "--policy", str(pol), "--nix-root", str(root), "--dest", "/", "--recursive",
            nixw.top]
    res = run([sys.executable, "-c", _LOCKED_AT_RECORD, *args],
              env={**os.environ, "ANNOFS_NIX_DB_TIMEOUT": "0.5"})
    assert res.returncode == 2, res
    assert "locked by another process for more than 0.5 s; the paths are valid without " \
           "their signatures: run the command again to record them" in res.stderr
    assert res.stderr.count("\n") == 1
    assert registered(root, nixw.top) and not path_info(root, nixw.top).get("signatures")
    again = run(annofs_cmd(*args))
    assert again.returncode == 0, again.stderr
    assert path_info(root, nixw.top)["signatures"]
