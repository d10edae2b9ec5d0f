"""The trust policy: a TOML file saying which paths need which signatures (SPEC §4).

```toml
mode = "enforce"                 # enforce | warn | off            (default: enforce)
default = "allow"                # paths no rule matches: allow | require (default: allow)
trusted-public-keys = ["alice-1:Qm...="]   # Nix notation, as in nix.conf
trusted-keys-dir = "keys"        # every *.public in it, relative to the policy file
trusted-ssh-signers = "allowed_signers"   # OpenSSH's format, relative to the policy file
revoked-keys = ["mallory-1"]     # key names, NAME:BASE64 public keys, SSH principals or
                                 # SHA256:... SSH key fingerprints
trust-bundle = "https://example.org/trust"  # a TUF trust bundle (URL or directory)
trust-bundle-root = "sha256:..." # its first root.json, pinned by hash
on-stale = "refuse"              # bundle expired, no update: refuse | warn
nix-database = "/nix/var/nix/db/db.sqlite"  # judge /nix/store as Nix registers it

[[rules]]                        # the first rule whose glob matches wins
path = "/src/**"                 # see annofs.trust.pathglob for the grammar
signers = 2                      # distinct trusted public keys needed (required, >= 0)
claims = ["reviewed"]            # optional: only statements with one of these claims count
keys = ["alice-1", "bob-1"]      # optional: only these keys count
user-presence = true             # optional: only FIDO (sk) SSH signatures made with a touch
user-verification = true         # optional: ... and with a PIN or fingerprint
```

SSH keys (`trusted-ssh-signers`, an allowed_signers file as ssh-keygen(1) reads it): a
key listed there is trusted for SSH-signed statements only (annofs/trust/statement.py),
named by its first principal, and counts only when its line allows namespace `annofs`
and both the statement's own time and the time of verification are within its
valid-after/valid-before. The statement's time alone is written by the signer: a key
past its valid-before could otherwise keep signing backdated statements; the time of
verification alone would let a key approve what it signed before it was granted
(valid-after). So a statement counts while the key is valid, and stops counting when
the key expires (re-sign with the new key). A rule with `user-presence` (or
`user-verification`) counts only signatures whose FIDO token asserted that flag: a plain
ssh-ed25519 key or a Nix key has no token to ask, so its statements do not count there.
Rules without it accept sk signatures with or without the flag (OpenSSH's own default,
requiring a touch unless `no-touch-required`, is the rule's to ask for here).

`default = "require"` asks for one trusted signer, any claim.

Strict by design: an unknown key, a wrong type, a name that matches no trusted key, a
rule that can never be satisfied through its own `keys` list are errors, because a typo
must not silently weaken (or silently break) a policy. Every error is one line:
`FILE:LINE: FIELD: PROBLEM`, the line found in the text (TOML parsers give a line only
for syntax errors).

Trust is per public key. Two names for one key are one signer; revoking a name revokes
every key that name is bound to, under all its names; a name bound to two different keys
is refused as ambiguous.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import os
import re
import tomllib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from annofs.errors import UsageError
from annofs.printable import one_line
from annofs.trust.allowed_signers import AllowedSigner, load_allowed_signers
from annofs.trust.keys import check_key_name, key_fingerprint, load_public_key, parse_public_key
from annofs.trust.pathglob import PathGlob, path_text
from annofs.trust.sshsig import SK_ED25519, SshPublicKey
from annofs.trust.statement import (
    GIT_NAMESPACE,
    LABEL_CLAIM,
    SignedStatement,
    Statement,
    check_word,
)
from annofs.userfile import read_user_file

# Each loaded policy gets a new generation: verdict caches key on it.
_GENERATIONS = itertools.count(1)
RULE_MEMO = 16384  # directories whose rule plan a policy remembers

_TOP_KEYS = ("mode", "default", "trusted-public-keys", "trusted-keys-dir",
             "trusted-ssh-signers", "revoked-keys", "rules")
_TOP_KEYS += ("trust-bundle", "trust-bundle-root", "on-stale")  # the trust bundle (TUF)
_TOP_KEYS += ("nix-database",)  # Nix's db.sqlite: the store-aware gate (trust/nixstore.py)
_RULE_KEYS = ("path", "signers", "claims", "keys", "user-presence", "user-verification")
SSH_NAMESPACE = "annofs"


class Mode(enum.Enum):
    """What a refusal does."""

    ENFORCE = "enforce"  # open() fails with EACCES
    WARN = "warn"  # open() succeeds; the verdict is flagged and recorded
    OFF = "off"  # nothing is checked


class Default(enum.Enum):
    """What paths that no rule matches need."""

    ALLOW = "allow"
    REQUIRE = "require"  # one trusted signer


class OnStale(enum.Enum):
    """What rules that need signers do while the trust bundle is stale."""

    REFUSE = "refuse"
    WARN = "warn"  # allow, and record


@dataclass(frozen=True)
class BundleView:
    """The policy's trust bundle as loaded: where from, and whether it is fresh."""

    source: str
    pin: str
    on_stale: OnStale
    stale: str | None  # why it is stale ("" never: None when fresh)
    summary: tuple[str, ...] = ()
    expires: float | None = None  # epoch seconds when it turns stale (None: unknown)

    def stale_text(self) -> str | None:
        """`trust bundle SOURCE is stale: WHY`, or None when fresh."""
        if self.stale is None:
            return None
        return f"trust bundle {self.source} is stale: {self.stale}"


