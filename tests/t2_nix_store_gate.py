"""t2: the store-aware gate's decisions (trust/nixstore.py), in process, no kernel.

The evidence is real: a chroot store on the host disk made by the real Nix 2.8
(`nix-store --add`, `--add-fixed`, `nix-build` with `secret-key-files`), its
/nix/store imported into a volume, its db.sqlite named by the policy. The gate is then
asked as the mount asks (`judge_names` with the caller's uid and the file's owner).
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from t2_trust import write

from annofs.errors import UsageError
from annofs.store.records import Version
from annofs.transfer.import_tree import TreeImporter
from annofs.trust.gate import Judgement, TrustGate
from annofs.trust.keys import load_secret_key
from annofs.trust.nixstore import STRANGER, Caller, NixDatabase, make_store_path, parse_ca
from annofs.trust.policy import Policy, parse_policy
from annofs.trust.signing import collect_files, sign_files
from annofs.trust.symlink import content_verdict, symlink_content
from annofs.volume import Volume

pytestmark = pytest.mark.skipif(shutil.which("nix-build") is None,
                                reason="the real Nix (nix-bin) is not installed")

SANDBOX = ["--option", "extra-sandbox-paths", "/bin /lib /lib64 /usr"]
DRV = """
let dep = builtins.derivation {
    name = "t2-dep-@TAG@"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo 'a dependency' > $out"];
  };
