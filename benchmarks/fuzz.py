"""Figure `fuzz`: hostile input for every parser annofs owns outside Nix's formats, and how
many executions each fuzzer ran.

Each target feeds hypothesis-generated input to one parser and accepts only its clear
error: policy TOML, key files, signed statements (DSSE envelopes), xattr names and values
through the FUSE operations in process, and control-channel messages to a real daemon's
socket. The NAR and narinfo parsers have fuzzers of their own (tests/t1_nar.py,
tests/t1_nix_narinfo.py).

The tests (tests/t1_fuzz_parsers.py, tests/t3_fuzz_xattr.py, tests/t4_fuse_hostile.py) run
each target for a bounded number of examples (ANNOFS_FUZZ_EXAMPLES raises it); the
figure runs each for a fixed time and reports executions per parser.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annofs.errors import UsageError
from benchmarks.registry import Context, FigureResult, Row, figure

# -- the clear error -------------------------------------------------------------------


def clear_error(e: UsageError, where: str) -> None:
    """A parser's error must be one line naming what was parsed."""
    text = str(e)
    assert "\n" not in text, f"a multi-line error: {text!r}"
    assert text.startswith(where), f"the error does not name {where!r}: {text!r}"


def mutated(seed_text: str) -> st.SearchStrategy[str]:
    """A valid text with some characters replaced, inserted or deleted, or cut short."""
    alphabet = st.sampled_from(list(" =[]{}\"'#\n,.:+/-_0123456789abcxyz\\\x00\u00e9\U0001f600"))

    @st.composite
    def make(draw: st.DrawFn) -> str:
        text = seed_text
        for _ in range(draw(st.integers(1, 6))):
            if not text:
                break
            i = draw(st.integers(0, len(text) - 1))
            how = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
            if how == "replace":
                text = text[:i] + draw(alphabet) + text[i + 1:]
            elif how == "insert":
                text = text[:i] + draw(alphabet) + text[i:]
            elif how == "delete":
                text = text[:i] + text[i + 1:]
            else:
                text = text[:i]
        return text

    return make()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)


class Target:
    """One parser's fuzzer: a strategy, a check, and what they need set up."""

    name = ""

    def strategy(self) -> st.SearchStrategy[Any]:
        raise NotImplementedError

    def check(self, example: Any) -> None:
        """Feed one input; AssertionError (or any exception) on anything but the clear error."""
        raise NotImplementedError

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


# -- policy ----------------------------------------------------------------------------

VALID_POLICY = """\
mode = "enforce"
default = "allow"
trusted-public-keys = ["alice-1:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="]
trusted-keys-dir = "keys"
revoked-keys = ["mallory-1"]

[[rules]]
path = "/nix/store/**"
signers = 1
claims = ["built"]
keys = ["alice-1"]

[[rules]]
path = "/src/*/x?.c"
signers = 2
"""

POLICY_KEYS = ["mode", "default", "trusted-public-keys", "trusted-keys-dir", "revoked-keys",
               "rules"]
RULE_KEYS = ["path", "signers", "claims", "keys"]


def toml_value(v: Any) -> str:
    """A JSON-like value as TOML (inline tables and arrays)."""
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else
                                                                   ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(x)}"
                           for k, x in v.items()) + "}"


@st.composite
def policy_docs(draw: st.DrawFn) -> str:
    """A policy built field by field, each field a plausible or arbitrary value."""
    values = {
        "mode": st.sampled_from(["enforce", "warn", "off", "ENFORCE", ""]) | json_values,
        "default": st.sampled_from(["allow", "require", "deny"]) | json_values,
        "trusted-public-keys": st.lists(
            st.sampled_from(["alice-1:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
                             "bob:AAAA", "x:", ":", "c-1:" + "A" * 43 + "="])
            | st.text(max_size=50), max_size=3) | json_values,
        "trusted-keys-dir": st.sampled_from(["keys", "missing", ".", "/nonexistent", ""])
        | json_values,
        "revoked-keys": st.lists(st.text(max_size=10), max_size=3) | json_values,
    }
    lines = []
    for key in draw(st.lists(st.sampled_from(POLICY_KEYS[:-1]) | st.text(max_size=8),
                             max_size=6, unique=True)):
        strategy = values.get(key, json_values)
        lines.append(f"{json.dumps(key, ensure_ascii=False)} = {toml_value(draw(strategy))}")
    rule_values = {
        "path": st.sampled_from(["/**", "/a/*", "**", "/a/**/b", "/[x]", "/a\\*", "",
                                 "relative", "/" + "a/" * 200]) | st.text(max_size=30),
        "signers": st.integers(-3, 5) | json_values,
        "claims": st.lists(st.sampled_from(["built", "reviewed", "Bad Claim", ""]),
                           max_size=3) | json_values,
        "keys": st.lists(st.sampled_from(["alice-1", "nobody", ""]), max_size=3) | json_values,
    }
    for _ in range(draw(st.integers(0, 3))):
        lines.append("[[rules]]")
        for key in draw(st.lists(st.sampled_from(RULE_KEYS) | st.text(max_size=8),
                                 max_size=5, unique=True)):
            strategy = rule_values.get(key, json_values)
            lines.append(f"{json.dumps(key, ensure_ascii=False)} = {toml_value(draw(strategy))}")
    return "\n".join(lines) + "\n"


