"""The explanation of a verdict (SPEC §5): why a file is refused, and how it differs from
the signed original it was made from.

`explain(...)` builds an `Explanation`; `to_text()` is what `annofs why` and the
`user.annofs.why` attribute show, `to_json()` what tools read (`annofs why --json`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from annofs.explain.diff import (
    BINARY_DIFF_LIMIT,
    TEXT_DIFF_LINES,
    ByteRange,
    binary_diff,
    changed_ranges,
    is_text,
    range_summary,
    text_diff,
)
from annofs.explain.original import EDIT_GRAPH, Candidate, find_original
from annofs.printable import one_line
from annofs.trust.annotations import AnnotationStore
from annofs.trust.policy import Default, Policy
from annofs.trust.signing import path_text
from annofs.trust.statement import format_digest, format_subject_digest
from annofs.trust.symlink import Content, Symlink, position_verdict
from annofs.trust.verdict import BUNDLE_SIGNER, Verdict, decide
from annofs.volume import Volume

# Contents larger than this are not read to be diffed (the verdict and original still are).
READ_LIMIT = 16 << 20
MAX_RANGES_JSON = 100


def _when(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def would_satisfy(policy: Policy, path: str) -> str:
    """What statements would make the rule at `path` pass: keys, claims, how many."""
    rule = policy.rule_for(path)
    if rule is None:
        if policy.default is not Default.REQUIRE:
            return "nothing: no rule matches and unsigned files are allowed"
        needed, claims, keys = 1, None, None
        what = f"default {policy.default.value}"
    else:
        needed, claims, keys = rule.signers, rule.claims, rule.key_names
        what = rule.label
    if keys is None:
        keys = tuple(sorted(names[0] for k, names in policy.trusted.items()
                            if names and k not in policy.revoked))
        key_text = "any trusted key (" + (", ".join(keys) or "none trusted") + ")"
    else:
        key_text = "keys " + ", ".join(keys)
    claim_text = "claim " + " or ".join(sorted(claims)) if claims is not None else "any claim"
    return (f"{what}: statements over this content by {_plural(needed, 'distinct signer')} "
            f"from {key_text}, {claim_text}")


def label_advice(verdict: Verdict) -> tuple[str, str]:
    """(why, what would lift it) for content a trusted key labelled malicious; ("", "")
    otherwise. The label refuses the content whatever its signatures, so no signature
    (and no signed original) is what it lacks: only the labeller's key losing trust is."""
    if stale_only(verdict):
        return (f"{verdict.missing}: the content is signed, but the trusted keys and "
                f"revocations cannot be known to be current",
                "a successful annofs bundle update (its publishers renew the timestamp with "
                "annofs bundle publish), or on-stale = \"warn\" in the policy; more "
                "signatures would not")
    if not verdict.malicious:
        return "", ""
    by = ", ".join(verdict.malicious)
    keys = "key" if len(verdict.malicious) == 1 else "keys"
    why = (f"labelled malicious by {by} (trusted): the label refuses this content whatever "
           f"its signatures")
    if verdict.signers and len(verdict.signers) >= verdict.needed:
        why += (f"; without it, {', '.join(verdict.signers)} would meet the rule "
                f"({len(verdict.signers)} of {verdict.needed} needed)")
    lift = (f"a revocation of {by}'s {keys} (revoked-keys in the policy), or a policy that "
            f"no longer trusts {'it' if len(verdict.malicious) == 1 else 'them'}; more "
            f"signatures would not")
    if BUNDLE_SIGNER in verdict.malicious:
        # The bundle's own label: only its publishers can take it back.
        lift = ("a new version of the trust bundle without the label (its targets key "
                "holders), or a policy without the bundle; more signatures would not")
    return why, lift


def stale_only(verdict: Verdict) -> bool:
    """Refused (or flagged) only because the policy's trust bundle is stale: the
    signatures meet the rule, so there is no signed original to look for."""
    return (not verdict.satisfied and not verdict.malicious
            and verdict.missing.startswith("trust bundle ")
            and len(verdict.signers) >= verdict.needed)


def label_only(verdict: Verdict) -> bool:
    """Refused by a malicious label alone: the signatures would otherwise meet the rule,
    so there is no signed original to look for (this content is the signed one)."""
    return bool(verdict.malicious) and len(verdict.signers) >= verdict.needed


