"""Hand-built NARs for the reader's tests: a builder, and malformed archives with the
error each must give (shared by the t1 reader tests and the t2 restore tests)."""

from __future__ import annotations

import struct

U64 = struct.Struct("<Q")


def s(b: bytes) -> bytes:
    """One NAR string: length, bytes, zero padding."""
    return U64.pack(len(b)) + b + bytes(-len(b) % 8)


def strings(*parts: bytes) -> bytes:
    return b"".join(s(p) for p in parts)


def regular(data: bytes, executable: bool = False) -> bytes:
    exe = strings(b"executable", b"") if executable else b""
    return (strings(b"(", b"type", b"regular") + exe + s(b"contents")
            + U64.pack(len(data)) + data + bytes(-len(data) % 8) + s(b")"))


def symlink(target: bytes) -> bytes:
    return strings(b"(", b"type", b"symlink", b"target", target, b")")


def entry(name: bytes, node: bytes) -> bytes:
    return strings(b"entry", b"(", b"name", name, b"node") + node + s(b")")


def directory(*entries: bytes) -> bytes:
    return strings(b"(", b"type", b"directory") + b"".join(entries) + s(b")")


def nar(node: bytes) -> bytes:
    return s(b"nix-archive-1") + node


def deep(levels: int) -> bytes:
    node = regular(b"x")
    for _ in range(levels):
        node = directory(entry(b"d", node))
    return nar(node)


GOOD = nar(directory(entry(b"a", regular(b"hello")),
                     entry(b"b", directory(entry(b"c", symlink(b"../a")))),
                     entry(b"x", regular(b"#!/bin/sh\n", executable=True))))

# (case id, archive, a fragment of the message it must give)
MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "truncated"),
    ("wrong-magic", s(b"nix-archive-2") + directory(), "not a NAR"),
    ("dotdot", nar(directory(entry(b"..", regular(b"x")))), "'..' is not allowed"),
    ("dot", nar(directory(entry(b".", regular(b"x")))), "'.' is not allowed"),
    ("slash", nar(directory(entry(b"a/b", regular(b"x")))), "contains '/'"),
    ("absolute", nar(directory(entry(b"/etc", regular(b"x")))), "contains '/'"),
    ("nul", nar(directory(entry(b"a\0b", regular(b"x")))), "NUL"),
    ("empty-name", nar(directory(entry(b"", regular(b"x")))), "empty name"),
    ("duplicate", nar(directory(entry(b"a", regular(b"1")), entry(b"a", regular(b"2")))),
     "duplicate name 'a'"),
    ("unsorted", nar(directory(entry(b"b", regular(b"1")), entry(b"a", regular(b"2")))),
     "not sorted"),
    ("unsorted-deep", nar(directory(entry(b"d", directory(
        entry(b"y", regular(b"")), entry(b"x", regular(b"")))))), "not sorted"),
    ("trailing", GOOD + b"x", "trailing bytes"),
    ("trailing-zeros", GOOD + bytes(8), "trailing bytes"),
    ("trailing-nar", GOOD + GOOD, "trailing bytes"),
    ("truncated-contents", nar(regular(bytes(64)))[:-40], "truncated"),
    ("truncated-end", GOOD[:-8], "truncated"),
    ("padding-in-name", GOOD.replace(s(b"a"), U64.pack(1) + b"a" + b"\0\0\0\1\0\0\0", 1),
     "non-zero padding"),
    ("padding-after-contents", nar(regular(b"hello")).replace(b"hello\0\0\0", b"hello\0\0\1"),
     "non-zero padding"),
    ("unknown-type", nar(strings(b"(", b"type", b"fifo", b")")), "found 'fifo'"),
    ("unknown-tag", nar(directory(entry(b"a", regular(b"")))).replace(s(b"entry"), s(b"entri")),
     "found 'entri'"),
    ("executable-on-dir", nar(strings(b"(", b"type", b"directory", b"executable", b"", b")")),
     "found 'executable'"),
    ("executable-value", nar(strings(b"(", b"type", b"regular", b"executable", b"1",
                                     b"contents") + U64.pack(0) + s(b")")), "must be empty"),
    ("long-name", nar(directory(entry(b"n" * 256, regular(b"")))), "more than the 255"),
    ("huge-length", nar(directory()).replace(s(b"type"), U64.pack(1 << 62), 1),
     "found a string of"),
    ("huge-name-length", nar(strings(b"(", b"type", b"directory", b"entry", b"(", b"name"))
     + U64.pack(1 << 62), "more than the 255"),
    ("long-target", nar(symlink(b"t" * 4096)), "more than the 4095"),
    ("empty-target", nar(symlink(b"")), "empty symlink target"),
    ("nul-target", nar(symlink(b"a\0b")), "NUL"),
    ("too-deep", deep(257), "nested deeper than 256"),
    ("missing-close", nar(regular(b"x"))[:-8] + s(b"("), "expected ')'"),
]
