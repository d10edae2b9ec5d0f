"""The trust file a bundle publishes (`annofs-trust.json`): it round-trips, and any
input gives the parsed value or one clear one-line UsageError, never another exception
(it comes from a network, although signed)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annofs.errors import UsageError
from annofs.trust.bundle_content import BundleContent, Revocation, parse_content
from annofs.trust.keys import generate_key

EXAMPLES = int(os.environ.get("ANNOFS_FUZZ_EXAMPLES", "300"))
ALICE = generate_key("alice-1").public_key()
VALID = BundleContent([ALICE], [Revocation(ALICE, "lost", 1764547200)],
                      [(b"\x01" * 32, "malicious")], [{"path": "/src/**", "signers": 1}])


def test_round_trip() -> None:
    data = VALID.to_bytes()
    assert parse_content(data, "t") == VALID
    assert parse_content(data, "t").to_bytes() == data


@pytest.mark.parametrize(("doc", "message"), [
    ({"annofs-trust": 2}, "not an annofs trust file"),
    ({"annofs-trust": 1, "extra": 1}, "unknown field 'extra'"),
    ({"annofs-trust": 1, "keys": [{"name": "bob", "public": ALICE.to_text()}]},
     "differs from the key's"),
    ({"annofs-trust": 1, "revocations": [{"key": ALICE.to_text(), "reason": "x",
                                          "since": "yesterday"}]}, "not a UTC time"),
    ({"annofs-trust": 1, "labels": [{"digest": "md5:00", "label": "bad"}]}, "not a digest"),
    ({"annofs-trust": 1, "revocations": [{"key": ALICE.to_text(),
                                          "reason": "lost\nannofs: all fine"}]},
     "one printable line"),
])
def test_errors(doc: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_content(json.dumps(doc).encode(), "t")
    assert "\n" not in str(info.value)


def _check(data: bytes) -> None:
    try:
        parse_content(data, "bundle")
    except UsageError as e:
        assert "\n" not in str(e)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_bytes(data: bytes) -> None:
    _check(data)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4)
                     | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from(["keys", "revocations", "labels", "rules", "annofs-trust"]),
       st.sampled_from([0, 1, 2, 3]), _JSON)
def test_fuzz_mutated(field: str, where: int, value: object) -> None:
    doc = json.loads(VALID.to_bytes())
    if field == "annofs-trust" or not doc[field]:
        doc[field] = value
    else:
        item = doc[field][0]
        if isinstance(item, dict) and where < len(item):
            item[sorted(item)[where]] = value
        else:
            doc[field][0] = value
    _check(json.dumps(doc).encode())
