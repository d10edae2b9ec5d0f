"""NAR (Nix ARchive): the serialisation Nix hashes, signs and ships store paths as.

A NAR is a sequence of strings, each a little-endian u64 length, the bytes, and zero
padding to a multiple of 8. After the magic `nix-archive-1` comes one node:

    ( type regular [executable ""] contents <u64 size> <bytes, padded> )
    ( type symlink target <target> )
    ( type directory { entry ( name <name> node <node> ) }* )

with directory entries sorted by the bytes of their names. There is nothing else in it:
no times, no owners, no modes beyond the owner's execute bit, so one tree has exactly one
NAR, and `nix-store --dump` of it is byte for byte what `dump_host` / `dump_volume` give.

Everything streams: a dump reads files fragment by fragment, and the reader hands out a
regular file's bytes as a bounded stream, so neither side holds a whole file or a whole
archive. The reader is stricter than Nix 2.8's (which takes unsorted entries and trailing
bytes): a NAR it accepts has one meaning, and can write nothing outside its destination.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import stat
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import lmdb

from annofs.content.fragments import Decompressed, Stored
from annofs.content.ingest import FragmentBatch, ingest_stream
from annofs.content.versions import EMPTY_VERSION, zeros
from annofs.errors import CorruptionError, ExistsError, NotADirectoryError_, UsageError
from annofs.namespace.tree import MAX_NAME, check_name, now_ns
from annofs.store.records import HOLE, Attrs, Version
from annofs.transfer import nixbase32 as base32
from annofs.volume import Volume

MAGIC = b"nix-archive-1"
# Limits of what one entry may be. Nix sets none, but no Linux filesystem holds a longer
# name (NAME_MAX) or symlink target (PATH_MAX - 1); and nesting is bounded so a crafted
# archive cannot make the restorer hold an unbounded stack of open directories.
MAX_TARGET = 4095
MAX_DEPTH = 256
_MAX_TAG = 16  # the longest keyword is "executable"
_KEYWORDS = (b"(", b")", b"type", b"regular", b"symlink", b"directory", b"executable",
             b"contents", b"target", b"entry", b"name", b"node")

_U64 = struct.Struct("<Q")
_PAD = bytes(8)
_READ = 1 << 20  # file bytes read per step when dumping
_FLUSH = 1 << 16  # small strings are gathered up to this before a chunk is yielded


class NarError(UsageError):
    """A malformed NAR: the message says where (byte offset, entry) and what is wrong."""


Kind = Literal["directory", "regular", "symlink"]


@dataclass(frozen=True)
class NarHash:
    """The SHA-256 of a NAR and its size: what narinfo's NarHash and NarSize record."""

    sha256: bytes
    size: int

    def __str__(self) -> str:
        return "sha256:" + base32.encode(self.sha256)


def nar_hash(chunks: Iterable[bytes]) -> NarHash:
    """Hash a NAR given as chunks (a dump); `str()` of the result is `sha256:<nix base32>`."""
    h = hashlib.sha256()
    size = 0
    for c in chunks:
        h.update(c)
        size += len(c)
    return NarHash(h.digest(), size)


def show_path(path: Sequence[bytes]) -> str:
    """An entry path for messages: '/' is the archive's top; odd bytes as \\xNN."""
    return "/" + "/".join(p.decode("utf-8", "backslashreplace") for p in path)


# -- writing --------------------------------------------------------------------------


def _string(s: bytes) -> bytes:
    return _U64.pack(len(s)) + s + _PAD[: -len(s) % 8]


@dataclass(slots=True)  # not frozen: made once per file of a dump, and never changed
class _Regular:
    where: str | tuple[bytes, ...]  # for messages (a volume's path: shown only then)
    executable: bool
    size: int
    chunks: Callable[[], Iterator[bytes]]
    # What stands for the bytes in a dump of pieces (`_dump(..., defer=True)`).
    content: object = None


@dataclass(frozen=True)
class _Symlink:
    target: bytes


@dataclass(frozen=True)
class _Directory:
    entries: Callable[[], Iterator[tuple[bytes, _Node]]]  # in byte order of names


_Node = _Regular | _Symlink | _Directory


def _dump(root: _Node, defer: bool = False) -> Iterator[bytes]:
    """The NAR of a tree described by nodes, as chunks of at least _FLUSH bytes (but the
    last): the small strings of a tree of small files become few, large writes. With
    `defer`, each regular file's `content` is handed out in place of its bytes."""
    buf = bytearray(_string(MAGIC))
    # An explicit stack of entry iterators: no recursion limit on deep trees.
    stack: list[Iterator[tuple[bytes, _Node]]] = []
    if isinstance(root, _Directory):
        buf += _DIR_OPEN
        stack.append(root.entries())
    else:
        yield from _leaf(root, buf, defer)
    while stack:
        if len(buf) >= _FLUSH:
            yield bytes(buf)
            buf.clear()
        nxt = next(stack[-1], None)
        if nxt is None:
            stack.pop()
            buf += _CLOSE
            if stack:
                buf += _CLOSE  # the parent's `entry (`
            continue
        name, node = nxt
        buf += _ENTRY + _string(name) + _NODE
        if isinstance(node, _Directory):
            buf += _DIR_OPEN
            stack.append(node.entries())
        else:
            yield from _leaf(node, buf, defer)
            buf += _CLOSE
    if buf:
        yield bytes(buf)


