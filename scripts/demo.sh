#!/usr/bin/env bash
# The main job: set up, create a demo store, import a sample tree, change a file and
# import again, show its history and the diff, then mount the store and read it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

DEMO=${DEMO_DIR:-$(mktemp -d /tmp/annofs-demo.XXXXXX)}
export ANNOFS_STORE="$DEMO/store"
MNT="$DEMO/mnt"
SRC="$DEMO/sample"
mkdir -p "$MNT"
cleanup() { mountpoint -q "$MNT" && annofs umount "$MNT" || true; }
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "a sample source tree: this project's own annofs/ package"
cp -a annofs "$SRC"
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +

say "annofs init; annofs import (first import reads every file)"
annofs init
annofs import "$SRC" /src/sample

say "change one line, import again (only the changed file is read)"
sed -i 's/^__version__ = .*/__version__ = "0.1.0+demo"/' "$SRC/__init__.py"
annofs import "$SRC" /src/sample

say "annofs log /src/sample/__init__.py: the file's versions along the edit graph"
annofs log /src/sample/__init__.py

say "annofs diff: the previous version against the current one"
prev=$(annofs log /src/sample/__init__.py | sed -n 2p | awk '{print $1}')
annofs diff "/src/sample/__init__.py@$prev" /src/sample/__init__.py

say "annofs mount $MNT; read through the mount"
annofs mount "$MNT"
ls -l "$MNT/src/sample" | head -8
head -3 "$MNT/src/sample/__init__.py"
echo "written through the mount" > "$MNT/src/sample/NOTE.txt"
cat "$MNT/src/sample/NOTE.txt"

say "annofs umount; the store passes fsck"
annofs umount "$MNT"
annofs fsck
echo
echo "demo store left at $ANNOFS_STORE"