class PolicyTarget(Target):
    """parse_policy and load_policy: a policy file, with a keys dir holding odd key files."""

    name = "policy"

    def __enter__(self) -> PolicyTarget:
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-policy-")
        self.dir = Path(self._tmp.name)
        keys = self.dir / "keys"
        keys.mkdir()
        (keys / "alice.public").write_text(
            "alice-1:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n")
        (keys / "twin.public").write_text(
            "twin-1:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n")  # same key, other name
        self.path = self.dir / "policy.toml"
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()

    def strategy(self) -> st.SearchStrategy[Any]:
        return st.one_of(mutated(VALID_POLICY), policy_docs(), st.text(max_size=200),
                         st.binary(max_size=200))

    def check(self, example: str | bytes) -> None:
        from annofs.trust.policy import load_policy, parse_policy
        try:
            if isinstance(example, bytes):
                self.path.write_bytes(example)
                load_policy(self.path)
            else:
                parse_policy(example, self.path)
        except UsageError as e:
            clear_error(e, str(self.path))


# -- keys ------------------------------------------------------------------------------

PUBLIC = "alice-1:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
SECRET = ("alice-1:nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2DXWpgBgrEKt9VL/tPJZAc6DuFy"
          "89qmIyWvAhpo9wdRGg==")


@st.composite
def key_texts(draw: st.DrawFn) -> str:
    """`name:base64` with odd names, odd base64 and odd lengths."""
    name = draw(st.sampled_from(["k-1", "", "a b", "a:b", "é", "k\t", "-"]) | st.text(max_size=8))
    raw = draw(st.binary(max_size=80) | st.sampled_from([bytes(32), bytes(64), bytes(31)]))
    b64 = base64.b64encode(raw).decode()
    b64 = draw(st.sampled_from([b64, b64.rstrip("="), b64 + "=", b64.replace("+", "-"),
                                b64 + "\n", " " + b64, b64 + "\nsecond:line"]))
    return f"{name}:{b64}"


class KeysTarget(Target):
    """parse_public_key and parse_secret_key on text; load_public_key on a file's bytes."""

    name = "keys"

    def __enter__(self) -> KeysTarget:
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-keys-")
        self.path = Path(self._tmp.name) / "k.public"
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()

    def strategy(self) -> st.SearchStrategy[Any]:
        return st.one_of(mutated(PUBLIC), mutated(SECRET), key_texts(), st.text(max_size=120),
                         st.binary(max_size=120))

    def check(self, example: str | bytes) -> None:
        from annofs.trust.keys import (
            load_public_key,
            load_secret_key,
            parse_public_key,
            parse_secret_key,
        )
        if isinstance(example, bytes):
            self.path.write_bytes(example)
            for load in (load_public_key, load_secret_key):
                try:
                    load(self.path)
                except UsageError as e:
                    clear_error(e, str(self.path))
            return
        for parse in (parse_public_key, parse_secret_key):
            try:
                parse(example, "fuzz")
            except UsageError as e:
                clear_error(e, "fuzz")


# -- statements ------------------------------------------------------------------------


class StatementTarget(Target):
    """load_signed: whole DSSE envelope lines, mutated, arbitrary JSON, arbitrary bytes."""

    name = "statement"

    def __enter__(self) -> StatementTarget:
        from annofs.trust.keys import generate_key
        from annofs.trust.statement import make_statement, sign_statement
        key = generate_key("fuzz-1")
        ss = sign_statement(make_statement([("a/b.c", bytes(32)), ("x", bytes(range(32)))],
                                           "reviewed", key, when=1_714_564_800), key)
        self.valid = ss.envelope.to_json()
        return self

    def strategy(self) -> st.SearchStrategy[Any]:
        return st.one_of(mutated(self.valid), json_values.map(json.dumps),
                         st.binary(max_size=300))

    def check(self, example: str | bytes) -> None:
        from annofs.trust.statement import load_signed
        try:
            load_signed(example, "fuzz")
        except UsageError as e:
            clear_error(e, "fuzz: ")


