"""The one place where exceptions become errno values at the FUSE edge.

pyfuse3 ends its main loop on any exception other than FUSEError escaping a handler, and
the mount then answers ECONNABORTED forever. So every handler is wrapped: domain errors
become their errno; anything unexpected is logged with its traceback and becomes EIO,
and the mount lives on.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from annofs.errors import AnnofsError, CorruptionError

log = logging.getLogger("annofs.fs")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_handler(fn: F) -> F:
    """Wrap a FUSE handler so only FUSEError leaves it."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except CorruptionError as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except AnnofsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            log.exception("%s: unexpected OS error", fn.__name__)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s: unexpected error", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]
