#!/usr/bin/env bash
# The whole pipeline, a -> b -> (single-neuron effects) -> c -> (edge fidelity) -> c_analyze -> d (a sweep of
# selection methods) -> e (baseline, random controls, on held-out prompts) -> neuron cards -> report, which opens with
# the method comparison.
#
#   ./run_pipeline.sh [options] [MODEL] [PROMPT_CSV] [DATASET_DIR]
#
# MODEL        hub name (gpt2 ... gpt2-xl), shipped model or checkpoint directory (default: tinybard)
# PROMPT_CSV   prompts,number_of_new_tokens,num_samples (default: parcellation_datasets/test_1.csv)
# DATASET_DIR  where every stage writes (default: parcellation_datasets/<csv name>_<model name>)
# Options (or environment variables):
#   --device auto|cpu|cuda|mps      DEVICE (default auto)
#   --temperature T                 TEMPERATURE for stage b (default 0: greedy)
#   --seed N                        SEED for stage b (default 42; stage e uses 1337 as the original)
#   --thresholds "0.5 0.8"          THRESHOLDS of the stage-d sweep
#   --ks "0.1% 1% 30 ..."           KS: the k grid of the stage-d sweep and stage e's dose-response, each a count
#                                   or a percentage of the neurons (default: 8 values log-spaced from 0.1 % to
#                                   10 %: 0.1% 0.193% 0.373% 0.72% 1.39% 2.68% 5.18% 10%)
#   --ratios "0.01 0.05"            RATIOS: fractions of the neurons instead of --ks (the original's sweep)
#   --methods "degree ..."          METHODS of the stage-d sweep (default: degree activation_count attribution
#                                   random, plus influence with --direct_edges 1 and ablation when single-neuron
#                                   effects are measured)
#   --weights "count"               WEIGHTS: edge weights of the graph methods (count jaccard phi pmi direct
#                                   direct_abs; default count, plus direct_abs with --direct_edges 1)
#   --direct_edges 0|1              DIRECT_EDGES: stage b also measures the causal edge weights (direct,
#                                   direct_abs) and each neuron's direct_loss (default 1)
#   --effects 0|1                   EFFECTS: measure every neuron's single-ablation effect (ground truth for
#                                   the comparison, and the ablation method); default 1 for a shipped model
#                                   (models/), 0 otherwise (GPT-2 small: 36,864 ablations, GPU advised); with
#                                   --text default 0, and measured on the corpus's real next tokens
#   --effect_tokens N               EFFECT_TOKENS: with --text --effects 1, the corpus tokens each neuron's
#                                   effect is measured on (default 2000; a forward pass over them per neuron)
#   --fidelity_tokens N             FIDELITY_TOKENS: with --direct_edges 1, the scored positions the edge
#                                   fidelity's ablations are measured on (default 2048)
#   --text PATH                     TEXT: corpus mode: stages b-d read this text (a .txt/.jsonl file, gzip or zstd
#                                   compressed, .parquet, a datasets.save_to_disk directory, or a directory of them)
#                                   teacher-forced instead of generating for PROMPT_CSV; stage c is then not
#                                   needed (stage b writes the graph store) and stage e measures on EVAL_CSV.
#                                   Stage b runs as two shards (DATASET_DIR_shards/0 and /1, the halves whose
#                                   selections stage e compares) merged exactly into DATASET_DIR, with
#                                   --attribution (the real next token's NLL the objective)
#   --text_field NAME               TEXT_FIELD: the field of TEXT's .jsonl/.parquet/Arrow records holding the text
#                                   (default text)
#   --eval_csv CSV                  EVAL_CSV: prompts stage e measures the effects on (default
#                                   parcellation_datasets/heldout_<model name>.csv when it exists, else PROMPT_CSV)
#   --eval_text PATH                EVAL_TEXT: held-out text stage e measures the effects on (teacher-forced
#                                   next-token loss; the verdict's metric) (default
#                                   parcellation_datasets/heldout_eval_<model name>.txt when it exists; "none":
#                                   no real-text evaluation)
#   --eval_text_field NAME          EVAL_TEXT_FIELD: the same for EVAL_TEXT (default text)
#   --eval_tokens N                 EVAL_TOKENS: tokens of EVAL_TEXT scored (default 8000 for a shipped model,
#                                   100000 otherwise)
#   --random_controls N             RANDOM_CONTROLS in stage e: layer-matched random subsets for each k's winner
#                                   (chosen on the validation part), the null of every claim against random and
#                                   of the dose-response band (default 30; p >= 1/(N+1), no claim below 20)
#   --control_subsets all|best      CONTROL_SUBSETS: which subsets get them (default best: each k's winner)
#   --modules_top N                 MODULES_TOP: c_find_modules finds modules of the count graph (and of
#                                   direct_abs with --direct_edges 1); stage e ablates the N largest of each
#                                   (default 1; 0: find modules, ablate none)
#   --module_controls N             MODULE_CONTROLS: layer-matched and effect-weighted controls of each module
#                                   (N of each; default 20, the fewest that allow p < 0.05)
#   --force                         rerun every stage even if its outputs are up to date
# A stage is skipped when its outputs exist and were made by the same command (recorded in
# DATASET_DIR/.pipeline/) from inputs that have not changed since (a text's files read through their symlinks);
# once a stage runs, all later ones do. Every flag, the texts and DATASET_DIR are checked before the first stage;
# the run then holds DATASET_DIR's lock until it ends (a second run into it is refused before it changes anything).
# The stages a-e, c_find_modules and the cards run in this order:
#   a -> b -> effects -> c -> fidelity -> c_analyze -> modules -> d -> e -> cards -> report
# Ends with DATASET_DIR/report.md and a short summary on the terminal.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEVICE="${DEVICE:-auto}"
TEMPERATURE="${TEMPERATURE:-0.0}"
SEED="${SEED:-42}"
THRESHOLDS="${THRESHOLDS:-0.5 0.8}"
RATIOS="${RATIOS:-}"
KS="${KS:-}"
EVAL_TEXT="${EVAL_TEXT:-}"
EVAL_TOKENS="${EVAL_TOKENS:-}"
EFFECT_TOKENS="${EFFECT_TOKENS:-2000}"
FIDELITY_TOKENS="${FIDELITY_TOKENS:-2048}"
CONTROL_SUBSETS="${CONTROL_SUBSETS:-best}"
METHODS="${METHODS:-}"
DIRECT_EDGES="${DIRECT_EDGES:-1}"
WEIGHTS="${WEIGHTS:-}"
EFFECTS="${EFFECTS:-auto}"
EVAL_CSV="${EVAL_CSV:-}"
TEXT="${TEXT:-}"
TEXT_FIELD="${TEXT_FIELD:-}"
EVAL_TEXT_FIELD="${EVAL_TEXT_FIELD:-}"
RANDOM_CONTROLS="${RANDOM_CONTROLS:-30}"
MODULES_TOP="${MODULES_TOP:-1}"
MODULE_CONTROLS="${MODULE_CONTROLS:-20}"
FORCE="${FORCE:-0}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
driver() {  # gelutrace.driver: the checks before the first stage, the stamps' digests, the lock (paths as given)
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
    'from gelutrace.cli import run_main; from gelutrace.driver import main; run_main(main)' "$@"
}
need() {  # FLAG [VALUE]: a flag's value, refused when it is missing or empty
  if [ $# -lt 2 ] || [ -z "$2" ]; then echo "error: $1 needs a value (see --help)" >&2; exit 2; fi
}
pos=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) need "$@"; DEVICE="$2"; shift 2 ;;
    --temperature) need "$@"; TEMPERATURE="$2"; shift 2 ;;
    --seed) need "$@"; SEED="$2"; shift 2 ;;
    --thresholds) need "$@"; THRESHOLDS="$2"; shift 2 ;;
    --ratios) need "$@"; RATIOS="$2"; shift 2 ;;
    --ks) need "$@"; KS="$2"; shift 2 ;;
    --eval_text) need "$@"; EVAL_TEXT="$2"; shift 2 ;;
    --eval_tokens) need "$@"; EVAL_TOKENS="$2"; shift 2 ;;
    --control_subsets) need "$@"; CONTROL_SUBSETS="$2"; shift 2 ;;
    --methods) need "$@"; METHODS="$2"; shift 2 ;;
    --weights) need "$@"; WEIGHTS="$2"; shift 2 ;;
    --direct_edges) need "$@"; DIRECT_EDGES="$2"; shift 2 ;;
    --effects) need "$@"; EFFECTS="$2"; shift 2 ;;
    --effect_tokens) need "$@"; EFFECT_TOKENS="$2"; shift 2 ;;
    --fidelity_tokens) need "$@"; FIDELITY_TOKENS="$2"; shift 2 ;;
    --eval_csv) need "$@"; EVAL_CSV="$2"; shift 2 ;;
    --text) need "$@"; TEXT="$2"; shift 2 ;;
    --text_field) need "$@"; TEXT_FIELD="$2"; shift 2 ;;
    --eval_text_field) need "$@"; EVAL_TEXT_FIELD="$2"; shift 2 ;;
    --random_controls) need "$@"; RANDOM_CONTROLS="$2"; shift 2 ;;
    --modules_top) need "$@"; MODULES_TOP="$2"; shift 2 ;;
    --module_controls) need "$@"; MODULE_CONTROLS="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n "2,/^set -euo/p" "$0" | sed "\$d" | sed "s/^# \\{0,1\\}//"; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) pos+=("$1"); shift ;;
  esac
