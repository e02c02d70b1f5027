"""
`b_trace_gelu_activations.py --graph` and `gelutrace.api.trace`: one prompt's neuron attribution graph
(gelutrace.circuit.attribute), pruned and scored as circuit-tracer does (circuit.prune), labelled from a stage-b
dataset (tracelabels), grouped into the corpus modules (supernodes), checked against the real model and the corpus
ranking (circuit.faithfulness), and written as the graph file Neuronpedia's viewer reads (circuit.export) with its
summary (tracesummary).
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gelutrace import PipelineError
from gelutrace.circuit import faithfulness as fa
from gelutrace.circuit.attribute import attribute
from gelutrace.circuit.export import graph_json
from gelutrace.circuit.graph import NeuronGraph, TraceSettings
from gelutrace.circuit.prune import GraphScores, Pruned, graph_scores, prune
from gelutrace.files import atomic, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.record.corpus import check_recorded_weights
from gelutrace.report import supernodes as sn
from gelutrace.report import tracelabels, viewer
from gelutrace.report.tracesummary import TraceSummary, write_trace_files, write_trace_summary
from gelutrace.selection import communities


@dataclass(frozen=True)
class TraceRequest:
    prompt: str | list[int]
    output_dir: str | Path
    dataset_path: str | Path | None = None  # a stage-b dataset of the model: labels, and its stage d's influence
    modules: str | Path | None = None  # a c_find_modules table of the model: supernodes and the concentration test
    faithfulness_nodes: int = fa.TOP_NODES  # the most influential nodes ablated in the real model (0: none)


@dataclass
class TraceOutcome:
    graph: NeuronGraph
    pruned: Pruned
    scores: GraphScores
    summary: TraceSummary
    files: list[Path] = field(default_factory=list)


def corpus_ranking(dataset_path, m: str, n_neurons: int) -> np.ndarray | None:
    """Stage d's corpus influence of every neuron, or None where its stage d did not rank by influence (a scores
    file that is there but wrong is an error)."""
    subsets = Path(dataset_path) / layout.SUBSETS_DIR
    if not (subsets / layout.SCORES_DIR / layout.scores_name(m, "influence", None, None)).is_file():
        return None
    return fa.read_corpus_influence(subsets, m, n_neurons)


def check_inputs(lm, request: TraceRequest):
    """The request's output directory, dataset and modules table checked against the model before any work;
    returns the modules table (communities.ModuleFile) or None."""
    r = request
    cfg = lm.model.config
    n_neurons = cfg.n_layer * cfg.d_mlp
    atomic.check_output_dir(r.output_dir, "--output_dir")
    if r.dataset_path is not None:
        ds = DatasetDir(r.dataset_path, lm.name)
        ds.check(cfg.n_layer, cfg.d_mlp, lm.site)
        check_recorded_weights(ds.corpus_record(), lm, r.dataset_path)
    if r.modules is None:
        return None
    module_file = communities.read_modules(r.modules, n_neurons)
    if module_file.d_mlp != cfg.d_mlp:
        raise PipelineError(f"{r.modules} is a modules table of a model with {module_file.d_mlp} neurons per layer; "
                            f"{lm.name} has {cfg.d_mlp}: give one of {lm.name}'s")
    return module_file


def write_without_graph(directory, m: str, write) -> list[Path]:
    """A trace's activation files without its graph (write(directory) -> paths), swapped in as the trace's output
    set, so that an earlier graph run's graph, page and summary in `directory`, of another prompt, are removed with
    the files they were written beside."""
    return write_trace_files(directory, m, ([n.format(m=m) for n in layout.TRACE_FILES], write))


def run(lm, request: TraceRequest, settings: TraceSettings = TraceSettings(), progress: bool = True,
        extra=None) -> TraceOutcome:
    """The prompt's graph with a loaded model, written to request.output_dir as one output set; `extra`, (names,
    write(directory) -> paths), adds files of the caller's to the set (b_trace's activation files)."""
    r = request
    cfg = lm.model.config
    n_neurons = cfg.n_layer * cfg.d_mlp
    module_file = check_inputs(lm, r)
    graph = attribute(lm, r.prompt, settings, progress)
    pruned = prune(graph)
    scores = graph_scores(graph)
    influence = pruned.node_influence.cpu().numpy()
    modules = names = groups = None
    concentration = None
    if module_file is not None:
        modules = sn.node_modules(graph, module_file.module_of, cfg.d_mlp)
        tokens = sn.read_module_tokens(r.modules, lm.name)
        names = sn.module_names(lm.model, lm.tokenizer, module_file, set(modules[modules >= 0].tolist()), lm.name,
                                tokens)
        groups = sn.supernodes(graph, influence, modules, names)
        concentration = sn.graph_concentration(graph, influence, module_file.module_of, cfg.d_mlp)
    labels, cards = tracelabels.trace_cards(lm.model, lm.tokenizer, graph, r.dataset_path, lm.name, modules, names,
                                            with_cards=True)
    faithful = (fa.faithfulness(lm.model, graph, influence, r.faithfulness_nodes)
                if r.faithfulness_nodes and graph.n_kept else None)
    corpus = corpus_ranking(r.dataset_path, lm.name, n_neurons) if r.dataset_path is not None else None
    agreement = fa.corpus_agreement(graph, influence, corpus, cfg.d_mlp) if corpus is not None else None
    summary = TraceSummary(graph, influence, labels, scores.replacement, scores.completeness, modules,
                           names or {}, faithful, agreement, concentration)
    doc = graph_json(graph, pruned, tokenizer=lm.tokenizer, labels=labels, supernodes=groups,
                     pinned=sn.pinned_nodes(graph, influence))
    out = Path(r.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = viewer.trace_data(doc, graph, pruned, cards)
    files = write_trace_summary(out, lm.name, summary, lm.tokenizer, graph_doc=doc, extra=extra, page=page)
    return TraceOutcome(graph, pruned, scores, summary, files)


def outcome_lines(done: TraceOutcome) -> list[str]:
    """What the script prints of a trace: the graph's size, scores and checks."""
    g, p, s = done.graph, done.pruned, done.summary
    lines = [f"graph: {g.n_kept:,} neurons kept ({g.n_pos} positions, {g.n_logits} target logits), "
             f"{int(p.node_mask.sum()):,} nodes and {int(p.edge_mask.sum()):,} edges after pruning; "
             f"replacement score {done.scores.replacement:.3f}, completeness {done.scores.completeness:.3f}"]
    if s.faithfulness is not None:
        f = s.faithfulness
        lines.append(f"faithfulness: the {len(f.nodes)} most influential nodes zeroed in the real model: Spearman "
                     f"{f.spearman:.3f} between predicted and measured changes of the top logit, signs agree for "
                     f"{100 * f.sign_agreement:.0f} %")
    if s.corpus is not None and not np.isnan(s.corpus.spearman):
        lines.append(f"against the corpus influence ranking: Spearman {s.corpus.spearman:.3f} over the prompt's top "
                     f"{len(s.corpus.neurons)} neurons (their median corpus rank {s.corpus.median_corpus_rank:.0f})")
    if s.concentration is not None:
        c = s.concentration
        lines.append(f"modules: influence over {c.effective_modules:.2f} effective modules against "
                     f"{c.null_effective_modules:.2f} for random modules of the same sizes (permutation p = "
                     f"{c.p_value:.3g})")
    graph_file = layout.TRACE_GRAPH.format(m=g.model_name)
    return lines + [f"graph file: {f}" for f in done.files if f.name == graph_file]
