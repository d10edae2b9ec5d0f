"""What the filesystem (and `annofs verify`) asks: the verdict for a file's version.

`TrustGate.verdict(path, version)` looks up the rule for the path, the statements
covering the version's content, decides (`verdict.decide`) and caches the answer by
(version, rule, policy generation, statement generation). The caller keeps serving the
version it asked about: what was verified is what is read.
"""

from __future__ import annotations

from collections.abc import Sequence

from annofs.store.records import Version
from annofs.trust.annotations import AnnotationStore
from annofs.trust.policy import Mode, Policy
from annofs.trust.signing import path_text
from annofs.trust.verdict import Verdict, VerdictCache, decide
from annofs.volume import Volume


class TrustGate:
    """A policy over a volume's statements, with a verdict cache."""

    def __init__(self, vol: Volume, policy: Policy,
                 annotations: AnnotationStore | None = None,
                 cache: VerdictCache | None = None) -> None:
        self._vol = vol
        self.policy = policy
        self.annotations = annotations or AnnotationStore(vol.store)
        self.cache = cache or VerdictCache()

    @property
    def volume(self) -> Volume:
        """The volume whose statements and versions this gate reads."""
        return self._vol

    @property
    def enforcing(self) -> bool:
        """False when the policy's mode is off: open() need not ask at all."""
        return self.policy.mode is not Mode.OFF

    def set_policy(self, policy: Policy) -> None:
        """Switch to a reloaded policy (SIGHUP, `annofs policy reload`)."""
        self.policy = policy
        self.cache.clear()

    def verdict(self, path: Sequence[bytes], version: Version) -> Verdict:
        """The verdict for `version` read at store path `path` (a list of names).

        May compute and record the version's digest if it was deferred (CPU work over
        the whole content: call it from a worker thread for large files).
        """
        policy = self.policy
        text = path_text(path)
        rule = policy.rule_for(text)
        rule_index = rule.index if rule is not None else None
        store = self._vol.store
        cacheable = version.id >= 0  # an unstored (in-memory) version has no stable id
        if cacheable:
            with store.read() as txn:
                generation = self.annotations.generation(txn)
            hit = self.cache.get(version.id, rule_index, policy.generation, generation)
            if hit is not None:
                return hit
        if version.digest is None:
            version = self._vol.versions.ensure_digest(version)
        assert version.digest is not None
        with store.read() as txn:
            generation = self.annotations.generation(txn)
            statements = self.annotations.for_digest(txn, version.digest)
        result = decide(text, version.digest, policy, statements)
        if cacheable:
            self.cache.put(version.id, rule_index, policy.generation, generation, result)
        return result