@dataclass(frozen=True)
class Rule:
    """One [[rules]] table."""

    index: int
    glob: PathGlob
    signers: int
    claims: frozenset[str] | None
    key_names: tuple[str, ...] | None
    keys: frozenset[bytes] | None  # the public keys `key_names` resolve to
    line: int | None = None
    user_presence: bool = False  # only FIDO signatures made with a touch count
    user_verification: bool = False  # only FIDO signatures with a PIN/biometric count

    def token_refusal(self, ss: SignedStatement) -> str | None:
        """Why a statement does not count under this rule's user-presence/verification
        (None: it does, or the rule asks for neither)."""
        if not (self.user_presence or self.user_verification):
            return None
        ssh_key, v = ss.statement.ssh_key, ss.ssh_verified
        need = "user-presence" if self.user_presence else "user-verification"
        if ssh_key is None or ssh_key.key_type != SK_ED25519 or v is None:
            return f"not signed on a FIDO token (this rule needs {need})"
        if self.user_presence and not v.user_present:
            return "the FIDO token did not assert user presence (no touch)"
        if self.user_verification and not v.user_verified:
            return "the FIDO token did not assert user verification (no PIN)"
        return None

    @property
    def label(self) -> str:
        """`rules[1] /src/**`, as verdicts and errors name a rule."""
        return f"rules[{self.index}] {self.glob.glob}"

    def describe(self) -> str:
        """One line: what the rule asks for."""
        what = f"needs {self.signers} signer{'s' if self.signers != 1 else ''}"
        if self.claims is not None:
            what += f"; claims: {', '.join(sorted(self.claims))}"
        if self.key_names is not None:
            what += f"; keys: {', '.join(self.key_names)}"
        if self.user_presence:
            what += "; user-presence"
        if self.user_verification:
            what += "; user-verification"
        return f"{self.label}: {what}"


def signers_needed(policy: Policy, rule: Rule | None) -> int:
    """How many signers content under `rule` (None: the default) needs."""
    if rule is not None:
        return rule.signers
    return 1 if policy.default is Default.REQUIRE else 0


@dataclass(frozen=True, slots=True)
class _DirectoryRules:
    """How the rule of a name in one directory is found: the rules that depend on the
    name, in policy order, each tried against the whole path; failing those, `otherwise`
    (the first directory-wide rule that covers the directory, or None for the default)."""

    by_name: tuple[Rule, ...]
    otherwise: Rule | None

    @staticmethod
    def of(rules: Sequence[Rule], directory: Sequence[bytes]) -> _DirectoryRules:
        """The plan for names in `directory` under `rules` (first match wins)."""
        by_name: list[Rule] = []
        for rule in rules:
            if not rule.glob.by_directory:
                by_name.append(rule)
            elif rule.glob.covers_children(directory):
                return _DirectoryRules(tuple(by_name), rule)
            # else: a directory-wide rule matching no name here
        return _DirectoryRules(tuple(by_name), None)


