"""The trust commands as a user runs them: key generate, sign, label, attest export/import,
verify, policy check. Every bad input (key, policy, envelope file, path, word) gives one
line on stderr naming the file and the problem, exit 2, and an unchanged store (compared
against a dump of every LMDB key and value)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from t5_cli import BASE_NS, annofs, dump_store, ok, write

from annofs.daemon.registry import take_mount_lock


def fail(proc: subprocess.CompletedProcess[bytes], status: int = 2) -> str:
    """The one stderr line of a failed command (without the 'annofs: ' prefix)."""
    err = proc.stderr.decode()
    assert proc.returncode == status, f"exit {proc.returncode}: {err}"
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert err.startswith("annofs: "), err
    return err[len("annofs: "):-1]


@dataclass
class Env:
    tmp: Path
    store: Path
    src: Path

    def run(self, *args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
        return annofs(self.store, *args, cwd=self.tmp, **kw)  # type: ignore[arg-type]

    def key(self, name: str) -> tuple[Path, Path]:
        ok(self.run("key", "generate", name, "--dir", str(self.tmp / "keys")))
        return self.tmp / "keys" / f"{name}.secret", self.tmp / "keys" / f"{name}.public"

    def policy(self, body: str, name: str = "policy.toml") -> Path:
        path = self.tmp / name
        path.write_text(body)
        return path


def make_env(tmp: Path) -> Env:
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / "store"
    ok(annofs(store, "init", cwd=tmp))
    src = tmp / "proj"
    (src / "sub").mkdir(parents=True)
    write(src / "a.c", b"int a;\n", BASE_NS)
    write(src / "b.c", b"int b;\n", BASE_NS)
    write(src / "sub" / "c.c", b"int c;\n", BASE_NS)
    ok(annofs(store, "import", str(src), "/src/proj", cwd=tmp))
    (tmp / "keys").mkdir()
    return Env(tmp, store, src)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised store with /src/proj imported, copied by every test (init and
    import are two subprocesses: done once, not per case)."""
    return make_env(tmp_path_factory.mktemp("template") / "t").tmp


def clone_env(template: Path, tmp: Path) -> Env:
    shutil.copytree(template, tmp, symlinks=True)
    return Env(tmp, tmp / "store", tmp / "proj")


@pytest.fixture
def env(template: Path, tmp_path: Path) -> Env:
    return clone_env(template, tmp_path / "e")


ONE = """mode = "enforce"
trusted-keys-dir = "keys"

[[rules]]
path = "/src/**"
signers = 1
"""


def verdicts(proc: subprocess.CompletedProcess[bytes]) -> dict[str, str]:
    """path -> status from `annofs verify` output."""
    out = {}
    lines = proc.stdout.decode().splitlines()
    assert lines[-1].startswith("verified "), lines  # the summary line
    for line in lines[:-1]:
        path, status, _ = line.split(": ", 2)
        out[path] = status
    return out


# -- happy paths ----------------------------------------------------------------------------


def test_key_generate(env: Env) -> None:
    proc = env.run("key", "generate", "alice-1", "--dir", str(env.tmp / "keys"))
    out = ok(proc).decode().splitlines()
    secret, public = env.tmp / "keys" / "alice-1.secret", env.tmp / "keys" / "alice-1.public"
    assert out[0] == f"wrote {secret} and {public}"
    assert out[1] == public.read_text()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    before = secret.read_bytes()
    msg = fail(env.run("key", "generate", "alice-1", "--dir", str(env.tmp / "keys")))
    assert msg == f"{secret}: already exists (refusing to overwrite a key)"
    assert secret.read_bytes() == before
    # --dir defaults to the working directory
    ok(env.run("key", "generate", "here-1"))
    assert (env.tmp / "here-1.secret").exists()


