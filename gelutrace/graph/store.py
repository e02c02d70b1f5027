"""
Stages c and c_analyze's files: the compact co-activation graph store, the NetworkX .gpickle files, reading
a graph in any form, and c_analyze's analyzed reference.

Compact graph store (a directory; every file loads with np.load(..., allow_pickle=False), the count
matrices with mmap_mode='r' so one layer pair at a time is in memory):
    graph.json                  header: format, version, uid, model, n_layer, d_mlp, num_neurons,
                                num_samples, kind, num_edges, num_nonzero_edges, max_activation_count,
                                max_co_activation_count, count_dtype, blocks (one record per file below)
    node_activation_count.npy   int64, one per neuron in id order (node id = layer * d_mlp + dimension)
    pair_{i:03d}_{i+1:03d}.npy  kind "adjacent_dense": counts of every edge between layer i and i+1, a
                                d_mlp x d_mlp matrix, row = dimension in layer i, column = dimension in i+1
    edges.npy, edge_counts.npy  kind "edge_list" (a user-edited .el): (E, 2) int64 edges (u < v), counts
    direct_{i:03d}_{j:03d}.npy, direct_abs_...npy, direct_loss.npy, direct_loss_abs.npy, direct_value_abs.npy,
    direct_write_norm.npy       with stage b --direct_edges (header "direct": pairs, samples, loss_tokens, edges,
                                gated, write_norm): the causal weights' float64 means and each neuron's output
                                weight norm (gelutrace.graph.coactivation.CausalEdges; an older store has no
                                direct_write_norm.npy)
Counts are uint16 while n_samples <= 65535, else uint32/uint64.

(The counting and the in-memory graph are gelutrace.graph.coactivation.)
"""

import json
import os
import pickle
import uuid
from pathlib import Path

import numpy as np

from gelutrace import PipelineError
from gelutrace.files import atomic, layout
from gelutrace.graph.causal import CausalEdges
from gelutrace.graph.coactivation import (
    DEFAULT_WEIGHT,
    ActivationData,
    CoactivationGraph,
    DenseBlock,
    EdgeBlock,
    available_memory,  # noqa: F401  (still importable from here, where it was defined)
    check_nx_fits,  # noqa: F401
    count_dtype,
    edge_list_counts,
    pair_counts,
)

STORE_FORMAT = "gelutrace-coactivation-graph"
ANALYZED_FORMAT = "gelutrace-analyzed-graph"
STORE_VERSION = 1


# --- stage c: build --------------------------------------------------------------------------------------
def write_store(target, data: ActivationData, progress=None, causal: CausalEdges | None = None) -> dict:
    """
    Count and write the compact store of stage b's data. Full adjacent layers stream over blocks of rows of the
    packed matrix, one layer pair at a time (progress: one step per pass); an edited edge list unpacks it.
    """
    if data.edges is None:
        from gelutrace.graph.counts import PackedMatrixCounts  # imports torch: only the scripts that count need it

        counts = PackedMatrixCounts(data.packed, data.n_layer, data.d_mlp, progress=progress)
        node_counts = counts.node_counts()
        data.check_node_counts(node_counts)
        return write_count_store(target, data.model, data.n_layer, data.d_mlp, data.num_samples, node_counts,
                                 data.source, pair_counts=counts.pair_counts, causal=causal)
    if causal is not None:
        raise PipelineError("the direct-effect weights need the full adjacent layers, not an edited edge list")
    node_counts = data.active.sum(axis=0, dtype=np.int64)
    data.check_node_counts(node_counts)
    return write_count_store(target, data.model, data.n_layer, data.d_mlp, data.num_samples, node_counts,
                             data.source, edges=data.edges, edge_counts=edge_list_counts(data, data.edges))


