"""The trust layer on a real store: signing trees, verdicts, statements following content.

Every test ends with the store's consistency check (as t2_store does): the trust
databases must not disturb what fsck checks.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import random
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from t2_store import check_consistency

from annofs.content.ingest import ingest_stream
from annofs.errors import CorruptionError, NotFoundError, UsageError
from annofs.namespace.tree import new_file_attrs
from annofs.store.records import Version
from annofs.transfer.import_tree import TreeImporter
from annofs.trust.annotations import AnnotationStore
from annofs.trust.gate import TrustGate
from annofs.trust.keys import SecretKey, generate_key
from annofs.trust.policy import Mode, Policy, parse_policy
from annofs.trust.signing import collect_files, sign_files
from annofs.trust.statement import (
    Subject,
    load_signed,
    make_statement,
    sign_statement,
    symlink_digest,
)
from annofs.trust.symlink import symlink_content
from annofs.trust.verdict import Verdict
from annofs.volume import Volume

ALICE = generate_key("alice-1")
BOB = generate_key("bob-1")
MALLORY = generate_key("mallory-1")
ALICE_ALIAS = SecretKey("alice-2", ALICE.seed, ALICE.public)  # one key, a second name
FAKE_ALICE = generate_key("alice-1")  # the name, not the key

BIG = random.Random(7).randbytes(200_000)


@pytest.fixture
def vol(vol: Volume, tmp_path: Path) -> Iterator[Volume]:
    """A store with /src/proj imported (a.c, b.c, sub/c.c, big.bin) and /other/."""
    src = tmp_path / "host" / "proj"
    (src / "sub").mkdir(parents=True)
    (src / "a.c").write_bytes(b"int a;\n")
    (src / "b.c").write_bytes(b"int b;\n")
    (src / "sub" / "c.c").write_bytes(b"int c;\n")
    (src / "big.bin").write_bytes(BIG)
    (tmp_path / "host" / "other").mkdir()
    (tmp_path / "host" / "other" / "x").write_bytes(b"other\n")
    TreeImporter(vol).run(tmp_path / "host", [b"src"])
    yield vol
    check_consistency(vol)


def P(path: str) -> list[bytes]:
    return [p.encode() for p in path.strip("/").split("/") if p]


def policy(body: str, *keys: SecretKey, extra: str = "") -> Policy:
    trusted = ", ".join(f'"{k.public_key().to_text()}"' for k in keys)
    return parse_policy(f"trusted-public-keys = [{trusted}]\n{extra}\n{body}",
                        Path("policy.toml"))


TWO_PARTY = """
[[rules]]
path = "/src/proj/**"
signers = 2
"""
ONE = """
[[rules]]
path = "/src/**"
signers = 1
"""


def sign(vol: Volume, key: SecretKey, *paths: str, claim: str = "reviewed",
         label: str | None = None, when: int | None = None) -> None:
    files = collect_files(vol, [P(p) for p in paths], unique_names=True)
    sign_files(vol, files, key, claim, label=label, when=when)


def current(vol: Volume, path: str) -> Version:
    with vol.store.read() as txn:
        return vol.versions.get(txn, int(vol.namespace.resolve(txn, P(path)).target))


def digest(v: Version) -> bytes:
    assert v.digest is not None
    return v.digest


def verdict(vol: Volume, pol: Policy, path: str) -> Verdict:
    return TrustGate(vol, pol).verdict(P(path), current(vol, path))


def status(vol: Volume, pol: Policy, path: str) -> str:
    return verdict(vol, pol, path).status


def write(vol: Volume, path: Sequence[bytes], data: bytes) -> Version:
    """Replace a file's content with a new version (what a close after a write does)."""
    got = ingest_stream(vol.store, vol.fragments, io.BytesIO(data), vol.params)
    with vol.store.write() as txn:
        dir_id = vol.namespace.writable_dir(txn, path[:-1])
        old = vol.namespace.get(txn, dir_id, path[-1])
        assert old is not None
        v = vol.versions.create(txn, int(old.target), got.hashes, got.lengths, got.digest)
        vol.namespace.set_attrs(txn, dir_id, path[-1],
                                lambda a: dataclasses.replace(a, target=v.id, size=v.size))
    return v