def test_sign_verify_patch(env: Env) -> None:
    secret, _ = env.key("alice-1")
    policy = env.policy(ONE)
    proc = env.run("verify", "--policy", str(policy), "/src/proj")
    assert proc.returncode == 1
    assert set(verdicts(proc).values()) == {"refused"}
    out = ok(env.run("sign", "--key", str(secret), "/src/proj")).decode()
    assert out.startswith("signed (reviewed): 3 files by alice-1, statement ")
    proc = env.run("verify", "--policy", str(policy), "/src/proj")
    assert ok(proc)
    lines = proc.stdout.decode().splitlines()
    assert lines[0].startswith("/src/proj/a.c: allowed: rules[0] /src/**: signed by alice-1 "
                               "(1 of 1 needed)  [blake3:")
    # Patch one file (an incremental re-import): it alone is refused.
    write(env.src / "b.c", b"int b = 1;\n", BASE_NS + 10**9)
    ok(env.run("import", str(env.src), "/src/proj"))
    proc = env.run("verify", "--policy", str(policy), "/src/proj")
    assert proc.returncode == 1
    assert verdicts(proc) == {"/src/proj/a.c": "allowed", "/src/proj/b.c": "refused",
                              "/src/proj/sub/c.c": "allowed"}
    # Another claim is another statement.
    again = ok(env.run("sign", "--key", str(secret), "--claim", "built", "/src/proj/a.c"))
    assert b"signed (built): 1 file by alice-1" in again


def test_policy_from_environment(env: Env) -> None:
    secret, _ = env.key("alice-1")
    ok(env.run("sign", "--key", str(secret), "/src/proj"))
    policy = env.policy(ONE)
    e = {k: v for k, v in os.environ.items() if k != "ANNOFS_STORE"}
    e["ANNOFS_POLICY"] = str(policy)
    proc = subprocess.run([sys.executable, "-m", "annofs.cli.main", "--store", str(env.store),
                           "verify", "/src/proj/a.c"], env=e, capture_output=True, timeout=60)
    assert ok(proc).startswith(b"/src/proj/a.c: allowed")


def test_warn_mode_exits_0(env: Env) -> None:
    policy = env.policy(ONE.replace('"enforce"', '"warn"'))
    proc = env.run("verify", "--policy", str(policy), "/src/proj/a.c")
    assert ok(proc).startswith(b"/src/proj/a.c: warn: would be refused (mode warn)")


def test_label_malicious(env: Env) -> None:
    alice, _ = env.key("alice-1")
    bob, _ = env.key("bob-1")
    ok(env.run("sign", "--key", str(alice), "/src/proj"))
    out = ok(env.run("label", "--key", str(bob), "--label", "malicious", "/src/proj/sub"))
    assert out.startswith(b"labelled malicious: 1 file by bob-1, statement ")
    proc = env.run("verify", "--policy", str(env.policy(ONE)), "/src/proj")
    assert proc.returncode == 1
    assert verdicts(proc)["/src/proj/sub/c.c"] == "refused"
    assert b"labelled malicious by bob-1" in proc.stdout


def test_attest_export_import_between_stores(env: Env, tmp_path: Path) -> None:
    alice, _ = env.key("alice-1")
    bob, _ = env.key("bob-1")
    ok(env.run("sign", "--key", str(alice), "/src/proj"))
    ok(env.run("sign", "--key", str(bob), "--claim", "built", "/src/proj/a.c"))
    exported = ok(env.run("attest", "export", "/src/proj"))
    lines = exported.decode().splitlines()
    assert len(lines) == 2
    for line in lines:
        doc = json.loads(line)
        assert doc["payloadType"] == "application/vnd.in-toto+json"
        assert doc["signatures"][0]["keyid"] in ("alice-1", "bob-1")
    assert ok(env.run("attest", "export", "/src/proj/b.c")).decode().splitlines() == [
        ln for ln in lines if '"alice-1"' in ln]
    (tmp_path / "attestations.jsonl").write_bytes(exported)

    # Another store with the same content: the statements follow the content there.
    other = tmp_path / "other"
    other.mkdir()
    o = Env(other, other / "store", env.src)
    ok(annofs(o.store, "init", cwd=other))
    ok(annofs(o.store, "import", str(env.src), "/src/copy", cwd=other))
    out = ok(o.run("attest", "import", str(tmp_path / "attestations.jsonl")))
    assert out.decode() == f"imported 2 statements from {tmp_path / 'attestations.jsonl'}\n"
    out = ok(o.run("attest", "import", str(tmp_path / "attestations.jsonl")))
    assert b"imported 0 statements" in out and b"(2 already stored)" in out
    (other / "keys").mkdir()
    (other / "keys" / "alice-1.public").write_bytes((env.tmp / "keys" / "alice-1.public")
                                                   .read_bytes())
    proc = o.run("verify", "--policy", str(o.policy(ONE)), "/src/copy")
    ok(proc)
    assert set(verdicts(proc).values()) == {"allowed"}
    # From stdin too.
    third = make_env(tmp_path / "third")  # a third store, with the same files
    proc = subprocess.run(
        [sys.executable, "-m", "annofs.cli.main", "--store", str(third.store), "attest",
         "import", "-"], input=exported, capture_output=True, timeout=60)
    assert ok(proc) == b"imported 2 statements from <stdin>\n"


