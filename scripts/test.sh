#!/usr/bin/env bash
# Set up everything, then run the whole test suite (real FUSE mounts included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check annofs chunker benchmarks tests
exec python -m pytest -q "$@"
