"""SSH keys in the trust layer, on a real store: statements signed through the real
ssh-keygen and ssh-agent, FIDO ones by a software token, judged by a policy whose
trusted SSH keys are an OpenSSH allowed_signers file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import nacl.signing
import pytest
from ssh_helpers import make_key, public_line, ssh_agent, token_statement
from t1_trust_sshsig import SoftToken
from t2_trust import P, current, sign, verdict
from t2_trust import vol as vol  # the fixture: /src/proj imported

from annofs.errors import UsageError
from annofs.trust.annotations import AnnotationStore
from annofs.trust.keys import generate_key
from annofs.trust.policy import Policy, load_policy
from annofs.trust.signing import SshSigningKey, collect_files, sign_files
from annofs.trust.sshsig import FLAG_USER_PRESENT, FLAG_USER_VERIFIED
from annofs.trust.statement import SignedStatement, Subject
from annofs.volume import Volume

ONE = """
[[rules]]
path = "/src/**"
signers = 1
"""
TOUCH = """
[[rules]]
path = "/src/**"
signers = 1
user-presence = true
"""


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir()
    make_key(d, "alice", "alice@laptop")
    make_key(d, "mallory", "alice@laptop")  # claims alice's name
    return d


def policy(tmp_path: Path, signers: str, body: str = ONE, extra: str = "") -> Policy:
    (tmp_path / "allowed_signers").write_text(signers)
    f = tmp_path / "policy.toml"
    f.write_text(f'trusted-ssh-signers = "allowed_signers"\n{extra}\n{body}')
    return load_policy(f)


def ssh_sign(vol: Volume, key_file: Path, *paths: str, when: int | None = None) -> None:
    files = collect_files(vol, [P(p) for p in paths], unique_names=True)
    sign_files(vol, files, SshSigningKey.load(key_file), "reviewed", when=when)


def store(vol: Volume, ss: SignedStatement) -> None:
    with vol.store.write() as txn:
        AnnotationStore(vol.store).add(txn, ss)


def subjects(vol: Volume, path: str) -> list[Subject]:
    return [f.subject for f in collect_files(vol, [P(path)])]


@pytest.fixture
def agent(tmp_path: Path, keys: Path) -> Iterator[Path]:
    """alice's key in a real ssh-agent, her private key file gone: only the .pub left."""
    with ssh_agent(tmp_path, keys / "alice"):
        (keys / "alice").unlink()
        yield keys / "alice.pub"


def test_signed_through_ssh_agent_is_allowed(vol: Volume, tmp_path: Path, keys: Path,
                                             agent: Path) -> None:
    pol = policy(tmp_path, f"alice@example.org {public_line(keys / 'alice')}\n")
    assert verdict(vol, pol, "/src/proj/a.c").status == "refused"
    ssh_sign(vol, agent, "/src/proj")
    v = verdict(vol, pol, "/src/proj/a.c")
    assert v.status == "allowed" and v.signers == ("alice@example.org",)


def test_an_untrusted_key_is_refused_and_shown_by_fingerprint(vol: Volume, tmp_path: Path,
                                                               keys: Path) -> None:
    pol = policy(tmp_path, f"alice@example.org {public_line(keys / 'alice')}\n")
    ssh_sign(vol, keys / "mallory", "/src/proj")
    v = verdict(vol, pol, "/src/proj/a.c")
    fp = SshSigningKey.load(keys / "mallory").key.fingerprint
    assert v.status == "refused"
    assert v.ignored == (f"untrusted key {fp} (claims 'alice@laptop')",)


def test_a_nix_statement_by_an_ssh_listed_key_is_not_trusted(vol: Volume,
                                                             tmp_path: Path) -> None:
    # The allowed_signers line trusts the key for SSH signatures (its namespaces, its
    # dates): the same Ed25519 key signing in Nix format gets none of it.
    nix = generate_key("alice-1")
    token = SoftToken()
    token.sk = nacl.signing.SigningKey(nix.seed)
    pol = policy(tmp_path, f'alice namespaces="git" {token.public.to_text()}\n')
    sign(vol, nix, "/src/proj")
    assert verdict(vol, pol, "/src/proj/a.c").status == "refused"


def test_an_expired_valid_before_is_refused(vol: Volume, tmp_path: Path, keys: Path) -> None:
    line = public_line(keys / "alice")
    ssh_sign(vol, keys / "alice", "/src/proj")
    expired = policy(tmp_path, f'alice valid-before="20200101Z" {line}\n')
    v = verdict(vol, expired, "/src/proj/a.c")
    assert v.status == "refused"
    assert "key not valid at the statement's time" in v.reason
    later = policy(tmp_path, f'alice valid-after="20991231Z" {line}\n')
    assert verdict(vol, later, "/src/proj/a.c").status == "refused"
    ok = policy(tmp_path, f'alice valid-after="20200101Z",valid-before="20991231Z" {line}\n')
    assert verdict(vol, ok, "/src/proj/a.c").status == "allowed"


def test_a_backdated_statement_by_an_expired_key_is_refused(vol: Volume, tmp_path: Path,
                                                            keys: Path) -> None:
    # The statement claims 2021, inside the key's validity; the key expired in 2022.
    ssh_sign(vol, keys / "alice", "/src/proj", when=1_620_000_000)
    pol = policy(tmp_path, f'alice valid-before="20220101Z" {public_line(keys / "alice")}\n')
    v = verdict(vol, pol, "/src/proj/a.c")
    assert v.status == "refused" and "key not valid at now" in v.reason