def rename(vol: Volume, src: str, dst: str) -> None:
    s, d = P(src), P(dst)
    with vol.store.write() as txn:
        raw = vol.namespace.detach(txn, vol.namespace.writable_dir(txn, s[:-1]), s[-1])
        vol.namespace.attach(txn, vol.namespace.writable_dir(txn, d[:-1]), d[-1], raw)


# -- signing a tree -------------------------------------------------------------------------


def test_subject_names_are_relative_to_the_arguments_parent(vol: Volume) -> None:
    files = collect_files(vol, [P("/src/proj"), P("/src/other/x")])
    assert [f.name for f in files] == ["proj/a.c", "proj/b.c", "proj/big.bin", "proj/sub/c.c",
                                       "x"]
    assert [f.text for f in files][-1] == "/src/other/x"
    assert all(f.version.digest is not None for f in files)


def test_collect_errors(vol: Volume) -> None:
    with pytest.raises(NotFoundError, match=r"^/src/nope: no such file or directory$"):
        collect_files(vol, [P("/src/nope")])
    with pytest.raises(UsageError, match="both would be subject 'x'"):
        with vol.store.write() as txn:
            vol.namespace.copy(txn, P("/src/other"), P("/src/other2"))
        collect_files(vol, [P("/src/other/x"), P("/src/other2/x")], unique_names=True)
    with pytest.raises(UsageError, match="nothing to sign"):
        sign_files(vol, [], ALICE, "reviewed")


def test_collect_takes_each_file_once(vol: Volume) -> None:
    files = collect_files(vol, [P("/src/proj/sub"), P("/src/proj/sub/c.c")])
    assert [f.name for f in files] == ["sub/c.c"]


def test_signed_tree_is_allowed(vol: Volume) -> None:
    pol = policy(ONE, ALICE)
    assert status(vol, pol, "/src/proj/a.c") == "refused"
    sign(vol, ALICE, "/src/proj")
    for path in ("/src/proj/a.c", "/src/proj/b.c", "/src/proj/sub/c.c", "/src/proj/big.bin"):
        v = verdict(vol, pol, path)
        assert v.allowed and v.satisfied and v.signers == ("alice-1",), path
        assert v.claims == ("reviewed",)
        assert v.reason == "rules[0] /src/**: signed by alice-1 (1 of 1 needed)"
    v = verdict(vol, pol, "/src/other/x")  # not in the signed tree
    assert not v.allowed
    assert v.reason == "rules[0] /src/**: needs 1 distinct trusted signer, has 0"


def test_patched_file_is_refused_siblings_stay_allowed(vol: Volume) -> None:
    pol = policy(ONE, ALICE)
    sign(vol, ALICE, "/src/proj")
    write(vol, P("/src/proj/b.c"), b"int b; /* patched */\n")
    assert status(vol, pol, "/src/proj/b.c") == "refused"
    assert status(vol, pol, "/src/proj/a.c") == "allowed"
    assert status(vol, pol, "/src/proj/sub/c.c") == "allowed"
    write(vol, P("/src/proj/b.c"), b"int b;\n")  # back to the signed content
    assert status(vol, pol, "/src/proj/b.c") == "allowed"


def test_two_party_rule_needs_two_distinct_keys(vol: Volume) -> None:
    # The policy trusts ALICE's key under two names: it is still one signer.
    pol = policy(TWO_PARTY, ALICE, ALICE_ALIAS, BOB)
    assert dict(pol.trusted)[ALICE.public] == ("alice-1", "alice-2")
    sign(vol, ALICE, "/src/proj")
    assert status(vol, pol, "/src/proj/a.c") == "refused"
    sign(vol, ALICE, "/src/proj", claim="built")  # the same key signing again
    sign(vol, ALICE_ALIAS, "/src/proj")  # the same key under its other name
    sign(vol, FAKE_ALICE, "/src/proj")  # another key calling itself alice-1
    v = verdict(vol, pol, "/src/proj/a.c")
    assert not v.allowed and v.signers == ("alice-1",)
    assert v.missing == "needs 2 distinct trusted signers, has 1 (alice-1)"
    key = base64.b64encode(FAKE_ALICE.public).decode()
    assert f"untrusted key {key} (claims 'alice-1')" in v.ignored
    sign(vol, BOB, "/src/proj/sub")
    assert status(vol, pol, "/src/proj/a.c") == "refused"  # bob signed only sub/
    v = verdict(vol, pol, "/src/proj/sub/c.c")
    assert v.allowed and v.signers == ("alice-1", "bob-1")
    assert v.reason == "rules[0] /src/proj/**: signed by alice-1, bob-1 (2 of 2 needed)"


