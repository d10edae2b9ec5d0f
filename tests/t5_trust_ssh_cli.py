"""SSH keys through the commands: `sign --ssh-key` with a key in a real ssh-agent, a
FIDO statement (software token) carried by `attest import`, `verify`, `why` and `log`
naming SSH signers, `attest export` round trips, and the exported SSHSIG checked by the
real `ssh-keygen -Y verify -n annofs` over the DSSE PAE."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import blake3
from ssh_helpers import make_key, public_line, ssh_agent, token_statement
from t1_trust_sshsig import SoftToken
from t5_cli import ok
from t5_trust_cli import Env, clone_env, fail, verdicts
from t5_trust_cli import template as template  # the fixture

from annofs.trust.sshsig import armor
from annofs.trust.statement import PAYLOAD_TYPE, Subject, pae

POLICY = """mode = "enforce"
trusted-ssh-signers = "allowed_signers"

[[rules]]
path = "/src/proj/sub/**"
signers = 1
user-presence = true

[[rules]]
path = "/src/**"
signers = 1
"""


def setup(template: Path, tmp: Path) -> tuple[Env, Path, Path]:
    env = clone_env(template, tmp / "e")
    alice = make_key(env.tmp / "keys", "alice", "alice@laptop")
    mallory = make_key(env.tmp / "keys", "mallory", "alice@laptop")
    (env.tmp / "allowed_signers").write_text(
        f"alice@example.org {public_line(alice)}\n")
    return env, alice, mallory


def fingerprint(key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{key}.pub"],
                         capture_output=True, check=True).stdout.decode()
    return out.split()[1]


def test_sign_with_a_key_in_ssh_agent_then_verify_why_log(template: Path,
                                                          tmp_path: Path) -> None:
    env, alice, mallory = setup(template, tmp_path)
    policy = env.policy(POLICY)
    with ssh_agent(env.tmp, alice):
        alice.unlink()  # only the agent holds the private half
        out = ok(env.run("sign", "--ssh-key", f"{alice}.pub", "/src/proj/a.c")).decode()
    assert out.startswith(f"signed (reviewed): 1 file by {fingerprint(alice)} "
                          f"(alice@laptop), statement ")
    ok(env.run("sign", "--ssh-key", str(mallory), "/src/proj/b.c"))
    proc = env.run("verify", "--policy", str(policy), "/src/proj")
    got = verdicts(proc)
    assert got == {"/src/proj/a.c": "allowed", "/src/proj/b.c": "refused",
                   "/src/proj/sub/c.c": "refused"}
    text = proc.stdout.decode()
    assert "signed by alice@example.org (1 of 1 needed)" in text
    assert (f"not counted: untrusted key {fingerprint(mallory)} (claims 'alice@laptop')"
            in text)
    why = env.run("why", "--policy", str(policy), "/src/proj/b.c").stdout.decode()
    assert f"untrusted key {fingerprint(mallory)} (claims 'alice@laptop')" in why
    why = ok(env.run("why", "--policy", str(policy), "/src/proj/a.c")).decode()
    assert "alice@example.org" in why
    log = ok(env.run("log", "--policy", str(policy), "/src/proj/a.c")).decode()
    assert f"alice@example.org [key {fingerprint(alice)[:15]}...] (reviewed)" in log
    log = ok(env.run("log", "/src/proj/b.c")).decode()  # no policy: names are claims
    assert f"alice@laptop [key {fingerprint(mallory)[:15]}...]" in log


def test_fido_statement_imported_and_judged_by_user_presence(template: Path,
                                                             tmp_path: Path) -> None:
    env, _, _ = setup(template, tmp_path)
    token = SoftToken()
    with (env.tmp / "allowed_signers").open("a") as f:
        f.write(f"yubi@example.org {token.public.to_text()}\n")
    policy = env.policy(POLICY)
    digest = blake3.blake3(b"int c;\n").digest()  # sub/c.c's content, as b3sum says
    subjects = [Subject("sub/c.c", digest)]
    untouched = token_statement(token, subjects, flags=0)
    (env.tmp / "untouched.jsonl").write_text(untouched.envelope.to_json() + "\n")
    ok(env.run("attest", "import", str(env.tmp / "untouched.jsonl")))
    proc = env.run("verify", "--policy", str(policy), "/src/proj/sub/c.c")
    assert verdicts(proc) == {"/src/proj/sub/c.c": "refused"}
    assert ("yubi@example.org: the FIDO token did not assert user presence (no touch)"
            in proc.stdout.decode())
    # The same statement under a rule without user-presence counts.
    relaxed = env.policy(POLICY.replace("user-presence = true\n", ""), "relaxed.toml")
    proc = env.run("verify", "--policy", str(relaxed), "/src/proj/sub/c.c")
    assert verdicts(ok(proc) and proc) == {"/src/proj/sub/c.c": "allowed"}
    touched = token_statement(token, subjects)
    (env.tmp / "touched.jsonl").write_text(touched.envelope.to_json() + "\n")
    ok(env.run("attest", "import", str(env.tmp / "touched.jsonl")))
    proc = env.run("verify", "--policy", str(policy), "/src/proj/sub/c.c")
    assert verdicts(ok(proc) and proc) == {"/src/proj/sub/c.c": "allowed"}


def test_export_import_round_trip_and_ssh_keygen_interop(template: Path,
                                                         tmp_path: Path) -> None:
    env, alice, _ = setup(template, tmp_path)
    ok(env.run("sign", "--ssh-key", str(alice), "/src/proj"))
    exported = ok(env.run("attest", "export", "/src/proj"))
    lines = exported.decode().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["signatures"][0]["keyid"] == fingerprint(alice)
    # The signature, as OpenSSH sees it: ssh-keygen -Y verify over the PAE.
    sig = base64.b64decode(doc["signatures"][0]["sig"])
    (env.tmp / "st.sig").write_text(armor(sig))
    message = pae(PAYLOAD_TYPE.encode(), base64.b64decode(doc["payload"]))
    check = subprocess.run(["ssh-keygen", "-Y", "verify", "-f",
                            str(env.tmp / "allowed_signers"), "-I", "alice@example.org",
                            "-n", "annofs", "-s", str(env.tmp / "st.sig")],
                           input=message, capture_output=True, check=False)
    assert check.returncode == 0, check.stderr
    # Into another store with the same tree: allowed there too.
    other = clone_env(template, tmp_path / "other")
    (other.tmp / "allowed_signers").write_text(f"alice@example.org {public_line(alice)}\n")
    (other.tmp / "att.jsonl").write_bytes(exported)
    assert ok(other.run("attest", "import", str(other.tmp / "att.jsonl"))) \
        == b"imported 1 statement from " + str(other.tmp / "att.jsonl").encode() + b"\n"
    proc = other.run("verify", "--policy", str(other.policy(POLICY)), "/src/proj/a.c")
    assert verdicts(ok(proc) and proc) == {"/src/proj/a.c": "allowed"}
    assert ok(other.run("attest", "export", "/src/proj")) == exported
    # A tampered payload under the same SSHSIG: refused before anything is stored.
    payload = json.loads(base64.b64decode(doc["payload"]))
    payload["predicate"]["claim"] = "built"
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    (other.tmp / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps(doc) + "\n")
    msg = fail(other.run("attest", "import", str(other.tmp / "bad.jsonl")))
    assert msg == (f"{other.tmp / 'bad.jsonl'}:2: the signature by 'alice@laptop' does not "
                   f"verify (the statement was changed, or signed by another key)")


def test_bad_ssh_key_arguments_are_one_line(template: Path, tmp_path: Path) -> None:
    env, alice, _ = setup(template, tmp_path)
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f",
                    str(env.tmp / "keys" / "ec")], check=True)
    msg = fail(env.run("sign", "--ssh-key", str(env.tmp / "keys" / "ec"), "/src/proj"))
    assert "ecdsa-sha2-nistp256 keys are not supported (use an ed25519 or ed25519-sk key)" \
        in msg
    msg = fail(env.run("sign", "--ssh-key", str(alice), "--key", "x", "/src/proj"))
    assert msg == "give exactly one of --key SECRET (a Nix key) and --ssh-key PATH"
    msg = fail(env.run("sign", "--ssh-key", str(env.tmp / "none.pub"), "/src/proj"))
    assert msg == f"{env.tmp / 'none.pub'}: no such public key file"
    # A .pub whose private half is nowhere (no agent): ssh-keygen's own reason.
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(env.tmp / "keys" / "gone")], check=True)
    (env.tmp / "keys" / "gone").unlink()
    msg = fail(env.run("sign", "--ssh-key", str(env.tmp / "keys" / "gone.pub"), "/src/proj"))
    assert msg.startswith(f"{env.tmp / 'keys' / 'gone.pub'}: ssh-keygen could not sign")
    (env.tmp / "allowed_signers").write_text("alice ssh-ed25519 AAAA\n")
    msg = fail(env.run("policy", "check", str(env.policy(POLICY))))
    assert msg.startswith(f"{env.tmp / 'allowed_signers'}:1: ")