def write_count_store(target, model: str, n_layer: int, d_mlp: int, num_samples: int, node_counts: np.ndarray,
                      source: dict, pair_counts=None, edges: np.ndarray | None = None,
                      edge_counts: np.ndarray | None = None, causal: CausalEdges | None = None) -> dict:
    """
    The compact store directory, written atomically, from exact counts: either `pair_counts(i)`, the
    d_mlp x d_mlp counts between layers i and i+1 (kind adjacent_dense), or `edges` with their `edge_counts`
    (kind edge_list). Counts are stored in count_dtype(num_samples); `causal` adds the direct-effect weights.
    Returns the header.
    """
    dt = count_dtype(num_samples)
    node_counts = np.asarray(node_counts, dtype=np.int64)
    blocks, max_c, nonzero = [], 0, 0
    with atomic.atomic_dir(target) as tmp:
        atomic.save_npy(tmp / layout.GRAPH_STORE_NODES, node_counts)
        if edges is None:
            kind, num_edges = "adjacent_dense", (n_layer - 1) * d_mlp ** 2
            for i in range(n_layer - 1):
                c = np.asarray(pair_counts(i)).astype(dt)
                name = layout.GRAPH_STORE_PAIR.format(src=i, tgt=i + 1)
                atomic.save_npy(tmp / name, c)
                max_c, nonzero = max(max_c, int(c.max())), nonzero + int(np.count_nonzero(c))
                blocks.append({"file": name, "src_layer": i, "tgt_layer": i + 1, "shape": list(c.shape)})
                del c
        else:
            kind, num_edges = "edge_list", len(edges)
            counts = np.asarray(edge_counts).astype(dt)
            atomic.save_npy(tmp / layout.GRAPH_STORE_EDGES, edges.astype(np.int64))
            atomic.save_npy(tmp / layout.GRAPH_STORE_EDGE_COUNTS, counts)
            max_c = int(counts.max()) if counts.size else 0
            nonzero = int(np.count_nonzero(counts))
            blocks.append({"file": layout.GRAPH_STORE_EDGES, "counts_file": layout.GRAPH_STORE_EDGE_COUNTS,
                           "num_edges": num_edges})
        header = {"format": STORE_FORMAT, "version": STORE_VERSION, "uid": uuid.uuid4().hex, "model": model,
                  "n_layer": n_layer, "d_mlp": d_mlp, "num_neurons": n_layer * d_mlp,
                  "num_samples": num_samples, "kind": kind, "num_edges": num_edges, "num_nonzero_edges": nonzero,
                  "max_activation_count": int(node_counts.max()), "max_co_activation_count": max_c,
                  "count_dtype": np.dtype(dt).name, "blocks": blocks, "source": source}
        if causal is not None:
            for name, a in causal.arrays():
                atomic.save_npy(tmp / f"{name}.npy", a)
            header["direct"] = causal.header()
        (tmp / layout.GRAPH_STORE_HEADER).write_text(json.dumps(header, indent=2) + "\n")
    return header


def _graph(model, n_layer: int, d_mlp: int, num_samples: int, node_counts: np.ndarray, blocks: list):
    n = n_layer * d_mlp
    ids = np.arange(n, dtype=np.int64)
    return CoactivationGraph(model, ids, np.asarray(node_counts, np.int64), ids // d_mlp, ids % d_mlp, blocks,
                             num_samples)


def count_graph(data: ActivationData) -> CoactivationGraph:
    """The graph of stage b's data counted in memory: what write_store then read_store give, without the files."""
    d = data.d_mlp
    if data.edges is None:
        from gelutrace.graph.counts import PackedMatrixCounts  # lazy: imports torch; only the scripts that count need it
        counts = PackedMatrixCounts(data.packed, data.n_layer, d)
        dt = count_dtype(data.num_samples)
        blocks = [DenseBlock(slice(i * d, (i + 1) * d), slice((i + 1) * d, (i + 2) * d),
                             np.asarray(counts.pair_counts(i)).astype(dt)) for i in range(data.n_layer - 1)]
        return _graph(data.model, data.n_layer, d, data.num_samples, counts.node_counts(), blocks)
    c = edge_list_counts(data, data.edges)
    return _graph(data.model, data.n_layer, d, data.num_samples, data.active.sum(axis=0, dtype=np.int64),
                  [EdgeBlock(data.num_neurons, data.edges[:, 0], data.edges[:, 1], c)])


