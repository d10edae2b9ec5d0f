"""SSH-signed statements: the encoding (sshPublicKey instead of publicKey, keyid the
SHA256 fingerprint, the DSSE signature an SSHSIG over the PAE), strictly parsed; Nix-key
statements unchanged. Keys made and signatures checked by the real ssh-keygen."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from t1_trust_sshsig import SoftToken

from annofs.errors import UsageError
from annofs.trust import sshsig
from annofs.trust.keys import generate_key
from annofs.trust.signing import SshSigningKey
from annofs.trust.statement import (
    PAYLOAD_TYPE,
    Subject,
    load_signed,
    make_ssh_statement,
    make_statement,
    pae,
    sign_statement,
    sign_statement_ssh,
    ssh_signed,
)

SUBJECTS = [("a/b.c", bytes(32)), ("x", bytes(range(32)))]


@pytest.fixture
def ed_key(tmp_path: Path) -> Path:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop",
                    "-f", str(key)], check=True)
    return key


def envelope_doc(line: str) -> dict:
    return json.loads(line)


def payload_of(doc: dict) -> dict:
    return json.loads(base64.b64decode(doc["payload"]))


def rewrap(doc: dict, payload: dict) -> str:
    doc = dict(doc)
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(doc)


def test_a_statement_signed_by_ssh_keygen_verifies_on_its_own(ed_key: Path) -> None:
    key = SshSigningKey.load(ed_key)
    ss = sign_statement_ssh(make_ssh_statement(SUBJECTS, "reviewed", key.key, key.name),
                            ed_key)
    doc = envelope_doc(ss.envelope.to_json())
    listed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{ed_key}.pub"],
                            capture_output=True, check=True).stdout.decode().split()[1]
    assert doc["signatures"][0]["keyid"] == listed == key.key.fingerprint
    pred = payload_of(doc)["predicate"]
    assert "publicKey" not in pred
    assert pred["sshPublicKey"] == " ".join(Path(f"{ed_key}.pub").read_text().split()[:2])
    assert pred["signer"] == "alice@laptop"
    back = load_signed(ss.envelope.to_json(), "line 1")
    assert back.signature_valid and back.id == ss.id
    assert back.statement.ssh_key == key.key and back.key_id == listed


def test_nix_key_statements_are_unchanged() -> None:
    key = generate_key("alice-1")
    ss = sign_statement(make_statement(SUBJECTS, "reviewed", key, when=1), key)
    pred = payload_of(envelope_doc(ss.envelope.to_json()))["predicate"]
    assert set(pred) == {"claim", "signer", "publicKey", "time"}
    assert ss.statement.ssh_key is None and len(ss.envelope.sig) == 64


def test_the_signature_is_ssh_keygen_verifiable_over_the_pae(ed_key: Path,
                                                           tmp_path: Path) -> None:
    key = SshSigningKey.load(ed_key)
    ss = sign_statement_ssh(make_ssh_statement(SUBJECTS, "built", key.key, key.name), ed_key)
    (tmp_path / "st.sig").write_text(sshsig.armor(ss.envelope.sig))
    (tmp_path / "signers").write_text(f"alice {key.key.to_text()}\n")
    message = pae(PAYLOAD_TYPE.encode(), ss.envelope.payload)
    ok = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "signers"),
                         "-I", "alice", "-n", "annofs", "-s", str(tmp_path / "st.sig")],
                        input=message, capture_output=True, check=False)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "signers"),
                          "-I", "alice", "-n", "annofs", "-s", str(tmp_path / "st.sig")],
                         input=message + b" ", capture_output=True, check=False)
    assert bad.returncode != 0


def test_a_fido_statement_carries_its_flags() -> None:
    token = SoftToken()
    st = make_ssh_statement(SUBJECTS, "reviewed", token.public, "yubi")
    message = pae(PAYLOAD_TYPE.encode(), st.payload())
    touched = ssh_signed(st, token.sshsig(message))
    assert touched.ssh_verified is not None and touched.ssh_verified.user_present
    untouched = load_signed(ssh_signed(st, token.sshsig(message, flags=0)).envelope.to_json(),
                            "x")
    assert untouched.signature_valid
    assert untouched.ssh_verified is not None and not untouched.ssh_verified.user_present


@pytest.mark.parametrize("change, message", [
    (lambda d, p: p["predicate"].update(publicKey=base64.b64encode(bytes(32)).decode()),
     "unknown field 'publicKey'"),
    (lambda d, p: p["predicate"].update(sshPublicKey=p["predicate"]["sshPublicKey"] + " c"),
     "sshPublicKey: expected 'TYPE BASE64'"),
    (lambda d, p: p["predicate"].update(sshPublicKey="ssh-rsa AAAAB3NzaC1yc2E="),
     "ssh-rsa keys are not supported"),
    (lambda d, p: d["signatures"][0].update(keyid="alice@laptop"),
     "is not the fingerprint of the payload's sshPublicKey"),
])
def test_malformed_ssh_statements_are_one_line_errors(ed_key: Path, change, message) -> None:
    key = SshSigningKey.load(ed_key)
    ss = sign_statement_ssh(make_ssh_statement(SUBJECTS, "reviewed", key.key, key.name),
                            ed_key)
    doc = envelope_doc(ss.envelope.to_json())
    payload = payload_of(doc)
    change(doc, payload)
    with pytest.raises(UsageError, match=message) as e:
        load_signed(rewrap(doc, payload), "f:1")
    assert "\n" not in str(e.value) and str(e.value).startswith("f:1: ")


def test_a_signature_by_another_key_or_namespace_is_refused(ed_key: Path) -> None:
    key = SshSigningKey.load(ed_key)
    st = make_ssh_statement(SUBJECTS, "reviewed", key.key, key.name)
    message = pae(PAYLOAD_TYPE.encode(), st.payload())
    other = SoftToken()
    with pytest.raises(UsageError, match="does not verify"):
        ssh_signed(st, other.sshsig(message))
    git = sshsig.sign_with_ssh_keygen(ed_key, message, namespace="git")
    env = envelope_doc(sign_statement_ssh(st, ed_key).envelope.to_json())
    env["signatures"][0]["sig"] = base64.b64encode(sshsig.dearmor(git)).decode()
    with pytest.raises(UsageError, match="namespace 'git', not 'annofs'"):
        load_signed(json.dumps(env), "f:1")


def test_a_git_statement_is_strict_and_never_read_from_a_file() -> None:
    from annofs.trust.statement import (
        GIT_PAYLOAD_TYPE,
        Envelope,
        GitSource,
        git_statement,
        open_envelope,
    )

    token = SoftToken()
    commit = "ab" * 20
    obj = (f"object {commit}\ntype commit\ntag v1.0\ntagger A <a@b> 1700000000 +0000\n\n"
           f"release\n").encode()
    source = GitSource("tag", obj, commit, "v1.0", "https://example.org/repo.git")
    ss = git_statement([Subject("README", bytes(32))], source, token.public,
                       token.sshsig(obj, namespace="git"), 1_700_000_000, "yubi")
    back = open_envelope(ss.envelope, "store")
    assert back.signature_valid and back.statement.git == source
    with pytest.raises(UsageError, match="a git signature is not imported from a file"):
        load_signed(ss.envelope.to_json(), "f:1")
    with pytest.raises(UsageError, match="does not verify"):  # namespace annofs, not git
        git_statement([Subject("README", bytes(32))], source, token.public,
                      token.sshsig(obj), 1_700_000_000, "yubi")
    payload = json.loads(ss.envelope.payload)
    payload["predicate"]["git"]["commit"] = "cd" * 20  # not the commit the tag names
    bad = Envelope(GIT_PAYLOAD_TYPE, json.dumps(payload).encode(), ss.envelope.keyid,
                   ss.envelope.sig)
    with pytest.raises(UsageError, match="the tag object does not name this commit and tag"):
        open_envelope(bad, "store")
