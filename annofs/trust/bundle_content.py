"""What a trust bundle publishes: one target file, `annofs-trust.json`.

```json
{"annofs-trust": 1,
 "keys": [{"name": "alice-1", "public": "alice-1:BASE64"}],
 "revocations": [{"key": "mallory-1:BASE64", "reason": "laptop stolen",
                  "since": "2026-12-01T00:00:00Z"}],
 "labels": [{"digest": "blake3:HEX", "label": "malicious"}],
 "rules": [{"path": "/src/**", "signers": 1}]}
```

One file, so keys, revocations and labels always arrive together (TUF's snapshot makes
the set consistent anyway; one file makes it obviously so). `since` is optional: without
it every statement by the key is refused; with it, statements whose signed time is at or
after `since` (a key holder can backdate a statement, so `since` is for retiring a key,
not for a stolen one). Parsing is strict: a bundle is input from a network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from annofs.errors import UsageError
from annofs.printable import one_line
from annofs.trust.keys import PublicKey, parse_public_key
from annofs.trust.statement import check_word, format_digest, format_time, parse_digest

TARGET_NAME = "annofs-trust.json"
FORMAT = 1
_TIME = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Revocation:
    """A revoked key: why, and from when its statements are refused (None: always)."""

    key: PublicKey
    reason: str
    since: int | None = None


@dataclass
class BundleContent:
    """The trust a bundle publishes."""

    keys: list[PublicKey] = field(default_factory=list)
    revocations: list[Revocation] = field(default_factory=list)
    labels: list[tuple[bytes, str]] = field(default_factory=list)  # (digest, label)
    rules: list[dict[str, Any]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys), so equal content is an equal file and hash."""
        doc = {
            "annofs-trust": FORMAT,
            "keys": [{"name": k.name, "public": k.to_text()} for k in self.keys],
            "revocations": [{"key": r.key.to_text(), "reason": r.reason,
                             **({"since": format_time(r.since)} if r.since is not None
                                else {})} for r in self.revocations],
            "labels": [{"digest": format_digest(d), "label": lab} for d, lab in self.labels],
            "rules": self.rules,
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def parse_time(text: str, where: str) -> int:
    """`2026-12-01T00:00:00Z` as seconds since the epoch."""
    import calendar
    import time
    try:
        return calendar.timegm(time.strptime(text, _TIME))
    except (ValueError, TypeError):
        raise UsageError(one_line(f"{where}: {text!r} is not a UTC time like "
                                  f"2026-12-01T00:00:00Z")) from None


def _list(doc: dict[str, Any], key: str, where: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise UsageError(f"{where}: {key}: must be a list")
    return value


def _obj(item: Any, keys: tuple[str, ...], optional: tuple[str, ...], where: str) -> None:
    if not isinstance(item, dict):
        raise UsageError(f"{where}: must be an object")
    for k in keys:
        if not isinstance(item.get(k), str):
            raise UsageError(f"{where}.{k}: missing or not a string")
    for k in item:
        if k not in keys and k not in optional:
            raise UsageError(one_line(f"{where}: unknown field {k!r}"))


def parse_content(data: bytes, where: str) -> BundleContent:
    """Parse `annofs-trust.json`; UsageError naming `where` and the field."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UsageError(one_line(f"{where}: not JSON ({e})")) from None
    if not isinstance(doc, dict) or doc.get("annofs-trust") != FORMAT:
        raise UsageError(f"{where}: not an annofs trust file (format {FORMAT})")
    unknown = set(doc) - {"annofs-trust", "keys", "revocations", "labels", "rules"}
    if unknown:
        raise UsageError(one_line(f"{where}: unknown field {sorted(unknown)[0]!r}"))
    out = BundleContent()
    for i, item in enumerate(_list(doc, "keys", where)):
        w = f"{where}: keys[{i}]"
        _obj(item, ("name", "public"), (), w)
        pk = parse_public_key(item["public"], w)
        if pk.name != item["name"]:
            raise UsageError(one_line(f"{w}: name {item['name']!r} differs from the key's"))
        out.keys.append(pk)
    for i, item in enumerate(_list(doc, "revocations", where)):
        w = f"{where}: revocations[{i}]"
        _obj(item, ("key", "reason"), ("since",), w)
        if one_line(item["reason"]) != item["reason"] or len(item["reason"]) > 500:
            # Shown in logs, events and status lines: one printable line.
            raise UsageError(f"{w}.reason: must be one printable line of at most 500 "
                             f"characters")
        since = item.get("since")
        if since is not None and not isinstance(since, str):
            raise UsageError(f"{w}.since: must be a string")
        out.revocations.append(Revocation(
            parse_public_key(item["key"], w), item["reason"],
            parse_time(since, f"{w}.since") if since is not None else None))
    for i, item in enumerate(_list(doc, "labels", where)):
        w = f"{where}: labels[{i}]"
        _obj(item, ("digest", "label"), (), w)
        check_word(item["label"], "label")
        out.labels.append((parse_digest(item["digest"], f"{w}.digest"), item["label"]))
    for i, item in enumerate(_list(doc, "rules", where)):
        if not isinstance(item, dict):
            raise UsageError(f"{where}: rules[{i}]: must be an object")
        out.rules.append(item)  # checked by the policy parser, which knows the keys
    return out
