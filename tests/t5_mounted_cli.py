"""Every command that takes a path, run offline (--store paths) and mounted (paths in a
real mount), from one table: the same exit status and output both ways, and, mounted,
the change shows in the mount at once (SPEC §3).

The same sequence of steps runs on two copies of one store: offline on the store
directly, then mounted with an enforcing policy, through the mount. Steps that change
the store carry a check run in the mount right after the command (before anything else
could refresh the kernel's or the daemon's caches): a file just signed opens, a file
just labelled malicious is refused, an imported or copied tree is there.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Mount
from fuse_helpers import stop_and_check
from t2_nix_fetch import H1, A, add_to_cache, make_tree
from t5_cli import BASE_NS, ok, write

from annofs.transfer.nar import dump_host

POLICY = """mode = "enforce"
default = "allow"
trusted-keys-dir = "keys"

[[rules]]
path = "/src/**"
signers = 1
"""


def plain(store: Path | None, *args: str, cwd: Path,
          env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """The annofs command line with `env` (and --store when given)."""
    cmd = [sys.executable, "-m", "annofs.cli.main"]
    if store is not None:
        cmd += ["--store", str(store)]
    return subprocess.run([*cmd, *args], capture_output=True, env=env, cwd=cwd, timeout=120)


def base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANNOFS_")}
    env["XDG_DATA_HOME"] = str(tmp / "no-default-store")
    return env


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with /src/proj imported; keys alice-1 and bob-1; the policy; a changed
    copy of the tree (proj2); statements over proj2 made in another store (side.jsonl);
    a NAR of proj2 (proj.nar); a binary cache with one store path signed by cache-a-1,
    whose key the policy trusts."""
    tmp = tmp_path_factory.mktemp("mounted-cli") / "t"
    tmp.mkdir()
    env = base_env(tmp)
    store = tmp / "store"
    src, src2 = tmp / "proj", tmp / "proj2"
    for root, a in ((src, b"int a;\n"), (src2, b"int a = 2;\n")):
        (root / "sub").mkdir(parents=True)
        write(root / "a.c", a, BASE_NS)
        write(root / "b.c", b"int b;\n", BASE_NS)
        write(root / "sub" / "c.c", b"int c;\n", BASE_NS)
    write(src2 / "d.c", b"int d;\n", BASE_NS)
    (tmp / "keys").mkdir()
    for name in ("alice-1", "bob-1"):
        ok(plain(None, "key", "generate", name, "--dir", "keys", cwd=tmp, env=env))
    (tmp / "policy.toml").write_text(POLICY)
    (tmp / "keys" / f"{A.name}.public").write_text(A.public_key().to_text())
    nar = b"".join(dump_host(make_tree(tmp / "hello")))
    add_to_cache(tmp / "cache", H1, "hello", nar, [A])
    ok(plain(store, "init", cwd=tmp, env=env))
    ok(plain(store, "import", str(src), "/src/proj", cwd=tmp, env=env))
    side = tmp / "side"
    ok(plain(side, "init", cwd=tmp, env=env))
    ok(plain(side, "import", str(src2), "/src/proj", cwd=tmp, env=env))
    ok(plain(side, "sign", "--key", "keys/alice-1.secret", "/src/proj", cwd=tmp, env=env))
    (tmp / "side.jsonl").write_bytes(ok(plain(side, "attest", "export", "/src/proj",
                                              cwd=tmp, env=env)))
    (tmp / "proj.nar").write_bytes(ok(plain(side, "nar", "dump", "/src/proj", cwd=tmp,
                                            env=env)))
    shutil.rmtree(side)
    return tmp


@dataclass
class Mode:
    """One run of the table: offline (mnt None) or mounted."""

    tmp: Path
    mnt: Path | None
    env: dict[str, str]
    results: list[tuple[str, int, str, str]] = field(default_factory=list)

    def p(self, store_path: str) -> str:
        """A store path as this mode names it."""
        return f"{self.mnt}{store_path}" if self.mnt is not None else store_path

    def run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return plain(None, *args, cwd=self.tmp, env=self.env)

    def oldest(self, store_path: str) -> str:
        """The id of the oldest version in the file's log."""
        return ok(self.run("log", self.p(store_path))).decode().splitlines()[-1].split()[0]

    def normal(self, text: str) -> str:
        """Output with what differs between the modes by nature masked: the mountpoint,
        the directory, times, statement ids (they sign a time), import durations."""
        if self.mnt is not None:
            text = text.replace(str(self.mnt), "")
        text = text.replace(str(self.tmp), "TMP")
        text = re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?Z?", "TIME", text)
        text = re.sub(r"statement [0-9a-f]{16}", "statement ID", text)
        return re.sub(r"[\d.]+ s \(\d+ MB/s\)", "T s", text)


