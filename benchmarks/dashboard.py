"""Figure `dashboard`: what the dashboard costs the mount, and how fast it counts a tree.

Not a SPEC §8 target; kept beside `trust` because the same promise applies: a verified
read costs nothing extra. The same signed tree as `trust` is read through a mount with an
enforcing policy, with and without `--dashboard` (and with a page subscribed to the live
feed, so every open is published and sent). Coverage of the tree is asked for twice over
HTTP: the first answer reads every version and statement, the second uses the caches.
Both clients send the access token from <store>/dashboard.url as a bearer header.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.registry import Context, FigureResult, Row, figure
from benchmarks.trust import FILES, QUICK_FILES, _cmd, _make_tree, _policy, _read_all


def _access(store: Path) -> tuple[str, str]:
    """The page's address and access token, from `<store>/dashboard.url`."""
    url, _, token = (store / "dashboard.url").read_text().strip().partition("?token=")
    return url, token


def _get(url: str, token: str) -> urllib.request.Request:
    """A GET of `url` with the access token."""
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The page's side, in its own process (a thread here would take the GIL from the reads
# being measured): counts the opens it is sent; prints the count when the stream ends.
_SUBSCRIBER = """
import json, sys, urllib.request
n, kind = 0, ""
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]})
try:
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().rstrip("\\n")
            if line.startswith("event: "):
                kind = line[7:]
                if kind == "hello":
                    print("ready", flush=True)
            elif line.startswith("data: ") and kind == "opens":
                n += len(json.loads(line[6:]))
except OSError:
    pass
print(n, flush=True)
"""


def _read(ctx: Context, store: Path, policy: Path, *, dashboard: bool) -> tuple[float, int]:
    mnt = ctx.work / "dashboard" / "mnt"
    mnt.mkdir(exist_ok=True)
    extra = ["--dashboard", "127.0.0.1:0"] if dashboard else []
    subprocess.run(_cmd(store, "mount", "--policy", str(policy), *extra, str(mnt)),
                   check=True, capture_output=True)
    sub = None
    try:
        if dashboard:
            url, token = _access(store)  # written before the mount reported ready
            sub = subprocess.Popen([sys.executable, "-c", _SUBSCRIBER, url + "api/live", token],
                                   stdout=subprocess.PIPE, text=True)
            assert sub.stdout is not None
            assert sub.stdout.readline().strip() == "ready"
        seconds, n = _read_all(mnt / "src" / "tree")
        time.sleep(0.5)  # the last batch reaches the page
    finally:
        subprocess.run(_cmd(store, "umount", str(mnt)), check=True)
    if sub is not None:
        out, _ = sub.communicate(timeout=60)
        n = int(out.split()[-1])
        ctx.log(f"dashboard: the page was sent {n} opens")
    return seconds, n


def _coverage_times(ctx: Context, store: Path, policy: Path) -> tuple[float, float, int]:
    port = _free_port()
    proc = subprocess.Popen(_cmd(store, "dashboard", "--policy", str(policy), "--listen",
                                 f"127.0.0.1:{port}"), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                base, token = _access(store)
                if base != f"http://127.0.0.1:{port}/":
                    raise FileNotFoundError("not this server's yet")
                urllib.request.urlopen(_get(base + "api/info", token), timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        times = []
        files = 0
        for _ in range(3):
            start = time.perf_counter()
            with urllib.request.urlopen(_get(base + "api/coverage?path=/", token),
                                        timeout=300) as r:
                files = json.loads(r.read())["total"]["files"]
            times.append(time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(30)
    return times[0], min(times[1:]), files


@figure("dashboard", "dashboard: reads with a page watching vs no dashboard; coverage of a tree")
def dashboard(ctx: Context) -> FigureResult:
    """Read a signed tree with and without the dashboard; time its coverage over HTTP."""
    files = QUICK_FILES if ctx.quick else FILES
    base = ctx.work / "dashboard"
    tree = base / "tree"
    ctx.log(f"dashboard: making a {files}-file tree")
    _make_tree(tree, files)
    store = base / "store"
    subprocess.run(_cmd(store, "init"), check=True, capture_output=True)
    subprocess.run(_cmd(store, "import", str(tree), "/src/tree"), check=True,
                   capture_output=True)
    keys = base / "keys"  # the policy's trusted-keys-dir
    keys.mkdir()
    subprocess.run(_cmd(store, "key", "generate", "bench-1", "--dir", str(keys)), check=True,
                   capture_output=True)
    subprocess.run(_cmd(store, "sign", "--key", str(keys / "bench-1.secret"), "/src/tree"),
                   check=True, capture_output=True)
    policy = _policy(base / "enforce.toml", "enforce")
    # Interleaved, best of three each (as `trust`): a passing load hits both alike.
    times: dict[bool, list[float]] = {False: [], True: []}
    sent = 0
    for _ in range(3):
        for watched in (False, True):
            seconds, n = _read(ctx, store, policy, dashboard=watched)
            times[watched].append(seconds)
            if watched:
                sent = n
    t_plain, t_watched = min(times[False]), min(times[True])
    cold, warm, counted = _coverage_times(ctx, store, policy)
    rate = lambda t: f"{files / t:.0f} files/s"  # noqa: E731
    rows = [
        Row(f"reading {files} signed files, a page watching vs no dashboard (throughput)",
            rate(t_watched), rate(t_plain), t_plain / t_watched, ">= 0.90"),
        Row(f"coverage of a {counted}-file signed tree over HTTP, first request (cold)",
            f"{cold * 1000:.0f} ms", "", None),
        Row(f"coverage of a {counted}-file signed tree over HTTP, again (warm)",
            f"{warm * 1000:.0f} ms", "", None),
    ]
    notes = f"""\
What: the `trust` tree ({files} small files, one statement) read by one process through a
mount with an enforcing policy, without `--dashboard` and with it while a client reads
`/api/live` as the page does (it was sent {sent} opens); best of three fresh mounts each,
interleaved; ratio is throughput with the page over throughput without. Coverage: `annofs
dashboard` over the unmounted store, GET /api/coverage?path=/ (every file's digest,
statements and verdict), first request and best of the next two."""
    return FigureResult(rows, notes)
