"""`annofs dashboard` as a command: the page over a store that is not mounted, only to
whoever has the URL with its access token (printed, and in <store>/dashboard.url)."""

from __future__ import annotations

import http.cookiejar
import json
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.parse
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


def get(url: str, token: str | None = None) -> tuple[int, Any]:
    """GET a JSON route, with the token as a bearer header (as a script would)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def token_of(access_url: str) -> str:
    """The token in `http://HOST:PORT/?token=...`."""
    return urllib.parse.parse_qs(urllib.parse.urlsplit(access_url).query)["token"][0]


def wait_up(proc: subprocess.Popen[str], store: Path) -> str:
    """The URL in `<store>/dashboard.url`, once the server behind it answers."""
    deadline = time.monotonic() + 20
    while True:
        try:
            url = (store / "dashboard.url").read_text().strip()
            base = url.split("?")[0]
            req = urllib.request.Request(base + "api/info",
                                         headers={"Authorization": f"Bearer {token_of(url)}"})
            urllib.request.urlopen(req, timeout=2).close()
            return url
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
    """The dashboard at a free port; its URL with the access token."""
    port = free_port()
    proc = subprocess.Popen(
        annofs_cmd("dashboard", "--store", str(store), "--listen", f"127.0.0.1:{port}",
                   "--policy", str(store.parent / "policy.toml")),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = wait_up(proc, store)
        assert url.startswith(f"http://127.0.0.1:{port}/?token=")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_dashboard_of_an_unmounted_store(served: tuple[subprocess.Popen[str], str],
                                         store: Path) -> None:
    proc, access = served
    url, token = access.split("?")[0], token_of(access)
    status, info = get(url + "api/info", token)
    assert status == 200 and info["live"] is False and info["mountpoint"] is None
    assert info["policy"]["mode"] == "enforce" and info["policy"]["trusted"] == ["alice-1"]
    _, cov = get(url + "api/coverage?path=/src/proj", token)
    t = cov["total"]
    assert (t["files"], t["signed"], t["unsigned"], t["refused"]) == (2, 1, 1, 1)
    _, events = get(url + "api/events", token)
    assert [(e["path"], e["verdict"], e["pid"]) for e in events] == [
        ("/src/proj/b.c", "refused", 99)]
    status, live = get(url + "api/live", token)
    assert status == 404 and "not mounted" in live["error"]
    _, why = get(url + "api/explain?path=/src/proj/b.c", token)
    assert why["status"] == "refused" and why["original"] is None
    # The URL file: the owner's only.
    url_file = store / "dashboard.url"
    assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
    # Ctrl-C stops it quietly, and takes the URL file with it (the token is dead).
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=20)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert code == 0, err
    assert f"dashboard: {access} (also in {url_file}; Ctrl-C to stop)" in err
    assert "Traceback" not in err
    assert not url_file.exists()


def test_without_the_token_nothing_is_shown(served: tuple[subprocess.Popen[str], str],
                                            store: Path) -> None:
    _, access = served
    url = access.split("?")[0]
    for route in ("", "static/app.js", "api/info", "api/coverage?path=/src/proj",
                  "api/explain?path=/src/proj/b.c", "api/events"):
        for token in (None, "wrong"):
            req = urllib.request.Request(url + route, headers={"Authorization": f"Bearer {token}"}
                                         if token else {})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 401, route
            body = e.value.read().decode()
            assert str(store / "dashboard.url") in body and "b.c" not in body
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "?token=wrong", timeout=10)
    assert e.value.code == 401


def test_the_url_lets_a_browser_in_once_then_the_cookie(
        served: tuple[subprocess.Popen[str], str]) -> None:
    _, access = served
    url = access.split("?")[0]
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with browser.open(access, timeout=10) as r:  # redirected to the page, token dropped
        assert r.status == 200 and r.url == url and "app.js" in r.read().decode()
    assert [(c.name, c.value) for c in jar] == [
        (f"annofs-dashboard-{urllib.parse.urlsplit(url).port}", token_of(access))]
    assert all(c.has_nonstandard_attr("HttpOnly") for c in jar)
    with browser.open(url + "api/info", timeout=10) as r:
        assert json.loads(r.read())["policy"]["trusted"] == ["alice-1"]


def test_port_zero_prints_the_real_port(store: Path) -> None:
    proc = subprocess.Popen(
        annofs_cmd("dashboard", "--store", str(store), "--listen", "127.0.0.1:0"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        access = wait_up(proc, store)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    port = urllib.parse.urlsplit(access).port
    assert port and port != 0 and f"dashboard: {access} " in err
    assert not (store / "dashboard.url").exists()


def test_dashboard_usage_errors(store: Path, tmp_path: Path) -> None:
    far = run(store, "dashboard", "--listen", "0.0.0.0:0")
    assert far.returncode == 2
    # The message names the option both commands take, by the one name they share.
    assert "not a loopback address" in far.stderr and "--dashboard-allow-remote" in far.stderr
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
        annofs_cmd("--store", str(store), "dashboard", "--dashboard-allow-remote", "--listen",
                   f"0.0.0.0:{port}"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        access = wait_up(proc, store)
        assert access.startswith(f"http://0.0.0.0:{port}/?token=")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    assert "warning: the dashboard at http://0.0.0.0:" in err
    assert "reachable from other machines" in err
