"""
The pipeline driver: `run` is run_pipeline.sh (and `gelutrace run`), `sweep` is d_batch_perturbation_calculate.sh.

    python -m gelutrace.pipeline run [options] [MODEL] [PROMPT_CSV] [DATASET_DIR]
    python -m gelutrace.pipeline sweep [options] INPUT_GRAPH [OUTPUT_DIR]

(`run --help` and `sweep --help` tell the rest.) The stages are the table stages() yields, in order: each with the
output that marks it done, its stamp (the command, or the settings, that made the output:
DATASET_DIR/.pipeline/STAGE.cmd), the inputs whose digests the stamp holds, and the commands it runs (each listed
in STAGE.run, for the report). A stage is skipped when its output exists and its stamp is unchanged; once a stage
runs, every later one does. execute() is the one place that starts a stage's command.
"""

import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gelutrace import PipelineError
from gelutrace.cli import run_main
from gelutrace.files import atomic, formats, layout
from gelutrace.files.corpusfiles import corpus_files
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.selection import methods as sel
from gelutrace.selection import subsets

HERE = Path(__file__).absolute().parent.parent  # the checkout: the stage scripts, their default inputs and datasets

RUN_HELP = """\
The whole pipeline, a -> b -> (single-neuron effects) -> c -> (edge fidelity) -> c_analyze -> d (a sweep of
selection methods) -> e (baseline, random controls, on held-out prompts) -> neuron cards -> report, which opens with
the method comparison.

  ./run_pipeline.sh [options] [MODEL] [PROMPT_CSV] [DATASET_DIR]

MODEL        hub name (gpt2 ... gpt2-xl), shipped model or checkpoint directory (default: tinybard)
PROMPT_CSV   prompts,number_of_new_tokens,num_samples (default: parcellation_datasets/test_1.csv)
DATASET_DIR  where every stage writes (default: parcellation_datasets/<csv name>_<model name>)
Options (or environment variables):
  --device auto|cpu|cuda|mps      DEVICE (default auto)
  --temperature T                 TEMPERATURE for stage b (default 0: greedy)
  --seed N                        SEED for stage b (default 42; stage e uses 1337 as the original)
  --thresholds "0.5 0.8"          THRESHOLDS of the stage-d sweep
  --ks "0.1% 1% 30 ..."           KS: the k grid of the stage-d sweep and stage e's dose-response, each a count
                                  or a percentage of the neurons (default: 8 values log-spaced from 0.1 % to
                                  10 %: 0.1% 0.193% 0.373% 0.72% 1.39% 2.68% 5.18% 10%)
  --ratios "0.01 0.05"            RATIOS: fractions of the neurons instead of --ks (the original's sweep)
  --methods "degree ..."          METHODS of the stage-d sweep (default: degree activation_count attribution
                                  random, plus influence and its graph-free baselines direct_loss and magnitude
                                  with --direct_edges 1, and ablation when single-neuron effects are measured)
  --weights "count"               WEIGHTS: edge weights of the graph methods (count jaccard phi pmi direct
                                  direct_abs; default count, plus direct_abs with --direct_edges 1)
  --exclude_layers "0"            EXCLUDE_LAYERS: stage d also ranks the methods influence, activation_count,
                                  attribution and ablation (those of METHODS) without these layers' neurons, at
                                  every k of the grid; stage e compares those subsets apart (comparison_excluded.csv
                                  ...) and the report sets their dose-response beside the full one (default 0:
                                  layer 0, which holds most picks; "none": no such subsets)
  --direct_edges 0|1              DIRECT_EDGES: stage b also measures the causal edge weights (direct,
                                  direct_abs) and each neuron's direct_loss (default 1)
  --effects 0|1                   EFFECTS: measure every neuron's single-ablation effect (ground truth for
                                  the comparison, and the ablation method); default 1 for a shipped model
                                  (models/), 0 otherwise (GPT-2 small: 36,864 ablations, GPU advised); with
                                  --text default 0, and measured on the corpus's real next tokens
  --effect_tokens N               EFFECT_TOKENS: with --text --effects 1, the corpus tokens each neuron's
                                  effect is measured on (default 2000; a forward pass over them per neuron)
  --fidelity_tokens N             FIDELITY_TOKENS: with --direct_edges 1, the scored positions the edge
                                  fidelity's ablations are measured on (default 2048)
  --text PATH                     TEXT: corpus mode: stages b-d read this text (a .txt/.jsonl file, gzip or zstd
                                  compressed, .parquet, a datasets.save_to_disk directory, or a directory of them)
                                  teacher-forced instead of generating for PROMPT_CSV; stage c is then not
                                  needed (stage b writes the graph store) and stage e measures on EVAL_CSV.
                                  Stage b runs as two shards (DATASET_DIR_shards/0 and /1, the halves whose
                                  selections stage e compares) merged exactly into DATASET_DIR, with
                                  --attribution (the real next token's NLL the objective)
  --text_field NAME               TEXT_FIELD: the field of TEXT's .jsonl/.parquet/Arrow records holding the text
                                  (default text)
  --eval_csv CSV                  EVAL_CSV: prompts stage e measures the effects on (default
                                  parcellation_datasets/heldout_<model name>.csv when it exists, else PROMPT_CSV)
  --eval_text PATH                EVAL_TEXT: held-out text stage e measures the effects on (teacher-forced
                                  next-token loss; the verdict's metric) (default
                                  parcellation_datasets/heldout_eval_<model name>.txt when it exists; "none":
                                  no real-text evaluation)
  --eval_text_field NAME          EVAL_TEXT_FIELD: the same for EVAL_TEXT (default text)
  --eval_tokens N                 EVAL_TOKENS: tokens of EVAL_TEXT scored (default 8000 for a shipped model,
                                  100000 otherwise)
  --random_controls N             RANDOM_CONTROLS in stage e: layer-matched random subsets for each k's winner
                                  (chosen on the validation part), the null of every claim against random and
                                  of the dose-response band (default 30; p >= 1/(N+1), no claim below 20)
  --control_subsets all|best      CONTROL_SUBSETS: which subsets get them (default best: each k's winner)
  --mean_ablation_top N           MEAN_ABLATION_TOP: stage e also measures each k's N best methods with each
                                  neuron replaced by its mean over the selection data, the first with its own
                                  controls: whether the order holds (needs EVAL_TEXT; default 2 with it, else 0)
  --trace N                       TRACE: the per-prompt attribution graphs of the first N evaluation prompts
                                  (b_trace_gelu_activations.py --graph, labelled from the dataset, grouped by
                                  the count modules) in DATASET_DIR/traces/, in the report (default 3 for a
                                  shipped model, else 0)
  --own_continuation 0|1          OWN_CONTINUATION: stage e also measures every subset and control teacher-
                                  forced along the model's own continuations of the evaluation prompts (default
                                  0 with EVAL_TEXT, whose verdict is the real text's; 1 without it)
  --modules_top N                 MODULES_TOP: c_find_modules finds modules of the count graph (and of
                                  direct_abs with --direct_edges 1); stage e ablates the N largest of each
                                  (default 1; 0: find modules, ablate none)
  --module_controls N             MODULE_CONTROLS: layer-matched and effect-weighted controls of each module
                                  (N of each; default 20, the fewest that allow p < 0.05)
  --force                         rerun every stage even if its outputs are up to date
A stage is skipped when its outputs exist and were made by the same command (recorded in
DATASET_DIR/.pipeline/) from inputs that have not changed since (a text's files read through their symlinks);
once a stage runs, all later ones do. Every flag, the texts and DATASET_DIR are checked before the first stage;
the run then holds DATASET_DIR's lock until it ends (a second run into it is refused before it changes anything).
The stages a-e, c_find_modules and the cards run in this order:
  a -> b -> effects -> c -> fidelity -> c_analyze -> modules -> d -> e -> cards -> report
Ends with DATASET_DIR/report.md and a short summary on the terminal.
"""

