#!/usr/bin/env bash
# Install everything the tests need into .venv and run the whole suite.
# Servers (S3, Azure, GCS emulators) are started by the tests themselves, on loopback.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
. "$(dirname "$0")/_venv.sh" test
exec .venv/bin/python -m pytest "$@"