done
[ ${#pos[@]} -le 3 ] || { echo "error: expected at most MODEL PROMPT_CSV DATASET_DIR (see --help)" >&2; exit 2; }
# the flags' form, before anything runs
[ -n "$RATIOS" ] && [ -n "$KS" ] && { echo "error: give --ks or --ratios, not both" >&2; exit 2; }
for flag in EFFECT_TOKENS:--effect_tokens FIDELITY_TOKENS:--fidelity_tokens RANDOM_CONTROLS:--random_controls MODULES_TOP:--modules_top MODULE_CONTROLS:--module_controls; do
  var="${flag%%:*}"; v="${!var}"; name="${flag#*:}"
  [[ "$v" =~ ^[0-9]+$ ]] || { echo "error: $name must be a whole number, got '$v'" >&2; exit 2; }
done
for flag in EFFECT_TOKENS:--effect_tokens FIDELITY_TOKENS:--fidelity_tokens; do
  var="${flag%%:*}"; [[ "${!var}" =~ ^0*$ ]] && { echo "error: ${flag#*:} must be at least 1" >&2; exit 2; }
done
case "$CONTROL_SUBSETS" in all|best) ;; *) echo "error: --control_subsets must be all or best, got '$CONTROL_SUBSETS'" >&2; exit 2 ;; esac
MODEL="${pos[0]:-tinybard}"
CSV="${pos[1]:-$here/parcellation_datasets/test_1.csv}"
[ -f "$CSV" ] || { echo "error: prompt CSV $CSV does not exist" >&2; exit 2; }
# the file prefix {m} and whether MODEL is a shipped model, in one interpreter start that first checks DEVICE and
# the form of every flag given (all of them, resolved and together, before the lock below)
names="$(cd "$here" && driver names "$MODEL" "$DEVICE" --thresholds="$THRESHOLDS" \
  --ratios="$RATIOS" --ks="$KS" --methods="$METHODS" --weights="$WEIGHTS" --temperature="$TEMPERATURE" \
  --seed="$SEED" --eval_tokens="$EVAL_TOKENS")" || exit 2