SWEEP_HELP = """\
Stage d over a grid: every threshold x ratio x method x weight, one subset .npy (+ sidecar .json) each, named
{m}_{method}_t{threshold}_r{ratio}.npy ({m}_{method}_{weight}_t{threshold}_r{ratio}.npy for a weight other
than count; {m}_{method}_r{ratio}.npy, once per ratio, for the methods that use no graph), then a summary table.
With --ks, sizes k instead of ratios (..._k{k}.npy). Each method, weight and threshold is ranked once: its
subsets at growing k are prefixes of one ranking.

  ./d_batch_perturbation_calculate.sh [options] INPUT_GRAPH [OUTPUT_DIR]

INPUT_GRAPH: c_analyze's *_analyzed.json / *_analyzed.gpickle (or a store / .gpickle from stage c).
OUTPUT_DIR:  default <dataset>/perturbation_subsets, where <dataset> is the directory holding
             weighted_graph_analysis/ (or the graph's own directory).
Options (or environment variables):
  --thresholds "0.5 0.7 0.8 0.9"   THRESHOLDS
  --ratios "0.01 0.02 0.05 0.1"    RATIOS
  --ks "3 10 30 100"               KS: numbers of neurons instead of ratios (used when set)
  --methods "degree"               METHODS (degree weighted_degree pagerank influence activation_count
                                   attribution direct_loss magnitude ablation random)
  --weights "count"                WEIGHTS (count jaccard phi pmi; see d_calculate_perturbation_subset.py
                                   --help); a method that ignores the weight (all but degree,
                                   weighted_degree, pagerank) writes one subset, listed once
  --seed N                         SEED (for random; default 1337)
  --exclude_layers "0"             EXCLUDE_LAYERS: also write the subsets of influence, activation_count,
                                   attribution and ablation (those of --methods) ranked without these layers'
                                   neurons, named ..._x0_k{k}.npy (default: none)
  --input_csv CSV                  INPUT_CSV: the prompt CSV of a prompt-mode dataset, whose halves every subset is
                                   chosen again on (stage e's selection_jaccard); a corpus-mode dataset's halves
                                   are its shards
  --force                          FORCE=1: recompute subsets that already exist (default: skip them)
  PYTHON=...                       the interpreter (default: .venv/bin/python beside this script, or python3)
"""

# each option of `run`: its environment variable and default ("": derived from the others in settings())
RUN_OPTIONS = {
    "--device": ("DEVICE", "auto"), "--temperature": ("TEMPERATURE", "0.0"), "--seed": ("SEED", "42"),
    "--thresholds": ("THRESHOLDS", "0.5 0.8"), "--ratios": ("RATIOS", ""), "--ks": ("KS", ""),
    "--eval_text": ("EVAL_TEXT", ""), "--eval_tokens": ("EVAL_TOKENS", ""),
    "--control_subsets": ("CONTROL_SUBSETS", "best"),
    "--methods": ("METHODS", ""), "--weights": ("WEIGHTS", ""), "--direct_edges": ("DIRECT_EDGES", "1"),
    "--effects": ("EFFECTS", "auto"), "--effect_tokens": ("EFFECT_TOKENS", "2000"),
    "--fidelity_tokens": ("FIDELITY_TOKENS", "2048"), "--eval_csv": ("EVAL_CSV", ""), "--text": ("TEXT", ""),
    "--text_field": ("TEXT_FIELD", ""), "--eval_text_field": ("EVAL_TEXT_FIELD", ""),
    "--random_controls": ("RANDOM_CONTROLS", "30"), "--modules_top": ("MODULES_TOP", "1"),
    "--module_controls": ("MODULE_CONTROLS", "20"), "--exclude_layers": ("EXCLUDE_LAYERS", "0"),
    "--mean_ablation_top": ("MEAN_ABLATION_TOP", ""), "--own_continuation": ("OWN_CONTINUATION", ""),
    "--trace": ("TRACE", ""),
}
SWEEP_OPTIONS = {
    "--thresholds": ("THRESHOLDS", "0.5 0.7 0.8 0.9"), "--ratios": ("RATIOS", "0.01 0.02 0.05 0.1"), "--ks": ("KS", ""),
    "--methods": ("METHODS", "degree"), "--weights": ("WEIGHTS", "count"), "--seed": ("SEED", "1337"),
    "--input_csv": ("INPUT_CSV", ""), "--exclude_layers": ("EXCLUDE_LAYERS", ""),
}
SWEEP_SEED = SWEEP_OPTIONS["--seed"][1]  # the seed of run's stage d (its --seed is stage b's)
# the methods the sweep also ranks without --exclude_layers' layers: fixed beforehand, the graph-free baselines and
# the graph method that the comparison's question is about (never chosen by their results)
EXCLUDED_METHODS = ("influence", "activation_count", "attribution", "ablation")


