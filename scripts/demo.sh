#!/usr/bin/env bash
# The main job: set up, create a demo store, import a sample tree, change a file and
# import again, show its history and the diff; sign the tree, mount it with an enforcing
# policy, and show an allowed read, a refused read and why it was refused.
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

say "sign the tree: one statement over every file, with a key in Nix's format"
mkdir -p -m 700 "$DEMO/keys"
annofs key generate alice-1 --dir "$DEMO/keys"
annofs sign --key "$DEMO/keys/alice-1.secret" /src/sample
cat > "$DEMO/policy.toml" <<'TOML'
mode = "enforce"
default = "allow"
trusted-keys-dir = "keys"

[[rules]]
path = "/src/**"
signers = 1
TOML
annofs policy check "$DEMO/policy.toml"

say "annofs mount --policy: every open with read access is judged"
annofs mount --policy "$DEMO/policy.toml" "$MNT"
echo "allowed, signed by alice-1:"
head -3 "$MNT/src/sample/__init__.py"

say "patch one file through the mount, then read it"
echo "# an unreviewed change" >> "$MNT/src/sample/errors.py"
if cat "$MNT/src/sample/errors.py" > /dev/null 2>"$DEMO/err"; then
  echo "unexpected: the patched file was readable" >&2; exit 1
fi
echo "refused: $(cat "$DEMO/err")"
echo "why (the user.annofs.why xattr, readable even though open is refused):"
python3 -c 'import os, sys; print(os.getxattr(sys.argv[1], "user.annofs.why").decode())' \
  "$MNT/src/sample/errors.py"
echo "its siblings still read: $(head -1 "$MNT/src/sample/volume.py")"

say "annofs events: the refusal on record"
annofs events --why

say "annofs umount; the store passes fsck"
annofs umount "$MNT"
annofs fsck
echo
echo "demo store left at $ANNOFS_STORE"
