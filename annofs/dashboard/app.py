"""The dashboard's routes: a Starlette app over a store, read-only.

    GET /                      the page (static/index.html; app.js and style.css beside it)
    GET /api/info              store, mountpoint, policy summary (key names only), live or not
    GET /api/coverage?path=    counts per directory under a store directory, and its files
    GET /api/file?path=        a file's digest, versions along the edit graph, statements
    GET /api/explain?path=[&version=]   the explanation (Explanation.to_json())
    GET /api/events?limit=     the events log (refusals and warnings), newest last
    GET /api/live              server-sent events: every judged open, as it happens

Every request needs the server's access token (`TokenGate`): `/?token=...` once, which
sets a cookie, then the cookie (or `Authorization: Bearer TOKEN`, for scripts). Without
it, every path, the page and its static files included, is a 401 naming where the URL
is. Nothing here writes: any method but GET and HEAD is answered 405 before routing, and
no route reads a secret key (statements carry key names and public keys; only names are
shown). Blocking work runs in a worker thread, one request at a time, so the filesystem
served on the same trio loop never waits for the page.
"""

from __future__ import annotations

import hmac
import html
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import trio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from annofs.daemon.events import read_events
from annofs.daemon.feed import Feed, FeedItem
from annofs.dashboard.coverage import CoverageReader, parse_store_path
from annofs.dashboard.server import URL_FILE
from annofs.errors import AnnofsError, NotFoundError, UsageError
from annofs.trust.annotations import AnnotationStore
from annofs.trust.gate import TrustGate
from annofs.volume import Volume

STATIC = Path(__file__).parent / "static"
KEEPALIVE = 15.0
MAX_EVENTS = 5000

T = TypeVar("T")

# What the page may load: only what this server serves (no CDN, no inline script).
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class Dashboard:
    """What the routes read: the volume, its statements, the policy, the live feed."""

    vol: Volume
    store: Path
    gate: TrustGate | None = None  # the mount's (its policy follows reloads), or --policy's
    feed: Feed | None = None  # None: the store is not mounted here, no live opens
    mountpoint: Path | None = None
    annotations: AnnotationStore = field(init=False)
    reader: CoverageReader = field(init=False)
    limiter: trio.CapacityLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.annotations = (self.gate.annotations if self.gate is not None
                            else AnnotationStore(self.vol.store))
        self.reader = CoverageReader(self.vol, self.annotations, self.gate)
        # One computation at a time: the reader's caches are not locked, and the page
        # should never take more than one core from the filesystem.
        self.limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread, after any other dashboard computation."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # -- what the routes compute ------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The header of the page."""
        policy = None
        if self.gate is not None:
            p = self.gate.policy
            policy = {"source": p.source, "mode": p.mode.value, "default": p.default.value,
                      "trusted": sorted({names[0] for k, names in p.trusted.items() if names
                                         and k not in p.revoked}),
                      "revoked": sorted({names[0] for k, names in p.trusted.items() if names
                                         and k in p.revoked}),
                      "rules": [r.describe() for r in p.rules],
                      # The trust bundle: versions, expiry, root keys and threshold,
                      # revocations (BundleState.summary), and why it is stale.
                      "bundle": None if p.bundle is None else {
                          "source": p.bundle.source, "lines": list(p.bundle.summary),
                          "stale": p.bundle.stale_text(),
                          "on_stale": p.bundle.on_stale.value}}
        with self.vol.store.read() as txn:
            statements = self.annotations.count(txn)
        return {"store": str(self.store),
                "mountpoint": str(self.mountpoint) if self.mountpoint else None,
                "live": self.feed is not None, "policy": policy, "statements": statements}

    def explain(self, path: str, version: int | None) -> dict[str, Any]:
        """The explanation of the verdict for a file (its current version by default)."""
        from annofs.explain.report import explain

        if self.gate is None:
            raise UsageError("no policy: explanations need one (annofs dashboard --policy "
                             "FILE, or a mount with --policy)")
        parts = parse_store_path(path)
        with self.vol.store.read() as txn:
            if version is None:
                a = self.vol.namespace.resolve(txn, parts)
                if not a.is_reg:
                    raise UsageError(f"{path}: not a regular file")
                version = int(a.target)
            if not self.vol.versions.exists(txn, version):
                raise NotFoundError(f"version {version}: no such version")
            v = self.vol.versions.get(txn, version)
        e = explain(self.vol, self.annotations, self.gate.policy, parts, v)
        return e.to_json()

    def events(self, limit: int) -> list[dict[str, Any]]:
        """The events log's last `limit` events, oldest first."""
        return [asdict(e) for e in read_events(self.store)[-limit:]]


