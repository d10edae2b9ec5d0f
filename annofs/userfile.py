"""Reading a file the user named (a policy, a key, a list of statements): one set of
one-line errors for every way that can fail, so each command says it the same way."""

from __future__ import annotations

from pathlib import Path

from annofs.errors import UsageError


def read_user_file(path: Path, what: str) -> bytes:
    """The bytes of `path`, which should be a `what` ("policy file", "key file"...);
    UsageError naming the file and the problem."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the {what} ({e.strerror})") from None
