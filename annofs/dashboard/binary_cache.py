"""`annofs nix serve` over HTTP: the Nix binary cache protocol, on the dashboard's stack.

Starlette routes served by hypercorn's trio worker (`server.serve`), as the dashboard
is. What a path gets is decided by `annofs.nix.serve.ServedStore`, always in a worker
thread (`anyio.to_thread`): a narinfo may need a NAR hash of a big tree, and a NAR is
read from LMDB fragment by fragment, so the loop keeps answering other requests.

    GET /nix-cache-info                 StoreDir, WantMassQuery, Priority
    GET /<hash>.narinfo                 the narinfo, or 404 (absent or refused)
    GET /nar/<hash>-<nix32>.nar         the NAR, uncompressed (Content-Length: NarSize)
    GET /nar/<hash>-<nix32>.nar.zst     the NAR, zstd, streamed as it is compressed

HEAD answers as GET without a body; every other path is 404. There is no token: a
binary cache is read by Nix, which sends none, so whoever can connect reads what is
offered (the policy's approved paths); hence loopback only by default, and the Host
header checked as the dashboard checks it (no DNS rebinding from a web page).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterator

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from annofs.nix.narinfo import HASH_CHARS, HASH_PART_LEN
from annofs.nix.serve import ServedStore

log = logging.getLogger("annofs.nix.serve")

COMPRESSIONS = ("zstd", "none")
_H = f"[{HASH_CHARS}]{{{HASH_PART_LEN}}}"
_NARINFO = re.compile(f"/({_H})\\.narinfo")
_NAR = re.compile(f"/nar/({_H})-([{HASH_CHARS}]{{52}})\\.nar(\\.zst)?")
_PIECE = 1 << 20
_MAX_STREAMS = 16  # NARs sent at once: each holds an LMDB read slot (256 in all)
# Seconds a NAR stream may wait on a client that does not read while another request
# waits for a slot: then it gives its slot (and its read transaction) up.
STALL_SECONDS = 30.0


class _Streams:
    """The NARs sent at once: at most `limit`. A stream waiting on its client (between
    handing a piece over and being asked for the next) for more than `stall` seconds
    loses its slot to a request that waits for one: sixteen clients that never read
    used to hold every slot for ever (hypercorn's send cannot be cancelled, and has no
    timeout), and no other client got a NAR."""

    def __init__(self, limit: int, stall: float) -> None:
        self._free = anyio.Semaphore(limit)
        self._stall = stall
        self._waiting: dict[_Pieces, float] = {}  # stream -> since when it waits

    async def acquire(self) -> None:
        """A slot: waited for, taking one from a stalled stream if need be."""
        while True:
            with anyio.move_on_after(min(1.0, self._stall)):
                await self._free.acquire()
                return
            self._evict(anyio.current_time())

    def release(self) -> None:
        """Give a slot back."""
        self._free.release()

    def handed_over(self, pieces: _Pieces) -> None:
        """`pieces` waits on its client from now on."""
        self._waiting[pieces] = anyio.current_time()

    def asked_again(self, pieces: _Pieces) -> None:
        """The client took the piece (or went away): `pieces` no longer waits on it."""
        self._waiting.pop(pieces, None)

    def _evict(self, now: float) -> None:
        for pieces, since in list(self._waiting.items()):
            if now - since > self._stall:
                del self._waiting[pieces]
                pieces.evicted = True
                pieces.close()  # suspended at its yield: not running in a thread
                self._free.release()
                log.info("nix serve: a NAR client read nothing for %.0f s; its slot "
                         "went to another request", now - since)
                return


class _Pieces:
    """A NAR's chunks, zstd-compressed or not; `next()` runs in a worker thread."""

    def __init__(self, chunks: Iterator[bytes], zstd: bool) -> None:
        self._chunks = chunks
        self._done = False
        self.evicted = False  # its slot was taken back (a client that does not read)
        self._z = None
        if zstd:
            import zstandard

            self._z = zstandard.ZstdCompressor(level=3).compressobj()

    def next(self) -> bytes | None:
        """The next piece to send (about _PIECE bytes); None at the end.

        NAR chunks come a fragment at a time (tens of KiB): one worker-thread hop per
        chunk cost more than dumping (in-process, 200 MiB: 6080 hops, 2.5 s against
        a 1.0 s dump), so a hop gathers a piece of about a MiB.
        """
        parts: list[bytes] = []
        size = 0
        while size < _PIECE and not self._done:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._done = True
                out = self._z.flush() if self._z is not None else b""
            else:
                out = self._z.compress(chunk) if self._z is not None else chunk
            if out:
                parts.append(out)
                size += len(out)
        return b"".join(parts) if parts else None

    def close(self) -> None:
        """Stop early: the snapshot's read transaction ends."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def create_cache_app(served: ServedStore, *, compression: str = "zstd", priority: int = 30,
                     allowed_hosts: list[str] | None = None,
                     stall_seconds: float = STALL_SECONDS) -> Starlette:
    """The ASGI app of a binary cache over `served`; narinfos point at NARs compressed
    with `compression` (both kinds are served). `allowed_hosts`: the Host header values
    accepted (None: any). `stall_seconds`: see `_Streams`."""
    if compression not in COMPRESSIONS:
        raise ValueError(compression)
    cache_info = f"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {priority}\n"
    streams = _Streams(_MAX_STREAMS, stall_seconds)

    async def narinfo(request: Request, hash_part: str) -> Response:
        offer = await anyio.to_thread.run_sync(served.offer, hash_part)
        if offer is None:
            return _not_found()
        return PlainTextResponse(offer.narinfo(compression), media_type="text/x-nix-narinfo")

    async def nar(request: Request, hash_part: str, nar32: str, zstd: bool) -> Response:
        await streams.acquire()
        try:
            found = await anyio.to_thread.run_sync(served.nar, hash_part, nar32)
        finally:
            streams.release()
        if found is None:
            return _not_found()
        offer, chunks = found
        pieces = _Pieces(chunks, zstd)
        # Uncompressed, the length is NarSize; zstd is compressed as it is sent.
        headers = {} if zstd else {"content-length": str(offer.nar.size)}
        if request.method == "HEAD":
            pieces.close()
            return Response(b"", media_type="application/x-nix-nar", headers=headers)

        async def body() -> AsyncIterator[bytes]:
            await streams.acquire()
            try:
                while (piece := await anyio.to_thread.run_sync(pieces.next)) is not None:
                    streams.handed_over(pieces)
                    yield piece  # hypercorn sends it while this waits here
                    streams.asked_again(pieces)
                    if pieces.evicted:  # the slot and the snapshot went to another
                        # Cut short: ending the body would be a protocol error (fewer
                        # bytes than Content-Length), so wait, holding nothing, until
                        # the client goes away (Starlette then cancels this).
                        await anyio.sleep_forever()
            finally:
                streams.asked_again(pieces)
                if not pieces.evicted:
                    pieces.close()  # also when the client went away part-way
                    streams.release()

        return StreamingResponse(body(), media_type="application/x-nix-nar", headers=headers)

    async def route(request: Request) -> Response:
        path = request.url.path
        if path == "/nix-cache-info":
            return PlainTextResponse(cache_info, media_type="text/x-nix-cache-info")
        if m := _NARINFO.fullmatch(path):
            return await narinfo(request, m.group(1))
        if m := _NAR.fullmatch(path):
            return await nar(request, m.group(1), m.group(2), m.group(3) is not None)
        return _not_found()

    middleware = []
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    return Starlette(routes=[Route("/{rest:path}", route, methods=["GET", "HEAD"])],
                     middleware=middleware)


def _not_found() -> Response:
    return PlainTextResponse("not in this cache\n", status_code=404)
