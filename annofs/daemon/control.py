"""The control channel: annofs commands talking to the daemon that serves a store.

A Unix socket in the store (`control.sock`, mode 0600), and every connection's peer is
checked with SO_PEERCRED: only the mount's owner (or root) may change the store through
it. One JSON request per connection, one JSON answer: {"ok": true, "result": ...} or
{"ok": false, "error": "...", "status": 2}. Malformed requests are answered, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from annofs.daemon.client import socket_path
from annofs.errors import AnnofsError, UsageError

log = logging.getLogger("annofs.control")

MAX_REQUEST = 1 << 20
_PEERCRED = struct.Struct("3i")

Handler = Callable[[dict[str, Any], int], Awaitable[Any]]


def _peer_uid(sock: trio.socket.SocketType) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return uid


class ControlServer:
    """Serves requests on the store's socket with the given handlers (op name -> handler)."""

    def __init__(self, store: Path, handlers: dict[str, Handler]) -> None:
        self.path = socket_path(store)
        self.handlers = handlers
        self.owner = os.getuid()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports started once the socket accepts connections."""
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is created 0600: owner only
        try:
            await listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        listener.listen(16)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _addr = await listener.accept()
                    nursery.start_soon(self._serve_one, conn)
        finally:
            listener.close()
            if self.path.exists():
                self.path.unlink()

    async def _serve_one(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        async with stream:
            try:
                uid = _peer_uid(conn)
                if uid not in (self.owner, 0):
                    log.warning("control: refused a connection from uid %d", uid)
                    # Take the request (unparsed, for a second at most) before answering:
                    # closing with unread data resets the connection, and the client would
                    # see ECONNRESET instead of the refusal.
                    with trio.move_on_after(1):
                        await _drain_request(stream)
                    answer: dict[str, Any] = {"ok": False, "status": 2,
                                              "error": "permission denied: not the mount's owner"}
                else:
                    answer = await self._answer(await _read_request(stream), uid)
            except UsageError as e:
                answer = {"ok": False, "status": 2, "error": str(e)}
            except (OSError, trio.BrokenResourceError):
                return  # the client went away
            except Exception:
                # An exception escaping here would end the nursery, and with it the
                # daemon and the mount: one bad request must never do that.
                log.exception("control: a request failed")
                answer = {"ok": False, "status": 1, "error": "control: internal error"}
            try:
                await stream.send_all(json.dumps(answer).encode() + b"\n")
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _answer(self, request: Any, uid: int) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "status": 2, "error": "control: a request needs an 'op'"}
        handler = self.handlers.get(request["op"])
        if handler is None:
            return {"ok": False, "status": 2, "error": f"control: unknown op {request['op']!r}"}
        args = request.get("args", {})
        if not isinstance(args, dict):
            return {"ok": False, "status": 2, "error": "control: 'args' must be an object"}
        try:
            return {"ok": True, "result": await handler(args, uid)}
        except AnnofsError as e:
            return {"ok": False, "status": e.exit_status, "error": str(e)}
        except Exception as e:
            log.exception("control: %s failed", request["op"])
            return {"ok": False, "status": 1, "error": f"internal error: {e}"}


async def _drain_request(stream: trio.SocketStream) -> None:
    """Read and drop one request line (at most MAX_REQUEST bytes)."""
    seen = 0
    while seen <= MAX_REQUEST:
        data = await stream.receive_some(65536)
        if not data or b"\n" in data:
            return
        seen += len(data)


async def _read_request(stream: trio.SocketStream) -> Any:
    buf = bytearray()
    while b"\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            break
        buf += data
        if len(buf) > MAX_REQUEST:
            raise UsageError("control: request too large")
    try:
        return json.loads(bytes(buf).split(b"\n", 1)[0] or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"control: request is not JSON ({e})") from None
    except RecursionError:
        # json's decoder recurses once per nesting level: "[[[[..." a few thousand deep.
        raise UsageError("control: request is nested too deeply") from None
