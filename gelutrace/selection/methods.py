"""
Stage d: choose a perturbation subset of neurons from a co-activation graph.

The graph is thresholded as the original did: keep the edges whose normalised weight (count / max count) is
> threshold, keep every node. k = max(1, int(num_nodes * ratio)), at most num_nodes. Nodes are ranked by the
method's score, highest first, and the top k are written in rank order. Ties are broken by a seeded random
order of the nodes (the stage-d --seed), never by node id, which would fill a tie with the lowest ids (layer
0 first); the sidecar records how many picks share the k-th pick's score (tied_picks), how many nodes share it
(tie_pool) and how many picks score 0 (zero_score_picks). One seed gives one order, so the subsets of one
method at growing k are prefixes of one ranking. With another
edge weight (jaccard, phi, pmi; gelutrace.graph.coactivation.EdgeWeight) the same rule applies to that weight's
normalised value; the weight matters only to the GRAPH_METHODS.

Methods: degree (edges kept, as the original), weighted_degree (sum of the kept edges' normalised weights),
pagerank (on the thresholded graph, edge weight = count, or the normalised weight for the other weights,
alpha 0.85, as networkx.pagerank), influence (through the causal graph of stage b's --direct_edges,
gelutrace.graph.coactivation.CausalEdges.influence: every layer pair it measured, no threshold), and the methods
that need no graph (the threshold is ignored): activation_count (how many samples activate the neuron),
attribution (stage b's first-order estimate of each neuron's single-ablation delta_nll), direct_loss (the mean
|direct_loss| of stage b's --direct_edges: influence's seed term, without the graph), magnitude (mean |a_u| times
||w_out,u||, the size of what the neuron writes into the stream, from the same record), ablation (the measured
single-neuron delta_nll of d_calculate_neuron_effects.py), random (seeded; k as above, or with match_layers
the per-layer composition of another subset).

With exclude_layers, every method ranks (and random draws) only the neurons of the other layers: the scores are
the full graph's, the excluded neurons are never picked, and ties keep the full ranking's seeded order, so the
ranking is the full one with the excluded neurons taken out. k counts neurons of the remaining layers (a ratio
is still of all neurons: the same k as the full ranking's).
"""

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace import PipelineError
from gelutrace.files import atomic, formats, layout
from gelutrace.graph.causal import CausalEdges
from gelutrace.graph.coactivation import DEFAULT_WEIGHT, CoactivationGraph, Cut, no_causal_hint
from gelutrace.graph.store import write_gpickle

METHODS = ("degree", "weighted_degree", "pagerank", "influence", "activation_count", "attribution", "direct_loss",
           "magnitude", "ablation", "random")
GRAPH_METHODS = ("degree", "weighted_degree", "pagerank")  # the others ignore the threshold and --weight
PAGERANK_ALPHA = 0.85
PAGERANK_TOL = 1e-10  # L1 change per node; stricter than networkx's default 1e-6
PAGERANK_MAX_ITER = 1000
PAGERANK_CACHE_BYTES = 4 << 30  # kept-edge matrices above this are re-read from the store every iteration


def check_params(threshold: float | None, ratio: float, method: str):
    if method in GRAPH_METHODS and threshold is None:
        raise PipelineError(f"--method {method} needs --threshold")
    if threshold is not None and not (0.0 <= threshold <= 1.0):
        raise PipelineError(f"--threshold must be in [0, 1], got {threshold}")
    if not (0.0 < ratio <= 1.0):
        raise PipelineError(f"--ratio must be in (0, 1], got {ratio}")
    if method not in METHODS:
        raise PipelineError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")


K_GRID = tuple(f"{p:.3g}%" for p in np.geomspace(0.1, 10, 8))  # run_pipeline.sh's default --ks


def k_values(num_nodes: int | None, specs: list[str]) -> list[int]:
    """run_pipeline.sh --ks: each value a count ("30") or a percentage of the neurons ("1%": subset_size of
    0.01); sorted, duplicates dropped. num_nodes None checks the values' form only (before the model's shape is
    known)."""
    if not specs:
        raise PipelineError("--ks is empty: give counts (30) or percentages of the neurons (1%)")
    ks = []
    for spec in specs:
        try:
            value = float(spec[:-1]) if spec.endswith("%") else int(spec)
        except ValueError:
            raise PipelineError(f"--ks {spec!r}: give a count (30) or a percentage of the neurons (1%)") from None
        if spec.endswith("%") and not 0 < value <= 100:
            raise PipelineError(f"--ks {spec!r}: a percentage must be in (0, 100]")
        if not spec.endswith("%") and value < 1:
            raise PipelineError(f"--ks {spec!r}: a count must be at least 1")
        if num_nodes is None:
            continue
        k = subset_size(num_nodes, value / 100) if spec.endswith("%") else value
        if k > num_nodes:
            raise PipelineError(f"--ks {spec}: more than the model's {num_nodes} neurons")
        ks.append(k)
    return sorted(set(ks))


