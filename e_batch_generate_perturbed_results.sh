#!/usr/bin/env bash
# Stage e over every subset of a dataset: all .npy files in <DATASET_DIR>/perturbation_subsets/ plus the
# unperturbed baseline `none`, in one run (the model is loaded and the baseline generated once, and
# perturbation_results/summary.csv and summary.png compare them all).
#
#   ./e_batch_generate_perturbed_results.sh DATASET_DIR PROMPT_CSV [MODEL_TYPE] [extra flags...]
#
# MODEL_TYPE defaults to gpt2. Extra flags go to e_generate_perturbed_results.py unchanged, e.g.
#   ./e_batch_generate_perturbed_results.sh parcellation_datasets/test_1 parcellation_datasets/test_1.csv \
#       gpt2 --random_controls 5 --ablation mean --device cuda
# PYTHON=... picks the interpreter (default: .venv/bin/python beside this script, or python3).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
dataset="$1"; csv="$2"; shift 2
model=gpt2
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then model="$1"; shift; fi
if [ ! -d "$dataset" ]; then echo "error: dataset directory $dataset does not exist" >&2; exit 2; fi

subsets=()
if [ -d "$dataset/perturbation_subsets" ]; then
  while IFS= read -r -d '' f; do subsets+=("$(basename "$f")"); done \
    < <(find "$dataset/perturbation_subsets" -maxdepth 1 -type f -name '*.npy' -print0 | LC_ALL=C sort -z)
fi
if [ ${#subsets[@]} -eq 0 ]; then
  echo "note: no .npy subsets in $dataset/perturbation_subsets; running the baseline (none) only" >&2
fi
exec "$PYTHON" "$here/e_generate_perturbed_results.py" --dataset_path "$dataset" --input_csv "$csv" \
  --model_type "$model" --perturbation_subset_filenames "${subsets[@]}" none "$@"
