"""Fragments (blake3 -> bytes, refcounts), versions (the edit graph), digests."""

from annofs.content.fragments import FragmentStore, fragment_hash
from annofs.content.overlay import DirtyOverlay
from annofs.content.versions import EMPTY_VERSION, VersionStore

__all__ = ["EMPTY_VERSION", "DirtyOverlay", "FragmentStore", "VersionStore", "fragment_hash"]
