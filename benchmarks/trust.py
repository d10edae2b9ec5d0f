"""Figures `trust-read` and `trust-statement`: what enforcement costs.

SPEC.md §8: reading signed files with `mode = "enforce"` at >= 90% of the same reads with
`mode = "off"`. The tree is imported, signed with one statement over every file, mounted
once with each policy (a fresh mount each time, so the kernel caches nothing from the
other run), and every file is read through the mount by one process. Also reported: the
time to sign that statement and to verify it (parse the envelope, check the signature).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from annofs.trust.keys import generate_key, write_key_pair
from annofs.trust.statement import load_signed
from annofs.volume import Volume
from benchmarks.registry import Context, FigureResult, Row, figure

FILES, QUICK_FILES = 50_000, 2_000
PER_DIR = 250


def _cmd(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "annofs.cli.main", "--store", str(store), *args]


def _make_tree(root: Path, files: int) -> None:
    for i in range(files):
        d = root / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06d}.c").write_bytes(b"/* file %d */\nint f%d(void) { return %d; }\n"
                                        % (i, i, i))


def _read_all(root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                f.read()
            n += 1
    return time.perf_counter() - start, n


def _policy(path: Path, mode: str) -> Path:
    path.write_text(f'mode = "{mode}"\ndefault = "allow"\ntrusted-keys-dir = "keys"\n\n'
                    f'[[rules]]\npath = "/src/**"\nsigners = 1\n')
    return path


def _mounted_read(ctx: Context, store: Path, policy: Path) -> float:
    mnt = ctx.work / "trust-mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(_cmd(store, "mount", "--policy", str(policy), str(mnt)), check=True)
    try:
        seconds, n = _read_all(mnt / "src" / "tree")
    finally:
        subprocess.run(_cmd(store, "umount", str(mnt)), check=True)
    ctx.log(f"trust: read {n} files with {policy.name} in {seconds:.2f} s")
    return seconds


@figure("trust", "enforcement cost: reads with mode enforce vs off; one statement over a tree")
def trust(ctx: Context) -> FigureResult:
    """Read a signed tree through the mount under each mode; sign and verify its statement."""
    files = QUICK_FILES if ctx.quick else FILES
    tree = ctx.work / "trust-tree"
    ctx.log(f"trust: making a {files}-file tree")
    _make_tree(tree, files)
    store = ctx.work / "trust-store"
    subprocess.run(_cmd(store, "init"), check=True, capture_output=True)
    subprocess.run(_cmd(store, "import", str(tree), "/src/tree"), check=True,
                   capture_output=True)
    keys = ctx.work / "keys"
    keys.mkdir()
    secret, _public = write_key_pair(generate_key("bench-1"), keys)
    start = time.perf_counter()
    subprocess.run(_cmd(store, "sign", "--key", str(secret), "/src/tree"), check=True,
                   capture_output=True)
    t_sign_cmd = time.perf_counter() - start
    exported = subprocess.run(_cmd(store, "attest", "export", "/src/tree"), check=True,
                              capture_output=True, text=True).stdout.splitlines()
    envelope = max(exported, key=len)
    start = time.perf_counter()
    ss = load_signed(envelope, "bench")
    t_verify = time.perf_counter() - start
    subjects = len(ss.statement.subjects) if hasattr(ss, "statement") else files
    vol = Volume.open(store)
    vol.close()
    # Interleaved, best of three each: a load that comes and goes (another process on
    # the two cores) then hits both modes alike instead of deciding the ratio.
    policies = {mode: _policy(ctx.work / f"{mode}.toml", mode) for mode in ("off", "enforce")}
    times: dict[str, list[float]] = {mode: [] for mode in policies}
    for _ in range(3):
        for mode, policy in policies.items():
            times[mode].append(_mounted_read(ctx, store, policy))
    t_off, t_on = min(times["off"]), min(times["enforce"])
    rate = lambda t: f"{files / t:.0f} files/s"  # noqa: E731
    rows = [
        Row(f"reading {files} signed files, enforce vs off (throughput)", rate(t_on),
            rate(t_off), t_off / t_on, ">= 0.90"),
        Row(f"`annofs sign` of one statement over {files} files (command)",
            f"{t_sign_cmd:.2f} s", "", None),
        Row(f"verify one statement over {subjects} subjects (parse + ed25519)",
            f"{t_verify * 1000:.0f} ms", "", None),
    ]
    notes = f"""\
What: a tree of {files} small C files ({PER_DIR} per directory) imported to /src/tree and
signed by one key in one statement; mounted with a policy needing 1 signer under /src/**,
with mode "off" and with mode "enforce" (best of three fresh mounts each, interleaved), and
every file opened and read by one process walking the tree. The ratio is throughput with
enforce over throughput with off. The statement figure is `load_signed` of the exported
envelope (JSON parse, strict checks, the PAE and one ed25519 verification)."""
    return FigureResult(rows, notes)
