"""Type stub of the C module built from csrc/hashcheck.c (see csrc/README.md)."""

from collections.abc import Sequence
from typing import Any

# A capsule of long verify_iov(const struct iovec *, const unsigned char *hashes, size_t n),
# named "annofs.verify_iov": pyfuse3.annofs_set_reply_checker takes it (the replier
# thread checks a reply's fragments with it, without the GIL).
VERIFY_IOV: Any

# Any object with the buffer protocol is taken (zstandard's segments too);
# collections.abc.Buffer would say so, from Python 3.12 on.
def first_mismatch(datas: Sequence[bytes | bytearray | memoryview],
                   hashes: Sequence[bytes]) -> int:
    """The index of the first of `datas` whose BLAKE3 hash is not the 32 bytes at the same
    index of `hashes`, or -1 if all match; hashed without the GIL from 64 KiB in all.
    ValueError if the lengths differ or a hash is not 32 bytes; TypeError for a datum
    without the buffer protocol."""
