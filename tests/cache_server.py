"""A binary cache served over HTTP on loopback, for `nix fetch` tests: a directory served
as `nix copy --to file://DIR` left it (what nix-serve and S3 sites answer alike), with
faults the test can ask for (a status for the next requests of a path, a stall)."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Faults:
    """What the server does wrong, per request path."""

    statuses: dict[str, list[int]] = field(default_factory=dict)  # path -> next answers
    # path -> bytes sent before a pause of stall_seconds; the rest follows the pause
    stall_after: dict[str, int] = field(default_factory=dict)
    stall_seconds: float = 5.0
    # Paths starting with this are followed by zeros, up to endless_bytes in all, with no
    # Content-Length (a hostile cache's endless body); `sent` gets each answer's length.
    endless_prefix: str | None = None
    endless_bytes: int = 256 << 20
    sent: list[int] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@contextmanager
def serve_cache(directory: Path, faults: Faults | None = None) -> Iterator[str]:
    """Serve `directory` at http://127.0.0.1:PORT (yielded); stops at the end."""
    faults = faults or Faults()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass  # the test's output stays its own

        def do_GET(self) -> None:
            rel = self.path.lstrip("/")
            faults.requests.append(rel)
            queued = faults.statuses.get(rel)
            if queued:
                self.send_error(queued.pop(0))
                return
            target = (directory / rel).resolve()
            if directory.resolve() not in target.parents or not target.is_file():
                self.send_error(404)
                return
            data = target.read_bytes()
            self.send_response(200)
            if faults.endless_prefix is not None and rel.startswith(faults.endless_prefix):
                self.send_header("Connection", "close")
                self.end_headers()
                self._endless(data)
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            cut = faults.stall_after.get(rel)
            if cut is None:
                self.wfile.write(data)
                return
            self.wfile.write(data[:cut])
            self.wfile.flush()
            time.sleep(faults.stall_seconds)
            with contextlib.suppress(OSError):  # the client gave up: a timeout test's aim
                self.wfile.write(data[cut:])

        def _endless(self, data: bytes) -> None:
            n = 0
            with contextlib.suppress(OSError):  # the client hung up: what the test wants
                self.wfile.write(data)
                n = len(data)
                block = bytes(1 << 16)
                while n < faults.endless_bytes:
                    self.wfile.write(block)
                    n += len(block)
            faults.sent.append(n)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
