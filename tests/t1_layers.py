"""The layers of README's "How it is built" import downward only: no module imports a
layer listed above its own (an upward import is how cycles such as trust <-> nix start)."""

from __future__ import annotations

import re
from pathlib import Path

import annofs

# Lowest first, as README lists them (chunker/ is a package of its own).
LAYERS = ("store", "content", "namespace", "transfer", "maintenance", "trust", "nix",
          "explain", "fs", "daemon", "dashboard", "cli")
# The mount's daemon starts the dashboard's server for `mount --dashboard`; the dashboard
# never calls back into the daemon's lifecycle.
ALLOWED = {("daemon/mount.py", "dashboard")}
_IMPORT = re.compile(r"^\s*(?:from|import) annofs\.(\w+)", re.M)


def test_no_layer_imports_one_above_it() -> None:
    root = Path(annofs.__file__).parent
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if len(rel.parts) < 2 or rel.parts[0] not in rank:
            continue
        for m in _IMPORT.finditer(path.read_text()):
            other = m.group(1)
            if other in rank and rank[other] > rank[rel.parts[0]] \
                    and (rel.as_posix(), other) not in ALLOWED:
                upward.append(f"{rel} imports annofs.{other}")
    assert not upward, "\n".join(upward)
