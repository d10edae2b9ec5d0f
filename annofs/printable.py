"""Text that stays on its line: names (any byte but '/' and NUL) printed anywhere.

A file name may hold a newline, a carriage return or a terminal escape: printed as it
is, it forges a line in `annofs events`, the daemon log or an explanation, or drives
the reader's terminal. Every place that prints a name or a message holding one passes
it through `one_line`. The lines of a text diff too (explain.diff): a refused file's
content is anybody's, and its diff is printed to the owner's terminal.
"""

from __future__ import annotations


def one_line(text: str, keep: str = "") -> str:
    """`text` with every unprintable character (controls, line and paragraph
    separators, lone surrogates from undecodable bytes) escaped as Python's repr does:
    one printable line. Characters in `keep` (a tab in a diff line) stay as they are."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)