def test_policy_check(env: Env) -> None:
    env.key("alice-1")
    policy = env.policy(ONE)
    out = ok(env.run("policy", "check", str(policy))).decode()
    assert out.splitlines()[0] == (f"{policy}: mode enforce, default allow; 1 trusted key "
                                   f"(1 from trusted-keys-dir), 0 revoked; 1 rule")
    assert "  rules[0] /src/**: needs 1 signer" in out


# -- bad input: one line, exit 2, store unchanged ---------------------------------------------


@dataclass(frozen=True)
class Bad:
    args: Callable[[Env], list[str]]
    message: Callable[[Env], str]  # the exact stderr line (without "annofs: ")
    setup: Callable[[Env], None] = lambda e: None


def keyfile(e: Env, name: str, text: str) -> str:
    path = e.tmp / name
    path.write_text(text)
    return str(path)


def good_line(e: Env) -> str:
    alice = e.tmp / "keys" / "alice-1.secret"
    if not alice.exists():
        e.key("alice-1")
    ok(e.run("sign", "--key", str(alice), "/src/proj"))
    line = ok(e.run("attest", "export", "/src/proj")).decode().splitlines()[0]
    # Leave the store as it was before this helper signed: re-init from a fresh copy is
    # not possible, so the cases compare dumps taken AFTER setup.
    return line


def attest_file(e: Env, *lines: str) -> str:
    path = e.tmp / "att.jsonl"
    path.write_text("".join(ln + "\n" for ln in lines))
    return str(path)


def tampered(line: str) -> str:
    doc = json.loads(line)
    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[0] ^= 1
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    return json.dumps(doc)


def copy_proj(e: Env) -> None:
    ok(e.run("cp", "/src/proj", "/src/copy"))


def import_empty_dir(e: Env) -> None:
    (e.tmp / "empty").mkdir()
    ok(e.run("import", str(e.tmp / "empty"), "/src/empty"))


K64 = base64.b64encode(bytes(64)).decode()
K32 = base64.b64encode(bytes(32)).decode()