_CLOSE = _string(b")")
_TOKENS = {k: _string(k) for k in _KEYWORDS}  # keywords as they are encoded
_DIR_OPEN = _string(b"(") + _string(b"type") + _string(b"directory")
_ENTRY = _string(b"entry") + _string(b"(") + _string(b"name")
_NODE = _string(b"node")


_REGULAR = _string(b"(") + _string(b"type") + _string(b"regular")
_EXECUTABLE = _string(b"executable") + _string(b"")
_CONTENTS = _string(b"contents")
_SYMLINK = _string(b"(") + _string(b"type") + _string(b"symlink") + _string(b"target")


def _leaf(node: _Regular | _Symlink, buf: bytearray, defer: bool = False) -> Iterator[bytes]:
    """Append a file's or symlink's node to `buf`; a file's bytes go out as they are read
    (after what `buf` held), never gathered whole (with `defer`: its `content` does)."""
    if isinstance(node, _Symlink):
        buf += _SYMLINK + _string(node.target) + _CLOSE
        return
    buf += _REGULAR + _EXECUTABLE + _CONTENTS if node.executable else _REGULAR + _CONTENTS
    buf += _U64.pack(node.size)
    if defer and node.size:
        yield bytes(buf)
        buf.clear()
        yield node.content  # type: ignore[misc]
        buf += _PAD[: -node.size % 8] + _CLOSE
        return
    done = 0
    for chunk in node.chunks():
        done += len(chunk)
        if done > node.size:
            break
        if len(buf) + len(chunk) <= _FLUSH:
            buf += chunk
            continue
        if buf:
            yield bytes(buf)
            buf.clear()
        yield chunk
    if done != node.size:
        where = node.where if isinstance(node.where, str) else show_path(node.where)
        raise UsageError(f"{where}: changed size while it was archived "
                         f"({node.size} bytes expected, {done} found)")
    buf += _PAD[: -node.size % 8] + _CLOSE


