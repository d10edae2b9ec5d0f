"""`decide` as a pure function over hand-made statements, and the verdict cache."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

from annofs.trust.keys import SecretKey, generate_key
from annofs.trust.policy import Policy, parse_policy
from annofs.trust.statement import SignedStatement, make_statement, sign_statement
from annofs.trust.verdict import VerdictCache, decide

ALICE = generate_key("alice-1")
BOB = generate_key("bob-1")
D = bytes(range(32))
OTHER = bytes(32)


def st(key: SecretKey, digest: bytes = D, claim: str = "reviewed",
       label: str | None = None) -> SignedStatement:
    return sign_statement(make_statement([("f", digest)], claim, key, label=label, when=1),
                          key)


def pol(body: str = "[[rules]]\npath = \"/src/**\"\nsigners = 2\n") -> Policy:
    return parse_policy(f'trusted-public-keys = ["{ALICE.public_key().to_text()}", '
                        f'"{BOB.public_key().to_text()}"]\n{body}', Path("p.toml"))


def test_two_distinct_keys() -> None:
    v = decide("/src/f", D, pol(), [st(ALICE), st(BOB)])
    assert v.allowed and v.signers == ("alice-1", "bob-1") and v.needed == 2


def test_statement_for_other_content_does_not_count() -> None:
    v = decide("/src/f", D, pol(), [st(ALICE), st(BOB, digest=OTHER)])
    assert not v.allowed and v.signers == ("alice-1",)


def test_invalid_signature_does_not_count() -> None:
    good = st(BOB)
    forged = dataclasses.replace(good, envelope=dataclasses.replace(good.envelope,
                                                                    sig=bytes(64)))
    v = decide("/src/f", D, pol(), [st(ALICE), forged])
    bob = base64.b64encode(BOB.public).decode()
    assert not v.allowed and v.ignored == (f"bad signature by key {bob} (claims 'bob-1')",)


def test_reason_lists_what_did_not_count() -> None:
    stranger = generate_key("carol-1")
    v = decide("/src/f", D, pol(), [st(stranger)])
    key = base64.b64encode(stranger.public).decode()
    assert v.reason == ("rules[0] /src/**: needs 2 distinct trusted signers, has 0; "
                        f"not counted: untrusted key {key} (claims 'carol-1')")


def test_no_statements_and_signers_zero() -> None:
    v = decide("/src/f", D, pol("[[rules]]\npath = \"/src/**\"\nsigners = 0\n"), [])
    assert v.allowed and v.reason == "rules[0] /src/**: no signature needed"


def test_the_function_is_pure() -> None:
    p, stmts = pol(), [st(ALICE), st(BOB)]
    assert decide("/src/f", D, p, stmts) == decide("/src/f", D, p, list(reversed(stmts)))


def test_cache_keys_and_generations() -> None:
    cache = VerdictCache(maxsize=2)
    v = decide("/src/f", D, pol(), [])
    cache.put(1, 0, 10, 5, v)
    assert cache.get(1, 0, 10, 5) is v
    assert cache.get(1, 1, 10, 5) is None  # another rule
    assert cache.get(1, None, 10, 5) is None  # the default
    assert cache.get(2, 0, 10, 5) is None  # another version
    assert cache.get(1, 0, 10, 6) is None  # statements changed: everything is dropped
    assert len(cache) == 0
    cache.put(1, 0, 10, 6, v)
    cache.put(2, 0, 10, 6, v)
    cache.get(1, 0, 10, 6)  # 1 is now the most recent
    cache.put(3, 0, 10, 6, v)
    assert cache.get(2, 0, 10, 6) is None and cache.get(1, 0, 10, 6) is v
    assert cache.get(1, 0, 11, 6) is None  # policy reloaded
    cache.put(1, 0, 11, 6, v)
    cache.clear()
    assert len(cache) == 0
