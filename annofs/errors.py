"""Domain exceptions. Each carries a one-line, user-facing message.

`fs` maps them to an errno, `cli` to an exit status: one place each, so the same
mistake gives the same answer through the mount and on the command line.
"""

from __future__ import annotations

import errno


class AnnofsError(Exception):
    """Base of every error annofs raises on purpose; `str()` is the user's message."""

    errno: int = errno.EIO
    exit_status: int = 2


class NotBuiltError(ImportError):
    """annofs's C module (csrc/) is not built where annofs is imported from: a clone used
    without running scripts/setup.sh. An ImportError (the import fails), said by the
    command line in one line."""


class UsageError(AnnofsError):
    """Bad usage or bad input: the user can fix it; nothing was changed."""

    errno = errno.EINVAL


class NotFoundError(AnnofsError):
    errno = errno.ENOENT


class ExistsError(AnnofsError):
    errno = errno.EEXIST


class NotADirectoryError_(AnnofsError):
    errno = errno.ENOTDIR


class IsADirectoryError_(AnnofsError):
    errno = errno.EISDIR


class NotEmptyError(AnnofsError):
    errno = errno.ENOTEMPTY


class NameTooLongError(AnnofsError):
    errno = errno.ENAMETOOLONG


class InvalidOperationError(AnnofsError):
    """A rename into its own subtree, a hard link to a directory, and the like."""

    errno = errno.EINVAL


class CorruptionError(AnnofsError):
    """Stored bytes do not match their hash, or a record does not decode: never data."""

    errno = errno.EIO
    exit_status = 1


class StoreError(AnnofsError):
    """The store itself cannot be used: missing, wrong format, locked."""

    errno = errno.EIO


class RefusedError(AnnofsError):
    """Verification said no (no trusted signature, a hash that does not match): exit 1,
    and nothing was changed."""

    errno = errno.EACCES
    exit_status = 1