shipped="${names%% *}" m="${names#* }"
if [ -n "$TEXT" ]; then
  [ -e "$TEXT" ] || { echo "error: text $TEXT does not exist" >&2; exit 2; }
  TEXT="$(cd "$(dirname "$TEXT")" && pwd)/$(basename "$TEXT")"
  DATA="${pos[2]:-$here/parcellation_datasets/$(basename "${TEXT%.*}")_$m}"
  [ "$EFFECTS" = auto ] && EFFECTS=0  # on real text every neuron costs a forward pass over EFFECT_TOKENS
  if [ -z "$METHODS" ]; then
    METHODS="degree activation_count attribution random"  # stage b --attribution
    [ "$DIRECT_EDGES" = 1 ] && METHODS="degree influence activation_count attribution random"
    [ "$EFFECTS" = 1 ] && METHODS="$METHODS ablation"
  fi
else
  DATA="${pos[2]:-$here/parcellation_datasets/$(basename "$CSV" .csv)_$m}"
fi
if [ "$EFFECTS" = auto ]; then
  case "$shipped" in 1) EFFECTS=1 ;; *) EFFECTS=0 ;; esac
fi
[ -z "$RATIOS" ] && [ -z "$KS" ] && KS="0.1% 0.193% 0.373% 0.72% 1.39% 2.68% 5.18% 10%"
# the counts against the model's neurons after stage a (their form, with every flag, before any stage runs)
ks_counts() {  # GRAPH_META|- SPEC...: the grid as counts (with "-": only check the values)
  (cd "$here" && "$PYTHON" -c 'import json, sys
from gelutrace import PipelineError
from gelutrace.selection.methods import k_values
try:
    n = None if sys.argv[1] == "-" else json.load(open(sys.argv[1]))["num_neurons"]
    print(" ".join(map(str, k_values(n, sys.argv[2:]))))
except PipelineError as e:
    sys.exit(f"error: {e}")' "$@")
}
if [ -z "$EVAL_TEXT" ]; then
  EVAL_TEXT=none
  [ -f "$here/parcellation_datasets/heldout_eval_$m.txt" ] && EVAL_TEXT="$here/parcellation_datasets/heldout_eval_$m.txt"
fi
[ "$EVAL_TEXT" = none ] || [ -e "$EVAL_TEXT" ] || { echo "error: evaluation text $EVAL_TEXT does not exist" >&2; exit 2; }
if [ -z "$EVAL_TOKENS" ]; then
  case "$shipped" in 1) EVAL_TOKENS=8000 ;; *) EVAL_TOKENS=100000 ;; esac
