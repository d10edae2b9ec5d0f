"""`annofs nix fetch` / `nix sign` against the real Nix (Debian's nix-bin, 2.8, as root,
no daemon): binary caches written by `nix copy`, signed by `nix store sign` with keys from
`nix-store --generate-binary-cache-key`; and the real Nix reading the imported paths
through a real mount with an enforcing policy.

Input-addressed paths (built with `nix-build` from a trivial derivation): Nix accepts
content-addressed ones without any signature, so only these exercise signatures.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd

from annofs.nix.narinfo import parse_narinfo
from annofs.transfer.nar import dump_volume, nar_hash
from annofs.volume import Volume

pytestmark = pytest.mark.skipif(shutil.which("nix-build") is None,
                                reason="the real Nix (nix-bin) is not installed")

NIX = ["nix", "--extra-experimental-features", "nix-command"]
DRV = """
let
  dep = builtins.derivation {
    name = "annofs-t4-dep"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo 'a dependency' > $out"];
  };
in builtins.derivation {
  name = "annofs-t4-hello"; system = builtins.currentSystem; builder = "/bin/sh";
  args = ["-c" ''
    /bin/mkdir -p $out/bin $out/share/empty
    echo hello > $out/share/greeting
    echo ${dep} > $out/share/dep-path
    printf '#!/bin/sh\\necho hi\\n' > $out/bin/hi
    /bin/chmod +x $out/bin/hi
    /bin/ln -s ../share/greeting $out/bin/link
  ''];
}
"""


@dataclass
class NixWorld:
    """Built paths, keys and one cache per compression, made once per session."""

    root: Path
    top: str  # /nix/store/...-annofs-t4-hello
    dep: str
    caches: dict[str, Path]  # compression -> cache signed by cache-a-1
    keys: Path  # cache-a-1 / cache-b-1 / mallory-1 .sec and .pub

    def pub(self, name: str) -> str:
        return (self.keys / f"{name}.pub").read_text().strip()

    def narinfo(self, cache: Path, path: str) -> Path:
        return cache / (path.split("/")[-1][:32] + ".narinfo")

    def copy_cache(self, compression: str, dest: Path) -> Path:
        shutil.copytree(self.caches[compression], dest)
        return dest


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def nixw(tmp_path_factory: pytest.TempPathFactory) -> NixWorld:
    root = tmp_path_factory.mktemp("nix")
    (root / "t.nix").write_text(DRV)
    built = run(["nix-build", str(root / "t.nix"), "--no-out-link"], check=True)
    top = built.stdout.strip().splitlines()[-1]
    dep = run(["nix-store", "-q", "--references", top], check=True).stdout.split()
    assert len(dep) == 1, dep
    keys = root / "keys"
    keys.mkdir()
    for name in ("cache-a-1", "cache-b-1", "mallory-1"):
        run(["nix-store", "--generate-binary-cache-key", name, str(keys / f"{name}.sec"),
             str(keys / f"{name}.pub")], check=True)
    caches = {}
    for c in ("xz", "zstd", "bzip2", "none"):
        d = root / f"cache-{c}"
        run([*NIX, "copy", "--to", f"file://{d}?compression={c}", top], check=True)
        run([*NIX, "store", "sign", "--key-file", str(keys / "cache-a-1.sec"), "--store",
             f"file://{d}", top, dep[0]], check=True)
        caches[c] = d
    return NixWorld(root, top, dep[0], caches, keys)


def write_policy(path: Path, w: NixWorld, *, signers: int = 1, keys: tuple[str, ...] = (
        "cache-a-1", "cache-b-1"), revoked: tuple[str, ...] = ()) -> Path:
    listed = ", ".join(f'"{w.pub(k)}"' for k in keys)
    rev = ", ".join(f'"{r}"' for r in revoked)
    path.write_text(f'''mode = "enforce"
default = "allow"
trusted-public-keys = [{listed}]
revoked-keys = [{rev}]

[[rules]]
path = "/nix/store/**"
signers = {signers}
claims = ["built"]
''')
    return path


def annofs(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(annofs_cmd("--store", str(store), *args))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    s = tmp_path / "store"
    assert annofs(s, "init").returncode == 0
    return s


def nix_dump_sha256(path: str | Path) -> str:
    out = subprocess.run(["nix-store", "--dump", str(path)], capture_output=True, check=True)
    return hashlib.sha256(out.stdout).hexdigest()


def store_is_empty(store: Path) -> bool:
    vol = Volume.open(store)
    try:
        with vol.store.read() as txn:
            root = int(vol.namespace.root(txn).target)
            return list(vol.namespace.listdir(txn, root)) == []
    finally:
        vol.close()


@pytest.mark.parametrize("compression", ["xz", "zstd", "bzip2", "none"])
def test_fetch_from_a_real_nix_cache(nixw: NixWorld, store: Path, tmp_path: Path,
                                     compression: str) -> None:
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = annofs(store, "nix", "fetch", "--cache", str(nixw.caches[compression]), "--policy",
                 str(pol), "--recursive", nixw.top)
    assert res.returncode == 0, res.stderr
    assert f"fetched {nixw.dep}" in res.stdout and f"fetched {nixw.top}" in res.stdout
    info = parse_narinfo(nixw.narinfo(nixw.caches[compression], nixw.top).read_bytes(), "n")
    assert info.references == (nixw.dep.split("/")[-1],)
    vol = Volume.open(store)
    try:
        got = nar_hash(dump_volume(vol, [b"nix", b"store", nixw.top.split("/")[-1].encode()]))
    finally:
        vol.close()
    assert (got.sha256, got.size) == (info.nar_hash, info.nar_size)
    assert got.sha256.hex() == nix_dump_sha256(nixw.top)
    ok = annofs(store, "verify", "--policy", str(pol), "/nix/store")
    # Three files and the symlink bin/link (signed by its target, as the NAR covers it).
    assert ok.returncode == 0 and ok.stdout.count(": allowed:") == 5, ok.stdout
    assert "/bin/link -> '../share/greeting': allowed" in ok.stdout, ok.stdout


@pytest.mark.parametrize("case", ["tampered-narinfo", "flipped-nar-byte", "untrusted-key",
                                  "revoked-key"])
def test_refused_real_caches_add_nothing(nixw: NixWorld, store: Path, tmp_path: Path,
                                         case: str) -> None:
    cache = nixw.copy_cache("none", tmp_path / "cache")
    pol = write_policy(tmp_path / "policy.toml", nixw)
    info_file = nixw.narinfo(cache, nixw.top)
    if case == "tampered-narinfo":
        # Claim no references: the fingerprint changes, the cache's Sig no longer holds.
        text = info_file.read_text()
        lines = [ln if not ln.startswith("References:") else "References: "
                 for ln in text.splitlines()]
        info_file.write_text("\n".join(lines) + "\n")
        expected = "does not verify"
    elif case == "flipped-nar-byte":
        info = parse_narinfo(info_file.read_bytes(), "n")
        nar = cache / info.url
        data = bytearray(nar.read_bytes())
        i = data.index(b"hello\n")
        data[i] ^= 0x01
        nar.write_bytes(bytes(data))
        expected = "NAR hash mismatch"
    elif case == "untrusted-key":
        pol = write_policy(tmp_path / "policy.toml", nixw, keys=("cache-b-1", "mallory-1"))
        expected = "cache-a-1: not a trusted key"
    else:
        pol = write_policy(tmp_path / "policy.toml", nixw, revoked=("cache-a-1",))
        expected = "cache-a-1: key revoked"
    res = annofs(store, "nix", "fetch", "--cache", str(cache), "--policy", str(pol), nixw.top)
    assert res.returncode == 1, res
    assert expected in res.stderr and res.stderr.count("\n") == 1
    assert store_is_empty(store)


def test_two_builders_annofs_signs_as_the_second(nixw: NixWorld, store: Path,
                                                 tmp_path: Path) -> None:
    """Rule: two distinct cache keys. Nix's cache alone is refused; annofs, having the same
    NAR, signs as cache-b-1 (a key made by Nix); then the path is allowed, and the real
    Nix accepts annofs's signature."""
    two = write_policy(tmp_path / "two.toml", nixw, signers=2)
    cache = nixw.copy_cache("xz", tmp_path / "cache")
    assert annofs(store, "nix", "fetch", "--cache", str(cache), "--policy", str(two),
                  nixw.top).returncode == 0
    refused = annofs(store, "verify", "--policy", str(two), "/nix/store")
    assert refused.returncode == 1 and "needs 2 distinct trusted signers, has 1" in \
        refused.stdout
    signed = annofs(store, "nix", "sign", "--key", str(nixw.keys / "cache-b-1.sec"),
                    "--cache", str(cache), nixw.top)
    assert signed.returncode == 0, signed.stderr
    check = run([*NIX, "store", "verify", "--no-contents", "--store", f"file://{cache}",
                 "--option", "trusted-public-keys", nixw.pub("cache-b-1"), nixw.top])
    assert check.returncode == 0, check.stderr
    again = annofs(store, "nix", "fetch", "--cache", str(cache), "--policy", str(two),
                   nixw.top)
    assert again.returncode == 0 and "already present" in again.stdout
    assert annofs(store, "verify", "--policy", str(two), "/nix/store").returncode == 0