def ssh_signed_statement(when: int = 1_714_564_800) -> Any:
    """An SSH-signed statement (ssh-ed25519, SSHSIG over the PAE) made in process: the
    signature is exactly what `ssh-keygen -Y sign -n annofs` makes (PROTOCOL.sshsig)."""
    import hashlib
    import struct

    import nacl.signing

    from annofs.trust import sshsig
    from annofs.trust.statement import PAYLOAD_TYPE, make_ssh_statement, pae, ssh_signed

    def string(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    sk = nacl.signing.SigningKey(bytes(range(32)))
    key = sshsig.SshPublicKey(sshsig.ED25519, bytes(sk.verify_key), None)
    st = make_ssh_statement([("a/b.c", bytes(32)), ("x", bytes(range(32)))], "reviewed",
                            key, "fuzz@host", when=when)
    message = pae(PAYLOAD_TYPE.encode(), st.payload())
    signed = (sshsig.MAGIC + string(b"annofs") + string(b"") + string(b"sha512")
              + string(hashlib.sha512(message).digest()))
    blob = (sshsig.MAGIC + struct.pack(">I", 1) + string(key.blob) + string(b"annofs")
            + string(b"") + string(b"sha512")
            + string(string(sshsig.ED25519.encode()) + string(sk.sign(signed).signature)))
    return ssh_signed(st, sshsig.armor(blob))


class SshStatementTarget(StatementTarget):
    """load_signed on SSH-signed statements: the envelope mutated, and the payload
    mutated under the original SSHSIG (the strict predicate parser, sshPublicKey)."""

    name = "ssh-statement"

    def __enter__(self) -> SshStatementTarget:
        ss = ssh_signed_statement()
        self.valid = ss.envelope.to_json()
        self.payload = ss.envelope.payload.decode()
        self.sig = base64.b64encode(ss.envelope.sig).decode()
        self.keyid = ss.envelope.keyid
        return self

    def rewrap(self, payload: str) -> str:
        return json.dumps({"payloadType": "application/vnd.in-toto+json",
                           "payload": base64.b64encode(payload.encode("utf-8", "replace"))
                           .decode(), "signatures": [{"keyid": self.keyid,
                                                      "sig": self.sig}]})

    def strategy(self) -> st.SearchStrategy[Any]:
        return st.one_of(mutated(self.valid), mutated(self.payload).map(self.rewrap),
                         st.binary(max_size=300))


# -- xattrs, through the FUSE operations in process ---------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o022


XATTR_NAMES = [b"user.a", b"user.annofs.digest", b"user.annofs.version", b"user.annofs.status",
               b"user.annofs.why", b"user.annofs.stats", b"user.annofs.", b"user.annofs.x",
               b"user.", b"user", b"trusted.x", b"security.selinux", b"system.posix_acl_access",
               b"", b"user.\x00", b"user." + b"n" * 250, b"user." + b"n" * 251,
               b"user." + b"\xff\xfe"]


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class XattrTarget(Target):
    """setxattr/getxattr/removexattr/listxattr with any names and values on a file, a
    directory, a symlink and the root: only FUSEError, nothing logged, and the stored
    attributes behave like a dictionary."""

    name = "xattr"
    ALLOWED: ClassVar[set[int]] = {errno.EPERM, errno.EOPNOTSUPP, errno.ERANGE, errno.E2BIG,
                                   errno.ENODATA, errno.ENAMETOOLONG, errno.EINVAL}

    def __enter__(self) -> XattrTarget:
        import pyfuse3
        import trio

        from annofs.fs.operations import Operations
        from annofs.volume import Volume
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-xattr-")
        self.vol = Volume.open(Path(self._tmp.name) / "store", create=True)
        self.ops = Operations(self.vol)
        self.errors = _Errors()
        logging.getLogger("annofs").addHandler(self.errors)
        ctx = _Ctx()

        async def setup() -> list[int]:
            fi, e = await self.ops.create(pyfuse3.ROOT_INODE, b"f", 0o644,
                                          os.O_RDWR | os.O_CREAT, ctx)
            await self.ops.write(fi.fh, 0, b"content")
            await self.ops.release(fi.fh)
            d = await self.ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o755, ctx)
            s = await self.ops.symlink(pyfuse3.ROOT_INODE, b"s", b"f", ctx)
            return [e.st_ino, d.st_ino, s.st_ino, pyfuse3.ROOT_INODE]

        self.inodes = trio.run(setup)
        self.model: dict[int, dict[bytes, bytes]] = {ino: {} for ino in self.inodes}
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("annofs").removeHandler(self.errors)
        self.vol.close()
        self._tmp.cleanup()

    def strategy(self) -> st.SearchStrategy[Any]:
        name = st.sampled_from(XATTR_NAMES) | st.binary(max_size=40) \
            | st.binary(max_size=20).map(lambda b: b"user." + b)
        value = st.binary(max_size=64) | st.sampled_from([65536, 65537, 200_000]).map(
            lambda n: b"v" * n)
        op = st.tuples(st.sampled_from(["set", "get", "remove", "list"]),
                       st.integers(0, 3), name, value)
        return st.lists(op, min_size=1, max_size=8)

    def check(self, example: list[tuple[str, int, bytes, bytes]]) -> None:
        import pyfuse3
        import trio
        ctx = _Ctx()

        async def run() -> None:
            for kind, which, name, value in example:
                ino = self.inodes[which]
                model = self.model[ino]
                try:
                    if kind == "set":
                        await self.ops.setxattr(ino, name, value, ctx)
                        model[name] = value
                    elif kind == "get":
                        got = await self.ops.getxattr(ino, name, ctx)
                        assert isinstance(got, bytes)
                        if not name.startswith(b"user.annofs."):
                            assert got == model[name], f"getxattr {name!r}: not what was set"
                    elif kind == "remove":
                        await self.ops.removexattr(ino, name, ctx)
                        assert model.pop(name, None) is not None, f"removed unset {name!r}"
                    else:
                        assert sorted(await self.ops.listxattr(ino, ctx)) == sorted(model)
                except pyfuse3.FUSEError as e:
                    assert e.errno in self.ALLOWED, f"{kind} {name!r}: errno {e.errno}"
                    if kind == "get" and e.errno == errno.ENODATA:
                        assert name not in model, f"getxattr {name!r}: set but ENODATA"
                    if kind == "set":
                        assert len(value) > 65536 or not name.startswith(b"user.") \
                            or name.startswith(b"user.annofs.") or len(name) > 255, \
                            f"setxattr {name!r} ({len(value)} bytes) refused: {e.errno}"

        trio.run(run)
        assert not self.errors.records, \
            f"logged: {self.errors.records[0].getMessage()} for {example!r}"


