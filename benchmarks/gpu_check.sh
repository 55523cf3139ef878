#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py: training of the GPU presets and archive embedding on one CUDA device).
# Usage: benchmarks/gpu_check.sh [work folder]; the environment settings are in the module's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PYTHONUNBUFFERED=1 exec "$PY" -m benchmarks.gpu_check "$@"
