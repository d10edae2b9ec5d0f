"""`annofs nix serve` as a command: every mistake is one line, exit 2, before it listens.
(Serving itself, to the real Nix, is in t4_nix_serve.)"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

from conftest import annofs_cmd
from t5_nix_cli import annofs, one_line, world

__all__ = ["world"]  # the fixture, found by name


def test_serve_usage_errors_are_exit_2(world: dict[str, Path], tmp_path: Path) -> None:
    s, p = world["store"], str(world["policy"])
    listen = ("--listen", "127.0.0.1:0")
    one_line(annofs(s, "nix", "serve", *listen), 2, "no policy: give --policy FILE")
    one_line(annofs(tmp_path / "none", "nix", "serve", *listen, "--policy", p), 2,
             "no annofs store here")
    one_line(annofs(s, "nix", "serve", "--listen", "0.0.0.0:0", "--policy", p), 2,
             "not a loopback address; the binary cache shows the store paths the policy "
             "approves, so other machines may see it only if you also pass --allow-remote")
    one_line(annofs(s, "nix", "serve", "--listen", "8080", "--policy", p), 2,
             "the binary cache's address must be HOST:PORT")
    one_line(annofs(s, "nix", "serve", *listen, "--policy", p, "--key",
                    str(world["keys"] / "cache-a-1.public")), 2, "cache-a-1.public")
    one_line(annofs(s, "nix", "serve", *listen, "--policy", p, "--key",
                    str(world["keys"] / "cache-a-1.secret")), 2,
             "--key signs every path served, but the policy lets unsigned content under "
             "/nix/store be read")
    one_line(annofs(s, "nix", "serve", *listen, "--policy", str(tmp_path / "nope.toml")), 2,
             "nope.toml")
    one_line(annofs(s, "nix", "serve", *listen, "--policy", p, "--dest", "relative"), 2,
             "relative: store paths start with '/'")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        one_line(annofs(s, "nix", "serve", "--listen", f"127.0.0.1:{port}", "--policy", p), 2,
                 f"127.0.0.1:{port}: the binary cache cannot listen here")


def test_allow_remote_serves_and_warns(world: dict[str, Path]) -> None:
    proc = subprocess.Popen(annofs_cmd("--store", str(world["store"]), "nix", "serve",
                                       "--listen", "0.0.0.0:0", "--allow-remote",
                                       "--policy", str(world["policy"])),
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        warning, started = proc.stderr.readline(), proc.stderr.readline()
        assert warning.startswith("warning: the binary cache at http://0.0.0.0:")
        assert "reachable from other machines over plain HTTP" in warning
        port = re.search(r"nix serve: http://0\.0\.0\.0:(\d+) ", started)
        assert port is not None, started
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/nix-cache-info",
                                    timeout=30) as r:
            assert r.read().startswith(b"StoreDir: /nix/store\n")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