def sum_graphs(graphs: list[CoactivationGraph]) -> CoactivationGraph:
    """The exact sum of graphs counted on disjoint samples of one model (the shards of one corpus run)."""
    g0 = graphs[0]
    if not all(isinstance(b, DenseBlock) for g in graphs for b in g.blocks):
        raise PipelineError("only graphs of full adjacent layers (corpus mode's) can be summed")
    if len(graphs) == 1:
        return g0
    samples = sum(g.num_samples for g in graphs)
    dt = count_dtype(samples)
    blocks = [DenseBlock(b.rows, b.cols, sum(np.asarray(g.blocks[i].counts(), dt) for g in graphs))
              for i, b in enumerate(g0.blocks)]
    d = int(g0.dimension.max()) + 1
    g = _graph(g0.model, len(g0.blocks) + 1, d, samples, sum(g.activation_count for g in graphs), blocks)
    if any(x.causal is not None for x in graphs):
        if any(x.causal is None for x in graphs):
            raise PipelineError("some shards have direct-effect weights and some do not: run every shard's stage b "
                                "with the same --direct_edges")
        g.causal = CausalEdges.merge([x.causal for x in graphs])
    return g


def build_networkx(data: ActivationData, progress=None):
    """The original's graph object: all nodes (layer, dimension, activation_count), every base edge."""
    import networkx as nx  # lazy: only the NetworkX paths need it (slow to import)
    counts = data.active.sum(axis=0, dtype=np.int64)
    data.check_node_counts(counts)
    ids = np.arange(data.num_neurons)
    g = nx.Graph(model=data.model, num_samples=data.num_samples)
    g.add_nodes_from(zip(ids.tolist(), ({"layer": int(i // data.d_mlp), "dimension": int(i % data.d_mlp),
                                         "activation_count": int(c)} for i, c in zip(ids, counts))))
    if data.edges is not None:
        c = edge_list_counts(data, data.edges)
        g.add_edges_from(zip(data.edges[:, 0].tolist(), data.edges[:, 1].tolist(),
                             ({"co_activation_count": x} for x in c.tolist())))
        return g
    d = data.d_mlp
    for i in range(data.n_layer - 1):
        c = pair_counts(data.layer(i), data.layer(i + 1))
        r, q = np.divmod(np.arange(c.size), d)
        g.add_edges_from(zip((r + i * d).tolist(), (q + (i + 1) * d).tolist(),
                             ({"co_activation_count": x} for x in c.ravel().tolist())))
        if progress is not None:
            progress.update(1)
    return g


def write_gpickle(g, target):
    with atomic.atomic_open(target, "wb") as f:
        pickle.dump(g, f, protocol=pickle.HIGHEST_PROTOCOL)


# --- reading a graph in any form -------------------------------------------------------------------------
def is_store(p: Path) -> bool:
    return p.is_dir() and (p / layout.GRAPH_STORE_HEADER).is_file()


def read_store(store) -> CoactivationGraph:
    """
    A compact store, its header checked against its arrays: types and shapes, the block list, the count dtype
    (unsigned, the one num_samples calls for), every count within 0..num_samples, and both maxima equal to the
    arrays' (one pass over the counts). A mismatch is a damaged store, never a silently wrong graph. A store of
    no samples (a shard that was given no window) holds only zeros.
    """
    p = Path(store)
    hp = p / layout.GRAPH_STORE_HEADER
    if not hp.is_file():
        raise PipelineError(f"{p} is not a graph store (no {layout.GRAPH_STORE_HEADER}); stage c writes it")
    try:
        h = json.loads(hp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{hp} is not valid JSON: {e}") from None
    if not isinstance(h, dict) or h.get("format") != STORE_FORMAT or h.get("version") != STORE_VERSION:
        raise PipelineError(f"{hp}: not a {STORE_FORMAT} v{STORE_VERSION} header")

    rerun = "stage b (corpus mode wrote it)" if isinstance(h.get("source"), dict) and "corpus" in h["source"] \
        else "stage c"

    def damaged(why):
        return PipelineError(f"graph store {p} is damaged: {why}; rerun {rerun}")

    def integer(key, lo=0):
        v = h.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise damaged(f"{key} is {v!r}, expected an integer >= {lo}")
        return v

    n_layer, d, n = integer("n_layer", 1), integer("d_mlp", 1), integer("num_neurons", 1)
    samples = integer("num_samples")
    max_a, max_c = integer("max_activation_count"), integer("max_co_activation_count")
    if n != n_layer * d:
        raise damaged(f"num_neurons {n} is not n_layer x d_mlp = {n_layer * d}")
    if not isinstance(h.get("uid"), str) or not h["uid"]:
        raise damaged("no uid")
    try:
        want_dtype = np.dtype(count_dtype(samples))
        if h.get("count_dtype") != want_dtype.name:
            raise damaged(f"count_dtype {h.get('count_dtype')!r}, expected {want_dtype.name} for {samples} samples")

        def counts_file(f, shape=None):
            arr = np.load(f, mmap_mode="r", allow_pickle=False)  # validates the header, maps the data
            if arr.dtype != want_dtype:
                raise damaged(f"{f.name} holds {arr.dtype}, expected {want_dtype}")
            if shape is not None and arr.shape != shape:
                raise damaged(f"{f.name} has shape {arr.shape}, expected {shape}")
            return arr

        counts = np.load(p / layout.GRAPH_STORE_NODES, allow_pickle=False)
        if counts.shape != (n,) or counts.dtype != np.int64:
            raise damaged(f"{layout.GRAPH_STORE_NODES} holds {counts.dtype} {counts.shape}, expected int64 ({n},)")
        if counts.min() < 0 or counts.max() > samples or int(counts.max()) != max_a:
            raise damaged(f"node counts span {counts.min()}..{counts.max()}, but the header says max {max_a} of "
                          f"{samples} samples")
        blocks, seen_max = [], 0
        if h.get("kind") == "adjacent_dense":
            listed = h.get("blocks")
            want = [(i, i + 1) for i in range(n_layer - 1)]
            if not isinstance(listed, list) or [(b.get("src_layer"), b.get("tgt_layer")) for b in listed] != want:
                raise damaged(f"its block list is not the {n_layer - 1} adjacent layer pairs")
            for b in listed:
                i, j = b["src_layer"], b["tgt_layer"]
                if b.get("file") != layout.GRAPH_STORE_PAIR.format(src=i, tgt=j) or b.get("shape") != [d, d]:
                    raise damaged(f"block record {b}")
                arr = counts_file(p / b["file"], (d, d))
                seen_max = max(seen_max, int(arr.max()) if arr.size else 0)
                blocks.append(DenseBlock(slice(i * d, (i + 1) * d), slice(j * d, (j + 1) * d), p / b["file"]))
        elif h.get("kind") == "edge_list":
            e = np.load(p / layout.GRAPH_STORE_EDGES, allow_pickle=False)
            c = np.asarray(counts_file(p / layout.GRAPH_STORE_EDGE_COUNTS))
            if e.ndim != 2 or e.shape[1:] != (2,) or len(c) != len(e) or e.dtype != np.int64:
                raise damaged("edges and edge counts do not match")
            if e.size and (e.min() < 0 or e.max() >= n or (e[:, 0] >= e[:, 1]).any()):
                raise damaged("edges outside the neurons, or not as (u, v) with u < v")
            seen_max = int(c.max()) if c.size else 0
            blocks.append(EdgeBlock(n, e[:, 0], e[:, 1], c))
        else:
            raise damaged(f"unknown kind {h.get('kind')!r}")
    except PipelineError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise damaged(f"{type(e).__name__}: {e}") from None
    if seen_max != max_c or seen_max > samples:
        raise damaged(f"its largest co-activation count is {seen_max}, but the header says {max_c}")
    ids = np.arange(n, dtype=np.int64)
    causal = None
    if "direct" in h:
        def get(name):
            try:
                return np.load(p / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise damaged(f"{name}.npy: {e}") from None
        causal = CausalEdges.from_arrays(h["direct"], get, n, d, p)
    return CoactivationGraph(h.get("model"), ids, counts, ids // d, ids % d, blocks, samples, max_a, max_c, str(p), h,
                             causal)


# .gpickle is pickle, and pickle can run code; only these classes may appear in one: what a networkx graph of
# this pipeline is made of (its own containers and numbers need no class at all).
GPICKLE_CLASSES = {
    ("networkx.classes.graph", "Graph"),
    # views a graph caches in itself once used (g.nodes, g.edges, g.adj, g.degree): data holders, no code
    ("networkx.classes.reportviews", "NodeView"), ("networkx.classes.reportviews", "EdgeView"),
    ("networkx.classes.reportviews", "DegreeView"), ("networkx.classes.coreviews", "AdjacencyView"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"), ("numpy", "dtype"),
    # protocols 0 and 1 rebuild objects through these (under their Python 2 names, too)
    ("copyreg", "_reconstructor"), ("builtins", "object"), ("copy_reg", "_reconstructor"), ("__builtin__", "object"),
    ("_codecs", "encode"),  # protocol 0 spells the bytes of a numpy scalar as text
}


class _GraphUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in GPICKLE_CLASSES:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a .gpickle may hold only a networkx Graph "
                                         f"with plain and numpy-number attributes")
        return super().find_class(module, name)


def load_gpickle(p: Path):
    """A networkx Graph from a .gpickle, through an unpickler that refuses every class but the allowed ones."""
    try:
        with open(p, "rb") as f:
            g = _GraphUnpickler(f).load()
    except Exception as e:
        raise PipelineError(f"cannot read {p} as a pickled networkx graph: {type(e).__name__}: {e}") from None
    if not hasattr(g, "nodes") or not hasattr(g, "edges"):
        raise PipelineError(f"{p} does not hold a networkx graph")
    return g


def graph_from_networkx(g, source: str = "") -> CoactivationGraph:
    """The same representation as a store, from a graph object (iterating a NetworkX graph is unavoidable)."""
    n = g.number_of_nodes()
    try:
        ids = np.fromiter(g.nodes, dtype=np.int64, count=n)
    except (TypeError, ValueError):
        raise PipelineError(f"{source}: node ids must be integers") from None
    order = np.argsort(ids, kind="stable")
    ids = ids[order]

    def node_attr(name):
        try:
            return np.fromiter((g.nodes[int(i)][name] for i in ids), dtype=np.int64, count=n)
        except KeyError:
            raise PipelineError(f"{source}: nodes lack the attribute {name!r}") from None

    counts, layer, dim = node_attr("activation_count"), node_attr("layer"), node_attr("dimension")
    m = g.number_of_edges()
    try:
        e = np.fromiter((x for u, v, w in g.edges(data="co_activation_count") for x in (u, v, w)),
                        dtype=np.int64, count=3 * m).reshape(m, 3)
    except TypeError:
        raise PipelineError(f"{source}: edges lack the attribute 'co_activation_count'") from None
    src, tgt = np.searchsorted(ids, e[:, 0]), np.searchsorted(ids, e[:, 1])
    block = EdgeBlock(n, src, tgt, np.maximum(e[:, 2], 0))  # the original dropped counts <= 0 as zero
    model = g.graph.get("model") or _model_from_name(Path(source).name)
    return CoactivationGraph(model, ids, counts, layer, dim, [block], g.graph.get("num_samples"), source=source)


def _model_from_name(name: str) -> str | None:
    for marker in ("_weighted_graph",):
        if marker in name:
            return name.split(marker)[0]
    return None


def read_graph(path) -> CoactivationGraph:
    """A store directory, an analyzed reference (.json) or a NetworkX .gpickle, as one representation."""
    p = atomic.recover_dir(path)
    if not p.exists():
        raise PipelineError(f"graph {p} does not exist")
    if p.is_dir():
        return read_store(p)
    if p.suffix == ".json":
        return read_analyzed_reference(p)
    if p.suffix == ".gpickle":
        return graph_from_networkx(load_gpickle(p), str(p))
    raise PipelineError(f"{p}: expected a graph store directory, an *_analyzed.json or a .gpickle")


# --- stage c_analyze ---------------------------------------------------------------------------------------
def analyzed_name(graph_path, weight: str = DEFAULT_WEIGHT) -> str:
    p = Path(graph_path)
    name = p.name[: -len(".gpickle")] if p.name.endswith(".gpickle") else p.name
    return layout.weighted_name(layout.ANALYZED.format(name=name) + (".gpickle" if p.suffix == ".gpickle" else ".json"),
                            weight)


def write_analyzed_reference(graph: CoactivationGraph, target, weight: str = DEFAULT_WEIGHT):
    """The analyzed artefact of a store: a reference to it plus the maxima used to normalise; no edge data."""
    target = Path(target)
    store = Path(os.path.abspath(graph.source))  # the store's name, not the version its link points to
    try:
        rel = os.path.relpath(store, os.path.abspath(target.parent))
    except ValueError:
        rel = str(store)
    nonzero = graph.header.get("num_nonzero_edges")
    atomic.write_json({"format": ANALYZED_FORMAT, "version": STORE_VERSION, "store": rel,
                   "store_absolute": str(store), "store_uid": graph.header.get("uid"), "model": graph.model,
                   "num_nodes": graph.num_nodes, "num_edges": nonzero, "num_edges_with_zero": graph.num_edges,
                   "max_activation_count": graph.max_activation, "max_co_activation_count": graph.max_co_activation,
                   "activation_count_normalized": "activation_count / max_activation_count (float64)",
                   "co_activation_count_normalized": "co_activation_count / max_co_activation_count (float64); "
                                                     "edges with count 0 are dropped",
                   **graph.weight(weight).describe()},
                  target, indent=2)


def read_analyzed_reference(p: Path) -> CoactivationGraph:
    try:
        ref = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(ref, dict) or ref.get("format") != ANALYZED_FORMAT:
        raise PipelineError(f"{p} is not an analyzed-graph reference (c_analyze writes *_analyzed.json)")
    store = (p.parent / ref["store"])
    if not is_store(store):
        store = Path(ref.get("store_absolute", ""))
    if not is_store(store):
        raise PipelineError(f"{p} refers to graph store {ref['store']!r}, which does not exist")
    g = read_store(store)
    if g.header.get("uid") != ref.get("store_uid") or g.model != ref.get("model"):
        raise PipelineError(f"graph store {store} has changed since {p} was written (another run or model); "
                            f"rerun c_analyze")
    if (g.max_activation, g.max_co_activation) != (ref["max_activation_count"], ref["max_co_activation_count"]):
        raise PipelineError(f"{p}: maxima disagree with graph store {store}; rerun c_analyze")
    return g


def analyzed_networkx(g, graph: CoactivationGraph, weight: str = DEFAULT_WEIGHT):
    """The original's analyzed graph: zero-count edges removed, exact float64 normalised weights added; for a
    weight other than count also the edge attributes {weight} and {weight}_normalized and the graph attributes
    of EdgeWeight.describe(). `graph` is graph_from_networkx(g)."""
    import networkx as nx  # lazy: only the NetworkX paths need it (slow to import)
    if weight != DEFAULT_WEIGHT:
        w = graph.weight(weight)
        (block,) = graph.blocks
        raw = w.raw(block)
        norm = w.normalise(raw)
        u, v = graph.node_ids[block.src].tolist(), graph.node_ids[block.tgt].tolist()
        nx.set_edge_attributes(g, dict(zip(zip(u, v), raw.tolist())), weight)
        nx.set_edge_attributes(g, dict(zip(zip(u, v), norm.tolist())), f"{weight}_normalized")
        g.graph.update(w.describe())
    zero = [(u, v) for u, v, c in g.edges(data="co_activation_count") if c <= 0]
    g.remove_edges_from(zero)
    na = graph.normalized_activation()
    nx.set_node_attributes(g, dict(zip(graph.node_ids.tolist(), na.tolist())), "activation_count_normalized")
    mx = graph.max_co_activation
    nx.set_edge_attributes(g, {(u, v): c / mx for u, v, c in g.edges(data="co_activation_count")},
                           "co_activation_count_normalized")
    return g
