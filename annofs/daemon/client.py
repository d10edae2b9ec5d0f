"""The client side of the control channel: plain sockets, so commands start fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from annofs.errors import StoreError, UsageError

SOCKET_NAME = "control.sock"


def socket_path(store: Path) -> Path:
    """Where a store's daemon listens."""
    return store / SOCKET_NAME


def request(store: Path, op: str, timeout: float = 600.0, **args: Any) -> Any:
    """Send one request to the daemon serving `store`; its result, or its error raised."""
    import socket  # here: most commands never talk to a daemon

    path = socket_path(store)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as e:
            raise StoreError(f"{path}: cannot reach the daemon ({e.strerror})") from None
        s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    try:
        answer = json.loads(bytes(buf))
    except ValueError:
        raise StoreError(f"{path}: the daemon gave no answer") from None
    if answer.get("ok"):
        return answer.get("result")
    err = UsageError(answer.get("error", "the daemon refused"))
    err.exit_status = int(answer.get("status", 2))
    raise err