fi
case "$EFFECTS" in 0|1) ;; *) echo "error: --effects must be 0 or 1, got $EFFECTS" >&2; exit 2 ;; esac
case "$DIRECT_EDGES" in 0|1) ;; *) echo "error: --direct_edges must be 0 or 1, got $DIRECT_EDGES" >&2; exit 2 ;; esac
direct=()
[ "$DIRECT_EDGES" = 1 ] && direct=(--direct_edges)
text_field=() eval_text_field=()
[ -n "$TEXT_FIELD" ] && text_field=(--text_field "$TEXT_FIELD")
[ -n "$EVAL_TEXT_FIELD" ] && eval_text_field=(--text_field "$EVAL_TEXT_FIELD")
[ -n "$TEXT_FIELD" ] && [ -z "$TEXT" ] && { echo "error: --text_field needs --text" >&2; exit 2; }
[ -n "$EVAL_TEXT_FIELD" ] && [ "$EVAL_TEXT" = none ] &&
  { echo "error: --eval_text_field needs an evaluation text" >&2; exit 2; }
if [ -z "$WEIGHTS" ]; then
  WEIGHTS="count"
  [ "$DIRECT_EDGES" = 1 ] && WEIGHTS="count direct_abs"
fi
if [ -z "$METHODS" ]; then
  METHODS="degree activation_count attribution random"
  [ "$DIRECT_EDGES" = 1 ] && METHODS="degree influence activation_count attribution random"
  [ "$EFFECTS" = 1 ] && METHODS="$METHODS ablation"
fi
if [ -z "$EVAL_CSV" ]; then
  EVAL_CSV="$CSV"
  [ -f "$here/parcellation_datasets/heldout_$m.csv" ] && EVAL_CSV="$here/parcellation_datasets/heldout_$m.csv"
fi
[ -f "$EVAL_CSV" ] || { echo "error: evaluation CSV $EVAL_CSV does not exist" >&2; exit 2; }
# every flag and the output directory, before anything runs or is created; the digests of what the stages read
# (the CSV's, or the sha256 of each file the text is read from, through its symlinks; then the evaluation's)
sums="$(driver check --data="$DATA" --csv="$CSV" --eval_csv="$EVAL_CSV" \
  --thresholds="$THRESHOLDS" --ratios="$RATIOS" --ks="$KS" --methods="$METHODS" --weights="$WEIGHTS" \
  --direct_edges="$DIRECT_EDGES" --effects="$EFFECTS" --temperature="$TEMPERATURE" --seed="$SEED" \
  --eval_tokens="$EVAL_TOKENS" --text="$TEXT" --eval_text="$EVAL_TEXT")" || exit 2
