"""Serving the dashboard: where it listens, and hypercorn on the caller's trio loop.

The listening socket is bound by `bind()` before anything else happens (before the mount
is made, for `annofs mount --dashboard`), so a taken port or a bad address is a one-line
error at the command, not a daemon that mounted and then could not serve. Hypercorn is
handed the bound socket (`fd://`), and runs as one more task of the loop that serves the
filesystem: no thread, no second event loop.

Every server has its own access token (`new_token`): the page and every route answer
only a browser that came through `http://HOST:PORT/?token=...` (see `app.TokenGate`).
That URL is printed by the command and written to `<store>/dashboard.url`, readable by
the store's owner only, so other local users who can reach the port see nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from annofs.errors import UsageError

if TYPE_CHECKING:
    from annofs.fs.enforce import OpenGuard
    from annofs.trust.gate import TrustGate
    from annofs.trust.policy import Policy
    from annofs.volume import Volume

log = logging.getLogger("annofs.dashboard")

# In the store (a 0700 directory), mode 0600: the page's URL with its access token.
URL_FILE = "dashboard.url"


@dataclass(frozen=True)
class ListenAddress:
    """Where the dashboard listens."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect."""
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def url(self) -> str:
        """The page's address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def parse_listen(text: str, *, allow_remote: bool = False, what: str = "the dashboard",
                 shows: str = "every file read here",
                 remote_option: str = "--dashboard-allow-remote") -> ListenAddress:
    """`HOST:PORT` (`[v6]:PORT`; `localhost` means 127.0.0.1). A non-loopback address
    is refused unless `allow_remote`: the page shows what is read and signed here.
    `what`, `shows` and `remote_option` word the messages (`annofs nix serve` too)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise UsageError(f"{text!r}: {what}'s address must be HOST:PORT, "
                         f"e.g. 127.0.0.1:8080")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise UsageError(f"{text!r}: port {port} is out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{text!r}: {host!r} is not an IP address "
                         f"(give one, e.g. 127.0.0.1)") from None
    if not ip.is_loopback and not allow_remote:
        raise UsageError(f"{text!r}: not a loopback address; {what} shows {shows}, so "
                         f"other machines may see it only if you also pass {remote_option}")
    return ListenAddress(str(ip), port)


def new_token() -> str:
    """A fresh access token for one server (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def access_url(addr: ListenAddress, token: str) -> str:
    """The URL that lets a browser in: the page's address with the token."""
    return f"{addr.url}?token={token}"


def write_url_file(store: Path, url: str) -> Path:
    """Write `url` to `<store>/dashboard.url`, readable and writable by the owner only
    (created 0600 under a temporary name, then renamed over any older one)."""
    path = store / URL_FILE
    tmp = store / f"{URL_FILE}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(url + "\n")
    os.replace(tmp, path)
    return path


def remove_url_file(store: Path, url: str) -> None:
    """Remove `<store>/dashboard.url` if it still holds `url` (another dashboard of the
    same store may have written its own since: that one stays)."""
    path = store / URL_FILE
    with contextlib.suppress(OSError):
        if path.read_text().strip() == url:
            path.unlink()


def remote_warning(addr: ListenAddress) -> str:
    """What to tell a user who asked for a dashboard other machines can reach."""
    return (f"warning: the dashboard at {addr.url} is reachable from other machines over "
            f"plain HTTP: anyone who sees its traffic can take the access token, and then "
            f"sees which files are read here, and why refused ones differ from their "
            f"signed originals")


def bind(addr: ListenAddress, what: str = "the dashboard") -> socket.socket:
    """A listening TCP socket at `addr` (UsageError naming the address if that fails)."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise UsageError(f"{addr.host}:{addr.port}: {what} cannot listen here "
                         f"({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def bound_address(sock: socket.socket) -> ListenAddress:
    """The address a bound socket listens at (the real port, if 0 was asked for)."""
    host, port = sock.getsockname()[:2]
    return ListenAddress(host, port)


async def serve(app: object, sock: socket.socket, *,
                shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` (ASGI) on the bound `sock` until cancelled, or until
    `shutdown_trigger()` returns; started once listening.

    Hypercorn takes the socket over (it closes it when done)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    url = bound_address(sock).url
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("annofs.dashboard.http")
    # Server-sent events streams stay open: at shutdown, do not wait for them.
    config.graceful_timeout = 0.5
    config.h2_max_concurrent_streams = 16
    config.include_server_header = False
    config.keep_alive_timeout = 30
    log.info("dashboard at %s", url)
    await hypercorn_serve(app, config, mode="asgi",  # type: ignore[arg-type]
                          shutdown_trigger=shutdown_trigger, task_status=task_status)


async def serve_for_mount(sock: socket.socket, token: str, vol: Volume, guard: OpenGuard,
                          gate: TrustGate | None, mountpoint: Path,
                          task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    """`annofs mount --dashboard`: the page over the mounted volume, with the live feed
    of every open the guard judges (its verdict sink is teed into the feed)."""
    from annofs.daemon.feed import Feed
    from annofs.dashboard.app import Dashboard, create_app, loopback_hosts

    feed = Feed()
    guard.sink = feed.tee(guard.sink)
    guard.every_verdict = True  # the live feed shows allowed opens too
    addr = bound_address(sock)
    app = create_app(Dashboard(vol, vol.store.path, gate, feed, mountpoint), token=token,
                     allowed_hosts=loopback_hosts(addr.host) if addr.loopback else None)
    await serve(app, sock, task_status=task_status)


def serve_store(store: Path, sock: socket.socket, token: str, policy: Policy | None) -> None:
    """`annofs dashboard`: the page over a store that is not mounted here (coverage,
    files, the events log; no live opens), until interrupted. Only `token` lets in."""
    from annofs.dashboard.app import Dashboard, create_app, loopback_hosts
    from annofs.trust.gate import TrustGate
    from annofs.volume import Volume

    vol = Volume.open(store)
    try:
        gate = TrustGate(vol, policy) if policy is not None else None
        addr = bound_address(sock)
        app = create_app(Dashboard(vol, store, gate), token=token,
                         allowed_hosts=loopback_hosts(addr.host) if addr.loopback else None)
        trio.run(partial(serve, app, sock, shutdown_trigger=_until_interrupted))
    finally:
        vol.close()


async def _until_interrupted() -> None:
    # A signal receiver, not KeyboardInterrupt: that would be raised in whichever task
    # runs when Ctrl-C comes, a request handler's, and end in a traceback.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return