def test_claims_and_key_subsets(vol: Volume) -> None:
    pol = policy("""
[[rules]]
path = "/src/proj/sub/**"
signers = 1
keys = ["bob-1"]
[[rules]]
path = "/src/**"
signers = 1
claims = ["built", "reproduced"]
""", ALICE, BOB)
    sign(vol, ALICE, "/src/proj")  # claim reviewed
    v = verdict(vol, pol, "/src/proj/a.c")
    assert not v.allowed and v.claims == ("reviewed",)
    assert v.reason == ("rules[1] /src/**: needs 1 distinct trusted signer, has 0; accepted "
                        "claims: built, reproduced; not counted: alice-1: claim 'reviewed' "
                        "not accepted here")
    sign(vol, ALICE, "/src/proj", claim="built")
    assert status(vol, pol, "/src/proj/a.c") == "allowed"
    v = verdict(vol, pol, "/src/proj/sub/c.c")
    assert not v.allowed and "alice-1: not one of this rule's keys" in v.ignored
    sign(vol, BOB, "/src/proj/sub", claim="my-own-word")
    assert status(vol, pol, "/src/proj/sub/c.c") == "allowed"


def test_revoked_key_no_longer_counts(vol: Volume) -> None:
    sign(vol, ALICE, "/src/proj")
    assert status(vol, policy(ONE, ALICE), "/src/proj/a.c") == "allowed"
    by_name = policy(ONE, ALICE, extra='revoked-keys = ["alice-1"]')
    v = verdict(vol, by_name, "/src/proj/a.c")
    assert not v.allowed and v.ignored == ("alice-1: key revoked",)
    by_key = policy(ONE, ALICE, extra=f'revoked-keys = ["{ALICE.public_key().to_text()}"]')
    assert status(vol, by_key, "/src/proj/a.c") == "refused"


def test_malicious_label_refuses_a_signed_file(vol: Volume) -> None:
    pol = policy(ONE + '\n[[rules]]\npath = "/**"\nsigners = 0\n', ALICE, BOB)
    sign(vol, ALICE, "/src/proj")
    sign(vol, MALLORY, "/src/proj/a.c", label="malicious")  # untrusted: ignored
    assert status(vol, pol, "/src/proj/a.c") == "allowed"
    sign(vol, BOB, "/src/proj/a.c", label="malicious")
    v = verdict(vol, pol, "/src/proj/a.c")
    assert not v.allowed and v.malicious == ("bob-1",)
    assert v.labels == ("malicious by bob-1",)
    assert v.missing == "labelled malicious by bob-1"
    assert status(vol, pol, "/src/proj/b.c") == "allowed"
    # Another label is a note, not a refusal; a label never counts as a signature.
    sign(vol, BOB, "/src/proj/b.c", label="deprecated")
    v = verdict(vol, pol, "/src/proj/b.c")
    assert v.allowed and v.signers == ("alice-1",) and v.labels == ("deprecated by bob-1",)
    # Where no signature is needed, a malicious label still refuses.
    write(vol, P("/src/other/x"), b"evil\n")
    assert status(vol, pol, "/src/other/x") == "refused"
    sign(vol, ALICE, "/src/other/x", label="malicious")
    outside = policy("", ALICE)  # default allow, no rules
    assert status(vol, outside, "/src/other/x") == "refused"


def test_warn_and_off_modes(vol: Volume) -> None:
    warn = policy(ONE, ALICE, extra='mode = "warn"')
    off = policy(ONE, ALICE, extra='mode = "off"')
    v = verdict(vol, warn, "/src/proj/a.c")
    assert v.allowed and not v.satisfied and v.flagged and v.status == "warn"
    assert v.mode is Mode.WARN
    assert v.reason.startswith("would be refused (mode warn): rules[0] /src/**: needs 1")
    v = verdict(vol, off, "/src/proj/a.c")
    assert v.allowed and v.status == "off" and v.reason.startswith("policy mode off (")
    assert not TrustGate(vol, off).enforcing and TrustGate(vol, warn).enforcing
    sign(vol, ALICE, "/src/proj")
    v = verdict(vol, warn, "/src/proj/a.c")
    assert v.allowed and v.satisfied and not v.flagged and v.status == "allowed"