def test_nix_sign_refuses_a_tree_that_differs(nixw: NixWorld, store: Path,
                                              tmp_path: Path) -> None:
    cache = nixw.copy_cache("none", tmp_path / "cache")
    pol = write_policy(tmp_path / "policy.toml", nixw)
    assert annofs(store, "nix", "fetch", "--cache", str(cache), "--policy", str(pol),
                  nixw.top).returncode == 0
    host = tmp_path / "share"
    host.mkdir()
    (host / "greeting").write_text("patched\n")
    name = nixw.top.split("/")[-1]
    assert annofs(store, "import", str(host), f"/nix/store/{name}/share").returncode == 0
    before = nixw.narinfo(cache, nixw.top).read_bytes()
    res = annofs(store, "nix", "sign", "--key", str(nixw.keys / "cache-b-1.sec"), "--cache",
                 str(cache), nixw.top)
    assert res.returncode == 1 and "not signing" in res.stderr
    assert nixw.narinfo(cache, nixw.top).read_bytes() == before


@pytest.fixture
def policy_mount(mounted: Mount, nixw: NixWorld, tmp_path: Path) -> Iterator[Mount]:
    """The store with the closure fetched (offline), mounted with a policy: one signer."""
    mounted.stop()
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = annofs(mounted.store, "nix", "fetch", "--cache", str(nixw.caches["xz"]),
                 "--policy", str(pol), "--recursive", nixw.top)
    assert res.returncode == 0, res.stderr
    mounted.start("--policy", str(pol))
    yield mounted