def test_validity_ending_changes_a_cached_verdict(vol: Volume, tmp_path: Path,
                                                  keys: Path) -> None:
    from annofs.trust.gate import TrustGate
    soon = time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + 2))
    ssh_sign(vol, keys / "alice", "/src/proj")
    pol = policy(tmp_path, f'alice valid-before="{soon}" {public_line(keys / "alice")}\n')
    gate = TrustGate(vol, pol)
    v = current(vol, "/src/proj/a.c")
    assert gate.verdict(P("/src/proj/a.c"), v).status == "allowed"
    time.sleep(3)
    assert gate.verdict(P("/src/proj/a.c"), v).status == "refused"


def test_user_presence_rule(vol: Volume, tmp_path: Path, keys: Path) -> None:
    token = SoftToken()
    ed = public_line(keys / "alice")
    signers = f"yubi@example.org {token.public.to_text()}\nalice {ed}\n"
    untouched = token_statement(token, subjects(vol, "/src/proj/a.c"), flags=0)
    store(vol, untouched)
    v = verdict(vol, policy(tmp_path, signers, TOUCH), "/src/proj/a.c")
    assert v.status == "refused"
    assert "yubi@example.org: the FIDO token did not assert user presence" in v.reason
    assert verdict(vol, policy(tmp_path, signers, ONE), "/src/proj/a.c").status == "allowed"
    # A plain ssh-ed25519 key has no token to ask: it does not count under the rule.
    ssh_sign(vol, keys / "alice", "/src/proj/b.c")
    v = verdict(vol, policy(tmp_path, signers, TOUCH), "/src/proj/b.c")
    assert v.status == "refused" and "alice: not signed on a FIDO token" in v.reason
    # With the touch, it counts; user-verification asks for the PIN flag as well.
    store(vol, token_statement(token, subjects(vol, "/src/proj/sub")))
    assert verdict(vol, policy(tmp_path, signers, TOUCH), "/src/proj/sub/c.c").status \
        == "allowed"
    pin = TOUCH + "user-verification = true\n"
    assert verdict(vol, policy(tmp_path, signers, pin), "/src/proj/sub/c.c").status \
        == "refused"
    store(vol, token_statement(token, subjects(vol, "/src/proj/big.bin"),
                               flags=FLAG_USER_PRESENT | FLAG_USER_VERIFIED))
    assert verdict(vol, policy(tmp_path, signers, pin), "/src/proj/big.bin").status \
        == "allowed"


def test_a_namespace_restricted_line_does_not_count(vol: Volume, tmp_path: Path,
                                                    keys: Path) -> None:
    ssh_sign(vol, keys / "alice", "/src/proj")
    line = public_line(keys / "alice")
    v = verdict(vol, policy(tmp_path, f'alice namespaces="git" {line}\n'), "/src/proj/a.c")
    assert v.status == "refused" and "does not allow 'annofs'" in v.reason
    ok = policy(tmp_path, f'alice namespaces="git,annofs" {line}\n')
    assert verdict(vol, ok, "/src/proj/a.c").status == "allowed"


def test_signers_are_distinct_by_key(vol: Volume, tmp_path: Path, keys: Path) -> None:
    two = ONE.replace("signers = 1", "signers = 2")
    line = public_line(keys / "alice")
    pol = policy(tmp_path, f"alice {line}\nalice2 {line}\n", two)
    ssh_sign(vol, keys / "alice", "/src/proj")
    ssh_sign(vol, keys / "alice", "/src/proj/a.c")
    v = verdict(vol, pol, "/src/proj/a.c")
    assert v.status == "refused" and v.signers == ("alice",)


@pytest.mark.parametrize("how", ["alice@example.org", "fingerprint"])
def test_revoked_by_principal_or_fingerprint(vol: Volume, tmp_path: Path, keys: Path,
                                             how: str) -> None:
    fp = SshSigningKey.load(keys / "alice").key.fingerprint
    name = fp if how == "fingerprint" else how
    ssh_sign(vol, keys / "alice", "/src/proj")
    pol = policy(tmp_path, f"alice@example.org {public_line(keys / 'alice')}\n",
                 extra=f'revoked-keys = ["{name}"]')
    v = verdict(vol, pol, "/src/proj/a.c")
    assert v.status == "refused" and "alice@example.org: key revoked" in v.reason


def test_policy_errors_name_the_allowed_signers_line(tmp_path: Path, keys: Path) -> None:
    with pytest.raises(UsageError) as e:
        policy(tmp_path, f"# team\nalice {public_line(keys / 'alice')}\nbob ssh-ed25519 !!\n")
    assert str(e.value) == f"{tmp_path}/allowed_signers:3: the key is not base64"
    with pytest.raises(UsageError, match=r"allowed_signers:1: .*ssh-rsa keys are not "
                                         r"supported"):
        policy(tmp_path, "carol ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ==\n")
    with pytest.raises(UsageError, match=r"policy.toml:2: revoked-keys\[0\]: 'SHA256:x' is "
                                         r"the fingerprint of no key"):
        policy(tmp_path, f"alice {public_line(keys / 'alice')}\n",
               extra='revoked-keys = ["SHA256:x"]')