def test_default_require_and_allow(vol: Volume) -> None:
    req = policy("", ALICE, extra='default = "require"')
    v = verdict(vol, req, "/src/proj/a.c")
    assert not v.allowed and v.rule == "default require" and v.rule_index is None
    assert v.reason == "default require: needs 1 distinct trusted signer, has 0"
    sign(vol, ALICE, "/src/proj/a.c")
    assert status(vol, req, "/src/proj/a.c") == "allowed"
    v = verdict(vol, policy("", ALICE), "/src/proj/b.c")
    assert v.allowed and v.reason == "default allow: no rule matches; unsigned files allowed"


# -- statements follow content -----------------------------------------------------------------


def test_statements_follow_content_through_rename_and_copy(vol: Volume) -> None:
    pol = policy(ONE, ALICE, extra='default = "require"')
    sign(vol, ALICE, "/src/proj")
    rename(vol, "/src/proj/a.c", "/src/proj/sub/renamed.c")
    assert status(vol, pol, "/src/proj/sub/renamed.c") == "allowed"
    with vol.store.write() as txn:
        vol.namespace.copy(txn, P("/src/proj"), P("/src/copy"))
        vol.namespace.copy(txn, P("/src/proj/b.c"), P("/b-copy.c"))
    assert status(vol, pol, "/src/copy/sub/renamed.c") == "allowed"
    assert status(vol, pol, "/src/copy/big.bin") == "allowed"
    assert status(vol, pol, "/b-copy.c") == "allowed"  # the default rule, still signed
    # A change to the copy does not touch the original's verdict, and vice versa.
    write(vol, P("/src/copy/b.c"), b"changed in the copy\n")
    assert status(vol, pol, "/src/copy/b.c") == "refused"
    assert status(vol, pol, "/src/proj/b.c") == "allowed"


def test_statement_imported_before_its_content(vol: Volume, tmp_path: Path) -> None:
    import blake3

    data = b"arrives later\n"
    ss = sign_statement(make_statement([("later.txt", blake3.blake3(data).digest())],
                                       "built", ALICE), ALICE)
    ann = AnnotationStore(vol.store)
    with vol.store.write() as txn:
        assert ann.add(txn, ss)
        assert not ann.add(txn, ss)  # idempotent
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "later.txt").write_bytes(data)
    TreeImporter(vol).run(tmp_path / "late", [b"late"])
    assert status(vol, policy(ONE.replace("/src/**", "/late/**"), ALICE),
                  "/late/later.txt") == "allowed"


def test_fragments_of_signed_content_are_indexed(vol: Volume) -> None:
    sign(vol, ALICE, "/src/proj/big.bin")
    signed = current(vol, "/src/proj/big.bin")
    assert signed.count > 3
    patched = write(vol, P("/src/proj/big.bin"), BIG[:100_000] + b"PATCH" + BIG[100_005:])
    ann = AnnotationStore(vol.store)
    with vol.store.read() as txn:
        assert ann.is_signed(txn, digest(signed))
        assert not ann.is_signed(txn, digest(patched))
        shared = [patched.fragment_hash(i) for i in range(patched.count)
                  if ann.signed_digests_with_fragment(txn, patched.fragment_hash(i))]
        assert shared and len(shared) < patched.count
        for h in shared:
            assert ann.signed_digests_with_fragment(txn, h) == [digest(signed)]
            assert ann.is_signed_fragment(txn, h)


# -- the store side: generation, cache, damage ------------------------------------------------


def test_generation_and_cache(vol: Volume) -> None:
    pol = policy(ONE, ALICE)
    gate = TrustGate(vol, pol)
    ann = gate.annotations
    with vol.store.read() as txn:
        assert ann.generation(txn) == 0
    v = current(vol, "/src/proj/a.c")
    first = gate.verdict(P("/src/proj/a.c"), v)
    assert gate.verdict(P("/src/proj/a.c"), v) is first  # cached
    assert not first.allowed
    sign(vol, ALICE, "/src/proj/a.c")
    with vol.store.read() as txn:
        assert ann.generation(txn) == 1
    assert gate.verdict(P("/src/proj/a.c"), v).allowed  # the new generation is seen
    # The same version under another rule is decided again, not served from the cache.
    other = policy(ONE + '\n[[rules]]\npath = "/x/**"\nsigners = 3\n', ALICE)
    gate.set_policy(other)
    assert gate.verdict(P("/src/proj/a.c"), v).allowed
    assert not gate.verdict(P("/x/a.c"), v).allowed
    # Removing the statement bumps the generation and the verdict follows.
    with vol.store.write() as txn:
        (sid,) = ann.ids_for_digest(txn, digest(v))
        assert ann.remove(txn, sid)
        assert not ann.remove(txn, sid)
        assert ann.generation(txn) == 2
    assert not gate.verdict(P("/src/proj/a.c"), v).allowed


