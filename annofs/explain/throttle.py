"""Explanations on demand cost the daemon CPU (finding an original, a diff): a bound per
user, so that one user asking `user.annofs.why` in a loop slows nobody else down.

`PerCaller` keeps one token bucket (`RateLimit`) per uid. Over the limit the
caller gets a one-line answer saying when to try again, not an error: a busy user is
not a problem for the daemon's log.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

WHY_BURST = 10  # explanations a user may ask for at once
WHY_PER = 60.0  # ... and again, refilled over this many seconds
MAX_CALLERS = 1024  # buckets kept; beyond that, the idle (full) ones are dropped
# getxattr(2) is often asked twice for one value (a small buffer, ERANGE, then the size
# it needs: Python's os.getxattr does so): the answer is kept this long per caller and
# file, so the second call neither computes again nor takes a token.
RECENT_SECONDS = 5.0
RECENT_ENTRIES = 256


class RateLimit:
    """At most `burst` explanations per `per` seconds (refusals can come in floods: a
    build opening thousands of patched files must not fill the log or the disk).

    `allow(now)` says whether to explain this one; `suppressed()` how many were skipped
    since the last call (to log "N more refusals not explained").
    """

    def __init__(self, burst: int = 10, per: float = 60.0) -> None:
        self._burst, self._per = burst, per
        self._tokens = float(burst)
        self._last: float | None = None
        self._skipped = 0

    def allow(self, now: float) -> bool:
        if self._last is not None:
            self._tokens = min(self._burst,
                               self._tokens + (now - self._last) * self._burst / self._per)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self._skipped += 1
        return False

    def suppressed(self) -> int:
        n, self._skipped = self._skipped, 0
        return n

    def retry_after(self, now: float) -> float:
        """Seconds from `now` until `allow` would say yes again (0: it would now)."""
        tokens = self._tokens
        if self._last is not None:
            tokens = min(self._burst, tokens + (now - self._last) * self._burst / self._per)
        return max(0.0, (1 - tokens) * self._per / self._burst)


class PerCaller:
    """A token bucket per uid: `wait(uid, now)` is 0 if the call may go ahead (and takes
    a token), else the seconds until it may."""

    def __init__(self, burst: int = WHY_BURST, per: float = WHY_PER) -> None:
        self.burst, self.per = burst, per
        self._buckets: dict[int, tuple[RateLimit, float]] = {}

    def wait(self, uid: int, now: float) -> float:
        """0.0 and a token taken, or how long `uid` must wait for one."""
        entry = self._buckets.get(uid)
        if entry is None:
            if len(self._buckets) >= MAX_CALLERS:
                self._forget_idle(now)
            bucket = RateLimit(self.burst, self.per)
        else:
            bucket = entry[0]
        self._buckets[uid] = (bucket, now)
        if bucket.allow(now):
            return 0.0
        bucket.suppressed()  # nothing to report later: the caller was told
        return bucket.retry_after(now)

    def _forget_idle(self, now: float) -> None:
        # A bucket untouched for `per` seconds is full again: forgetting it changes nothing.
        self._buckets = {u: e for u, e in self._buckets.items() if now - e[1] < self.per}
        if len(self._buckets) >= MAX_CALLERS:
            self._buckets.clear()  # only reachable with >1024 active uids: start over


class Recent:
    """The last answers, by (uid, inode, version, policy generation), for a few seconds."""

    def __init__(self, seconds: float = RECENT_SECONDS, entries: int = RECENT_ENTRIES) -> None:
        self.seconds, self.entries = seconds, entries
        self._answers: dict[Hashable, tuple[bytes, float]] = {}

    def get(self, key: Hashable, now: float) -> bytes | None:
        """The answer kept under `key`, if it is recent enough."""
        hit = self._answers.get(key)
        if hit is None or now - hit[1] > self.seconds:
            return None
        return hit[0]

    def put(self, key: Hashable, value: bytes, now: float) -> None:
        """Keep `value` under `key` (at most `entries`: the oldest go first)."""
        self._answers.pop(key, None)
        self._answers[key] = (value, now)
        while len(self._answers) > self.entries:
            del self._answers[next(iter(self._answers))]


def limited_text(wait: float) -> bytes:
    """The one-line answer for a caller over the limit."""
    return f"explanation rate-limited, try again in {max(1, math.ceil(wait))} s\n".encode()