@dataclass
class Explanation:
    """Everything `annofs why` says about one file."""

    path: str
    version: int
    digest: bytes
    size: int
    verdict: Verdict
    candidates: list[Candidate] = field(default_factory=list)
    searched: bool = False  # whether an original was looked for (not for satisfied files)
    would_satisfy: str = ""
    diff: str = ""
    diff_kind: str = ""  # text, binary, identical, too large, content not stored
    ranges: list[ByteRange] = field(default_factory=list)
    target: bytes | None = None  # a symlink's target: its content (None for a file)

    @property
    def digest_text(self) -> str:
        """The content digest with its kind's algorithm name."""
        return format_subject_digest(self.digest, self.target is not None)

    @property
    def content_text(self) -> str:
        """What the content is, for a line of text."""
        if self.target is not None:
            shown = self.target.decode("utf-8", "backslashreplace")
            return f"symlink to {shown!r} ({self.digest_text})"
        return f"{self.digest_text} ({self.size} bytes, version {self.version})"

    @property
    def original(self) -> Candidate | None:
        """The signed original, if one was found."""
        return self.candidates[0] if self.candidates else None

    # -- text --------------------------------------------------------------------------------

    def _candidate_lines(self, c: Candidate, indent: str) -> list[str]:
        if c.withheld:
            return _withheld_lines(c, indent)
        size = f"{c.size} bytes, version {c.version.id}" if c.version is not None \
            else "a symlink" if c.symlink else "content not in this store"
        out = [f"{indent}{format_subject_digest(c.digest, c.symlink)} ({size})"]
        for s in c.signatures:
            kind = f"label {s.label}" if s.label is not None else f"claim {s.claim}"
            names = one_line(", ".join(s.names)) or "?"
            out.append(f"{indent}  signed by {s.signer} "
                       f"({'trusted' if s.trusted else 'not trusted'}), {kind}, "
                       f"{_when(s.time)}, as {names}")
        pct = f" ({100 * c.shared_bytes // self.size}% of this file)" if self.size else ""
        out.append(f"{indent}  shares {c.shared_bytes} bytes in "
                   f"{_plural(c.shared_fragments, 'fragment')}{pct}")
        if c.trusted_signers:
            out.append(f"{indent}  counts here for: {', '.join(c.trusted_signers)}"
                       + ("" if c.satisfies else " (not enough for the rule)"))
        return out

    def to_text(self) -> str:
        """The human-readable explanation."""
        v = self.verdict
        lines = [f"{one_line(self.path)}: {v.status}",
                 f"  rule: {v.rule} (needs {_plural(v.needed, 'trusted signer')})",
                 f"  verdict: {v.reason}",
                 f"  content: {self.content_text}"]
        if v.claims:
            lines.append(f"  claims by trusted keys: {', '.join(v.claims)}")
        label_why, label_lift = label_advice(v)
        if label_why:
            lines.append(f"why: {label_why}")
            lines.append(f"would lift it: {label_lift}")
        if not self.searched:
            return "\n".join(lines) + "\n"
        c = self.original
        if c is None:
            lines.append("no signed original: no ancestor along the edit graph is signed, no "
                         "signed content shares fragments with it, and no signed tree "
                         "statement names this path")
            lines.append(f"would satisfy {self.would_satisfy}")
            return "\n".join(lines) + "\n"
        how = c.how
        if how == EDIT_GRAPH and c.distance is not None:
            how += f", {_plural(c.distance, 'edit')} back"
        lines.append(f"signed original (found by {how}):")
        lines.extend(self._candidate_lines(c, "  "))
        if len(self.candidates) > 1:
            lines.append("other candidates (by shared bytes):")
            for o in self.candidates[1:]:
                lines.append(f"  found by {o.how}:")
                lines.extend(self._candidate_lines(o, "    "))
        lines.append(f"would satisfy {self.would_satisfy}")
        lines.append(f"difference (original -> this file): {self.diff_kind}")
        text = "\n".join(lines) + "\n"
        return text + self.diff

    # -- JSON --------------------------------------------------------------------------------

    def _candidate_json(self, c: Candidate) -> dict[str, Any]:
        if c.withheld:
            return _withheld_json(c)
        return {
            "digest": format_subject_digest(c.digest, c.symlink),
            "kind": "symlink" if c.symlink else "file",
            "found_by": c.how,
            "edits_back": c.distance,
            "version": c.version.id if c.version is not None else None,
            "size": c.size,
            "shared_bytes": c.shared_bytes,
            "shared_fragments": c.shared_fragments,
            "trusted_signers": list(c.trusted_signers),
            "satisfies_rule": c.satisfies,
            "statements": [{
                "id": s.statement_id.hex(), "signer": s.signer, "trusted": s.trusted,
                "claim": s.claim, "label": s.label, "time": s.time, "names": list(s.names),
            } for s in c.signatures],
        }

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict, for tools."""
        v = self.verdict
        out: dict[str, Any] = {
            "path": self.path,
            "status": v.status,
            "allowed": v.allowed,
            "rule": v.rule,
            "needed": v.needed,
            "signers": list(v.signers),
            "claims": list(v.claims),
            "missing": v.missing,
            "not_counted": list(v.ignored),
            "reason": v.reason,
            "digest": self.digest_text,
            "size": self.size,
            "version": self.version,
            "kind": "symlink" if self.target is not None else "file",
            "target": (self.target.decode("utf-8", "backslashreplace")
                       if self.target is not None else None),
        }
        label_why, label_lift = label_advice(v)
        if label_why and stale_only(v):
            out["stale"] = {"why": label_why, "would_lift": label_lift}
        elif label_why:
            out["label"] = {"malicious_by": list(v.malicious), "why": label_why,
                            "would_lift": label_lift}
        if not self.searched:
            return out
        out["original"] = self._candidate_json(self.original) if self.original else None
        out["candidates"] = [self._candidate_json(c) for c in self.candidates[1:]]
        out["would_satisfy"] = self.would_satisfy
        out["diff_kind"] = self.diff_kind
        out["diff"] = self.diff
        if self.diff_kind == "binary":
            changed, inserted, deleted = range_summary(self.ranges)
            out["ranges"] = [[r.a_start, r.a_end, r.b_start, r.b_end]
                             for r in self.ranges[:MAX_RANGES_JSON]]
            out["summary"] = {"ranges": len(self.ranges), "changed": changed,
                              "inserted": inserted, "deleted": deleted}
        return out


def _withheld_lines(c: Candidate, indent: str) -> list[str]:
    """A candidate the caller may not read: that it exists and who signed it, no more."""
    out = [f"{indent}(content, name and digest withheld: you may not read it)"]
    for s in c.signatures:
        kind = f"label {s.label}" if s.label is not None else f"claim {s.claim}"
        out.append(f"{indent}  signed by {s.signer} "
                   f"({'trusted' if s.trusted else 'not trusted'}), {kind}")
    if c.trusted_signers:
        out.append(f"{indent}  counts here for: {', '.join(c.trusted_signers)}"
                   + ("" if c.satisfies else " (not enough for the rule)"))
    return out


def _withheld_json(c: Candidate) -> dict[str, Any]:
    return {
        "withheld": True,
        "found_by": c.how,
        "edits_back": c.distance,
        "trusted_signers": list(c.trusted_signers),
        "satisfies_rule": c.satisfies,
        "statements": [{"signer": s.signer, "trusted": s.trusted, "claim": s.claim,
                        "label": s.label} for s in c.signatures],
    }


def explain(vol: Volume, annotations: AnnotationStore, policy: Policy,
            path: Sequence[bytes], version: Content, verdict: Verdict | None = None, *,
            diff_lines: int = TEXT_DIFF_LINES) -> Explanation:
    """The explanation for `version` read at store path `path` under `policy` (a
    symlink's content: `explain_symlink`).

    CPU work (digest, diff) proportional to the file: call it off an event loop.
    """
    if isinstance(version, Symlink):
        return explain_symlink(vol, annotations, policy, path, version, verdict)
    version = vol.versions.ensure_digest(version)
    assert version.digest is not None
    text_path = path_text(path)
    with vol.store.read() as txn:
        if verdict is None:
            verdict = decide(text_path, version.digest, policy,
                             annotations.for_digest(txn, version.digest))
        e = Explanation(text_path, version.id, version.digest, version.size, verdict)
        if verdict.satisfied or label_only(verdict) or stale_only(verdict):
            return e
        e.searched = True
        e.would_satisfy = would_satisfy(policy, text_path)
        e.candidates = find_original(vol, annotations, version, path, policy, txn)
        c = e.original
        if c is None:
            return e
        if c.version is None:
            e.diff_kind = "content not stored"
            return e
        if c.version.size > READ_LIMIT or version.size > READ_LIMIT:
            e.diff_kind = f"too large (over {READ_LIMIT} bytes)"
            return e
        a = vol.versions.read(txn, c.version, 0, c.version.size)
        b = vol.versions.read(txn, version, 0, version.size)
    names = [n for s in c.signatures for n in s.names]
    # Names go into the diff's header lines: escaped, so none can add a line.
    a_name = one_line(f"original/{names[0]}") if names else f"original@{c.version.id}"
    b_name = one_line(text_path.lstrip("/"))
    if a == b:
        e.diff_kind = "identical"
    elif is_text(a) and is_text(b):
        e.diff_kind = "text"
        e.diff = text_diff(a, b, a_name, b_name, max_lines=diff_lines)
    elif len(a) > BINARY_DIFF_LIMIT or len(b) > BINARY_DIFF_LIMIT:
        e.diff_kind = "binary, too large for byte ranges"
        e.diff = binary_diff(a, b, a_name, b_name)
    else:
        e.diff_kind = "binary"
        e.ranges = changed_ranges(a, b)
        e.diff = binary_diff(a, b, a_name, b_name, ranges=e.ranges)
    return e


def explain_symlink(vol: Volume, annotations: AnnotationStore, policy: Policy,
                    path: Sequence[bytes], link: Symlink,
                    verdict: Verdict | None = None) -> Explanation:
    """The explanation for a symlink's content (its target) at `path`: the verdict and,
    if refused, what a signed tree had at this path (found by the signed tree path:
    a symlink has no edit graph and no fragments). No diff: what was signed here was
    either another target (known only by its digest) or a file, said in `diff_kind`."""
    text_path = path_text(path)
    with vol.store.read() as txn:
        if verdict is None:
            verdict = position_verdict(policy, path, link.target, decide(
                text_path, link.digest, policy, annotations.for_digest(txn, link.digest)))
        e = Explanation(text_path, 0, link.digest, link.size, verdict, target=link.target)
        if verdict.satisfied:
            return e
        e.searched = True
        e.would_satisfy = would_satisfy(policy, text_path)
        e.candidates = find_original(vol, annotations, link, path, policy, txn)
    c = e.original
    if c is not None:
        e.diff_kind = ("a symlink to another target was signed here" if c.symlink
                       else "a signed regular file was here; now a symlink")
    return e


XATTR_LIMIT = 64 << 10  # the kernel's XATTR_SIZE_MAX: a larger value cannot be read


def cap_text(text: str, limit: int = XATTR_LIMIT) -> bytes:
    """UTF-8 of `text`, cut to at most `limit` bytes with a note saying so."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data
    note = (f"\n... explanation cut at {limit} bytes of {len(data)}; "
            f"run annofs why for all of it\n").encode()
    return data[:limit - len(note)].decode("utf-8", "ignore").encode() + note


def summary_line(e: Explanation) -> str:
    """One line for the daemon log and the events log at a refusal (no diff body)."""
    return one_line(_summary(e))


def _summary(e: Explanation) -> str:
    v = e.verdict
    if e.target is not None:
        shown = e.target.decode("utf-8", "backslashreplace")
        head = f"{v.status} {e.path} (symlink to {shown!r}): {v.reason} [{e.digest_text[:34]}]"
    else:
        head = f"{v.status} {e.path}: {v.reason} [{format_digest(e.digest)[:23]}]"
    if not e.searched:
        _, lift = label_advice(v)
        return f"{head}; would lift it: {lift}" if lift else head
    c = e.original
    if c is None:
        return f"{head}; no signed original; would satisfy {e.would_satisfy}"
    who = ", ".join(sorted({s.signer for s in c.signatures})) or "?"
    names = ", ".join(sorted({n for s in c.signatures for n in s.names})) or "?"
    out = (f"{head}; original {format_digest(c.digest)[:23]} (found by {c.how}, signed by "
           f"{who} as {names}; shares {c.shared_bytes} bytes)")
    if e.diff_kind == "text":
        minus = sum(1 for ln in e.diff.splitlines()
                    if ln.startswith("-") and not ln.startswith("---"))
        plus = sum(1 for ln in e.diff.splitlines()
                   if ln.startswith("+") and not ln.startswith("+++"))
        out += f"; text diff -{minus} +{plus} lines"
    elif e.diff_kind == "binary":
        changed, inserted, deleted = range_summary(e.ranges)
        out += (f"; {len(e.ranges)} changed byte range(s): {changed} changed, "
                f"{inserted} inserted, {deleted} deleted")
    elif e.diff_kind:
        out += f"; {e.diff_kind}"
    return out