def test_caches_follow_statements_policy_and_rule(vol: Volume) -> None:
    """The gate caches by content digest and by covering statements: a statement stored
    by another process, a reload, or another rule must still change the verdict."""
    gate = TrustGate(vol, policy(ONE + '\n[[rules]]\npath = "/x/**"\nsigners = 2\n', ALICE))
    a, b = current(vol, "/src/proj/a.c"), current(vol, "/src/proj/b.c")
    assert not gate.verdict(P("/src/proj/a.c"), a).allowed
    # Signed through another AnnotationStore (as another process would): seen at once.
    sign_files(vol, collect_files(vol, [P("/src/proj")]), ALICE, "reviewed",
               annotations=AnnotationStore(vol.store))
    first = gate.verdict(P("/src/proj/a.c"), a)
    assert first.allowed
    # b.c is covered by the same one statement: the same decision, made once.
    assert gate.verdict(P("/src/proj/b.c"), b) is first
    # The same content under another rule is decided under that rule.
    assert not gate.verdict(P("/x/a.c"), a).allowed
    # In the caller's transaction: the same answers (and a deferred digest is refused).
    with vol.store.read() as txn:
        assert gate.verdict(P("/src/proj/a.c"), a, txn) is first
        with pytest.raises(ValueError):
            gate.verdict(P("/src/proj/a.c"), dataclasses.replace(a, digest=None), txn)
    # A reload asking for two signers refuses what one statement covers.
    gate.set_policy(policy(TWO_PARTY, ALICE, BOB))
    assert not gate.verdict(P("/src/proj/a.c"), a).allowed
    assert not gate.verdict(P("/src/proj/b.c"), b).allowed
    sign(vol, BOB, "/src/proj/b.c")
    assert not gate.verdict(P("/src/proj/a.c"), a).allowed
    assert gate.verdict(P("/src/proj/b.c"), b).allowed
    # A revocation is a reload too: the statement-keyed verdicts are not reused.
    gate.set_policy(policy(TWO_PARTY, ALICE, BOB, extra='revoked-keys = ["bob-1"]'))
    assert not gate.verdict(P("/src/proj/b.c"), b).allowed


def test_rule_memo_is_per_policy(vol: Volume) -> None:
    pol = policy(ONE + '\n[[rules]]\npath = "/src/proj/*.c"\nsigners = 3\n', ALICE)
    assert pol.rule_at(P("/src/proj/a.c")) is pol.rules[0]
    assert pol.rule_at(P("/src/proj/a.c")) is pol.rules[0]  # remembered
    assert pol.rule_at(P("/other/x")) is None
    assert pol.rule_at([b"src", b"\xff.c"]) is pol.rule_for("/src/\udcff.c")
    other = policy('[[rules]]\npath = "/src/proj/*.c"\nsigners = 3\n', ALICE)
    assert other.rule_at(P("/src/proj/a.c")) is other.rules[0]  # a new policy, a new memo
    assert other.rule_at(P("/src/x")) is None


def test_deferred_digest_is_computed(vol: Volume) -> None:
    got = ingest_stream(vol.store, vol.fragments, io.BytesIO(b"no digest yet\n"), vol.params)
    with vol.store.write() as txn:
        v = vol.versions.create(txn, 0, got.hashes, got.lengths, None)
    assert v.digest is None
    verdict_ = TrustGate(vol, policy(ONE, ALICE)).verdict(P("/src/new"), v)
    assert not verdict_.allowed
    assert current_digest(vol, v.id) == got.digest


def current_digest(vol: Volume, vid: int) -> bytes | None:
    with vol.store.read() as txn:
        return vol.versions.get(txn, vid).digest