def parse(argv: list[str], options: dict, usage: str) -> tuple[dict, list[str]]:
    """The options (by environment variable name, each defaulting to that variable, else its default; FORCE for
    --force) and the positional arguments, as the shell drivers read them: `--flag value`, never empty."""
    values = {var: os.environ.get(var) or default for var, default in options.values()}
    values["FORCE"] = os.environ.get("FORCE") or "0"
    positional, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in options:
            if i + 1 == len(argv) or not argv[i + 1]:
                raise PipelineError(f"{a} needs a value (see --help)")
            values[options[a][0]] = argv[i + 1]
            i += 2
            continue
        if a == "--force":
            values["FORCE"] = "1"
        elif a in ("-h", "--help"):
            print(usage, end="")
            raise SystemExit(0)
        elif a.startswith("-"):
            raise PipelineError(f"unknown option {a} (see --help)")
        else:
            positional.append(a)
        i += 1
    return values, positional


# --- checks before the first stage ----------------------------------------------------------------------------------
def numbers(flag: str, value: str) -> list[float]:
    values = []
    for v in value.split():
        try:
            values.append(float(v))
        except ValueError:
            raise PipelineError(f"{flag} {v!r}: expected a number") from None
    if not values:
        raise PipelineError(f"{flag} is empty")
    return values


def words(flag: str, value: str, allowed: tuple, what: str) -> list[str]:
    values = value.split()
    if not values:
        raise PipelineError(f"{flag} is empty")
    for v in values:
        if v not in allowed:
            raise PipelineError(f"{flag}: unknown {what} {v!r}; choose from {', '.join(allowed)}")
    return values


def whole(flag: str, value: str, least: int) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) < least:
        raise PipelineError(f"{flag} must be a whole number >= {least}, got {value!r}")
    return int(value)


def excluded_layers(value: str) -> list[int]:
    """--exclude_layers: whole numbers, each once; "none" or empty: no layer."""
    if value in ("", "none"):
        return []
    layers = [whole("--exclude_layers", x, 0) for x in value.split()]
    if len(set(layers)) != len(layers):
        raise PipelineError("--exclude_layers lists a layer twice")
    return layers


def check_flags(v: dict):
    """Each sweep and stage-b flag's form; an empty value is left to its default."""
    for t in numbers("--thresholds", v["THRESHOLDS"]):
        if not 0 <= t <= 1:
            raise PipelineError(f"--thresholds {t:g}: a threshold must be in [0, 1]")
    if v["RATIOS"]:
        ratios = numbers("--ratios", v["RATIOS"])
        for r in ratios:
            if not 0 < r <= 1:
                raise PipelineError(f"--ratios {r:g}: a ratio must be in (0, 1]")
        if len(set(ratios)) != len(ratios):
            raise PipelineError("--ratios lists a value twice")
    elif v["KS"]:
        sel.k_values(None, v["KS"].split())
    if v["METHODS"]:
        words("--methods", v["METHODS"], sel.METHODS, "method")
    if v["WEIGHTS"]:
        words("--weights", v["WEIGHTS"], gr.WEIGHTS, "weight")
    try:
        temperature = float(v["TEMPERATURE"])
    except ValueError:
        temperature = math.nan
    if not math.isfinite(temperature) or temperature < 0:
        raise PipelineError(f"--temperature must be a finite number >= 0, got {v['TEMPERATURE']!r}")
    whole("--seed", v["SEED"], 0)
    excluded_layers(v["EXCLUDE_LAYERS"])
    if v["EVAL_TOKENS"]:
        whole("--eval_tokens", v["EVAL_TOKENS"], 1)


def check_combinations(s: "Run"):
    """The resolved methods and weights against the measurements they need."""
    methods = words("--methods", s.methods, sel.METHODS, "method")
    weights = words("--weights", s.weights, gr.WEIGHTS, "weight")
    if s.direct_edges != "1":
        for w in weights:
            if w in gr.DIRECT_WEIGHTS:
                raise PipelineError(f"--weights {w} needs --direct_edges 1 (stage b measures the causal weights)")
        for m in CAUSAL_RECORD_METHODS:
            if m in methods:
                raise PipelineError(f"--methods {m} needs --direct_edges 1 (it ranks by stage b's direct-effect "
                                    f"record)")
    if "ablation" in methods and s.effects != "1":
        raise PipelineError("--methods ablation needs --effects 1 (it ranks by the measured single-neuron effects)")
    if s.mean_ablation_top != "0" and s.eval_text == "none":
        raise PipelineError("--mean_ablation_top measures on the real text: give --eval_text")
    if s.own_continuation == "0" and s.eval_text == "none":
        raise PipelineError("--own_continuation 0 leaves the prompts without a metric: give --eval_text")


def text_digest(path: str, flag: str) -> str:
    """The sha256 of the names and sha256 of the files a corpus path is read from (gelutrace.corpusfiles), each
    read through its symlinks: a linked file that changes changes the digest."""
    h = hashlib.sha256()
    for p in corpus_files([path], flag):
        h.update(f"{atomic.file_sha256(p)}  {p.name}\n".encode())
    return h.hexdigest()