def item_json(item: FeedItem) -> dict[str, Any]:
    """A live open for the page."""
    # vars, not asdict: asdict deep-copies, and a build sends thousands of these a second.
    out = dict(vars(item.event))
    out["seq"] = item.seq
    out["signers"] = list(item.signers)
    return out


# -- middleware ------------------------------------------------------------------------------


class ReadOnly:
    """405 for anything but GET and HEAD, before any route sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            response = JSONResponse({"error": "the dashboard is read-only"}, status_code=405,
                                    headers={"Allow": "GET, HEAD", **_HEADERS})
            await response(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """The same defensive headers on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k.lower().encode(), v.encode()) for k, v in _HEADERS.items()
                    if k.lower().encode() not in present]
            await send(message)

        await self.app(scope, receive, with_headers)


class TokenGate:
    """Only a client that knows the server's token gets past: `?token=` (right) sets an
    HttpOnly, SameSite=Strict cookie and redirects to the same URL without the token
    (so it leaves the address bar and the history); the cookie, or an
    `Authorization: Bearer` header, then lets requests through. Anything else is a 401.

    The cookie's name carries the port: cookies are per host, not per port, and two
    dashboards on one machine must not overwrite each other's."""

    def __init__(self, app: ASGIApp, token: str, url_file: Path) -> None:
        self.app = app
        self.token = token.encode()
        self.url_file = url_file

    def matches(self, given: str) -> bool:
        """Whether `given` is the token (in constant time; any text is safe to give)."""
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        cookie = cookie_name(scope)
        given = request.query_params.getlist("token")
        if given:
            if len(given) == 1 and self.matches(given[0]):
                response: Response = RedirectResponse(_without_token(request),
                                                      status_code=303)
                response.set_cookie(cookie, self.token.decode(), httponly=True,
                                    samesite="strict", path="/")
            else:
                response = self.refuse(scope, "this access token is not the dashboard's")
            await response(scope, receive, send)
            return
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if self.matches(request.cookies.get(cookie, "")) or (
                scheme.lower() == "bearer" and self.matches(bearer.strip())):
            await self.app(scope, receive, send)
            return
        await self.refuse(scope, "the dashboard needs its access token")(scope, receive, send)

    def refuse(self, scope: Scope, why: str) -> Response:
        """The 401: JSON for the page's API calls, a short page for a browser."""
        where = (f"open the URL that `annofs mount --dashboard` or `annofs dashboard` "
                 f"printed, or the one in {self.url_file} (readable by the store's owner)")
        headers = {"WWW-Authenticate": 'Bearer realm="annofs dashboard"'}
        if scope["path"].startswith("/api/"):
            return JSONResponse({"error": f"{why}: {where}"}, status_code=401,
                                headers=headers)
        body = (f"<!doctype html><html lang=en><meta charset=utf-8>"
                f"<title>annofs dashboard: access token needed</title>"
                f"<h1>annofs dashboard</h1><p>{html.escape(why, quote=False)}: "
                f"{html.escape(where, quote=False)}.</p>")
        return HTMLResponse(body, status_code=401, headers=headers)


def cookie_name(scope: Scope) -> str:
    """The access cookie of the server `scope` reached (one per port)."""
    server = scope.get("server")
    return f"annofs-dashboard-{server[1] if server and server[1] else 0}"


