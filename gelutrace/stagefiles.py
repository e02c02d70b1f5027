"""
The one place that names every stage file, fixes its columns and reads or writes it.

Every write is atomic: data goes to a temporary file beside the target, which is renamed over the target
only when complete, so an interrupted or failed run never leaves a torn file or destroys an earlier one.
Nothing here needs pickle to read a file back.
"""

import contextlib
import csv
import fcntl
import io
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace import PipelineError

# --- file names -------------------------------------------------------------------------------------------
ATTRIBUTES = "{m}_neuron_attributes.csv"
EDGES = "{m}_neuron_edges.el"
GRAPH_META = "{m}_graph_meta.json"
DATASET = "{m}_activation_dataset.csv"
ACTIVATIONS_PICKLE = "{m}_neuron_activations.pickle"
ACTIVATIONS_JSON = "{m}_neuron_activations.json"
FREQUENCY = "{m}_neuron_frequency.csv"
MATRIX = "{m}_activation_matrix.npz"
NEURON_EFFECTS = "{m}_neuron_effects.csv"  # d_calculate_neuron_effects: each neuron's single-ablation effect
DATASET_MANIFEST = "{m}_dataset_manifest.json"  # stage b's output set: which run wrote which files
DATASET_SET = (DATASET, FREQUENCY, MATRIX, ATTRIBUTES, GRAPH_META)  # what the manifest vouches for
NEURON_EFFECTS_META = "{m}_neuron_effects.json"  # beside it: model, dataset, prompt CSV (sha256), sample counts
NEURON_EFFECTS_PARTIAL = ".{m}_neuron_effects_partial"  # its finished blocks of neurons, for --resume
PARTIAL_DIR = ".{m}_partial"  # stage b's finished batches of an unfinished run, for --resume
CORPUS = "{m}_corpus.json"  # stage b corpus mode: the text read (files: format, field, sha256; tokens, windows, shard)
CORPUS_PARTIAL_DIR = ".{m}_corpus_partial"  # corpus mode's checkpoints of an unfinished run, for --resume
TOP_EXAMPLES = "{m}_neuron_top_examples.csv"  # each neuron's top-activating samples, columns TOP_EXAMPLES_COLUMNS
TRACE_VECTOR = "{m}_activations.pkl"
TRACE_ACTIVE = "{m}_active_neurons.txt"
TRACE_PLOT = "{m}_activations.png"
SUBSETS_DIR = "perturbation_subsets"
RESULTS_DIR = "perturbation_results"
# stage c: the compact co-activation graph store is a directory (see gelutrace.store)
WEIGHTED_GRAPH = "{m}_weighted_graph"  # c's default --output_path (compact store directory)
GRAPH_STORE_HEADER = "graph.json"  # inside the store: format, model, shapes, one record per block
GRAPH_STORE_NODES = "node_activation_count.npy"  # inside the store: int64, one per neuron in id order
GRAPH_STORE_PAIR = "pair_{src:03d}_{tgt:03d}.npy"  # inside the store: counts, rows = src layer dims, cols = tgt
GRAPH_STORE_EDGES = "edges.npy"  # inside the store, edited edge lists only: (E, 2) int64 src, tgt
GRAPH_STORE_EDGE_COUNTS = "edge_counts.npy"  # inside the store, edited edge lists only: count of each edge
# inside the store, with stage b --direct_edges (gelutrace.graph.CausalEdges): float64 means per layer pair
# (rows = src layer dims, cols = tgt) and per neuron (id order): direct_loss, |direct_loss|, |value|
GRAPH_STORE_DIRECT = "direct_{src:03d}_{tgt:03d}.npy"
GRAPH_STORE_DIRECT_ABS = "direct_abs_{src:03d}_{tgt:03d}.npy"
GRAPH_STORE_DIRECT_NODES = ("direct_loss.npy", "direct_loss_abs.npy", "direct_value_abs.npy")
DIRECT_EDGES = "{m}_direct_edges.npz"  # stage b prompt mode --direct_edges: the same arrays, for stage c's store
EDGE_FIDELITY = "{m}_edge_fidelity.csv"  # c_measure_edge_fidelity: sampled edges, predicted vs measured, columns below
EDGE_FIDELITY_SUMMARY = "{m}_edge_fidelity_summary.csv"  # per layer gap: Spearman, R^2 through 0
EDGE_FIDELITY_PLOT = "{m}_edge_fidelity.png"  # measured against predicted, per edge
EDGE_FIDELITY_MANIFEST = "{m}_edge_fidelity_manifest.json"  # the three as one output set
# stage b's output sets (OutputSet): every file each mode writes, and what a run in either mode removes when it
# does not write it. The default graph store is stage c's in prompt mode and is stale once the dataset changes.
# The .el is stage a's: kept while canonical, and a user's edited one is honoured.
PROMPT_SET = (DATASET, FREQUENCY, MATRIX, ATTRIBUTES, GRAPH_META, TOP_EXAMPLES, ACTIVATIONS_JSON, ACTIVATIONS_PICKLE,
              DIRECT_EDGES)
CORPUS_SET = (ATTRIBUTES, GRAPH_META, FREQUENCY, WEIGHTED_GRAPH, TOP_EXAMPLES, CORPUS, MATRIX)
# the edge fidelity measures the store stage b (or c) writes: a new stage b run removes it
DATASET_FILES = tuple(dict.fromkeys(PROMPT_SET + CORPUS_SET + (EDGE_FIDELITY, EDGE_FIDELITY_SUMMARY, EDGE_FIDELITY_PLOT,
                                                               EDGE_FIDELITY_MANIFEST)))


def dataset_files(m: str) -> list[str]:
    """The names stage b owns in a dataset directory (DATASET_FILES), for model prefix m."""
    return [f.format(m=m) for f in DATASET_FILES]
# c_find_modules (in --output_dir, default <dataset dir>/MODULES_DIR)
MODULES_DIR = "modules"
MODULES = "{m}_modules_{weight}.csv"  # one row per neuron: node_id, layer, dimension, module
MODULES_RECORD = "{m}_modules_{weight}.json"  # settings, sizes, layer composition, Q, the null, the ARIs
MODULES_MANIFEST = "{m}_modules_{weight}_manifest.json"  # the two as one output set
MODULES_COLUMNS = ["node_id", "layer", "dimension", "module"]
MODULES_LAYER_PLOT = "{m}_modules_{weight}_layers.png"  # module x layer heatmap of neuron counts
MODULES_GRAPH_PLOT = "{m}_modules_{weight}_graph.png"  # modules as nodes, summed inter-module weight as edges