def basename(path: str, suffix: str = "") -> str:
    """basename(1): the last name of a path, trailing slashes aside, without `suffix` (unless that is all of it)."""
    name = path.rstrip("/").rsplit("/", 1)[-1] or "/"
    return name[:-len(suffix)] if suffix and name.endswith(suffix) and name != suffix else name


def model_names(model: str, device: str) -> tuple[bool, str]:
    """Whether MODEL is a shipped model, and its file prefix {m}; MODEL read from the checkout, as the stages
    read it. Checks DEVICE."""
    from gelutrace.model.loading import model_name, resolve_device, shipped_models  # lazy: torch, not needed for --help

    resolve_device(device)
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        return model in shipped_models(), model_name(model)
    finally:
        os.chdir(cwd)


def model_layers(model: str) -> int:
    """MODEL's number of layers, from its config alone; MODEL read from the checkout, as the stages read it."""
    from gelutrace.model.loading import model_shape  # lazy: torch, not needed for --help

    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        return model_shape(model)[0]
    finally:
        os.chdir(cwd)


CAUSAL_GRAPH_NEURONS = "50"  # the cards stage's causal graph page (f_render_neuron_cards.py --causal_graph), with direct edges
CAUSAL_RECORD_METHODS = ("influence", "direct_loss", "magnitude")  # what stage b's --direct_edges record ranks


def default_methods(direct_edges: str, effects: str) -> str:
    # attribution: stage b's --attribution, always on in the pipeline
    methods = ["degree", "influence", "activation_count", "attribution", "direct_loss", "magnitude", "random"]
    if direct_edges != "1":
        methods = [m for m in methods if m not in CAUSAL_RECORD_METHODS]
    return " ".join(methods + (["ablation"] if effects == "1" else []))


@dataclass
class Run:
    """A run's settings, resolved and checked: strings, as the stages are given them."""
    model: str
    csv: str
    data: str
    m: str  # the file prefix
    device: str
    temperature: str
    seed: str
    thresholds: str
    ratios: str
    ks: str  # the k grid's spec (counts or percentages); "" with ratios
    methods: str
    weights: str
    direct_edges: str
    effects: str
    effect_tokens: str
    fidelity_tokens: str
    text: str
    text_field: str
    eval_csv: str
    eval_text: str  # "none": no real-text evaluation
    eval_text_field: str
    eval_tokens: str
    random_controls: str
    control_subsets: str
    modules_top: str
    module_controls: str
    mean_ablation_top: str
    own_continuation: str  # "0" or "1"
    trace: str  # the evaluation prompts traced
    exclude_layers: str  # "none": no layer
    force: bool


def settings(argv: list[str]) -> Run:
    """The run's settings from its arguments and the environment, every flag checked (one error line each, in the
    order the shell driver checked them) before anything is created."""
    v, pos = parse(argv, RUN_OPTIONS, RUN_HELP)
    if len(pos) > 3:
        raise PipelineError("expected at most MODEL PROMPT_CSV DATASET_DIR (see --help)")
    if v["RATIOS"] and v["KS"]:
        raise PipelineError("give --ks or --ratios, not both")
    for flag in ("--effect_tokens", "--fidelity_tokens", "--random_controls", "--modules_top", "--module_controls",
                 "--mean_ablation_top", "--trace"):
        value = v[RUN_OPTIONS[flag][0]]
        if not re.fullmatch(r"[0-9]+", value) and not (flag in ("--mean_ablation_top", "--trace") and value == ""):
            raise PipelineError(f"{flag} must be a whole number, got '{value}'")
    for flag in ("--effect_tokens", "--fidelity_tokens"):
        if int(v[RUN_OPTIONS[flag][0]]) == 0:
            raise PipelineError(f"{flag} must be at least 1")
    if v["OWN_CONTINUATION"] not in ("", "0", "1"):
        raise PipelineError(f"--own_continuation must be 0 or 1, got '{v['OWN_CONTINUATION']}'")
    if v["CONTROL_SUBSETS"] not in ("all", "best"):
        raise PipelineError(f"--control_subsets must be all or best, got '{v['CONTROL_SUBSETS']}'")
    pos += [""] * (3 - len(pos))
    model = pos[0] or "tinybard"
    csv = pos[1] or f"{HERE}/parcellation_datasets/test_1.csv"
    if not os.path.isfile(csv):
        raise PipelineError(f"prompt CSV {csv} does not exist")
    check_flags(v)
    shipped, m = model_names(model, v["DEVICE"])
    if excluded := excluded_layers(v["EXCLUDE_LAYERS"]):
        n_layer = model_layers(model)
        if max(excluded) >= n_layer or len(excluded) == n_layer:
            raise PipelineError(f"--exclude_layers {v['EXCLUDE_LAYERS']}: the model has layers 0..{n_layer - 1}, and "
                                f"at least one must stay")
    text, effects = v["TEXT"], v["EFFECTS"]
    if text:
        if not os.path.exists(text):
            raise PipelineError(f"text {text} does not exist")
        text = os.path.abspath(text)
        stem = text[:text.rfind(".")] if "." in text else text  # the shell's ${TEXT%.*}
        data = pos[2] or f"{HERE}/parcellation_datasets/{basename(stem)}_{m}"
        if effects == "auto":
            effects = "0"  # on real text every neuron costs a forward pass over EFFECT_TOKENS
    else:
        data = pos[2] or f"{HERE}/parcellation_datasets/{basename(csv, '.csv')}_{m}"
    if effects == "auto":
        effects = "1" if shipped else "0"
    eval_text = v["EVAL_TEXT"]
    if not eval_text:
        held = f"{HERE}/parcellation_datasets/heldout_eval_{m}.txt"
        eval_text = held if os.path.isfile(held) else "none"
    if eval_text != "none" and not os.path.exists(eval_text):
        raise PipelineError(f"evaluation text {eval_text} does not exist")
    if effects not in ("0", "1"):
        raise PipelineError(f"--effects must be 0 or 1, got {effects}")
    direct_edges = v["DIRECT_EDGES"]
    if direct_edges not in ("0", "1"):
        raise PipelineError(f"--direct_edges must be 0 or 1, got {direct_edges}")
    if v["TEXT_FIELD"] and not text:
        raise PipelineError("--text_field needs --text")
    if v["EVAL_TEXT_FIELD"] and eval_text == "none":
        raise PipelineError("--eval_text_field needs an evaluation text")
    eval_csv = v["EVAL_CSV"]
    if not eval_csv:
        held = f"{HERE}/parcellation_datasets/heldout_{m}.csv"
        eval_csv = held if os.path.isfile(held) else csv
    if not os.path.isfile(eval_csv):
        raise PipelineError(f"evaluation CSV {eval_csv} does not exist")
    s = Run(model=model, csv=csv, data=data, m=m, device=v["DEVICE"], temperature=v["TEMPERATURE"], seed=v["SEED"],
            thresholds=v["THRESHOLDS"], ratios=v["RATIOS"], ks=v["KS"] or ("" if v["RATIOS"] else " ".join(sel.K_GRID)),
            methods=v["METHODS"] or default_methods(direct_edges, effects),
            weights=v["WEIGHTS"] or ("count direct_abs" if direct_edges == "1" else "count"),
            direct_edges=direct_edges, effects=effects, effect_tokens=v["EFFECT_TOKENS"],
            fidelity_tokens=v["FIDELITY_TOKENS"], text=text, text_field=v["TEXT_FIELD"], eval_csv=eval_csv,
            eval_text=eval_text, eval_text_field=v["EVAL_TEXT_FIELD"],
            eval_tokens=v["EVAL_TOKENS"] or ("8000" if shipped else "100000"),
            random_controls=v["RANDOM_CONTROLS"], control_subsets=v["CONTROL_SUBSETS"],
            modules_top=v["MODULES_TOP"], module_controls=v["MODULE_CONTROLS"], exclude_layers=v["EXCLUDE_LAYERS"],
            mean_ablation_top=str(int(v["MEAN_ABLATION_TOP"] or ("0" if eval_text == "none" else "2"))),
            own_continuation=v["OWN_CONTINUATION"] or ("1" if eval_text == "none" else "0"),
            trace=str(int(v["TRACE"] or ("3" if shipped else "0"))), force=v["FORCE"] == "1")
    check_combinations(s)
    whole("--eval_tokens", s.eval_tokens, 1)
    for d in [s.data] + ([f"{s.data}_shards"] if s.text else []):
        atomic.check_output_dir(d, "DATASET_DIR")
    return s