def subset_size(num_nodes: int, ratio: float) -> int:
    return min(max(1, int(num_nodes * ratio)), num_nodes)


def tie_order(n: int, seed: int) -> np.ndarray:
    """The seeded random rank of each of n positions that breaks ties."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0x71E])).permutation(n)


def top_k(score: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Positions of the k highest scores, ties in a seeded random order."""
    return np.lexsort((tie_order(len(score), seed), -score))[:k]


def kept_nodes(graph: CoactivationGraph, exclude_layers) -> np.ndarray | None:
    """Which nodes a ranking with `exclude_layers` may pick (None: all); a layer the graph does not have, or every
    layer, is refused."""
    if not exclude_layers:
        return None
    layers = np.unique(graph.layer)
    bad = sorted(set(int(a) for a in exclude_layers) - set(layers.tolist()))
    if bad:
        raise PipelineError(f"--exclude_layers {bad[0]}: the graph has layers {layers.min()}..{layers.max()}")
    keep = ~np.isin(graph.layer, list(exclude_layers))
    if not keep.any():
        raise PipelineError("--exclude_layers excludes every layer of the graph: leave at least one")
    return keep


def tie_counts(score: np.ndarray, picked: np.ndarray) -> dict:
    """How the top k sits on ties: picks with the k-th pick's score, nodes with it, picks scoring 0."""
    if not len(picked):
        return {"tied_picks": 0, "tie_pool": 0, "zero_score_picks": 0}
    cut = score[picked[-1]]
    return {"tied_picks": int((score[picked] == cut).sum()), "tie_pool": int((score == cut).sum()),
            "zero_score_picks": int((score[picked] == 0).sum())}


def pagerank(graph: CoactivationGraph, cut: Cut, alpha=PAGERANK_ALPHA, tol=PAGERANK_TOL,
             max_iter=PAGERANK_MAX_ITER) -> np.ndarray:
    """Weighted PageRank of the undirected graph of the edges the cut keeps, weighted by their scores (counts,
    or normalised weights) (networkx.pagerank's definition: uniform teleport, dangling nodes' rank spread
    uniformly), by power iteration over the blocks."""
    n = graph.num_nodes
    strength = graph.degrees(cut, weighted=True).astype(np.float64)
    cache, used = [], 0
    for b in graph.blocks:
        m = cut.csr(b)
        used += m.nnz * 12
        cache.append(m.astype(np.float64) if used <= PAGERANK_CACHE_BYTES else None)
    x = np.full(n, 1.0 / n)
    dangling = strength == 0
    for _ in range(max_iter):
        v = np.divide(x, strength, out=np.zeros(n), where=~dangling)
        y = np.zeros(n)
        for b, m in zip(graph.blocks, cache):
            m = m if m is not None else cut.csr(b).astype(np.float64)
            y[b.rows] += m @ v[b.cols]
            y[b.cols] += m.T @ v[b.rows]
        y = alpha * y + (alpha * x[dangling].sum() + 1.0 - alpha) / n
        err = np.abs(y - x).sum()
        x = y
        if err < n * tol:
            return x
    raise PipelineError(f"pagerank did not converge in {max_iter} iterations")


def dataset_dir(graph: CoactivationGraph, dataset_path=None) -> Path:
    """
    Stage b's directory behind a graph: given; else the directory the graph sits in, when that is a dataset of
    the graph's model (a copied or moved dataset takes its store along: its own files, never the original's);
    else the one stage c recorded in the store's header.
    """
    if dataset_path is not None:
        d = Path(dataset_path)
    elif graph_dataset(graph) is not None:
        return graph_dataset(graph)
    else:
        recorded = (graph.header.get("source") or {}).get("input_dir")
        if not recorded:
            raise PipelineError("this graph does not record its dataset directory: pass --dataset_path")
        d = Path(recorded)
    if not d.is_dir():
        raise PipelineError(f"dataset directory {d} does not exist (pass --dataset_path)")
    return d