def test_bad_signature_is_not_stored(vol: Volume) -> None:
    ss = sign_statement(make_statement([("a", bytes(32))], "reviewed", ALICE), ALICE)
    forged = dataclasses.replace(ss, envelope=dataclasses.replace(ss.envelope, sig=bytes(64)))
    with vol.store.write() as txn, pytest.raises(UsageError, match="does not verify"):
        AnnotationStore(vol.store).add(txn, forged)
    with vol.store.read() as txn:
        assert AnnotationStore(vol.store).count(txn) == 0


def test_damaged_statement_record_is_corruption(vol: Volume) -> None:
    sign(vol, ALICE, "/src/proj/a.c")
    ann = AnnotationStore(vol.store)
    with vol.store.write() as txn:
        (sid,) = list(ann.iter_ids(txn))
        other = sign_statement(make_statement([("z", bytes(32))], "reviewed", ALICE), ALICE)
        from annofs.trust.annotations import encode_statement

        txn.put(sid, encode_statement(other), db=vol.store.db["statements"])
        txn.put(b"\x01" * 32, b"\x93garbage", db=vol.store.db["statements"])
    fresh = AnnotationStore(vol.store)  # no parsed copies cached
    with vol.store.read() as txn:
        with pytest.raises(CorruptionError, match="not its own"):
            fresh.get(txn, sid)
        with pytest.raises(CorruptionError, match="record"):
            fresh.get(txn, b"\x01" * 32)
        summary = fresh.summary(txn, sid)
        assert summary.signer == "alice-1" and summary.subjects == 1


def test_index_entry_without_the_digest_is_ignored(vol: Volume) -> None:
    """A damaged index cannot make a statement cover content it does not list."""
    sign(vol, ALICE, "/src/proj/a.c")
    b = current(vol, "/src/proj/b.c")
    ann = AnnotationStore(vol.store)
    with vol.store.write() as txn:
        (sid,) = list(ann.iter_ids(txn))
        assert b.digest is not None
        txn.put(b.digest + sid, b"b.c", db=vol.store.db["signed_digests"])
    assert status(vol, policy(ONE, ALICE), "/src/proj/b.c") == "refused"


def test_listing(vol: Volume) -> None:
    sign(vol, ALICE, "/src/proj", when=2_000)
    sign(vol, BOB, "/src/proj/a.c", when=1_000)
    ann = AnnotationStore(vol.store)
    a = current(vol, "/src/proj/a.c")
    with vol.store.read() as txn:
        assert ann.count(txn) == 2
        assert [ss.statement.signer for ss in ann.all(txn)] == ["bob-1", "alice-1"]
        found = ann.for_digest(txn, digest(a))
        assert [ss.statement.signer for ss in found] == ["bob-1", "alice-1"]
        assert ann.names_for(txn, digest(a), found[1].id) == ["proj/a.c"]


def test_gc_keeps_the_signed_original(vol: Volume) -> None:
    """A signed original outlives its name (SPEC §4): gc keeps it while signed."""
    from annofs.maintenance.gc import collect

    sign(vol, ALICE, "/src/proj/big.bin")
    signed = current(vol, "/src/proj/big.bin")
    write(vol, P("/src/proj/big.bin"), BIG[:100_000] + b"PATCH" + BIG[100_005:])
    collect(vol, prune_history=True)
    with vol.store.read() as txn:
        kept = vol.versions.get(txn, signed.id)
        assert vol.versions.read(txn, kept, 0, kept.size) == BIG
        ann = AnnotationStore(vol.store)
        (sid,) = ann.ids_for_digest(txn, digest(signed))
    with vol.store.write() as txn:
        ann.remove(txn, sid)
    collect(vol, prune_history=True)
    with vol.store.read() as txn:
        assert not vol.versions.exists(txn, signed.id)


# -- symlinks are content (SPEC §4: statements cover the tree) ------------------------------------


def put_symlink(vol: Volume, path: str, target: bytes) -> None:
    """Make `path` a symlink to `target`, replacing what is there (as rm + ln -s does)."""
    p = P(path)
    with vol.store.write() as txn:
        dir_id = vol.namespace.writable_dir(txn, p[:-1])
        if vol.namespace.get(txn, dir_id, p[-1]) is not None:
            vol.namespace.remove(txn, dir_id, p[-1])
        a = new_file_attrs(stat.S_IFLNK | 0o777, 0, 0)
        vol.namespace.create(txn, dir_id, p[-1],
                             dataclasses.replace(a, target=target, size=len(target)))


