"""Policy path globs, translated to anchored regular expressions.

A small exact translator rather than a general glob library: a policy's security rests
on which paths a rule covers, so the whole grammar fits in this docstring.

- A glob is an absolute store path: it starts with '/', components are separated by '/',
  and no component is empty, `.` or `..` (an error, not a rule that matches nothing).
- `*` matches any run of characters inside one component (also a leading '.': a rule
  for `/src/*` must not let `/src/.hidden` escape it), `?` one character.
- `[abc]`, `[a-z]`, `[!a-z]` (or `[^a-z]`) match one character of (not of) a set; a `]`
  right after the opening `[` (or `[!`) is part of the set.
- `\\x` matches `x` literally.
- A component that is exactly `**` matches any number of whole components: zero or more
  in the middle (`/a/**/b` matches `/a/b` and `/a/x/y/b`), one or more at the end
  (`/src/**` matches everything inside `/src`, not `/src` itself). `**` next to other
  characters in a component is an error rather than a guess.

Names may hold any byte but '/' and NUL (newlines included); paths are decoded with
surrogateescape, and the expressions use DOTALL so no character escapes a `*`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from annofs.errors import UsageError


def path_text(parts: Sequence[bytes]) -> str:
    """An absolute store path as globs see it (undecodable bytes kept, escaped).

    One decode of the joined bytes: '/' is ASCII and never part of a multi-byte
    sequence, so this is exactly the per-component decode, joined, at a quarter the cost.
    """
    return (b"/" + b"/".join(parts)).decode("utf-8", "surrogateescape")


def translate(glob: str) -> str:
    """The regular expression (for `re.fullmatch`) equivalent to a path glob."""
    return "(?s:" + "".join(_translate_parts(glob)) + ")"


def _translate_parts(glob: str) -> list[str]:
    """The regular expression of a path glob, one piece per component."""
    if not glob.startswith("/"):
        raise UsageError(f"{glob!r}: a path glob starts with '/' (e.g. /src/**)")
    parts = glob[1:].split("/")
    out = []
    for i, part in enumerate(parts):
        if not part:
            raise UsageError(f"{glob!r}: empty path component")
        literal = re.sub(r"\\(.)", r"\1", part)
        if literal in (".", ".."):
            # A store path never has such a component: the rule would silently match
            # nothing (or, worse, look as if it covered what `..` points at).
            raise UsageError(f"{glob!r}: {literal!r} as a path component: store paths "
                             f"have none, so the rule would match nothing")
        if part == "**":
            # At the end: one or more components; before another part: zero or more.
            out.append("/.+" if i == len(parts) - 1 else "(?:/[^/]+)*")
        elif "**" in part.replace("\\*", ""):
            raise UsageError(f"{glob!r}: '**' must be a whole path component")
        else:
            out.append("/" + _component(part, glob))
    return out


def _component(part: str, glob: str) -> str:
    out = []
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            if i == n:
                raise UsageError(f"{glob!r}: '\\' at the end of a component escapes nothing")
            out.append(re.escape(part[i]))
            i += 1
        elif c == "[":
            j = i
            negate = j < n and part[j] in "!^"
            if negate:
                j += 1
            if j < n and part[j] == "]":
                j += 1  # a leading ']' belongs to the set
            end = part.find("]", j)
            if end < 0:
                raise UsageError(f"{glob!r}: '[' without a closing ']'")
            body = part[i + (1 if negate else 0):end]
            # Escape what a regex class treats specially; keep '-' ranges.
            body = body.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
            body = body.replace("^", "\\^").replace("&", "\\&").replace("~", "\\~")
            body = body.replace("|", "\\|")
            try:
                re.compile(f"[{body}]")
            except re.error as e:
                raise UsageError(f"{glob!r}: bad character set [{part[i:end]}] ({e})") from None
            out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
            i = end + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


class PathGlob:
    """A compiled glob: `matches('/src/a/b.c')`."""

    def __init__(self, glob: str) -> None:
        self.glob = glob
        parts = _translate_parts(glob)
        self._re = re.compile("(?s:" + "".join(parts) + ")")
        # A glob ending in `/**` (the last piece "/.+") matches a path exactly when a
        # strict ancestor of it (the root as "") matches the pieces before: such a glob
        # decides every name in a directory at once (`covers_children`). The pieces, not
        # the glob without its `/**`: a `**` before it keeps its meaning (zero or more
        # components), as in `/a/**/**`.
        self._below: re.Pattern[str] | None = None
        self._below_root = False
        if glob.endswith("/**") and parts[-1] == "/.+":
            self._below = re.compile("(?s:" + "".join(parts[:-1]) + ")")
            self._below_root = self._below.fullmatch("") is not None

    def matches(self, path: str) -> bool:
        """Whether the whole absolute store path matches."""
        return self._re.fullmatch(path) is not None

    @property
    def by_directory(self) -> bool:
        """Whether the glob matches a name by its directory alone (it ends in `/**`)."""
        return self._below_root or self._below is not None

    def covers_children(self, directory: Sequence[bytes]) -> bool:
        """For a `by_directory` glob: whether it matches every name in `directory` (and
        below). False means it matches none of them."""
        if self._below_root:
            return True
        below = self._below
        if below is None:
            raise ValueError(f"{self.glob!r} does not end in '/**'")
        return any(below.fullmatch(path_text(directory[:i])) is not None
                   for i in range(1, len(directory) + 1))

    def may_match_below(self, directory: str) -> bool:
        """Whether the glob might match a path below `directory` (an absolute store path
        without a trailing slash). False only when its literal start (up to the first
        wildcard) leads elsewhere: a sure answer, never a wrong False."""
        literal = re.split(r"[*?\[]", self.glob, maxsplit=1)[0]
        inside = directory.rstrip("/") + "/"
        return literal.startswith(inside) or inside.startswith(literal)

    def __repr__(self) -> str:
        return f"PathGlob({self.glob!r})"
