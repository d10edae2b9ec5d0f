"""Binary caches as `nix fetch` reads them: a directory, a `file://` or an `http(s)://` URL.

A cache answers two questions: the bytes of `<hash>.narinfo` (or that it has none), and
a stream of the NAR file a narinfo's `URL` names. Nothing here trusts what it reads:
the narinfo's signatures and the NAR's hash are checked by the caller (nix/fetch.py).
What this module guards is the reading itself, against a cache that is hostile or
broken rather than wrong:

- a directory cache reads through nix/cachefile.py: regular files only, opened without
  blocking, every open and read answered in time, so a FIFO named `<hash>.narinfo` or a
  hung file system is a one-line error, never a read that hangs (and with it, in a
  mount's daemon, every request of the mount);
- a narinfo's `URL` stays inside the cache (the narinfo parser refuses anything else);
- an HTTP cache is checked once for `nix-cache-info` with `StoreDir: /nix/store`; every
  request has a timeout per read, and a refused connection, a reset, a timeout or a
  5xx answer is tried again (three times in all, with a pause that doubles); 404 and 403
  (what S3 answers for a missing key) mean "not in this cache";
- nothing is read whole into memory: a narinfo is read up to MAX_NARINFO + 1 bytes (the
  parser refuses more), a NAR is a stream.

urllib (the standard library) is enough for this: one GET at a time, streamed.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

from annofs.errors import UsageError
from annofs.nix.cachefile import open_cache_file, read_cache_file
from annofs.nix.narinfo import MAX_NARINFO

STORE_DIR = "/nix/store"
# Seconds a connection or one read may take before the request is tried again.
HTTP_TIMEOUT = 20.0
HTTP_TRIES = 3
# A NAR download as a whole: this long plus its bytes at MIN_RATE. A cache that sends a
# byte every 19 s passes every per-read timeout; this bounds it (SECURITY.md finding 9).
NAR_GRACE = 60.0
MIN_RATE = 64 * 1024  # bytes per second
_FIRST_PAUSE = 0.5
_USER_AGENT = "annofs-nix-fetch"

T = TypeVar("T")


class BinaryCache(Protocol):
    """Where narinfos and NARs come from."""

    where: str  # for messages: the directory or URL as the user gave it

    def narinfo(self, hash_part: str) -> bytes | None:
        """The bytes of `<hash_part>.narinfo` (at most MAX_NARINFO + 1), or None."""

    def open_nar(self, url: str, max_bytes: int | None = None) -> BinaryIO | None:
        """A stream of the NAR file at the narinfo's `URL`, or None if it is missing;
        `max_bytes`, the most it may have, bounds how long reading it may take."""


class DirectoryCache:
    """A cache in a local directory, in the layout `nix copy --to file://DIR` writes."""

    def __init__(self, path: Path, where: str | None = None) -> None:
        self.path = path
        self.where = where or str(path)

    def narinfo(self, hash_part: str) -> bytes | None:
        """See BinaryCache."""
        return read_cache_file(self.path / f"{hash_part}.narinfo", MAX_NARINFO + 1)

    def open_nar(self, url: str, max_bytes: int | None = None) -> BinaryIO | None:
        """See BinaryCache (a local file: no deadline)."""
        return open_cache_file(self.path / url)


class HttpCache:
    """A cache served over HTTP(S): cache.nixos.org, Hydra, nix-serve, Attic, S3 sites."""

    def __init__(self, url: str, *, timeout: float = HTTP_TIMEOUT, tries: int = HTTP_TRIES,
                 sleep: Callable[[float], None] = time.sleep, grace: float = NAR_GRACE,
                 min_rate: int = MIN_RATE) -> None:
        self.base = url.rstrip("/")
        self.where = url
        self.timeout = timeout
        self.grace = grace
        self.min_rate = min_rate
        self.tries = tries
        self._sleep = sleep
        self._checked = False

    def _url(self, rel: str) -> str:
        return f"{self.base}/{urllib.parse.quote(rel)}"

    def _get(self, rel: str) -> BinaryIO | None:
        """An open response for `rel`, None for 404/403; tried again on transient errors."""
        url = self._url(rel)
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        return self._retry(url, lambda: self._open(request, url))

    def _open(self, request: urllib.request.Request, url: str) -> BinaryIO | None:
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # type: ignore[no-any-return]
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in (403, 404, 410):
                return None
            if e.code >= 500 or e.code == 429:
                raise _Transient(f"{url}: HTTP {e.code} {e.reason}") from None
            raise UsageError(f"{url}: HTTP {e.code} {e.reason}") from None

    def _retry(self, url: str, attempt: Callable[[], T]) -> T:
        pause = _FIRST_PAUSE
        for n in range(1, self.tries + 1):
            try:
                return attempt()
            except _Transient as e:
                problem = str(e)
            except urllib.error.URLError as e:
                problem = f"{url}: {getattr(e.reason, 'strerror', None) or e.reason}"
            except (TimeoutError, ConnectionError) as e:
                problem = f"{url}: {e.strerror or 'timed out'}"
            if n < self.tries:
                self._sleep(pause)
                pause *= 2
        raise UsageError(f"{problem} (tried {self.tries} times)")

    def _read(self, rel: str, limit: int) -> bytes | None:
        """A whole small response (at most `limit` bytes), read within the retries."""
        url = self._url(rel)
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})

        def attempt() -> bytes | None:
            resp = self._open(request, url)
            if resp is None:
                return None
            with resp:
                return resp.read(limit)

        return self._retry(url, attempt)

    def check(self) -> None:
        """The cache says it serves /nix/store (`nix-cache-info`), once."""
        if self._checked:
            return
        info = self._read("nix-cache-info", 64 * 1024)
        if info is None:
            raise UsageError(f"{self.where}: not a binary cache (no nix-cache-info)")
        for line in info.decode("utf-8", "replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "StoreDir" and value.strip() != STORE_DIR:
                raise UsageError(f"{self.where}: serves the store {value.strip()!r}, "
                                 f"not {STORE_DIR}")
        self._checked = True

    def narinfo(self, hash_part: str) -> bytes | None:
        """See BinaryCache."""
        self.check()
        return self._read(f"{hash_part}.narinfo", MAX_NARINFO + 1)

    def open_nar(self, url: str, max_bytes: int | None = None) -> BinaryIO | None:
        """See BinaryCache."""
        self.check()
        allowed = self.grace + (max_bytes or 0) / self.min_rate
        start = time.monotonic()
        resp = self._get(url)
        if resp is None:
            return None
        return _Body(resp, self._url(url), start + allowed, allowed)  # type: ignore[return-value]


class _Body:
    """A response body whose failures mid-stream (a reset, a read that times out, a body
    cut short) are one-line errors naming the URL, not tracebacks."""

    def __init__(self, resp: BinaryIO, url: str, deadline: float | None = None,
                 allowed: float = 0.0) -> None:
        self._resp = resp
        self._url = url
        self._deadline = deadline
        self._allowed = allowed

    def _guard(self, read: Callable[[], T]) -> T:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise UsageError(f"{self._url}: the download took over {self._allowed:.0f} s "
                             f"(too slow for its size; given up)")
        try:
            return read()
        except (OSError, http.client.HTTPException) as e:
            why = getattr(e, "strerror", None) or type(e).__name__
            raise UsageError(f"{self._url}: the download broke off ({why})") from None

    def read(self, n: int = -1) -> bytes:
        return self._guard(lambda: self._resp.read(n))

    def readinto(self, b: bytearray | memoryview) -> int:
        return self._guard(lambda: self._resp.readinto(b))  # type: ignore[attr-defined]

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._resp.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transient(Exception):
    """An answer worth asking again for (5xx, 429)."""


def open_cache(text: str) -> BinaryCache:
    """A --cache argument: a directory, `file:///DIR`, or an `http(s)://` URL."""
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in ("http", "https"):
        return HttpCache(text)
    if scheme == "file":
        path = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
        where = text
    elif scheme and "://" in text:
        raise UsageError(f"{text}: unsupported cache URL (use a directory, file://, "
                         f"http:// or https://)")
    else:
        path, where = text, None
    # Absolute: the daemon may run in another working directory.
    directory = Path(os.path.abspath(path))
    if not directory.is_dir():
        raise UsageError(f"{where or directory}: no such cache directory")
    return DirectoryCache(directory, where)