def _without_token(request: Request) -> str:
    """The request's path and query, the token taken out: where the redirect goes."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(request.scope["path"])
    # "//host/x" would be a protocol-relative URL: a redirect to another site.
    path = "/" + path.lstrip("/")
    query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
    return f"{path}?{query}" if query else path


# -- the app ---------------------------------------------------------------------------------


def _error(e: AnnofsError) -> JSONResponse:
    status = 404 if isinstance(e, NotFoundError) else 400
    return JSONResponse({"error": str(e)}, status_code=status)


def _query_int(request: Request, name: str, default: int | None, lo: int,
               hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise UsageError(f"{name}={raw!r}: expected a number from {lo} to {hi}")
    return int(raw)


def create_app(d: Dashboard, *, token: str,
               allowed_hosts: list[str] | None = None) -> Starlette:
    """The ASGI app over `d`, answering only clients that know `token`. `allowed_hosts`:
    Host header values accepted (None: any); a loopback dashboard accepts only its own
    address, which stops a web page from reading it through a DNS name rebound to
    127.0.0.1."""

    def api(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            try:
                return JSONResponse(await fn(request))
            except AnnofsError as e:
                return _error(e)
        return route

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def info(request: Request) -> Any:
        return await d.run(d.info)

    async def coverage(request: Request) -> Any:
        parts = parse_store_path(request.query_params.get("path", "/"))
        return await d.run(d.reader.coverage, parts)

    async def file(request: Request) -> Any:
        path = request.query_params.get("path")
        if not path:
            raise UsageError("path: missing (the store path of a file)")
        return await d.run(d.reader.file, parse_store_path(path))

    async def explain(request: Request) -> Any:
        path = request.query_params.get("path")
        if not path:
            raise UsageError("path: missing (the store path of a file)")
        version = _query_int(request, "version", None, 0, 2**63 - 1)
        return await d.run(d.explain, path, version)

    async def events(request: Request) -> Any:
        limit = _query_int(request, "limit", 500, 1, MAX_EVENTS)
        assert limit is not None
        return await d.run(d.events, limit)

    async def live(request: Request) -> Response:
        if d.feed is None:
            return _error(NotFoundError("no live opens: this store is not mounted by this "
                                        "dashboard's daemon"))
        last = request.headers.get("last-event-id", "")
        since = int(last) if last.isdigit() else 0
        return StreamingResponse(_sse(d.feed, since), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    routes = [
        Route("/", index),
        Route("/api/info", api(info)),
        Route("/api/coverage", api(coverage)),
        Route("/api/file", api(file)),
        Route("/api/explain", api(explain)),
        Route("/api/events", api(events)),
        Route("/api/live", live),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(ReadOnly), Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    middleware.append(Middleware(TokenGate, token=token, url_file=d.store / URL_FILE))
    return Starlette(routes=routes, middleware=middleware)


def loopback_hosts(host: str) -> list[str]:
    """Host header values a loopback dashboard at `host` answers to."""
    return sorted({host, f"[{host}]", "localhost", "127.0.0.1", "[::1]", "::1"})


def _message(kind: str, data: Any, seq: int | None = None) -> bytes:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def _sse(feed: Feed, since: int) -> AsyncIterator[bytes]:
    """The live stream: recent opens first (those after `since`), then each new batch."""
    with feed.subscribe() as sub:
        # No await between subscribing and copying `recent`: nothing is published in
        # between (publish runs on this loop), so nothing is sent twice or missed.
        backlog = [item_json(i) for i in feed.recent if i.seq > since]
        yield _message("hello", {"backlog": len(backlog)})
        if backlog:
            yield _message("opens", backlog, backlog[-1]["seq"])
        while True:
            batch: list[FeedItem] = []
            with trio.move_on_after(KEEPALIVE):
                batch.append(await sub.receive.receive())
            # A build opening thousands of files: one message per batch, not per open.
            while len(batch) < 1000:
                try:
                    batch.append(sub.receive.receive_nowait())
                except trio.WouldBlock:
                    break
            if not batch:
                yield b": keepalive\n\n"
                continue
            if sub.dropped:
                yield _message("dropped", {"count": sub.dropped})
                sub.dropped = 0
            yield _message("opens", [item_json(i) for i in batch], batch[-1].seq)
            await trio.sleep(0.05)  # let a flood gather into the next batch
