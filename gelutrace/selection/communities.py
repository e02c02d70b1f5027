"""
Functional modules of the neuron graph (c_find_modules.py): Leiden community detection on a thinned graph,
tested against degree-preserving rewired graphs, and its stability under seeds and between the halves of the
selection data.

Thinning: the edges whose normalised weight is > --threshold (EdgeWeight's rule), or each node's K strongest
edges (--top_edges_per_node; an edge is kept when it is among the K strongest of either end; ties at the K-th
place by a seeded random order, never by neuron id). Edges of weight <= 0 never count (count 0; phi, pmi and
direct below 0 unless negative="abs", which takes absolute values).

Detection: igraph's Leiden with modularity, or CPM at --resolution; seeded. The null: the same detection
on rewired graphs, each layer pair's edges swapped in pairs ((a, b), (c, d) -> (a, d), (c, b), never creating a
duplicate edge), so that every node keeps its degree and every layer pair its edge count, and each edge keeps
its weight with its source.
"""

import json
import math
import multiprocessing as mp
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace import PipelineError
from gelutrace.files import layout
from gelutrace.graph.coactivation import DEFAULT_WEIGHT, CoactivationGraph, DenseBlock

NEGATIVE = ("drop", "abs")
ITERATIONS = 2  # Leiden iterations: igraph's default; until stable (-1) found the same Q here at 1.7-4x the time


