"""`annofs import --git --verify-signatures` with the real git and ssh-keygen: tags and
commits signed under `gpg.format = ssh`, an unsigned commit on top, a tag signed by an
untrusted key, an expired valid-before, uncommitted changes, an OpenPGP signature; the
`source` statement judged by `verify` and named in `why`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from ssh_helpers import make_key, public_line
from t5_cli import ok
from t5_trust_cli import Env, clone_env, fail, verdicts
from t5_trust_cli import template as template  # the fixture

POLICY = """mode = "enforce"
trusted-ssh-signers = "allowed_signers"

[[rules]]
path = "/src/**"
signers = 1
claims = ["source"]
"""


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "Alice",
           "GIT_AUTHOR_EMAIL": "alice@example.org", "GIT_COMMITTER_NAME": "Alice",
           "GIT_COMMITTER_EMAIL": "alice@example.org"}
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


@pytest.fixture
def repo(template: Path, tmp_path: Path) -> tuple[Env, Path, Path, Path]:
    """A repository whose HEAD is tagged v1.0 and the commit signed, both by alice."""
    env = clone_env(template, tmp_path / "e")
    alice = make_key(env.tmp / "keys", "alice", "alice@laptop")
    mallory = make_key(env.tmp / "keys", "mallory", "mallory@laptop")
    r = env.tmp / "repo"
    (r / "src").mkdir(parents=True)
    (r / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (r / "README").write_text("hello\n")
    git(r, "init", "-q", "-b", "main")
    git(r, "config", "gpg.format", "ssh")
    git(r, "config", "user.signingkey", str(alice))
    git(r, "add", ".")
    git(r, "commit", "-q", "-S", "-m", "first")
    git(r, "tag", "-s", "v1.0", "-m", "release 1.0")
    (env.tmp / "allowed_signers").write_text(
        f'alice@example.org namespaces="git" {public_line(alice)}\n')
    env.policy(POLICY)
    return env, r, alice, mallory


def imp(env: Env, r: Path) -> subprocess.CompletedProcess[bytes]:
    return env.run("import", "--git", "--verify-signatures", "--policy",
                   str(env.tmp / "policy.toml"), str(r), "/src/repo")


def test_a_signed_tag_is_recorded_and_allows_its_files(repo) -> None:
    env, r, _, _ = repo
    proc = imp(env, r)
    ok(proc)
    commit = git(r, "rev-parse", "HEAD").strip()
    assert (f"tag v1.0 (commit {commit[:12]}) signed by alice@example.org"
            in proc.stderr.decode())
    policy = str(env.tmp / "policy.toml")
    proc = env.run("verify", "--policy", policy, "/src/repo")
    assert verdicts(ok(proc) and proc) == {"/src/repo/README": "allowed",
                                           "/src/repo/src/main.c": "allowed"}
    assert (f"signed by alice@example.org (git tag v1.0, commit {commit[:12]})"
            in proc.stdout.decode())
    # A file patched after the tag is refused; why names the tag and its signer.
    (env.tmp / "patched").mkdir()
    (env.tmp / "patched" / "main.c").write_text("int main(void) { return 1; }\n")
    ok(env.run("import", str(env.tmp / "patched"), "/src/repo/src"))
    proc = env.run("verify", "--policy", policy, "/src/repo/src/main.c")
    assert verdicts(proc) == {"/src/repo/src/main.c": "refused"}
    why = env.run("why", "--policy", policy, "/src/repo/src/main.c").stdout.decode()
    assert f"alice@example.org (git tag v1.0, commit {commit[:12]})" in why
    # The git signature signs the commit, not files: it is not exported.
    out = env.run("attest", "export", "/src/repo/README")
    assert ok(out) == b"" and b"1 git signature(s) not exported" in out.stderr


def test_a_signed_commit_then_a_new_tag_incrementally(repo) -> None:
    env, r, _, _ = repo
    ok(imp(env, r))
    (r / "README").write_text("hello again\n")
    git(r, "commit", "-q", "-S", "-am", "second")  # signed, not tagged
    commit = git(r, "rev-parse", "HEAD").strip()
    proc = imp(env, r)
    assert b"2 files (1 read, 1 unchanged)" in ok(proc)
    assert f"commit {commit[:12]} signed by alice@example.org" in proc.stderr.decode()
    proc = env.run("verify", "--policy", str(env.tmp / "policy.toml"), "/src/repo")
    assert set(verdicts(ok(proc) and proc).values()) == {"allowed"}
    assert f"(git commit {commit[:12]})" in proc.stdout.decode()
    git(r, "tag", "-s", "v1.1", "-m", "release 1.1")
    assert b"2 files (0 read, 2 unchanged)" in ok(imp(env, r))
    # One key, two statements (the commit's, the tag's): one signer; log shows both.
    proc = env.run("log", "--policy", str(env.tmp / "policy.toml"), "/src/repo/README")
    log = ok(proc).decode().splitlines()[1]
    assert f"alice@example.org (git tag v1.1, commit {commit[:12]}) [key SHA256:" in log
    assert f"alice@example.org (git commit {commit[:12]}) [key SHA256:" in log


def test_refusals_change_nothing(repo) -> None:
    env, r, _, mallory = repo
    (r / "README").write_text("uncommitted\n")
    msg = fail(imp(env, r))
    assert msg.startswith(f"{r}: uncommitted changes (M README, ...)")
    git(r, "checkout", "-q", "README")
    # An unsigned commit on top.
    (r / "README").write_text("unsigned\n")
    git(r, "commit", "-q", "--no-gpg-sign", "-am", "unsigned")
    commit = git(r, "rev-parse", "HEAD").strip()
    msg = fail(imp(env, r))
    assert msg == f"{r}: no trusted signature at HEAD: commit {commit[:12]} is not signed"
    # A tag by a key the policy does not list.
    git(r, "-c", f"user.signingkey={mallory}", "tag", "-s", "v2.0", "-m", "evil")
    msg = fail(imp(env, r))
    fp = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{mallory}.pub"],
                        capture_output=True, check=True).stdout.decode().split()[1]
    assert f"tag v2.0 is signed by {fp}, not a key of the policy's trusted-ssh-signers" in msg
    assert env.run("verify", "--policy", str(env.tmp / "policy.toml"),
                   "/src/repo").returncode == 2  # nothing was imported: no such path


def test_expired_and_wrong_namespace_and_openpgp(repo) -> None:
    env, r, alice, _ = repo
    (env.tmp / "allowed_signers").write_text(
        f'alice@example.org valid-before="20200101Z" {public_line(alice)}\n')
    msg = fail(imp(env, r))
    assert "tag v1.0 is signed by alice@example.org, but " in msg
    assert "does not allow namespace 'git' at its time and now" in msg
    (env.tmp / "allowed_signers").write_text(
        f'alice@example.org namespaces="annofs" {public_line(alice)}\n')
    assert "does not allow namespace 'git'" in fail(imp(env, r))
    # An OpenPGP-signed commit (made by hand: no gpg needed to be refused).
    (env.tmp / "allowed_signers").write_text(f"alice@example.org {public_line(alice)}\n")
    obj = git(r, "cat-file", "commit", "HEAD")
    head, body = obj.split("\n\n", 1)
    head = "\n".join(ln for ln in head.split("\n") if not ln.startswith(("gpgsig", " ")))
    pgp = head + ("\ngpgsig -----BEGIN PGP SIGNATURE-----\n \n iQEz\n "
                  "-----END PGP SIGNATURE-----") + "\n\n" + body
    new = subprocess.run(["git", "-C", str(r), "hash-object", "-t", "commit", "-w",
                          "--stdin"], input=pgp.encode(), capture_output=True,
                         check=True).stdout.decode().strip()
    git(r, "reset", "-q", new)
    msg = fail(imp(env, r))
    assert (f"commit {new[:12]} has an OpenPGP signature (annofs verifies SSH signatures "
            f"only: gpg.format = ssh)") in msg
