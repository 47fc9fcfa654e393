#!/usr/bin/env bash
# Install ray_cache into .venv and run the demo: a local S3 server, a synthetic data set,
# read directly, through a cold cache and through the warm cache.
# Usage: scripts/demo.sh [--rows N] [--files N] [--latency-ms MS] [--rate-mb-s MB]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[demo]"
exec .venv/bin/python -m ray_cache.demo "$@"
