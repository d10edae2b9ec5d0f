"""The dashboard of a real mount, in a real headless Chromium: opens appear live with
their verdicts, a refusal expands into its explanation and diff, the coverage numbers are
the tree's, a file shows its versions. The page is opened as a user would: through the
URL with the access token, from <store>/dashboard.url; without it, nothing is shown.
Screenshots are saved (ANNOFS_SCREENSHOT_DIR too).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, annofs_cmd
from t4_fuse_trust import annofs, refused, write_policy

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WAIT_MS = 20_000

MAIN_C = """#include <stdio.h>

int main(void) {
    puts("hello");
    return 0;
}
"""

BLOB = bytes(range(256)) * 64  # 16 KiB, not text
PATCHED_BLOB = BLOB[:5000] + b"\xde\xad\xbe\xef" + BLOB[5004:]

sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip)")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"needs Debian's chromium at {CHROMIUM}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dashboard(mounted: Mount, tmp_path: Path) -> Iterator[tuple[Mount, str, str]]:
    """/src/proj (5 files, signed by alice-1) and /src/vendor (2 files, unsigned), mounted
    with an enforcing policy (/src/** needs one signer) and the dashboard: the mount,
    the page's address, and the URL with the access token (from <store>/dashboard.url)."""
    mounted.stop()
    proj = tmp_path / "proj"
    (proj / "lib").mkdir(parents=True)
    (proj / "main.c").write_text(MAIN_C)
    (proj / "util.c").write_text("int util(void) { return 1; }\n")
    (proj / "README").write_text("a project\n")
    (proj / "lib" / "x.c").write_text("int x;\n")
    (proj / "blob.bin").write_bytes(BLOB)
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "a.c").write_text("int a;\n")
    (vendor / "b.c").write_text("int b;\n")
    keys = tmp_path / "keys"
    keys.mkdir()
    annofs(mounted.store, "import", str(proj), "/src/proj")
    annofs(mounted.store, "import", str(vendor), "/src/vendor")
    annofs(mounted.store, "key", "generate", "alice-1", "--dir", str(keys))
    annofs(mounted.store, "sign", "--key", str(keys / "alice-1.secret"), "/src/proj")
    policy = write_policy(tmp_path / "policy.toml")
    port = free_port()
    mounted.start("--policy", str(policy), "--dashboard", f"127.0.0.1:{port}")
    url_file = mounted.store / "dashboard.url"
    assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
    access = url_file.read_text().strip()
    url = f"http://127.0.0.1:{port}/"
    assert access.startswith(url + "?token=") and len(access) == len(url) + 7 + 43
    yield mounted, url, access


@pytest.fixture
def browser_page() -> Iterator[sync_api.Page]:
    """A page in a fresh headless Chromium (Debian's, driven by playwright)."""
    with tempfile.TemporaryDirectory(prefix="annofs-chromium-") as profile, \
            sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = ctx.new_page()
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            ctx.close()


def save(page: sync_api.Page, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot in the test's tmp dir and, if set, ANNOFS_SCREENSHOT_DIR."""
    out = tmp_path / name
    page.screenshot(path=str(out), full_page=True)
    extra = os.environ.get("ANNOFS_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(extra) / name)
    assert out.stat().st_size > 10_000
    return out


def total(page: sync_api.Page, field: str) -> int:
    return int(page.locator(f"#cov-total [data-field={field}] .n").inner_text())


def test_live_opens_refusal_diff_and_coverage_in_chromium(
        dashboard: tuple[Mount, str, str], browser_page: sync_api.Page, tmp_path: Path) -> None:
    m, url, access = dashboard
    page = browser_page
    main_c = m.path / "src" / "proj" / "main.c"
    main_c.write_text(MAIN_C.replace("return 0;", 'return system("id");'))  # not judged
    blob = m.path / "src" / "proj" / "blob.bin"
    blob.write_bytes(PATCHED_BLOB)

    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(access + "#live")
    page.locator("#status[data-state=live]").wait_for()
    assert page.url == url + "#live"  # the token left the address bar (and the history)
    assert "mode enforce" in page.locator("#policy").inner_text()

    assert refused(m.path / "src" / "vendor" / "a.c")  # unsigned: no original to show
    for name in ("README", "lib/x.c", "util.c"):
        assert (m.path / "src" / "proj" / name).read_bytes()
    assert refused(blob)
    assert refused(main_c)

    ok = page.locator('#opens tr.ev[data-path="/src/proj/util.c"]')
    bad = page.locator('#opens tr.ev[data-path="/src/proj/main.c"]')
    ok.wait_for()
    bad.wait_for()
    assert ok.get_attribute("data-verdict") == "allowed"
    assert bad.get_attribute("data-verdict") == "refused"
    assert "needs 1 distinct trusted signer" in bad.locator("td.reason").inner_text()

    # A patched binary: its changed byte range, in hex, the changed bytes marked.
    binary = page.locator('#opens tr.ev[data-path="/src/proj/blob.bin"]')
    binary.click()
    hexdiff = page.locator('#opens tr.expl-row pre.diff[data-kind="binary"]')
    hexdiff.wait_for()
    assert "[0x1388, 0x138c)" in hexdiff.locator(".dl.hunk").first.inner_text()
    assert hexdiff.locator(".dl.add b.chg").all_inner_texts() == ["de", "ad", "be", "ef"]
    binary.click()  # folds it again
    assert hexdiff.count() == 0

    # The refusal expands into its explanation: the signed original and a coloured diff.
    bad.click()
    expl = page.locator("#opens tr.expl-row .explanation")
    expl.wait_for()
    assert "found by edit graph" in expl.inner_text()
    assert "alice-1" in expl.locator("table.sigs").inner_text()
    added = expl.locator("pre.diff .dl.add")
    removed = expl.locator("pre.diff .dl.del")
    assert added.filter(has_text='return system("id");').count() == 1
    assert removed.filter(has_text="return 0;").count() == 1
    assert "rgb(230, 255, 236)" in added.first.evaluate(
        "e => getComputedStyle(e).backgroundColor")  # coloured, not plain text

    vendor = page.locator('#opens tr.ev[data-path="/src/vendor/a.c"]')
    assert vendor.get_attribute("data-verdict") == "refused"
    assert page.locator("#opens tr.ev[data-verdict=allowed]").count() == 3
    assert page.locator("#opens tr.ev[data-verdict=refused]").count() == 3

    # Filters: by verdict, then by path.
    page.select_option("#f-verdict", "refused")
    assert ok.is_hidden() and bad.is_visible()
    page.select_option("#f-verdict", "")
    page.fill("#f-path", "util")
    assert ok.is_visible() and bad.is_hidden()
    page.fill("#f-path", "")
    save(page, tmp_path, "dashboard-live.png")

    # Coverage of /src: proj has 5 files, 3 still signed (main.c and blob.bin were
    # patched); vendor 2 unsigned; under /src/** every unsigned file would be refused.
    page.goto(url + "#coverage=/src")
    page.locator('#cov-total[data-path="/src"]').wait_for()
    assert [total(page, f) for f in ("files", "signed", "unsigned", "labelled", "refused")] \
        == [7, 3, 4, 0, 4]
    rows = {r.get_attribute("data-path"): r for r in page.locator("#cov-dirs tr.dir").all()}
    assert sorted(rows) == ["/src/proj", "/src/vendor"]
    proj = rows["/src/proj"]
    cells = [proj.locator(f"[data-field={f}]").inner_text() for f in ("files", "signed",
                                                                         "unsigned")]
    assert cells == ["5", "3", "2"]
    assert "alice-1 (3)" in proj.locator("td.key").inner_text()
    share = proj.locator(".bar-signed").evaluate(
        "e => e.getBoundingClientRect().width / e.parentElement.getBoundingClientRect().width")
    assert abs(share - 0.6) < 0.02
    assert rows["/src/vendor"].locator("[data-field=signed]").inner_text() == "0"
    proj.locator("a").click()  # into the directory
    page.locator('#cov-total[data-path="/src/proj"]').wait_for()
    assert total(page, "files") == 5
    files = {r.get_attribute("data-path"): r for r in page.locator("#cov-files tr.file").all()}
    assert sorted(files) == ["/src/proj/README", "/src/proj/blob.bin", "/src/proj/main.c",
                             "/src/proj/util.c"]
    assert "unsigned" in files["/src/proj/main.c"].inner_text()
    assert "alice-1" in files["/src/proj/util.c"].inner_text()
    save(page, tmp_path, "dashboard-coverage.png")

    # The patched file: its versions along the edit graph, the older one signed.
    files["/src/proj/main.c"].locator("a").click()
    page.locator("#file-body table.versions").wait_for()
    digest = page.locator("#file-body [data-field=digest]").inner_text()
    assert digest.startswith("blake3:") and len(digest) == 7 + 64
    versions = page.locator("#file-body table.versions tbody tr")
    assert versions.count() == 3  # patched <- imported <- empty root
    assert "alice-1 (reviewed)" in versions.nth(1).inner_text()
    assert "alice-1" not in versions.nth(0).inner_text()
    save(page, tmp_path, "dashboard-file.png")

    # The events log keeps the refusals, each with the explanation made at the time.
    page.goto(url + "#events")
    logged = page.locator('#history tr.ev[data-path="/src/proj/main.c"]')
    logged.wait_for()
    assert logged.get_attribute("data-verdict") == "refused"
    assert page.locator("#history tr.ev").count() == 3
    logged.click()
    assert page.locator("#history pre.diff .dl.add").filter(
        has_text='return system("id");').count() == 1

    # The page loads nothing but what the daemon serves, breaks no rule of its own
    # Content-Security-Policy, and writes are refused.
    assert requests and all(r.startswith(url) for r in requests), requests
    assert not problems, problems
    req = urllib.request.Request(url + "api/info", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


def test_without_the_token_the_browser_sees_nothing(
        dashboard: tuple[Mount, str, str], browser_page: sync_api.Page) -> None:
    m, url, access = dashboard
    page = browser_page
    assert refused(m.path / "src" / "vendor" / "a.c")  # something the page would show
    for where in (url, url + "?token=wrong", url + "static/app.js",
                  url + "api/events"):
        r = page.goto(where)
        assert r is not None and r.status == 401, where
        text = page.locator("body").inner_text()
        assert str(m.store / "dashboard.url") in text and "a.c" not in text, where
    # The same browser, once through the URL: in, and the cookie keeps it in.
    page.goto(access + "#events")
    page.locator('#history tr.ev[data-path="/src/vendor/a.c"]').wait_for()
    cookies = page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        (f"annofs-dashboard-{url.rsplit(':', 1)[1].rstrip('/')}", True, "Strict")]
    assert page.goto(url + "api/info").status == 200
    # Another program on the machine, without the token: 401, whatever it asks for.
    for route in ("", "api/info", "api/live", "api/explain?path=/src/vendor/a.c"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + route, timeout=10)
        assert e.value.code == 401, route


def test_a_daemonised_mount_prints_the_url_with_the_real_port(mounted: Mount,
                                                               tmp_path: Path) -> None:
    mounted.stop()
    res = subprocess.run(annofs_cmd("--store", str(mounted.store), "mount", "--dashboard",
                                    "127.0.0.1:0", str(mounted.path)),
                         capture_output=True, text=True, timeout=60)
    try:
        assert res.returncode == 0, res.stderr
        url_file = mounted.store / "dashboard.url"
        access = url_file.read_text().strip()
        assert res.stdout == f"dashboard: {access} (also in {url_file})\n"
        port = int(access.split(":")[2].split("/")[0])
        assert port != 0 and access.startswith(f"http://127.0.0.1:{port}/?token=")
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/info", headers={
            "Authorization": "Bearer " + access.split("token=")[1]})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        # The token is not in the daemon's log.
        assert access.split("token=")[1] not in (mounted.store / "daemon.log").read_text()
    finally:
        subprocess.run(annofs_cmd("umount", str(mounted.path)), check=True, timeout=60)
    assert not url_file.exists()


@pytest.mark.expected_log("mount failed")
def test_dashboard_port_taken_fails_the_mount(mounted: Mount, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        other = tmp_path / "mnt2"
        other.mkdir()
        mounted.stop()
        res = subprocess.run(annofs_cmd("--store", str(mounted.store), "mount", "--dashboard",
                                        f"127.0.0.1:{port}", str(other)),
                             capture_output=True, text=True)
    assert res.returncode == 2
    assert f"127.0.0.1:{port}: the dashboard cannot listen here" in res.stderr
    assert not os.path.ismount(other)
    log = (mounted.store / "daemon.log").read_text()
    assert f"mount failed: 127.0.0.1:{port}: the dashboard cannot listen here" in log
    assert "Traceback" not in log  # a user's mistake is one line, not a stack
    far = subprocess.run(annofs_cmd("--store", str(mounted.store), "mount", "--dashboard",
                                    "0.0.0.0:8080", str(other)), capture_output=True, text=True)
    assert far.returncode == 2 and "not a loopback address" in far.stderr
    assert not os.path.ismount(other)
