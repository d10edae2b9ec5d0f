"""Explanations asked for by another user (uid 65534 through --allow-other; issue 15.4).

root keeps a signed C file, 0600 in a 0700 directory, with a secret line in it; most of
the file is public text. The other user writes a copy of the public part into a
world-writable directory under the same rule: it shares fragments with root's file, so
it is refused and its explanation finds root's file as the signed original. The diff
would quote root's secret line; it must not, and neither the path nor the digest of
root's file may appear. The same user's copy of a file it may read is explained in
full. And `user.annofs.why` is bounded per uid: a flood costs the daemon a few
explanations, and the mount keeps answering others at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd
from fuse_helpers import annofs, as_user, new_mount, stats, stop_and_check
from t2_explain import SOURCE

from annofs.cli import why_cmds
from annofs.cli.main import main as cli_main
from annofs.explain.throttle import WHY_BURST

# Imported here: the child dropped to another user cannot read the interpreter's files.
assert why_cmds.why_cmd is not None

SECRET = b'const char *db_password = "hunter2-correct-horse";\n'
# The secret sits in the middle of public text: a copy of the public part shares all
# of root's fragments but the one or two around the secret.
HALF = len(SOURCE) // 2
CUT = SOURCE.index(b"\n", HALF) + 1
PRIVATE = SOURCE[:CUT] + SECRET + SOURCE[CUT:]
PUBLIC_LIB = SOURCE.replace(b"return x *", b"return x +")


@pytest.fixture
def mount() -> Iterator[Mount]:
    """/src/private/secret.c (root, 0600 in 0700), /src/public/lib.c (0644), /src/drop
    (0777), all signed by alice-1 in one statement; mounted --allow-other, enforcing."""
    base = Path(tempfile.mkdtemp(prefix="annofs-why-"))
    base.chmod(0o755)
    host = base / "host" / "src"
    (host / "private").mkdir(parents=True)
    (host / "public").mkdir()
    (host / "drop").mkdir()
    (host / "private" / "secret.c").write_bytes(PRIVATE)
    (host / "public" / "lib.c").write_bytes(PUBLIC_LIB)
    (host / "private" / "secret.c").chmod(0o600)
    (host / "private").chmod(0o700)
    (host / "drop").chmod(0o777)
    keys = base / "etc" / "keys"
    keys.mkdir(parents=True)
    (base / "fs").mkdir()
    m = new_mount(base / "fs")
    m.stop()
    annofs("--store", str(m.store), "import", str(host), "/src")
    annofs("--store", str(m.store), "key", "generate", "alice-1", "--dir", str(keys))
    annofs("--store", str(m.store), "sign", "--key", str(keys / "alice-1.secret"), "/src")
    (keys / "alice-1.secret").unlink()
    (base / "etc" / "policy.toml").write_text(
        'mode = "enforce"\ndefault = "allow"\ntrusted-keys-dir = "keys"\n'
        '[[rules]]\npath = "/src/**"\nsigners = 1\n')
    m.start("--allow-other", "--policy", str(base / "etc" / "policy.toml"))
    m.path.chmod(0o755)
    try:
        yield m
    finally:
        stop_and_check(m)
        shutil.rmtree(base, ignore_errors=True)
    assert not m.log_problems(), "the daemon logged:\n" + "\n".join(m.log_problems())


def _write_and_ask(path: str, data: bytes) -> tuple[bool, str]:
    """As the other user: write `path`, try to read it, and ask why."""
    with open(path, "wb") as f:
        f.write(data)
    try:
        with open(path, "rb"):
            readable = True
    except PermissionError:
        readable = False
    return readable, os.getxattr(path, "user.annofs.why").decode()


def _stat_root_only(path: str) -> int:
    try:
        os.stat(path)
    except PermissionError:
        return 1
    return 0


def test_another_user_cannot_read_a_private_original_through_why(mount: Mount) -> None:
    drop = mount.path / "src" / "drop"
    assert as_user(_stat_root_only, str(mount.path / "src" / "private" / "secret.c")) == 1
    readable, text = as_user(_write_and_ask, str(drop / "mine.c"), SOURCE)
    assert not readable and "/src/drop/mine.c: refused" in text
    assert "signed original (found by shared fragments)" in text
    assert "signed by alice-1 (trusted), claim reviewed" in text
    assert "withheld" in text
    assert b"hunter2" not in text.encode() and "db_password" not in text
    assert "private" not in text and "secret.c" not in text
    digest = os.getxattr(mount.path / "src" / "private" / "secret.c", "user.annofs.digest")
    assert digest.decode()[7:23] not in text  # blake3:<hex>
    # root (the mount's owner) is shown everything: the test can see a leak
    full = os.getxattr(drop / "mine.c", "user.annofs.why").decode()
    assert "-" + SECRET.decode().rstrip("\n") in full and "as src/private/secret.c" in full
    # a file the user may read is explained in full to it
    patched = PUBLIC_LIB.replace(b"return x + 7", b"return x - 7")
    readable, text = as_user(_write_and_ask, str(drop / "lib.c"), patched)
    assert not readable and "as src/public/lib.c" in text
    assert "difference (original -> this file): text" in text
    # refusals were recorded in the events log, with the full explanation for the owner
    out = subprocess.run(annofs_cmd("--store", str(mount.store), "events", "--json"),
                         capture_output=True, text=True, check=True).stdout
    events = [json.loads(line) for line in out.splitlines()]
    assert {e["path"] for e in events if e["verdict"] == "refused"} >= {
        "/src/drop/mine.c", "/src/drop/lib.c"}


def _annofs_why(*args: str) -> tuple[int, str]:
    """`annofs ARGS` in this process (the other user cannot run the interpreter, which
    lives under root's home): exit status and output."""
    out = io.StringIO()
    sys.argv = ["annofs", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cli_main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue()


def test_annofs_why_runs_only_as_the_store_s_owner(mount: Mount) -> None:
    as_user(_write_and_ask, str(mount.path / "src" / "drop" / "mine.c"), SOURCE)
    policy = str(mount.store.parent.parent / "etc" / "policy.toml")
    code, out = _annofs_why("--store", str(mount.store), "why", "--policy", policy,
                            "/src/drop/mine.c")
    assert code == 1 and "hunter2" in out  # the owner, offline: everything
    mine = str(mount.path / "src" / "drop" / "mine.c")
    for args in (("--store", str(mount.store), "why", "--policy", policy, "/src/drop/mine.c"),
                 ("--store", str(mount.store), "why", "--policy", policy, mine),
                 ("why", "--policy", policy, mine)):
        code, out = as_user(_annofs_why, *args)
        assert code == 2 and "hunter2" not in out, out
        assert "not readable" in out or "ermission denied" in out, out
        print(f"as uid 65534: annofs {' '.join(args[-2:])}: exit {code}: {out.strip()}")


def _flood(paths: list[str], calls: int) -> tuple[int, int, float]:
    limited = explained = 0
    start = time.monotonic()
    for i in range(calls):
        v = os.getxattr(paths[i % len(paths)], "user.annofs.why")
        if v.startswith(b"explanation rate-limited, try again in "):
            limited += 1
        else:
            explained += 1
    return limited, explained, time.monotonic() - start


def _write_many(paths: list[str], data: bytes) -> None:
    for i, p in enumerate(paths):
        with open(p, "wb") as f:
            f.write(data + f"// {i}\n".encode())


def test_why_is_bounded_per_uid_and_others_are_answered(mount: Mount) -> None:
    drop = mount.path / "src" / "drop"
    mine = [str(drop / f"mine-{i}.c") for i in range(30)]  # 30 files: no answer is reused
    as_user(_write_many, mine, SOURCE)
    before = stats(mount)
    result: list[tuple[int, int, float]] = []
    flood = threading.Thread(target=lambda: result.append(as_user(_flood, mine, 300)))
    flood.start()
    slowest = 0.0
    public = mount.path / "src" / "public" / "lib.c"
    while flood.is_alive():
        t = time.monotonic()
        assert public.read_bytes() == PUBLIC_LIB
        os.stat(mine[0])
        slowest = max(slowest, time.monotonic() - t)
    flood.join()
    limited, explained, seconds = result[0]
    after = stats(mount)
    computed = after.get("why_explained", 0) - before.get("why_explained", 0)
    assert computed <= WHY_BURST + 1, computed  # + a token refilled during the flood
    assert limited >= 300 - 10 * computed  # each computed answer reused for 5 s at most
    assert after["why_limited"] - before.get("why_limited", 0) == limited
    assert slowest < 1.0, f"the mount took {slowest:.2f} s to answer during the flood"
    # another uid (root here) still gets its explanation
    text = os.getxattr(mine[0], "user.annofs.why").decode()
    assert "-" + SECRET.decode().rstrip("\n") in text
    print(f"300 getxattr(why) over 30 files as uid 65534 in {seconds:.2f} s: {explained} "
          f"explained, {limited} limited; slowest other request {slowest * 1000:.0f} ms")
