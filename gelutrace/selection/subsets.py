"""
Stage d's ranking run (d_calculate_perturbation_subset.py, and the sweep of gelutrace.pipeline, which reads the
graph and builds the halves once for every method, weight and threshold): the subsets of one method variant at
each k, with the scores and the halves' selections that stage e reads (docs/stage-d.md).
"""

import time
from dataclasses import dataclass
from pathlib import Path

from gelutrace import PipelineError
from gelutrace.files import atomic, formats
from gelutrace.files.dataset import DatasetDir
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.selection import methods as sel
from gelutrace.selection import stability


@dataclass
class Request:
    """One method variant's subsets: the flags of d_calculate_perturbation_subset.py, its defaults filled in."""
    input_graph_path: str | None
    threshold: float | None = None
    ratio: list[float] | None = None
    k: list[int] | None = None
    method: str = "degree"
    weight: str = gr.DEFAULT_WEIGHT
    output_path: str | None = None
    output_dir: str | None = None
    dataset_path: str | None = None
    input_csv: str | None = None
    skip_existing: bool = False
    seed: int = 1337
    match_layers: str | None = None
    export_graph: str | None = None
    memory_limit: int | None = None  # bytes --export_graph may use (None: what is available)
    exclude_layers: list[int] | None = None  # layers whose neurons the ranking leaves out


def print_line(word: str, target, note: str):
    print(f"{word} {target} ({note})")


def write_ranked(req: Request, read_graph=gs.read_graph, done=print_line, halves=None):
    """
    The subsets of req.method at every k of req.ratio or req.k, each an .npy and its sidecar. `read_graph` reads
    req.input_graph_path and `done(word, target, note)` hears of each subset written or skipped; `halves(graph,
    dataset_path, prompts)` gives the selection data's halves (default: selection_halves).
    """
    t0 = time.time()
    if not req.input_graph_path:
        raise PipelineError("--input_graph_path is required (unless --modules)")
    if not (req.ratio or req.k):
        raise PipelineError("give --ratio or --k")
    sizes = req.ratio or req.k
    for r in req.ratio or []:
        sel.check_params(req.threshold, r, req.method)
    sel.check_params(req.threshold, 1.0, req.method)
    gr.check_weight(req.weight)
    if len(set(sizes)) != len(sizes):
        raise PipelineError(f"--{'ratio' if req.ratio else 'k'} lists a value twice")
    if req.output_path and Path(req.output_path).suffix != ".npy":
        raise PipelineError(f"--output_path {req.output_path}: expected a .npy name")
    if req.output_path and len(sizes) > 1:
        raise PipelineError("--output_path names one subset: give one --ratio or --k, or use --output_dir")
    if req.match_layers and len(sizes) > 1:
        raise PipelineError("--match_layers takes its k from the other subset: give one --ratio or --k")
    exclude = sorted(req.exclude_layers or [])
    if len(set(exclude)) != len(exclude):
        raise PipelineError("--exclude_layers lists a layer twice")
    if req.export_graph and (req.threshold is None or Path(req.export_graph).suffix not in (".graphml", ".gpickle")):
        raise PipelineError("--export_graph needs --threshold and a .graphml or .gpickle name")
    prompts = formats.read_prompts(req.input_csv) if req.input_csv else None
    graph = read_graph(req.input_graph_path)
    ks = [sel.subset_size(graph.num_nodes, r) for r in req.ratio] if req.ratio else req.k
    sel.check_sizes(ks, graph.num_nodes)
    sel.kept_nodes(graph, exclude)
    targets = [Path(req.output_path)] if req.output_path else [
        Path(req.output_dir) / sel.subset_file_name(graph.model, req.method, req.threshold, r, req.weight, k, exclude)
        for r, k in zip(req.ratio or [None] * len(ks), ks)]
    atomic.check_output_dir(targets[0].parent, "--output_path" if req.output_path else "--output_dir")
    for target in targets:
        if target.is_dir():
            raise PipelineError(f"{target} is a directory, not a subset file name")
    todo = [i for i, t in enumerate(targets) if not (req.skip_existing and t.is_file())]
    for i in sorted(set(range(len(targets))) - set(todo)):
        done("skipped", targets[i], "exists")
    if not todo:
        return
    subs = sel.select_sizes(graph, req.threshold, [ks[i] for i in todo], req.method, req.seed, req.match_layers,
                            req.weight, req.dataset_path, exclude_layers=exclude)
    uses_graph = req.method in sel.GRAPH_METHODS
    if req.export_graph:  # before the subsets: a refused export must not leave a subset that looks done
        sel.export_graph(graph, req.threshold, req.export_graph, req.memory_limit, req.weight)
    if req.match_layers and subs[0].k != ks[0]:
        raise PipelineError(f"--match_layers gives k={subs[0].k} (the other subset's neurons), but --"
                            f"{'ratio' if req.ratio else 'k'} asks for k={ks[0]}: give that k")
    threshold = req.threshold if uses_graph else None
    again = stability.half_selections((halves or selection_halves)(graph, req.dataset_path, prompts), req.method,
                                      threshold, req.weight, [sub.k for sub in subs], req.seed, req.match_layers,
                                      exclude)
    scores = sel.write_scores(subs[0], graph, targets[0].parent, req.method, threshold, req.weight, exclude)
    for i, sub, half_ids in zip(todo, subs, again):
        ratio = req.ratio[i] if req.ratio else None
        params = {"method": req.method, "threshold": threshold,
                  "threshold_ignored": not uses_graph, "ratio": ratio, "seed": req.seed}
        if ratio is not None:
            sub.info = {"k_from_ratio": ks[i], **sub.info}
        sel.write_subset(sub, graph, targets[i], params, {**scores, "halves": half_ids})
        kept = (f"{sub.edges_kept:,} edges kept" if uses_graph else
                "the causal graph, every pair measured" if req.method == "influence" else "no graph used")
        done("wrote", targets[i], f"k={sub.k}, {kept}, {time.time() - t0:.1f} s")


def selection_halves(graph: gr.CoactivationGraph, dataset_path, prompts) -> stability.Halves:
    """The two halves of the data the graph was counted on: a corpus-mode dataset's shards, or a prompt-mode
    dataset's rows of `prompts` (--input_csv); none, and why, without them."""
    try:
        data = sel.dataset_dir(graph, dataset_path)
    except PipelineError as e:
        if prompts is not None:
            raise
        return stability.Halves([], f"no dataset to split ({e})")
    record = DatasetDir(data, graph.model).corpus_record()
    if record is not None and prompts is not None:
        raise PipelineError(f"--input_csv: {data} is a corpus-mode dataset, whose halves are its shards: leave "
                            f"--input_csv out")
    if record is None and prompts is None:
        return stability.Halves([], "stage d was not given the prompt CSV (--input_csv) to split")
    return stability.halves_of(data, graph.model, prompts, record)


