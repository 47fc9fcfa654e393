# Sourced by demo.sh and test.sh: create .venv if needed and install ray_cache with an extra.
# Usage: . scripts/_venv.sh EXTRA
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# pip compiles what it installs one file at a time; compileall does the same on every core
# (measured on 2 cores: 41 s + 37 s against 98 s), and the bytecode is there for every
# process the tests start, even where PYTHONDONTWRITEBYTECODE keeps them from writing it.
.venv/bin/python -m pip install --quiet --no-compile -e ".[$1]"
STAMP=".venv/.compiled-$1-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -e "$STAMP" ]; then  # some packages ship files that do not compile: not an error
    .venv/bin/python -m compileall -q -j 0 .venv/lib >/dev/null 2>&1 || true
    touch "$STAMP"
fi
