"""The filesystem as data: directory nodes, entries, links, copy-on-write sharing."""

from annofs.namespace.tree import MAX_NAME, Namespace, check_name, split_path

__all__ = ["MAX_NAME", "Namespace", "check_name", "split_path"]
