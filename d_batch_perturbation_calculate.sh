#!/usr/bin/env bash
# Stage d over a grid: every threshold x ratio x method x weight, one subset .npy (+ sidecar .json) each, named
# {m}_{method}_t{threshold}_r{ratio}.npy ({m}_{method}_{weight}_t{threshold}_r{ratio}.npy for a weight other
# than count; {m}_{method}_r{ratio}.npy, once per ratio, for the methods that use no graph), then a summary table.
# With --ks, sizes k instead of ratios (..._k{k}.npy). Each method, weight and threshold is ranked once: its
# subsets at growing k are prefixes of one ranking.
#
#   ./d_batch_perturbation_calculate.sh [options] INPUT_GRAPH [OUTPUT_DIR]
#
# INPUT_GRAPH: c_analyze's *_analyzed.json / *_analyzed.gpickle (or a store / .gpickle from stage c).
# OUTPUT_DIR:  default <dataset>/perturbation_subsets, where <dataset> is the directory holding
#              weighted_graph_analysis/ (or the graph's own directory).
# Options (or environment variables):
#   --thresholds "0.5 0.7 0.8 0.9"   THRESHOLDS
#   --ratios "0.01 0.02 0.05 0.1"    RATIOS
#   --ks "3 10 30 100"               KS: numbers of neurons instead of ratios (used when set)
#   --methods "degree"               METHODS (degree weighted_degree pagerank activation_count attribution
#                                    ablation random)
#   --weights "count"                WEIGHTS (count jaccard phi pmi; see d_calculate_perturbation_subset.py
#                                    --help); a method that ignores the weight (all but degree,
#                                    weighted_degree, pagerank) writes one subset, listed once
#   --seed N                         SEED (for random; default 1337)
#   --force                          FORCE=1: recompute subsets that already exist (default: skip them)
#   PYTHON=...                       the interpreter (default: .venv/bin/python beside this script, or python3)
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
THRESHOLDS="${THRESHOLDS:-0.5 0.7 0.8 0.9}"
RATIOS="${RATIOS:-0.01 0.02 0.05 0.1}"
KS="${KS:-}"
METHODS="${METHODS:-degree}"
WEIGHTS="${WEIGHTS:-count}"
SEED="${SEED:-1337}"
FORCE="${FORCE:-0}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
need() {  # FLAG [VALUE]: a flag's value, refused when it is missing or empty
  if [ $# -lt 2 ] || [ -z "$2" ]; then echo "error: $1 needs a value (see --help)" >&2; exit 2; fi
}
pos=()
while [ $# -gt 0 ]; do
  case "$1" in
    --thresholds) need "$@"; THRESHOLDS="$2"; shift 2 ;;
    --ratios) need "$@"; RATIOS="$2"; shift 2 ;;
    --ks) need "$@"; KS="$2"; shift 2 ;;
    --methods) need "$@"; METHODS="$2"; shift 2 ;;
    --weights) need "$@"; WEIGHTS="$2"; shift 2 ;;
    --seed) need "$@"; SEED="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) pos+=("$1"); shift ;;
  esac
done
if [ ${#pos[@]} -lt 1 ] || [ ${#pos[@]} -gt 2 ]; then
  echo "error: expected INPUT_GRAPH [OUTPUT_DIR] (see --help)" >&2; exit 2
fi
graph="${pos[0]}"
if [ ! -e "$graph" ]; then echo "error: input graph $graph does not exist" >&2; exit 2; fi
if [ ${#pos[@]} -eq 2 ]; then
  out="${pos[1]}"
else
  gdir="$(cd "$(dirname "$graph")" && pwd)"
  if [ "$(basename "$gdir")" = "weighted_graph_analysis" ]; then gdir="$(dirname "$gdir")"; fi
  out="$gdir/perturbation_subsets"
fi
skip=(--skip_existing)
[ "$FORCE" = "1" ] && skip=()

files=() status=() failed=0
# word splitting wanted: one argument per value
if [ -n "$KS" ]; then size=(--k $KS); else size=(--ratio $RATIOS); fi
declare -A seen=()
for method in $METHODS; do
  case "$method" in degree|weighted_degree|pagerank) ts="$THRESHOLDS" ;; *) ts="-" ;; esac
  for weight in $WEIGHTS; do
    for t in $ts; do
      thr=(--threshold "$t")
      [ "$t" = "-" ] && thr=()
      log="$("$PYTHON" "$here/d_calculate_perturbation_subset.py" --input_graph_path "$graph" "${thr[@]}" \
             "${size[@]}" --method "$method" --weight "$weight" --seed "$SEED" --output_dir "$out" \
             "${skip[@]}" 2>&1)"
      rc=$?
      if [ $rc -ne 0 ]; then
        echo "[$method $weight t=$t] $(printf '%s\n' "$log" | tail -n 1)"
        failed=$((failed + 1)); status+=("FAILED")
        files+=("$out/(failed: $method $weight t=$t)")
        continue
      fi
      while IFS= read -r line; do
        case "$line" in wrote*|skipped*) ;; *) continue ;; esac
        echo "[$method $weight t=$t] $line"
        f="$(printf '%s\n' "$line" | sed -E 's/^(wrote|skipped) (.*\.npy) \(.*/\2/')"
        # a method that ignores the weight names its subset without it: the same file for every weight
        [ -n "${seen[$f]:-}" ] && continue
        seen[$f]=1
        files+=("$f")
        case "$line" in skipped*) status+=("skipped") ;; *) status+=("written") ;; esac
      done <<< "$log"
    done
  done
done

echo
echo "summary ($out):"
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "${#files[@]}" "${files[@]}" "${status[@]}" <<'PY'
import sys
n = int(sys.argv[1]); files, status = sys.argv[2:2 + n], sys.argv[2 + n:]
from gelutrace.selection.methods import summary_table
df = summary_table(files)
df.insert(1, "status", status)
print(df.to_string(index=False))
PY
[ $failed -eq 0 ] || { echo "error: $failed of ${#files[@]} subsets failed" >&2; exit 1; }
