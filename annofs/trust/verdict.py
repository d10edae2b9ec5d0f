"""The one place that decides whether a file may be read: `decide`, and its cache.

`decide(path, digest, policy, statements, now)` is a pure function of its inputs (and
`decide_covered` its core, once the rule is known and the statements not covering the
digest are left out). A statement counts towards a rule when all of these hold:

- its subjects include this digest;
- its signature verifies under the public key it names;
- that key is trusted by the policy and not revoked (an SSH-signed statement: the key
  is in trusted-ssh-signers, on a line allowing namespace `annofs`, valid at the
  statement's time and now; policy.py says why both);
- it is an approval (not a label), its claim is one of the rule's `claims` (if given),
  and its key is one of the rule's `keys` (if given);
- if the rule asks for `user-presence` / `user-verification`: a FIDO (sk) SSH signature
  whose token asserted it.

The rule is met when the counting statements come from at least `signers` distinct
public keys (names do not matter: one key signing twice, or listed under two names, is
one signer). A `malicious` label from a trusted, unrevoked key refuses the file whatever
the rule says. Mode `enforce` refuses what is not met, `warn` allows it but flags it,
`off` allows everything.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from annofs.trust.policy import Default, Mode, OnStale, Policy, Rule, statement_signer
from annofs.trust.statement import MALICIOUS, SignedStatement


@dataclass(frozen=True)
class Verdict:
    """The decision for one content at one path, and what it rests on."""

    allowed: bool  # what open() does
    satisfied: bool  # the rule is met and no trusted key labelled it malicious
    mode: Mode
    rule: str  # "rules[1] /src/**", or "default allow" / "default require"
    rule_index: int | None  # None: no rule matched, the default decided
    needed: int  # distinct trusted signers the rule asks for
    signers: tuple[str, ...]  # the trusted keys that count (one name per key)
    claims: tuple[str, ...]  # claims made by trusted keys over this content
    labels: tuple[str, ...]  # labels from trusted keys, e.g. "malicious by alice-1"
    malicious: tuple[str, ...]  # trusted keys that labelled the content malicious
    missing: str  # what is lacking, "" when satisfied
    ignored: tuple[str, ...]  # statements that did not count, and why
    reason: str  # one line for logs, xattrs and `annofs verify`

    @property
    def flagged(self) -> bool:
        """Allowed although the rule is not met (mode warn)."""
        return self.allowed and not self.satisfied

    @property
    def status(self) -> str:
        """`allowed`, `refused`, `warn` (allowed, would be refused) or `off`."""
        if self.mode is Mode.OFF:
            return "off"
        if not self.allowed:
            return "refused"
        return "warn" if self.flagged else "allowed"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def decide(path: str, digest: bytes, policy: Policy,
           statements: Iterable[SignedStatement], now: float | None = None) -> Verdict:
    """The verdict for the content `digest` at store path `path` under `policy`, at time
    `now` (default: now; SSH keys' valid-after/valid-before are checked against it)."""
    return decide_covered(policy, policy.rule_for(path),
                          [ss for ss in statements if digest in ss.digests],
                          policy.labels.get(digest, ()), now)


BUNDLE_SIGNER = "the trust bundle"


def decide_covered(policy: Policy, rule: Rule | None,
                   statements: Iterable[SignedStatement],
                   bundle_labels: tuple[str, ...] = (), now: float | None = None) -> Verdict:
    """The verdict under `rule` (None: the policy's default) for content that exactly
    `statements` cover (the caller checked that each lists the content's digest).

    Nothing else goes in: for one policy the verdict is a function of the rule, the
    statement ids (content addresses), `bundle_labels` (the labels the policy's trust
    bundle puts on this content) and `now` only through `policy.cache_generation`, so a
    caller may reuse it for every content that the same statements and labels cover under
    the same rule and cache generation.
    """
    if now is None:
        now = time.time()
    if rule is not None:
        needed, rule_text, rule_index = rule.signers, rule.label, rule.index
    else:
        needed = 1 if policy.default is Default.REQUIRE else 0
        rule_text, rule_index = f"default {policy.default.value}", None

    counted: dict[bytes, str] = {}  # public key -> display name, in first-seen order
    claims: list[str] = []
    labels: list[str] = []
    malicious: list[str] = []
    ignored: list[str] = []

    def note(text: str) -> None:
        if text not in ignored:
            ignored.append(text)

    for ss in statements:
        st = ss.statement
        # A name is shown only for a key the policy trusts: the rest claim theirs.
        shown = statement_signer(policy, ss)
        if not ss.signature_valid:
            note(shown)
            continue
        if not policy.trusts_key_of(st):
            note(shown)  # "untrusted key ... (claims ...)"
            continue
        if policy.is_revoked_for(st.public_key, st.time):
            note(f"{shown}: key revoked")
            continue
        if st.ssh_key is not None:
            why = policy.ssh_refusal(st, now)
            if why is not None:
                note(f"{shown}: {why}")
                continue
        if st.label is not None:
            labels.append(f"{st.label} by {shown}")
            if st.label == MALICIOUS and shown not in malicious:
                malicious.append(shown)
            continue
        if st.claim not in claims:
            claims.append(st.claim)
        if rule is not None and rule.claims is not None and st.claim not in rule.claims:
            note(f"{shown}: claim {st.claim!r} not accepted here")
            continue
        if rule is not None and rule.keys is not None and st.public_key not in rule.keys:
            note(f"{shown}: not one of this rule's keys")
            continue
        token = rule.token_refusal(ss) if rule is not None else None
        if token is not None:
            note(f"{shown}: {token}")
            continue
        counted.setdefault(st.public_key, shown)

    for label in bundle_labels:
        labels.append(f"{label} by {BUNDLE_SIGNER}")
        if label == MALICIOUS and BUNDLE_SIGNER not in malicious:
            malicious.append(BUNDLE_SIGNER)

    # Sorted: statements made in the same second have no meaningful order.
    signers = tuple(sorted(counted.values()))
    malicious.sort()
    ignored.sort()
    met = len(counted) >= needed
    missing = ""
    if malicious:
        missing = f"labelled malicious by {', '.join(malicious)}"
    elif not met:
        missing = (f"needs {_plural(needed, 'distinct trusted signer')}, has {len(counted)}"
                   + (f" ({', '.join(signers)})" if signers else ""))
        if rule is not None and rule.claims is not None:
            missing += f"; accepted claims: {', '.join(sorted(rule.claims))}"
    satisfied = met and not malicious
    # A stale trust bundle (expired, no update since: a freeze, or a lost repository):
    # rules that need signers cannot rely on its keys and revocations being current.
    stale = policy.bundle.stale_text() if policy.bundle is not None and needed else None
    allowed = satisfied if policy.mode is Mode.ENFORCE else True
    if stale is not None and satisfied:
        satisfied = False
        if policy.bundle is not None and policy.bundle.on_stale is OnStale.REFUSE:
            missing = f"{stale} (on-stale refuse)"
            allowed = policy.mode is not Mode.ENFORCE
        else:
            missing = f"{stale} (on-stale warn: allowed)"

    if satisfied:
        if needed == 0 and not signers:
            body = ("no rule matches; unsigned files allowed" if rule is None
                    else "no signature needed")
        else:
            body = f"signed by {', '.join(signers)} ({len(counted)} of {needed} needed)"
    elif stale is not None and met and not malicious:
        body = (f"{missing}; signed by {', '.join(signers)} ({len(counted)} of "
                f"{needed} needed)")
    else:
        body = missing
        if stale is not None:
            body += f"; {stale}"
    if ignored and not satisfied:
        body += "; not counted: " + "; ".join(ignored)
    reason = f"{rule_text}: {body}"
    if policy.mode is Mode.WARN and not satisfied:
        reason = f"would be refused (mode warn): {reason}"
    elif policy.mode is Mode.OFF:
        reason = f"policy mode off ({reason})"

    return Verdict(allowed, satisfied, policy.mode, rule_text, rule_index, needed, signers,
                   tuple(sorted(claims)), tuple(sorted(labels)), tuple(malicious), missing,
                   tuple(ignored), reason)


class VerdictCache:
    """Verdicts by (content, rule index, policy generation, statement generation).

    `content` is what the verdict was decided from: the gate uses the content digest
    (identical files anywhere are judged once), and the sorted statement ids covering
    it. The rule index stands in for the path: the same content is decided the same way
    at every path the same rule covers, and differently where another rule applies.
    When either generation changes every entry is stale, so the cache empties itself;
    otherwise it keeps the `maxsize` most recently used verdicts.
    """

    def __init__(self, maxsize: int = 65536) -> None:
        self._max = maxsize
        # The generations the entries were decided under; -1: none yet (real ones are >= 0).
        self._policy_gen: Hashable = -1
        self._statement_gen = -1
        self._items: OrderedDict[tuple[Hashable, int], Verdict] = OrderedDict()
        # Verdicts may be asked for from worker threads as well as the event loop's.
        self._lock = threading.Lock()

    def get(self, content: Hashable, rule_index: int | None, policy_generation: Hashable,
            statement_generation: int) -> Verdict | None:
        """A cached verdict, or None."""
        with self._lock:
            if (policy_generation != self._policy_gen
                    or statement_generation != self._statement_gen):
                self._items.clear()
                self._policy_gen, self._statement_gen = policy_generation, statement_generation
                return None
            key = (content, -1 if rule_index is None else rule_index)
            v = self._items.get(key)
            if v is not None:
                self._items.move_to_end(key)
            return v

    def put(self, content: Hashable, rule_index: int | None, policy_generation: Hashable,
            statement_generation: int, verdict: Verdict) -> None:
        """Remember a verdict."""
        with self._lock:
            if (policy_generation != self._policy_gen
                    or statement_generation != self._statement_gen):
                self._items.clear()
                self._policy_gen, self._statement_gen = policy_generation, statement_generation
            self._items[(content, -1 if rule_index is None else rule_index)] = verdict
            if len(self._items) > self._max:
                self._items.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (e.g. after a policy reload, to free memory at once)."""
        with self._lock:
            self._items.clear()
            self._policy_gen = self._statement_gen = -1

    def __len__(self) -> int:
        return len(self._items)
