#!/usr/bin/env bash
# Install ray_cache into .venv and run the demo: a local S3 server, a synthetic data set,
# read directly, through a cold cache and through the warm cache.
# Usage: scripts/demo.sh [--rows N] [--files N] [--latency-ms MS] [--rate-mb-s MB]
set -euo pipefail
. "$(dirname "$0")/_venv.sh" demo
exec .venv/bin/python -m ray_cache.demo "$@"