# stage c_analyze (in --output_dir, default <graph dir>/ANALYSIS_DIR)
ANALYSIS_DIR = "weighted_graph_analysis"
ANALYZED = "{name}_analyzed"  # + ".gpickle" for a .gpickle input, + ".json" (a reference) for a store
HIST_NODE_COUNT = "node_activation_count_hist"  # + ".png" / ".csv"
HIST_EDGE_COUNT = "edge_co_activation_count_hist"
HIST_DEGREE = "node_degree_hist"
DEGREE_AT_THRESHOLDS_PLOT = "node_degree_at_thresholds.png"  # the report's: degrees at stage d's thresholds
THRESHOLD_CSV = "threshold_analysis.csv"
THRESHOLD_PLOT = "threshold_analysis.png"
# the analyzed graph and the threshold sweep depend on the edge weight (c_analyze --weight): for a weight other
# than DEFAULT_WEIGHT, WEIGHT_SUFFIX goes at the end of their stem (see weighted_name)
DEFAULT_WEIGHT = "count"
WEIGHT_SUFFIX = "_{weight}"
# stage d
# d --output_dir / d_batch naming; {size} is r{ratio} (--ratio) or k{k} (--k)
SUBSET_FILE = "{m}_{method}_t{threshold}_{size}.npy"
SUBSET_FILE_NO_GRAPH = "{m}_{method}_{size}.npy"  # methods that ignore the threshold
SUBSET_FILE_WEIGHTED = "{m}_{method}_{weight}_t{threshold}_{size}.npy"  # the same for --weight other than count
SUBSET_FILE_MODULE = "{m}_module{module}_{weight}.npy"  # d --modules: one module of c_find_modules
SUBSET_SIDECAR = "{stem}.json"  # beside each subset .npy: parameters, k, per-layer counts, scores
# stage e (under <dataset>/RESULTS_DIR)
RESULT_FILE = "{stem}.csv"  # one per subset (none.csv for the baseline), columns RESULT_COLUMNS
PERTURBATION_SUMMARY = "summary.csv"  # one row per subset: k, per-layer counts, metrics, random controls
PERTURBATION_PLOT = "summary.png"  # the summary's metrics compared across subsets
PER_SAMPLE_DIR = "per_sample"  # per_sample/{stem}.csv: each sample's metrics
RESULTS_MANIFEST = "manifest.json"  # stage e's output set: which run wrote which files
EVALUATION = "evaluation.json"  # which prompts chose the neurons and which measured them, and the settings
COMPARISON = "comparison.csv"  # one row per subset a selection method made: effect, CIs, percentiles
METHOD_VERDICT = "method_verdict.csv"  # per k: ranking, winner's margin, graph methods vs baselines
METHOD_OVERLAP = "method_overlap.csv"  # per k: Jaccard overlap of the methods' neurons
METHOD_AGREEMENT = "method_agreement.csv"  # Spearman with single-neuron effects, top-k recall
COMPARISON_PLOT = "comparison.png"  # effect against k per method
COMPARISON_RECORD = "comparison.json"  # the validation/test split of the evaluation prompts, the null's settings
# with --eval_text the comparison above is on the real text; the own-continuation one moves to these two
CONTINUATION_COMPARISON = "continuation_comparison.csv"
CONTINUATION_VERDICT = "continuation_verdict.csv"
TEXT_BREAKDOWN = "text_breakdown.csv"  # real-text delta_nll by position in the window and by next token
DOSE_RESPONSE = "dose_response.csv"  # per k and method: its best variant's effect, CI and the winner's null band
DOSE_RESPONSE_PLOT = "dose_response.png"
# module subsets (d --modules): their effect against both nulls; with --eval_text the next tokens whose loss rises
# most, and where the module fires
MODULE_EFFECTS = "module_effects.csv"
MODULE_TOKENS = "module_tokens.csv"
MODULE_CONTEXTS = "module_contexts.csv"

# run_pipeline.sh's report (in the dataset directory)
REPORT = "report.md"
LAYER_ACTIVITY_PLOT = "activation_frequency_per_layer.png"
CARDS_DIR = "neuron_cards"  # f_render_neuron_cards.py's default --output (in the dataset directory)
CARDS_MD = "neuron_cards.md"
CARDS_HTML = "neurons.html"
# f_render_neuron_cards.py --neuronpedia DIR: Neuronpedia's export layout, DIR/{model}/{source}/ per layer
NEURONPEDIA_SET = "gelutrace-mlp"  # the source set; a layer's source id is "{layer}-" + this
NEURONPEDIA_SOURCE = "{layer}-" + NEURONPEDIA_SET
NEURONPEDIA_RELEASE = "release.jsonl"  # inside each source folder, as Neuronpedia's importer reads them
NEURONPEDIA_MODEL = "model.jsonl"
NEURONPEDIA_SOURCESET = "sourceset.jsonl"
NEURONPEDIA_SOURCE_FILE = "source.jsonl"
NEURONPEDIA_FEATURES = "features/batch-0.jsonl.gz"  # one record per neuron
NEURONPEDIA_ACTIVATIONS = "activations/batch-0.jsonl.gz"  # one record per top example
NEURONPEDIA_FILES = (NEURONPEDIA_RELEASE, NEURONPEDIA_MODEL, NEURONPEDIA_SOURCESET, NEURONPEDIA_SOURCE_FILE,
                     NEURONPEDIA_FEATURES, NEURONPEDIA_ACTIVATIONS)
PIPELINE_STAMPS = ".pipeline"  # one {stage}.cmd per stage: the command that made its outputs
LOCK_FILE = ".gelutrace.lock"  # in a directory a run is writing into: flock'ed while it runs

# --- columns ----------------------------------------------------------------------------------------------
PROMPT_COLUMNS = ["prompts", "number_of_new_tokens", "num_samples"]
ATTRIBUTE_COLUMNS = ["node_id", "layer", "dimension"]
# attribution: first-order estimate of each neuron's single zero-ablation delta_nll (empty when not computed)
HALVES = ("half_a", "half_b")  # the two halves of the selection data (gelutrace.stability): {column}_{half}
FREQUENCY_COLUMNS = ["neuron_id", "activation_count", "activation_frequency", "layer", "dimension", "mean_activation",
                     "attribution"] + [f"attribution_{h}" for h in HALVES]
NEURON_EFFECTS_COLUMNS = ["neuron_id", "delta_nll", "kl"] + [f"delta_nll_{h}" for h in HALVES]
# rank 0 is the largest value; context: up to CONTEXT_TOKENS tokens of text ending at the sample's position (the
# input there); token: prompt mode, the token the activations predict (the sample's generated token); corpus mode,
# the token at the position (the context's last); sample_id: corpus mode, the global token position
# ({m}_corpus.json's document_starts map it to a document and offset)
CONTEXT_TOKENS = 32
EDGE_FIDELITY_COLUMNS = ["src", "tgt", "pair", "decile", "direct", "layer_gap", "predicted", "measured"]
EDGE_FIDELITY_SUMMARY_COLUMNS = ["layer_gap", "edges", "spearman", "beta", "r2_through_0", "store_uid"]
TOP_EXAMPLES_COLUMNS = ["neuron_id", "rank", "value", "sample_id", "context", "token"]
RESULT_COLUMNS = ["prompt", "sample_index", "generated_text", "perturbation_subset"]
MODULE_EFFECTS_COLUMNS = ["subset", "weight", "module", "k", "layers", "metric", "delta_nll", "ci_low", "ci_high", "kl",
                          "random_mean", "p_random", "p_random_holm", "weighted_mean", "p_weighted",
                          "p_weighted_holm", "control_weights", "top_tokens"]
MODULE_TOKENS_COLUMNS = ["subset", "module", "rank", "token_id", "token", "tokens", "nll", "delta_nll"]
MODULE_CONTEXTS_COLUMNS = ["subset", "module", "rank", "mean_activation", "position", "token", "context"]
TEXT_BREAKDOWN_COLUMNS = ["subset", "k", "breakdown", "bucket", "token_id", "tokens", "nll", "delta_nll"]
DOSE_RESPONSE_COLUMNS = ["k", "method", "variant", "subset", "delta_nll", "delta_nll_ci_low", "delta_nll_ci_high",
                         "kl", "winner", "random_n", "random_q05", "random_q50", "random_q95", "p_random",
                         "p_random_holm"]
