"""The LMDB environment, its named databases, transactions and record encodings."""

from annofs.store.env import FORMAT_VERSION, Store, open_store

__all__ = ["FORMAT_VERSION", "Store", "open_store"]
