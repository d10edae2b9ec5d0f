"""The README's Nix workflow ("The real Nix on an enforcing mount"), run as written with
the real Nix (2.8, as root): its policy and its shell block, each command on its own.

Substitutions, nothing else: `/mnt/annofs` and `/nixroot` are temporary directories,
`https://cache.example.org` a loopback HTTP cache of nixw's closure signed by cache-a-1
and cache-b-1, `/nix/store/<hash>-hello` its top path, `cache-X-1:<base64>` the public
keys, `<h>-source` the path `add-source` printed, `/etc/nix/` the keys' directory,
`127.0.0.1:8081` a free port. The
project `add-source` adds (a flake with no inputs) is written before it runs; `nix
serve`, which runs until stopped, runs in the background while the real Nix copies the
fetched path from it with `require-sigs`.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from cache_server import serve_cache
from fuse_helpers import NOBODY, read_at, run_as
from t4_nix_real import NIX, NixWorld, nixw, run
from t4_nix_register import signed_cache

__all__ = ["nixw"]  # a pytest fixture, found by name in this module

README = Path(__file__).resolve().parent.parent / "README.md"
FLAKE = """{ outputs = { self }: { packages.@SYSTEM@.default = derivation {
    name = "from-project"; system = "@SYSTEM@"; builder = "/bin/sh";
    args = [ "-c" "read line < ${self}/data; echo $line > $out" ]; }; }; }
"""


def workflow() -> tuple[str, list[str]]:
    """The policy (toml) and the commands (backslash continuations joined) of the
    README's Nix workflow."""
    text = README.read_text()
    part = text.split("**The real Nix on an enforcing mount.**", 1)[1]
    policy = re.search(r"```toml\n(.*?)```", part, flags=re.S)
    block = re.search(r"```sh\n(.*?)```", part, flags=re.S)
    assert policy and block, "the README's Nix workflow is missing"
    joined = block.group(1).replace("\\\n", " ")
    return policy.group(1), [ln for ln in joined.splitlines() if ln.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until something accepts connections on the port (the server started), at most
    30 s; the server must not have exited."""
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"nix serve exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def test_the_readme_nix_workflow_runs(nixw: NixWorld, tmp_path: Path) -> None:
    policy_text, cmds = workflow()
    assert any(c.startswith("annofs nix fetch") for c in cmds)
    assert any(c.startswith("annofs nix serve") for c in cmds)
    tmp_path.chmod(0o755)  # nixbld1 walks to the store through it
    mnt, root = tmp_path / "mnt", tmp_path / "nixroot"
    mnt.mkdir()
    port = free_port()
    cache = signed_cache(nixw, tmp_path / "cache", "cache-b-1")
    subs = {"/mnt/annofs": str(mnt), "/nixroot": str(root),
            "/nix/store/<hash>-hello": nixw.top, "127.0.0.1:8081": f"127.0.0.1:{port}",
            "cache-a-1:<base64>": nixw.pub("cache-a-1"),
            "cache-b-1:<base64>": nixw.pub("cache-b-1"), "/etc/nix/": f"{nixw.keys}/"}

    def fill(text: str) -> str:
        for k, v in subs.items():
            text = text.replace(k, v)
        return text

    (tmp_path / "policy.toml").write_text(fill(policy_text))
    env = {**os.environ, "ANNOFS_STORE": str(tmp_path / "store"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    assert run(["annofs", "init"], env=env).returncode == 0
    serve: subprocess.Popen[bytes] | None = None
    bound = False
    try:
        with serve_cache(cache) as url:
            subs["https://cache.example.org"] = url
            for cmd in cmds:
                line = fill(cmd)
                if "<h>-source" in line:
                    raise AssertionError(f"no source path to put in: {line}")
                if line.startswith("annofs nix add-source"):
                    project = mnt / "src" / "project"
                    project.mkdir()
                    system = f"{platform.machine()}-linux"
                    (project / "flake.nix").write_text(FLAKE.replace("@SYSTEM@", system))
                    (project / "data").write_text("from the project\n")
                if line.startswith("annofs nix serve"):
                    serve = subprocess.Popen(shlex.split(line), cwd=tmp_path, env=env,
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
                    wait_listening(port, serve)
                    continue
                res = run(["bash", "-c", line], cwd=tmp_path, env=env)
                assert res.returncode == 0, (line, res.stdout, res.stderr)
                bound = bound or line.startswith("mount --bind")
                if line.startswith("annofs nix add-source"):
                    subs["/nix/store/<h>-source"] = res.stdout.split(" ", 1)[0]
                if line.startswith("annofs nix fetch"):
                    assert f"registered {nixw.top}" in res.stdout
                    assert "signatures by cache-a-1, cache-b-1" in res.stdout, res.stdout
                if "path-info" in line:
                    assert "cache-a-1:" in res.stdout and "cache-b-1:" in res.stdout
        # What the workflow promises: the fetched path, trusted on its signatures, is
        # read by another user; the build used the added source; the served cache
        # gives the real Nix the path with signatures it accepts.
        # (Through a directory opened by root: pytest's temporary parents are 0700.)
        dirfd = os.open(mnt, os.O_PATH | os.O_DIRECTORY)
        try:
            got = run_as((NOBODY, NOBODY, ()), read_at, dirfd,
                         f"{nixw.top.lstrip('/')}/share/greeting")
        finally:
            os.close(dirfd)
        assert got == b"hello\n"
        built = [p for p in os.listdir(root / "nix" / "store") if p.endswith("-from-project")]
        assert len(built) == 1, built
        dirfd = os.open(root / "nix" / "store", os.O_PATH | os.O_DIRECTORY)
        try:
            out = run_as((NOBODY, NOBODY, ()), read_at, dirfd, built[0])
        finally:
            os.close(dirfd)
        assert out == b"from the project\n"
        assert serve is not None
        copied = run([*NIX, "copy", "--from", f"http://127.0.0.1:{port}", "--to",
                      f"local?root={tmp_path / 'other'}", "--option", "require-sigs", "true",
                      "--option", "trusted-public-keys",
                      f"{nixw.pub('cache-a-1')} {nixw.pub('cache-b-1')}", nixw.top])
        assert copied.returncode == 0, copied.stderr
    finally:
        if serve is not None:
            serve.terminate()
            serve.communicate(timeout=30)
        if bound:
            subprocess.run(["umount", str(root / "nix" / "store")], check=True)
        if os.path.ismount(mnt):
            subprocess.run(["annofs", "umount", str(mnt)], env=env, check=True)
