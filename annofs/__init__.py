"""annofs: a content-defined-chunking annotation filesystem.

Files are stored as FastCDC fragments deduplicated by BLAKE3 in LMDB, as versions in an
edit graph; directories are refcounted nodes shared between trees, so copies are O(1).
The layers, imported downward only: store -> content -> namespace -> (trust, explain,
nix) -> fs -> daemon -> cli.
"""

__version__ = "0.1.0"
