#!/usr/bin/env bash
# Stage d over a grid, in one process that reads the graph once: gelutrace/pipeline.py's `sweep` (see --help).
#
#   ./d_batch_perturbation_calculate.sh [options] INPUT_GRAPH [OUTPUT_DIR]
#
# PYTHON=... picks the interpreter (default: .venv/bin/python beside this script, or python3).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m gelutrace.pipeline sweep "$@"
