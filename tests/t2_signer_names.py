"""A key's name in a statement is a claim (issue 15.5): only a key the policy trusts is
shown by a name, the policy's; any other is "untrusted key <base64> (claims 'NAME')",
the same everywhere: verdict reasons (the daemon log, events), explanations (`why`,
`user.annofs.why`, the refusal's log line) and the dashboard's coverage."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from t2_trust import ALICE, ALICE_ALIAS, FAKE_ALICE, P, policy, sign, write

from annofs.dashboard.coverage import CoverageReader
from annofs.explain.report import explain, summary_line
from annofs.transfer.import_tree import TreeImporter
from annofs.trust.gate import TrustGate
from annofs.trust.keys import key_fingerprint
from annofs.trust.policy import signer_name
from annofs.volume import Volume

RULES = '[[rules]]\npath = "/src/**"\nsigners = 1\n'
FAKE = f"untrusted key {base64.b64encode(FAKE_ALICE.public).decode()} (claims 'alice-1')"


@pytest.fixture
def vol(vol: Volume, tmp_path: Path) -> Iterator[Volume]:
    """/src/a.c signed by a key that calls itself alice-1 but is not the trusted alice-1;
    /src/b.c signed by the trusted key under another name (alice-2)."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "a.c").write_bytes(b"int a;\n" * 2000)
    (host / "b.c").write_bytes(b"int b;\n")
    TreeImporter(vol).run(host, [b"src"])
    sign(vol, FAKE_ALICE, "/src/a.c")
    sign(vol, ALICE_ALIAS, "/src/b.c")
    return vol


def test_one_format_for_a_key_nobody_trusts() -> None:
    pol = policy(RULES, ALICE)
    assert key_fingerprint(FAKE_ALICE.public) == base64.b64encode(FAKE_ALICE.public).decode()
    assert signer_name(pol, FAKE_ALICE.public, "alice-1") == FAKE
    assert signer_name(None, FAKE_ALICE.public, "alice-1") == FAKE
    assert signer_name(pol, ALICE.public, "anything") == "alice-1"
    # A claimed name cannot forge a line or a quote.
    assert signer_name(pol, FAKE_ALICE.public, "a\nb'") .endswith("(claims \"a\\nb'\")")
    bad = signer_name(pol, ALICE.public, "alice-1", valid=False)
    assert bad.startswith("bad signature by key ") and "alice-1'" in bad


def test_verdict_reasons_name_the_key_not_the_claim(vol: Volume) -> None:
    gate = TrustGate(vol, policy(RULES, ALICE))
    with vol.store.read() as txn:
        v = vol.versions.get(txn, int(vol.namespace.resolve(txn, P("/src/a.c")).target))
    verdict = gate.verdict(P("/src/a.c"), v)
    assert not verdict.allowed
    assert FAKE in verdict.ignored
    assert "alice-1:" not in verdict.reason.replace(FAKE, "")


def test_explanations_show_the_key_not_the_claim(vol: Volume) -> None:
    write(vol, P("/src/a.c"), b"int a;\n" * 1999 + b"int evil;\n")
    gate = TrustGate(vol, policy(RULES, ALICE))
    with vol.store.read() as txn:
        v = vol.versions.get(txn, int(vol.namespace.resolve(txn, P("/src/a.c")).target))
    e = explain(vol, gate.annotations, gate.policy, P("/src/a.c"), v)
    assert e.original is not None
    assert [s.signer for s in e.original.signatures] == [FAKE]
    assert f"signed by {FAKE} (not trusted)" in e.to_text()
    assert f"signed by {FAKE} as" in summary_line(e)  # the daemon log's line
    assert "signed by alice-1" not in e.to_text() + summary_line(e)


def test_coverage_shows_the_key_not_the_claim(vol: Volume) -> None:
    gate = TrustGate(vol, policy(RULES, ALICE))
    reader = CoverageReader(vol, gate.annotations, gate)
    t = reader.coverage(P("/src"))["total"]
    assert dict(t["keys"]) == {FAKE: 1, "alice-1": 1}
    files = {f["name"]: f for f in reader.coverage(P("/src"))["files"]}
    assert files["a.c"]["signers"] == [FAKE]
    assert files["b.c"]["signers"] == ["alice-1"]  # the trusted key, by the policy's name
    a = reader.file(P("/src/a.c"))
    assert [(s["signer"], s["trusted"]) for s in a["signatures"]] == [(FAKE, False)]