in builtins.derivation {
  name = "t2-top-@TAG@"; system = builtins.currentSystem; builder = "/bin/sh";
  args = ["-c" "/bin/mkdir -p $out/share; /bin/cat ${dep} > $out/share/copied"];
}
"""
NOBODY = Caller(65534, 0)  # another user opening root's file


def run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@dataclass
class World:
    root: Path  # the chroot store R
    keys: Path
    added: str  # nix-store --add: fixed:r:sha256
    flat: str  # nix-store --add-fixed sha256: fixed:sha256
    tree: str  # nix-store --add-fixed --recursive of a directory
    signed: str  # built, signed by cache-a-1 and cache-b-1
    half: str  # built, signed by cache-a-1 only
    dep: str  # the dependency of `signed` (built, signed by both; not referenced)

    @property
    def db(self) -> Path:
        return self.root / "nix/var/nix/db/db.sqlite"

    def pub(self, name: str) -> str:
        return (self.keys / f"{name}.pub").read_text().strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("nixw")
    root, keys = base / "R", base / "keys"
    keys.mkdir()
    for name in ("cache-a-1", "cache-b-1"):
        run(["nix-store", "--generate-binary-cache-key", name, str(keys / f"{name}.sec"),
             str(keys / f"{name}.pub")])
    store = ["--store", f"local?root={root}"]
    (base / "single.txt").write_text("a dependency\n")
    (base / "d" / "sub").mkdir(parents=True)
    (base / "d" / "sub" / "a").write_text("a\n")
    (base / "d" / "l").symlink_to("sub/a")
    added = run(["nix-store", *store, "--add", str(base / "single.txt")])
    flat = run(["nix-store", *store, "--add-fixed", "sha256", str(base / "single.txt")])
    tree = run(["nix-store", *store, "--add-fixed", "--recursive", "sha256",
                str(base / "d")])
    built = {}
    for tag, sign in (("signed", "cache-a-1 cache-b-1"), ("half", "cache-a-1")):
        (base / f"{tag}.nix").write_text(DRV.replace("@TAG@", tag))
        secs = " ".join(str(keys / f"{k}.sec") for k in sign.split())
        built[tag] = run(["nix-build", *store, *SANDBOX, "--option", "secret-key-files",
                          secs, str(base / f"{tag}.nix"), "--no-out-link"]
                         ).splitlines()[-1]
    dep = next(p for p, _ca, _refs in registered(root / "nix/var/nix/db/db.sqlite")
               if p.endswith("-t2-dep-signed"))
    return World(root, keys, added, flat, tree, built["signed"], built["half"], dep)


def gate_for(vol: Volume, world: World, db: Path | None = None) -> TrustGate:
    TreeImporter(vol).run(world.root / "nix" / "store", [b"nix", b"store"])
    return TrustGate(vol, nix_policy(world, db or world.db))


def nix_policy(world: World, db: Path) -> Policy:
    keys = f'"{world.pub("cache-a-1")}", "{world.pub("cache-b-1")}"'
    return parse_policy(f'''trusted-public-keys = [{keys}]
nix-database = "{db}"
[[rules]]
path = "/nix/store/**"
signers = 2
claims = ["built", "content-addressed"]
''', Path("/etc/annofs/policy.toml"))


def P(path: str) -> list[bytes]:
    return [p.encode() for p in path.strip("/").split("/") if p]


def version_at(gate: TrustGate, vol: Volume, path: str) -> Version:
    with vol.store.read() as txn:
        a = vol.namespace.resolve(txn, P(path))
        return gate.hashed(vol.versions.get(txn, int(a.target)))


def judge(gate: TrustGate, vol: Volume, *names: str, caller: Caller = STRANGER,
          at: str | None = None) -> Judgement:
    """The judgement of the file at `at` (default: the first name) known by `names`."""
    v = version_at(gate, vol, at or names[0])
    j = gate.judge_names([P(n) for n in names], v, caller=caller)
    assert j is not None
    return j


def registered(db: Path) -> list[tuple[str, str | None, list[str]]]:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = c.execute("SELECT id, path, ca FROM ValidPaths").fetchall()
        return [(p, ca, [r for (r,) in c.execute(
            "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference "
            "WHERE r.referrer = ?", (i,))]) for i, p, ca in rows]
    finally:
        c.close()


# -- content addresses, as Nix computes them ----------------------------------------------


def test_content_addresses_make_the_paths_nix_made(world: World) -> None:
    """Every content-addressed path of the real store (fixed:r, fixed flat, text .drv
    files with references) is the path its CA and references make."""
    kinds = set()
    for path, ca, refs in registered(world.db):
        if ca is None:
            continue
        parsed = parse_ca(ca)
        assert parsed is not None, ca
        kinds.add(parsed.method)
        name = path.split("/")[-1].split("-", 1)[1]
        assert parsed.store_path(name, refs, path) == path
        assert parsed.store_path(name + "x", refs, path) != path
    assert kinds == {"text", "flat", "recursive"}
    assert make_store_path("source", "00" * 32, "x").startswith("/nix/store/")


# -- registered paths ----------------------------------------------------------------------


def test_trusted_registered_paths_are_readable_by_anyone(vol: Volume, world: World) -> None:
    gate = gate_for(vol, world)
    signed = judge(gate, vol, world.signed + "/share/copied")
    assert signed.verdict.allowed and signed.guarded
    assert "signed by cache-a-1, cache-b-1 in Nix's database" in signed.verdict.reason
    assert signed.verdict.signers == ("cache-a-1", "cache-b-1")
    for path, rel in ((world.added, ""), (world.flat, ""), (world.tree, "/sub/a")):
        j = judge(gate, vol, path + rel)
        assert j.verdict.allowed and "content-addressed (fixed:" in j.verdict.reason, \
            j.verdict.reason
    drv = next(p for p, ca, _r in registered(world.db) if p.endswith("t2-top-signed.drv"))
    assert judge(gate, vol, drv).verdict.allowed


def test_half_signed_path_is_refused_and_says_what_counted(vol: Volume, world: World) -> None:
    gate = gate_for(vol, world)
    for caller in (STRANGER, Caller(0, 0)):  # registered: judged for root too
        j = judge(gate, vol, world.half + "/share/copied", caller=caller)
        assert not j.verdict.allowed
    assert j.verdict.missing == (
        f"registered by Nix ({world.half}); needs 2 distinct trusted signers, has 1 "
        f"(cache-a-1); accepted claims: built, content-addressed")


def test_a_tampered_file_is_refused_and_named(vol: Volume, world: World) -> None:
    gate = gate_for(vol, world)
    assert judge(gate, vol, world.signed + "/share/copied").verdict.allowed
    write(vol, P(world.signed + "/share/copied"), b"patched\n")
    j = judge(gate, vol, world.signed + "/share/copied", caller=Caller(0, 0))
    assert not j.verdict.allowed
    assert (f"NarHash differs from the content: {world.signed}/share/copied changed"
            in j.verdict.missing)
    assert "signatures by cache-a-1, cache-b-1 do not count" in j.verdict.missing
    # Tampered before anything was judged: no earlier tree to compare, the hashes say it.
    write(vol, P(world.tree + "/sub/a"), b"b\n")
    j = judge(gate, vol, world.tree + "/sub/a")
    assert not j.verdict.allowed and "content differs from its address" in j.verdict.missing


# -- in flight, .links, a build's chroot ----------------------------------------------------


def test_unregistered_paths_are_their_writers_only(vol: Volume, world: World,
                                                   tmp_path: Path) -> None:
    gate = gate_for(vol, world)
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "bin").write_text("#!/bin/sh\n")
    name = "/nix/store/" + "1" * 32 + "-evil"
    TreeImporter(vol).run(tmp_path / "evil", P(name))
    assert judge(gate, vol, name + "/bin", caller=Caller(0, 0)).verdict.allowed
    assert judge(gate, vol, name + "/bin", caller=Caller(65534, 65534)).verdict.allowed
    for caller in (Caller(65534, 65533), STRANGER):
        v = judge(gate, vol, name + "/bin", caller=caller).verdict
        assert not v.allowed
        assert v.missing.startswith(f"in flight: {name} is not registered by Nix")


def test_links_names_do_not_count_beside_a_store_path_name(vol: Volume,
                                                          world: World) -> None:
    gate = gate_for(vol, world)
    links = "/nix/store/.links/" + "0" * 52
    file = world.signed + "/share/copied"
    assert judge(gate, vol, file, links).verdict.allowed
    assert judge(gate, vol, links, file, at=file).verdict.allowed
    alone = judge(gate, vol, links, at=file, caller=NOBODY).verdict
    assert not alone.allowed and "/nix/store/.links" in alone.missing
    assert judge(gate, vol, links, at=file, caller=Caller(0, 0)).verdict.allowed
    # A hard link into an untrusted path: the strictest name wins.
    assert not judge(gate, vol, file, world.half + "/share/copied", at=file).verdict.allowed


def test_a_build_chroot_name_is_the_store_path_it_stands_for(vol: Volume,
                                                             world: World) -> None:
    gate = gate_for(vol, world)
    chroot = "/nix/store/" + "2" * 32 + "-x.drv.chroot"
    # The dep hard-linked into the chroot (as Nix does for a single-file input).
    assert judge(gate, vol, chroot + world.dep, at=world.dep,
                 caller=Caller(999, 0)).verdict.allowed
    # Another file under that name (what a builder could put there) is not vouched for.
    assert gate.nix is not None
    hashed = gate.nix._trees[world.dep.split("/")[-1].encode()][1]
    for _ in range(3):
        v = judge(gate, vol, chroot + world.dep, at=world.added,
                  caller=Caller(999, 0)).verdict
        assert not v.allowed and "this file is not the one" in v.missing, v.missing
    # The tree did not change: its check was reused (a metadata walk), not hashed again.
    assert gate.nix._trees[world.dep.split("/")[-1].encode()][1] is hashed
    # The build's own file (a --check rebuilding a registered output): its writer's.
    assert judge(gate, vol, chroot + world.dep, at=world.added,
                 caller=Caller(999, 999)).verdict.allowed
    # A registered store path the mount does not hold, under a chroot: in flight.
    missing = chroot + "/nix/store/" + "7" * 32 + "-gone"
    con = sqlite3.connect(world.db)  # the module's store: registered, never in the volume
    try:
        con.execute("INSERT INTO ValidPaths (path, hash, registrationTime, narSize) "
                    "VALUES (?, ?, 1, 8)", (missing[len(chroot):], "sha256:" + "0" * 64))
        con.commit()
        assert judge(gate, vol, missing + "/f", at=world.added,
                     caller=Caller(0, 0)).verdict.allowed
        assert not judge(gate, vol, missing + "/f", at=world.added).verdict.allowed
    finally:
        con.execute("DELETE FROM ValidPaths WHERE path = ?", (missing[len(chroot):],))
        con.commit()
        con.close()


# -- the database ---------------------------------------------------------------------------


def test_the_database_is_read_without_locking_and_followed(vol: Volume, world: World,
                                                           tmp_path: Path) -> None:
    """A writer is never blocked by the gate (no transaction stays open); a change Nix
    makes (here: the path unregistered, as --gc or --delete do) is seen at the next
    open."""
    db = tmp_path / "db.sqlite"
    src = sqlite3.connect(world.db)
    dst = sqlite3.connect(db)
    src.backup(dst)
    src.close()
    dst.execute("PRAGMA journal_mode=WAL")
    dst.close()
    gate = gate_for(vol, world, db)
    file = world.signed + "/share/copied"
    assert judge(gate, vol, file).verdict.allowed
    writer = sqlite3.connect(db, timeout=0, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("DELETE FROM Refs WHERE referrer = (SELECT id FROM ValidPaths "
                   "WHERE path = ?)", (world.signed,))
    writer.execute("DELETE FROM ValidPaths WHERE path = ?", (world.signed,))
    assert judge(gate, vol, file).verdict.allowed  # not committed yet: still valid
    writer.execute("COMMIT")
    writer.execute("BEGIN EXCLUSIVE")  # nothing of the gate's holds a lock
    writer.execute("COMMIT")
    writer.close()
    v = judge(gate, vol, file).verdict
    assert not v.allowed and "is not registered by Nix" in v.missing


def test_an_unreadable_database_leaves_paths_in_flight(vol: Volume, world: World,
                                                       tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    db.write_bytes(b"not a database" * 100)
    gate = gate_for(vol, world, db)
    file = world.signed + "/share/copied"
    v = judge(gate, vol, file).verdict
    assert not v.allowed and "cannot read Nix's database" in v.missing
    assert judge(gate, vol, file, caller=Caller(0, 0)).verdict.allowed


def test_no_nix_database_no_nix_gate(vol: Volume, world: World) -> None:
    pol = parse_policy('[[rules]]\npath = "/nix/store/**"\nsigners = 0\n', Path("p.toml"))
    assert TrustGate(vol, pol).nix is None
    with pytest.raises(UsageError, match="nix-database: must be the path"):
        parse_policy("nix-database = 3\n", Path("p.toml"))
    db = NixDatabase(str(world.root / "nix/var/nix/db/none.sqlite"))
    assert db.lookup(world.signed) is None  # no database yet: nothing registered



def test_in_a_transaction_the_nar_is_never_hashed(vol: Volume, world: World) -> None:
    """On the event loop (a caller's transaction) the gate does not hash a store path's
    NAR: it answers None (ask again off the loop); once hashed, it answers at once."""
    gate = gate_for(vol, world)
    file = world.signed + "/share/copied"
    v = version_at(gate, vol, file)
    with vol.store.read() as txn:
        assert gate.judge_names([P(file)], v, txn, caller=STRANGER) is None
    assert judge(gate, vol, file).verdict.allowed  # hashed here, no transaction given
    with vol.store.read() as txn:
        j = gate.judge_names([P(file)], v, txn, caller=STRANGER)
    assert j is not None and j.verdict.allowed


def test_annofs_statements_and_nix_signatures_count_together_by_key(
        vol: Volume, world: World) -> None:
    """The half-signed path (cache-a-1 in Nix's database) plus an annofs `built`
    statement: by cache-a-1 again, still one signer; by cache-b-1, two: allowed."""
    gate = gate_for(vol, world)
    file = world.half + "/share/copied"
    files = collect_files(vol, [P(world.half)])
    sign_files(vol, files, load_secret_key(world.keys / "cache-a-1.sec"), "built")
    v = judge(gate, vol, file).verdict
    assert not v.allowed and "has 1 (cache-a-1)" in v.missing
    sign_files(vol, files, load_secret_key(world.keys / "cache-b-1.sec"), "built")
    v = judge(gate, vol, file).verdict
    assert v.allowed and v.signers == ("cache-a-1", "cache-b-1"), v.reason


def test_verify_and_serve_judge_as_a_strangers_open(vol: Volume, world: World) -> None:
    """`content_verdict` (annofs verify, nix serve) sees the Nix store's evidence too."""
    gate = gate_for(vol, world)
    with vol.store.read() as txn:
        for path, allowed in ((world.signed + "/share/copied", True),
                              (world.half + "/share/copied", False)):
            v = version_at(gate, vol, path)
            assert content_verdict(gate, P(path), v, txn).allowed is allowed
        a = vol.namespace.resolve(txn, P(world.tree + "/l"))
        assert isinstance(a.target, bytes)
        link = symlink_content(a.target)
        assert content_verdict(gate, P(world.tree + "/l"), link, txn).allowed


def test_a_busy_database_is_retried_briefly(world: World, tmp_path: Path) -> None:
    """A database locked by a writer for a moment (here: exclusive locking mode, which
    locks readers out even in WAL) is retried; locked for good, the lookup fails with
    one line (and the path is then in flight: test_an_unreadable_database_...)."""
    import threading
    import time

    from annofs.trust.nixstore import NeedsThread, NixDatabaseError

    db = tmp_path / "db.sqlite"
    src, dst = sqlite3.connect(world.db), sqlite3.connect(db)
    src.backup(dst)
    src.close()
    dst.execute("PRAGMA journal_mode=WAL")
    dst.close()
    writer = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    writer.execute("PRAGMA locking_mode=EXCLUSIVE")
    writer.execute("BEGIN EXCLUSIVE")
    writer.execute("UPDATE ValidPaths SET registrationTime = 1 WHERE path = ?",
                   (world.signed,))
    # Meanwhile a writer's read-write open of a path in flight is still one (the gate
    # does not wait on the event loop): the path counts as in flight, as when the
    # database cannot be read (test_an_unreadable_database_leaves_paths_in_flight).
    vol_gate = TrustGate(Volume.open(tmp_path / "store", create=True), nix_policy(world, db))
    lock = P("/nix/store/" + "6" * 32 + "-x.lock")
    assert vol_gate.content_free([lock], Caller(0, 0))
    assert not vol_gate.content_free([lock], NOBODY)
    vol_gate.volume.close()
    nixdb = NixDatabase(str(db))
    started = time.monotonic()
    with pytest.raises(NeedsThread):  # on the event loop: no sleeping, ask off the loop
        nixdb.lookup(world.signed, wait=False)
    assert time.monotonic() - started < 0.2
    with pytest.raises(NixDatabaseError, match="cannot read Nix's database: database is "
                                               "locked"):
        nixdb.lookup(world.signed)

    def release() -> None:
        time.sleep(0.1)
        writer.execute("COMMIT")
        writer.close()  # the exclusive lock goes with the connection
    t = threading.Thread(target=release)
    t.start()
    try:
        reg = nixdb.lookup(world.signed)
    finally:
        t.join()
    assert reg is not None and len(reg.sigs) == 2
