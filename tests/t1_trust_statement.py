"""Statements: DSSE PAE vectors, signing and verifying, tampering, and a strict parser
(every malformed field a clean UsageError, fuzzed with hypothesis)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annofs.errors import UsageError
from annofs.trust.keys import SecretKey, generate_key
from annofs.trust.statement import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    SYMLINK_DIGEST_ALGORITHM,
    SYMLINK_DIGEST_CONTEXT,
    Envelope,
    Statement,
    Subject,
    format_digest,
    load_signed,
    make_statement,
    open_envelope,
    pae,
    parse_digest,
    parse_envelope,
    sign_statement,
    symlink_digest,
)

# RFC 8032 TEST 1 key (also key "A" of DSSE's own test vectors).
SEED_A = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
PUB_A = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
KEY_A = SecretKey("a-1", SEED_A, PUB_A)
D1 = bytes(range(32))
D2 = bytes(range(32, 64))
T0 = 1_714_564_800  # 2024-05-01T12:00:00Z


# -- PAE ----------------------------------------------------------------------------------


def test_pae_spec_example() -> None:
    # DSSE protocol.md, "Test Vectors".
    assert pae(b"http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_pae_lengths_are_bytes_not_characters() -> None:
    ptype = "application/vnd.exämple+json".encode()
    assert len("application/vnd.exämple+json") == 28
    assert pae(ptype, b"{}").startswith(b"DSSEv1 29 application/vnd.ex\xc3\xa4mple+json 2 {}")
    assert pae(b"t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"


def test_pae_empty_parts() -> None:
    assert pae(PAYLOAD_TYPE.encode(), b"") == b"DSSEv1 28 application/vnd.in-toto+json 0 "
    assert pae(b"", b"x") == b"DSSEv1 0  1 x"


def test_signature_over_pae_matches_the_dsse_vector() -> None:
    # The same value is DSSE's "single-signature" test vector (key A over this body).
    body = b'{"_type":"https://in-toto.io/Statement/v1"}'
    sig = KEY_A.sign(pae(PAYLOAD_TYPE.encode(), body))
    assert base64.b64encode(sig).decode() == (
        "2WAfaHm5jluo0w+0rk8uVkluELJYWjSmU9x7EUzx+AyteDGJ4/nqyJXfmAUVFIAoQafWm7AxBZNw5M9ixNHiCA==")
    assert Envelope(PAYLOAD_TYPE, body, "a-1", sig).pae() == \
        b"DSSEv1 28 application/vnd.in-toto+json 43 " + body


# -- making and reading --------------------------------------------------------------------


def signed(key: SecretKey = KEY_A, **kw: Any) -> Any:
    subjects = kw.pop("subjects", [("proj/a.c", D1), ("proj/b.c", D2)])
    return sign_statement(make_statement(subjects, kw.pop("claim", "reviewed"), key,
                                         when=kw.pop("when", T0), **kw), key)


def test_round_trip() -> None:
    ss = signed()
    line = ss.envelope.to_json()
    assert "\n" not in line
    back = load_signed(line, "f:1")
    assert back.statement == ss.statement
    assert back.id == ss.id and back.signature_valid
    doc = json.loads(base64.b64decode(json.loads(line)["payload"]))
    assert doc == {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": "proj/a.c", "digest": {"blake3": D1.hex()}},
                    {"name": "proj/b.c", "digest": {"blake3": D2.hex()}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"claim": "reviewed", "signer": "a-1", "publicKey": base64.b64encode(
            PUB_A).decode(), "time": "2024-05-01T12:00:00Z"},
    }
    assert json.loads(line)["signatures"] == [
        {"keyid": "a-1", "sig": base64.b64encode(ss.envelope.sig).decode()}]
    assert ss.digests == {D1, D2}
    assert ss.names_of(D2) == ["proj/b.c"]


def test_label_round_trip() -> None:
    ss = signed(label="malicious")
    back = load_signed(ss.envelope.to_json(), "f:1")
    assert back.statement.label == "malicious" and back.statement.claim == "label"


def test_url_safe_base64_is_accepted() -> None:
    ss = signed()
    doc = json.loads(ss.envelope.to_json())
    doc["payload"] = base64.urlsafe_b64encode(ss.envelope.payload).decode().rstrip("=")
    doc["signatures"][0]["sig"] = base64.urlsafe_b64encode(ss.envelope.sig).decode()
    back = load_signed(json.dumps(doc), "f:1")
    assert back.id == ss.id


def test_id_is_a_content_address() -> None:
    assert signed().id == signed().id
    assert signed().id != signed(when=T0 + 1).id


def test_bad_claims_and_labels() -> None:
    with pytest.raises(UsageError, match="reserved"):
        signed(claim="label")
    with pytest.raises(UsageError, match="lowercase word"):
        signed(claim="Reviewed")
    with pytest.raises(UsageError, match="lowercase word"):
        signed(label="x" * 33)
    with pytest.raises(UsageError, match="two subjects with the same name"):
        signed(subjects=[("a", D1), ("a", D2)])
    with pytest.raises(UsageError, match="at least one subject"):
        signed(subjects=[])
    with pytest.raises(UsageError, match=r"'\.\.' component"):
        signed(subjects=[("a/../b", D1)])


def test_digest_text() -> None:
    assert format_digest(D1) == "blake3:" + D1.hex()
    assert parse_digest(format_digest(D1), "x") == D1
    with pytest.raises(UsageError, match="not a digest"):
        parse_digest("blake3:" + D1.hex().upper(), "x")


# -- tampering ------------------------------------------------------------------------------


def envelope_doc(ss: Any) -> dict[str, Any]:
    return json.loads(ss.envelope.to_json())


def payload_doc(doc: dict[str, Any]) -> dict[str, Any]:
    return json.loads(base64.b64decode(doc["payload"]))


def with_payload(doc: dict[str, Any], payload: dict[str, Any] | bytes) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return json.dumps({**doc, "payload": base64.b64encode(raw).decode()})


def test_tampered_payload_fails() -> None:
    doc = envelope_doc(signed())
    p = payload_doc(doc)
    p["subject"][0]["digest"]["blake3"] = "ff" * 32
    with pytest.raises(UsageError, match=r"^f:3: the signature by 'a-1' does not verify"):
        load_signed(with_payload(doc, p), "f:3")
    p = payload_doc(doc)
    p["predicate"]["claim"] = "built"
    with pytest.raises(UsageError, match="does not verify"):
        load_signed(with_payload(doc, p), "f:3")


def test_tampered_signature_fails() -> None:
    doc = envelope_doc(signed())
    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[10] ^= 0x40
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(UsageError, match="does not verify"):
        load_signed(json.dumps(doc), "f:1")


def test_tampered_keyid_fails() -> None:
    doc = envelope_doc(signed())
    doc["signatures"][0]["keyid"] = "b-1"
    with pytest.raises(UsageError, match=r"keyid 'b-1' is not the signer the payload names"):
        load_signed(json.dumps(doc), "f:1")


def test_payload_type_is_signed() -> None:
    ss = signed()
    env = Envelope("application/vnd.other+json", ss.envelope.payload, "a-1", ss.envelope.sig)
    with pytest.raises(UsageError, match="payloadType: expected"):
        parse_envelope(env.to_json(), "f")


def test_swapping_the_public_key_fails() -> None:
    # Claiming another key in the payload breaks the signature: a statement cannot be
    # re-attributed, and a forger's signature never counts for a key it does not hold.
    other = generate_key("a-1")
    doc = envelope_doc(signed())
    p = payload_doc(doc)
    p["predicate"]["publicKey"] = base64.b64encode(other.public).decode()
    with pytest.raises(UsageError, match="does not verify"):
        load_signed(with_payload(doc, p), "f:1")


def test_open_envelope_does_not_check_the_signature() -> None:
    doc = envelope_doc(signed())
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(64)).decode()
    ss = open_envelope(parse_envelope(json.dumps(doc), "f"), "f")
    assert not ss.signature_valid


# -- strict parsing: every malformed field -----------------------------------------------------

Mut = Callable[[dict[str, Any]], Any]


def env_case(mut: Mut) -> str:
    doc = envelope_doc(signed())
    out = mut(doc)
    return json.dumps(doc) if out is None else out


def payload_case(mut: Mut) -> str:
    doc = envelope_doc(signed())
    p = payload_doc(doc)
    out = mut(p)
    return with_payload(doc, p if out is None else out)


ENVELOPE_CASES: list[tuple[str, Callable[[], str | bytes], str]] = [
    ("not json", lambda: "{", "envelope: not valid JSON"),
    ("not utf-8", lambda: b'{"payload\xff": 1}', "envelope: not UTF-8 (invalid start byte"),
    ("not an object", lambda: "[1]", "envelope: expected a JSON object, got list"),
    ("missing payload", lambda: env_case(lambda d: d.pop("payload") and None),
     "envelope: missing 'payload'"),
    ("unknown field", lambda: env_case(lambda d: d.update(extra=1)),
     "envelope: unknown field 'extra'"),
    ("duplicate key", lambda: '{"payloadType":"x","payloadType":"y"}',
     "envelope: payloadType: appears twice"),
    ("NaN", lambda: '{"payloadType": NaN}', "NaN is not valid JSON"),
    ("payloadType type", lambda: env_case(lambda d: d.update(payloadType=5)),
     "payloadType: expected a string, got 5"),
    ("payload not base64", lambda: env_case(lambda d: d.update(payload="***")),
     "payload: not valid base64"),
    ("payload bad length", lambda: env_case(lambda d: d.update(payload="abcde")),
     "payload: not valid base64 (bad length)"),
    ("signatures not list", lambda: env_case(lambda d: d.update(signatures={})),
     "signatures: expected a list, got dict"),
    ("no signature", lambda: env_case(lambda d: d.update(signatures=[])),
     "signatures: an annofs statement has exactly one signature, found 0"),
    ("two signatures", lambda: env_case(lambda d: d.update(signatures=d["signatures"] * 2)),
     "found 2"),
    ("signature not object", lambda: env_case(lambda d: d.update(signatures=["x"])),
     "signatures[0]: expected a JSON object"),
    ("missing keyid", lambda: env_case(lambda d: d["signatures"][0].pop("keyid") and None),
     "signatures[0]: missing 'keyid'"),
    ("keyid type", lambda: env_case(lambda d: d["signatures"][0].update(keyid=None)),
     "signatures[0].keyid: expected a string, got null"),
    ("short sig", lambda: env_case(lambda d: d["signatures"][0].update(sig="AAAA")),
     "signatures[0].sig: an ed25519 signature is 64 bytes, got 3"),
    ("payload not json", lambda: env_case(lambda d: with_payload(d, b"\x00\x01")),
     "payload: not valid JSON"),
    ("payload not utf-8", lambda: env_case(lambda d: with_payload(d, b'"\xff"')),
     "payload: not UTF-8"),
    ("payload utf-16", lambda: env_case(lambda d: with_payload(d, '{}'.encode("utf-16"))),
     "payload: not UTF-8"),
    ("payload deep", lambda: env_case(lambda d: with_payload(d, b"[" * 100000)),
     "payload: nested too deeply"),
    ("payload list", lambda: payload_case(lambda p: [p]),
     "payload: expected a JSON object, got list"),
    ("payload unknown", lambda: payload_case(lambda p: p.update(x=1)),
     "payload: unknown field 'x'"),
    ("payload dup", lambda: env_case(lambda d: with_payload(d, b'{"_type":1,"_type":2}')),
     "payload: _type: appears twice"),
    ("_type", lambda: payload_case(lambda p: p.update(_type="https://in-toto.io/Statement/v0.1")),
     "payload._type: expected 'https://in-toto.io/Statement/v1'"),
    ("predicateType", lambda: payload_case(lambda p: p.update(predicateType="x")),
     "payload.predicateType: expected"),
    ("subject empty", lambda: payload_case(lambda p: p.update(subject=[])),
     "payload.subject: expected a non-empty list"),
    ("subject not list", lambda: payload_case(lambda p: p.update(subject={})),
     "payload.subject: expected a non-empty list"),
    ("subject item", lambda: payload_case(lambda p: p.update(subject=[1])),
     "payload.subject[0]: expected a JSON object, got 1"),
    ("subject name type", lambda: payload_case(lambda p: p["subject"][1].update(name=7)),
     "payload.subject[1].name: expected a relative path, got 7"),
    ("subject absolute", lambda: payload_case(lambda p: p["subject"][0].update(name="/etc/x")),
     "payload.subject[0].name: '/etc/x' must be relative"),
    ("subject dotdot", lambda: payload_case(lambda p: p["subject"][0].update(name="a/../b")),
     "payload.subject[0].name: 'a/../b' has an empty, '.' or '..' component"),
    ("subject empty name", lambda: payload_case(lambda p: p["subject"][0].update(name="")),
     "payload.subject[0].name: must be a relative path of 1 to 4096 characters"),
    ("subject surrogate", lambda: payload_case(lambda p: p["subject"][0].update(name="\ud800")),
     "payload.subject[0].name: contains an unpaired surrogate"),
    ("subject too long", lambda: payload_case(lambda p: p["subject"][0].update(name="a" * 4097)),
     "payload.subject[0].name: must be a relative path of 1 to 4096 characters"),
    ("subject trailing slash", lambda: payload_case(lambda p: p["subject"][0].update(name="a/")),
     "payload.subject[0].name: 'a/' has an empty, '.' or '..' component"),
    ("subject NUL", lambda: payload_case(lambda p: p["subject"][0].update(name="a\0b")),
     "payload.subject[0].name: 'a\\x00b' must be relative (no leading '/') and contain no NUL"),
    ("subject dup", lambda: payload_case(lambda p: p["subject"][1].update(name="proj/a.c")),
     "payload.subject[1].name: 'proj/a.c' appears twice"),
    ("digest algos", lambda: payload_case(
        lambda p: p["subject"][0]["digest"].update(sha256="00")),
     "payload.subject[0].digest: unknown field 'sha256'"),
    ("digest missing", lambda: payload_case(lambda p: p["subject"][0].update(digest={})),
     "payload.subject[0].digest: missing 'blake3'"),
    ("digest upper", lambda: payload_case(
        lambda p: p["subject"][0]["digest"].update(blake3="AB" * 32)),
     "payload.subject[0].digest.blake3: expected 64 lowercase hex digits"),
    ("digest short", lambda: payload_case(
        lambda p: p["subject"][0]["digest"].update(blake3="ab")),
     "payload.subject[0].digest.blake3: expected 64 lowercase hex digits"),
    ("predicate missing", lambda: payload_case(lambda p: p.pop("predicate") and None),
     "payload: missing 'predicate'"),
    ("predicate unknown", lambda: payload_case(lambda p: p["predicate"].update(trust="all")),
     "payload.predicate: unknown field 'trust'"),
    ("claim type", lambda: payload_case(lambda p: p["predicate"].update(claim=["x"])),
     "payload.predicate.claim: expected a string, got list"),
    ("claim word", lambda: payload_case(lambda p: p["predicate"].update(claim="Re viewed")),
     "payload.predicate.claim: 'Re viewed' is not a lowercase word"),
    ("label claim", lambda: payload_case(lambda p: p["predicate"].update(claim="label")),
     "payload.predicate.label: missing (claim 'label' needs one)"),
    ("label without claim", lambda: payload_case(lambda p: p["predicate"].update(label="bad")),
     "payload.predicate.claim: a statement with a label has claim 'label'"),
    ("signer colon", lambda: payload_case(lambda p: p["predicate"].update(signer="a:b")),
     "payload.predicate.signer: 'a:b' is not a key name"),
    ("public key size", lambda: payload_case(lambda p: p["predicate"].update(publicKey="AAAA")),
     "payload.predicate.publicKey: an ed25519 public key is 32 bytes, got 3"),
    ("time format", lambda: payload_case(lambda p: p["predicate"].update(time="yesterday")),
     "payload.predicate.time: expected a UTC time like 2024-05-01T12:00:00Z"),
    ("time invalid", lambda: payload_case(
        lambda p: p["predicate"].update(time="2024-02-30T12:00:00Z")),
     "payload.predicate.time: '2024-02-30T12:00:00Z' is not a valid date and time"),
    ("time number", lambda: payload_case(lambda p: p["predicate"].update(time=17)),
     "payload.predicate.time: expected a UTC time like 2024-05-01T12:00:00Z, got 17"),
]


@pytest.mark.parametrize(("make", "message"), [(m, msg) for _, m, msg in ENVELOPE_CASES],
                         ids=[c[0] for c in ENVELOPE_CASES])
def test_malformed(make: Callable[[], str | bytes], message: str) -> None:
    with pytest.raises(UsageError) as e:
        load_signed(make(), "att.jsonl:7")
    text = str(e.value)
    assert text.startswith("att.jsonl:7: "), text
    assert message in text, text
    assert "\n" not in text


# -- fuzzing: nothing but clean errors ------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)


def expect_clean(data: str | bytes) -> None:
    try:
        load_signed(data, "fuzz")
    except UsageError as e:
        assert str(e).startswith("fuzz: ") and "\n" not in str(e)


FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_bytes(data: bytes) -> None:
    expect_clean(data)


@FUZZ
@given(json_values)
def test_fuzz_json_envelope(value: Any) -> None:
    expect_clean(json.dumps(value))


PAYLOAD_FIELDS = ["_type", "subject", "predicateType", "predicate"]
PREDICATE_FIELDS = ["claim", "signer", "publicKey", "time", "label"]


@FUZZ
@given(st.sampled_from(PAYLOAD_FIELDS + PREDICATE_FIELDS + ["subject0", "digest"]), json_values,
       st.booleans())
def test_fuzz_payload_fields(field: str, value: Any, drop: bool) -> None:
    """A valid statement with one field replaced by any JSON value (or removed)."""
    def mut(p: dict[str, Any]) -> None:
        target, key = p, field
        if field in PREDICATE_FIELDS:
            target = p["predicate"]
        elif field == "subject0":
            target, key = p["subject"][0], "name"
        elif field == "digest":
            target, key = p["subject"][0], "digest"
        if drop:
            target.pop(key, None)
        else:
            target[key] = value
    expect_clean(payload_case(mut))


@FUZZ
@given(st.sampled_from(["payloadType", "payload", "signatures", "keyid", "sig"]), json_values)
def test_fuzz_envelope_fields(field: str, value: Any) -> None:
    def mut(d: dict[str, Any]) -> None:
        if field in ("keyid", "sig"):
            d["signatures"][0][field] = value
        else:
            d[field] = value
    expect_clean(env_case(mut))


def test_statement_checks_its_own_fields() -> None:
    with pytest.raises(UsageError):
        Statement((Subject("a", b"short"),), "reviewed", "a-1", PUB_A, T0)
    with pytest.raises(UsageError):
        Statement((Subject("a", D1),), "reviewed", "a-1", b"short", T0)


@pytest.mark.parametrize(("name", "good"), [
    ("a", True), ("a/b", True), ("..a", True), ("a/..b", True), ("a./b.", True),
    ("a//b", False), ("a/", False), ("./a", False), ("a/.", False), ("..", False),
    ("a/../b", False), ("/a", False),
])
def test_subject_names(name: str, good: bool) -> None:
    if good:
        assert signed(subjects=[(name, D1)]).statement.subjects[0].name == name
    else:
        with pytest.raises(UsageError):
            signed(subjects=[(name, D1)])


@pytest.mark.parametrize("name", [
    "a", "proj/src/main.c", "a-b_c+d/e.f", ".hidden", "a/.b", "a/..b", "é/ü", "a b",
    "a\\b", "x" * 4096,
])
def test_subject_names_read_back(name: str) -> None:
    # The parser checks plain names inline and others in full: both must accept these.
    ss = signed(subjects=[(name, D1), ("other", D2)])
    back = load_signed(ss.envelope.to_json(), "f:1")
    assert [s.name for s in back.statement.subjects] == [name, "other"]


# -- symlinks: a subject kind of their own ----------------------------------------------------


def test_symlink_digest_is_domain_separated_from_file_digests() -> None:
    import blake3

    target = b"/etc/shadow"
    d = symlink_digest(target)
    assert len(d) == 32
    # A file whose bytes are the target string (plainly, or with any tag a tagged
    # encoding in the plain hash mode might use) never has the symlink's digest.
    assert d != blake3.blake3(target).digest()
    assert d != blake3.blake3(b"symlink\0" + target).digest()
    assert d not in {blake3.blake3(b"annofs symlink target v1" + target).digest(),
                     blake3.blake3(b"annofs symlink target v1\0" + target).digest()}
    assert symlink_digest(b"/etc/shadow") == d  # deterministic
    assert symlink_digest(b"/etc/shado") != d and symlink_digest(b"etc/shadow") != d
    # The reference value (BLAKE3 derive_key mode), pinned so it cannot drift.
    assert d == blake3.blake3(target, derive_key_context=SYMLINK_DIGEST_CONTEXT).digest()


def test_symlink_subject_round_trip() -> None:
    link = symlink_digest(b"../lib/libc.so.6")
    ss = signed(subjects=[Subject("proj/a.c", D1), Subject("proj/lib.so", link, symlink=True)])
    back = load_signed(ss.envelope.to_json(), "f:1")
    assert back.statement == ss.statement
    assert back.statement.subjects[1].symlink and not back.statement.subjects[0].symlink
    doc = json.loads(base64.b64decode(json.loads(ss.envelope.to_json())["payload"]))
    assert doc["subject"] == [
        {"name": "proj/a.c", "digest": {"blake3": D1.hex()}},
        {"name": "proj/lib.so", "digest": {SYMLINK_DIGEST_ALGORITHM: link.hex()}}]
    assert ss.digests == {D1, link}


@pytest.mark.parametrize(("digest", "message"), [
    ({"blake3": D1.hex(), SYMLINK_DIGEST_ALGORITHM: D1.hex()}, "unknown field"),
    ({SYMLINK_DIGEST_ALGORITHM: "ab"}, "expected 64 lowercase hex digits"),
    ({SYMLINK_DIGEST_ALGORITHM: D1.hex().upper()}, "expected 64 lowercase hex digits"),
    ({"sha256": D1.hex()}, "missing 'blake3'"),
    ({}, "missing 'blake3'"),
])
def test_symlink_subject_digests_are_parsed_strictly(digest: dict[str, Any],
                                                      message: str) -> None:
    def mut(p: dict[str, Any]) -> None:
        p["subject"][0]["digest"] = digest
    with pytest.raises(UsageError) as e:
        load_signed(payload_case(mut), "att.jsonl:3")
    assert message in str(e.value), str(e.value)
