"""`annofs dashboard` as a command: the page over a store that is not mounted."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import annofs_cmd

from annofs.daemon.events import Event, EventLog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(annofs_cmd("--store", str(store), *args), capture_output=True,
                          text=True, timeout=60)


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_up(proc: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url + "api/info", timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"dashboard exited: {proc.stderr.read()}") from None
            if time.monotonic() > deadline:
                raise AssertionError("dashboard did not answer in 20 s") from None
            time.sleep(0.05)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """/src/proj: a.c signed by alice-1, b.c not; one refusal in the events log."""
    s = tmp_path / "store"
    tree = tmp_path / "proj"
    tree.mkdir()
    (tree / "a.c").write_text("int a;\n")
    (tree / "b.c").write_text("int b;\n")
    keys = tmp_path / "keys"
    keys.mkdir()
    for args in (("init",), ("import", str(tree), "/src/proj"),
                 ("key", "generate", "alice-1", "--dir", str(keys)),
                 ("sign", "--key", str(keys / "alice-1.secret"), "/src/proj/a.c")):
        res = run(s, *args)
        assert res.returncode == 0, res.stderr
    (tmp_path / "policy.toml").write_text('mode = "enforce"\ntrusted-keys-dir = "keys"\n'
                                          '[[rules]]\npath = "/src/**"\nsigners = 1\n')
    EventLog(s).record(Event(path="/src/proj/b.c", verdict="refused", pid=99,
                             reason="rules[0] /src/**: needs 1 distinct trusted signer"))
    return s


@pytest.fixture
def served(store: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    proc = subprocess.Popen(
        annofs_cmd("dashboard", "--store", str(store), "--listen", f"127.0.0.1:{port}",
                   "--policy", str(store.parent / "policy.toml")),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_up(proc, url)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_dashboard_of_an_unmounted_store(served: tuple[subprocess.Popen[str], str]) -> None:
    proc, url = served
    status, info = get(url + "api/info")
    assert status == 200 and info["live"] is False and info["mountpoint"] is None
    assert info["policy"]["mode"] == "enforce" and info["policy"]["trusted"] == ["alice-1"]
    _, cov = get(url + "api/coverage?path=/src/proj")
    t = cov["total"]
    assert (t["files"], t["signed"], t["unsigned"], t["refused"]) == (2, 1, 1, 1)
    _, events = get(url + "api/events")
    assert [(e["path"], e["verdict"], e["pid"]) for e in events] == [
        ("/src/proj/b.c", "refused", 99)]
    status, live = get(url + "api/live")
    assert status == 404 and "not mounted" in live["error"]
    _, why = get(url + "api/explain?path=/src/proj/b.c")
    assert why["status"] == "refused" and why["original"] is None
    # Ctrl-C stops it quietly.
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=20)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert code == 0, err
    assert "dashboard: " + url in err and "Traceback" not in err


def test_dashboard_usage_errors(store: Path, tmp_path: Path) -> None:
    far = run(store, "dashboard", "--listen", "0.0.0.0:0")
    assert far.returncode == 2
    assert "not a loopback address" in far.stderr and "--allow-remote" not in far.stdout
    assert len(far.stderr.strip().splitlines()) == 1
    bad = run(store, "dashboard", "--listen", "localhost")
    assert bad.returncode == 2 and "must be HOST:PORT" in bad.stderr
    none = run(tmp_path / "nostore", "dashboard")
    assert none.returncode == 2 and "no annofs store here" in none.stderr
    nopolicy = run(store, "dashboard", "--policy", str(tmp_path / "missing.toml"))
    assert nopolicy.returncode == 2 and "missing.toml" in nopolicy.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = run(store, "dashboard", "--listen", f"127.0.0.1:{port}")
    assert busy.returncode == 2 and "cannot listen here" in busy.stderr


def test_a_remote_address_when_asked_for_warns(store: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        annofs_cmd("--store", str(store), "dashboard", "--allow-remote", "--listen",
                   f"0.0.0.0:{port}"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_up(proc, f"http://127.0.0.1:{port}/")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    assert "warning: the dashboard at http://0.0.0.0:" in err
    assert "reachable from other machines" in err