@dataclass
class ModuleSettings:
    weight: str = DEFAULT_WEIGHT
    threshold: float | None = None  # thin by the normalised weight instead of the top edges per node
    top_edges_per_node: int = 32
    resolution: float | None = None  # None: modularity; else CPM at this resolution
    negative: str = "drop"  # negative weights (phi, pmi, direct): dropped, or their absolute values
    seed: int = 0
    null_graphs: int = 20
    seeds: int = 10

    def check(self):
        if self.negative not in NEGATIVE:
            raise PipelineError(f"--negative must be one of {', '.join(NEGATIVE)}, got {self.negative!r}")
        if self.threshold is None and self.top_edges_per_node < 1:
            raise PipelineError(f"--top_edges_per_node must be >= 1, got {self.top_edges_per_node}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise PipelineError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.resolution is not None and not (self.resolution > 0 and math.isfinite(self.resolution)):
            raise PipelineError(f"--resolution must be a finite number > 0, got {self.resolution}")
        for name in ("null_graphs", "seeds", "seed"):
            if getattr(self, name) < 0:
                raise PipelineError(f"--{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class Edges:
    """A thinned graph: edge endpoints as node positions, and weights (> 0)."""
    n_nodes: int
    src: np.ndarray
    tgt: np.ndarray
    weight: np.ndarray


def _block_weights(graph: CoactivationGraph, block, s: ModuleSettings) -> np.ndarray:
    w = graph.weight(s.weight)
    raw = np.array(w.raw(block), dtype=np.float64)
    if s.negative == "abs":
        np.abs(raw, out=raw)
    raw[~np.isfinite(raw)] = 0.0  # pmi's -inf where two neurons never fire together
    raw[raw < 0] = 0.0
    return raw


FULL_LAYERS = ("module detection needs the full adjacent layers (a store, or a .gpickle with one edge between every "
               "two neurons of adjacent layers, as stage c writes it)")


def full_layers(graph: CoactivationGraph) -> CoactivationGraph:
    """
    The graph with dense layer-pair blocks: a store's as it is; an edge list (a .gpickle) that holds every pair
    of neurons of adjacent layers exactly once, neuron id = layer * d_mlp + dimension, rebuilt as those blocks;
    anything else (an edited edge list) is refused.
    """
    if all(isinstance(b, DenseBlock) for b in graph.blocks):
        return graph
    if len(graph.blocks) != 1 or not graph.num_nodes:
        raise PipelineError(FULL_LAYERS)
    (b,) = graph.blocks
    ids, d = graph.node_ids, int(graph.dimension.max()) + 1
    n_layer = graph.num_nodes // d
    if (n_layer < 2 or graph.num_nodes != n_layer * d or not np.array_equal(ids, np.arange(n_layer * d))
            or not np.array_equal(graph.layer, ids // d) or not np.array_equal(graph.dimension, ids % d)
            or b.num_edges != (n_layer - 1) * d * d):
        raise PipelineError(FULL_LAYERS)
    u, v = np.minimum(b.src, b.tgt), np.maximum(b.src, b.tgt)  # node positions, here the ids
    lower = u // d
    key = (lower * d + u % d) * d + v % d
    if not np.array_equal(v // d, lower + 1) or len(np.unique(key)) != len(key):
        raise PipelineError(FULL_LAYERS)
    counts = np.zeros((n_layer - 1) * d * d, np.int64)
    counts[key] = b.counts()
    counts = counts.reshape(n_layer - 1, d, d)
    blocks = [DenseBlock(slice(i * d, (i + 1) * d), slice((i + 1) * d, (i + 2) * d), counts[i])
              for i in range(n_layer - 1)]
    return replace(graph, blocks=blocks, max_co_activation=None, _weights={})


def thin(graph: CoactivationGraph, s: ModuleSettings) -> Edges:
    """The edges the settings keep (see the module's docstring), from the graph's dense layer-pair blocks."""
    if any(not isinstance(b, DenseBlock) for b in graph.blocks):
        raise PipelineError(FULL_LAYERS)
    rng = np.random.default_rng(s.seed)
    tiebreak = rng.permutation(graph.num_nodes)  # a seeded rank of each node: ties go by it, not by id
    if s.threshold is not None:
        divisor = graph.weight(s.weight).max
        if s.negative == "abs":  # the largest magnitude normalises
            divisor = max((float(np.abs(np.asarray(graph.weight(s.weight).raw(b))).max()) for b in graph.blocks),
                          default=0.0)
        src, tgt, wts = [], [], []
        for b in graph.blocks:
            raw = _block_weights(graph, b, s)
            keep = (raw / (divisor if divisor > 0 else 1.0)) > s.threshold
            r, c = np.nonzero(keep & (raw > 0))
            src.append(r + b.rows.start)
            tgt.append(c + b.cols.start)
            wts.append(raw[r, c])
        return Edges(graph.num_nodes, *(np.concatenate(x) if x else np.zeros(0) for x in (src, tgt, wts)))
    K, N = s.top_edges_per_node, graph.num_nodes
    # candidates: each node's K strongest edges within each block it is in, with every edge tied with the K-th
    node, other, weight = [], [], []
    for b in graph.blocks:
        raw = _block_weights(graph, b, s)
        for axis in (1, 0):  # a row's edges (node in the block's first layer), a column's (in its second)
            kk = min(K, raw.shape[axis])
            kth = np.take(np.partition(raw, raw.shape[axis] - kk, axis=axis), [raw.shape[axis] - kk], axis=axis)
            r, c = np.nonzero((raw >= kth) & (raw > 0))
            u, v = r + b.rows.start, c + b.cols.start
            node.append(u if axis == 1 else v)
            other.append(v if axis == 1 else u)
            weight.append(raw[r, c])
    node, other, weight = (np.concatenate(x) for x in (node, other, weight))
    # per node: the largest weights first, ties by the other end's seeded rank; its first K
    order = np.lexsort((tiebreak[other], -weight, node))
    ranked = node[order]
    rank = np.arange(len(order)) - np.searchsorted(ranked, ranked, side="left")
    chosen = order[rank < K]
    lo, hi = np.minimum(node[chosen], other[chosen]), np.maximum(node[chosen], other[chosen])
    key, first = np.unique(lo * N + hi, return_index=True)
    return Edges(N, key // N, key % N, weight[chosen][first])


def _igraph(edges: Edges):
    import igraph as ig  # lazy: only module finding needs igraph

    g = ig.Graph(n=edges.n_nodes)
    g.add_edges(np.column_stack([edges.src, edges.tgt]))  # about twice as fast as the constructor's edges=
    g.es["weight"] = edges.weight
    return g


def leiden(edges: Edges, resolution: float | None, seed: int, g=None) -> np.ndarray:
    """Each node's module: igraph's Leiden (modularity, or CPM at `resolution`; ITERATIONS iterations, igraph's
    default), its random source seeded (igraph draws from a Python random.Random). g: the edges' igraph Graph,
    when already built."""

    import igraph as ig  # lazy: only module finding needs igraph

    g = _igraph(edges) if g is None else g
    ig.set_random_number_generator(random.Random(seed))
    try:
        if resolution is None:
            c = g.community_leiden(objective_function="modularity", weights="weight", n_iterations=ITERATIONS)
        else:
            c = g.community_leiden(objective_function="CPM", weights="weight", resolution=resolution,
                                   n_iterations=ITERATIONS)
    finally:
        ig.set_random_number_generator(random)
    return np.array(c.membership, np.int64)


def modularity(edges: Edges, membership: np.ndarray, g=None) -> float:
    """Newman's weighted modularity Q of the partition (igraph's)."""
    g = _igraph(edges) if g is None else g
    return float(g.modularity(membership.tolist(), weights="weight"))


def rewire(edges: Edges, layer: np.ndarray, seed: int, rounds: int = 10) -> Edges:
    """
    A degree-preserving rewiring within each layer pair: `rounds` passes, each pairing the pair's edges at random
    and swapping the targets of every pair whose two new edges exist nowhere in the graph yet (nor twice among
    the proposals). igraph's Graph.rewire does the same swaps but drops edge attributes, and the weights must
    stay with their edges; hence this, with each layer pair's edges held as a d x d occupancy matrix, so that a
    pass is a few gathers and scatters.
    """
    rng = np.random.default_rng(seed)
    n = edges.n_nodes
    d = int(np.bincount(layer).max())  # neurons per layer; a node's dimension is its id % d
    src, tgt, w = edges.src.copy(), edges.tgt.copy(), edges.weight.copy()
    group = layer[src] * (int(layer.max()) + 2) + layer[tgt]
    occupied = np.zeros((d, d), bool)
    claim = np.full((d, d), -1, np.int64)  # which proposal a new edge was last claimed by
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        if len(idx) < 2:
            continue
        occupied[:] = False
        occupied[src[idx] % d, tgt[idx] % d] = True
        base = 0
        claim[:] = -1
        for _ in range(rounds):
            perm = rng.permutation(idx)
            a, b = perm[0:len(perm) - 1:2], perm[1::2]
            sa, sb, ta, tb = src[a] % d, src[b] % d, tgt[a] % d, tgt[b] % d
            ok = ~occupied[sa, tb] & ~occupied[sb, ta] & ((sa != sb) | (ta != tb))
            # two swaps proposing the same new edge: each edge keeps one claimant, and a swap goes ahead only
            # when it holds both of its edges, so no edge is made twice
            ids = base + np.arange(len(a))
            claim[sa[ok], tb[ok]] = ids[ok]
            claim[sb[ok], ta[ok]] = ids[ok]
            ok &= (claim[sa, tb] == ids) & (claim[sb, ta] == ids)
            base += len(a)
            occupied[sa[ok], ta[ok]] = False
            occupied[sb[ok], tb[ok]] = False
            occupied[sa[ok], tb[ok]] = True
            occupied[sb[ok], ta[ok]] = True
            new_a = tgt[b[ok]].copy()
            tgt[b[ok]] = tgt[a[ok]]
            tgt[a[ok]] = new_a
    return Edges(n, src, tgt, w)


def ari(a: np.ndarray, b: np.ndarray) -> float:
    import igraph as ig  # lazy: only module finding needs igraph

    return float(ig.compare_communities(a.tolist(), b.tolist(), method="adjusted_rand"))


@dataclass
class Modules:
    membership: np.ndarray  # per node position
    edges: Edges
    q: float
    null_q: np.ndarray
    seed_ari: list
    settings: ModuleSettings

    @property
    def null_mean(self) -> float:
        return float(self.null_q.mean()) if len(self.null_q) else float("nan")

    @property
    def null_std(self) -> float:
        return float(self.null_q.std(ddof=1)) if len(self.null_q) > 1 else float("nan")

    @property
    def p_null(self) -> float:
        """One-sided empirical p of Q among the null's: (1 + #null >= Q) / (1 + N)."""
        return float((1 + (self.null_q >= self.q).sum()) / (1 + len(self.null_q))) if len(self.null_q) else float("nan")

    @property
    def structured(self) -> bool:
        """Modules stronger than every rewired graph's (p <= 0.05 needs N >= 19)."""
        return len(self.null_q) >= 19 and self.p_null <= 0.05


def by_size(membership: np.ndarray) -> np.ndarray:
    """The same partition, its modules numbered by decreasing size (ties in igraph's order)."""
    order = np.argsort(-np.bincount(membership), kind="stable")
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    return renumber[membership]


def find_modules(graph: CoactivationGraph, s: ModuleSettings, progress=None) -> Modules:
    s.check()
    graph = full_layers(graph)
    edges = thin(graph, s)
    if not len(edges.weight):
        raise PipelineError(f"no edge of weight {s.weight} survives the thinning: lower --threshold")
    g = _igraph(edges)
    membership = by_size(leiden(edges, s.resolution, s.seed, g))
    q = modularity(edges, membership, g)
    del g
    tasks = [("seed", i) for i in range(max(s.seeds - 1, 0))] + [("null", i) for i in range(s.null_graphs)]
    done = _run(tasks, edges, graph.layer, s, progress)
    runs = [membership] + [r for (kind, _), r in zip(tasks, done) if kind == "seed"]
    seed_ari = [ari(runs[i], runs[j]) for i in range(len(runs)) for j in range(i + 1, len(runs))]
    null = [r for (kind, _), r in zip(tasks, done) if kind == "null"]
    return Modules(membership, edges, q, np.array(null), seed_ari, s)


_WORK = {}  # the tasks' inputs in each worker process (set before the fork)


def _task(task: tuple):
    """("seed", i): the partition under seed + 1 + i; ("null", i): Q of the i-th rewired graph. Each is seeded
    on its own, so the results do not depend on the number of processes."""
    kind, i = task
    edges, layer, s = _WORK["edges"], _WORK["layer"], _WORK["settings"]
    if kind == "seed":
        if "graph" not in _WORK:  # built once per process
            _WORK["graph"] = _igraph(edges)
        return leiden(edges, s.resolution, s.seed + 1 + i, _WORK["graph"])
    r = rewire(edges, layer, s.seed + 1000 + i)
    g = _igraph(r)
    return modularity(r, leiden(r, s.resolution, s.seed, g), g)


def _run(tasks: list, edges: Edges, layer: np.ndarray, s: ModuleSettings, progress=None) -> list:
    """The tasks' results in order, in up to os.cpu_count() forked processes where fork exists; progress(1) per
    rewired graph."""

    _WORK.update(edges=edges, layer=layer, settings=s)
    workers = min(os.cpu_count() or 1, len(tasks))
    out = []
    try:
        if workers > 1 and "fork" in mp.get_all_start_methods():

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                results = pool.map(_task, tasks)
                for t, r in zip(tasks, results):
                    out.append(r)
                    if progress is not None and t[0] == "null":
                        progress(1)
        else:
            for t in tasks:
                out.append(_task(t))
                if progress is not None and t[0] == "null":
                    progress(1)
    finally:
        _WORK.clear()
    return out


def halves_ari(halves, s: ModuleSettings) -> float | None:
    """The adjusted Rand index between the partitions found on the two halves of the selection data
    (gelutrace.selection.stability.Halves), with the same settings and seed; None without halves."""
    if len(halves.halves) != 2:
        return None
    parts = [leiden(thin(h.graph, s), s.resolution, s.seed) for h in halves.halves]
    return ari(*parts)


def describe(mods: Modules, graph: CoactivationGraph, halves=None) -> dict:
    """The modules' record ({m}_modules.json), without the per-node table."""
    m = mods.membership
    sizes = np.bincount(m)
    layers = sorted(set(graph.layer.tolist()))
    comp = {str(k): {str(L): int(((m == k) & (graph.layer == L)).sum()) for L in layers if ((m == k) & (graph.layer == L)).any()}
            for k in range(len(sizes))}
    return _strict({"graph": graph.source, "model": graph.model, "settings": asdict(mods.settings),
            "edges_kept": int(len(mods.edges.weight)), "num_modules": int(len(sizes)),
            "sizes": sorted(sizes.tolist(), reverse=True), "layer_composition": comp,
            "modularity": mods.q,
            "null": {"graphs": int(len(mods.null_q)), "q": mods.null_q.tolist(), "mean": mods.null_mean,
                     "std": mods.null_std, "z": (mods.q - mods.null_mean) / mods.null_std
                     if mods.null_std and np.isfinite(mods.null_std) and mods.null_std > 0 else None,
                     "p": mods.p_null, "structured": mods.structured},
            "seed_ari": {"runs": mods.settings.seeds, "mean": float(np.mean(mods.seed_ari)) if mods.seed_ari else None,
                         "min": float(np.min(mods.seed_ari)) if mods.seed_ari else None},
            "halves": None if halves is None else {"how": halves.how, "ari": halves_ari(halves, mods.settings)}})


def _strict(x):
    """The record with None (JSON null) for every figure that does not exist (NaN, an infinity): strict JSON."""
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def verdict(record: dict) -> str:
    """The modules' standing against the null, in words."""
    n = record["null"]
    if n["graphs"] < 19:
        return (f"{record['num_modules']} modules, Q = {record['modularity']:.3f}; {n['graphs']} rewired graphs are "
                f"too few to test it against the null (19 or more allow p <= 0.05).")
    if not n["structured"]:
        return (f"The graph has no module structure: Q = {record['modularity']:.3f} is no stronger than that of "
                f"{n['graphs']} degree-preserving rewired graphs (mean {n['mean']:.3f}, sd {n['std']:.3f}; "
                f"p = {n['p']:.3f}).")
    return (f"{record['num_modules']} modules, Q = {record['modularity']:.3f} against {n['mean']:.3f} ± "
            f"{n['std']:.3f} in {n['graphs']} degree-preserving rewired graphs (p = {n['p']:.3f}).")



def module_edges(mods: Modules) -> np.ndarray:
    """(modules, modules) summed weight of the thinned graph's edges between (and, on the diagonal, within) each
    pair of modules: the module graph's edges."""
    n = int(mods.membership.max()) + 1 if len(mods.membership) else 0
    a, b = mods.membership[mods.edges.src], mods.membership[mods.edges.tgt]
    out = np.zeros((n, n))
    np.add.at(out, (np.minimum(a, b), np.maximum(a, b)), mods.edges.weight)
    return out + np.triu(out, 1).T


# --- reading c_find_modules' files back (stage d --modules, the report, the cards) ---------------------------
@dataclass
class ModuleFile:
    """A {m}_modules_{weight}.csv with its record beside it: each neuron id's module (-1: not in the graph)."""
    path: str
    module_of: np.ndarray  # per neuron id
    record: dict
    d_mlp: int  # neurons per layer

    @property
    def num_modules(self) -> int:
        return int(self.module_of.max()) + 1 if len(self.module_of) else 0

    def ids(self, module: int) -> np.ndarray:
        return np.flatnonzero(self.module_of == module).astype(np.int64)


def read_modules(csv_path, n_neurons: int | None = None) -> ModuleFile:
    """c_find_modules' table and record; a file that is not one (columns, ids, module numbers) is refused."""
    p = Path(csv_path)
    side = p.with_suffix(".json")  # layout.MODULES_RECORD beside layout.MODULES
    for f in (p, side):
        if not f.is_file():
            raise PipelineError(f"{f} does not exist (c_find_modules.py writes it)")
    try:
        df = pd.read_csv(p)
        record = json.loads(side.read_text())
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise PipelineError(f"{p} or {side} cannot be read: {e}") from None
    if list(df.columns) != layout.MODULES_COLUMNS:
        raise PipelineError(f"{p}: expected c_find_modules' columns {', '.join(layout.MODULES_COLUMNS)}")
    if not isinstance(record, dict) or not isinstance(record.get("model"), str) or not isinstance(
            record.get("sizes"), list):
        raise PipelineError(f"{side} is not c_find_modules' record (no model or sizes): rerun c_find_modules.py")
    if not len(df):
        raise PipelineError(f"{p} holds no neurons")
    if not all(pd.api.types.is_integer_dtype(df[c]) for c in layout.MODULES_COLUMNS):  # 1.5, NaN or text
        raise PipelineError(f"{p}: its columns must be whole numbers in every row")
    node, layer, dim, module = (df[c].to_numpy(np.int64) for c in layout.MODULES_COLUMNS)
    widths = np.unique((node - dim)[layer > 0] // layer[layer > 0])
    d_mlp = int(widths[0]) if len(widths) else int(dim.max()) + 1 if len(dim) else 0
    if len(widths) > 1 or (len(node) and not np.array_equal(node, layer * d_mlp + dim)):
        raise PipelineError(f"{p}: node_id is not layer * width + dimension for one width")
    n = int(n_neurons) if n_neurons is not None else int(node.max()) + 1 if len(node) else 0
    if len(node) and (node.min() < 0 or node.max() >= n or len(np.unique(node)) != len(node)):
        raise PipelineError(f"{p}: node ids must be distinct and in 0..{n - 1} (a file of another model?)")
    if len(module) and (module.min() < 0 or set(np.unique(module)) != set(range(int(module.max()) + 1))):
        raise PipelineError(f"{p}: modules must be numbered 0, 1, 2, ... without gaps")
    if sorted(np.bincount(module).tolist(), reverse=True) != record["sizes"]:
        raise PipelineError(f"{p}: its modules' sizes are not those its record {side.name} gives (a cut or edited "
                            f"copy?): rerun c_find_modules.py")
    module_of = np.full(n, -1, np.int64)
    module_of[node] = module
    return ModuleFile(str(p), module_of, record, d_mlp)