def digests(s: Run) -> dict[str, str]:
    """The digests the stamps hold: "csv", the prompt CSV's (or the corpus's: each file it is read from, through
    its symlinks), and "eval", the evaluation CSV's and text's."""
    evaluation = atomic.file_sha256(s.eval_csv)
    if s.eval_text != "none":
        evaluation += " " + text_digest(s.eval_text, "--eval_text")
    return {"csv": text_digest(s.text, "--text") if s.text else atomic.file_sha256(s.csv), "eval": evaluation}


# --- the stages ------------------------------------------------------------------------------------------------------
@dataclass
class Command:
    """A command of a stage: `words` as STAGE.run lists it, `argv` what the interpreter runs."""
    words: list[str]
    argv: list[str]


def script(*argv: str) -> Command:
    """`python SCRIPT ARGS...` (or `python -m MODULE ARGS...`)."""
    return Command(["python", *argv], list(argv))


@dataclass
class Stage:
    name: str
    output: str | None  # exists once the stage is done; None: the stage runs every time, unstamped (the report)
    commands: list[Command]
    stamp: list[str] | None = None  # the stamp's words (what the stage depends on); None: its one command's
    inputs: tuple[str, ...] = ()  # the digests (digests()) its stamp also holds
    clear: str | None = None  # a directory removed before the commands run: no output of an earlier run is left