def envelopes(out: str) -> str:
    """attest export lines with each statement's time and signature taken out."""
    shown = []
    for line in out.splitlines():
        env = json.loads(line)
        st = json.loads(base64.b64decode(env["payload"]))
        st["predicate"].pop("time", None)
        shown.append(json.dumps(st, sort_keys=True))
    return "\n".join(shown)


def opens(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def refused(path: Path) -> bool:
    try:
        opens(path)
    except PermissionError as e:
        return e.errno == errno.EACCES
    return False


@dataclass(frozen=True)
class Step:
    """One command: its arguments for a mode, the exit status both modes must give, a
    check of the mount right after it (mounted only), a check before it, and how to
    compare its output."""

    name: str
    args: Callable[[Mode], list[str]]
    status: int = 0
    before: Callable[[Path], None] | None = None
    after: Callable[[Path], None] | None = None
    shown: Callable[[str], str] = lambda s: s


def _unsigned(m: Path) -> None:
    assert refused(m / "src/proj/a.c")


def _signed(m: Path) -> None:
    assert opens(m / "src/proj/a.c") == b"int a;\n"


def _labelled(m: Path) -> None:
    assert refused(m / "src/proj/b.c")
    assert opens(m / "src/proj/sub/c.c") == b"int c;\n"


def _imported(m: Path) -> None:
    assert sorted(os.listdir(m / "src/proj")) == ["a.c", "b.c", "d.c", "sub"]
    assert refused(m / "src/proj/a.c")  # new content: nobody signed it here yet


def _attested(m: Path) -> None:
    assert opens(m / "src/proj/a.c") == b"int a = 2;\n"
    assert opens(m / "src/proj/d.c") == b"int d;\n"


def _copied(m: Path) -> None:
    assert opens(m / "src/copy/a.c") == b"int a = 2;\n"


def _restored(m: Path) -> None:
    assert opens(m / "src/restored/d.c") == b"int d;\n"


def _fetched(m: Path) -> None:
    assert opens(m / f"src/nix/{H1}-hello/share/greeting") == b"hello\n"


def _exported(tmp: Path) -> None:
    out = tmp / "out"
    assert (out / "a.c").read_bytes() == b"int a = 2;\n"
    assert sorted(os.listdir(out)) == ["a.c", "b.c", "d.c", "sub"]


STEPS = [
    Step("verify unsigned", lambda m: ["verify", m.p("/src/proj")], 1),
    Step("why unsigned", lambda m: ["why", m.p("/src/proj/a.c")], 1),
    Step("sign", lambda m: ["sign", "--key", "keys/alice-1.secret", m.p("/src/proj")],
         before=_unsigned, after=_signed),
    Step("verify signed", lambda m: ["verify", m.p("/src/proj")]),
    Step("attest export", lambda m: ["attest", "export", m.p("/src/proj")],
         shown=envelopes),
    Step("label", lambda m: ["label", "--key", "keys/bob-1.secret", "--label", "malicious",
                             m.p("/src/proj/b.c")], after=_labelled),
    Step("verify labelled", lambda m: ["verify", m.p("/src/proj")], 1),
    Step("why labelled", lambda m: ["why", m.p("/src/proj/b.c")], 1),
    Step("import", lambda m: ["import", "proj2", m.p("/src/proj")], after=_imported),
    Step("why patched", lambda m: ["why", m.p("/src/proj/a.c")], 1),
    Step("log", lambda m: ["log", m.p("/src/proj/a.c")]),
    Step("cat", lambda m: ["cat", f"{m.p('/src/proj/a.c')}@{m.oldest('/src/proj/a.c')}"]),
    Step("diff", lambda m: ["diff", f"{m.p('/src/proj/a.c')}@{m.oldest('/src/proj/a.c')}",
                            m.p("/src/proj/a.c")]),
    Step("attest import", lambda m: ["attest", "import", "side.jsonl"], after=_attested),
    Step("verify attested", lambda m: ["verify", m.p("/src/proj")], 1),  # b.c: labelled
    Step("cp", lambda m: ["cp", m.p("/src/proj"), m.p("/src/copy")], after=_copied),
    Step("export", lambda m: ["export", m.p("/src/proj"), "out"]),
    Step("nar hash", lambda m: ["nar", "hash", m.p("/src/proj")]),
    Step("nar dump", lambda m: ["nar", "dump", m.p("/src/copy")],
         shown=lambda s: str(len(s))),
    Step("nar restore", lambda m: ["nar", "restore", "proj.nar", m.p("/src/restored")],
         after=_restored),
    Step("verify restored", lambda m: ["verify", m.p("/src/restored")], 1),
    Step("nix fetch", lambda m: ["nix", "fetch", "--cache", "cache", "--dest", m.p("/src/nix"),
                                 H1], after=_fetched),
    Step("nix sign", lambda m: ["nix", "sign", "--key", "keys/bob-1.secret", "--cache", "cache",
                                "--dest", m.p("/src/nix"), H1]),
    Step("verify fetched", lambda m: ["verify", m.p(f"/src/nix/{H1}-hello")]),
    Step("cat PATH@WORD", lambda m: ["cat", m.p("/src/proj/a.c") + "@abc"], 2),
]


def run_steps(mode: Mode) -> None:
    for step in STEPS:
        if mode.mnt is not None and step.before is not None:
            step.before(mode.mnt)
        proc = mode.run(*step.args(mode))
        out = proc.stdout.decode(errors="replace")
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == step.status, \
            f"{step.name} ({'mounted' if mode.mnt else 'offline'}): exit {proc.returncode}\n" \
            f"{out}{err}"
        if mode.mnt is not None and step.after is not None:
            step.after(mode.mnt)
        mode.results.append((step.name, proc.returncode, mode.normal(step.shown(out)),
                             mode.normal(err)))
    _exported(mode.tmp)


def test_every_path_command_offline_and_mounted(template: Path, tmp_path: Path) -> None:
    offline_dir, mounted_dir = tmp_path / "offline", tmp_path / "mounted"
    shutil.copytree(template, offline_dir, symlinks=True)
    shutil.copytree(template, mounted_dir, symlinks=True)

    env = base_env(offline_dir)
    env["ANNOFS_STORE"] = str(offline_dir / "store")
    env["ANNOFS_POLICY"] = str(offline_dir / "policy.toml")
    offline = Mode(offline_dir, None, env)
    run_steps(offline)

    mnt = mounted_dir / "mnt"
    mnt.mkdir()
    mount = Mount(mounted_dir / "store", mnt)
    # No $ANNOFS_POLICY: commands judging paths in the mount take the mount's policy.
    env = base_env(mounted_dir)
    env["ANNOFS_STORE"] = str(mounted_dir / "store")
    mount.start("--policy", str(mounted_dir / "policy.toml"))
    try:
        mounted = Mode(mounted_dir, mnt, env)
        run_steps(mounted)
        # Writing through --store paths behind the daemon's back stays refused.
        proc = mounted.run("sign", "--key", "keys/alice-1.secret", "/src/proj")
        assert proc.returncode == 2 and b"use paths inside the mount" in proc.stderr
    finally:
        stop_and_check(mount)
    assert not mount.log_problems()

    for a, b in zip(offline.results, mounted.results, strict=True):
        assert a == b, f"{a[0]}: offline and mounted differ"


def test_sign_in_the_mount_signs_what_an_open_writer_has_written(tmp_path: Path) -> None:
    """The daemon stores what open handles wrote before a command reads the store beside
    it: `sign MNT/f` while a writer still holds f open signs the bytes a reader would
    see, and they open at once."""
    from fuse_helpers import new_mount

    (tmp_path / "keys").mkdir()
    env = base_env(tmp_path)
    ok(plain(None, "key", "generate", "alice-1", "--dir", "keys", cwd=tmp_path, env=env))
    (tmp_path / "policy.toml").write_text(POLICY)
    m = new_mount(tmp_path, "--policy", str(tmp_path / "policy.toml"))
    writer: subprocess.Popen[str] | None = None
    try:
        (m.path / "src").mkdir()
        f = m.path / "src" / "f"
        # The writer is a process of its own: a descriptor this process held would be
        # closed in each command it starts (close-on-exec), and that close is a FUSE
        # flush, which stores the bytes anyway.
        writer = subprocess.Popen(
            [sys.executable, "-c", "import sys\n"
             f"w = open({str(f)!r}, 'wb', buffering=0)\n"
             "w.write(b'first\\n'); print('written', flush=True)\n"
             "sys.stdin.readline(); w.write(b'second\\n'); w.close()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline() == "written\n"
        proc = plain(None, "sign", "--key", "keys/alice-1.secret", str(f), cwd=tmp_path,
                     env=env)
        assert proc.returncode == 0, proc.stderr
        assert opens(f) == b"first\n"
        writer.stdin.write("go\n")
        writer.stdin.close()
        assert writer.wait(timeout=30) == 0
        assert refused(f)  # the close stored new bytes: nobody signed those
        verify = plain(None, "verify", str(f), cwd=tmp_path, env=env)
        assert verify.returncode == 1 and b"/src/f: refused" in verify.stdout
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()  # it holds a file in the mount open: the unmount would fail
            writer.wait()
        stop_and_check(m)
    assert not m.log_problems()