@dataclass(frozen=True)
class Policy:
    """A parsed policy. `trusted` maps each trusted public key to its names (policy order)."""

    source: str
    mode: Mode
    default: Default
    trusted: Mapping[bytes, tuple[str, ...]]
    revoked: frozenset[bytes]
    rules: tuple[Rule, ...]
    keys_from_dir: int = 0
    # From the trust bundle (annofs.trust.bundle_client): a revoked key's statements
    # signed before `since` still count; labels by content digest; the bundle's freshness.
    revoked_since: Mapping[bytes, int] = field(default_factory=dict)
    labels: Mapping[bytes, tuple[str, ...]] = field(default_factory=dict)
    bundle: BundleView | None = None
    generation: int = field(default_factory=lambda: next(_GENERATIONS))
    # 32-byte Ed25519 key -> its allowed_signers lines; those keys are in `trusted` too
    # (under their principals), for SSH-signed statements only unless also in nix_keys.
    ssh_signers: Mapping[bytes, tuple[AllowedSigner, ...]] = field(default_factory=dict)
    nix_keys: frozenset[bytes] | None = None  # None: every key of `trusted`
    ssh_file: str | None = None
    # Nix's database (`nix-database`, absolute): paths under /nix/store are then judged
    # as Nix registers them (trust/nixstore.py); None: like any other path.
    nix_database: str | None = None

    # Directory (its names) -> how the rule of a name in it is found (`_DirectoryRules`),
    # memoized for this policy only: a reload makes a new Policy, so a memo never
    # outlives the rules it was computed from.
    _dir_memo: dict[tuple[bytes, ...], _DirectoryRules] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def rule_for(self, path: str) -> Rule | None:
        """The first rule whose glob matches the store path, or None (the default)."""
        for rule in self.rules:
            if rule.glob.matches(path):
                return rule
        return None

    def same_rules_below(self, a: Sequence[bytes], b: Sequence[bytes]) -> bool:
        """Whether every name below directory `a` falls under the rule the same name below
        `b` does (a directory moved from `a` to `b` keeps its contents' rules). A sure
        True only: one directory-wide rule covers both, and no rule before it (none at
        all, for the default) might match anything below either."""
        first = _DirectoryRules.of(self.rules, a)
        if first.by_name or _DirectoryRules.of(self.rules, b) != first:
            return False
        ends = first.otherwise.index if first.otherwise is not None else len(self.rules)
        return not any(rule.glob.may_match_below(path_text(d))
                       for rule in self.rules[:ends] for d in (a, b))

    def signers_below(self, d: Sequence[bytes]) -> bool:
        """Whether some name below directory `d` might need signers. A sure False only:
        no rule before the first directory-wide one that covers `d` (none at all, for the
        default) might match below it, and that one needs none."""
        first = _DirectoryRules.of(self.rules, d)
        ends = first.otherwise.index if first.otherwise is not None else len(self.rules)
        return signers_needed(self, first.otherwise) > 0 or any(
            rule.glob.may_match_below(path_text(d)) for rule in self.rules[:ends])

    def rule_at(self, parts: Sequence[bytes]) -> Rule | None:
        """`rule_for` of the store path with these names, decided per directory.

        Every judged open asks, and a build or a `tar` opens most files once: a memo per
        path would miss every time. Rules whose glob ends in `/**` (most do) are decided
        for a whole directory at once; only the others are matched against the name. The
        memo holds at most RULE_MEMO directories, then starts over (a pure function's
        memo: losing entries costs a match each, never a wrong answer).
        """
        if not parts or not self.rules:
            return self.rule_for(path_text(parts)) if self.rules else None
        directory = tuple(parts[:-1])
        memo = self._dir_memo
        plan = memo.get(directory)
        if plan is None:
            plan = _DirectoryRules.of(self.rules, directory)
            if len(memo) >= RULE_MEMO:
                memo.clear()  # simplest bound; safe if another thread is using it too
            memo[directory] = plan
        if plan.by_name:
            text = path_text(parts)
            for rule in plan.by_name:
                if rule.glob.matches(text):
                    return rule
        return plan.otherwise

    def is_trusted(self, key: bytes) -> bool:
        """Trusted and not revoked."""
        return key in self.trusted and key not in self.revoked

    def trusts_key_of(self, st: Statement) -> bool:
        """Whether the statement's key is trusted in its own format: an SSH-signed
        statement through trusted-ssh-signers (that exact key, type and application),
        any other through the Nix-format keys (revocation is checked separately)."""
        return self.trusts(st.public_key, st.ssh_key)

    def trusts(self, key: bytes, ssh_key: SshPublicKey | None) -> bool:
        """`trusts_key_of` for a 32-byte key, and the SSH key if SSH-signed."""
        if ssh_key is None:
            return key in (self.nix_keys if self.nix_keys is not None else self.trusted)
        return any(line.key == ssh_key for line in self.ssh_signers.get(key, ()))

    def ssh_refusal(self, st: Statement, now: float) -> str | None:
        """Why a trusted SSH key's statement does not count (None: it does): no line for
        the key allows namespace `annofs` (`git` for a signed git tag or commit) at the
        statement's time and at `now`."""
        lines = [ln for ln in self.ssh_signers.get(st.public_key, ()) if ln.key == st.ssh_key]
        if not lines:
            return "not in trusted-ssh-signers"
        # A signed git tag or commit was signed in git's namespace, by git.
        namespace = GIT_NAMESPACE if st.git is not None else SSH_NAMESPACE
        spaced = [ln for ln in lines if ln.allows_namespace(namespace)]
        if not spaced:
            return (f"{lines[0].where}: namespaces={','.join(lines[0].namespaces or ())} "
                    f"does not allow {namespace!r}")
        if any(ln.valid_at(st.time) and ln.valid_at(now) for ln in spaced):
            return None
        ln = spaced[0]
        for when, what in ((st.time, "the statement's time"), (now, "now")):
            if not ln.valid_at(when):
                return f"{ln.where}: key not valid at {what} (valid-after/valid-before)"
        return f"{ln.where}: key not valid (valid-after/valid-before)"

    def cache_generation(self, now: float) -> Hashable:
        """What verdicts under this policy are cached by: its generation, and how many
        SSH valid-after/valid-before times have passed (a verdict may change then)."""
        times = self._validity_times
        if not times:
            return self.generation  # nothing expires: every judged open asks, keep it cheap
        return (self.generation, bisect.bisect_right(times, now))

    @cached_property
    def _validity_times(self) -> list[float]:
        """Every valid-after/valid-before time, sorted (asked at every judged open)."""
        return sorted(t for lines in self.ssh_signers.values() for ln in lines
                      for t in (ln.valid_after, ln.valid_before) if t is not None)

    def name_of(self, key: bytes) -> str | None:
        """The policy's first name for a trusted key (revoked or not), else None."""
        names = self.trusted.get(key)
        return names[0] if names else None

    def summary(self) -> str:
        """A few lines for `annofs policy check`."""
        lines = [
            f"{self.source}: mode {self.mode.value}, default {self.default.value}; "
            f"{len(self.trusted)} trusted key{'s' if len(self.trusted) != 1 else ''}"
            + (f" ({self.keys_from_dir} from trusted-keys-dir)" if self.keys_from_dir else "")
            + f", {len(self.revoked)} revoked; {len(self.rules)} "
            f"rule{'s' if len(self.rules) != 1 else ''}",
        ]
        for key, names in self.trusted.items():
            state = " (revoked)" if key in self.revoked else ""
            ssh = self.ssh_signers.get(key)
            if ssh:
                state = (f" (SSH {ssh[0].key.fingerprint}, {ssh[0].key.key_type})"
                         + state)
            lines.append(f"  key {', '.join(names)}{state}")
        if self.ssh_file is not None:
            n = sum(len(v) for v in self.ssh_signers.values())
            lines.append(f"  trusted-ssh-signers: {self.ssh_file} ({n} "
                         f"line{'s' if n != 1 else ''})")
        lines.extend(f"  {r.describe()}" for r in self.rules)
        if self.bundle is not None:
            lines.extend(self.bundle.summary or (f"bundle {self.bundle.source}",))
            stale = self.bundle.stale_text()
            if stale:
                lines.append(f"  {stale} (on-stale = {self.bundle.on_stale.value!r})")
        return "\n".join(lines)

    def is_revoked_for(self, key: bytes, signed_at: int) -> bool:
        """Whether a statement by `key` signed at `signed_at` falls under a revocation
        (a bundle's revocation may start at a time: `since`)."""
        if key not in self.revoked:
            return False
        since = self.revoked_since.get(key)
        return since is None or signed_at >= since

    def warnings(self) -> list[str]:
        """What makes the policy do less than its author likely meant (`policy check`)."""
        out = []
        if not self.rules:
            out.append(f"{self.source}: no rules: every path gets default = "
                       f"{self.default.value!r}")
        needs_keys = self.default is Default.REQUIRE or any(r.signers for r in self.rules)
        if not self.trusted and (needs_keys or not self.rules):
            out.append(f"{self.source}: no trusted keys (trusted-public-keys, "
                       f"trusted-keys-dir): no signature counts")
        return out