BAD: dict[str, Bad] = {
    "key-no-colon": Bad(lambda e: ["sign", "--key", keyfile(e, "k", "nocolon"), "/src/proj"],
                        lambda e: f"{e.tmp}/k: no ':' (a key is NAME:BASE64)"),
    "key-empty-name": Bad(lambda e: ["sign", "--key", keyfile(e, "k", ":" + K64), "/src/proj"],
                          lambda e: f"{e.tmp}/k: the key name is empty (expected NAME:BASE64)"),
    "key-bad-base64": Bad(lambda e: ["sign", "--key", keyfile(e, "k", "a:@@@@"), "/src/proj"],
                          lambda e: f"{e.tmp}/k: the secret key is not valid base64 (Only "
                                    f"base64 data is allowed)"),
    "key-is-public": Bad(lambda e: ["sign", "--key", keyfile(e, "k", "a:" + K32), "/src/proj"],
                         lambda e: f"{e.tmp}/k: a secret key is 64 bytes, this one is 32 (this "
                                   f"looks like a public key)"),
    "key-halves-differ": Bad(lambda e: ["sign", "--key", keyfile(e, "k", "a:" + K64),
                                        "/src/proj"],
                             lambda e: f"{e.tmp}/k: the secret key's public half does not "
                                       f"match its seed"),
    "key-missing": Bad(lambda e: ["sign", "--key", str(e.tmp / "none"), "/src/proj"],
                       lambda e: f"{e.tmp}/none: no such key file"),
    "key-option-missing": Bad(lambda e: ["sign", "/src/proj"],
                              lambda e: "give exactly one of --key SECRET (a Nix key) and "
                                        "--ssh-key PATH"),
    "sign-bad-claim": Bad(lambda e: ["sign", "--key", "x", "--claim", "Re viewed", "/src/proj"],
                          lambda e: "claim 'Re viewed': must be a lowercase word matching "
                                    "[a-z][a-z0-9-]{0,31}"),
    "sign-claim-label": Bad(lambda e: ["sign", "--key", "x", "--claim", "label", "/src/proj"],
                            lambda e: "claim 'label' is reserved for 'annofs label' statements"),
    "label-bad-word": Bad(lambda e: ["label", "--key", "x", "--label", "MALICIOUS", "/src"],
                          lambda e: "label 'MALICIOUS': must be a lowercase word matching "
                                    "[a-z][a-z0-9-]{0,31}"),
    "sign-missing-path": Bad(lambda e: ["sign", "--key", str(e.key("s-1")[0]), "/src/nope"],
                             lambda e: "/src/nope: no such file or directory"),
    "sign-relative-path": Bad(lambda e: ["sign", "--key", str(e.key("s-1")[0]), "src/proj"],
                              lambda e: "src/proj: store paths start with '/' (e.g. /src/foo)"),
    "sign-no-path": Bad(lambda e: ["sign", "--key", str(e.key("s-1")[0])],
                        lambda e: "no PATH given"),
    "sign-name-clash": Bad(lambda e: ["sign", "--key", str(e.key("s-1")[0]), "/src/proj/a.c",
                                      "/src/copy/a.c"],
                           lambda e: "/src/proj/a.c and /src/copy/a.c: both would be subject "
                                     "'a.c'; sign them in separate statements, or sign a "
                                     "common parent",
                           setup=lambda e: copy_proj(e)),
    "sign-empty-dir": Bad(lambda e: ["sign", "--key", str(e.key("s-1")[0]), "/src/empty"],
                          lambda e: "nothing to sign: no regular files or symlinks in the "
                                    "given paths",
                          setup=lambda e: import_empty_dir(e)),
    "import-bad-json": Bad(lambda e: ["attest", "import", attest_file(e, good_line(e), "{")],
                           lambda e: f"{e.tmp}/att.jsonl:2: envelope: not valid JSON "
                                     f"(Expecting property name enclosed in double quotes: "
                                     f"line 1 column 2 (char 1))"),
    "import-tampered": Bad(lambda e: ["attest", "import",
                                      attest_file(e, good_line(e), "", tampered(good_line(e)))],
                           lambda e: f"{e.tmp}/att.jsonl:3: the signature by 'alice-1' does "
                                     f"not verify (the statement was changed, or signed by "
                                     f"another key)"),
    "import-unknown-field": Bad(
        lambda e: ["attest", "import", attest_file(
            e, json.dumps({**json.loads(good_line(e)), "extra": True}))],
        lambda e: f"{e.tmp}/att.jsonl:1: envelope: unknown field 'extra'"),
    "import-missing-file": Bad(lambda e: ["attest", "import", str(e.tmp / "none.jsonl")],
                               lambda e: f"{e.tmp}/none.jsonl: no such statements file"),
    "import-empty-file": Bad(lambda e: ["attest", "import", attest_file(e, "", "  ")],
                             lambda e: f"{e.tmp}/att.jsonl: no statements in the file"),
    "verify-bad-policy": Bad(lambda e: ["verify", "--policy", str(e.policy(
        ONE + 'signers = "two"\n', "bad.toml")), "/src/proj"],
        lambda e: f"{e.tmp}/bad.toml:7: invalid TOML: Cannot overwrite a value (column 16)"),
    "verify-policy-semantics": Bad(lambda e: ["verify", "--policy", str(e.policy(
        ONE.replace("signers = 1", "signers = -2"), "bad.toml")), "/src/proj"],
        lambda e: f"{e.tmp}/bad.toml:6: rules[0].signers: must be a whole number >= 0, got -2"),
    "verify-no-policy": Bad(lambda e: ["verify", "/src/proj"],
                            lambda e: "no policy: give --policy FILE or set $ANNOFS_POLICY"),
    "verify-missing-policy": Bad(lambda e: ["verify", "--policy", str(e.tmp / "none.toml"),
                                            "/src/proj"],
                                 lambda e: f"{e.tmp}/none.toml: no such policy file"),
    "policy-check-bad-key": Bad(lambda e: ["policy", "check", str(e.policy(
        'trusted-public-keys = [\n  "alice-1:AAAA",\n]\n', "bad.toml"))],
        lambda e: f"{e.tmp}/bad.toml:2: trusted-public-keys[0]: a public key is 32 bytes, "
                  f"this one is 3"),
    "policy-check-unknown-key": Bad(lambda e: ["policy", "check", str(e.policy(
        'mode = "enforce"\nrevoke-keys = []\n', "bad.toml"))],
        lambda e: f"{e.tmp}/bad.toml:2: revoke-keys: unknown key (known: mode, default, "
                  f"trusted-public-keys, trusted-keys-dir, trusted-ssh-signers, revoked-keys, "
                  f"rules, trust-bundle, trust-bundle-root, on-stale, nix-database)"),
    "key-generate-bad-name": Bad(lambda e: ["key", "generate", "../evil"],
                                 lambda e: "'../evil': a key name for 'key generate' is letters, "
                                           "digits and . _ + @ - (not starting with '.' or "
                                           "'-')"),
    "key-generate-no-dir": Bad(lambda e: ["key", "generate", "k", "--dir", str(e.tmp / "no")],
                               lambda e: f"{e.tmp}/no: no such directory"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(template: Path, tmp_path: Path, case: str) -> None:
    e = clone_env(template, tmp_path / "e")
    bad = BAD[case]
    bad.setup(e)
    args = bad.args(e)  # may prepare files (and, for good_line, sign): before the dump
    before = dump_store(e.store)
    msg = fail(e.run(*args))
    assert msg == bad.message(e)
    assert dump_store(e.store) == before


def test_writing_commands_refuse_a_mounted_store(env: Env) -> None:
    """As every writing command: not behind a live daemon's back (reads still work)."""
    secret, _ = env.key("alice-1")
    ok(env.run("sign", "--key", str(secret), "/src/proj"))
    exported = env.tmp / "att.jsonl"
    exported.write_bytes(ok(env.run("attest", "export", "/src/proj")))
    # What a live daemon leaves in the store, and the lock it holds (this test stands
    # in for it).
    (env.store / "mount.json").write_text(json.dumps({"pid": os.getpid(),
                                                      "mountpoint": "/mnt/x"}))
    lock = take_mount_lock(env.store)
    try:
        before = dump_store(env.store)
        for args in (["sign", "--key", str(secret), "/src/proj"],
                     ["label", "--key", str(secret), "--label", "malicious", "/src/proj"]):
            assert fail(env.run(*args)) == f"{env.store}: mounted at /mnt/x; use paths " \
                                           f"inside the mount"
        # attest import names no path: it goes to the mount's daemon, and there is none.
        assert fail(env.run("attest", "import", str(exported))) == \
            f"{env.store}: its daemon (pid {os.getpid()}) is not serving /mnt/x"
        assert dump_store(env.store) == before
        assert ok(env.run("attest", "export", "/src/proj")) == exported.read_bytes()
        ok(env.run("verify", "--policy", str(env.policy(ONE)), "/src/proj"))
    finally:
        os.close(lock)

def test_symlinks_are_signed_verified_exported_and_explained(env: Env, tmp_path: Path) -> None:
    """Statements cover the tree: a symlink is signed as its target, a symlink put in
    place of a signed file is refused by verify (exit 1) and explained by why, and
    attest export/import carries symlink subjects to another store."""
    alice, _ = env.key("alice-1")
    os.symlink("sub/c.c", env.src / "link")
    os.symlink("/etc/passwd", env.src / "sub" / "host")
    ok(env.run("import", str(env.src), "/src/proj"))
    out = ok(env.run("sign", "--key", str(alice), "/src/proj")).decode()
    assert out.startswith("signed (reviewed): 3 files and 2 symlinks by alice-1, statement ")
    policy = env.policy(ONE)
    proc = env.run("verify", "--policy", str(policy), "/src/proj")
    ok(proc)
    got = verdicts(proc)
    assert got["/src/proj/link -> 'sub/c.c'"] == "allowed"
    assert got["/src/proj/sub/host -> '/etc/passwd'"] == "allowed"
    assert "[annofs-symlink-v1:" in proc.stdout.decode()
    exported = ok(env.run("attest", "export", "/src/proj/link"))
    [doc] = [json.loads(line) for line in exported.decode().splitlines()]
    subjects = json.loads(base64.b64decode(doc["payload"]))["subject"]
    assert {"name": "proj/link", "digest": {"annofs-symlink-v1": subjects[
        [s["name"] for s in subjects].index("proj/link")]["digest"]["annofs-symlink-v1"]}} \
        in subjects
    assert sum("annofs-symlink-v1" in s["digest"] for s in subjects) == 2

    # A signed file swapped for a symlink to a host file: refused, and explained. (A
    # symlink to /etc/passwd would be allowed: that content, like a file's, is signed
    # wherever it is, here as sub/host.)
    (env.src / "a.c").unlink()
    os.symlink("/etc/shadow", env.src / "a.c")
    ok(env.run("import", str(env.src), "/src/proj"))
    proc = env.run("verify", "--policy", str(policy), "/src/proj")
    assert proc.returncode == 1
    assert verdicts(proc)["/src/proj/a.c -> '/etc/shadow'"] == "refused"
    proc = env.run("why", "--policy", str(policy), "/src/proj/a.c")
    assert proc.returncode == 1
    text = proc.stdout.decode()
    assert "content: symlink to '/etc/shadow' (annofs-symlink-v1:" in text
    assert "signed original (found by signed tree path)" in text
    assert "a signed regular file was here; now a symlink" in text
    doc = json.loads(ok(env.run("why", "--json", "--policy", str(policy),
                                "/src/proj/link")))
    assert doc["kind"] == "symlink" and doc["target"] == "sub/c.c" and doc["allowed"]

    # The statements carry the symlinks to another store with the same tree.
    (tmp_path / "att.jsonl").write_bytes(exported)
    o = make_env(tmp_path / "other")
    os.symlink("sub/c.c", o.src / "link")
    ok(o.run("import", str(o.src), "/src/proj"))
    ok(o.run("attest", "import", str(tmp_path / "att.jsonl")))
    shutil.copy(env.tmp / "keys" / "alice-1.public", o.tmp / "keys")
    proc = o.run("verify", "--policy", str(o.policy(ONE)), "/src/proj/link")
    assert verdicts(ok(proc) and proc) == {"/src/proj/link -> 'sub/c.c'": "allowed"}


def test_verify_reports_a_fifo_under_a_rule_that_needs_signers(env: Env) -> None:
    """An imported FIFO's bytes are never judged (the kernel serves them): verify says
    so where a rule needs signers, and ignores one elsewhere."""
    secret, _ = env.key("alice-1")
    os.mkfifo(env.src / "sub" / "pipe")
    ok(env.run("import", str(env.src), "/src/proj"))
    ok(env.run("import", str(env.src), "/free"))
    ok(env.run("sign", "--key", str(secret), "/src/proj"))
    policy = env.policy(ONE)
    proc = env.run("verify", "--policy", str(policy), "/src/proj")
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert "/src/proj/sub/pipe: a FIFO under rules[0] /src/**: its bytes would reach " \
           "readers unsigned: refused" in out
    assert out.splitlines()[-1] == "verified 4 files: 3 allowed, 1 refused"
    assert ok(env.run("verify", "--policy", str(policy), "/free")).splitlines()[-1] \
        .endswith(b"3 allowed")  # no rule needs signers there: the FIFO is not judged