# -- control channel, on a real daemon ---------------------------------------------------

CONTROL_OPS = ["ping", "cp", "policy-reload", "gc", "", "PING", "nope"]


@st.composite
def control_messages(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["request", "json", "bytes", "nested", "huge", "unicode"]))
    if kind == "request":
        op = draw(st.sampled_from(CONTROL_OPS) | st.text(max_size=10) | json_values)
        args = draw(st.dictionaries(
            st.sampled_from(["src", "dst", "prune_history", "keep_last", "keep_within", "x"]),
            json_values | st.lists(st.sampled_from(["a", "..", ".", "", "a/b", "\x00",
                                                    "\udcff", "\ud800", "x" * 300]),
                                   max_size=3), max_size=3) | json_values)
        doc: Any = {"op": op, "args": args}
        if draw(st.booleans()):
            doc.pop("args")
        return json.dumps(doc).encode() + draw(st.sampled_from([b"\n", b"", b"\ntrailing"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode() + b"\n"
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "nested":
        depth = draw(st.sampled_from([100, 1000, 5000, 100_000]))
        opener = draw(st.sampled_from([b"[", b'{"a":']))
        return opener * depth + b"\n"
    if kind == "huge":
        # past MAX_REQUEST (1 MiB) with no newline, or a huge valid line
        size = draw(st.sampled_from([(1 << 20) + 1, 3 << 20]))
        return b"x" * size if draw(st.booleans()) else \
            b'{"op":"ping","args":{"x":"' + b"y" * size + b'"}}\n'
    return ('{"op":"' + draw(st.text(max_size=20)) + '"}\n').encode("utf-8", "surrogatepass")


def control_exchange(sock_path: Path, message: bytes, timeout: float = 30.0) -> bytes:
    """Send one message, half-close, and read everything the daemon answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(message)
            s.shutdown(socket.SHUT_WR)
        out = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while data := s.recv(65536):
                out += data
    return bytes(out)


def check_answer(answer: bytes) -> None:
    """A control answer: nothing (closed), or one JSON object line with `ok`."""
    if not answer:
        return
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1, f"not one line: {answer[:200]!r}"
    doc = json.loads(answer)
    assert isinstance(doc, dict) and isinstance(doc.get("ok"), bool), answer[:200]
    if not doc["ok"]:
        assert isinstance(doc.get("error"), str) and "\n" not in doc["error"], doc
        assert "internal error" not in doc["error"], doc


@contextlib.contextmanager
def daemon(base: Path, *extra: str) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """A fresh store under `base`, mounted by `annofs mount --foreground`: (store, mnt,
    process). Unmounted at the end."""
    store, mnt = base / "store", base / "mnt"
    mnt.mkdir(parents=True)
    cmd = [sys.executable, "-m", "annofs.cli.main", "--store", str(store)]
    subprocess.run([*cmd, "init"], check=True, stdout=subprocess.DEVNULL)
    proc = subprocess.Popen([*cmd, "mount", "--foreground", *extra, str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (os.path.ismount(mnt) and (store / "control.sock").exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.01)
        yield store, mnt, proc
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def daemon_errors(store: Path) -> list[str]:
    """ERROR/CRITICAL lines and tracebacks in a daemon's log."""
    log_file = store / "daemon.log"
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    return [line for line in text.splitlines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]


class ControlTarget(Target):
    """Any bytes to a real daemon's control socket: a clean answer or a close, and the
    daemon still answers ping and has logged no error."""

    name = "control"

    def __enter__(self) -> ControlTarget:
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-control-")
        self._daemon = daemon(Path(self._tmp.name))
        self.store, self.mnt, self.proc = self._daemon.__enter__()
        self.sock = self.store / "control.sock"
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._daemon.__exit__(None, None, None)
        finally:
            self._tmp.cleanup()

    def strategy(self) -> st.SearchStrategy[Any]:
        return control_messages()

    def check(self, example: bytes) -> None:
        check_answer(control_exchange(self.sock, example))
        assert self.proc.poll() is None, "the daemon died"
        pong = json.loads(control_exchange(self.sock, b'{"op": "ping"}\n'))
        assert pong["ok"], pong
        errors = daemon_errors(self.store)
        assert not errors, f"the daemon logged: {errors[:3]}"


TARGETS: dict[str, Callable[[], Target]] = {
    t.name: t for t in (PolicyTarget, KeysTarget, StatementTarget, SshStatementTarget,
                        XattrTarget, ControlTarget)}


# -- running ---------------------------------------------------------------------------


def run_examples(target: Target, examples: int, *, derandomize: bool = True) -> int:
    """Run `examples` hypothesis examples of an entered target; how many ran. A failure
    is shrunk and raised by hypothesis, with the falsifying input."""
    count = 0

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck))
    @given(target.strategy())
    def fuzz(example: Any) -> None:
        nonlocal count
        count += 1
        target.check(example)

    fuzz()
    return count


def run_for(target: Target, seconds: float) -> int:
    """Executions of an entered target in rounds of random examples until time is up."""
    total = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        total += run_examples(target, 100, derandomize=False)
    return total


@figure("fuzz", "fuzz executions per parser (policy, keys, statements, xattrs, control)")
def fuzz_figure(ctx: Context) -> FigureResult:
    seconds = 3.0 if ctx.quick else 30.0
    rows = []
    for name, make in TARGETS.items():
        with make() as target:
            t0 = time.monotonic()
            n = run_for(target, seconds)
            took = time.monotonic() - t0
        ctx.log(f"fuzz {name}: {n} executions in {took:.1f} s")
        rows.append(Row(f"fuzz executions: {name}", f"{n} in {took:.0f} s ({n / took:.0f}/s)",
                        "", None))
    notes = (
        f"Each parser fuzzed with hypothesis for {seconds:.0f} s (rounds of 100 random "
        "examples), accepting only its clear one-line error: policy TOML (mutated valid "
        "policies, policies built field by field, any text and bytes), key files (public "
        "and secret, text and bytes), signed statements (mutated DSSE envelopes, any JSON, "
        "any bytes), xattr names and values through the FUSE operations in process "
        "(compared with a dictionary model; nothing logged), and control-channel messages "
        "to a real daemon's socket (requests with odd ops and args, any JSON, any bytes, "
        "deeply nested JSON, frames past 1 MiB; after each the daemon must answer ping "
        "and have logged no error). A control execution includes a socket round trip "
        "and a ping. NAR and narinfo have their own fuzzers (tests/t1_nar.py, "
        "tests/t1_nix_narinfo.py). Any failure fails the figure.")
    return FigureResult(rows, notes)
