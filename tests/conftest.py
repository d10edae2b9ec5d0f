"""Shared fixtures, and the rule that a test fails if anything logged an unexpected
warning or error (as S3QL's test suite does): the daemon's log is part of what we test.

A test that expects a logged warning or error says so with
`@pytest.mark.expected_log("regex", ...)`.
"""

from __future__ import annotations

import compileall
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from annofs.volume import Volume

# The folder beside the clone that developers and CI have. Tests must never read it (a
# clone elsewhere has none): every open() under it in the test process raises, so CI,
# which has it, fails instead of passing by accident. What tests need is carried in
# tests/ (tests/vectors/fastcdc came from there).
OUTSIDE = str(Path(__file__).resolve().parents[2] / "shared") + os.sep


def _refuse_outside_reads(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(OUTSIDE):
            raise PermissionError(f"{path}: tests may not read outside the repository")


sys.addaudithook(_refuse_outside_reads)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expected_log(*patterns): log records at WARNING or above that may appear")
    # Every annofs command a test runs is a new Python process. With PYTHONDONTWRITEBYTECODE
    # set (as where the suite is run by hand here) none writes its bytecode, so each one
    # compiled annofs from source again: 40 ms of a command's 160, 50 of a mount's 400.
    # Compiled once here, into the tree's __pycache__ (git ignores it), which they read
    # even so; a source changed since is compiled again as usual (mtime check).
    root = Path(__file__).resolve().parents[1]
    for package in ("annofs", "chunker"):
        compileall.compile_dir(root / package, quiet=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With ANNOFS_NO_SKIPS=1 (set by .ci/run) a skip is a failure: every tool a skip
    waits for (Nix, Chromium, stress-ng, a compiler) is installed by scripts/setup.sh,
    so a skip there means a missing install step, never something to pass over."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("ANNOFS_NO_SKIPS") == "1" and report.skipped \
            and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may be: {reason}"


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def fail_on_unexpected_log(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if a WARNING or worse was logged that the test did not declare."""
    handler = _Collector()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    marker = request.node.get_closest_marker("expected_log")
    patterns = [re.compile(p) for p in (marker.args if marker else ())]
    unexpected = [
        r for r in handler.records
        if not any(p.search(r.getMessage()) for p in patterns)
    ]
    if unexpected:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in unexpected)
        pytest.fail(f"unexpected log records:\n{lines}", pytrace=False)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A path for a new store."""
    return tmp_path / "store"


@pytest.fixture
def vol(store_dir: Path) -> Iterator[Volume]:
    """A fresh, initialised store, opened."""
    v = Volume.open(store_dir, create=True)
    try:
        yield v
    finally:
        v.close()


# -- real mounts -------------------------------------------------------------------------

_LOG_LINE = re.compile(r"^\S+ \S+ \d+ (WARNING|ERROR|CRITICAL) (.*)$")


def annofs_cmd(*args: str) -> list[str]:
    """The annofs command line, run with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "annofs.cli.main", *args]


@dataclass
class Mount:
    """A store served by a real daemon process at a real mountpoint."""

    store: Path
    path: Path
    proc: subprocess.Popen | None = None
    log_offset: int = 0

    def start(self, *extra: str) -> None:
        """Start the daemon in the foreground (a child we can signal) and wait until ready."""
        log_file = self.store / "daemon.log"
        self.log_offset = log_file.stat().st_size if log_file.exists() else 0
        # The daemon's stderr (its log, in the foreground) to a file, not a pipe nobody
        # reads while the test runs: a test that makes it log a lot filled the pipe and
        # froze the daemon in write().
        with tempfile.TemporaryFile() as err:
            self.proc = subprocess.Popen(
                annofs_cmd("--store", str(self.store), "mount", "--foreground", *extra,
                           str(self.path)),
                stdout=subprocess.DEVNULL, stderr=err)
            deadline = time.monotonic() + 20
            while not os.path.ismount(self.path):
                if self.proc.poll() is not None:
                    err.seek(0)
                    raise RuntimeError(f"mount failed: {err.read().decode()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("mount did not become ready in 20 s")
                time.sleep(0.01)

    def stop(self) -> None:
        """Unmount cleanly (fusermount3 -u) and wait for the daemon to exit."""
        if self.proc is None:
            return
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], check=True)
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def kill(self) -> None:
        """kill -9 the daemon, then clear the dead mount (as a crash would leave it)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)

    def log_problems(self) -> list[str]:
        """WARNING/ERROR lines the daemon wrote since start()."""
        log_file = self.store / "daemon.log"
        if not log_file.exists():
            return []
        with open(log_file, "rb") as f:
            f.seek(self.log_offset)
            text = f.read().decode(errors="replace")
        return [m.group(0) for line in text.splitlines() if (m := _LOG_LINE.match(line))]


def serve(m: Mount, request: pytest.FixtureRequest, *extra: str) -> Iterator[Mount]:
    """Start `m` with `extra` options, yield it, stop it; then fail the test if the
    daemon logged problems that it did not declare with @pytest.mark.expected_log."""
    m.start(*extra)
    try:
        yield m
    finally:
        m.stop()
    fail_on_daemon_log(m, request)


def fail_on_daemon_log(m: Mount, request: pytest.FixtureRequest) -> None:
    """Fail the test if `m`'s daemon logged problems (WARNING or worse) since it started
    that the test did not declare with @pytest.mark.expected_log."""
    marker = request.node.get_closest_marker("expected_log")
    patterns = [re.compile(p) for p in (marker.args if marker else ())]
    bad = [line for line in m.log_problems() if not any(p.search(line) for p in patterns)]
    if bad:
        pytest.fail("the daemon logged:\n" + "\n".join(bad), pytrace=False)


@pytest.fixture
def mounted(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mount]:
    """A fresh store, mounted for real; the test fails if the daemon logged problems
    that the test did not declare with @pytest.mark.expected_log."""
    store = tmp_path / "store"
    mp = tmp_path / "mnt"
    mp.mkdir()
    subprocess.run(annofs_cmd("--store", str(store), "init"), check=True,
                   stdout=subprocess.DEVNULL)
    yield from serve(Mount(store, mp), request)


class Templates:
    """What a fixture's set-up commands make (a store initialised, a tree imported, a
    key generated, the tree signed, a policy written), made once per session and
    copied into each test's directory after: the commands are processes of a third of
    a second each, the copy of a small store takes milliseconds. Each test still gets
    its own store, keys and mount."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._made: set[str] = set()

    def copy(self, name: str, dest: Path, build: Callable[[Path], None]) -> None:
        """Make in `dest` (a directory) what `build(directory)` makes in an empty one:
        `build` runs the first time `name` is asked for, and its result is copied."""
        src = self._root / name
        if name not in self._made:
            src.mkdir()
            build(src)
            self._made.add(name)
        for child in src.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.copytree(child, dest / child.name, symlinks=True)
            else:
                shutil.copy2(child, dest / child.name, follow_symlinks=False)


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    """Set-ups made once per session, copied per test (`Templates`)."""
    return Templates(tmp_path_factory.mktemp("templates"))


@pytest.fixture(scope="session")
def shared_dir() -> Iterator[Path]:
    """One directory for the session that other users can traverse (pytest's tmp_path
    is private to root); whoever uses it empties it after each test (`empty_dir`)."""
    d = Path(tempfile.mkdtemp(prefix="annofs-shared-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        empty_dir(d)
        d.rmdir()


def empty_dir(d: Path) -> None:
    """Remove everything in `d`: a mount left behind by a failed test is detached first
    (rm must not walk into it), and rm -rf, not shutil.rmtree, takes trees deeper than
    Python's recursion limit."""
    for child in d.iterdir():
        if os.path.ismount(child):
            subprocess.run(["fusermount3", "-u", "-z", str(child)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(child)], check=False)
