"""How much of each file's history `annofs gc --keep-last N / --keep-within DURATION` keeps.

A file's history is the chain of versions from the one its name refers to (its head)
back through `parent` to the empty root: what `annofs log` shows. `--keep-last N` keeps
the N newest of every such chain (the head counts as one), `--keep-within D` every
version in such a chain made less than D ago; given both, a version either keeps stays.
What else gc keeps whatever the rule (named versions, open handles' versions, signed
originals, the empty root) is gc's business (maintenance.gc.kept_versions), not this
module's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from annofs.content.versions import EMPTY_VERSION
from annofs.errors import UsageError
from annofs.store.records import Version

_UNIT_NS = {"s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9,
            "w": 7 * 86400 * 10**9}
_DURATION = re.compile(r"(?:\d{1,9}[smhdw])+")
_PART = re.compile(r"(\d+)([smhdw])")


@dataclass(frozen=True)
class Retention:
    """A history rule: keep the `keep_last` newest versions of each file, and those made
    within `keep_within_ns` nanoseconds; None leaves that part out."""

    keep_last: int | None = None
    keep_within_ns: int | None = None

    @property
    def active(self) -> bool:
        """Whether the rule prunes at all (without one, gc keeps every ancestor)."""
        return self.keep_last is not None or self.keep_within_ns is not None


def parse_duration(text: str) -> int:
    """`7d`, `12h`, `30m`, `45s`, `2w`, or a sum such as `1d12h`, in nanoseconds.

    UsageError (one line naming the value) for anything else, or for zero.
    """
    if not isinstance(text, str) or not _DURATION.fullmatch(text):
        raise UsageError(f"--keep-within {text!r}: not a duration (a number and a unit, "
                         f"s, m, h, d or w: 30m, 12h, 7d, 1d12h)")
    ns = sum(int(n) * _UNIT_NS[u] for n, u in _PART.findall(text))
    if ns == 0:
        raise UsageError(f"--keep-within {text!r}: must be longer than zero")
    return ns


def check_keep_last(n: Any) -> int:
    """`--keep-last N` as given: a whole number, at least 1 (the head is one of the N)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise UsageError(f"--keep-last {n!r}: not a whole number")
    if n < 1:
        raise UsageError(f"--keep-last {n}: must be at least 1 (the current version is "
                         f"always kept and counts as one)")
    return n


def retention_from(keep_last: Any, keep_within: Any) -> Retention:
    """The rule from the command line's (or a control request's) raw values, checked:
    `keep_last` an int or None, `keep_within` a duration string or None."""
    return Retention(
        keep_last=None if keep_last is None else check_keep_last(keep_last),
        keep_within_ns=None if keep_within is None else parse_duration(keep_within))


def retained(versions: Mapping[int, Version], heads: Iterable[int], rule: Retention,
             now_ns: int) -> set[int]:
    """The versions `rule` keeps in the histories of `heads` (each head included).

    Every chain is walked once at most for `keep_within` (a version's age does not depend
    on which head reaches it, so a walk stops where an earlier one went), and N steps per
    head for `keep_last`; a cycle (a corrupt graph) ends a walk rather than looping.
    """
    keep: set[int] = set()
    heads = [h for h in heads if h in versions]
    if rule.keep_last is not None:
        for head in heads:
            vid, seen = head, 0
            while vid in versions and vid != EMPTY_VERSION and seen < rule.keep_last:
                keep.add(vid)
                seen += 1
                vid = versions[vid].parent
    if rule.keep_within_ns is not None:
        cutoff = now_ns - rule.keep_within_ns
        walked: set[int] = set()
        for head in heads:
            vid = head
            while vid in versions and vid != EMPTY_VERSION and vid not in walked:
                walked.add(vid)
                if versions[vid].created_ns >= cutoff:
                    keep.add(vid)
                vid = versions[vid].parent
    keep.update(heads)
    return keep
