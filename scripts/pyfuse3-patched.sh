#!/usr/bin/env bash
# Build pyfuse3 3.5.0 with fallocate and lseek (SEEK_DATA/SEEK_HOLE) passed on to the
# filesystem, and read replies sent without the GIL, from a list of buffers if given one:
# the PyPI sdist, scripts/pyfuse3-fallocate-lseek.patch, Cython from PyPI, and
# libfuse3-dev (both ops and fuse_reply_iov are in libfuse 3.14's lowlevel API).
# Idempotent: does nothing when the installed pyfuse3 has the patch already. Without it
# annofs still works: the kernel then answers fallocate with EOPNOTSUPP and treats files
# as all data, and reads are joined before they are sent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
patched='import pyfuse3, sys; sys.exit(0 if hasattr(pyfuse3.Operations, "lseek") and getattr(pyfuse3, "annofs_read_parts", False) else 1)'
if "$PY" -c "$patched"; then
  exit 0
fi
ver=$("$PY" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))')
if [ "$ver" != 3.5.0 ]; then
  echo "setup: pyfuse3 $ver: the fallocate/lseek patch is for 3.5.0, not applied" >&2
  exit 1
fi
echo "setup: building pyfuse3 3.5.0 with fallocate, lseek and GIL-free read replies" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: pyfuse3==3.5.0 -d "$tmp"
tar xzf "$tmp/pyfuse3-3.5.0.tar.gz" -C "$tmp"
patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < scripts/pyfuse3-fallocate-lseek.patch
rm -f "$tmp/pyfuse3-3.5.0/src/pyfuse3/__init__.c"  # generated from the patched .pyx again
"$PY" -m pip install -q --no-deps --force-reinstall "$tmp/pyfuse3-3.5.0"
"$PY" -c "$patched"
