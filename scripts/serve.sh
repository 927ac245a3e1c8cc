#!/usr/bin/env bash
# Sets up and starts chathub on the embedded defaults (SQLite, in-process bus,
# local SmolLM2 model) at http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh local
exec .venv/bin/chathub serve "$@"
