#!/usr/bin/env bash
# Install everything the tests need into .venv and run the whole suite.
# Servers (S3, Azure, GCS emulators) are started by the tests themselves, on loopback.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# Azurite (the Azure emulator some tests start; it needs only Node and npm) installs while pip
# works: the same prefix and version ray_cache.testing.azurite.ensure_azurite would use, which
# installs it itself if this did not.
AZ_DIR="${RAY_CACHE_AZURITE_DIR:-$PWD/.cache/azurite}"
AZ_VERSION="$(sed -n 's/^AZURITE_VERSION = "\(.*\)"$/\1/p' ray_cache/testing/azurite.py)"
AZ_PID=""
if [ ! -x "$AZ_DIR/node_modules/.bin/azurite-blob" ] && command -v npm >/dev/null; then
    mkdir -p "$AZ_DIR"
    npm install --prefix "$AZ_DIR" "azurite@$AZ_VERSION" --no-audit --no-fund --loglevel=error \
        </dev/null >"$AZ_DIR/install.log" 2>&1 &
    AZ_PID=$!
fi
. scripts/_venv.sh test
if [ -n "$AZ_PID" ]; then
    wait "$AZ_PID" || echo "npm install of Azurite failed here (see $AZ_DIR/install.log); the tests will try again" >&2
fi
exec .venv/bin/python -m pytest "$@"