def test_real_nix_reads_through_the_mount(policy_mount: Mount, nixw: NixWorld) -> None:
    info = parse_narinfo(nixw.narinfo(nixw.caches["xz"], nixw.top).read_bytes(), "n")
    inside = policy_mount.path / nixw.top.lstrip("/")
    assert nix_dump_sha256(inside) == info.nar_hash.hex()
    hashed = run(["nix-hash", "--type", "sha256", "--base32", str(inside)], check=True)
    assert f"sha256:{hashed.stdout.strip()}" == info.nar_hash_text


@pytest.mark.expected_log("refused")
def test_real_nix_is_refused_a_patched_file(policy_mount: Mount, nixw: NixWorld) -> None:
    inside = policy_mount.path / nixw.top.lstrip("/")
    with open(inside / "share" / "greeting", "a") as f:  # writing works; reading will not
        f.write("patched\n")
    res = subprocess.run(["nix-store", "--dump", str(inside)], capture_output=True)
    assert res.returncode != 0
    assert b"Permission denied" in res.stderr
    why = os.getxattr(inside / "share" / "greeting", "user.annofs.why").decode()
    assert "needs 1 distinct trusted signer" in why
    assert nix_dump_sha256(inside / "bin") is not None  # the rest still reads


@pytest.mark.expected_log()
def test_fetch_into_a_mounted_store(mounted: Mount, nixw: NixWorld, tmp_path: Path) -> None:
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = annofs(mounted.store, "nix", "fetch", "--cache", str(nixw.caches["zstd"]),
                 "--policy", str(pol), "--recursive", nixw.top)
    assert res.returncode == 0, res.stderr
    inside = mounted.path / nixw.top.lstrip("/")
    assert str(inside) in res.stdout
    assert nix_dump_sha256(inside) == nix_dump_sha256(nixw.top)  # visible at once
    dep = mounted.path / nixw.dep.lstrip("/")
    assert dep.read_text() == "a dependency\n"
    # A cache inside the mount would be read by the daemon through itself: refused.
    inner = shutil.copytree(nixw.caches["none"], mounted.path / "cache")
    res = annofs(mounted.store, "nix", "fetch", "--cache", str(inner), "--policy", str(pol),
                 nixw.top)
    assert res.returncode == 2 and "must be outside the mount" in res.stderr