def graph_dataset(graph: CoactivationGraph) -> Path | None:
    """The directory the graph's store (or .gpickle) sits in, named as given (not through its version link),
    when it holds a dataset of the graph's model (stage b's frequency table); else None."""
    if not graph.source or not graph.model:
        return None
    d = Path(os.path.abspath(graph.source)).parent
    return d if layout.path(d, layout.FREQUENCY, graph.model).is_file() else None


def subset_graph(info: dict, dataset_path) -> str | None:
    """
    The graph a stage-d sidecar (`info`) was chosen on, for the subsets of the dataset at `dataset_path`: the path
    it records; but when that is a store of the dataset's name elsewhere (the dataset was copied or moved since)
    and the dataset holds its own store of the same graph (the same number of neurons and largest co-activation
    count), that one: a copied dataset reads its own files, never the original's, also once the original is gone.
    """
    src = info.get("graph")
    model = info.get("model")
    if not src or dataset_path is None or not model:
        return src
    own = layout.path(dataset_path, layout.WEIGHTED_GRAPH, model)
    if Path(src).name != own.name or os.path.abspath(src) == os.path.abspath(own):
        return src
    try:
        header = json.loads((own / layout.GRAPH_STORE_HEADER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return src
    same = isinstance(header, dict) and header.get("model") == model and all(
        header.get(h) == info.get(i) for h, i in (("num_neurons", "num_nodes"),
                                                   ("max_co_activation_count", "max_co_activation_count")))
    return str(own) if same else src


def neuron_scores(graph: CoactivationGraph, method: str, dataset_path=None, measured: dict | None = None) -> np.ndarray:
    """attribution / ablation scores of the graph's nodes, from `measured` (method -> scores per neuron id) or
    the dataset's files (NaN: not measured)."""
    if measured is not None:
        return np.asarray(measured[method], np.float64)[graph.node_ids]
    d = dataset_dir(graph, dataset_path)
    m = graph.model
    n = int(graph.node_ids.max()) + 1 if graph.num_nodes else 0
    if method == "attribution":
        values = formats.read_neuron_column(layout.path(d, layout.FREQUENCY, m), "attribution", n,
                                       "stage b writes it; rerun stage b without --no_attribution")
    else:
        values = formats.read_neuron_column(layout.path(d, layout.NEURON_EFFECTS, m), "delta_nll", n,
                                       "d_calculate_neuron_effects.py writes it", missing_ok=True)
    return values[graph.node_ids]


def causal_record(graph: CoactivationGraph, method: str) -> CausalEdges:
    """The graph's direct-effect record (stage b --direct_edges), which `method` ranks by; refused without one."""
    if graph.causal is None:
        raise PipelineError(f"--method {method} needs the direct-effect weights, which "
                            f"{graph.source or 'the graph'} does not have: {no_causal_hint(graph)}")
    return graph.causal


def scores(graph: CoactivationGraph, method: str, threshold: float | None, weight: str = DEFAULT_WEIGHT,
           dataset_path=None, measured: dict | None = None) -> np.ndarray:
    if method in ("attribution", "ablation"):
        return neuron_scores(graph, method, dataset_path, measured)
    if method == "activation_count":
        return graph.activation_count.astype(np.int64)
    if method == "influence":
        return causal_record(graph, method).influence()[graph.node_ids]
    if method == "direct_loss":
        return np.asarray(causal_record(graph, method).loss_abs, np.float64)[graph.node_ids]
    if method == "magnitude":
        causal = causal_record(graph, method)
        if causal.write_norm is None:
            raise PipelineError(f"--method magnitude needs each neuron's output weight norm, which the direct-effect "
                                f"record of {graph.source or 'the graph'} predates: rerun stage b (with "
                                f"--direct_edges) to record it")
        ids = graph.node_ids
        return np.asarray(causal.value_abs, np.float64)[ids] * np.asarray(causal.write_norm, np.float64)[ids]
    cut = graph.cut(threshold, weight)
    if method == "degree":
        return graph.degrees(cut)
    if method == "weighted_degree":
        # for count, ranking on the integer sums is exact; dividing by the max count gives the normalised sums
        return graph.degrees(cut, weighted=True) / cut.weight.data_scale
    if method == "pagerank":
        return pagerank(graph, cut)
    raise PipelineError(f"method {method!r} has no score")


@dataclass
class Subset:
    ids: np.ndarray  # node ids in rank order (random: drawn order)
    scores: np.ndarray
    k: int
    edges_kept: int
    info: dict
    every: np.ndarray | None = field(default=None, repr=False)  # every node's score, the ranking's input (None: random)


def _match_layer_counts(graph: CoactivationGraph, match_path) -> dict[int, int]:
    ids = formats.read_subset(match_path)
    side = Path(match_path).with_suffix(".json")
    if side.is_file():
        try:
            other = json.loads(side.read_text()).get("model")
        except (json.JSONDecodeError, AttributeError):
            other = None
        if other and graph.model and other != graph.model:
            raise PipelineError(f"--match_layers subset {match_path} is for model {other!r}, the graph is "
                                f"for {graph.model!r}")
    pos = np.searchsorted(graph.node_ids, ids)
    if ids.size and (pos.max() >= graph.num_nodes or not np.array_equal(graph.node_ids[np.minimum(pos, graph.num_nodes - 1)], ids)):
        raise PipelineError(f"--match_layers subset {match_path} names neurons the graph does not have "
                            f"(a subset of another model?)")
    layers, n = np.unique(graph.layer[pos], return_counts=True)
    return {int(a): int(b) for a, b in zip(layers, n)}


def method_weight(method: str, weight: str) -> str | None:
    """The edge weight a method ranks by: None (not applicable) for methods that do not use the graph's edges."""
    return weight if method in GRAPH_METHODS else None


def select(graph: CoactivationGraph, threshold: float | None, ratio: float, method: str, seed: int = 1337,
           match_layers=None, weight: str = DEFAULT_WEIGHT, dataset_path=None, measured: dict | None = None,
           exclude_layers=()) -> Subset:
    """The subset of k = subset_size(num_nodes, ratio) neurons; edges_kept counts the edges `weight` keeps (None
    for the methods that use no graph). `measured` (method -> scores per neuron id) replaces the dataset's
    attribution / ablation files."""
    check_params(threshold, ratio, method)
    k = subset_size(graph.num_nodes, ratio)
    sub = select_sizes(graph, threshold, [k], method, seed, match_layers, weight, dataset_path, measured,
                       exclude_layers)[0]
    sub.info = {"k_from_ratio": k, **sub.info}
    return sub


def check_sizes(sizes: list[int], num_nodes: int, what: str = "the graph's number of neurons"):
    bad = [k for k in sizes if not 1 <= k <= num_nodes]
    if bad:
        raise PipelineError(f"--k {bad[0]} is outside 1..{num_nodes}, {what}")


def select_sizes(graph: CoactivationGraph, threshold: float | None, sizes: list[int], method: str, seed: int = 1337,
                 match_layers=None, weight: str = DEFAULT_WEIGHT, dataset_path=None, measured: dict | None = None,
                 exclude_layers=()) -> list[Subset]:
    """select's subsets for several k at once: the method's scores are computed once, and for every method but
    random the subsets are prefixes of one ranking (ties in the seed's order). With match_layers one subset.
    With exclude_layers only the other layers' neurons are picked, and `every` holds NaN for the excluded."""
    check_params(threshold, 1.0, method)
    if seed < 0:
        raise PipelineError(f"--seed must be >= 0, got {seed}")
    if match_layers is not None and method != "random":
        raise PipelineError("--match_layers applies to --method random only")
    if graph.num_nodes == 0:
        raise PipelineError("the graph has no nodes")
    check_sizes(sizes, graph.num_nodes)
    keep = kept_nodes(graph, exclude_layers)
    if keep is not None:
        check_sizes(sizes, int(keep.sum()), "the neurons of the layers not excluded")
    used = method_weight(method, weight)
    kept, info = None, {"weight": None, "max_weight": None}
    if used:
        cut = graph.cut(threshold, used)
        kept = int(graph.degrees(cut).sum() // 2)
        info = cut.weight.describe()
    if keep is not None:
        info["exclude_layers"] = sorted(set(int(a) for a in exclude_layers))
    if method == "random":
        out = []
        for k in sizes if match_layers is None else [None]:
            rng = np.random.default_rng(seed)
            extra = {}
            if match_layers is None:
                pos = (rng.choice(graph.num_nodes, size=k, replace=False) if keep is None
                       else rng.choice(np.flatnonzero(keep), size=k, replace=False))
            else:
                want = _match_layer_counts(graph, match_layers)
                if keep is not None and set(want) & set(int(a) for a in exclude_layers):
                    raise PipelineError(f"--match_layers subset {match_layers} has neurons in an excluded layer")
                parts = []
                for layer, cnt in sorted(want.items()):  # one draw per layer
                    pool = np.flatnonzero(graph.layer == layer)
                    parts.append(rng.choice(pool, size=cnt, replace=False))
                pos = np.concatenate(parts)
                extra["match_layers"] = str(match_layers)
            out.append(Subset(graph.node_ids[pos], np.zeros(len(pos)), len(pos), kept, {**info, **extra}))
        return out
    s = scores(graph, method, threshold, weight, dataset_path, measured)
    finite = np.isfinite(s)
    if not finite.all():
        if finite.sum() < max(sizes):
            raise PipelineError(f"--method {method}: only {int(finite.sum())} neurons were measured, "
                                f"fewer than k={max(sizes)}; measure all neurons or lower --ratio")
        info["neurons_measured"] = int(finite.sum())
    if keep is not None:
        s = np.where(keep, s, np.nan)  # never picked, and no score in the variant's scores file
        finite &= keep
        if finite.sum() < max(sizes):
            raise PipelineError(f"--method {method}: only {int(finite.sum())} neurons of the layers not excluded "
                                f"were measured, fewer than k={max(sizes)}")
    ranked = np.where(finite, s, -np.inf)
    order = top_k(ranked, max(sizes), seed)
    return [Subset(graph.node_ids[order[:k]], s[order[:k]], k, kept, {**info, **tie_counts(ranked, order[:k])}, s)
            for k in sizes]


def write_subset(sub: Subset, graph: CoactivationGraph, target, params: dict, recorded: dict | None = None) -> Path:
    """The subset .npy (int64 node ids) and its sidecar JSON beside it; `recorded` (write_scores' fields and the
    halves) ends the sidecar."""
    target = Path(target)
    layers = graph.layer[np.searchsorted(graph.node_ids, sub.ids)]
    lay, cnt = np.unique(layers, return_counts=True)
    side = target.parent / layout.SUBSET_SIDECAR.format(stem=target.stem)
    source = os.path.abspath(graph.source) if graph.source else ""
    _write_pair(target, sub.ids.astype(np.int64), side,
                {"subset": target.name, "model": graph.model, "graph": source, **params,
                 "num_nodes": graph.num_nodes, "max_co_activation_count": graph.max_co_activation,
                 "edges_kept": sub.edges_kept, "k": sub.k, **sub.info,
                 "per_layer_counts": {str(a): int(b) for a, b in zip(lay, cnt)},
                 "neurons": sub.ids.tolist(), "scores": sub.scores.tolist(), **(recorded or {})})
    return side


def write_scores(sub: Subset, graph: CoactivationGraph, directory, method: str, threshold: float | None,
                 weight: str = DEFAULT_WEIGHT, exclude_layers=()) -> dict:
    """
    Every node's score under the subset's method variant (float64, in node id order), once for the variant's
    subsets at every k, under SCORES_DIR in `directory`; returns the sidecar fields that name it: score_file
    (relative to the sidecar) and score_sha256 (of the values), both None for random, which has no score.
    """
    if sub.every is None:
        return {"score_file": None, "score_sha256": None}
    values = np.asarray(sub.every, np.float64)
    name = layout.scores_name(graph.model or "graph", method, threshold if method in GRAPH_METHODS else None,
                              method_weight(method, weight), exclude_layers)
    atomic.write_npy(values, Path(directory) / layout.SCORES_DIR / name)
    return {"score_file": f"{layout.SCORES_DIR}/{name}", "score_sha256": hashlib.sha256(values.tobytes()).hexdigest()}


def read_scores(directory, info: dict) -> np.ndarray | None:
    """The scores file a stage-d sidecar `info` in `directory` names (None when it names none), refused when it is
    gone or was rewritten since by another stage-d run."""
    rel = info.get("score_file")
    if rel is None:
        return None
    p = Path(directory) / rel
    try:
        values = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{p}, the scores of subset {info.get('subset')}, cannot be read ({e}); rerun stage d") from None
    if values.dtype != np.float64 or hashlib.sha256(values.tobytes()).hexdigest() != info.get("score_sha256"):
        raise PipelineError(f"{p} is not the scores subset {info.get('subset')} was chosen by (rewritten since); "
                            f"rerun stage d")
    return values


def _write_pair(target: Path, ids: np.ndarray, side: Path, record: dict):
    """A subset's .npy and its sidecar, both written beside the earlier pair before either is renamed in (a failure
    leaves the earlier pair, never a new .npy beside an old sidecar); a full disk is one line naming the
    directory."""

    try:
        with contextlib.ExitStack() as stack:
            npy, js = stack.enter_context(atomic.atomic_path(target)), stack.enter_context(atomic.atomic_path(side))
            atomic.save_npy(npy, ids)
            atomic.write_bytes((json.dumps(record, indent=1) + "\n").encode("utf-8"), js)
    except OSError as e:
        if atomic.disk_full(e, target.parent):
            raise PipelineError(f"no space left on {target.parent} (disk full) while writing the subset "
                                f"{target.name}; the earlier files there are unchanged") from None
        raise


def write_module_subset(modules, module: int, output_dir) -> Path:
    """One module of c_find_modules (modules.ModuleFile) as a stage-e subset: its ids (.npy, sorted) and a
    sidecar with method "module", which keeps it out of the method comparison."""
    rec = modules.record
    if not 0 <= module < modules.num_modules:
        raise PipelineError(f"--module {module}: {modules.path} has modules 0..{modules.num_modules - 1}")
    ids = modules.ids(module)
    weight = (rec.get("settings") or {}).get("weight", DEFAULT_WEIGHT)
    target = Path(output_dir) / layout.SUBSET_FILE_MODULE.format(m=rec.get("model") or "graph", module=module,
                                                              weight=weight)
    lay, cnt = np.unique(ids // modules.d_mlp, return_counts=True)
    _write_pair(target, np.asarray(ids), target.parent / layout.SUBSET_SIDECAR.format(stem=target.stem),
                {"subset": target.name, "model": rec.get("model"), "method": "module", "module": int(module),
                 "modules_file": os.path.abspath(modules.path), "weight": weight, "threshold": None, "ratio": None,
                 "k": int(len(ids)), "num_modules": modules.num_modules, "modularity": rec.get("modularity"),
                 "structured": (rec.get("null") or {}).get("structured"),
                 "per_layer_counts": {str(a): int(b) for a, b in zip(lay, cnt)}, "neurons": ids.tolist()})
    return target


def subset_file_name(model: str | None, method: str, threshold: float | None, ratio: float | None,
                     weight: str = DEFAULT_WEIGHT, k: int | None = None, exclude_layers=()) -> str:
    """The --output_dir name of a subset given by its ratio, or by its size k (ratio None)."""
    uses_graph = method in GRAPH_METHODS
    return layout.subset_name(model or "graph", method, threshold if uses_graph else None, ratio,
                          method_weight(method, weight), k, exclude_layers)


def export_graph(graph: CoactivationGraph, threshold: float, target, memory_limit: int | None = None,
                 weight: str = DEFAULT_WEIGHT):
    """The thresholded graph (all nodes, kept edges) as GraphML or NetworkX .gpickle, if it fits in memory
    (CoactivationGraph.to_networkx). For a weight other than count, its edges also carry {weight} and
    {weight}_normalized."""
    import networkx as nx  # lazy: only the NetworkX paths need it (slow to import)
    target = Path(target)
    if target.suffix not in (".graphml", ".gpickle"):
        raise PipelineError(f"--export_graph {target}: use a .graphml or .gpickle name")
    g = graph.to_networkx(weight, threshold, memory_limit, "raise --threshold or skip --export_graph")
    if target.suffix == ".gpickle":
        write_gpickle(g, target)
    else:
        with atomic.atomic_path(target) as tmp:
            nx.write_graphml(g, tmp)
    return g


def summary_table(paths) -> pd.DataFrame:
    """One row per subset file (from its sidecar JSON when present): for d_batch's closing table."""
    rows = []
    for p in map(Path, paths):
        row = {"file": p.name, "k": None, "edges_kept": None}
        side = p.parent / layout.SUBSET_SIDECAR.format(stem=p.stem)
        if side.is_file():
            try:
                s = json.loads(side.read_text())
                row.update(method=s.get("method"), weight=s.get("weight"), threshold=s.get("threshold"),
                           ratio=s.get("ratio"), k=s.get("k"), edges_kept=s.get("edges_kept"))
            except json.JSONDecodeError:
                pass
        elif p.is_file():
            row["k"] = len(formats.read_subset(p))
        rows.append(row)
    return pd.DataFrame(rows, columns=["file", "method", "weight", "threshold", "ratio", "k", "edges_kept"])
