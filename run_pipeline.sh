#!/usr/bin/env bash
# The whole pipeline, a -> b -> ... -> e -> neuron cards -> report: gelutrace/pipeline.py's `run` (see --help).
#
#   ./run_pipeline.sh [options] [MODEL] [PROMPT_CSV] [DATASET_DIR]
#
# PYTHON=... picks the interpreter (default: .venv/bin/python beside this script, or python3).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m gelutrace.pipeline run "$@"
