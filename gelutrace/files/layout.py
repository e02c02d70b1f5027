"""
The layout of a dataset directory: the one registry of every stage file's name and columns, and of the names
of the folders and records the stages share. Nothing here reads or writes a file (gelutrace.files.formats does).
"""

from pathlib import Path

from gelutrace import PipelineError

CORPUS_FORMAT = "gelutrace-corpus"  # the corpus record's format tag and version ({m}_corpus.json)
CORPUS_VERSION = 1

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
TRACE_FILES = (TRACE_VECTOR, TRACE_ACTIVE, TRACE_PLOT)  # a trace's activation files, with or without its graph
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
GRAPH_STORE_DIRECT_WRITE_NORM = "direct_write_norm.npy"  # per neuron: ||w_out,u||, the norm of what it writes per unit
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
EXCLUDED_PART = "x{layers}_"  # d --exclude_layers: before {size}, the excluded layers joined by "_" (..._x0_k42.npy)
SUBSET_SIDECAR = "{stem}.json"  # beside each subset .npy: parameters, k, per-layer counts, scores
SCORES_DIR = "scores"  # beside the subsets: every neuron's score under each method variant (stage d)
SUBSET_SCORES = "{variant}.npy"  # {variant}: the variant's subsets' name without its size
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
# the subsets stage d ranked with layers excluded (d --exclude_layers): the same tables over them alone, apart from
# the main comparison's, where they would compete with their own full versions
COMPARISON_EXCLUDED = "comparison_excluded.csv"
METHOD_VERDICT_EXCLUDED = "method_verdict_excluded.csv"
DOSE_RESPONSE_EXCLUDED = "dose_response_excluded.csv"
DOSE_RESPONSE_EXCLUDED_PLOT = "dose_response_excluded.png"
# module subsets (d --modules): their effect against both nulls; with --eval_text the next tokens whose loss rises
# most, and where the module fires
MODULE_EFFECTS = "module_effects.csv"
MODULE_TOKENS = "module_tokens.csv"
MODULE_CONTEXTS = "module_contexts.csv"
# --mean_ablation_top N: each k's N best methods measured again under mean ablation, with their own controls
MEAN_COMPARISON = "comparison_mean_ablation.csv"  # as comparison.csv
MEAN_VERDICT = "method_verdict_mean_ablation.csv"  # as method_verdict.csv
MEAN_DOSE_RESPONSE = "dose_response_mean_ablation.csv"  # as dose_response.csv
MEAN_DOSE_RESPONSE_PLOT = "dose_response_mean_ablation.png"
MEAN_CHECK = "mean_ablation_check.csv"  # per k: the methods' order under zero and under mean ablation

# run_pipeline.sh's report (in the dataset directory)
REPORT = "report.md"
LAYER_ACTIVITY_PLOT = "activation_frequency_per_layer.png"
CARDS_DIR = "neuron_cards"  # f_render_neuron_cards.py's default --output (in the dataset directory)
CARDS_MD = "neuron_cards.md"
CARDS_HTML = "neurons.html"
CAUSAL_PAGE = "{m}_causal_graph.html"  # --causal_graph N: the top N neurons' causal graph as a page
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
# a per-prompt neuron graph's summary (gelutrace.report.tracesummary), written as one output set
TRACES_DIR = "traces"  # run_pipeline.sh --trace N: b_trace --graph of evaluation prompt i in traces/{i}/
TRACE_GRAPH = "{m}_trace_graph.json"  # the attribution graph in Neuronpedia's format (its graph-schema.json)
TRACE_PAGE = "{m}_trace_graph.html"  # the same graph as a self-contained page (gelutrace/report/viewer.py)
TRACE_SUMMARY_MD = "{m}_trace_summary.md"
TRACE_SUMMARY_CSV = "{m}_trace_summary.csv"  # the top kept neurons by influence, columns TRACE_SUMMARY_COLUMNS
TRACE_SUMMARY_JSON = "{m}_trace_summary.json"  # the graph's scores, faithfulness and concentration figures
TRACE_SUMMARY_MANIFEST = "{m}_trace_summary_manifest.json"
TRACE_SUMMARY_SET = (TRACE_SUMMARY_MD, TRACE_SUMMARY_CSV, TRACE_SUMMARY_JSON)
# node: the kept neuron's node index in the graph; token: the prompt's token at its position; module: its corpus
# module (-1: none or no modules file); predicted: the graph's total effect of zeroing it on the top token's
# demeaned logit; measured: the real model's (empty where not ablated)
TRACE_SUMMARY_COLUMNS = ["rank", "node", "layer", "position", "dimension", "token", "influence", "activation",
                         "module", "predicted", "measured", "label"]
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
MEAN_CHECK_COLUMNS = ["k", "methods", "zero_order", "mean_order", "order_holds", "zero_delta_nll", "mean_delta_nll",
                      "mean_margin", "mean_margin_ci_low", "mean_margin_ci_high", "mean_first_p_random",
                      "mean_first_random_n"]
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
                k: int | None = None, exclude_layers=()) -> str:
    """
    A stage-d subset's file name; `weight` is None for methods that do not use the graph's edge weights, and
    `threshold` None for those that use no graph at all. A subset given by its size k (ratio None) ends in
    _k{k} instead of _r{ratio}; one ranked with layers excluded has EXCLUDED_PART before that.
    """
    size = f"r{float(ratio)!r}" if ratio is not None else f"k{int(k)}"
    if exclude_layers:
        size = EXCLUDED_PART.format(layers="_".join(str(int(a)) for a in sorted(exclude_layers))) + size
    if threshold is None:
        return SUBSET_FILE_NO_GRAPH.format(m=m, method=method, size=size)
    template = SUBSET_FILE if weight in (None, DEFAULT_WEIGHT) else SUBSET_FILE_WEIGHTED
    return template.format(m=m, method=method, weight=weight, threshold=repr(float(threshold)), size=size)


def scores_name(m: str, method: str, threshold: float | None, weight: str | None, exclude_layers=()) -> str:
    """The file (under SCORES_DIR) of every neuron's score under one method variant, which its subsets at every
    size share: their name (subset_name) without the size."""
    return SUBSET_SCORES.format(variant=subset_name(m, method, threshold, None, weight, 1,
                                                    exclude_layers)[:-len("_k1.npy")])


def model_prefix(directory, suffix_template: str = MATRIX) -> str:
    """Infer {m} from the single file in `directory` named like suffix_template (e.g. *_activation_matrix.npz)."""
    suffix = suffix_template.format(m="")
    found = sorted(p.name[: -len(suffix)] for p in Path(directory).glob("*" + suffix))
    if not found:
        raise PipelineError(f"no *{suffix} in {directory}")
    if len(found) > 1:
        raise PipelineError(f"several models' files in {directory} ({', '.join(found)}): keep one per directory")
    return found[0]
