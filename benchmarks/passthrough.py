"""FUSE daemons run as child processes: annofs's own, and pyfuse3's passthrough example.

pyfuse3's `examples/passthroughfs.py` mirrors a host directory through FUSE with the same
library and event loop annofs uses, doing nothing but forwarding each call to the host
filesystem: it is the ceiling a Python FUSE filesystem can reach on this machine. Its code
is not kept in this repository: the pyfuse3 sdist of the version installed in the venv is
fetched with `pip download --no-deps --no-binary :all:` into the cache once, and the
example is extracted from it at run time.

`FuseDaemon` runs any such daemon in the foreground as a child (so its pid is known, for
/proc/PID/smaps_rollup and py-spy), waits until the mountpoint is a mount, and unmounts it
with `fusermount3 -u`. `FuseDaemon.guard` turns a hang into an error that says what hung
and where the daemon was: after its deadline it takes a `py-spy dump` of the daemon (when
py-spy is installed), kills it and lazily unmounts, so the blocked call returns.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from benchmarks.registry import Skip

PYFUSE3 = "pyfuse3"
EXAMPLE = "examples/passthroughfs.py"
_LOG_LINE = re.compile(r"^\S+ \S+ \d+ (WARNING|ERROR|CRITICAL) (.*)$")


class MountProblem(Exception):
    """A mount hung, died or returned wrong data; the message says what and where."""


def passthrough_script(cache: Path, work: Path) -> Path:
    """pyfuse3's passthroughfs.py, extracted from the sdist of the installed version."""
    version = metadata.version(PYFUSE3)
    sdist = cache / f"{PYFUSE3}-{version}.tar.gz"
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--quiet", f"{PYFUSE3}=={version}", "-d", str(cache)],
            capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not sdist.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise Skip(f"pip download {PYFUSE3}=={version} failed: {last}")
    target = work / "passthroughfs.py"
    if not target.exists():
        with tarfile.open(sdist) as t:
            member = t.extractfile(f"{PYFUSE3}-{version}/{EXAMPLE}")
            if member is None:
                raise Skip(f"{sdist.name} holds no {EXAMPLE}")
            target.write_bytes(member.read())
    return target


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter or on PATH, if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class FuseDaemon:
    """A FUSE daemon serving `mountpoint` in the foreground, as a child process."""

    def __init__(self, name: str, argv: list[str], mountpoint: Path, stderr_path: Path,
                 log_path: Path | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.cwd = cwd
        self.argv = argv
        self.mountpoint = mountpoint
        self.stderr_path = stderr_path
        self.log_path = log_path  # the daemon's own log file, if it writes one
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_offset = 0
        self.hang: str | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        """Start the daemon and return once the mountpoint is a mount."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.log_path is not None and self.log_path.exists() and self.starts == 0:
            self.log_offset = self.log_path.stat().st_size
        err = open(self.stderr_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd)
        finally:
            err.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                raise MountProblem(f"{self.name}: `{' '.join(self.argv)}` exited with "
                                   f"{self.proc.returncode} before mounting: {self.stderr_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise MountProblem(f"{self.name}: not mounted {timeout:.0f} s after "
                                   f"`{' '.join(self.argv)}`: {self.stderr_tail()}")
            time.sleep(0.01)

    def stop(self, timeout: float = 300.0) -> None:
        """Unmount with fusermount3 -u and wait for the daemon to exit."""
        if self.proc is None:
            return
        if os.path.ismount(self.mountpoint):
            res = subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise MountProblem(f"{self.name}: fusermount3 -u {self.mountpoint}: "
                                   f"{res.stderr.strip()}")
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise MountProblem(f"{self.name}: still running {timeout:.0f} s after unmount; "
                               f"killed. {self.stderr_tail()}") from None
        self.proc = None
        if code != 0:
            raise MountProblem(f"{self.name}: exited with {code} after unmount: "
                               f"{self.stderr_tail()}")

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the daemon and lazily unmount what it leaves."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
            self.proc = None
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                       capture_output=True, check=False)

    def stderr_tail(self, lines: int = 8) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return "(no stderr)"
        tail = text.strip().splitlines()[-lines:]
        return " / ".join(tail) if tail else "(stderr empty)"

    def log_problems(self) -> list[str]:
        """WARNING/ERROR/CRITICAL lines the daemon's log gained since the first start."""
        if self.log_path is None or not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines() if _LOG_LINE.match(line)]

    def _on_deadline(self, what: str, seconds: float) -> None:
        dump = "py-spy not installed"
        spy = py_spy()
        if spy is not None and self.proc is not None:
            res = subprocess.run([spy, "dump", "--pid", str(self.proc.pid)],
                                 capture_output=True, text=True, check=False, timeout=60)
            dump = (res.stdout or res.stderr).strip()
        self.hang = (f"{what}: no answer from {self.name} (pid "
                     f"{self.proc.pid if self.proc else '?'}) in {seconds:.0f} s; "
                     f"py-spy dump of the daemon: {dump}")
        self.kill()

    @contextlib.contextmanager
    def guard(self, what: str, seconds: float) -> Iterator[None]:
        """Run a block against the mount; a hang past `seconds`, a daemon death or an
        error becomes a MountProblem naming `what`, with the daemon's log lines."""
        self.hang = None
        timer = threading.Timer(seconds, self._on_deadline, args=(what, seconds))
        timer.daemon = True
        timer.start()
        try:
            yield
        except MountProblem:
            raise
        except Exception as exc:
            timer.cancel()
            died = self.proc is not None and self.proc.poll() is not None
            head = self.hang or (f"{what}: the daemon died (exit {self.proc.returncode})"
                                 if died and self.proc else f"{what}: failed")
            raise MountProblem(
                f"{head}; error seen by the benchmark: {type(exc).__name__}: {exc}; "
                f"daemon stderr: {self.stderr_tail()}; daemon log problems: "
                f"{self.log_problems()[-10:] or 'none'}") from exc
        finally:
            timer.cancel()
        if self.hang is not None:
            raise MountProblem(self.hang)