def link_verdict(vol: Volume, pol: Policy, path: str) -> Verdict:
    with vol.store.read() as txn:
        a = vol.namespace.resolve(txn, P(path))
    assert a.is_symlink and isinstance(a.target, bytes)
    return TrustGate(vol, pol).verdict(P(path), symlink_content(a.target))


def test_sign_collects_symlinks_as_subjects(vol: Volume) -> None:
    put_symlink(vol, "/src/proj/link", b"sub/c.c")
    put_symlink(vol, "/src/proj/sub/abs", b"/etc/passwd")
    files = collect_files(vol, [P("/src/proj")])
    names = [f.name for f in files]
    assert names == ["proj/a.c", "proj/b.c", "proj/big.bin", "proj/link", "proj/sub/abs",
                     "proj/sub/c.c"]
    link = files[names.index("proj/link")]
    assert link.is_symlink and link.target == b"sub/c.c"
    assert link.digest == symlink_digest(b"sub/c.c")
    # A symlink given by itself is its own subject (not followed).
    [only] = collect_files(vol, [P("/src/proj/sub/abs")])
    assert only.name == "abs" and only.digest == symlink_digest(b"/etc/passwd")
    pol = policy(ONE, ALICE)
    assert not link_verdict(vol, pol, "/src/proj/link").allowed
    sign(vol, ALICE, "/src/proj")
    assert link_verdict(vol, pol, "/src/proj/link").allowed
    assert link_verdict(vol, pol, "/src/proj/sub/abs").allowed
    with vol.store.read() as txn:
        [st] = AnnotationStore(vol.store).for_digest(txn, symlink_digest(b"sub/c.c"))
    subj = {s.name: s for s in st.statement.subjects}
    assert subj["proj/link"].symlink and not subj["proj/a.c"].symlink


def test_a_symlink_in_place_of_a_signed_file_is_refused(vol: Volume) -> None:
    pol = policy(ONE, ALICE)
    sign(vol, ALICE, "/src/proj")
    assert status(vol, pol, "/src/proj/a.c") == "allowed"
    for target in (b"/tmp/evil", b"/etc/passwd", b"../../other/x", b"b.c"):
        put_symlink(vol, "/src/proj/a.c", target)
        v = link_verdict(vol, pol, "/src/proj/a.c")
        assert not v.allowed and v.status == "refused", target
        assert "needs 1 distinct trusted signer, has 0" in v.reason
    # A changed target is new content, as a changed file is.
    put_symlink(vol, "/src/proj/ok", b"a.c")
    sign(vol, ALICE, "/src/proj/ok")
    assert link_verdict(vol, pol, "/src/proj/ok").allowed
    put_symlink(vol, "/src/proj/ok", b"/etc/passwd")
    assert not link_verdict(vol, pol, "/src/proj/ok").allowed


def test_file_and_symlink_digests_never_approve_each_other(vol: Volume, tmp_path: Path) -> None:
    """A file whose bytes are "/etc/shadow", signed, approves no symlink to /etc/shadow;
    a signed symlink to it approves no file holding those bytes."""
    pol = policy(ONE, ALICE)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "file").write_bytes(b"/etc/shadow")
    TreeImporter(vol).run(tmp_path / "t", [b"src", b"t"])
    put_symlink(vol, "/src/t/link", b"/etc/shadow")
    sign(vol, ALICE, "/src/t/file")
    assert status(vol, pol, "/src/t/file") == "allowed"
    assert not link_verdict(vol, pol, "/src/t/link").allowed
    # The reverse: bob signs only the symlink; under a policy trusting bob alone the
    # file holding the same string is unsigned.
    put_symlink(vol, "/src/t/link2", b"/etc/shadow")
    ss = sign_statement(make_statement([Subject("link2", symlink_digest(b"/etc/shadow"),
                                                 symlink=True)], "reviewed", BOB), BOB)
    with vol.store.write() as txn:
        AnnotationStore(vol.store).add(txn, ss)
    pol_bob = policy(ONE, BOB)
    assert link_verdict(vol, pol_bob, "/src/t/link2").allowed
    assert status(vol, pol_bob, "/src/t/file") == "refused"


