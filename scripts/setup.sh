#!/usr/bin/env bash
# Everything annofs needs on a fresh Debian machine: system packages, a virtual
# environment in .venv, the package itself. Idempotent; quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# fuse3/libfuse3-dev/pkg-config: pyfuse3 builds against libfuse3 and mounts with fusermount3.
# nix-bin: the real Nix, the oracle for NAR and narinfo tests. borgbackup, restic: the peers
# benchmarks compare against. xz-utils/zstd/bzip2: binary cache compressions. git: --git import.
# chromium: the real browser the dashboard's test drives (through PyPI's playwright).
# openssh-client: ssh-keygen signs SSHSIG statements and is the oracle for their tests.
# patch: applies scripts/pyfuse3-*.patch to the pyfuse3 sdist (scripts/pyfuse3-patched.sh).
# make: tests/t4_fuse_tools.py builds a small C project in the mount with it.
# stress-ng: filesystem stressors with verification run against the mount
# (tests/t4_fuse_stressng.py; pjdfstest, xfstests' fsx and LTP are not packaged).
# fuse-overlayfs: a FUSE filesystem in C, the floor benchmarks compare the mount with.
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv git nix-bin
              xz-utils zstd bzip2 borgbackup restic chromium stress-ng
              openssh-client patch make fuse-overlayfs)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # Another apt run (unattended-upgrades, a second setup) may hold dpkg's lock: wait for
  # it for up to ten minutes instead of failing at once with "Could not get lock".
  APT_WAIT=(-o DPkg::Lock::Timeout=600)
  $SUDO apt-get "${APT_WAIT[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${APT_WAIT[@]}" install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
# Reinstall only when pyproject.toml, setup.py or the C source (csrc/, built into
# annofs/content/_hashcheck*.so) changed since the last install, or the module is missing.
stamp=.venv/.annofs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] ||
   [ -n "$(find csrc -newer "$stamp" -print -quit)" ] ||
   ! compgen -G 'annofs/content/_hashcheck*.so' > /dev/null; then
  echo "setup: installing annofs and its dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
# pyfuse3 3.5.0 does not pass fallocate or lseek (SEEK_DATA/SEEK_HOLE) on: rebuilt from its
# sdist with a small patch (seconds to check, ~40 s to build once).
bash scripts/pyfuse3-patched.sh