def stages(s: Run) -> Iterator[Stage]:
    """The stages in order. A stage's commands can depend on what an earlier one wrote (the k grid's counts on
    stage a's number of neurons, stage e's subsets on stage d's files): each is made once the stages before it are
    done."""
    d, m = s.data, s.m

    def at(template: str) -> str:  # as given, never normalised: the stamps hold these paths
        return f"{d}/{template.format(m=m)}"

    direct = ["--direct_edges"] if s.direct_edges == "1" else []
    text_field = ["--text_field", s.text_field] if s.text_field else []
    store = at(layout.WEIGHTED_GRAPH)
    yield Stage("a", at(layout.GRAPH_META), [script(
        "a_generate_gelu_graph.py", "--model_type", s.model, "--output_dir", d)])
    counts = ""
    if s.ks:  # counts, from the percentages and the graph's number of neurons
        num_neurons = json.loads(Path(at(layout.GRAPH_META)).read_text())["num_neurons"]
        counts = " ".join(map(str, sel.k_values(num_neurons, s.ks.split())))
    excluded = excluded_layers(s.exclude_layers)
    if s.text:  # two shards (windows 0, 2, 4, ... and 1, 3, 5, ...) merged exactly: the halves of stage e's stability
        shards = f"{d}_shards"
        b = [script("b_generate_activation_dataset.py", "--input_text", s.text, "--export_dir", f"{shards}/{i}",
                    "--model_type", s.model, "--device", s.device, "--shard", f"{i}/2", "--attribution", *direct,
                    *text_field) for i in (0, 1)]
        b.append(script("c_merge_activation_statistics.py", "--output_dir", d, f"{shards}/0", f"{shards}/1"))
        yield Stage("b", at(layout.CORPUS), b, ["corpus_b", s.text, s.model, s.device, shards, *direct, *text_field],
                    inputs=("csv",))
    else:
        yield Stage("b", at(layout.MATRIX), [script(
            "b_generate_activation_dataset.py", "--input_csv", s.csv, "--export_dir", d, "--model_type", s.model,
            "--device", s.device, "--temperature", s.temperature, "--seed", s.seed, *direct)], inputs=("csv",))
    if s.effects == "1":  # corpus mode: on the corpus's first EFFECT_TOKENS tokens, its own windows
        source = (["--input_text", s.text, "--eval_tokens", s.effect_tokens] if s.text else ["--input_csv", s.csv])
        yield Stage("effects", at(layout.NEURON_EFFECTS), [script(
            "d_calculate_neuron_effects.py", "--dataset_path", d, *source, "--model_type", s.model,
            "--device", s.device, *(text_field if s.text else []))], inputs=("csv",))
    if not s.text:  # corpus mode wrote the graph store already
        yield Stage("c", store, [script("c_calculate_weighted_activation_graph.py", "--input_dir", d)])
    if s.direct_edges == "1":  # how faithful the causal edges are: prediction against zero-ablation
        yield Stage("fidelity", at(layout.EDGE_FIDELITY), [script(
            "c_measure_edge_fidelity.py", "--dataset_path", d, "--model_type", s.model, "--device", s.device,
            "--tokens", s.fidelity_tokens)])
    analyzed = f"{d}/{layout.ANALYSIS_DIR}/{layout.ANALYZED.format(name=layout.WEIGHTED_GRAPH.format(m=m))}.json"
    yield Stage("c_analyze", analyzed, [script("c_analyze_weighted_activation_graph.py", "--input_path", store)])
    # modules of the count graph (and of direct_abs), with the selection data's halves for their stability
    module_weights = ["count", "direct_abs"] if s.direct_edges == "1" else ["count"]
    halves = [] if s.text else ["--input_csv", s.csv]
    yield Stage("modules", f"{d}/{layout.MODULES_DIR}", [
        script("c_find_modules.py", "--input_path", store, "--weight", w, *halves) for w in module_weights],
        ["find_modules", *module_weights])
    # the sweep, then the largest modules of each weight as subsets, into a fresh directory (a subset of a method
    # or k no longer asked for is not left for stage e)
    subsets = f"{d}/{layout.SUBSETS_DIR}"
    size_var, size = ("KS", counts) if s.ks else ("RATIOS", s.ratios)
    grid = [f"THRESHOLDS={s.thresholds}", f"{size_var}={size}", f"METHODS={s.methods}", f"WEIGHTS={s.weights}"]
    exclude = ["--exclude_layers", " ".join(map(str, excluded))] if excluded else []
    grid += [f"EXCLUDE_LAYERS={exclude[1]}"] if excluded else []
    grid += [] if s.text else [f"INPUT_CSV={s.csv}"]  # prompt mode: the halves each subset is chosen again on
    sweep_command = Command(["env", *grid, "./d_batch_perturbation_calculate.sh", analyzed, subsets], [
        "-m", "gelutrace.pipeline", "sweep", "--thresholds", s.thresholds, f"--{size_var.lower()}", size,
        "--methods", s.methods, "--weights", s.weights, "--seed", SWEEP_SEED, *exclude, *halves, analyzed, subsets])
    modules = [script("d_calculate_perturbation_subset.py", "--modules", f"{d}/{layout.MODULES_DIR}/" +
                      layout.MODULES.format(m=m, weight=w), "--modules_top", s.modules_top, "--output_dir", subsets)
               for w in module_weights] if int(s.modules_top) > 0 else []
    yield Stage("d", subsets, [sweep_command, *modules],
                ["subsets_d", s.thresholds, grid[1], s.methods, s.weights, s.modules_top, " ".join(module_weights),
                 *halves, *exclude],
                clear=subsets)
    names = sorted(p.name for p in Path(subsets).glob("*.npy") if not p.name.startswith("."))
    selection = [] if s.text else ["--input_csv", s.csv]
    eval_text_field = ["--text_field", s.eval_text_field] if s.eval_text_field else []
    real_text = [] if s.eval_text == "none" else ["--eval_text", s.eval_text, "--eval_tokens", s.eval_tokens,
                                                  *eval_text_field]
    yield Stage("e", f"{d}/{layout.RESULTS_DIR}/{layout.PERTURBATION_SUMMARY}", [script(
        "e_generate_perturbed_results.py", "--dataset_path", d, *selection, "--eval_csv", s.eval_csv, *real_text,
        "--model_type", s.model, "--device", s.device, "--random_controls", s.random_controls, "--control_subsets",
        s.control_subsets, "--module_controls", s.module_controls,
        *(["--mean_ablation_top", s.mean_ablation_top] if s.mean_ablation_top != "0" else []),
        *(["--own_continuation", "0"] if s.own_continuation == "0" else []),
        "--perturbation_subset_filenames", "none", *names)], inputs=("csv", "eval"))
    yield Stage("cards", f"{d}/{layout.CARDS_DIR}/{layout.CARDS_HTML}", [script(
        "f_render_neuron_cards.py", "--dataset_path", d, "--model_type", s.model, "--device", s.device,
        "--neurons", "report", *(["--causal_graph", CAUSAL_GRAPH_NEURONS] if s.direct_edges == "1" else []))])
    if int(s.trace):
        prompts = formats.read_prompts(s.eval_csv)[:int(s.trace)]
        module_csv = f"{d}/{layout.MODULES_DIR}/" + layout.MODULES.format(m=m, weight="count")
        yield Stage("trace", f"{d}/{layout.TRACES_DIR}/{len(prompts) - 1}/" + layout.TRACE_GRAPH.format(m=m), [script(
            "b_trace_gelu_activations.py", "--model_type", s.model, "--device", s.device, "--input_text", p.text,
            "--output_dir", f"{d}/{layout.TRACES_DIR}/{i}", "--graph", "--dataset_path", d, "--modules", module_csv)
            for i, p in enumerate(prompts)], ["trace", s.trace], inputs=("eval",), clear=f"{d}/{layout.TRACES_DIR}")
    source = ["--input_text", s.text] if s.text else ["--input_csv", s.csv]
    yield Stage("report", None, [script(
        "-m", "gelutrace.report", d, "--model_type", s.model, *source, "--eval_csv", s.eval_csv, "--eval_text",
        s.eval_text, "--eval_tokens", s.eval_tokens, "--thresholds", s.thresholds, "--ks", counts, "--ratios",
        s.ratios, "--methods", s.methods, "--weights", s.weights, "--random_controls", s.random_controls,
        "--control_subsets", s.control_subsets, "--modules_top", s.modules_top, "--module_controls",
        s.module_controls, "--temperature", s.temperature, "--seed", s.seed, "--exclude_layers", s.exclude_layers,
        "--device", s.device, *(["--effect_tokens", s.effect_tokens] if s.text else []))])