def signer_name(policy: Policy | None, key: bytes, claimed: str, *,
                valid: bool = True, ssh_key: SshPublicKey | None = None) -> str:
    """How to show who signed a statement: the policy's name for a key it trusts; any
    other key by its fingerprint, the name it gives itself only as a claim (anybody can
    make a key called alice-1). `valid`: the statement's signature verifies (else even a
    trusted key's name is only claimed). `ssh_key`: an SSH-signed statement's key (named
    only if trusted-ssh-signers lists it; shown by its SHA256 fingerprint otherwise)."""
    trusted = policy is not None and valid and policy.trusts(key, ssh_key)
    name = policy.name_of(key) if policy is not None and trusted else None
    if name is not None:
        return name
    what = "untrusted key" if valid else "bad signature by key"
    shown = ssh_key.fingerprint if ssh_key is not None else key_fingerprint(key)
    return f"{what} {shown} (claims {one_line(repr(claimed))})"


def statement_signer(policy: Policy | None, ss: SignedStatement) -> str:
    """`signer_name` of a signed statement (its key, claimed name, format, validity)."""
    st = ss.statement
    name = signer_name(policy, st.public_key, st.signer, valid=ss.signature_valid,
                       ssh_key=st.ssh_key)
    if st.git is not None:
        # A signed git tag or commit: say which, so `why` names the chain's first link.
        what = (f"tag {st.git.tag}, commit {st.git.commit[:12]}" if st.git.tag is not None
                else f"commit {st.git.commit[:12]}")
        name = f"{name} (git {what})"
    return name


