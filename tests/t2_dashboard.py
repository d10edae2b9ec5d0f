"""The dashboard on a real store, in process: coverage counts, a file's history, the
routes (read-only, loopback, no secrets, only with the access token), the live feed's
stream."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from starlette.testclient import TestClient
from t2_trust import ALICE, BOB, MALLORY, P, policy, sign, write

from annofs.daemon.events import Event, EventLog
from annofs.daemon.feed import Feed
from annofs.dashboard.app import Dashboard, TokenGate, _sse, create_app, loopback_hosts
from annofs.dashboard.coverage import CoverageReader
from annofs.dashboard.server import (
    URL_FILE,
    access_url,
    bind,
    new_token,
    parse_listen,
    remove_url_file,
    write_url_file,
)
from annofs.errors import UsageError
from annofs.transfer.import_tree import TreeImporter
from annofs.trust.annotations import AnnotationStore
from annofs.trust.gate import TrustGate
from annofs.trust.keys import key_fingerprint
from annofs.volume import Volume

TOKEN = new_token()
BASE = "http://127.0.0.1:8080"
COOKIE = "annofs-dashboard-8080"

RULES = """
[[rules]]
path = "/src/**"
signers = 1
"""


@pytest.fixture
def vol(vol: Volume, tmp_path: Path) -> Iterator[Volume]:
    """/src/proj: main.c and util.c signed by alice (reviewed); lib/ x.c signed by alice
    and bob (built), y.c unsigned; evil.c labelled malicious by bob; then main.c patched.
    /docs/readme unsigned (no rule)."""
    host = tmp_path / "host"
    proj = host / "src" / "proj"
    (proj / "lib").mkdir(parents=True)
    (proj / "main.c").write_text("int main(void) {\n    return 0;\n}\n")
    (proj / "util.c").write_text("int util(void) { return 1; }\n")
    (proj / "evil.c").write_text("int evil;\n")
    (proj / "lib" / "x.c").write_text("int x;\n")
    (proj / "lib" / "y.c").write_text("int y;\n")
    (host / "docs").mkdir()
    (host / "docs" / "readme").write_text("hello\n")
    TreeImporter(vol).run(host / "src", [b"src"])
    TreeImporter(vol).run(host / "docs", [b"docs"])
    sign(vol, ALICE, "/src/proj/main.c", "/src/proj/util.c", "/src/proj/lib/x.c")
    sign(vol, BOB, "/src/proj/lib/x.c", claim="built")
    sign(vol, BOB, "/src/proj/evil.c", claim="reviewed", label="malicious")
    write(vol, P("/src/proj/main.c"), b"int main(void) {\n    return system(\"id\");\n}\n")
    return vol


@pytest.fixture
def gate(vol: Volume) -> TrustGate:
    return TrustGate(vol, policy(RULES, ALICE, BOB))


def test_coverage_counts_per_directory(vol: Volume, gate: TrustGate) -> None:
    reader = CoverageReader(vol, gate.annotations, gate)
    root = reader.coverage([])
    t = root["total"]
    assert (t["files"], t["signed"], t["unsigned"], t["labelled"]) == (6, 2, 4, 1)
    # main.c (patched), lib/y.c and evil.c (labelled malicious, unsigned) are refused;
    # /docs/readme has no rule.
    assert t["refused"] == 3
    assert dict(t["keys"]) == {"alice-1": 2, "bob-1": 1}
    assert dict(t["claims"]) == {"reviewed": 2, "built": 1}
    assert dict(t["labels"]) == {"malicious": 1}
    assert [d["name"] for d in root["dirs"]] == ["docs", "src"]
    proj = reader.coverage(P("/src/proj"))
    lib = {d["name"]: d for d in proj["dirs"]}["lib"]
    assert (lib["files"], lib["signed"], lib["unsigned"], lib["refused"]) == (2, 1, 1, 1)
    files = {f["name"]: f for f in proj["files"]}
    assert sorted(files) == ["evil.c", "main.c", "util.c"]
    assert files["util.c"]["signers"] == ["alice-1"] and files["util.c"]["status"] == "allowed"
    assert files["main.c"]["signed"] is False and files["main.c"]["status"] == "refused"
    assert files["evil.c"]["labels"] == ["malicious by bob-1"]
    assert files["evil.c"]["digest"].startswith("blake3:")
    with pytest.raises(UsageError, match="not a directory"):
        reader.coverage(P("/src/proj/util.c"))


def test_coverage_without_a_policy_and_untrusted_signers(vol: Volume) -> None:
    sign(vol, MALLORY, "/docs/readme")
    plain = CoverageReader(vol, AnnotationStore(vol.store)).coverage([])["total"]
    assert plain["signed"] == 3 and plain["refused"] == 0
    gate = TrustGate(vol, policy(RULES, ALICE))
    docs = CoverageReader(vol, gate.annotations, gate).file(P("/docs/readme"))
    # Signed, but by a key this policy does not trust: shown as such.
    mallory = f"untrusted key {key_fingerprint(MALLORY.public)} (claims 'mallory-1')"
    assert [(s["signer"], s["trusted"]) for s in docs["signatures"]] == [(mallory, False)]


def test_coverage_sees_new_statements(vol: Volume, gate: TrustGate) -> None:
    reader = CoverageReader(vol, gate.annotations, gate)
    assert reader.coverage(P("/src/proj/lib"))["total"]["signed"] == 1
    sign(vol, ALICE, "/src/proj/lib/y.c")
    assert reader.coverage(P("/src/proj/lib"))["total"]["signed"] == 2


def test_file_history_and_statements(vol: Volume, gate: TrustGate) -> None:
    f = CoverageReader(vol, gate.annotations, gate).file(P("/src/proj/main.c"))
    assert f["status"] == "refused" and f["signatures"] == []
    versions = f["versions"]
    assert len(versions) == 3 and versions[-1]["root"]  # patched <- imported <- empty
    assert versions[0]["id"] == f["version"] and versions[0]["parent"] == versions[1]["id"]
    signed = versions[1]["signatures"]
    assert [(s["signer"], s["claim"], s["names"]) for s in signed] == [
        ("alice-1", "reviewed", ["main.c"])]
    x = CoverageReader(vol, gate.annotations, gate).file(P("/src/proj/lib/x.c"))
    assert sorted((s["signer"], s["claim"]) for s in x["signatures"]) == [
        ("alice-1", "reviewed"), ("bob-1", "built")]


def test_a_tree_of_thousands_is_counted_once_per_content(vol: Volume, tmp_path: Path) -> None:
    host = tmp_path / "big" / "tree"
    for d in range(20):
        (host / f"d{d}").mkdir(parents=True)
        for i in range(150):
            (host / f"d{d}" / f"f{i}.c").write_text(f"int f{d}_{i};\n")
    TreeImporter(vol).run(tmp_path / "big", [b"big"])
    sign(vol, ALICE, "/big/tree")
    gate = TrustGate(vol, policy(RULES, ALICE))
    reader = CoverageReader(vol, gate.annotations, gate)
    t = reader.coverage(P("/big"))["total"]
    assert (t["files"], t["signed"], dict(t["keys"])) == (3000, 3000, {"alice-1": 3000})


# -- the listen address ------------------------------------------------------------------------


def test_listen_address_is_loopback_unless_asked() -> None:
    assert parse_listen("127.0.0.1:8080").url == "http://127.0.0.1:8080/"
    assert parse_listen("localhost:9").host == "127.0.0.1"
    assert parse_listen("[::1]:80").url == "http://[::1]:80/"
    with pytest.raises(UsageError, match=r"not a loopback address.*--dashboard-allow-remote"):
        parse_listen("0.0.0.0:8080")
    with pytest.raises(UsageError, match="not a loopback address"):
        parse_listen("192.0.2.1:8080")
    assert not parse_listen("0.0.0.0:8080", allow_remote=True).loopback
    for bad in ("8080", "127.0.0.1", "127.0.0.1:http", "example.org:80", "127.0.0.1:70000"):
        with pytest.raises(UsageError, match=r"^'"):
            parse_listen(bad)


def test_a_taken_port_is_a_clear_error() -> None:
    first = bind(parse_listen("127.0.0.1:0"))
    try:
        port = first.getsockname()[1]
        with pytest.raises(UsageError, match=rf"^127.0.0.1:{port}: the dashboard cannot listen"):
            bind(parse_listen(f"127.0.0.1:{port}"))
    finally:
        first.close()


# -- the routes ------------------------------------------------------------------------------


@pytest.fixture
def anonymous(vol: Volume, gate: TrustGate, store_dir: Path) -> Iterator[TestClient]:
    """A client of the dashboard that has not been given its token."""
    EventLog(store_dir).record(Event(path="/src/proj/main.c", verdict="refused",
                                     reason="rules[0] /src/**: needs 1", pid=42))
    app = create_app(Dashboard(vol, store_dir, gate), token=TOKEN,
                     allowed_hosts=loopback_hosts("127.0.0.1"))
    with TestClient(app, backend="trio", base_url=BASE) as c:
        yield c


@pytest.fixture
def client(anonymous: TestClient) -> TestClient:
    """A client that opened the URL with the token once (as a browser would)."""
    r = anonymous.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    anonymous.cookies.set(COOKIE, TOKEN)
    return anonymous


EVERY_ROUTE = ("/", "/static/app.js", "/static/style.css", "/static/index.html",
               "/api/info", "/api/coverage?path=/", "/api/coverage?path=/src/proj",
               "/api/file?path=/src/proj/main.c", "/api/explain?path=/src/proj/main.c",
               "/api/events", "/api/live", "/nothing-here")


def test_without_the_token_every_route_is_401(anonymous: TestClient, store_dir: Path) -> None:
    for url in EVERY_ROUTE:
        r = anonymous.get(url)
        assert r.status_code == 401, url
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "set-cookie" not in r.headers
        # Where to find the URL, and nothing of the store: no path, no code, no diff.
        assert str(store_dir / URL_FILE) in r.text, url
        assert "main.c" not in r.text and "proj" not in r.text and "alice" not in r.text
        assert "app.js" not in r.text and "function" not in r.text
        if url.startswith("/api/"):
            assert "needs its access token" in r.json()["error"]
        else:
            assert r.headers["content-type"].startswith("text/html")
    assert anonymous.head("/").status_code == 401


def test_a_wrong_token_or_cookie_is_401(anonymous: TestClient) -> None:
    for bad in ("wrong", "", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "é" * 43, "\x00"):
        r = anonymous.get("/", params={"token": bad}, follow_redirects=False)
        assert r.status_code == 401 and "set-cookie" not in r.headers, bad
        assert "not the dashboard's" in r.text
        assert anonymous.get("/api/info", params={"token": bad}).status_code == 401
        # Raw bytes: a client may send anything, not only ASCII.
        r = anonymous.get("/api/info", headers={"cookie": f"{COOKIE}={bad}".encode()})
        assert r.status_code == 401, bad
        r = anonymous.get("/api/info", headers={"authorization": f"Bearer {bad}".encode()})
        assert r.status_code == 401, bad
    # Twice, even if both are right: the redirect would have to choose.
    r = anonymous.get(f"/?token={TOKEN}&token={TOKEN}", follow_redirects=False)
    assert r.status_code == 401
    # The right token under another port's cookie name (another dashboard's) is not ours.
    anonymous.cookies.set("annofs-dashboard-8081", TOKEN)
    assert anonymous.get("/api/info").status_code == 401
    anonymous.cookies.clear()
    # Basic, or the token as a cookie's value without the name: not accepted.
    assert anonymous.get("/api/info", headers={"authorization": f"Basic {TOKEN}"}
                         ).status_code == 401
    assert anonymous.get("/api/info", headers={"cookie": TOKEN}).status_code == 401


def test_the_right_token_sets_a_strict_cookie_and_redirects_without_it(
        anonymous: TestClient) -> None:
    r = anonymous.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    parts = [p.strip().lower() for p in cookie.split(";")]
    assert parts[0] == f"{COOKIE}={TOKEN}".lower()
    assert {"httponly", "samesite=strict", "path=/"} <= set(parts)
    assert not any(p.startswith(("expires", "max-age", "domain")) for p in parts)
    # Other parameters stay; the token goes.
    r = anonymous.get("/api/coverage", params={"path": "/src/proj", "token": TOKEN},
                      follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/api/coverage?path=%2Fsrc%2Fproj"
    # "//host" would send the browser to another site.
    r = anonymous.get(f"{BASE}//evil.example/x?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/evil.example/x"
    # Followed, as a browser does: the cookie comes back, and the API answers.
    r = anonymous.get(f"/api/info?token={TOKEN}")
    assert r.status_code == 200 and str(r.url) == f"{BASE}/api/info"
    assert r.json()["policy"]["trusted"] == ["alice-1", "bob-1"]
    assert anonymous.get("/").status_code == 200
    assert anonymous.get("/static/app.js").status_code == 200


def test_a_script_may_send_the_token_as_a_bearer_header(anonymous: TestClient) -> None:
    r = anonymous.get("/api/info", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["statements"] == 3
    assert "set-cookie" not in r.headers


def test_token_comparison() -> None:
    gate = TokenGate(create_app, TOKEN, Path("/x"))  # type: ignore[arg-type]
    assert gate.matches(TOKEN)
    for other in ("", TOKEN[:-1], TOKEN + " ", " " + TOKEN, new_token(), "é", "\udcff"):
        assert not gate.matches(other), other
    # 256 random bits, URL-safe: nothing to quote in a URL or a cookie.
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) == 43 and t.replace("-", "").replace("_", "").isalnum() for t in tokens)


def test_the_url_file_is_private_and_goes_with_its_server(tmp_path: Path) -> None:
    addr = parse_listen("127.0.0.1:8080")
    url = access_url(addr, TOKEN)
    assert url == f"http://127.0.0.1:8080/?token={TOKEN}"
    old = os.umask(0)  # even under a permissive umask
    try:
        path = write_url_file(tmp_path, url)
    finally:
        os.umask(old)
    assert path == tmp_path / URL_FILE and path.read_text() == url + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A second dashboard of the same store replaces it; the first, stopping, leaves it.
    other = access_url(addr, new_token())
    write_url_file(tmp_path, other)
    remove_url_file(tmp_path, url)
    assert path.read_text().strip() == other
    remove_url_file(tmp_path, other)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    remove_url_file(tmp_path, other)  # gone already: nothing to do


def test_page_and_static_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for ref in ("/static/app.js", "/static/style.css"):
        assert ref in page.text
        r = client.get(ref)
        assert r.status_code == 200 and len(r.text) > 1000, ref
    # Nothing the page needs comes from elsewhere.
    assert "http://" not in page.text and "https://" not in page.text


def test_routes_answer_json(client: TestClient) -> None:
    info = client.get("/api/info").json()
    assert info["live"] is False and info["mountpoint"] is None
    assert info["policy"]["trusted"] == ["alice-1", "bob-1"] and info["statements"] == 3
    cov = client.get("/api/coverage", params={"path": "/src/proj"}).json()
    assert cov["total"]["files"] == 5
    f = client.get("/api/file", params={"path": "/src/proj/util.c"}).json()
    assert f["signers"] == ["alice-1"]
    x = client.get("/api/explain", params={"path": "/src/proj/main.c"}).json()
    assert x["status"] == "refused" and x["diff_kind"] == "text"
    assert '+    return system("id");' in x["diff"]
    assert client.get("/api/events").json()[0]["pid"] == 42
    missing = client.get("/api/file", params={"path": "/src/nope"})
    assert missing.status_code == 404 and "no such file" in missing.json()["error"]
    bad = client.get("/api/coverage", params={"path": "src"})
    assert bad.status_code == 400 and "starts with /" in bad.json()["error"]
    assert client.get("/api/events", params={"limit": "x"}).status_code == 400
    live = client.get("/api/live")
    assert live.status_code == 404 and "not mounted" in live.json()["error"]


def test_no_secret_key_material_is_shown(client: TestClient, vol: Volume) -> None:
    seen = "".join(client.get(u).text for u in (
        "/api/info", "/api/coverage?path=/", "/api/coverage?path=/src/proj",
        "/api/file?path=/src/proj/lib/x.c", "/api/explain?path=/src/proj/main.c"))
    for key in (ALICE, BOB):
        secret = key.to_text().split(":", 1)[1]
        public = key.public_key().to_text().split(":", 1)[1]
        assert secret not in seen and public not in seen


def test_only_get_and_head(client: TestClient) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for url in ("/", "/api/coverage", "/api/live", "/static/app.js"):
            r = client.request(method, url)
            assert r.status_code == 405, (method, url)
            assert r.headers["allow"] == "GET, HEAD"
    assert client.head("/").status_code == 200


def test_other_host_names_are_refused(client: TestClient) -> None:
    # A page on some site whose name was rebound to 127.0.0.1 sends its own Host.
    r = client.get("/api/info", headers={"host": "evil.example:8080"})
    assert r.status_code == 400
    assert client.get("/api/info", headers={"host": "localhost:8080"}).status_code == 200


def test_no_policy_means_no_explanations(vol: Volume, store_dir: Path) -> None:
    with TestClient(create_app(Dashboard(vol, store_dir), token=TOKEN), backend="trio",
                    headers={"authorization": f"Bearer {TOKEN}"}) as c:
        r = c.get("/api/explain", params={"path": "/src/proj/main.c"})
        assert r.status_code == 400 and "no policy" in r.json()["error"]
        assert c.get("/api/info").json()["policy"] is None


# -- the live feed ---------------------------------------------------------------------------


def test_live_stream_sends_backlog_then_new_opens(vol: Volume, gate: TrustGate) -> None:
    feed = Feed(recent=3)
    v = vol.versions

    sink = feed.tee(None)  # as the mount's verdict sink: calls on, then publishes

    def judged(path: str) -> None:
        with vol.store.read() as txn:
            ver = v.get(txn, int(vol.namespace.resolve(txn, P(path)).target))
        sink(path, ver, gate.verdict(P(path), ver), 7, None)

    async def main() -> list[tuple[str, object]]:
        for path in ("/docs/readme", "/src/proj/util.c"):
            judged(path)
        stream = _sse(feed, since=1)
        got = []
        for _ in range(2):
            got.append(await stream.__anext__())
        assert feed.subscribers == 1
        judged("/src/proj/main.c")
        got.append(await stream.__anext__())
        await stream.aclose()
        assert feed.subscribers == 0
        out = []
        for raw in got:
            lines = raw.decode().splitlines()
            kind = next(ln[7:] for ln in lines if ln.startswith("event: "))
            out.append((kind, json.loads(next(ln[6:] for ln in lines
                                              if ln.startswith("data: ")))))
        return out

    (k0, hello), (k1, backlog), (k2, new) = trio.run(main)
    assert k0 == "hello" and hello == {"backlog": 1}  # since=1: the first one was seen
    assert k1 == "opens" and [e["path"] for e in backlog] == ["/src/proj/util.c"]
    assert backlog[0]["verdict"] == "allowed" and backlog[0]["signers"] == ["alice-1"]
    assert k2 == "opens" and new[0]["verdict"] == "refused" and new[0]["seq"] == 3


def test_a_slow_subscriber_loses_events_not_the_open() -> None:
    feed = Feed(buffer=2)
    with feed.subscribe() as sub:
        for i in range(5):
            feed.publish(Event(path=f"/f{i}", verdict="allowed", reason=""))
        assert sub.dropped == 3
    assert [i.event.path for i in feed.recent] == [f"/f{i}" for i in range(5)]


def test_bind_socket_is_loopback(tmp_path: Path) -> None:
    s = bind(parse_listen("127.0.0.1:0"))
    try:
        assert s.family == socket.AF_INET and s.getsockname()[0] == "127.0.0.1"
    finally:
        s.close()
