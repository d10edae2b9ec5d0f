"""narinfo files: the strict parser, the fingerprint Nix signs, checking Sig lines against
a policy, writing a Sig back, the narinfo statement kind; and a bounded fuzz of the parser
(ANNOFS_FUZZ_EXAMPLES raises the bound)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annofs.errors import UsageError
from annofs.nix.narinfo import (
    check_signatures,
    distinct_signers,
    fingerprint,
    parse_narinfo,
    sign_narinfo,
    store_path_arg,
)
from annofs.transfer.nixbase32 import encode as nix32
from annofs.trust.keys import generate_key, parse_public_key
from annofs.trust.policy import Policy, parse_policy
from annofs.trust.statement import (
    NARINFO_PAYLOAD_TYPE,
    Envelope,
    load_signed,
    narinfo_statement,
    open_envelope,
)

# Written and signed by the real Nix 2.8 (`nix copy --to file://...?compression=xz`, then
# `nix store sign --key-file`): a regression vector for the fingerprint.
REAL = b"""StorePath: /nix/store/hmmcv5niyd3ys36pvvhps7ayndghchjb-annofs-test-hello
URL: nar/1p8rzxhwyab09ip2rcac00cp13bjiv91szb9dwgp6397ddw3nl94.nar.xz
Compression: xz
FileHash: sha256:1p8rzxhwyab09ip2rcac00cp13bjiv91szb9dwgp6397ddw3nl94
FileSize: 268
NarHash: sha256:1rjhwpkpdkd5c91afyrv8xyydxyvpx4bcvmf0k6klsg52bn7mzaw
NarSize: 1072
References: 
Deriver: np9vl8w6g11fghw68hv37hlii8x5iikx-annofs-test-hello.drv
Sig: cache-a-1:bC2zvvtG+Ccy1moty542SJ4/Hao8q/E3GwxCorkZeKVcuPHCKcyiQwBF48f1NLYFori9tGUNol9NKMIW6HAdAQ==
"""  # noqa: W291, E501 (Nix writes "References: " with a trailing space)
REAL_KEY = "cache-a-1:jMK7qkjeyJmSjrBeGEXNH9c55XzG6Wpt6FvPWSfaauM="
REAL_HEX = "5cfd7aec12e5693acd04ae6eb648bfdbf7e67d473b7ba74262a5cd76e7e550e6"  # sha256sum

H1 = "hmmcv5niyd3ys36pvvhps7ayndghchjb"
H2 = "0d71ygfwbmy1xjlbj1v027dfmy9cqavy"
H3 = "zzzzygfwbmy1xjlbj1v027dfmy9cqavy"


def policy(*keys: str, revoked: tuple[str, ...] = ()) -> Policy:
    listed = ", ".join(f'"{k}"' for k in keys)
    rev = ", ".join(f'"{r}"' for r in revoked)
    return parse_policy(f"trusted-public-keys = [{listed}]\nrevoked-keys = [{rev}]\n",
                        Path("policy.toml"))


def narinfo(refs: str = "", sigs: tuple[str, ...] = (), nar_hash: str | None = None,
            extra: str = "") -> bytes:
    nh = nar_hash or "sha256:1rjhwpkpdkd5c91afyrv8xyydxyvpx4bcvmf0k6klsg52bn7mzaw"
    text = (f"StorePath: /nix/store/{H1}-hello\nURL: nar/x.nar\nCompression: none\n"
            f"NarHash: {nh}\nNarSize: 1072\nReferences: {refs}\n{extra}"
            + "".join(f"Sig: {s}\n" for s in sigs))
    return text.encode()


def error(data: bytes) -> str:
    with pytest.raises(UsageError) as e:
        parse_narinfo(data, "c/x.narinfo")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("c/x.narinfo")
    return msg


def test_a_real_nix_signature_verifies_over_our_fingerprint() -> None:
    info = parse_narinfo(REAL, "real.narinfo")
    assert info.fingerprint() == (
        f"1;/nix/store/{H1}-annofs-test-hello;"
        "sha256:1rjhwpkpdkd5c91afyrv8xyydxyvpx4bcvmf0k6klsg52bn7mzaw;1072;")  # bare ';'
    assert info.nar_hash.hex() == REAL_HEX
    assert info.compression == "xz" and info.file_size == 268 and info.references == ()
    checks = check_signatures(info, policy(REAL_KEY))
    assert [c.problem for c in checks] == [""]
    assert distinct_signers(checks) == {parse_public_key(REAL_KEY, "k").key: "cache-a-1"}


def test_hex_nar_hash_is_normalised_to_nix_base32_in_the_fingerprint() -> None:
    info = parse_narinfo(REAL.replace(b"sha256:1rjhwpkpdkd5c91afyrv8xyydxyvpx4bcvmf0k6klsg52"
                                      b"bn7mzaw", f"sha256:{REAL_HEX}".encode()), "hex")
    assert info.nar_hash_text == "sha256:1rjhwpkpdkd5c91afyrv8xyydxyvpx4bcvmf0k6klsg52bn7mzaw"
    assert check_signatures(info, policy(REAL_KEY))[0].counts  # the same signature holds
    sri = "sha256-" + base64.b64encode(bytes.fromhex(REAL_HEX)).decode()
    assert parse_narinfo(narinfo(nar_hash=sri), "s").nar_hash.hex() == REAL_HEX


def test_references_are_sorted_full_paths_in_the_store_dir() -> None:
    info = parse_narinfo(narinfo(refs=f"{H3}-zlib {H1}-hello {H2}-libffi"), "r")
    assert info.fingerprint().endswith(
        f";1072;/nix/store/{H2}-libffi,/nix/store/{H1}-hello,/nix/store/{H3}-zlib")
    assert fingerprint("/gnu/store/x", bytes(32), 5, []) == \
        f"1;/gnu/store/x;sha256:{nix32(bytes(32))};5;"


def test_signers_are_counted_by_public_key_and_problems_are_named() -> None:
    a, b, mallory = generate_key("cache-a-1"), generate_key("cache-b-1"), generate_key("m-1")
    info = parse_narinfo(narinfo(), "n")
    sa, sb, sm = (sign_narinfo(info, k).text for k in (a, b, mallory))
    # Same key under a second name: one signer.
    alias = "alias-1:" + sa.split(":", 1)[1]
    a_pub, b_pub = a.public_key().to_text(), b.public_key().to_text()
    alias_pub = "alias-1:" + a_pub.split(":", 1)[1]
    signed = parse_narinfo(narinfo(sigs=(sa, alias, sb, sm)), "n")
    checks = check_signatures(signed, policy(a_pub, alias_pub, b_pub))
    assert [c.problem for c in checks][:3] == ["", "", ""]
    assert "m-1: not a trusted key" in checks[3].problem
    assert sorted(distinct_signers(checks).values()) == ["cache-a-1", "cache-b-1"]
    revoked = check_signatures(signed, policy(a_pub, b_pub, revoked=("cache-b-1",)))
    assert [c.problem for c in revoked if c.sig.key_name == "cache-b-1"] == \
        ["cache-b-1: key revoked"]
    # A changed NarSize changes the fingerprint: nothing verifies.
    tampered = parse_narinfo(narinfo(sigs=(sa,)).replace(b"NarSize: 1072", b"NarSize: 1073"),
                             "t")
    assert "does not verify" in check_signatures(tampered, policy(a_pub))[0].problem


def test_with_sig_keeps_every_line_and_adds_one() -> None:
    k = generate_key("rebuilder-1")
    info = parse_narinfo(REAL + b"System: x86_64-linux\n", "real")
    text = info.with_sig(sign_narinfo(info, k))
    lines = text.splitlines()
    assert lines[:10] == REAL.decode().splitlines()
    assert lines[10].startswith("Sig: rebuilder-1:") and lines[11] == "System: x86_64-linux"
    again = parse_narinfo(text.encode(), "again")
    pol = policy(REAL_KEY, k.public_key().to_text())
    assert len(distinct_signers(check_signatures(again, pol))) == 2


@pytest.mark.parametrize(("data", "expected"), [
    (b"", "empty file"),
    (REAL[:-1], ":10: the last line does not end with a newline"),
    (REAL + b"StorePath: /nix/store/" + H1.encode() + b"-x\n", ":11: StorePath: appears twice"),
    (REAL.replace(b"NarSize: 1072", b"NarSize: 0"), ":7: NarSize: must be more than 0"),
    (REAL.replace(b"NarSize: 1072", b"NarSize: 01072"), ":7: NarSize:"),
    (REAL.replace(b"Compression: xz", b"Compression: br"), ":3: Compression: 'br': not supp"),
    (REAL.replace(b"URL: nar/", b"URL: ../"), ":2: URL:"),
    (REAL.replace(b"URL: nar/", b"URL: /etc/"), ":2: URL:"),
    (REAL.replace(b"NarHash: sha256:1", b"NarHash: md5:1"), ":6: NarHash:"),
    (REAL.replace(b"NarHash: sha256:1r", b"NarHash: sha256:er"), ":6: NarHash:"),
    (REAL.replace(b"Sig: cache-a-1:bC", b"Sig: cache-a-1:b"), ":10: Sig:"),
    (REAL.replace(b"Sig: cache-a-1:", b"Sig: "), ":10: Sig:"),
    (REAL.replace(b"References: ", b"References:  x"), ":8: References:"),
    (REAL.replace(b"References: ", b"References: " + H2.encode() + b"-.hidden"), ":8: Refer"),
    (REAL.replace(b"StorePath: /nix/store/", b"StorePath: nix/store/"), ":1: StorePath:"),
    (REAL.replace(b"StorePath: /nix/store/", b"StorePath: /nix/../"), ":1: StorePath:"),
    (REAL.replace(b"StorePath: /nix/store/", b"StorePath: /tmp/evil/"),
     ":1: StorePath: '/tmp/evil/hmmcv5niyd3ys36pvvhps7ayndghchjb-annofs-test-hello' is not "
     "in the Nix store /nix/store"),
    (REAL.replace(b"StorePath: /nix/store/", b"StorePath: /nix/store/sub/"),
     ":1: StorePath: '/nix/store/sub/hmmcv5niyd3ys36pvvhps7ayndghchjb-annofs-test-hello' is "
     "not in the Nix store /nix/store"),
    (REAL.replace(b"StorePath: /nix/store/", b"StorePath: /gnu/store/"), "not in the Nix store"),
    (REAL.replace(b"-annofs-test-hello", b"-annofs test"), ":1: StorePath:"),
    (REAL + b"no colon here\n", ":11: expected 'Key: value'"),
    (REAL + b"Key:value\n", ":11: Key: expected a space after ':'"),
    (REAL.replace(b"\n", b"\r\n"), ":1: StorePath: contains a control character"),
    (b"StorePath: \xff\n", ":1: not UTF-8 text"),
    (b"URL: nar/x.nar\nNarHash: sha256:" + REAL_HEX.encode() + b"\nNarSize: 1\n",
     "StorePath: missing"),
])
def test_malformed_narinfo_is_one_line_naming_file_and_line(data: bytes,
                                                            expected: str) -> None:
    assert expected in error(data)


def test_nix_defaults_and_tolerances() -> None:
    info = parse_narinfo(narinfo().replace(b"Compression: none\n", b"") + b"Deriver: "
                         b"unknown-deriver\nProvenance: {}\n", "d")
    assert info.compression == "bzip2" and info.deriver is None  # as Nix reads them
    assert store_path_arg(f"/nix/store/{H1}-hello") == H1 == store_path_arg(H1)
    assert store_path_arg(f"{H1}-hello") == H1
    for bad in ("hello", f"/nix/store/{H1}", "e" * 32, f"{H1}-"):
        with pytest.raises(UsageError):
            store_path_arg(bad)


def test_narinfo_statement_verifies_over_the_fingerprint_and_only_there() -> None:
    k = generate_key("cache-a-1")
    info = parse_narinfo(narinfo(), "n")
    fp = info.fingerprint()
    sig = sign_narinfo(info, k).sig
    ss = narinfo_statement([(f"{H1}-hello/bin/hi", bytes(32))], "cache-a-1", k.public, fp,
                           sig, 1_700_000_000)
    assert ss.signature_valid and ss.statement.claim == "built"
    # Stored and read back (as annotations.decode_statement does): the same, still valid.
    back = open_envelope(Envelope(ss.envelope.payload_type, ss.envelope.payload,
                                  ss.envelope.keyid, ss.envelope.sig), "stored")
    assert back.signature_valid and back.id == ss.id and back.statement.fingerprint == fp
    other = fp.replace(";1072;", ";1073;")
    forged = narinfo_statement([(f"{H1}-hello/bin/hi", bytes(32))], "cache-a-1", k.public,
                               other, sig, 1_700_000_000)
    assert not forged.signature_valid
    # Not a DSSE envelope: attest import refuses it, saying why.
    with pytest.raises(UsageError, match="narinfo signature is not imported"):
        load_signed(ss.envelope.to_json(), "file:1")
    # A payload type that does not match the predicate is refused.
    with pytest.raises(UsageError, match="does not match"):
        open_envelope(Envelope("application/vnd.in-toto+json", ss.envelope.payload,
                               ss.envelope.keyid, ss.envelope.sig), "x")
    assert ss.envelope.payload_type == NARINFO_PAYLOAD_TYPE


# -- fuzz ---------------------------------------------------------------------------------

_LINES = [ln + b"\n" for ln in REAL.splitlines()]
_EXAMPLES = int(os.environ.get("ANNOFS_FUZZ_EXAMPLES", "300"))


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    lines = list(draw(st.permutations(_LINES)) if draw(st.booleans()) else _LINES)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["flip", "cut", "dup", "drop", "junk"]))
        line = lines[i]
        if op == "flip" and line:
            j = draw(st.integers(0, len(line) - 1))
            line = line[:j] + bytes([line[j] ^ (1 << draw(st.integers(0, 7)))]) + line[j + 1:]
        elif op == "cut":
            line = line[:draw(st.integers(0, len(line)))]
        elif op == "dup":
            lines.insert(i, line)
        elif op == "junk":
            line = draw(st.binary(max_size=40))
        lines[i] = line
        if op == "drop":
            del lines[i]
            if not lines:
                break
    return b"".join(lines)


@settings(max_examples=_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(_mutated(), st.binary(max_size=300)))
def test_fuzz_the_parser_raises_only_its_clear_error(data: bytes) -> None:
    pol = policy(REAL_KEY)
    try:
        info = parse_narinfo(data, "fuzz.narinfo")
    except UsageError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith("fuzz.narinfo")
        return
    # Whatever parses has a well-formed fingerprint, and checking it never raises.
    assert info.fingerprint().startswith("1;/")
    for c in check_signatures(info, pol):
        assert c.counts == (c.problem == "")