# --- running them ----------------------------------------------------------------------------------------------------
_BACKSLASHED = frozenset(" \t\n!\"$&'()*,;<>?[\\]^`{|}")
_ANSI_C = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r", "\x1b": "\\E",
           "'": "\\'", "\\": "\\\\"}


def shell_quote(word: str) -> str:
    """`word` as bash's printf %q writes it: the stamps and .run files the shell driver wrote stay valid."""
    if not word:
        return "''"
    if not word.isprintable():
        return "$'" + "".join(_ANSI_C.get(c) or (c if c.isprintable() else "".join(f"\\{b:03o}" for b in c.encode()))
                              for c in word) + "'"
    return "".join("\\" + c if c in _BACKSLASHED or (c == "#" and i == 0)
                   or (c == "~" and (i == 0 or word[i - 1] in ":=")) else c for i, c in enumerate(word))


def shell_words(words: list[str]) -> str:
    return " ".join(map(shell_quote, words))


def interpreter() -> str:
    """The stages' interpreter: PYTHON (run_pipeline.sh's choice), else this one."""
    return os.environ.get("PYTHON") or sys.executable


def execute(command: Command, lock_fd: int) -> int:
    """Run one command of a stage in the checkout, sharing the driver's lock (LOCK_FD_ENV names its descriptor,
    which the command inherits); its exit status. The one place that starts a stage: in this process when the
    interpreter is this one and the command a stage's main (no interpreter start-up, no second torch import),
    else as a subprocess (another PYTHON, `-c` code)."""
    sys.stdout.flush()
    main = stage_main(command.argv)
    if main is not None:
        return execute_here(main, command.argv, lock_fd)
    env = dict(os.environ, **{atomic.LOCK_FD_ENV: str(lock_fd)})
    code = subprocess.run([interpreter(), *command.argv], cwd=HERE, env=env, pass_fds=(lock_fd,)).returncode
    return 128 - code if code < 0 else code  # killed by a signal: the shell's status


def same_interpreter() -> bool:
    python = os.environ.get("PYTHON")
    if not python:
        return True
    found = shutil.which(python)  # a venv's python is a link to the system's: compared unresolved
    return found is not None and os.path.abspath(found) == os.path.abspath(sys.executable)


def stage_main(argv: list[str]) -> Callable | None:
    """The main() a command runs, when it can run in this process: a stage script of the checkout (`SCRIPT.py`) or
    a module of the package (`-m gelutrace...`), run by this interpreter."""
    if not same_interpreter():
        return None
    if argv[0] == "-m" and len(argv) > 1 and argv[1].split(".")[0] == "gelutrace":
        spec = importlib.util.find_spec(argv[1])
        name = f"{argv[1]}.__main__" if spec is not None and spec.submodule_search_locations else argv[1]
    elif argv[0].endswith(".py") and "/" not in argv[0] and (HERE / argv[0]).is_file():
        if str(HERE) not in map(str, sys.path):
            return None
        name = argv[0][:-3]
    else:
        return None
    return getattr(importlib.import_module(name), "main", None)


def execute_here(main: Callable, argv: list[str], lock_fd: int) -> int:
    """A stage's main(args) in this process, as its own interpreter would run it: its sys.argv, the driver's lock
    (LOCK_FD_ENV), and an exception the script does not turn into a status printed with its traceback, status 1.
    Grad mode and torch's threads are restored afterwards (a runner sets its own)."""
    args = argv[2:] if argv[0] == "-m" else argv[1:]
    saved_argv, saved_lock = sys.argv, os.environ.get(atomic.LOCK_FD_ENV)
    torch = sys.modules.get("torch")
    grad, threads = (torch.is_grad_enabled(), torch.get_num_threads()) if torch is not None else (None, None)
    sys.argv = [main.__globals__.get("__file__") or argv[0], *args]
    os.environ[atomic.LOCK_FD_ENV] = str(lock_fd)
    try:
        return run_main(main, args, exit=False)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.argv = saved_argv
        if saved_lock is None:
            os.environ.pop(atomic.LOCK_FD_ENV, None)
        else:
            os.environ[atomic.LOCK_FD_ENV] = saved_lock
        if grad is not None:
            torch.set_grad_enabled(grad)
            torch.set_num_threads(threads)