def _host_node(path: bytes, st: os.stat_result) -> _Node:
    shown = os.fsdecode(path)
    if stat.S_ISREG(st.st_mode):
        def chunks() -> Iterator[bytes]:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(_READ):
                    yield chunk
        # Nix looks at the owner's execute bit only (archive.cc: st_mode & S_IXUSR).
        return _Regular(shown, bool(st.st_mode & stat.S_IXUSR), st.st_size, chunks)
    if stat.S_ISLNK(st.st_mode):
        return _Symlink(os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        def entries() -> Iterator[tuple[bytes, _Node]]:
            for name in sorted(os.listdir(path)):
                child = os.path.join(path, name)
                yield name, _host_node(child, os.lstat(child))
        return _Directory(entries)
    raise UsageError(f"{shown}: {_kind_name(st.st_mode)} cannot be put in a NAR")


def _kind_name(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device node"


def dump_host(path: Path) -> Iterator[bytes]:
    """The NAR of a host file or tree, as `nix-store --dump PATH` writes it."""
    raw = os.fsencode(path)
    return _dump(_host_node(raw, os.lstat(raw)))


def dump_volume(vol: Volume, path: Sequence[bytes]) -> Iterator[bytes]:
    """The NAR of a store path (a file or a tree) of the volume, from one snapshot.

    A generator holding one read transaction while it runs: what it archives is the
    tree as it was when the first chunk was asked for, whatever changes meanwhile.
    Every fragment is checked against its hash as it is read.
    """
    with vol.store.read() as txn:
        yield from dump_volume_in(vol, txn, path)


Listings = dict[int, list[tuple[bytes, Attrs]]]
"""Directory node id -> its entries in name order, as a walk of the same snapshot read
them (a node id names one directory's content within a snapshot)."""


def dump_volume_in(vol: Volume, txn: lmdb.Transaction, path: Sequence[bytes],
                   listings: Listings | None = None) -> Iterator[bytes]:
    """`dump_volume` in the caller's read transaction (which must outlive the dump): for
    a caller that checked the tree in that snapshot and must archive exactly it.
    `listings` are directories that caller already listed in this transaction: they are
    not read and decoded a second time."""
    top = vol.namespace.resolve(txn, list(path))
    yield from _dump(_volume_node(vol, txn, top, tuple(path), listings or {}))


# hash_volume_in: stored fragment bytes read per task of the checking thread, and tasks
# in flight at most (memory: about that many tasks' bytes, decompressed).
_BATCH = 4 << 20
_BATCH_PIECES = 8192  # a tree of empty files makes tasks of framing alone
_AHEAD = 4
# What a task holds: NAR bytes, a file's fragments as (hashes, lengths, version id), a
# hole's length.
_Piece = bytes | tuple[list[bytes], list[int], int] | int


def hash_volume_in(vol: Volume, txn: lmdb.Transaction, path: Sequence[bytes],
                   listings: Listings | None = None) -> NarHash:
    """The hash of `dump_volume_in`'s NAR, without its stream of chunks.

    This thread walks the tree and reads the stored fragments in the caller's snapshot
    (back-to-back ones with one pread, across files too), a task of a few MiB at a time.
    A second thread decompresses a task's compressed fragments with one zstandard call
    (no GIL held) while this one reads the next; this one then checks each fragment
    against its hash and lays them out with the NAR's framing in one buffer, which a
    third thread hashes, tasks in order (SHA-256 releases the GIL on large buffers).
    So the GIL changes hands a few times per task, not per fragment (checking in
    threads fragment by fragment was measured slower than one thread: each hand-over
    cost more than it overlapped). A decompression no thread has started when it is
    needed (a busy machine) is done here instead of waited for. Every fragment is
    checked before its bytes are hashed, as in a dump: CorruptionError, never a hash of
    wrong bytes."""
    top = vol.namespace.resolve(txn, list(path))
    root = _volume_node(vol, txn, top, tuple(path), listings or {})
    frags = vol.versions.fragments
    sha = hashlib.sha256()
    size = 0
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="annofs-narhash")
    unzstd = ThreadPoolExecutor(max_workers=1, thread_name_prefix="annofs-narunzstd")
    pending: deque[Future[None]] = deque()
    batch: list[_Piece] = []
    stored = 0
    # The task whose fragments are being decompressed while this thread reads the next.
    last: tuple[list[_Piece], list[Stored], Future[Decompressed]] | None = None

    def finish() -> None:
        nonlocal last
        if last is not None:
            was, read, done = last
            last = None
            # A thread that has not started it yet (a busy machine) leaves it to this one
            # rather than be waited for (as workers.map_runs does).
            got = frags.decompress_stored(read) if done.cancel() else done.result()
            pieces = _checked_pieces(was, frags.check_decompressed(read, got))
            pending.append(hasher.submit(_hash_pieces, sha, pieces))
            while len(pending) > _AHEAD:
                pending.popleft().result()

    def flush() -> None:
        nonlocal batch, stored, last
        wanted = [h for p in batch if isinstance(p, tuple) for h in p[0]]
        read = frags.fetch_stored(txn, wanted)
        done = unzstd.submit(frags.decompress_stored, read)
        finish()
        last = (batch, read, done)
        batch, stored = [], 0

    try:
        for piece in _dump(root, defer=True):
            if isinstance(piece, bytes):
                batch.append(piece)
                size += len(piece)
            else:
                assert isinstance(piece, Version)
                size += piece.size
                if piece.count == 1 and piece.hashes != HOLE:  # most files of a tree
                    batch.append(([piece.hashes], [piece.size], piece.id))
                    stored += piece.size
                    if stored >= _BATCH:
                        flush()
                else:
                    for run in _fragment_runs(piece):
                        if isinstance(run, int):
                            batch.append(run)
                            continue
                        batch.append((*run, piece.id))
                        stored += sum(run[1])
                        if stored >= _BATCH:
                            flush()
            if len(batch) >= _BATCH_PIECES:
                flush()
        if batch:
            flush()
        finish()
        while pending:
            pending.popleft().result()
    finally:
        unzstd.shutdown(wait=True, cancel_futures=True)
        hasher.shutdown(wait=True, cancel_futures=True)
    return NarHash(sha.digest(), size)


def _fragment_runs(v: Version) -> Iterator[tuple[list[bytes], list[int]] | int]:
    """A version's stored fragments as runs of (hashes, lengths) of at most _BATCH bytes,
    and its holes as their lengths, in order."""
    hashes: list[bytes] = []
    lengths: list[int] = []
    total = 0
    for i in range(v.count):
        h, n = v.fragment_hash(i), v.lengths[i]
        if h == HOLE:
            if hashes:
                yield hashes, lengths
                hashes, lengths, total = [], [], 0
            yield n
            continue
        hashes.append(h)
        lengths.append(n)
        total += n
        if total >= _BATCH:
            yield hashes, lengths
            hashes, lengths, total = [], [], 0
    if hashes:
        yield hashes, lengths


def _checked_pieces(batch: list[_Piece], checked_list: list[bytes | memoryview]
                    ) -> list[bytes | int]:
    """A task's NAR bytes with its checked fragments (each must be of the length its
    version says) between them, joined into one buffer per run between holes, and the
    holes' lengths."""
    checked = iter(checked_list)
    out: list[bytes | int] = []
    parts: list[bytes | memoryview] = []
    append = parts.append
    for piece in batch:
        if isinstance(piece, bytes):
            append(piece)
        elif isinstance(piece, int):
            out.append(b"".join(parts))
            parts = []
            append = parts.append
            out.append(piece)
        else:
            hashes, lengths, vid = piece
            for h, n in zip(hashes, lengths, strict=True):
                data = next(checked)
                if len(data) != n:
                    raise CorruptionError(f"fragment {h.hex()}: {len(data)} bytes, the "
                                          f"version {vid} says {n}")
                append(data)
    out.append(b"".join(parts))
    return out


def _hash_pieces(sha: hashlib._Hash, pieces: list[bytes | int]) -> None:
    """Hash a task's checked pieces (a hole as zeros, never materialised whole); the one
    hashing thread takes tasks in order."""
    for p in pieces:
        if isinstance(p, int):
            for z in zeros(p):
                sha.update(z)
        else:
            sha.update(p)


def _volume_node(vol: Volume, txn: lmdb.Transaction, a: Attrs,
                 path: tuple[bytes, ...], listings: Listings) -> _Node:
    if a.is_reg:
        v = vol.versions.get(txn, int(a.target))
        return _Regular(path, bool(a.mode & stat.S_IXUSR), v.size,
                        lambda: vol.versions.iter_bytes(txn, v), v)
    if a.is_symlink:
        assert isinstance(a.target, bytes)
        return _Symlink(a.target)
    if a.is_dir:
        def entries() -> Iterator[tuple[bytes, _Node]]:
            # The namespace keeps entries in byte order of names: the order NARs need.
            known = listings.get(int(a.target))
            for name, child in known if known is not None else \
                    vol.namespace.listdir(txn, int(a.target)):
                yield name, _volume_node(vol, txn, child, (*path, name), listings)
        return _Directory(entries)
    raise UsageError(f"{show_path(path)}: {_kind_name(a.mode)} cannot be put in a NAR")


# -- reading --------------------------------------------------------------------------


@dataclass(frozen=True)
class NarEntry:
    """One node of a NAR as the reader meets it, parents before children.

    For a regular file, `contents` streams its `size` bytes; it is valid until the next
    entry is asked for (what was not read is then skipped, still checked and hashed).
    """

    path: tuple[bytes, ...]  # relative to the archive's top; () for the top node
    kind: Kind
    executable: bool = False
    size: int = 0
    target: bytes = b""
    contents: NarContents | None = field(default=None, compare=False, repr=False)


class NarReader:
    """A strict, streaming NAR parser over a binary stream.

    `entries()` yields each node; it ends only after the whole archive was read and
    found well-formed, up to and including the end of the stream (trailing bytes are an
    error). `hash` is the archive's NarHash once `entries()` is exhausted. Memory is
    bounded whatever the input: names, targets and keywords have length limits, file
    contents are streamed, and nesting is at most MAX_DEPTH directories.
    """

    def __init__(self, stream: BinaryIO, source: str = "NAR") -> None:
        self._stream = stream
        self.source = source
        self._buf = b""
        self._off = 0  # consumed bytes of _buf
        self.pos = 0  # bytes consumed from the archive (the offset errors report)
        self._read = 0  # bytes read from the stream
        self._sha = hashlib.sha256()
        self._path: tuple[bytes, ...] = ()
        self._contents: NarContents | None = None
        self.hash: NarHash | None = None

    # -- errors and bytes ---------------------------------------------------------

    def error(self, problem: str, at: int | None = None,
              path: Sequence[bytes] | None = None) -> NarError:
        """A NarError naming the source, the byte offset and the entry."""
        where = show_path(self._path if path is None else path)
        return NarError(f"{self.source}: byte {self.pos if at is None else at}, "
                        f"entry {where}: {problem}")

    def _fill(self, n: int) -> bool:
        """Make at least `n` unconsumed bytes buffered; False at the end of the stream."""
        while len(self._buf) - self._off < n:
            data = self._stream.read(max(n, 1 << 16))
            if not data:
                return False
            self._sha.update(data)
            self._read += len(data)
            self._buf = self._buf[self._off :] + data
            self._off = 0
        return True

    def _take(self, n: int, what: str) -> bytes:
        if len(self._buf) - self._off < n and not self._fill(n):
            raise self.error(f"truncated: the archive ends inside {what}")
        out = self._buf[self._off : self._off + n]
        self._off += n
        self.pos += n
        return out

    def _u64(self, what: str) -> int:
        if len(self._buf) - self._off < 8 and not self._fill(8):
            raise self.error(f"truncated: the archive ends inside {what}")
        n = _U64.unpack_from(self._buf, self._off)[0]
        self._off += 8
        self.pos += 8
        return n

    def _padding(self, n: int, what: str) -> None:
        pad = -n % 8
        if pad:
            at = self.pos
            if self._take(pad, f"the padding of {what}") != _PAD[:pad]:
                raise self.error(f"non-zero padding after {what}", at)

    def _string(self, limit: int, what: str) -> bytes:
        at = self.pos
        n = self._u64(f"the length of {what}")
        if n > limit:
            raise self.error(f"{what} is {n} bytes long, more than the {limit} allowed", at)
        s = self._take(n, what)
        self._padding(n, what)
        return s

    def _tag(self, expected: tuple[bytes, ...]) -> bytes:
        """One of the keywords `expected` (each is 16 bytes or more, encoded)."""
        for tag in expected:
            token = _TOKENS[tag]
            if (len(self._buf) - self._off >= len(token) or self._fill(len(token))) \
                    and self._buf.startswith(token, self._off):
                self._off += len(token)
                self.pos += len(token)
                return tag
        # Not a match: read it again slowly, to say exactly what is wrong.
        at = self.pos
        want = " or ".join(repr(e.decode()) for e in expected)
        n = self._u64(f"a keyword ({want})")
        if n > _MAX_TAG:
            raise self.error(f"expected {want}, found a string of {n} bytes", at)
        s = self._take(n, f"a keyword ({want})")
        self._padding(n, "a keyword")
        raise self.error(f"expected {want}, found {s.decode('utf-8', 'backslashreplace')!r}", at)

    # -- the grammar --------------------------------------------------------------

    def entries(self) -> Iterator[NarEntry]:
        """Parse the archive; see the class docstring."""
        at = self.pos
        n = self._u64("the magic")
        if n != len(MAGIC) or self._take(n, "the magic") != MAGIC:
            raise self.error(f"not a NAR (it does not start with {MAGIC.decode()!r})", at)
        self._padding(n, "the magic")
        # For each open directory: the last name seen in it (entries must ascend).
        open_dirs: list[bytes | None] = []
        entry = self._node(())
        yield from self._hand_out(entry)
        if entry.kind == "directory":
            open_dirs.append(None)
        while open_dirs:
            tag = self._tag((b"entry", b")"))
            if tag == b")":
                open_dirs.pop()
                if open_dirs:
                    self._path = self._path[:-1]
                    self._tag((b")",))  # the subdirectory's `entry (` in its parent
                continue
            self._tag((b"(",))
            self._tag((b"name",))
            at = self.pos
            name = self._string(MAX_NAME, "a name")
            self._check_name(name, open_dirs[-1], at)
            open_dirs[-1] = name
            self._tag((b"node",))
            path = (*self._path, name)
            if len(path) > MAX_DEPTH:
                raise self.error(f"nested deeper than {MAX_DEPTH} directories", at, path)
            entry = self._node(path)
            yield from self._hand_out(entry)
            if entry.kind == "directory":
                open_dirs.append(None)
                self._path = path
            else:
                self._tag((b")",))  # closes `entry (`
        self._end()

    def _node(self, path: tuple[bytes, ...]) -> NarEntry:
        """Parse `( type ...` up to a file's contents, a symlink's `)`, or a directory's
        first entry."""
        saved, self._path = self._path, path
        self._tag((b"(",))
        self._tag((b"type",))
        kind = self._tag((b"regular", b"symlink", b"directory"))
        if kind == b"directory":
            return NarEntry(path, "directory")
        if kind == b"symlink":
            self._tag((b"target",))
            at = self.pos
            target = self._string(MAX_TARGET, "a symlink target")
            if not target:
                raise self.error("empty symlink target", at)
            if b"\0" in target:
                raise self.error("symlink target contains a NUL byte", at)
            self._tag((b")",))
            self._path = saved
            return NarEntry(path, "symlink", target=target)
        tag = self._tag((b"executable", b"contents"))
        executable = tag == b"executable"
        if executable:
            at = self.pos
            if self._string(_MAX_TAG, "the executable flag's value") != b"":
                raise self.error("the executable flag's value must be empty", at)
            self._tag((b"contents",))
        size = self._u64("a file's size")
        self._contents = NarContents(self, size)
        self._path = saved
        return NarEntry(path, "regular", executable, size, contents=self._contents)

    def _hand_out(self, entry: NarEntry) -> Iterator[NarEntry]:
        """Yield an entry; then finish a file's contents, its padding and its `)`."""
        if entry.kind == "directory":
            self._path = entry.path
        yield entry
        if entry.kind == "regular":
            contents = self._contents
            assert contents is not None
            saved, self._path = self._path, entry.path
            contents.skip_rest()
            self._contents = None
            self._padding(entry.size, "a file's contents")
            self._tag((b")",))
            self._path = saved

    def _check_name(self, name: bytes, last: bytes | None, at: int) -> None:
        path = (*self._path, name)
        shown = name.decode("utf-8", "backslashreplace")
        if not name:
            raise self.error("empty name", at)
        if name in (b".", b".."):
            raise self.error(f"name {shown!r} is not allowed", at, path)
        if b"/" in name:
            raise self.error(f"name {shown!r} contains '/'", at, path)
        if b"\0" in name:
            raise self.error(f"name {shown!r} contains a NUL byte", at, path)
        if last is not None and name <= last:
            if name == last:
                raise self.error(f"duplicate name {shown!r}", at, path)
            before = last.decode("utf-8", "backslashreplace")
            raise self.error(f"entries not sorted: {shown!r} after {before!r}", at, path)

    def _end(self) -> None:
        if len(self._buf) > self._off or self._fill(1):
            raise self.error("trailing bytes after the end of the archive", path=())
        self.hash = NarHash(self._sha.digest(), self._read)

    # -- a file's contents ----------------------------------------------------------

    def _readinto(self, view: memoryview) -> int:
        """Read into `view` (buffered bytes first, then straight from the stream)."""
        have = len(self._buf) - self._off
        if have:
            n = min(have, len(view))
            view[:n] = self._buf[self._off : self._off + n]
            self._off += n
        else:
            readinto = getattr(self._stream, "readinto", None)
            if readinto is not None:
                n = readinto(view) or 0
                data: bytes | memoryview = view[:n]
            else:
                data = self._stream.read(len(view)) or b""
                n = len(data)
                view[:n] = data
            if n:
                self._sha.update(data)
                self._read += n
        self.pos += n
        return n


class NarContents:
    """A regular file's bytes inside a NAR: a read-only stream of exactly `size` bytes.

    A short archive is a NarError (truncation), never a short file.
    """

    def __init__(self, reader: NarReader, size: int) -> None:
        self._reader = reader
        self.size = size
        self.left = size

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Fill up to len(buffer) bytes; 0 only at the end of the file."""
        if not self.left:
            return 0
        view = memoryview(buffer).cast("B")
        want = min(len(view), self.left)
        n = self._reader._readinto(view[:want])
        if not n:
            raise self._reader.error(f"truncated: the archive ends inside a file's contents "
                                     f"({self.left} of {self.size} bytes missing)")
        self.left -= n
        return n

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all that is left if negative)."""
        want = self.left if size is None or size < 0 else min(size, self.left)
        # Step by step: the size is what the archive claims, and it may lie.
        parts = []
        while want:
            buf = bytearray(min(want, _READ))
            n = self.readinto(buf)
            parts.append(bytes(buf[:n]) if n < len(buf) else bytes(buf))
            want -= n
        return b"".join(parts)

    def skip_rest(self) -> None:
        """Read (and so check and hash) what the consumer left."""
        scratch = memoryview(bytearray(min(self.left, _READ)))
        while self.left:
            self.readinto(scratch[: min(self.left, len(scratch))])


# -- restoring ------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoredFile:
    """A regular file a restore added: where, which version, what content."""

    path: tuple[bytes, ...]  # relative to the destination; () when the NAR is one file
    version: int
    digest: bytes  # BLAKE3 of the content (32 bytes)
    size: int
    executable: bool


@dataclass
class RestoredTree:
    """What `restore_nar_into` added at `dest`."""

    dest: tuple[bytes, ...]
    kind: Kind  # of the archive's top node
    nar: NarHash  # of every byte read, trailing check included
    files: list[RestoredFile] = field(default_factory=list)  # in archive order
    directories: int = 0  # the top one included
    symlinks: int = 0
    links: list[tuple[tuple[bytes, ...], bytes]] = field(default_factory=list)  # (path, target)
    new_bytes: int = 0  # payload bytes the store did not hold before


BeforeSwap = Callable[[lmdb.Transaction, RestoredTree], None]
# Runs the final swap where the caller needs it: a mount's daemon restores in a worker
# thread and swaps on its event loop (trio.from_thread.run_sync), whose inode caches
# must see the namespace change between two requests, never during one.
SwapOn = Callable[[Callable[[], None]], None]
Progress = Callable[[int, int], None]  # (files done, bytes read) increments

# Entries wait in memory and go into the store one transaction per batch: a transaction
# per file would make a NAR of many small files slow; a batch bounds the memory held.
_BATCH_ENTRIES = 2000
# Nix's canonical mtime (and atime) of everything in a store path: 1 s after the epoch.
_NIX_MTIME = 1_000_000_000
_BATCH_HASH_BYTES = 8 << 20


class _Restorer:
    def __init__(self, vol: Volume, dest: tuple[bytes, ...], replace: bool,
                 progress: Progress | None, canonical: bool = False,
                 swap_on: SwapOn | None = None) -> None:
        self.vol = vol
        self.canonical = canonical
        self.swap_on = swap_on
        self.dest = dest
        self.replace = replace
        self.progress = progress
        self.root: str | None = None  # the staging tree, once the top is a directory
        self.dir_ids: dict[tuple[bytes, ...], int] = {}
        self.pending: list[tuple[tuple[bytes, ...], Attrs | None, object]] = []
        self.pending_bytes = 0
        self.top: Attrs | None = None  # a one-file or symlink archive's entry
        self.uid, self.gid = os.getuid(), os.getgid()
        # Small files' fragments wait here too: a commit per file would cost more than
        # chunking it. Flushed before any version naming them is stored.
        self.batch = FragmentBatch(vol.store, vol.fragments)

    def _attrs(self, mode: int, size: int, target: int | bytes) -> Attrs:
        t = now_ns()
        if self.canonical and not stat.S_ISLNK(mode):
            # Nix's canonical metadata (canonicalisePathMetaData): no write bits, the
            # owner's execute bit for all, mtime 1 (a symlink keeps 0777; its time too).
            x = 0o111 if mode & stat.S_IXUSR else 0
            mode = stat.S_IFMT(mode) | 0o444 | x
        if self.canonical:
            return Attrs(mode, self.uid, self.gid, size, _NIX_MTIME, _NIX_MTIME, t, target)
        return Attrs(mode, self.uid, self.gid, size, t, t, t, target)

    def run(self, reader: NarReader, before_swap: BeforeSwap | None) -> RestoredTree:
        tree: RestoredTree | None = None
        try:
            for e in reader.entries():
                if tree is None:
                    tree = RestoredTree(self.dest, e.kind, NarHash(b"", 0))
                    if e.kind == "directory":
                        self._start_staging()
                self._add(tree, e)
            assert tree is not None and reader.hash is not None
            tree.nar = reader.hash
            self._finish(tree, before_swap)
        except BaseException:
            if self.root is not None:
                with self.vol.store.write() as txn:
                    self.vol.namespace.drop_root(txn, self.root)
            raise
        finally:
            self.vol.store.sync()
        return tree

    def _start_staging(self) -> None:
        ns = self.vol.namespace
        with self.vol.store.write() as txn:
            self.root = ns.make_staging_root(txn, self.uid, self.gid)
            if self.canonical:
                ns.set_root_attrs(txn, lambda a: dataclasses.replace(
                    a, mode=stat.S_IFDIR | 0o555, atime_ns=_NIX_MTIME, mtime_ns=_NIX_MTIME),
                    self.root)
            # The staging tree is ours alone (refcount 1): its directory ids stay valid
            # from one transaction to the next, so entries go in without path walks.
            self.dir_ids[()] = int(ns.root(txn, self.root).target)

    def _add(self, tree: RestoredTree, e: NarEntry) -> None:
        if e.kind == "directory":
            tree.directories += 1
            if e.path:
                self._queue(e.path, self._attrs(stat.S_IFDIR | 0o755, 0, 0), None)
            return
        if e.kind == "symlink":
            tree.symlinks += 1
            tree.links.append((e.path, e.target))
            a = self._attrs(stat.S_IFLNK | 0o777, len(e.target), e.target)
            self._queue(e.path, a, None)
            return
        assert e.contents is not None
        got = ingest_stream(self.vol.store, self.vol.fragments, e.contents,  # type: ignore[arg-type]
                            self.vol.params, batch=self.batch,
                            read_size=min(max(e.size, 1), 4 << 20))
        mode = stat.S_IFREG | (0o755 if e.executable else 0o644)
        self._queue(e.path, self._attrs(mode, e.size, EMPTY_VERSION), (got, tree, e.executable))
        self.pending_bytes += len(got.hashes)
        if self.progress:
            self.progress(1, e.size)

    def _queue(self, path: tuple[bytes, ...], a: Attrs, file: object) -> None:
        self.pending.append((path, a, file))
        if len(self.pending) >= _BATCH_ENTRIES or self.pending_bytes >= _BATCH_HASH_BYTES:
            self.batch.flush()
            with self.vol.store.write() as txn:
                self._flush(txn)

    def _flush(self, txn: lmdb.Transaction) -> None:
        ns, versions = self.vol.namespace, self.vol.versions
        for path, a, file in self.pending:
            if file is not None:
                got, tree, executable = file  # type: ignore[misc]
                v = versions.create(txn, EMPTY_VERSION, got.hashes, got.lengths, got.digest)
                a = dataclasses.replace(a, target=v.id)
                tree.files.append(RestoredFile(path, v.id, v.digest, v.size, executable))
            assert a is not None
            if not path:
                self.top = a
                continue
            made = ns.create(txn, self.dir_ids[path[:-1]], path[-1], a)
            if made.is_dir:
                self.dir_ids[path] = int(made.target)
        self.pending.clear()
        self.pending_bytes = 0

    def _finish(self, tree: RestoredTree, before_swap: BeforeSwap | None) -> None:
        self.batch.flush()
        tree.new_bytes = self.batch.new_bytes
        if self.swap_on is None:
            self._swap(tree, before_swap)
        else:
            self.swap_on(lambda: self._swap(tree, before_swap))

    def _swap(self, tree: RestoredTree, before_swap: BeforeSwap | None) -> None:
        """The one transaction that makes the staged tree visible."""
        ns = self.vol.namespace
        parent, name = list(self.dest[:-1]), self.dest[-1]
        with self.vol.store.write() as txn:
            self._flush(txn)  # the last batch (at most _BATCH_ENTRIES) with the swap
            _check_dest(self.vol, txn, self.dest, self.replace)
            dir_id = ns.make_dirs(txn, parent, self.uid, self.gid)
            if before_swap is not None:
                before_swap(txn, tree)
            if self.root is not None:
                ns.swap_root_into(txn, self.root, dir_id, name)
                self.root = None
            else:
                assert self.top is not None
                if ns.get(txn, dir_id, name) is not None:
                    ns.remove_tree(txn, dir_id, name)
                ns.create(txn, dir_id, name, self.top)


def _check_dest(vol: Volume, txn: lmdb.Transaction, dest: Sequence[bytes],
                replace: bool) -> None:
    """The destination's parents must be directories (or missing); it must not exist
    unless `replace`."""
    ns = vol.namespace
    a = ns.root(txn)
    for i, name in enumerate(dest):
        child = ns.get(txn, int(a.target), name)
        if child is None:
            return
        if i == len(dest) - 1:
            if not replace:
                raise ExistsError(f"{show_path(dest)}: already exists")
            return
        if not child.is_dir:
            raise NotADirectoryError_(f"{show_path(dest[: i + 1])}: not a directory")
        a = child


Verify = Callable[[NarHash], None]


def _check(stream: BinaryIO, source: str) -> NarHash:
    """Read a whole NAR, checking it; its hash."""
    checker = NarReader(stream, source)
    for _e in checker.entries():
        pass
    assert checker.hash is not None
    return checker.hash


@contextlib.contextmanager
def checked_nar(reader: BinaryIO, source: str, spool_dir: Path,
                verify: Verify | None = None) -> Iterator[BinaryIO]:
    """The NAR `reader` gives, checked whole before the caller reads it again.

    A NAR is only known good at its last byte, and a restore that met a fault late
    would have changed the store (fragments stored, ids taken) before it. So a seekable
    stream is read twice (check, then seek back); any other (a pipe, a decompressor) is
    copied to a temporary file in `spool_dir` while it is checked: disk, never memory.
    `verify(hash)` runs after the check, before anything is written: the place to
    compare NarHash and NarSize with what a narinfo promised.
    """
    try:
        start = reader.tell() if reader.seekable() else None
    except (AttributeError, OSError):
        start = None
    if start is not None:
        h = _check(reader, source)
        if verify is not None:
            verify(h)
        reader.seek(start)
        yield reader
        return
    with tempfile.TemporaryFile(dir=spool_dir, prefix="nar-spool-") as spool:
        h = _check(_Tee(reader, spool), source)  # type: ignore[arg-type]
        if verify is not None:
            verify(h)
        spool.seek(0)
        yield spool  # type: ignore[misc]


def restore_nar_into(vol: Volume, reader: BinaryIO, dest: Sequence[bytes], *,
                     replace: bool = False, source: str = "NAR",
                     verify: Verify | None = None,
                     before_swap: BeforeSwap | None = None,
                     progress: Progress | None = None,
                     canonical: bool = False,
                     swap_on: SwapOn | None = None) -> RestoredTree:
    """Unpack the NAR read from `reader` at the store path `dest`, atomically.

    The whole archive is checked first (see `checked_nar`: a pipe is spooled to a
    temporary file in the store's directory), so a malformed NAR, or a `verify(hash)`
    that raises, changes nothing in the store at all. Then the tree is built in a staging
    root and swapped in with one transaction: a fault after the check (the file changed
    under us, an I/O error, `before_swap` raising) leaves the namespace as it was (any
    fragments stored are unreferenced, and gc takes them). Missing parents of `dest` are
    made with the swap; `dest` itself must not exist unless `replace`.

    `before_swap(txn, tree)` runs inside the swap's write transaction, with `tree.nar`
    (NarHash and NarSize of what was read) and every file known: the place to record
    statements over the files, so that the tree and what is said about it appear
    together or not at all. Raising there adds nothing to the namespace.

    `source` names the archive in error messages. Regular files get mode 0644 (0755 if
    executable), directories 0755, the caller's uid and gid and the current time, as
    `nix-store --restore` would make them; with `canonical`, Nix's canonical metadata
    of a valid store path instead (files 0444 or 0555, directories 0555, times 1 s
    after the epoch), as Nix leaves a path it registers. `swap_on(f)` runs the final
    swap `f` (default: here).
    """
    dest = tuple(dest)
    if not dest:
        raise UsageError("the destination must be below the root, e.g. /nix/store/NAME")
    for name in dest:
        check_name(name)
    with vol.store.read() as txn:
        _check_dest(vol, txn, dest, replace)
    with checked_nar(reader, source, vol.store.path, verify) as stream:
        return _Restorer(vol, dest, replace, progress, canonical, swap_on).run(
            NarReader(stream, source), before_swap)


def restore_nar_host(reader: BinaryIO, dest: Path, *, source: str = "NAR") -> NarHash:
    """Unpack a NAR to the host path `dest` (which must not exist), as `nix-store --restore`
    does, but strictly: the archive is checked whole (see `checked_nar`) before anything
    is written, and it is built beside `dest` and renamed into place at the end.
    """
    if dest.exists() or dest.is_symlink():
        raise UsageError(f"{dest}: already exists")
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent}: no such directory")
    with checked_nar(reader, source, dest.parent) as stream:
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            top = staging / "top"
            r = NarReader(stream, source)
            for e in r.entries():
                host = top.joinpath(*(os.fsdecode(p) for p in e.path)) if e.path else top
                if e.kind == "directory":
                    host.mkdir(0o755)
                elif e.kind == "symlink":
                    os.symlink(e.target, host)
                else:
                    assert e.contents is not None
                    mode = 0o755 if e.executable else 0o644
                    fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                    with os.fdopen(fd, "wb") as f:
                        shutil.copyfileobj(e.contents, f, _READ)  # type: ignore[misc]
            os.rename(top, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    assert r.hash is not None
    return r.hash


class _Tee:
    """A stream that copies what is read from it to a file."""

    def __init__(self, src: BinaryIO, copy: BinaryIO) -> None:
        self._src, self._copy = src, copy

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self._copy.write(data)
        return data
