"""What `annofs gc` would free, worked out from what fsck has read (nothing is changed).

The same rules as gc (maintenance.gc): kept are the versions a name or hard link in the
tree refers to (the tree reached from the root; staging trees left by an interrupted
import are not part of it, unless an import is running), versions whose digest a
statement signs, the empty root version, and the ancestors of all of these. Every other
version goes, with the fragment occurrences its edit added; a fragment left with none,
or that no version ever took, is freed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from annofs.content.versions import own_counts
from annofs.maintenance.gc import kept_versions
from annofs.store.records import Attrs, Link, Version


@dataclass
class Reclaimable:
    """Versions and fragments nothing keeps, and the stored bytes they take."""

    versions: int = 0
    fragments: int = 0
    bytes: int = 0
    staging_trees: int = 0  # left by interrupted imports (gc drops them)
    pack_bytes: int = 0  # pack files gc compacts or deletes (content.fragments)

    @property
    def any(self) -> bool:
        return bool(self.versions or self.fragments or self.staging_trees or self.pack_bytes)


def reachable_versions(roots: Iterable[int], entries: Mapping[int, Sequence[tuple[bytes, Attrs]]],
                       links: Mapping[int, Link]) -> set[int]:
    """Versions that regular files (or hard links) in the trees under `roots` refer to."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        dir_id = stack.pop()
        if dir_id in seen:
            continue
        seen.add(dir_id)
        for _name, a in entries.get(dir_id, ()):
            if a.link:
                link = links.get(a.link)
                if link is not None and link.attrs.is_reg:
                    found.add(int(link.attrs.target))
            elif a.is_dir:
                stack.append(int(a.target))
            elif a.is_reg:
                found.add(int(a.target))
    return found


def doomed_versions(versions: Mapping[int, Version], live: set[int],
                    signed: set[bytes]) -> list[Version]:
    """The versions gc (without --prune-history) would delete: gc's own formula."""
    keep = kept_versions(versions, live, signed, prune_history=False)
    return [v for vid, v in versions.items() if vid not in keep]


def freed_fragments(doomed: Iterable[Version], occurrences: Counter[bytes]) -> set[bytes]:
    """Fragments whose every occurrence belongs to a doomed version."""
    gone: Counter[bytes] = Counter()
    for v in doomed:
        gone.update(own_counts(v))
    return {h for h, n in gone.items() if occurrences[h] <= n}
