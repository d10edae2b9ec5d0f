"""`annofs nix fetch` and `annofs nix sign` as commands: every mistake is one line and
exit 2, every "no" of verification exit 1, and neither changes the store or the cache."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import annofs_cmd
from t2_nix_fetch import H1, A, B, add_to_cache, make_tree

from annofs.nix.nar import dump_host


def annofs(store: Path, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != "ANNOFS_POLICY"}
    e.update(env or {})
    return subprocess.run(annofs_cmd("--store", str(store), *args), capture_output=True,
                          text=True, env=e)


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    store = tmp_path / "store"
    assert annofs(store, "init").returncode == 0
    cache = tmp_path / "cache"
    nar = b"".join(dump_host(make_tree(tmp_path / "tree")))
    add_to_cache(cache, H1, "hello", nar, [A])
    keys = tmp_path / "keys"
    keys.mkdir()
    for k in (A, B):
        (keys / f"{k.name}.secret").write_text(k.to_text())
        (keys / f"{k.name}.public").write_text(k.public_key().to_text())
    policy = tmp_path / "policy.toml"
    policy.write_text('trusted-keys-dir = "keys"\n')
    return {"store": store, "cache": cache, "keys": keys, "policy": policy}


def one_line(res: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert res.returncode == status, res
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("annofs: "), res.stderr
    assert text in res.stderr, res.stderr


def test_fetch_usage_errors_are_exit_2(world: dict[str, Path], tmp_path: Path) -> None:
    s, c, p = world["store"], str(world["cache"]), str(world["policy"])
    one_line(annofs(s, "nix", "fetch", H1), 2, "--cache")
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", p), 2, "no STOREPATH given")
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", p, "hello"), 2,
             "hello: not a store path")
    one_line(annofs(s, "nix", "fetch", "--cache", str(tmp_path / "nope"), "--policy", p, H1),
             2, "no such cache directory")
    one_line(annofs(s, "nix", "fetch", "--cache", c, H1), 2, "no policy")
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", str(tmp_path / "x.toml"),
                    H1), 2, "no such policy file")
    bad = world["cache"] / f"{H1}.narinfo"
    bad.write_text(bad.read_text().replace("NarSize: ", "NarSize: -"))
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", p, H1), 2,
             f"{bad}:7: NarSize:")


def test_fetch_refusals_are_exit_1_and_success_is_one_line(world: dict[str, Path]) -> None:
    s, c, p = world["store"], str(world["cache"]), str(world["policy"])
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", p, "2" * 32), 1,
             f"no {'2' * 32}.narinfo in {c}")
    other = f"/nix/store/{H1}-other"
    one_line(annofs(s, "nix", "fetch", "--cache", c, "--policy", p, other), 1,
             f"not {other}")
    ok = annofs(s, "nix", "fetch", "--cache", c, H1, env={"ANNOFS_POLICY": p})
    assert ok.returncode == 0 and ok.stderr == ""
    assert ok.stdout == (f"fetched /nix/store/{H1}-hello -> /nix/store/{H1}-hello: 2 files, "
                         f"{ok.stdout.split(', ')[1].split()[0]} NAR bytes; signed by "
                         f"cache-a-1\n")
    # The cache's signature signs the NAR, not the files: attest export leaves it out.
    exported = annofs(s, "attest", "export", f"/nix/store/{H1}-hello")
    assert exported.returncode == 0 and exported.stdout == ""
    assert exported.stderr == ("annofs: 1 binary-cache signature(s) not exported: they sign "
                               "a NAR, not files (fetch the path again to carry them)\n")


def test_sign_errors_and_success(world: dict[str, Path]) -> None:
    s, c, keys = world["store"], str(world["cache"]), world["keys"]
    secret = str(keys / "cache-b-1.secret")
    one_line(annofs(s, "nix", "sign", "--key", str(keys / "nope"), "--cache", c, H1), 2,
             "no such key file")
    one_line(annofs(s, "nix", "sign", "--key", str(keys / "cache-b-1.public"), "--cache", c,
                    H1), 2, "this looks like a public key")
    one_line(annofs(s, "nix", "sign", "--key", secret, "--cache", c, "2" * 32), 1,
             "no " + "2" * 32 + ".narinfo")
    narinfo = world["cache"] / f"{H1}.narinfo"
    before = narinfo.read_text()
    one_line(annofs(s, "nix", "sign", "--key", secret, "--cache", c, H1), 2,
             "no such file or directory")  # not fetched yet: nothing to hash
    assert narinfo.read_text() == before
    assert annofs(s, "nix", "fetch", "--cache", c, "--policy", str(world["policy"]),
                  H1).returncode == 0
    ok = annofs(s, "nix", "sign", "--key", secret, "--cache", c, H1)
    assert ok.returncode == 0 and "signed" in ok.stdout
    after = narinfo.read_text().splitlines()
    assert after[:-1] == before.splitlines() and after[-1].startswith("Sig: cache-b-1:")
    again = annofs(s, "nix", "sign", "--key", secret, "--cache", c, H1)
    assert "already signed" in again.stdout
    assert narinfo.read_text().count("Sig: cache-b-1:") == 1