HIST_COLUMNS = ["bin_start", "bin_end", "density"]
THRESHOLD_COLUMNS = ["threshold", "num_nodes", "num_edges", "num_components", "max_comp_size", "avg_comp_size",
                     "min_comp_size"]


def dataset_columns(n_layer: int) -> list[str]:
    return (["sample_id", "prompt_sample_idx", "token_position", "input_text", "output", "input_text_ids",
             "output_id", "number_of_active_neurons"]
            + [f"layer_{i}_num_active_neurons" for i in range(n_layer)])


def path(directory, template: str, m: str) -> Path:
    return Path(directory) / template.format(m=m)


def weighted_name(name: str, weight: str) -> str:
    """A weight-dependent c_analyze file's name: `name` for the default weight, else WEIGHT_SUFFIX ends its stem
    (threshold_analysis.csv -> threshold_analysis_phi.csv)."""
    if weight == DEFAULT_WEIGHT:
        return name
    p = Path(name)
    return p.stem + WEIGHT_SUFFIX.format(weight=weight) + p.suffix


def subset_name(m: str, method: str, threshold: float | None, ratio: float | None, weight: str | None,
                k: int | None = None) -> str:
    """
    A stage-d subset's file name; `weight` is None for methods that do not use the graph's edge weights, and
    `threshold` None for those that use no graph at all. A subset given by its size k (ratio None) ends in
    _k{k} instead of _r{ratio}.
    """
    size = f"r{float(ratio)!r}" if ratio is not None else f"k{int(k)}"
    if threshold is None:
        return SUBSET_FILE_NO_GRAPH.format(m=m, method=method, size=size)
    template = SUBSET_FILE if weight in (None, DEFAULT_WEIGHT) else SUBSET_FILE_WEIGHTED
    return template.format(m=m, method=method, weight=weight, threshold=repr(float(threshold)), size=size)