def annofs_daemon(store: Path, mountpoint: Path, work: Path,
                  cwd: Path | None = None) -> FuseDaemon:
    """`annofs --store STORE mount --foreground MOUNTPOINT`, as tests/conftest.py runs it;
    `python -m` puts `cwd` first on the daemon's sys.path, so it picks the annofs code."""
    argv = [sys.executable, "-m", "annofs.cli.main", "--store", str(store), "mount",
            "--foreground", str(mountpoint)]
    return FuseDaemon("annofs", argv, mountpoint, work / f"{mountpoint.name}.stderr",
                      store / "daemon.log", cwd)


def passthrough_daemon(script: Path, source: Path, mountpoint: Path, work: Path) -> FuseDaemon:
    """pyfuse3's passthroughfs.py mirroring `source` at `mountpoint`, with this venv's python."""
    argv = [sys.executable, str(script), str(source), str(mountpoint)]
    return FuseDaemon("passthroughfs", argv, mountpoint, work / f"{mountpoint.name}.stderr")


def overlay_daemon(layers: Path, mountpoint: Path, work: Path,
                   lower: Path | None = None) -> FuseDaemon:
    """Debian's fuse-overlayfs (C, libfuse3's low-level API, multithreaded) over `lower`
    (an empty directory in `layers` if None): every file written lands in `layers`/upper,
    every file of `lower` is read from there, forwarded to the host filesystem call for
    call. The floor a FUSE filesystem written in C reaches here."""
    exe = shutil.which("fuse-overlayfs")
    if exe is None:
        raise Skip("fuse-overlayfs is not installed (Debian's fuse-overlayfs)")
    dirs = {part: layers / part for part in ("lower", "upper", "work")}
    if lower is not None:
        dirs["lower"] = lower
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    return FuseDaemon("fuse-overlayfs", [exe, "-f", "-o", opts, str(mountpoint)], mountpoint,
                      work / f"{mountpoint.name}.stderr")


def floor_daemon(source: Path, mountpoint: Path, work: Path) -> FuseDaemon:
    """benchmarks/pyfloor.py mirroring `source`: the least a filesystem on pyfuse3 and
    trio pays per request, run with this venv's python from this checkout."""
    argv = [sys.executable, "-m", "benchmarks.pyfloor", str(source), str(mountpoint)]
    return FuseDaemon("pyfloor", argv, mountpoint, work / f"{mountpoint.name}.stderr",
                      cwd=Path(__file__).resolve().parent.parent)