def permissive_policy() -> Policy:
    """A policy that allows everything (mode off): what a mount without --policy uses."""
    return Policy("(no policy)", Mode.OFF, Default.ALLOW, {}, frozenset(), ())


# -- locating keys in the text --------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[\s*rules\s*\]\]\s*(#.*)?$")
_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+|\"[^\"]*\")")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*[.=]")


class _Locator:
    """Finds the line of a top-level key, of a rule, or of a key in a rule.

    Best effort over the raw text (comments, tables, [[rules]] headers, `key =` lines);
    anything it cannot place is reported without a line rather than with a wrong one.
    """

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.top: dict[str, int] = {}
        self.rules: list[int] = []
        self.rule_keys: list[dict[str, int]] = []
        table: str | None = None
        for no, line in enumerate(self.lines, 1):
            if _HEADER.match(line):
                table = "rules"
                self.rules.append(no)
                self.rule_keys.append({})
                continue
            m = _TABLE.match(line)
            if m and not line.lstrip().startswith("[["):
                table = m.group(1).strip('"')
                self.top.setdefault(table, no)
                continue
            m = _KEY.match(line)
            if not m:
                continue
            key = m.group(1).strip("\"'")
            if table is None:
                self.top.setdefault(key, no)
            elif table == "rules" and self.rule_keys:
                self.rule_keys[-1].setdefault(key, no)

    def key(self, name: str) -> int | None:
        return self.top.get(name)

    def rule(self, i: int, key: str | None = None) -> int | None:
        if i < len(self.rule_keys):
            if key is not None and key in self.rule_keys[i]:
                return self.rule_keys[i][key]
            return self.rules[i]
        return self.top.get("rules")  # rules = [{...}, ...] written inline

    def value(self, start: int | None, text: str) -> int | None:
        """The first line at or after `start` that holds `text` (an array item)."""
        if start is None:
            return None
        for no in range(start, len(self.lines) + 1):
            if text in self.lines[no - 1]:
                return no
        return start


# -- parsing ---------------------------------------------------------------------------------