csv_sum="${sums%%$'\n'*}" eval_sum="${sums#*$'\n'}"
# DATA's writer lock, held on descriptor 9 until the driver ends: a second run into DATA is refused here, before
# it changes anything; the stages inherit the descriptor (GELUTRACE_LOCK_FD), and so share the lock
mkdir -p "$DATA"
exec 9>>"$DATA/.gelutrace.lock"
driver lock 9 "$DATA" || exit 2
export GELUTRACE_LOCK_FD=9
mkdir -p "$DATA/.pipeline"
# every command a stage runs goes into DATA/.pipeline/STAGE.run, for the report to list: a stage that is a shell
# function runs several
stage_log=
log_command() {
  if [ -n "$stage_log" ]; then local c; c="$(printf '%q ' "$@")"; printf '%s\n' "${c% }" >> "$stage_log"; fi
}
py() { log_command python "$@"; "$PYTHON" "$@"; }
ran=0

# stage NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists and was made by the same command
stage() {
  local name="$1" out="$2"; shift 2
  local stamp="$DATA/.pipeline/$name.cmd" cmd
  cmd="$(printf '%q ' "$@")"
  cmd="${cmd/#py /python }"
  local want="$cmd"
  case "$name" in b|effects) want="$cmd# csv $csv_sum" ;; e) want="$cmd# csv $csv_sum $eval_sum" ;; esac
  if [ "$FORCE" != 1 ] && [ "$ran" = 0 ] && [ -e "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "== $name: up to date ($out)"
    return
  fi
  echo "== $name"
  rm -f "$stamp" "$DATA/.pipeline/$name.run"
  local t0=$SECONDS
  stage_log="$DATA/.pipeline/$name.run"
  "$@"
  stage_log=
  printf '%s\n' "$want" > "$stamp"
  echo "== $name: done in $((SECONDS - t0)) s"
  ran=1
}

cd "$here"
stage a "$DATA/${m}_graph_meta.json" \
  py a_generate_gelu_graph.py --model_type "$MODEL" --output_dir "$DATA"
sizes=(RATIOS="$RATIOS")
if [ -n "$KS" ]; then  # counts, from the percentages and the graph's number of neurons
  # shellcheck disable=SC2086
  counts="$(ks_counts "$DATA/${m}_graph_meta.json" $KS)" || exit 2
  sizes=(KS="$counts")
fi
# corpus mode: stage b as two shards (windows 0, 2, 4, ... and 1, 3, 5, ...) merged exactly into DATA; the two
# halves tell stage e how stable each method's selection is
# (a stage that is a shell function takes every setting it uses as an argument: they are in its stamp, so a
# changed setting reruns it)
corpus_b() {  # TEXT MODEL DEVICE SHARDS_DIR [STAGE-B FLAGS...]
  for i in 0 1; do
    py b_generate_activation_dataset.py --input_text "$1" --export_dir "$4/$i" --model_type "$2" --device "$3" \
      --shard "$i/2" --attribution "${@:5}"
  done
  py c_merge_activation_statistics.py --output_dir "$DATA" "$4/0" "$4/1"
}
if [ -n "$TEXT" ]; then
  stage b "$DATA/${m}_corpus.json" corpus_b "$TEXT" "$MODEL" "$DEVICE" "${DATA}_shards" "${direct[@]}" \
    "${text_field[@]}"
else
  stage b "$DATA/${m}_activation_matrix.npz" \
    py b_generate_activation_dataset.py --input_csv "$CSV" --export_dir "$DATA" --model_type "$MODEL" \
      --device "$DEVICE" --temperature "$TEMPERATURE" --seed "$SEED" "${direct[@]}"
fi
if [ "$EFFECTS" = 1 ] && [ -n "$TEXT" ]; then  # on the corpus's first EFFECT_TOKENS tokens, its own windows
  stage effects "$DATA/${m}_neuron_effects.csv" \
    py d_calculate_neuron_effects.py --dataset_path "$DATA" --input_text "$TEXT" --eval_tokens "$EFFECT_TOKENS" \
      --model_type "$MODEL" --device "$DEVICE" "${text_field[@]}"
elif [ "$EFFECTS" = 1 ]; then
  stage effects "$DATA/${m}_neuron_effects.csv" \
    py d_calculate_neuron_effects.py --dataset_path "$DATA" --input_csv "$CSV" --model_type "$MODEL" --device "$DEVICE"
fi
if [ -z "$TEXT" ]; then  # corpus mode wrote the graph store already
  stage c "$DATA/${m}_weighted_graph" \
    py c_calculate_weighted_activation_graph.py --input_dir "$DATA"