def remove(path: str):
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def take_lock(data: str) -> int:
    """DATA's writer lock, on a descriptor of its LOCK_FILE the stages inherit, held until it is closed: a second
    run into DATA is refused here, before it changes anything."""
    os.makedirs(data, exist_ok=True)
    fd = os.open(os.path.join(data, layout.LOCK_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        atomic.lock_on_descriptor(fd, data, "run_pipeline.sh")
    except BaseException:
        os.close(fd)
        raise
    return fd


def drive(s: Run, digest: dict[str, str], lock_fd: int, start: Callable[[Command, int], int]):
    """Each stage in order, unless it is up to date; `start` runs a command (execute)."""
    stamps = Path(s.data) / layout.PIPELINE_STAMPS
    stamps.mkdir(exist_ok=True)

    def call(command: Command, log: Path | None = None):
        if log is not None:
            with open(log, "a") as f:
                f.write(shell_words(command.words) + "\n")
        code = start(command, lock_fd)
        if code:
            raise SystemExit(code)

    ran = False
    for stage in stages(s):
        if stage.output is None:
            for command in stage.commands:
                call(command)
            continue
        want = "".join(shell_quote(w) + " " for w in stage.stamp or stage.commands[0].words)
        if stage.inputs:
            want += "# csv " + " ".join(digest[i] for i in stage.inputs)
        stamp, log = stamps / f"{stage.name}.cmd", stamps / f"{stage.name}.run"
        if (not s.force and not ran and os.path.exists(stage.output) and stamp.is_file()
                and stamp.read_bytes().rstrip(b"\n") == want.encode()):
            print(f"== {stage.name}: up to date ({stage.output})", flush=True)
            continue
        print(f"== {stage.name}", flush=True)
        stamp.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        started = time.monotonic()
        if stage.clear:
            remove(stage.clear)
        for command in stage.commands:
            call(command, log)
        with atomic.atomic_open(stamp) as f:
            f.write(want + "\n")
        print(f"== {stage.name}: done in {int(time.monotonic() - started)} s", flush=True)
        ran = True


def run(argv: list[str], start: Callable[[Command, int], int] = execute):
    """run_pipeline.sh: the checks, then DATA's lock and the stages, from the checkout (where the stages resolve
    relative paths)."""
    s = settings(argv)
    digest = digests(s)
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        lock_fd = take_lock(s.data)
        try:
            drive(s, digest, lock_fd, start)
        finally:
            os.close(lock_fd)
    finally:
        os.chdir(cwd)


# --- the stage-d sweep -----------------------------------------------------------------------------------------------
def parsed(flag: str, value: str, kind: type, needed: bool = False) -> list[str]:
    """The words of a sweep flag, each a value stage d's flag takes (float or int); `needed`: at least one."""
    values = value.split()
    if needed and not values:
        raise PipelineError(f"{flag} is empty")
    for x in values:
        try:
            kind(x)
        except ValueError:
            raise PipelineError(f"{flag} {x!r}: expected {'a whole number' if kind is int else 'a number'}") from None
    return values


def sweep(argv: list[str]):
    """d_batch_perturbation_calculate.sh: each method, weight and threshold through stage d's ranking run
    (gelutrace.selection.subsets), in this process, the graph read and its halves built once; then the summary
    table. Exit status 1 when any failed."""
    v, pos = parse(argv, SWEEP_OPTIONS, SWEEP_HELP)
    if not 1 <= len(pos) <= 2:
        raise PipelineError("expected INPUT_GRAPH [OUTPUT_DIR] (see --help)")
    graph = pos[0]
    if not os.path.exists(graph):
        raise PipelineError(f"input graph {graph} does not exist")
    if len(pos) == 2:
        out = pos[1]
    else:  # beside weighted_graph_analysis/ (or the graph)
        parent = os.path.abspath(os.path.dirname(graph.rstrip("/")))
        if os.path.basename(parent) == layout.ANALYSIS_DIR:
            parent = os.path.dirname(parent)
        out = os.path.join(parent, layout.SUBSETS_DIR)
    thresholds = [float(t) for t in parsed("--thresholds", v["THRESHOLDS"], float)]
    ks = [int(k) for k in parsed("--ks", v["KS"], int, True)] if v["KS"] else None
    ratios = None if ks else [float(r) for r in parsed("--ratios", v["RATIOS"], float, True)]
    seed = parsed("--seed", v["SEED"], int, True)
    if len(seed) != 1 or int(seed[0]) < 0:
        raise PipelineError(f"--seed must be one whole number >= 0, got {v['SEED']!r}")
    read_graph = cache(gs.read_graph)
    excluded = excluded_layers(v["EXCLUDE_LAYERS"])
    if excluded:  # a layer the graph does not have is one error, before any subset
        sel.kept_nodes(read_graph(graph), excluded)
    split = {}

    def halves(graph, dataset_path, prompts):  # each graph's halves built once, for every method and threshold
        key = (id(graph), str(dataset_path))
        if key not in split:
            split[key] = subsets.selection_halves(graph, dataset_path, prompts)
        return split[key]

    files, status, failed = [], [], 0
    variants = [(method, weight, t, layers) for method in v["METHODS"].split() for weight in v["WEIGHTS"].split()
                for t in (thresholds if method in sel.GRAPH_METHODS else [None])
                for layers in ([None, excluded] if excluded and method in EXCLUDED_METHODS else [None])]
    for method, weight, t, layers in variants:
        name = f"{method} {weight} t={t or '-'}" + (f" without layers {' '.join(map(str, layers))}" if layers else "")
        where = f"[{name}]"
        done = []
        request = subsets.Request(graph, t, ratios, ks, method, weight, output_dir=out,
                                  input_csv=v["INPUT_CSV"] or None, skip_existing=v["FORCE"] != "1",
                                  seed=int(seed[0]), exclude_layers=layers)
        try:
            subsets.write_ranked(request, read_graph, lambda *line: done.append(line), halves)
        except PipelineError as e:
            print(f"{where} error: {e}", flush=True)
            failed += 1
            files.append(f"{out}/(failed: {name})")
            status.append("FAILED")
            continue
        for word, target, note in done:
            print(f"{where} {word} {target} ({note})", flush=True)
            if str(target) not in files:  # a method that ignores the weight: one file for every weight
                files.append(str(target))
                status.append("skipped" if word == "skipped" else "written")
    table = sel.summary_table(files)
    table.insert(1, "status", status)
    print(f"\nsummary ({out}):")
    print(table.to_string(index=False), flush=True)
    if failed:
        print(f"error: {failed} of {len(files)} subsets failed", file=sys.stderr)
        raise SystemExit(1)


COMMANDS = {"run": run, "sweep": sweep}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    if not argv or argv[0] not in COMMANDS:
        raise PipelineError(f"expected a command: {' or '.join(COMMANDS)} (see --help)")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    run_main(main)