def test_fetch_over_http_from_a_real_nix_cache_into_a_mount(mounted: Mount, nixw: NixWorld,
                                                            tmp_path: Path) -> None:
    """A cache `nix copy --to file://` wrote, served on loopback as nix-serve or an S3
    site would: the mount's daemon downloads in a worker thread (the mount answers
    meanwhile) and adds exactly what the real Nix has."""
    from cache_server import Faults, serve_cache

    pol = write_policy(tmp_path / "policy.toml", nixw)
    faults = Faults(stall_seconds=2.0)
    nar = next(p for p in (nixw.caches["xz"] / "nar").iterdir())
    faults.stall_after[nar.relative_to(nixw.caches["xz"]).as_posix()] = nar.stat().st_size // 2
    (mounted.path / "other").write_bytes(b"readable meanwhile\n")
    with serve_cache(nixw.caches["xz"], faults) as url:
        proc = subprocess.Popen(annofs_cmd("--store", str(mounted.store), "nix", "fetch",
                                           "--cache", url, "--policy", str(pol),
                                           "--recursive", nixw.top),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # While one NAR's download stalls (half sent, the rest two seconds later), the
        # mount serves other requests: the network is not on the event loop.
        import time

        deadline = time.monotonic() + 20
        while not any(r.startswith("nar/") for r in faults.requests):
            assert time.monotonic() < deadline, "the fetch never asked for a NAR"
            time.sleep(0.05)
        started = time.monotonic()
        assert (mounted.path / "other").read_bytes() == b"readable meanwhile\n"
        assert os.listdir(mounted.path)
        assert time.monotonic() - started < 1.0
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    inside = mounted.path / nixw.top.lstrip("/")
    assert str(inside) in out
    assert nix_dump_sha256(inside) == nix_dump_sha256(nixw.top)
    assert "nix-cache-info" in faults.requests


def test_fetch_from_a_file_url(nixw: NixWorld, store: Path, tmp_path: Path) -> None:
    pol = write_policy(tmp_path / "policy.toml", nixw)
    res = annofs(store, "nix", "fetch", "--cache", f"file://{nixw.caches['bzip2']}",
                 "--policy", str(pol), nixw.dep)
    assert res.returncode == 0, res.stderr
    assert f"fetched {nixw.dep}" in res.stdout
    bad = annofs(store, "nix", "fetch", "--cache", "ftp://example.invalid/cache", "--policy",
                 str(pol), nixw.dep)
    assert bad.returncode == 2 and "unsupported cache URL" in bad.stderr