fi
if [ "$DIRECT_EDGES" = 1 ]; then  # how faithful the causal edges are: prediction against zero-ablation
  stage fidelity "$DATA/${m}_edge_fidelity.csv" \
    py c_measure_edge_fidelity.py --dataset_path "$DATA" --model_type "$MODEL" --device "$DEVICE" --tokens "$FIDELITY_TOKENS"
fi
analyzed="$DATA/weighted_graph_analysis/${m}_weighted_graph_analyzed.json"
stage c_analyze "$analyzed" \
  py c_analyze_weighted_activation_graph.py --input_path "$DATA/${m}_weighted_graph"
# modules of the count graph (and of direct_abs), with the selection data's halves for their stability
module_weights="count"
[ "$DIRECT_EDGES" = 1 ] && module_weights="count direct_abs"
find_modules() {  # WEIGHT...
  local halves=(--input_csv "$CSV")
  [ -n "$TEXT" ] && halves=()
  for w in "$@"; do
    py c_find_modules.py --input_path "$DATA/${m}_weighted_graph" --weight "$w" "${halves[@]}"
  done
}
# shellcheck disable=SC2086
stage modules "$DATA/modules" find_modules $module_weights
# the stage-d sweep, then the largest modules of each weight as subsets, into a fresh directory (a subset of a
# method or k no longer asked for is not left for stage e)
subsets_d() {  # THRESHOLDS KS=...|RATIOS=... METHODS WEIGHTS MODULES_TOP MODULE_WEIGHTS
  local sweep=(THRESHOLDS="$1" "$2" METHODS="$3" WEIGHTS="$4")
  rm -rf "$DATA/perturbation_subsets"
  log_command env "${sweep[@]}" ./d_batch_perturbation_calculate.sh "$analyzed" "$DATA/perturbation_subsets"
  env "${sweep[@]}" PYTHON="$PYTHON" ./d_batch_perturbation_calculate.sh "$analyzed" "$DATA/perturbation_subsets"
  if [ "$5" -gt 0 ]; then
    for w in $6; do
      py d_calculate_perturbation_subset.py --modules "$DATA/modules/${m}_modules_$w.csv" --modules_top "$5" \
        --output_dir "$DATA/perturbation_subsets"
    done
  fi
}
stage d "$DATA/perturbation_subsets" subsets_d "$THRESHOLDS" "${sizes[0]}" "$METHODS" "$WEIGHTS" "$MODULES_TOP" \
  "$module_weights"
subsets=()
while IFS= read -r f; do subsets+=("$(basename "$f")"); done < <(ls "$DATA/perturbation_subsets"/*.npy 2>/dev/null | sort)
selection=(--input_csv "$CSV")
[ -n "$TEXT" ] && selection=()
real_text=()
[ "$EVAL_TEXT" != none ] && real_text=(--eval_text "$EVAL_TEXT" --eval_tokens "$EVAL_TOKENS" "${eval_text_field[@]}")
stage e "$DATA/perturbation_results/summary.csv" \
  py e_generate_perturbed_results.py --dataset_path "$DATA" "${selection[@]}" --eval_csv "$EVAL_CSV" \
    "${real_text[@]}" --model_type "$MODEL" --device "$DEVICE" --random_controls "$RANDOM_CONTROLS" \
    --control_subsets "$CONTROL_SUBSETS" --module_controls "$MODULE_CONTROLS" --perturbation_subset_filenames none "${subsets[@]}"
stage cards "$DATA/neuron_cards/neurons.html" \
  py f_render_neuron_cards.py --dataset_path "$DATA" --model_type "$MODEL" --device "$DEVICE" --neurons report
source_flag=(--input_csv "$CSV")
[ -n "$TEXT" ] && source_flag=(--input_text "$TEXT")
py -m gelutrace.report "$DATA" --model_type "$MODEL" "${source_flag[@]}" --eval_csv "$EVAL_CSV" \
  --eval_text "$EVAL_TEXT" --eval_tokens "$EVAL_TOKENS" --thresholds "$THRESHOLDS" --ks "${counts:-}" \
  --ratios "$RATIOS" --methods "$METHODS" --weights "$WEIGHTS" --random_controls "$RANDOM_CONTROLS" \
  --control_subsets "$CONTROL_SUBSETS" --modules_top "$MODULES_TOP" \
  --module_controls "$MODULE_CONTROLS" --temperature "$TEMPERATURE" --seed "$SEED" --device "$DEVICE"