def test_symlink_statements_export_and_import(vol: Volume, tmp_path: Path) -> None:
    put_symlink(vol, "/src/proj/link", b"../other/x")
    sign(vol, ALICE, "/src/proj")
    with vol.store.read() as txn:
        [ss] = AnnotationStore(vol.store).for_digest(txn, symlink_digest(b"../other/x"))
    line = ss.envelope.to_json()
    back = load_signed(line, "f:1")
    assert back.id == ss.id and back.statement == ss.statement
    assert any(s.symlink and s.name == "proj/link" for s in back.statement.subjects)
    assert symlink_digest(b"../other/x") in back.digests


def test_a_relative_target_must_land_under_a_rule_as_strict(vol: Volume) -> None:
    """A relative target's meaning depends on where the symlink is: under a rule that
    needs signers it must land, lexically, under a rule at least as strict."""
    from annofs.trust.symlink import content_verdict, lexical_destination

    assert lexical_destination(P("/src/proj/a"), b"../x/./y") == tuple(P("/src/x/y"))
    assert lexical_destination(P("/src/a"), b"../../x") is None  # out of the mount
    pol = policy('[[rules]]\npath = "/src/loose/**"\nsigners = 0\n' + ONE, ALICE)
    for name, target in (("up", b"../../../other/x"), ("out", b"../../../../etc/passwd"),
                         ("same", b"../sub/c.c"), ("abs", b"/other/x")):
        put_symlink(vol, f"/src/proj/sub/{name}", target)
    sign(vol, ALICE, "/src/proj")
    gate = TrustGate(vol, pol)

    def judged(path: str) -> Verdict:
        [f] = collect_files(vol, [P(path)])
        return content_verdict(gate, f.path, f.version)

    assert judged("/src/proj/sub/same").allowed
    assert judged("/src/proj/sub/abs").allowed  # absolute: what the signer approved
    v = judged("/src/proj/sub/up")  # lands on /other/x, which no rule guards
    assert not v.allowed and v.status == "refused" and v.signers == ("alice-1",)
    assert v.reason == ("rules[1] /src/**: signed, but its relative target leads to "
                        "/other/x, under a looser rule (default allow)")
    assert "leads out of the mount" in judged("/src/proj/sub/out").reason
    # The same signed string one level deeper lands on /src/other/x: the same rule.
    with vol.store.write() as txn:
        vol.namespace.make_dirs(txn, P("/src/proj/sub/deeper"), 0, 0)
        vol.namespace.make_dirs(txn, P("/src/loose"), 0, 0)
    rename(vol, "/src/proj/sub/up", "/src/proj/sub/deeper/up")
    assert judged("/src/proj/sub/deeper/up").allowed
    # Under a rule that asks nothing, nothing is asked of it.
    rename(vol, "/src/proj/sub/deeper/up", "/src/loose/up")
    assert judged("/src/loose/up").allowed
    # warn mode flags it instead.
    warn = policy('mode = "warn"\n[[rules]]\npath = "/src/loose/**"\nsigners = 0\n' + ONE,
                  ALICE)
    rename(vol, "/src/loose/up", "/src/proj/sub/up")
    [f] = collect_files(vol, [P("/src/proj/sub/up")])
    w = content_verdict(TrustGate(vol, warn), f.path, f.version)
    assert w.allowed and w.flagged and w.reason.startswith("would be refused (mode warn): ")



def test_prewarm_parses_newest_statements_within_its_budgets(vol: Volume) -> None:
    """A mount parses stored statements before it serves (AnnotationStore.prewarm):
    newest first, no more subjects than the cache holds, no longer than asked."""
    with vol.store.read() as txn:
        assert AnnotationStore(vol.store).prewarm(txn, 1.0) == 0  # none stored
    sign(vol, ALICE, "/src/proj", when=1000)  # 4 subjects
    sign(vol, BOB, "/src/proj/a.c", when=2000)  # 1 subject, newer
    ann = AnnotationStore(vol.store)
    with vol.store.read() as txn:
        assert ann.prewarm(txn, 1.0) == 2
        newest = ann.for_digest(txn, digest(current(vol, "/src/proj/a.c")))[-1].id
    small = AnnotationStore(vol.store, cache_subjects=3)  # the tree statement won't fit
    with vol.store.read() as txn:
        assert small.prewarm(txn, 1.0) == 1
        assert small._parsed.get(newest) is not None
        assert AnnotationStore(vol.store).prewarm(txn, -1.0) == 0  # no time at all
