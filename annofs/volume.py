"""A store opened for use: the content and namespace layers over one LMDB environment.

Everything the mount does to files (write a version, read, look up) is a method here, so
it can be called and tested without mounting; `fs` translates FUSE calls to these.
"""

from __future__ import annotations

import os
from pathlib import Path

from annofs.content.fragments import FragmentStore
from annofs.content.versions import VersionStore
from annofs.namespace.tree import Namespace
from annofs.store import Store, open_store
from chunker import DEFAULT_PARAMS, ChunkParams

# The chunk parameters of a store are fixed at init: changing them would make new
# fragments of unchanged content differ from old ones and lose deduplication.
_PARAMS_KEY = "chunk-params"


class Volume:
    """An open store with its layers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fragments = FragmentStore(store)
        self.versions = VersionStore(store, self.fragments)
        self.namespace = Namespace(store)
        with store.read() as txn:
            raw = store.get_meta(txn, _PARAMS_KEY)
        self.params = ChunkParams.parse(raw.decode()) if raw else DEFAULT_PARAMS

    @classmethod
    def open(cls, path: Path, *, create: bool = False,
             params: ChunkParams | None = None) -> Volume:
        """Open (or create) the store at `path`."""
        store = open_store(path, create=create)
        if create:
            with store.write() as txn:
                if store.get_meta(txn, _PARAMS_KEY) is None:
                    store.put_meta(txn, _PARAMS_KEY, str(params or DEFAULT_PARAMS).encode())
                vol_ns = Namespace(store)
                VersionStore(store, FragmentStore(store)).ensure_empty(txn)
                vol_ns.ensure_root(txn, os.getuid(), os.getgid())
            store.sync()
        return cls(store)

    def close(self) -> None:
        """Flush and close."""
        self.store.close()
