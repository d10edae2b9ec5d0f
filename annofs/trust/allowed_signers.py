"""OpenSSH's `allowed_signers` file (ssh-keygen(1), "ALLOWED SIGNERS"), read as annofs's
list of trusted SSH keys, so a team's existing file works unchanged.

    principals [options] keytype base64-key [comment]

principals: comma-separated names (a name is what annofs shows for the key; patterns
with `*` or `?` are kept but only name the key). Options (comma-separated):
`namespaces="a,b"` (the key counts for annofs only if `annofs` matches one),
`valid-after=` / `valid-before=` (YYYYMMDD or YYYYMMDDHHMM[SS], `Z` for UTC, else local
time, as OpenSSH reads them), `cert-authority` (refused: annofs verifies plain keys, not
certificates; say so rather than trust a CA's every key). Blank lines and `#` comments
are skipped. Every problem is `FILE:LINE: problem`, one line.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

from annofs.errors import UsageError
from annofs.trust.sshsig import NAMESPACE, SshPublicKey, SshSigError

_TIME = re.compile(r"(\d{8})(\d{4}(\d{2})?)?(Z)?")


@dataclass(frozen=True)
class AllowedSigner:
    """One line: who, which key, for which namespaces, and when."""

    principals: tuple[str, ...]
    key: SshPublicKey
    namespaces: tuple[str, ...] | None  # None: every namespace
    valid_after: float | None  # seconds since the epoch
    valid_before: float | None
    where: str  # FILE:LINE

    @property
    def name(self) -> str:
        """What annofs calls this key: its first principal."""
        return self.principals[0]

    def allows_namespace(self, namespace: str = NAMESPACE) -> bool:
        """Whether the line lets the key sign in `namespace` (patterns as OpenSSH)."""
        return self.namespaces is None or any(fnmatch.fnmatchcase(namespace, p)
                                              for p in self.namespaces)

    def valid_at(self, when: float) -> bool:
        """Whether `when` (seconds since the epoch) is inside the key's validity."""
        return ((self.valid_after is None or when >= self.valid_after)
                and (self.valid_before is None or when < self.valid_before))


def _split_options(text: str) -> list[str]:
    """Comma-separated options; a double-quoted value may contain commas (the quotes are
    balanced: `_fields` checked)."""
    out, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def _time(value: str, where: str, option: str) -> float:
    m = _TIME.fullmatch(value)
    if m is None:
        raise UsageError(f"{where}: {option}={value!r}: expected YYYYMMDD[HHMM[SS]][Z]")
    digits = m.group(1) + (m.group(2) or "")
    fmt = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}[len(digits)]
    try:
        t = dt.datetime.strptime(digits, fmt)
    except ValueError:
        raise UsageError(f"{where}: {option}={value!r}: not a date") from None
    if m.group(4):
        return t.replace(tzinfo=dt.UTC).timestamp()
    return t.timestamp()  # local time, as OpenSSH reads a time without Z


def _fields(line: str, where: str) -> list[str]:
    """Whitespace-separated fields; double quotes group (options may hold spaces)."""
    out, cur, quoted = [], "", False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        if ch.isspace() and not quoted:
            if cur:
                out.append(cur)
                cur = ""
        else:
            cur += ch
    if quoted:
        raise UsageError(f"{where}: an option's quote is not closed")
    if cur:
        out.append(cur)
    return out


def parse_line(line: str, where: str) -> AllowedSigner | None:
    """One line of the file; None for a blank line or a comment."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    fields = _fields(stripped, where)
    if len(fields) < 3:
        raise UsageError(f"{where}: expected 'PRINCIPALS [OPTIONS] KEYTYPE BASE64-KEY'")
    principals = tuple(p for p in fields[0].split(",") if p)
    if not principals:
        raise UsageError(f"{where}: no principal")
    rest = fields[1:]
    options: list[str] = []
    if not rest[0].startswith(("ssh-", "sk-", "ecdsa-")):
        options = _split_options(rest[0])
        rest = rest[1:]
    if len(rest) < 2:
        raise UsageError(f"{where}: expected a key type and a base64 key")
    namespaces = valid_after = valid_before = None
    for opt in options:
        name, eq, value = opt.partition("=")
        name = name.strip().lower()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name == "cert-authority":
            raise UsageError(f"{where}: cert-authority lines are not supported (annofs "
                             f"trusts plain keys; list each key)")
        if not eq:
            raise UsageError(f"{where}: unknown option {name!r}")
        if name == "namespaces":
            namespaces = tuple(n.strip() for n in value.split(",") if n.strip())
        elif name == "valid-after":
            valid_after = _time(value, where, name)
        elif name == "valid-before":
            valid_before = _time(value, where, name)
        else:
            raise UsageError(f"{where}: unknown option {name!r}")
    try:
        key = SshPublicKey.from_text(f"{rest[0]} {rest[1]}", where)
    except SshSigError as e:
        raise UsageError(str(e)) from None
    return AllowedSigner(principals, key, namespaces, valid_after, valid_before, where)


def parse_allowed_signers(text: str, source: str) -> list[AllowedSigner]:
    """Every line of an allowed_signers file's text."""
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        signer = parse_line(line, f"{source}:{no}")
        if signer is not None:
            out.append(signer)
    return out


def load_allowed_signers(path: Path) -> list[AllowedSigner]:
    """Read and parse an allowed_signers file; one-line errors naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such allowed_signers file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    return parse_allowed_signers(text, str(path))
