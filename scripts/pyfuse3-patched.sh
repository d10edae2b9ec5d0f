#!/usr/bin/env bash
# Build pyfuse3 3.5.0 with fallocate and lseek (SEEK_DATA/SEEK_HOLE) passed on to the
# filesystem, read replies sent without the GIL (from a list of buffers if given one), a
# request loop that reads the FUSE device before it waits on it (and polls it a little
# when idle), FileInfo.noflush, large read replies written by a thread of their own, and
# read replies checked against their fragments' hashes by that thread before they are
# written: the PyPI sdist, scripts/pyfuse3-fallocate-lseek.patch, -read-first.patch,
# -noflush.patch, -spin.patch, -reply-thread.patch and -checked-replies.patch, Cython
# from PyPI, and libfuse3-dev (both ops, fuse_reply_iov and fuse_file_info.noflush are
# in libfuse 3.14's lowlevel API). Idempotent: does nothing when the installed pyfuse3
# has every patch, as they are now. Without it annofs still works: the kernel then
# answers fallocate with EOPNOTSUPP and treats files as all data, reads are joined and
# checked by the loop before they are sent, every request costs a wait
# on the device first and a sleep in the event loop when none is queued, every close of
# a read-only file sends a FLUSH, and the loop writes every reply itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PATCHED='import pyfuse3, sys; sys.exit(0 if hasattr(pyfuse3.Operations, "lseek") and getattr(pyfuse3, "annofs_read_parts", False) and getattr(pyfuse3, "ANNOFS_READ_FIRST", False) and getattr(pyfuse3, "ANNOFS_NOFLUSH", False) and hasattr(pyfuse3, "annofs_set_spin") and hasattr(pyfuse3, "annofs_reply_thread_counts") and hasattr(pyfuse3, "annofs_set_reply_checker") else 1)'
# The patches' own digest, kept beside the build: a patch changed since (a fix to one
# already applied) rebuilds too, which the attributes above cannot tell.
stamp=.venv/.pyfuse3-patches
want=$(cat scripts/pyfuse3-*.patch | sha256sum | cut -d' ' -f1)
if "$PY" -c "$PATCHED" && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
ver=$("$PY" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))')
if [ "$ver" != 3.5.0 ]; then
  echo "setup: pyfuse3 $ver: the annofs patches are for 3.5.0, not applied" >&2
  exit 1
fi
echo "setup: building pyfuse3 3.5.0 with fallocate, lseek, GIL-free read replies, read-first, noflush, spin, reply thread and checked replies" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: pyfuse3==3.5.0 -d "$tmp"
tar xzf "$tmp/pyfuse3-3.5.0.tar.gz" -C "$tmp"
patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < scripts/pyfuse3-fallocate-lseek.patch
patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < scripts/pyfuse3-read-first.patch
patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < scripts/pyfuse3-noflush.patch
patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < scripts/pyfuse3-spin.patch
patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < scripts/pyfuse3-reply-thread.patch
patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < scripts/pyfuse3-checked-replies.patch
rm -f "$tmp/pyfuse3-3.5.0/src/pyfuse3/__init__.c"  # generated from the patched .pyx again
"$PY" -m pip install -q --no-deps --force-reinstall "$tmp/pyfuse3-3.5.0"
"$PY" -c "$PATCHED"
echo "$want" > "$stamp"
