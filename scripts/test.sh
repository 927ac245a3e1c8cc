#!/usr/bin/env bash
# Sets up and runs the whole test suite. Needs PostgreSQL on 127.0.0.1:5432
# (user postgres, trust auth) and Redis on 127.0.0.1:6379.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh local,dev
exec .venv/bin/python -m pytest "$@"
