#!/usr/bin/env bash
# Build pyfuse3 3.5.0 with fallocate and lseek (SEEK_DATA/SEEK_HOLE) passed on to the
# filesystem, read replies sent without the GIL (from a list of buffers if given one), and
# a request loop that reads the FUSE device before it waits on it: the PyPI sdist,
# scripts/pyfuse3-fallocate-lseek.patch and scripts/pyfuse3-read-first.patch, Cython from
# PyPI, and libfuse3-dev (both ops and fuse_reply_iov are in libfuse 3.14's lowlevel API).
# Idempotent: does nothing when the installed pyfuse3 has both patches already. Without
# it annofs still works: the kernel then answers fallocate with EOPNOTSUPP and treats
# files as all data, reads are joined before they are sent, and every request costs a
# wait on the device first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PATCHED='import pyfuse3, sys; sys.exit(0 if hasattr(pyfuse3.Operations, "lseek") and getattr(pyfuse3, "annofs_read_parts", False) and getattr(pyfuse3, "ANNOFS_READ_FIRST", False) else 1)'
if "$PY" -c "$PATCHED"; then
  exit 0
fi
ver=$("$PY" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))')
if [ "$ver" != 3.5.0 ]; then
  echo "setup: pyfuse3 $ver: the fallocate/lseek and read-first patches are for 3.5.0, not applied" >&2
  exit 1
fi
echo "setup: building pyfuse3 3.5.0 with fallocate, lseek, GIL-free read replies and read-first" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: pyfuse3==3.5.0 -d "$tmp"
tar xzf "$tmp/pyfuse3-3.5.0.tar.gz" -C "$tmp"
patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < scripts/pyfuse3-fallocate-lseek.patch
patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < scripts/pyfuse3-read-first.patch
rm -f "$tmp/pyfuse3-3.5.0/src/pyfuse3/__init__.c"  # generated from the patched .pyx again
"$PY" -m pip install -q --no-deps --force-reinstall "$tmp/pyfuse3-3.5.0"
"$PY" -c "$PATCHED"