class _Parser:
    def __init__(self, path: Path, text: str, store: Path | None = None) -> None:
        self.store = store
        self.path = path
        self.name = str(path)
        self.text = text
        self.loc = _Locator(text)

    def fail(self, line: int | None, fieldname: str, problem: str) -> UsageError:
        where = f"{self.name}:{line}" if line is not None else self.name
        # Field names and values come from the file: a key "\n" must not break the
        # error's one line.
        return UsageError(one_line(f"{where}: {fieldname}: {problem}"))

    def parse(self) -> Policy:
        try:
            doc = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            raise self._syntax_error(e) from None
        for key in doc:
            if key not in _TOP_KEYS:
                raise self.fail(self.loc.key(key), key,
                                f"unknown key (known: {', '.join(_TOP_KEYS)})")
        mode = self._enum(doc, "mode", Mode, Mode.ENFORCE)
        default = self._enum(doc, "default", Default, Default.ALLOW)
        # key -> names, and where each name came from (for ambiguity errors)
        trusted: dict[bytes, list[str]] = {}
        bound: dict[str, tuple[bytes, str]] = {}
        self._trusted_list(doc, trusted, bound)
        from_dir = self._trusted_dir(doc, trusted, bound)
        bundle = self._bundle(doc, trusted, bound)
        # Keys that count for Nix-format statements: the listed, the directory's and the
        # bundle's; an allowed_signers key counts for SSH-signed statements only.
        nix_keys = frozenset(trusted)
        ssh_signers, ssh_file = self._ssh_signers(doc, trusted, bound)
        revoked = self._revoked(doc, bound, ssh_signers)
        rules = self._rules(doc, bound)
        since: dict[bytes, int] = {}
        labels: dict[bytes, tuple[str, ...]] = {}
        view = None
        if bundle is not None:
            view, content = bundle
            if content is not None:
                for r in content.revocations:
                    # A local revocation (no `since`) is the stricter one: it wins.
                    if r.key.key not in revoked and r.since is not None:
                        since[r.key.key] = min(r.since, since.get(r.key.key, r.since))
                for r in content.revocations:
                    if r.since is None:
                        since.pop(r.key.key, None)
                    revoked.add(r.key.key)
                for digest, label in content.labels:
                    labels[digest] = (*labels.get(digest, ()), label)
                for j, table in enumerate(content.rules):
                    rules.append(self._bundle_rule(len(rules), j, table, bound))
        return Policy(self.name, mode, default,
                      {k: tuple(v) for k, v in trusted.items()}, frozenset(revoked),
                      tuple(rules), from_dir, since, labels, view,
                      ssh_signers=ssh_signers,
                      nix_keys=nix_keys if ssh_signers else None, ssh_file=ssh_file,
                      nix_database=self._nix_database(doc))

    def _nix_database(self, doc: dict[str, Any]) -> str | None:
        """`nix-database`: the path of Nix's db.sqlite (relative to the policy file's
        directory), read read-only by the store-aware gate. It need not exist yet: Nix
        creates it on first use, and until then nothing under /nix/store is registered."""
        key = "nix-database"
        if key not in doc:
            return None
        value = doc[key]
        if not isinstance(value, str) or not value or "\0" in value:
            raise self.fail(self.loc.key(key), key,
                            f"must be the path of Nix's db.sqlite, got {_show(value)}")
        return os.path.abspath(self.path.parent / value)

    def _bundle(self, doc: dict[str, Any], trusted: dict[bytes, list[str]],
                bound: dict[str, tuple[bytes, str]]) -> tuple[BundleView, Any] | None:
        """The trust bundle's stored state (annofs bundle update fetches it): its keys
        join the trusted ones; None if the policy names no bundle."""
        if "trust-bundle" not in doc:
            for key in ("trust-bundle-root", "on-stale"):
                if key in doc:
                    raise self.fail(self.loc.key(key), key, "needs trust-bundle")
            return None
        from annofs.trust.bundle_client import load_state, parse_pin

        source = doc["trust-bundle"]
        if not isinstance(source, str) or not source:
            raise self.fail(self.loc.key("trust-bundle"), "trust-bundle",
                            f"must be a URL or a directory, got {_show(source)}")
        if not source.startswith(("http://", "https://", "/")):
            # Relative to the policy, as trusted-keys-dir.
            source = os.path.abspath(self.path.parent / source)
        if "trust-bundle-root" not in doc:
            raise self.fail(self.loc.key("trust-bundle"), "trust-bundle",
                            "needs trust-bundle-root = \"sha256:<hex>\" (the first "
                            "root.json's hash, as annofs bundle publish prints it)")
        pin_text = doc["trust-bundle-root"]
        line = self.loc.key("trust-bundle-root")
        if not isinstance(pin_text, str):
            raise self.fail(line, "trust-bundle-root", f"must be a string, got "
                                                       f"{_show(pin_text)}")
        try:
            pin = parse_pin(pin_text, "trust-bundle-root")
        except UsageError as e:
            raise self.fail(line, "trust-bundle-root", str(e).split(": ", 1)[1]) from None
        on_stale = self._enum(doc, "on-stale", OnStale, OnStale.REFUSE)
        try:
            state = load_state(self.store, pin) if self.store is not None else None
        except UsageError as e:
            # Unreadable stored state: stale (refuse or warn), not a policy that fails.
            return BundleView(source, pin, on_stale, f"{e} (annofs bundle update)"), None
        if state is None:
            why = ("it has never been fetched (annofs bundle update)" if self.store
                   is not None else "no store to read it from")
            return BundleView(source, pin, on_stale, why), None
        for pk in state.content.keys:
            self._bind(bound, pk.name, pk.key, f"trust bundle {source}", line,
                       "trust-bundle")
            names = trusted.setdefault(pk.key, [])
            if pk.name not in names:
                names.append(pk.name)
        return BundleView(source, pin, on_stale, state.stale(), tuple(state.summary()),
                          state.expiry.timestamp()), state.content

    def _bundle_rule(self, index: int, j: int, table: dict[str, Any],
                     bound: dict[str, tuple[bytes, str]]) -> Rule:
        """A shared rule from the bundle, after the policy's own (which win)."""
        where = f"trust-bundle rules[{j}]"
        for key in table:
            if key not in _RULE_KEYS:
                raise self.fail(None, where, f"unknown key {key!r}")
        for key in ("path", "signers"):
            if key not in table:
                raise self.fail(None, where, f"missing {key!r}")
        try:
            return self._rule(index, table, bound)
        except UsageError as e:
            raise UsageError(one_line(f"{self.name}: {where}: {e}")) from None


    def _ssh_signers(self, doc: dict[str, Any], trusted: dict[bytes, list[str]],
                     bound: dict[str, tuple[bytes, str]]
                     ) -> tuple[dict[bytes, tuple[AllowedSigner, ...]], str | None]:
        key = "trusted-ssh-signers"
        if key not in doc:
            return {}, None
        line = self.loc.key(key)
        value = doc[key]
        if not isinstance(value, str) or not value:
            raise self.fail(line, key, f"must be an allowed_signers file name, got "
                                       f"{_show(value)}")
        path = self.path.parent / value
        # Its own errors are FILE:LINE: problem, naming the allowed_signers file's line.
        lines = load_allowed_signers(path)
        out: dict[bytes, list[AllowedSigner]] = {}
        for signer in lines:
            # A principal pattern (alice*) names no one key: only exact names bind.
            for p in signer.principals:
                if not any(c in p for c in "*?"):
                    self._bind(bound, p, signer.key.key, signer.where, line, key)
            names = trusted.setdefault(signer.key.key, [])
            if signer.name not in names:
                names.append(signer.name)
            out.setdefault(signer.key.key, []).append(signer)
        return {k: tuple(v) for k, v in out.items()}, str(path)

    def _syntax_error(self, e: tomllib.TOMLDecodeError) -> UsageError:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)$", msg)
        if m:
            return UsageError(f"{self.name}:{m.group(1)}: invalid TOML: "
                              f"{msg[:m.start()].strip()} (column {m.group(2)})")
        if msg.endswith("(at end of document)"):
            # An unterminated array or string: the last line is where the reader looks.
            return UsageError(f"{self.name}:{max(len(self.loc.lines), 1)}: invalid TOML: "
                              f"{msg.removesuffix('(at end of document)').strip()} "
                              f"(at the end of the file)")
        return UsageError(f"{self.name}: invalid TOML: {msg}")

    def _enum(self, doc: dict[str, Any], key: str, kind: type[enum.Enum],
              fallback: Any) -> Any:
        if key not in doc:
            return fallback
        value = doc[key]
        allowed = [m.value for m in kind]
        if not isinstance(value, str) or value not in allowed:
            choices = ", ".join(f'"{a}"' for a in allowed[:-1]) + f' or "{allowed[-1]}"'
            raise self.fail(self.loc.key(key), key, f"must be {choices}, got {_show(value)}")
        return kind(value)

    def _string_list(self, doc: Mapping[str, Any], key: str, line: int | None,
                     fieldname: str) -> list[str]:
        value = doc[key]
        if not isinstance(value, list):
            raise self.fail(line, fieldname, f"must be a list of strings, got {_show(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(line, f"{fieldname}[{i}]",
                                f"must be a string, got {_show(item)}")
        return value

    def _bind(self, bound: dict[str, tuple[bytes, str]], name: str, key: bytes,
              origin: str, line: int | None, fieldname: str) -> None:
        prev = bound.get(name)
        if prev is not None and prev[0] != key:
            raise self.fail(line, fieldname,
                            f"key name {name!r} is bound to two different public keys "
                            f"({prev[1]} and {origin})")
        bound.setdefault(name, (key, origin))

    def _trusted_list(self, doc: dict[str, Any], trusted: dict[bytes, list[str]],
                      bound: dict[str, tuple[bytes, str]]) -> None:
        key = "trusted-public-keys"
        if key not in doc:
            return
        line = self.loc.key(key)
        for i, text in enumerate(self._string_list(doc, key, line, key)):
            item_line = self.loc.value(line, text)
            fieldname = f"{key}[{i}]"
            pk = parse_public_key(text, f"{self.name}:{item_line}: {fieldname}")
            self._bind(bound, pk.name, pk.key, fieldname, item_line, fieldname)
            names = trusted.setdefault(pk.key, [])
            if pk.name not in names:
                names.append(pk.name)

    def _trusted_dir(self, doc: dict[str, Any], trusted: dict[bytes, list[str]],
                     bound: dict[str, tuple[bytes, str]]) -> int:
        key = "trusted-keys-dir"
        if key not in doc:
            return 0
        line = self.loc.key(key)
        value = doc[key]
        if not isinstance(value, str) or not value:
            raise self.fail(line, key, f"must be a directory name, got {_show(value)}")
        directory = self.path.parent / value
        if not directory.is_dir():
            raise self.fail(line, key, f"{directory}: no such directory")
        count = 0
        for file in sorted(directory.glob("*.public")):
            if not file.is_file():
                continue
            try:
                pk = load_public_key(file)
            except UsageError as e:
                raise self.fail(line, key, str(e)) from None
            self._bind(bound, pk.name, pk.key, str(file), line, key)
            names = trusted.setdefault(pk.key, [])
            if pk.name not in names:
                names.append(pk.name)
            count += 1
        return count

    def _revoked(self, doc: dict[str, Any], bound: dict[str, tuple[bytes, str]],
                 ssh_signers: Mapping[bytes, tuple[AllowedSigner, ...]]) -> set[bytes]:
        key = "revoked-keys"
        if key not in doc:
            return set()
        line = self.loc.key(key)
        revoked: set[bytes] = set()
        for i, text in enumerate(self._string_list(doc, key, line, key)):
            item_line = self.loc.value(line, text)
            fieldname = f"{key}[{i}]"
            if text.startswith("SHA256:"):
                # An SSH key by its fingerprint (as ssh-keygen -l prints it).
                found = [k for k, lines in ssh_signers.items()
                         if any(ln.key.fingerprint == text for ln in lines)]
                if not found:
                    raise self.fail(item_line, fieldname,
                                    f"{text!r} is the fingerprint of no key in "
                                    f"trusted-ssh-signers")
                revoked.update(found)
                continue
            if ":" in text:
                revoked.add(parse_public_key(text, f"{self.name}:{item_line}: {fieldname}").key)
                continue
            check_key_name(text, f"{self.name}:{item_line}: {fieldname}")
            if text not in bound:
                # A misspelt revocation would leave the key trusted: refuse it.
                raise self.fail(item_line, fieldname,
                                f"{text!r} names no trusted key (give NAME:BASE64 to revoke "
                                f"a key that is not listed)")
            revoked.add(bound[text][0])
        return revoked

    def _rules(self, doc: dict[str, Any], bound: dict[str, tuple[bytes, str]]) -> list[Rule]:
        if "rules" not in doc:
            return []
        raw = doc["rules"]
        if not isinstance(raw, list):
            raise self.fail(self.loc.key("rules"), "rules",
                            f"must be [[rules]] tables, got {_show(raw)}")
        rules = []
        for i, table in enumerate(raw):
            name = f"rules[{i}]"
            if not isinstance(table, dict):
                raise self.fail(self.loc.rule(i), name, f"must be a table, got {_show(table)}")
            for key in table:
                if key not in _RULE_KEYS:
                    raise self.fail(self.loc.rule(i, key), f"{name}.{key}",
                                    f"unknown key (known: {', '.join(_RULE_KEYS)})")
            for key in ("path", "signers"):
                if key not in table:
                    raise self.fail(self.loc.rule(i), name, f"missing {key!r}")
            rules.append(self._rule(i, table, bound))
        return rules

    def _rule(self, i: int, table: dict[str, Any],
              bound: dict[str, tuple[bytes, str]]) -> Rule:
        name = f"rules[{i}]"
        path = table["path"]
        if not isinstance(path, str):
            raise self.fail(self.loc.rule(i, "path"), f"{name}.path",
                            f"must be a path glob like \"/src/**\", got {_show(path)}")
        try:
            glob = PathGlob(path)
        except UsageError as e:
            raise self.fail(self.loc.rule(i, "path"), f"{name}.path", str(e)) from None
        signers = table["signers"]
        if type(signers) is not int or signers < 0:
            raise self.fail(self.loc.rule(i, "signers"), f"{name}.signers",
                            f"must be a whole number >= 0, got {_show(signers)}")
        claims = None
        if "claims" in table:
            line = self.loc.rule(i, "claims")
            items = self._string_list(table, "claims", line, f"{name}.claims")
            if not items:
                raise self.fail(line, f"{name}.claims",
                                "empty list (no statement could count; omit 'claims' to "
                                "accept any claim)")
            for j, c in enumerate(items):
                try:
                    check_word(c, "claim")
                except UsageError as e:
                    raise self.fail(line, f"{name}.claims[{j}]", str(e)) from None
                if c == LABEL_CLAIM:
                    raise self.fail(line, f"{name}.claims[{j}]",
                                    "'label' is reserved: a label never approves a file")
            claims = frozenset(items)
        key_names = keys = None
        if "keys" in table:
            line = self.loc.rule(i, "keys")
            items = self._string_list(table, "keys", line, f"{name}.keys")
            if not items:
                raise self.fail(line, f"{name}.keys",
                                "empty list (no key could count; omit 'keys' to accept "
                                "every trusted key)")
            resolved = set()
            for j, k in enumerate(items):
                if k not in bound:
                    raise self.fail(self.loc.value(line, k), f"{name}.keys[{j}]",
                                    f"{k!r} is not a trusted key (not in trusted-public-keys "
                                    f"nor trusted-keys-dir)")
                resolved.add(bound[k][0])
            if len(resolved) < signers:
                raise self.fail(self.loc.rule(i, "signers"), f"{name}.signers",
                                f"needs {signers} distinct keys but 'keys' names only "
                                f"{len(resolved)} distinct public key"
                                f"{'s' if len(resolved) != 1 else ''}")
            key_names, keys = tuple(items), frozenset(resolved)
        flags = {}
        for flag in ("user-presence", "user-verification"):
            value = table.get(flag, False)
            if type(value) is not bool:
                raise self.fail(self.loc.rule(i, flag), f"{name}.{flag}",
                                f"must be true or false, got {_show(value)}")
            flags[flag] = value
        return Rule(i, glob, signers, claims, key_names, keys, self.loc.rule(i),
                    flags["user-presence"], flags["user-verification"])


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, list):
        text = "a list"
    elif isinstance(value, dict):
        text = "a table"
    else:
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def parse_policy(text: str, path: Path, store: Path | None = None) -> Policy:
    """Parse policy text; `path` names it in errors and anchors trusted-keys-dir;
    `store` holds the trust bundle's state (`<store>/bundle`), if the policy names one."""
    return _Parser(path, text, store).parse()


def load_policy(path: Path, store: Path | None = None) -> Policy:
    """Read and parse a policy file; UsageError naming the file and the problem."""
    data = read_user_file(path, "policy file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text") from None
    return parse_policy(text, path, store)

