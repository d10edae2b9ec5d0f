"""Walking the edit graph."""

from __future__ import annotations

import lmdb

from annofs.content.versions import EMPTY_VERSION, VersionStore
from annofs.errors import CorruptionError
from annofs.store.records import Version


def ancestry(txn: lmdb.Transaction, versions: VersionStore, vid: int) -> list[Version]:
    """The version and its ancestors, newest first, ending with the empty root version."""
    chain = [versions.get(txn, vid)]
    seen = {vid}
    while chain[-1].id != EMPTY_VERSION:
        parent = chain[-1].parent
        if parent in seen:
            raise CorruptionError(f"version {chain[-1].id}: the edit graph has a cycle")
        seen.add(parent)
        chain.append(versions.get(txn, parent))
    return chain