# --- atomic writes ----------------------------------------------------------------------------------------
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target):
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(target, mode="w", **kwargs):
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def check_output_dir(directory, flag: str) -> Path:
    """
    Check up front, without creating anything, that an output directory exists or can be created, so a bad
    location fails before the heavy work (writers create it when they write).
    """
    d = Path(directory)
    for parent in [d, *d.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise PipelineError(f"{flag} {d}: {parent} exists and is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PipelineError(f"{flag} {d}: {parent} is not writable")
            break
    return d


_held_locks: dict = {}  # lock file path -> its open file: held until released or the process ends
LOCK_FD_ENV = "GELUTRACE_LOCK_FD"  # run_pipeline.sh: the descriptor of the lock it holds, which its stages inherit


def _busy(d: Path, what: str) -> PipelineError:
    return PipelineError(f"another run is writing into {d} (it holds {d / LOCK_FILE}); wait for it to end or write "
                         f"elsewhere ({what})")


def lock_on_descriptor(fd: int, directory, what: str):
    """Take `directory`'s writer lock on the open descriptor `fd` of its LOCK_FILE (run_pipeline.sh's, which its
    stages inherit: a flock belongs to the open file, so they share it), or refuse."""
    d = Path(directory)
    held, mine = os.fstat(fd), (d / LOCK_FILE).stat()
    if (held.st_dev, held.st_ino) != (mine.st_dev, mine.st_ino):
        raise PipelineError(f"descriptor {fd} is not {d / LOCK_FILE}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds on the lock's own open file
    except BlockingIOError:
        raise _busy(d, what) from None


def _inherited_lock(directory: Path) -> bool:
    """Whether this process inherited the open file on which run_pipeline.sh holds `directory`'s lock (LOCK_FD_ENV
    names its descriptor), so that the stages the driver runs write under its lock while any other process, opening
    the file anew, is refused."""
    fd = os.environ.get(LOCK_FD_ENV, "")
    if not fd.isdigit():
        return False
    try:
        lock_on_descriptor(int(fd), directory, "")
    except (OSError, PipelineError):
        return False
    return True


_call_locks = threading.local()  # .held: the lock files the calls of locked() in this thread hold


def _lock_key(directory) -> str:
    return str((Path(directory) / LOCK_FILE).resolve())


def _held_by_call(key: str) -> bool:
    return key in getattr(_call_locks, "held", ())


def _flock(d: Path, what: str):
    """A new open file description of d's LOCK_FILE, exclusively flock'ed (flock conflicts between two opens of
    one file, in one process or two), or the refusal."""
    f = open(d / LOCK_FILE, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise _busy(d, what) from None
    return f


def lock_directory(directory, what: str) -> Path:
    """
    Take the directory's writer lock (an exclusive flock on LOCK_FILE inside it) until release_locks() or the
    end of the process, or refuse at once: two runs writing into one directory would mix their outputs. The
    kernel releases the lock when the process exits, also on a crash or kill -9, so a stale lock never blocks
    the next run. A script that already holds the lock takes it again freely; within a locked() block (a library
    call) the block's lock stands for it, and is released with the block; a stage that run_pipeline.sh runs shares
    the driver's lock (_inherited_lock).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = _lock_key(d)
    if key in _held_locks or _held_by_call(key) or _inherited_lock(d):
        return d
    _held_locks[key] = _flock(d, what)
    return d


def release_locks():
    while _held_locks:
        _, f = _held_locks.popitem()
        f.close()  # closing the file drops its flock


@contextlib.contextmanager
def locked(directory, what: str):
    """
    The directory's writer lock for the block only, for library calls, whose process goes on: taken on a new
    open file description, so that it excludes every other holder, another thread's call in this process
    included, and released when the block ends. Inside the block, lock_directory on the same directory (the
    stage code the call runs) takes nothing more. A lock this process's script already holds stands for it.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = _lock_key(d)
    if key in _held_locks or _held_by_call(key):
        yield d
        return
    f = _flock(d, what)
    held = _call_locks.__dict__.setdefault("held", set())
    held.add(key)
    try:
        yield d
    finally:
        held.discard(key)
        f.close()


@contextlib.contextmanager
def removed_if_unused(directory):
    """
    Around a stage's lock and its reading of the inputs (the lock taken before the heavy work): when the block
    fails, the directories it created (`directory` and any missing parents) are removed again if they hold nothing
    but the lock file, so a refused input leaves nothing behind, as a check before the lock does.
    """
    d = Path(directory).absolute()
    created = [p for p in [d, *d.parents] if not os.path.lexists(p)]
    try:
        yield
    except BaseException:
        for p in created:  # deepest first; rmdir keeps any directory something else was written into
            with contextlib.suppress(OSError):
                if p == d and [q.name for q in p.iterdir()] == [LOCK_FILE]:
                    (p / LOCK_FILE).unlink()
                p.rmdir()
        raise


def write_csv(df: pd.DataFrame, target, **kwargs):
    with atomic_path(target) as tmp:
        df.to_csv(tmp, index=False, **kwargs)


def write_top_examples(target, values: np.ndarray, sample_ids: np.ndarray, text: dict):
    """
    {m}_neuron_top_examples.csv (TOP_EXAMPLES_COLUMNS) from the (k', N) top values and sample ids in rank order
    and each sample's (context, token) texts: every neuron in id order, rank 0 first. Each sample's two text
    fields are quoted once (as pandas and the csv module quote) and the lines joined: several times faster than
    a CSV writer over the hundreds of thousands of rows. Floats are written as their round-trip repr.
    """
    quoted = {}
    for s, fields in text.items():
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerow(fields)  # fields holding \r or \n are quoted
        quoted[s] = buf.getvalue()[:-2]
    k, n = np.shape(sample_ids)
    columns = (np.repeat(np.arange(n), k).tolist(), np.tile(np.arange(k), n).tolist(),
               np.asarray(values, np.float64).T.ravel().tolist(), np.asarray(sample_ids).T.ravel().tolist())
    with atomic_open(target, "w", newline="", encoding="utf-8") as f:
        f.write(",".join(TOP_EXAMPLES_COLUMNS) + "\n")
        f.writelines(f"{a},{b},{v!r},{s},{quoted[s]}\n" for a, b, v, s in zip(*columns))


@contextlib.contextmanager
def atomic_dir(target):
    """
    Yield a new, empty version of directory `target` to fill; on success switch `target` to it atomically.
    `target` is a symbolic link to its current version, `.{name}.v{id}` beside it, and the switch is one
    rename of a new link over it, so a reader finds the old version or the new one, complete, whatever
    happens; the old version is removed afterwards. Leftovers of a killed run are cleaned up on the next.
    A plain directory (a store written by an older version) is replaced the same way.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise PipelineError(f"{target} exists and is not a directory")
    _clean_versions(target)
    version = new_version(target)
    try:
        yield version
        switch_dir(target, version)
    except BaseException:
        if not (target.is_symlink() and target.resolve() == version.resolve()):  # not switched to it
            shutil.rmtree(version, ignore_errors=True)
        raise


def new_version(target) -> Path:
    """A new, empty version directory of `target`, beside it (see atomic_dir)."""
    import uuid
    target = Path(target)
    version = target.parent / f".{target.name}.v{uuid.uuid4().hex[:12]}"
    version.mkdir()  # the usual umask-based mode
    return version


def switch_dir(target, version):
    """
    Make `target` a link to `version` (a directory beside it that new_version named) by one rename of a new link
    over it, then remove the version it pointed to; a plain directory in its place is swapped out first.
    """
    target, version = Path(target), Path(version)
    tag = version.name[len(f".{target.name}.v"):]
    link = target.parent / f".{target.name}.link{tag}"
    try:
        os.symlink(version.name, link)
        old = own_version(target)
        if target.is_dir() and not target.is_symlink():
            legacy = target.parent / f".{target.name}.legacy{tag}"
            os.replace(target, legacy)  # a crash before the next line is undone by _clean_versions
            os.replace(link, target)
            shutil.rmtree(legacy, ignore_errors=True)
        else:
            os.replace(link, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        raise
    if old is not None and old.name != version.name:
        shutil.rmtree(old, ignore_errors=True)


def own_version(target) -> Path | None:
    """The version directory `target` links to when it is a link that new_version made (a `.{name}.v*` beside
    it, existing or not); None for anything else, a link to elsewhere included, which is never removed."""
    target = Path(target)
    if not target.is_symlink():
        return None
    version = target.parent / os.readlink(target)
    if version.parent == target.parent and version.name.startswith(f".{target.name}.v"):
        return version
    return None


def remove_dir(target):
    """Remove a versioned directory (its link, then the version beside it) or a plain one; a link to anywhere else
    is removed, not what it points to."""
    target = Path(target)
    if target.is_symlink():
        version = own_version(target)
        target.unlink()
        if version is not None:
            shutil.rmtree(version, ignore_errors=True)
    elif target.is_dir():
        shutil.rmtree(target)


def recover_dir(target) -> Path:
    """Put back a plain directory whose switch to a versioned one was cut short (see atomic_dir)."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        for legacy in sorted(target.parent.glob(f".{target.name}.legacy*")):
            os.replace(legacy, target)
            break
    return target


def _clean_versions(target: Path):
    """Remove what killed runs left beside `target`; restore a replaced plain directory if the switch was cut."""
    recover_dir(target)
    current = target.resolve() if target.is_symlink() else None
    for p in target.parent.glob(f".{target.name}.*"):
        if not any(p.name.startswith(f".{target.name}.{kind}") for kind in ("v", "link", "legacy")):
            continue
        if current is not None and p.resolve() == current:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


# --- output sets: all files of one run, or none of them ---------------------------------------------------
def file_sha256(p) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listing(files, root: Path) -> dict:
    return {Path(f).relative_to(root).as_posix(): {"size": Path(f).stat().st_size, "sha256": file_sha256(f)}
            for f in files}


def store_files(store) -> list[Path]:
    """The files of a store directory, named through its link (as a manifest lists them)."""
    return sorted(p for p in Path(store).iterdir() if p.is_file())


def disk_full(e: BaseException, where) -> bool:
    """Whether a failed write ran out of room: ENOSPC or EDQUOT, or an OSError without an errno (numpy's '...
    requested and ... written') on a filesystem with less than 1 MiB left."""
    import errno
    if not isinstance(e, OSError):
        return False
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if e.errno is None:
        try:
            st = os.statvfs(where)
            return st.f_bavail * st.f_frsize < 1 << 20
        except OSError:
            return False
    return False


_TEMPORARY = re.compile(r"\..*(\.tmp|staging.*|\.v[0-9a-f]+|_partial)")  # atomic_path, OutputSet, atomic_dir, --resume


def disk_full_directory(e: BaseException) -> Path | None:
    """For a write that ran out of room (ENOSPC, EDQUOT): the directory it wrote into, as the user named it: the
    file's directory above any temporary or staging folder of ours (which a failure removes), or, when the error
    names no file, the directory this process last locked for writing; None for any other error."""
    import errno
    if not isinstance(e, OSError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    if e.filename:
        d = Path(os.path.abspath(os.fsdecode(e.filename))).parent
        while d != d.parent and (_TEMPORARY.fullmatch(d.name) or not d.is_dir()):
            d = d.parent
        return d
    if _held_locks:
        return Path(list(_held_locks)[-1]).parent
    return None


class OutputSet:
    """
    The files of one run, written beside the earlier run's and swapped in together, so that a failure while
    writing them (an error, a full disk, an interrupt) leaves the earlier files byte for byte as they were:

        with sf.OutputSet(directory, manifest, owned, "stage b") as out:
            write_csv(df, path(out.dir, FREQUENCY, m))   # every file under its own name, in out.dir
            ...
            out.vouch([...])                              # the files of out.dir the manifest lists

    `out.dir` is a staging directory inside `directory` (so on the same filesystem); a store directory written
    there with atomic_dir moves with the files. Once every file is staged, the manifest is marked `writing` by a
    rename, each staged file is renamed over its target (a store is switched to its new version, as atomic_dir
    does), the `owned` names this run did not write are removed, and the complete manifest (each vouched file's
    size and sha256) is renamed in last; a staged plain directory has its files renamed into the target's. Renames
    need no room on the disk; only a crash among them leaves the
    manifest at `writing`, which readers refuse. A run needs room for its files beside the earlier ones. The
    leftovers of a killed run are removed by the next.
    """

    def __init__(self, directory, manifest, owned=(), what: str = "the run"):
        self.target, self.manifest = Path(directory), Path(manifest)
        self.owned, self.what = tuple(owned), what
        self.vouched: list[Path] = []

    def __enter__(self) -> "OutputSet":
        try:
            self.target.mkdir(parents=True, exist_ok=True)
            for old in self.target.glob(f".{self.manifest.name}.staging*"):
                shutil.rmtree(old, ignore_errors=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.manifest.name}.staging", dir=self.target))
            os.chmod(self.dir, 0o777 & ~_UMASK)
        except OSError as e:
            self._refuse(e)
            raise
        return self

    def vouch(self, files):
        self.vouched = [Path(f) for f in files]

    def __exit__(self, kind, exc, tb):
        if kind is None:
            try:
                write_json({"state": "writing", "run": self._run()}, self.dir / self._WRITING, indent=2)
                write_json({"state": "complete", "run": self._run(), "files": _listing(self.vouched, self.dir)},
                           self.dir / self.manifest.name, indent=2)
            except BaseException as e:
                exc = e
        if exc is None:
            self._swap()
            return False
        try:
            self._refuse(exc)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        if kind is None:
            raise exc
        return False

    _WRITING = ".writing.json"

    def _run(self) -> str:
        if not hasattr(self, "_id"):
            import uuid
            self._id = uuid.uuid4().hex
        return self._id

    def _refuse(self, e: BaseException):
        if disk_full(e, self.target if not hasattr(self, "dir") else self.dir):
            raise PipelineError(f"no space left on {self.target} (disk full) while writing {self.what}'s files; the "
                                f"earlier files there are unchanged") from None

    def _swap(self):
        names = set(os.listdir(self.dir)) - {self.manifest.name, self._WRITING}
        stores = {n: os.readlink(self.dir / n) for n in names if (self.dir / n).is_symlink()}
        staged = sorted(names - set(stores.values()))
        os.replace(self.dir / self._WRITING, self.manifest)  # from here until the last rename, readers refuse
        for name in staged:
            src, dst = self.dir / name, self.target / name
            if name in stores:  # a store written with atomic_dir: move its version out, then switch to it
                version = self.target / stores[name]
                os.replace(self.dir / stores[name], version)
                recover_dir(dst)
                switch_dir(dst, version)
                _clean_versions(dst)
            elif src.is_dir():  # a plain directory: its files renamed over the target's, the others kept
                dst.mkdir(exist_ok=True)
                for f in sorted(os.listdir(src)):
                    os.replace(src / f, dst / f)
            else:
                os.replace(src, dst)
        for name in set(self.owned) - set(staged):
            p = self.target / name
            if p.is_dir():
                remove_dir(p)
            elif p.is_symlink() or p.exists():
                p.unlink()
        os.replace(self.dir / self.manifest.name, self.manifest)
        shutil.rmtree(self.dir, ignore_errors=True)


def verify_output_set(manifest, files, what: str, required: bool = False):
    """
    Refuse files that do not all come from the run the manifest records (an interrupted write, or a file
    replaced since). A directory without a manifest (written by hand or an older version) is taken as it is,
    unless `required`.
    """
    m = Path(manifest)
    if not m.is_file():
        if required:
            raise PipelineError(f"{m.parent} has no {m.name} to vouch for its files (written by hand or an older "
                                f"version?); rerun {what}")
        return
    try:
        rec = json.loads(m.read_text())
        state, listed = rec["state"], rec.get("files", {})
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise PipelineError(f"{m} is damaged; rerun {what}") from None
    if state != "complete":
        raise PipelineError(f"{m.parent}: the last {what} run stopped while writing its files, so they may mix two "
                            f"runs; rerun {what}")
    for f in map(Path, files):
        rel = f.relative_to(m.parent).as_posix()
        want = listed.get(rel)
        if want is None or not f.is_file():
            raise PipelineError(f"{f} is not part of the run {m.name} records; rerun {what}")
        if f.stat().st_size != want["size"] or file_sha256(f) != want["sha256"]:
            raise PipelineError(f"{f} was changed or replaced after the run {m.name} records; rerun {what}")


def manifest_lists(manifest, name: str) -> bool:
    """Whether a complete manifest lists the file `name` (relative to its directory); False without one."""
    try:
        rec = json.loads(Path(manifest).read_text())
        return rec.get("state") == "complete" and name in rec.get("files", {})
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return False


def write_json(obj, target, indent=None):
    with atomic_open(target, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


class _Writes:
    """A file descriptor as the file object numpy writes a .npy through: every write an os.write, so a full disk
    raises ENOSPC (ndarray.tofile, numpy's way into a real file, raises an OSError without errno: '... requested
    and ... written')."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        while len(view):
            view = view[os.write(self.fd, view):]
        return len(data)


@contextlib.contextmanager
def _raw_file(target):
    """A new file (its permissions as open()'s) to write through os.write (_Writes): a failure keeps its errno and
    names the file."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        yield _Writes(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(target)) from None
    finally:
        os.close(fd)


def write_bytes(data, target):
    with _raw_file(target) as f:
        f.write(data)


def save_npy(target, array: np.ndarray):
    """np.save(target, array) (target named as given: name it .npy), written through os.write."""
    with _raw_file(target) as f:
        np.save(f, np.asanyarray(array), allow_pickle=False)


def write_npy(array: np.ndarray, target):
    with atomic_path(target) as tmp:
        save_npy(tmp, array)


def write_npz(target, compress=True, **arrays):
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)


def frequency_table(counts: np.ndarray, value_sum: np.ndarray, samples: int, d_mlp: int,
                    attribution: np.ndarray | None = None, attribution_halves: np.ndarray | None = None) -> pd.DataFrame:
    """{m}_neuron_frequency.csv's rows, every neuron in id order; attribution (and its (2, N) halves) is empty when
    not computed."""
    ids = np.arange(len(counts))
    empty = np.full(len(ids), np.nan)
    halves = {f"attribution_{h}": empty if attribution_halves is None else attribution_halves[i]
              for i, h in enumerate(HALVES)}
    return pd.DataFrame({
        "neuron_id": ids, "activation_count": counts,
        "activation_frequency": counts / samples if samples else np.zeros(len(ids)),
        "layer": ids // d_mlp, "dimension": ids % d_mlp,
        "mean_activation": value_sum / samples if samples else np.zeros(len(ids)),
        "attribution": empty if attribution is None else attribution, **halves,
    }, columns=FREQUENCY_COLUMNS)


# --- prompt CSV -------------------------------------------------------------------------------------------
MAX_PER_PROMPT = 1_000_000  # new tokens or samples of one prompt: beyond this a CSV is a typo, not a plan


@dataclass
class Prompt:
    text: str
    new_tokens: int
    num_samples: int


def _check_field_counts(p: Path):
    """Every row has as many fields as the header (pandas would silently shift a longer row into its index)."""
    import csv
    try:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            for row in reader:
                if row and len(row) != len(header):
                    raise PipelineError(f"{p} line {reader.line_num}: {len(row)} fields, but the header has "
                                        f"{len(header)} ({', '.join(header)}); quote prompts that hold commas")
    except (UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"cannot parse prompt CSV {p}: {e}") from None


def read_prompts(csv_path) -> list[Prompt]:
    """The prompts of a prompt CSV, validated: one PipelineError naming the first problem."""
    p = Path(csv_path)
    if not p.is_file():
        raise PipelineError(f"prompt CSV {p} does not exist")
    _check_field_counts(p)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8")
    except Exception as e:
        raise PipelineError(f"cannot parse prompt CSV {p}: {e}") from None
    missing = [c for c in PROMPT_COLUMNS[:2] if c not in df.columns]
    if missing:
        raise PipelineError(f"prompt CSV {p} lacks column(s) {', '.join(missing)} "
                            f"(needs {', '.join(PROMPT_COLUMNS)}; num_samples is optional)")
    if len(df) == 0:
        raise PipelineError(f"prompt CSV {p} has no prompts")
    prompts = []
    for i, row in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        text = row["prompts"]
        if not text.strip():
            raise PipelineError(f"{p} line {i}: empty prompt")
        counts = {}
        for col, default in (("number_of_new_tokens", None), ("num_samples", "1")):
            raw = str(row.get(col, "") or default or "").strip()
            try:
                value = int(raw)
            except ValueError:
                raise PipelineError(f"{p} line {i}: {col} must be a non-negative integer, got {raw!r}") from None
            if value > MAX_PER_PROMPT:
                raise PipelineError(f"{p} line {i}: {col} = {value} is more than {MAX_PER_PROMPT:,} per prompt")
            if value < 0 or (col == "num_samples" and value == 0):
                raise PipelineError(f"{p} line {i}: {col} must be {'positive' if col == 'num_samples' else 'non-negative'}, got {value}")
            counts[col] = value
        prompts.append(Prompt(text, counts["number_of_new_tokens"], counts["num_samples"]))
    if not any(q.new_tokens for q in prompts):
        raise PipelineError(f"prompt CSV {p}: every prompt asks for 0 new tokens, so there is nothing to generate")
    return prompts


# --- stage a: neurons, edges, graph metadata -------------------------------------------------------------
def neuron_attributes(n_layer: int, d_mlp: int) -> pd.DataFrame:
    ids = np.arange(n_layer * d_mlp, dtype=np.int64)
    return pd.DataFrame({"node_id": ids, "layer": ids // d_mlp, "dimension": ids % d_mlp})


def read_attributes(directory, m: str) -> pd.DataFrame:
    p = path(directory, ATTRIBUTES, m)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist (stage a or b writes it)")
    df = pd.read_csv(p)
    if list(df.columns[:3]) != ATTRIBUTE_COLUMNS:
        raise PipelineError(f"{p}: expected columns {', '.join(ATTRIBUTE_COLUMNS)}")
    return df


def canonical_edges_size(n_layer: int, d_mlp: int) -> int:
    """Bytes of the canonical .el: every neuron of layer i to every neuron of layer i+1, 'src tgt\\n'."""
    ids = np.arange(n_layer * d_mlp)
    digits = np.char.str_len(ids.astype(str)) if len(ids) else np.zeros(0, int)
    per_layer = digits.reshape(n_layer, d_mlp).sum(axis=1)
    # each src of layer i appears d_mlp times, each tgt of layer i+1 appears d_mlp times
    return int(sum(d_mlp * (per_layer[i] + per_layer[i + 1]) + 2 * d_mlp * d_mlp for i in range(n_layer - 1)))


def _digits(ids: np.ndarray) -> np.ndarray:
    """ASCII digits of non-negative ids as a (len, width) uint8 array, right-aligned (all ids share a width)."""
    width = len(str(int(ids.max()))) if len(ids) else 1
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (ids[:, None] // powers % 10 + ord("0")).astype(np.uint8)


def _width_groups(ids: np.ndarray) -> list[np.ndarray]:
    """Consecutive runs of sorted ids that print with the same number of digits."""
    widths = np.char.str_len(ids.astype(str))
    return np.split(ids, np.flatnonzero(np.diff(widths)) + 1)


def write_edges(target, n_layer: int, d_mlp: int, progress=None, rows_per_write: int = 256):
    """
    Stream the canonical adjacent-layer edge list 'src tgt\n', vectorised: a block of sources is written as
    one (sources x targets x line-bytes) array, with the digits broadcast into place.
    """
    with atomic_open(target, "wb") as f:
        for layer in range(n_layer - 1):
            tgt_groups = _width_groups(np.arange((layer + 1) * d_mlp, (layer + 2) * d_mlp, dtype=np.int64))
            for src_group in _width_groups(np.arange(layer * d_mlp, (layer + 1) * d_mlp, dtype=np.int64)):
                for lo in range(0, len(src_group), rows_per_write):
                    src = _digits(src_group[lo:lo + rows_per_write])
                    ws = src.shape[1]
                    parts = []
                    for tgt_ids in tgt_groups:
                        tgt = _digits(tgt_ids)
                        wt = tgt.shape[1]
                        block = np.empty((len(src), len(tgt), ws + wt + 2), dtype=np.uint8)
                        block[:, :, :ws] = src[:, None, :]
                        block[:, :, ws] = ord(" ")
                        block[:, :, ws + 1:ws + 1 + wt] = tgt[None, :, :]
                        block[:, :, -1] = ord("\n")
                        parts.append(block.reshape(len(src), -1))
                    f.write((np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]).tobytes())
            if progress is not None:
                progress.update(1)


def graph_meta(m: str, n_layer: int, d_mlp: int, edges_file: Path | None, site: dict | None = None) -> dict:
    """site: the architecture and neuron-site definition (gelutrace.sites.site_info), recorded as given."""
    meta = {"model": m, "n_layer": n_layer, "d_mlp": d_mlp, "num_neurons": n_layer * d_mlp,
            "layer_sizes": [d_mlp] * n_layer, "connectivity": "adjacent_full",
            "num_edges": (n_layer - 1) * d_mlp * d_mlp, "edges_file": None, **(site or {})}
    if edges_file is not None:
        st = Path(edges_file).stat()
        meta["edges_file"] = {"name": Path(edges_file).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return meta


def write_graph_files(directory, m: str, n_layer: int, d_mlp: int, write_el: bool = True, progress=None,
                      site: dict | None = None):
    """Stage a's files: attributes, (optionally) the canonical .el, and the metadata that describes them."""
    write_csv(neuron_attributes(n_layer, d_mlp), path(directory, ATTRIBUTES, m))
    el = path(directory, EDGES, m)
    if write_el:
        write_edges(el, n_layer, d_mlp, progress)
    write_json(graph_meta(m, n_layer, d_mlp, el if write_el else None, site), path(directory, GRAPH_META, m), indent=2)


def write_graph_files_if_stale(directory, m: str, n_layer: int, d_mlp: int, write_el: bool = True, progress=None,
                               site: dict | None = None, into=None):
    """
    Stage a's files, keeping an existing canonical .el of the same shape in `directory` instead of writing it
    again. They are written into `into` (an OutputSet's staging directory) when given, else into `directory`.
    """
    into = directory if into is None else into
    try:
        meta = read_graph_meta(directory, m)
        same = (meta.get("n_layer"), meta.get("d_mlp")) == (n_layer, d_mlp) and meta.get("edges_file")
        if same and path(directory, EDGES, m).is_file() and edges_are_canonical(directory, m, meta):
            write_csv(neuron_attributes(n_layer, d_mlp), path(into, ATTRIBUTES, m))
            if Path(into) != Path(directory) or (site is not None and any(meta.get(k) != v for k, v in site.items())):
                write_json({**meta, **(site or {})}, path(into, GRAPH_META, m), indent=2)
            return
    except PipelineError:
        pass
    write_graph_files(into, m, n_layer, d_mlp, write_el, progress, site)


def read_graph_meta(directory, m: str) -> dict:
    p = path(directory, GRAPH_META, m)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist (stage a or b writes it)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{p} is not valid JSON: {e}") from None


def edges_are_canonical(directory, m: str, meta: dict) -> bool:
    """True when the .el is absent or exactly the file stage a/b wrote; False when a user edited it."""
    el = path(directory, EDGES, m)
    if not el.is_file():
        return True
    rec = meta.get("edges_file")
    if not rec:
        return False  # an .el nobody recorded: honour it
    st = el.stat()
    return st.st_size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]


def read_edges(directory, m: str) -> np.ndarray:
    """A (user-edited) edge list as an (E, 2) int64 array; the canonical one is never parsed."""
    el = path(directory, EDGES, m)
    try:
        data = np.loadtxt(el, dtype=np.int64, ndmin=2)
    except Exception as e:
        raise PipelineError(f"cannot parse edge list {el}: {e}") from None
    if data.size and data.shape[1] != 2:
        raise PipelineError(f"{el}: expected two ids per line")
    return data.reshape(-1, 2)


# --- stage b: activation matrix ---------------------------------------------------------------------------
def write_activation_matrix(target, active: np.ndarray, neuron_ids: np.ndarray | None = None):
    """Save a samples x neurons boolean matrix (see write_packed_activation_matrix for the format)."""
    active = np.asarray(active, dtype=bool)
    write_packed_activation_matrix(target, np.packbits(active, axis=1), active.shape[1], neuron_ids)


def write_packed_activation_matrix(target, packed: np.ndarray, n_neurons: int, neuron_ids: np.ndarray | None = None):
    """
    The activation matrix, bit-packed along the neuron axis (np.packbits, 1 bit per entry): keys `matrix`
    (uint8, samples x ceil(neurons / 8)), `matrix_shape` (samples, neurons), `neuron_ids` (the neuron id
    of each column) and `packing` ('packbits_axis1'). Read it with `read_activation_matrix`.
    """
    ids = np.arange(n_neurons, dtype=np.int64) if neuron_ids is None else np.asarray(neuron_ids, np.int64)
    write_npz(target, matrix=packed, matrix_shape=np.array([len(packed), n_neurons], dtype=np.int64),
              neuron_ids=ids, packing=np.array("packbits_axis1"))


def read_packed_activation_matrix(source):
    """
    (packed, n_neurons, neuron_ids) from a stage-b `.npz` without unpacking it: packed is the uint8
    np.packbits(active, axis=1) matrix. Loads without pickle; the original pipeline's unpacked 0/1 `matrix` is
    packed on reading.
    """
    p = Path(source)
    if not p.is_file():
        raise PipelineError(f"activation matrix {p} does not exist (stage b writes it)")
    try:
        with np.load(p, allow_pickle=False) as z:
            ids = z["neuron_ids"].astype(np.int64)
            if "packing" in z.files:
                n_samples, n_neurons = (int(x) for x in z["matrix_shape"])
                packed = z["matrix"]
                if packed.dtype != np.uint8 or packed.shape != (n_samples, (n_neurons + 7) // 8):
                    raise ValueError(f"packed matrix of shape {packed.shape}, expected {n_samples} x "
                                     f"{(n_neurons + 7) // 8} bytes")
            else:
                matrix = z["matrix"] != 0
                n_neurons = matrix.shape[1]
                packed = np.packbits(matrix, axis=1)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"cannot read activation matrix {p}: {e}") from None
    if n_neurons != len(ids):
        raise PipelineError(f"{p}: {n_neurons} columns but {len(ids)} neuron ids")
    return packed, n_neurons, ids


def read_activation_matrix(source, sparse: bool = False):
    """
    (matrix, neuron_ids) from a stage-b `.npz`: matrix is a boolean numpy array (samples x neurons), or a
    scipy.sparse CSR matrix of int8 ones with `sparse=True`. Loads without pickle. Also reads the original
    pipeline's unpacked 0/1 `matrix`.
    """
    packed, n_neurons, ids = read_packed_activation_matrix(source)
    matrix = np.unpackbits(packed, axis=1, count=n_neurons).view(bool).reshape(len(packed), n_neurons)
    if sparse:
        import scipy.sparse as sp
        return sp.csr_matrix(matrix, dtype=np.int8), ids
    return matrix, ids


def model_prefix(directory, suffix_template: str = MATRIX) -> str:
    """Infer {m} from the single file in `directory` named like suffix_template (e.g. *_activation_matrix.npz)."""
    suffix = suffix_template.format(m="")
    found = sorted(p.name[: -len(suffix)] for p in Path(directory).glob("*" + suffix))
    if not found:
        raise PipelineError(f"no *{suffix} in {directory}")
    if len(found) > 1:
        raise PipelineError(f"several models' files in {directory} ({', '.join(found)}): keep one per directory")
    return found[0]


class _ByteTables:
    """Byte strings per neuron (one per table), to concatenate those of each sample's active neurons with numpy
    gathers: a Python join over every active neuron of every sample costs seconds per thousand samples. Ids
    whose strings keep their lengths form runs (the strings of growing ids grow), gathered as fixed-size items."""

    def __init__(self, *tables: list[bytes]):
        lengths = np.array([[len(b) for b in t] for t in tables], np.int64).reshape(len(tables), -1)
        cuts = np.flatnonzero(np.diff(lengths, axis=1).any(axis=0)) + 1
        bounds = list(zip(np.r_[0, cuts].tolist(), np.r_[cuts, lengths.shape[1]].tolist()))
        self.runs = [(lo, hi, [np.frombuffer(b"".join(t[lo:hi]), f"V{len(t[lo])}") for t in tables])
                     for lo, hi in bounds if hi > lo]
        self.n_tables = len(tables)

    def rows(self, bits: np.ndarray) -> list[list[bytes]]:
        """For each table, each row of a bool (rows x neurons) block: its set columns' strings in id order."""
        parts = [[] for _ in range(self.n_tables)]
        for lo, hi, tables in self.runs:
            sub = bits[:, lo:hi]
            cols = np.nonzero(sub)[1]
            counts = np.cumsum(sub.sum(axis=1))
            for part, table in zip(parts, tables):
                buf, ends = table[cols].tobytes(), counts * table.itemsize
                part.append([buf[a:b] for a, b in zip(np.r_[0, ends[:-1]].tolist(), ends.tolist())])
        return [[b"".join(r) for r in zip(*p)] if p else [b""] * len(bits) for p in parts]


def write_activation_lists(directory, m: str, packed: np.ndarray, n_neurons: int, block: int = 64):
    """
    `{m}_neuron_activations.json` and `.pickle`: {str(sample_id): sorted list of active neuron ids}, as the
    original wrote them, streamed a block of samples at a time (the lists of a big run would not fit in
    memory as Python objects). The pickle is written opcode by opcode (protocol 2, no memo), so that
    `pickle.load` returns the plain dict.
    """
    strings = _ByteTables([str(i).encode() + b", " for i in range(n_neurons)],
                          [_pickle_int(i) for i in range(n_neurons)])
    with atomic_open(path(directory, ACTIVATIONS_JSON, m), "wb") as fj, \
            atomic_open(path(directory, ACTIVATIONS_PICKLE, m), "wb") as fp:
        fj.write(b"{")
        fp.write(b"\x80\x02}")  # PROTO 2, EMPTY_DICT
        for lo in range(0, len(packed), block):
            rows = np.unpackbits(packed[lo:lo + block], axis=1, count=n_neurons).view(bool)
            fp.write(b"(")  # MARK: the block's key/value pairs follow, then SETITEMS
            json_rows, pickle_rows = strings.rows(rows)
            for k in range(len(rows)):
                sid = lo + k
                key = str(sid).encode()
                fj.write((b", " if sid else b"") + b'"' + key + b'": [' + json_rows[k][:-2] + b"]")
                fp.write(b"X" + len(key).to_bytes(4, "little") + key)  # BINUNICODE
                fp.write(b"](" + pickle_rows[k] + b"e")  # EMPTY_LIST MARK ints APPENDS
            fp.write(b"u")
        fj.write(b"}\n")
        fp.write(b".")


def _pickle_int(i: int) -> bytes:
    """The pickle opcode pushing a non-negative int: BININT1 (< 256), BININT2 (< 65536) or BININT."""
    if i < 256:
        return b"K" + i.to_bytes(1, "little")
    if i < 65536:
        return b"M" + i.to_bytes(2, "little")
    return b"J" + i.to_bytes(4, "little", signed=True)


def packed_counts(packed: np.ndarray, n_neurons: int, n_layer: int, block: int = 1024):
    """Per-neuron activation counts (N,) and per-sample, per-layer active counts (S, L) of a bit-packed matrix."""
    counts = np.zeros(n_neurons, dtype=np.int64)
    per_layer = np.zeros((len(packed), n_layer), dtype=np.int64)
    for lo in range(0, len(packed), block):
        rows = np.unpackbits(packed[lo:lo + block], axis=1, count=n_neurons).view(bool)
        counts += rows.sum(axis=0)
        per_layer[lo:lo + block] = rows.reshape(len(rows), n_layer, -1).sum(axis=2)
    return counts, per_layer


# --- per-neuron columns (stage b's frequency file, the neuron-effects file) ------------------------------
def read_neuron_column(source, column: str, n_neurons: int, what: str, missing_ok: bool = False,
                       optional: bool = False) -> np.ndarray | None:
    """
    One float64 value per neuron, in id order, from a CSV with `neuron_id` and `column` (e.g. the frequency
    file's mean_activation or attribution). `what` says which stage writes it, for the error line. With
    `missing_ok`, the file may list some neurons only: the others are NaN. With `optional`, a file without the
    column (or with it empty) gives None.
    """
    p = Path(source)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist ({what})")
    try:
        df = pd.read_csv(p)
    except Exception as e:
        raise PipelineError(f"cannot parse {p}: {e}") from None
    if optional and (column not in df.columns or df[column].isna().all()):
        return None
    if column not in df.columns or "neuron_id" not in df.columns:
        raise PipelineError(f"{p} has no neuron_id/{column} columns (written by an older version?); {what}")
    ids = pd.to_numeric(df["neuron_id"], errors="coerce").to_numpy()
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(np.float64)
    complete = len(ids) == n_neurons and np.array_equal(ids, np.arange(n_neurons))
    if not complete and not (missing_ok and np.isfinite(ids).all() and len(np.unique(ids)) == len(ids)
                             and ((ids >= 0) & (ids < n_neurons)).all() and (ids == np.round(ids)).all()):
        raise PipelineError(f"{p} must list {'distinct neurons of' if missing_ok else 'all'} the model's "
                            f"{n_neurons} neurons{'' if missing_ok else ' in id order'}")
    if not np.isfinite(values).all():
        raise PipelineError(f"{p}: {column} holds missing or non-finite values ({what})")
    if complete:
        return values
    out = np.full(n_neurons, np.nan)
    out[ids.astype(np.int64)] = values
    return out


def read_top_examples(source) -> pd.DataFrame:
    """{m}_neuron_top_examples.csv, checked: TOP_EXAMPLES_COLUMNS, whole non-negative ids and ranks, float values,
    and the context and token texts as written (an empty or "NA" token stays text)."""
    p = Path(source)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist (stage b writes it unless --top_examples 0)")
    try:
        df = pd.read_csv(p, dtype={"context": str, "token": str}, keep_default_na=False, encoding="utf-8")
        if list(df.columns) != TOP_EXAMPLES_COLUMNS:
            raise ValueError(f"columns {list(df.columns)}, expected {TOP_EXAMPLES_COLUMNS}")
        if df.empty:  # a shard that was given no window: the columns' types cannot be read from no rows
            df = df.astype({"neuron_id": np.int64, "rank": np.int64, "sample_id": np.int64})
        for c in ("neuron_id", "rank", "sample_id"):
            if not pd.api.types.is_integer_dtype(df[c]) or (df[c] < 0).any():
                raise ValueError(f"column {c} holds values that are not whole numbers >= 0")
        df = df.astype({"value": np.float64})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise PipelineError(f"cannot read {p} as top examples: {e}") from None
    return df


def read_dataset_samples(directory, m: str) -> list[tuple[int, list[int], np.ndarray]]:
    """
    The (prompt, repeat) samples of a stage-b dataset in file order, from {m}_activation_dataset.csv: per
    sample its prompt_sample_idx, its prompt's ids (input_text_ids) and its continuation (output_id of
    token_position 0, 1, ...).
    """
    p = path(directory, DATASET, m)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist (stage b writes it)")
    cols = ["prompt_sample_idx", "token_position", "input_text_ids", "output_id"]
    try:
        df = pd.read_csv(p, usecols=cols, dtype={"input_text_ids": str}, keep_default_na=False)
        repeat, position, output = (df[c].to_numpy(np.int64) for c in ("prompt_sample_idx", "token_position",
                                                                        "output_id"))
        texts = df["input_text_ids"].to_numpy()
        starts = np.flatnonzero(position == 0)
        if len(df) and (len(starts) == 0 or starts[0] != 0):
            raise ValueError("the first row's token_position is not 0")
        ends = np.r_[starts[1:], len(df)]
        bad = [s for s, e in zip(starts, ends) if not np.array_equal(position[s:e], np.arange(e - s))
               or (repeat[s:e] != repeat[s]).any() or (texts[s:e] != texts[s]).any()]
        if bad:
            raise ValueError(f"the sample starting at row {bad[0] + 2} has non-consecutive token positions or "
                             f"changes prompt_sample_idx / input_text_ids")
        parsed = {t: json.loads(t) for t in set(texts[starts])}
        if not all(isinstance(v, list) and all(isinstance(i, int) for i in v) for v in parsed.values()):
            raise ValueError("input_text_ids is not a list of token ids")
    except (ValueError, KeyError) as e:
        raise PipelineError(f"cannot read {p} as a stage-b dataset: {e}") from None
    return [(int(repeat[s]), parsed[texts[s]], output[s:e].copy()) for s, e in zip(starts, ends)]


# --- stage d: subsets -------------------------------------------------------------------------------------
def read_subset(source, n_neurons: int | None = None) -> np.ndarray:
    """A subset `.npy` as int64 ids, checked: a 1-D integer array, loaded without pickle, ids in [0, n_neurons)."""
    p = Path(source)
    if not p.is_file():
        raise PipelineError(f"subset {p} does not exist")
    try:
        ids = np.load(p, allow_pickle=False)
    except Exception as e:
        raise PipelineError(f"cannot read subset {p} as a .npy array without pickle: {e}") from None
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        shape = f"shape {ids.shape}, dtype {ids.dtype}" if isinstance(ids, np.ndarray) else "several arrays"
        raise PipelineError(f"subset {p} must be a 1-D integer array of neuron ids, got {shape}")
    ids = ids.astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        vals, counts = np.unique(ids, return_counts=True)
        raise PipelineError(f"subset {p} lists neuron {int(vals[counts > 1][0])} more than once "
                            f"({int((counts > 1).sum())} repeated ids); a subset is a set of distinct neurons")
    if n_neurons is not None:
        bad = ids[(ids < 0) | (ids >= n_neurons)]
        if len(bad):
            raise PipelineError(f"subset {p} holds id {int(bad[0])} outside this model's neurons "
                                f"0..{n_neurons - 1} ({len(bad)} out-of-range ids)")
    return ids
