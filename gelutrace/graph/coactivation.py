"""
The co-activation graph in memory and its edge weights: exact counting of stage b's data (stage c), the
graph's representation, and the edge weights and threshold rule.

The co-activation count of an edge (u, v) is the number of samples in which both neurons are active. For a
pair of layers it is one matrix product, A_u^T @ A_v over the samples x neurons 0/1 matrix: every entry is
an integer <= n_samples, so float32 BLAS is exact while n_samples < 2**24 (float64 beyond, exact to 2**53).

A graph is handled as `CoactivationGraph`: node arrays plus "blocks" (a dense layer-pair matrix or an
explicit edge list) that are read one at a time, so nothing ever holds all 10^8-10^9 edges as objects.
An `EdgeWeight` (count, jaccard, phi, pmi, or the causal direct and direct_abs of `CausalEdges`) turns a block's counts into edge weights, and a `Cut` (a weight and
a threshold) into the block's kept edges; every degree, sweep, ranking and export goes through them.
(The compact store and the NetworkX files are gelutrace.graph.store; c_analyze's analysis is gelutrace.selection.analysis.)
"""

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from gelutrace import PipelineError
from gelutrace.files import formats, layout
from gelutrace.graph.causal import CausalEdges

# edge weights (EdgeWeight); count is the original's
DIRECT_WEIGHTS = ("direct", "direct_abs")  # the causal weights (gelutrace.record.direct), where stage b measured them
COACTIVATION_WEIGHTS = ("count", "jaccard", "phi", "pmi")  # from the counts, in every store
WEIGHTS = COACTIVATION_WEIGHTS + DIRECT_WEIGHTS
DEFAULT_WEIGHT = layout.DEFAULT_WEIGHT
NEEDS_NUM_SAMPLES = ("phi", "pmi")
WEIGHT_RULE = ("normalised weight = weight / max_weight (max over all edges) when max_weight > 0; an edge is kept "
               "at threshold t in [0, 1] iff its normalised weight > t, so only edges with a positive weight "
               "(and a count > 0) are ever kept")


# A networkx.Graph costs roughly this much RAM per edge (two adjacency entries, an attribute dict, ints) and
# per node while being built and pickled; measured ~300 B/edge for building alone, the pickle memo adds more.
NX_BYTES_PER_EDGE = 600
NX_BYTES_PER_NODE = 1500
# An igraph.Graph: its edge index (four int64 per edge) and, per edge attribute, a Python float or int and the
# list slot holding it; the arrays it is built from besides
IGRAPH_BYTES_PER_EDGE = 200
IGRAPH_BYTES_PER_NODE = 300


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_nx_fits(num_nodes: int, num_edges: int, limit_bytes: int | None, what: str, alternative: str,
                  per_node: int = NX_BYTES_PER_NODE, per_edge: int = NX_BYTES_PER_EDGE):
    """Refuse, before any heavy work, a NetworkX object (or, given its sizes, another graph object) that would not
    fit in memory."""
    need = num_nodes * per_node + num_edges * per_edge
    have = available_memory() if limit_bytes is None else limit_bytes
    if need > have:
        raise PipelineError(f"{what} of {num_nodes:,} nodes and {num_edges:,} edges needs about {_size(need)} of RAM "
                            f"but {_size(have)} is available; {alternative}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


# --- exact counting -------------------------------------------------------------------------------------
def count_dtype(n_samples: int):
    for dt in (np.uint16, np.uint32, np.uint64):
        if n_samples <= np.iinfo(dt).max:
            return dt
    raise PipelineError(f"{n_samples} samples is too many")


def _product_dtype(n_samples: int):
    """A float type whose BLAS dot products of 0/1 vectors of this length are exact integers."""
    if n_samples < 2 ** 24:
        return np.float32
    if n_samples < 2 ** 53:
        return np.float64
    raise PipelineError(f"{n_samples} samples is too many for exact counts")


def pair_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact co-activation counts a^T @ b of two samples x neurons 0/1 (bool or float) matrices."""
    n = a.shape[0]
    ft = _product_dtype(n)
    c = np.asarray(a, dtype=ft).T @ np.asarray(b, dtype=ft)
    return c.astype(count_dtype(n))


@dataclass
class ActivationData:
    """Stage b's outputs as stage c needs them; the matrix stays bit-packed until a path needs it whole."""
    model: str
    n_layer: int
    d_mlp: int
    packed: np.ndarray  # uint8, samples x ceil(n_layer * d_mlp / 8), np.packbits of the 0/1 matrix along axis 1
    edges: np.ndarray | None  # (E, 2) int64 when the user edited the .el, None for full adjacent layers
    source: dict = field(default_factory=dict)
    expected_counts: tuple | None = None  # (neuron ids, activation counts) of the frequency file, checked once counted
    where: str = ""

    @property
    def num_neurons(self):
        return self.n_layer * self.d_mlp

    @property
    def num_samples(self):
        return len(self.packed)

    @cached_property
    def active(self) -> np.ndarray:
        """bool, samples x neurons (8x the packed size): only the edited-edge-list and .gpickle paths need it."""
        return np.unpackbits(self.packed, axis=1, count=self.num_neurons).view(bool)

    def layer(self, i: int) -> np.ndarray:
        return self.active[:, i * self.d_mlp:(i + 1) * self.d_mlp]

    def rows(self, rows: np.ndarray) -> "ActivationData":
        """The same data restricted to some samples (the frequency file's counts no longer apply)."""
        return ActivationData(self.model, self.n_layer, self.d_mlp, self.packed[rows], self.edges, self.source)

    def check_node_counts(self, counts: np.ndarray):
        if self.expected_counts is not None:
            ids, expected = self.expected_counts
            if not np.array_equal(counts[ids], expected):
                raise PipelineError(f"{self.where} on activation counts; rerun stage b")


def load_activation_data(input_dir) -> ActivationData:
    """Read and cross-check stage b's matrix, metadata, frequency table and (edited) edge list."""
    d = Path(input_dir)
    if not d.is_dir():
        raise PipelineError(f"input directory {d} does not exist")
    m = layout.model_prefix(d)
    meta = formats.read_graph_meta(d, m)
    try:
        n_layer, d_mlp = int(meta["n_layer"]), int(meta["d_mlp"])
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{layout.path(d, layout.GRAPH_META, m)} lacks n_layer/d_mlp") from None
    if meta.get("model") not in (None, m):
        raise PipelineError(f"{layout.path(d, layout.GRAPH_META, m)} describes model {meta['model']!r}, "
                            f"but the files are named for {m!r}")
    n = n_layer * d_mlp
    matrix_path = layout.path(d, layout.MATRIX, m)
    packed, n_cols, ids = formats.read_packed_activation_matrix(matrix_path)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise PipelineError(f"{matrix_path} has neuron ids up to {ids.max()}, but {m} has {n} neurons "
                            f"(graph metadata: {n_layer} layers x {d_mlp}); files from different models?")
    if not np.array_equal(ids, np.arange(n)):
        if np.unique(ids).size != ids.size:
            raise PipelineError(f"{matrix_path} lists a neuron id twice")
        full = np.zeros((len(packed), n), dtype=bool)
        full[:, ids] = np.unpackbits(packed, axis=1, count=n_cols).view(bool)
        packed = np.packbits(full, axis=1)
    if len(packed) == 0:
        raise PipelineError(f"{matrix_path} has no samples")
    freq_path = layout.path(d, layout.FREQUENCY, m)
    expected = None
    if freq_path.is_file():
        try:
            freq = pd.read_csv(freq_path, usecols=["neuron_id", "activation_count"])
        except Exception as e:
            raise PipelineError(f"cannot read {freq_path}: {e}") from None
        fid = freq["neuron_id"].to_numpy(np.int64)
        if fid.size and (fid.min() < 0 or fid.max() >= n):
            raise PipelineError(f"{freq_path} has neuron ids outside 0..{n - 1}; files from different models?")
        expected = fid, freq["activation_count"].to_numpy(np.int64)
    edges = None
    if not formats.edges_are_canonical(d, m, meta):
        edges = canonical_edge_list(formats.read_edges(d, m), n, layout.path(d, layout.EDGES, m))
    st = matrix_path.stat()
    source = {"input_dir": str(d.resolve()), "matrix": matrix_path.name, "matrix_size": st.st_size,
              "matrix_mtime_ns": st.st_mtime_ns, "edited_edge_list": edges is not None}
    return ActivationData(m, n_layer, d_mlp, packed, edges, source, expected, f"{freq_path} disagrees with {matrix_path}")


def canonical_edge_list(edges: np.ndarray, n: int, where) -> np.ndarray:
    """Undirected, de-duplicated edges as (u, v) with u < v, sorted; a networkx.Graph would collapse the same."""
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise PipelineError(f"{where} names neurons outside 0..{n - 1}; an edge list of another model?")
    if np.any(edges[:, 0] == edges[:, 1]):
        raise PipelineError(f"{where} has self-loops (a neuron connected to itself)")
    e = np.sort(edges, axis=1)
    return np.unique(e, axis=0).reshape(-1, 2)


def edge_list_counts(data: ActivationData, edges: np.ndarray) -> np.ndarray:
    """Exact counts of an arbitrary edge list: one matrix product per layer pair that it touches."""
    out = np.zeros(len(edges), dtype=count_dtype(data.num_samples))
    lu, lv = edges[:, 0] // data.d_mlp, edges[:, 1] // data.d_mlp
    key = lu * data.n_layer + lv
    for k in np.unique(key):  # one iteration per layer pair, not per edge
        sel = np.flatnonzero(key == k)
        c = pair_counts(data.layer(int(k // data.n_layer)), data.layer(int(k % data.n_layer)))
        out[sel] = c[edges[sel, 0] % data.d_mlp, edges[sel, 1] % data.d_mlp]
    return out


# --- graph representation -------------------------------------------------------------------------------
class DenseBlock:
    """All edges between two contiguous node ranges; counts is a rows x cols matrix (possibly memory-mapped)."""

    def __init__(self, rows: slice, cols: slice, counts):
        self.rows, self.cols, self._counts = rows, cols, counts

    def counts(self) -> np.ndarray:
        c = self._counts
        return np.load(c, mmap_mode="r", allow_pickle=False) if isinstance(c, (str, Path)) else c

    @property
    def num_edges(self):
        return (self.rows.stop - self.rows.start) * (self.cols.stop - self.cols.start)

    def ends(self, x: np.ndarray):
        """A per-node array at both ends of every edge, shaped to broadcast against counts()."""
        return x[self.rows][:, None], x[self.cols][None, :]

    def csr(self, mask: np.ndarray, data: np.ndarray) -> sp.csr_matrix:
        """The edges where mask holds, as a rows x cols CSR matrix of data (both shaped like counts())."""
        flat = np.flatnonzero(mask)
        ncol = mask.shape[1]
        indptr = np.zeros(mask.shape[0] + 1, dtype=np.int64)
        np.cumsum(mask.sum(axis=1), out=indptr[1:])
        return sp.csr_matrix((np.asarray(data).ravel()[flat], (flat % ncol).astype(np.int32), indptr),
                             shape=mask.shape)

    def degree_into(self, deg: np.ndarray, mask: np.ndarray, data: np.ndarray | None = None):
        """Add to each node its number of edges where mask holds (or, given data, the sum of their data)."""
        w = mask if data is None else np.where(mask, data, 0)
        deg[self.rows] += w.sum(axis=1, dtype=deg.dtype)
        deg[self.cols] += w.sum(axis=0, dtype=deg.dtype)

    def bincount(self) -> np.ndarray:
        return np.bincount(np.asarray(self.counts()).ravel())

    def max(self) -> int:
        c = self.counts()
        return int(c.max()) if c.size else 0


class EdgeBlock:
    """An explicit edge list over node indices (a user-edited .el, or a graph read from .gpickle)."""

    def __init__(self, n_nodes: int, src: np.ndarray, tgt: np.ndarray, counts: np.ndarray):
        self.rows = self.cols = slice(0, n_nodes)
        self.src, self.tgt, self.c = src, tgt, counts

    @property
    def num_edges(self):
        return len(self.c)

    def counts(self) -> np.ndarray:
        return self.c

    def ends(self, x: np.ndarray):
        return x[self.src], x[self.tgt]

    def csr(self, mask: np.ndarray, data: np.ndarray) -> sp.csr_matrix:
        n = self.rows.stop
        return sp.csr_matrix((data[mask], (self.src[mask], self.tgt[mask])), shape=(n, n))

    def degree_into(self, deg: np.ndarray, mask: np.ndarray, data: np.ndarray | None = None):
        w = None if data is None else data[mask].astype(np.float64)
        n = len(deg)
        deg += np.bincount(self.src[mask], weights=w, minlength=n).astype(deg.dtype)
        deg += np.bincount(self.tgt[mask], weights=w, minlength=n).astype(deg.dtype)

    def bincount(self) -> np.ndarray:
        return np.bincount(self.c)

    def max(self) -> int:
        return int(self.c.max()) if self.c.size else 0


@dataclass
class CoactivationGraph:
    model: str | None
    node_ids: np.ndarray  # int64, sorted; every per-node array is indexed by position in node_ids
    activation_count: np.ndarray  # int64
    layer: np.ndarray
    dimension: np.ndarray
    blocks: list
    num_samples: int | None = None
    max_activation: int | None = None
    max_co_activation: int | None = None
    source: str = ""
    header: dict = field(default_factory=dict)
    causal: CausalEdges | None = None  # the direct-effect weights, where stage b measured them
    _weights: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.max_activation is None:
            self.max_activation = int(self.activation_count.max()) if self.activation_count.size else 0
        if self.max_co_activation is None:
            self.max_co_activation = max((b.max() for b in self.blocks), default=0)

    @property
    def num_nodes(self):
        return len(self.node_ids)

    @property
    def num_edges(self):
        return sum(b.num_edges for b in self.blocks)

    def weight(self, name: str = DEFAULT_WEIGHT) -> "EdgeWeight":
        """The graph's edge weight `name`, built once (for all but count that costs one pass over the blocks)."""
        if name not in self._weights:
            self._weights[name] = EdgeWeight(self, name)
        return self._weights[name]

    def cut(self, threshold: float, weight: str = DEFAULT_WEIGHT) -> "Cut":
        return Cut(self.weight(weight), threshold)

    def degrees(self, cut: "Cut", weighted: bool = False) -> np.ndarray:
        """Every node's number of kept edges, or with weighted the sum of their data (Cut.keep): int64 sums of
        counts for the count weight, float64 sums of normalised weights for the others."""
        exact = not weighted or cut.weight.name == DEFAULT_WEIGHT
        deg = np.zeros(self.num_nodes, dtype=np.int64 if exact else np.float64)
        for b in self.blocks:
            mask, data = cut.keep(b)
            b.degree_into(deg, mask, data if weighted else None)
        return deg

    def normalized_activation(self) -> np.ndarray:
        m = self.max_activation
        return self.activation_count / m if m else np.zeros(self.num_nodes)

    def kept_edges(self, weight: str, threshold: float, memory_limit: int | None, what: str, alternative: str,
                   per_node: int = NX_BYTES_PER_NODE, per_edge: int = NX_BYTES_PER_EDGE) -> dict:
        """
        The edges `weight` keeps at `threshold` (Cut) as arrays: their ends u, v (node positions), co_activation_count
        and its normalised value, and for a weight other than count {weight} and {weight}_normalized; refused before
        anything is built when `what` (a graph object of per_node and per_edge bytes) would not fit in memory.
        """
        check_weight(weight)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) or not (
                0 <= threshold <= 1):
            raise PipelineError(f"the threshold is a number in [0, 1] (a share of the largest weight), got "
                                f"{threshold!r}")
        cut = self.cut(float(threshold), weight)
        check_nx_fits(self.num_nodes, int(self.degrees(cut).sum() // 2), memory_limit,
                      f"{what} (t={float(threshold)})", alternative, per_node, per_edge)
        parts = []
        for b in self.blocks:
            mask, s = cut.keep(b)
            m = b.csr(mask, b.counts()).tocoo()
            c = m.data.astype(np.int64)
            part = {"u": np.arange(b.rows.start, b.rows.stop)[m.row], "v": np.arange(b.cols.start, b.cols.stop)[m.col],
                    "co_activation_count": c, "co_activation_count_normalized": c / self.max_co_activation}
            if weight != DEFAULT_WEIGHT:  # scores are the normalised weights; the same mask orders both alike
                part[weight] = b.csr(mask, cut.weight.raw(b)).data
                part[f"{weight}_normalized"] = b.csr(mask, s).data
            parts.append(part)
        keys = ["u", "v", "co_activation_count", "co_activation_count_normalized"] + (
            [weight, f"{weight}_normalized"] if weight != DEFAULT_WEIGHT else [])
        empty = {k: np.zeros(0, np.int64 if k in ("u", "v", "co_activation_count") else np.float64) for k in keys}
        return {k: np.concatenate([p[k] for p in parts]) if parts else empty[k] for k in keys}

    def node_table(self) -> dict:
        """Each node's attributes, in position order: node_id, layer, dimension, activation_count and its normalised
        value."""
        return {"node_id": self.node_ids.astype(np.int64), "layer": np.asarray(self.layer, np.int64),
                "dimension": np.asarray(self.dimension, np.int64),
                "activation_count": np.asarray(self.activation_count, np.int64),
                "activation_count_normalized": self.normalized_activation().astype(np.float64)}

    def to_networkx(self, weight: str = DEFAULT_WEIGHT, threshold: float = 0.0, memory_limit: int | None = None,
                    alternative: str = "raise the threshold"):
        """
        A networkx.Graph of every node, keyed by neuron id (layer, dimension, activation_count,
        activation_count_normalized), and the edges `weight` keeps at `threshold` (kept_edges' attributes), with the
        graph attributes model, threshold and weight. Refused, with the memory it would need, when it would not fit
        (`memory_limit` bytes, default what the machine has available).
        """
        import networkx as nx  # lazy: slow to import, and only the NetworkX exports need it

        edges = self.kept_edges(weight, threshold, memory_limit, "the thresholded graph", alternative)
        g = nx.Graph(model=self.model or "", threshold=float(threshold), weight=weight)
        nodes = self.node_table()
        names = [k for k in nodes if k != "node_id"]
        g.add_nodes_from(zip(nodes["node_id"].tolist(), (dict(zip(names, row)) for row in zip(
            *(nodes[k].tolist() for k in names)))))
        names = [k for k in edges if k not in ("u", "v")]
        g.add_edges_from(zip(self.node_ids[edges["u"]].tolist(), self.node_ids[edges["v"]].tolist(),
                             (dict(zip(names, row)) for row in zip(*(edges[k].tolist() for k in names)))))
        return g

    def to_igraph(self, weight: str = DEFAULT_WEIGHT, threshold: float = 0.0, memory_limit: int | None = None,
                  alternative: str = "raise the threshold"):
        """
        The same graph as to_networkx as an undirected igraph.Graph: vertex i is the node at position i (its
        attribute node_id the neuron id, and layer, dimension, activation_count, activation_count_normalized), the
        edges with kept_edges' attributes; graph attributes model, threshold and weight.
        """
        import igraph as ig  # lazy: only the igraph export needs it

        edges = self.kept_edges(weight, threshold, memory_limit, "the thresholded igraph", alternative,
                                IGRAPH_BYTES_PER_NODE, IGRAPH_BYTES_PER_EDGE)
        g = ig.Graph(n=self.num_nodes, edges=np.column_stack([edges["u"], edges["v"]]).tolist(), directed=False,
                     graph_attrs={"model": self.model or "", "threshold": float(threshold), "weight": weight},
                     vertex_attrs={k: v.tolist() for k, v in self.node_table().items()},
                     edge_attrs={k: v.tolist() for k, v in edges.items() if k not in ("u", "v")})
        return g


def no_causal_hint(graph: "CoactivationGraph") -> str:
    """What to do about a graph without the direct-effect weights."""
    if str(graph.source).endswith(".gpickle"):
        return "a .gpickle keeps the co-activation counts only: give the graph store instead"
    return "run stage b with --direct_edges"


# --- edge weights ----------------------------------------------------------------------------------------------


def check_weight(name: str):
    if name not in WEIGHTS:
        raise PipelineError(f"unknown --weight {name!r}; choose one of {', '.join(WEIGHTS)}")


def edge_weight(name: str, c, nu, nv, n: int | None = None) -> np.ndarray:
    """
    The weight of edges (u, v) with co-activation count c whose ends fire in nu and nv of n samples, float64
    (arrays broadcast: a dense block's c with its row and column node counts, or per-edge vectors):
      count    c
      jaccard  c / (nu + nv - c); 0 when neither fires
      phi      (n c - nu nv) / sqrt(nu (n - nu) nv (n - nv)), the correlation of the two 0/1 columns; 0 when
               either column is constant (never or always fires)
      pmi      log(c n / (nu nv)); -inf when c = 0
    Each product and sum of counts is an exact integer in float64 (below 2**53), so every weight is one
    correctly rounded division (and a sqrt or log) away from the exact value.
    """
    w = np.array(c, dtype=np.float64)  # a copy: updated in place below, at most ~3 blocks alive at once
    if name == "count":
        return w
    if name == "jaccard":
        union = nu + nv - w
        empty = union <= 0
        np.divide(w, union, out=w, where=~empty)
        w[empty] = 0.0
        return w
    if name == "phi":
        w *= n
        w -= nu * nv
        den = (nu * (n - nu)) * (nv * (n - nv))
        np.sqrt(den, out=den)
        constant = den == 0
        np.divide(w, den, out=w, where=~constant)
        w[constant] = 0.0
        return w
    if name == "pmi":
        co = w > 0
        w *= n
        np.divide(w, nu * nv, out=w, where=co)
        np.log(w, out=w, where=co)
        w[~co] = -np.inf
        return w
    check_weight(name)


class EdgeWeight:
    """
    One edge weight of a graph (see edge_weight) and the threshold rule, stated here once: the normalised weight
    is weight / max_weight, the maximum over all edges, when that is > 0 (count and jaccard then lie in [0, 1];
    phi and pmi in (0, 1] where positive, and negative associations stay negative); an edge is kept at a
    threshold t in [0, 1] iff its normalised weight is > t. So an edge whose ends fire together no more often
    than chance (phi, pmi <= 0) or never (count 0) is never kept.

    scores(block) gives each edge's ranking data: for count the exact integer counts (kept iff count >=
    count_cutoff, the same test on exact ratios), for the others the float64 normalised weights;
    data_scale is what that data is divided by to give normalised weights.
    """

    def __init__(self, graph: "CoactivationGraph", name: str):
        check_weight(name)
        self.name, self.num_samples = name, graph.num_samples
        where = graph.source or "the graph"
        if name in NEEDS_NUM_SAMPLES:
            if not self.num_samples:
                raise PipelineError(f"--weight {name} needs the number of samples, which {where} does not record "
                                    f"(stage c's .gpickle keeps it as the graph attribute num_samples)")
            if self.num_samples < graph.max_activation:
                raise PipelineError(f"{where}: a neuron fires in {graph.max_activation} samples of "
                                    f"{self.num_samples}; the counts are inconsistent")
        if name in DIRECT_WEIGHTS:
            if graph.causal is None:
                raise PipelineError(f"--weight {name}: {where} has no direct-effect weights; {no_causal_hint(graph)}")
            self._causal, self._d = graph.causal, int(graph.dimension.max()) + 1
            if any(not isinstance(b, DenseBlock) for b in graph.blocks):
                raise PipelineError(f"--weight {name} needs the full adjacent layers, not an edited edge list")
        self._node = graph.activation_count.astype(np.float64)
        if name == DEFAULT_WEIGHT:
            self.max = int(graph.max_co_activation)
            self.data_scale = max(self.max, 1)
        else:
            self.max = max((float(w.max()) for w in map(self.raw, graph.blocks) if w.size), default=0.0)
            self.data_scale = 1.0
        self._divisor = self.max if self.max > 0 else 1

    def raw(self, block) -> np.ndarray:
        """The block's weights, shaped like its counts (count: the counts themselves, possibly memory-mapped)."""
        if self.name == DEFAULT_WEIGHT:
            return block.counts()
        if self.name in DIRECT_WEIGHTS:
            k = self._causal.pair_index(block.rows.start // self._d, block.cols.start // self._d)
            return np.array(self._causal.matrix(self.name, k), dtype=np.float64)
        nu, nv = block.ends(self._node)
        return edge_weight(self.name, block.counts(), nu, nv, self.num_samples)

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        return raw / self._divisor

    def scores(self, block) -> np.ndarray:
        if self.name == DEFAULT_WEIGHT:
            return block.counts()
        w = self.raw(block)
        w /= self._divisor
        return w

    def kept(self, scores: np.ndarray, threshold: float) -> np.ndarray:
        if self.name == DEFAULT_WEIGHT:
            return scores >= count_cutoff(threshold, self.max)
        return scores > threshold

    def describe(self) -> dict:
        """The weight's record in an analysis or subset sidecar."""
        return {"weight": self.name, "max_weight": json_number(self.max), "weight_rule": WEIGHT_RULE}


def json_number(x):
    """x for a JSON file: None where it is not finite (pmi's max is -inf when no two neurons ever fire together)."""
    return x if np.isfinite(x) else None


@dataclass(frozen=True)
class Cut:
    """The edges a weight keeps at a threshold (EdgeWeight's rule)."""
    weight: EdgeWeight
    threshold: float

    def keep(self, block):
        """(mask of the block's kept edges, the block's scores), both shaped like its counts."""
        s = self.weight.scores(block)
        return self.weight.kept(s, self.threshold), s

    def csr(self, block) -> sp.csr_matrix:
        """The block's kept edges as a CSR matrix of their scores."""
        return block.csr(*self.keep(block))


def count_cutoff(threshold: float, max_count: int) -> int:
    """
    The smallest count c >= 1 whose normalised weight c / max_count (float64) is > threshold: an edge is kept
    at `threshold` iff count >= cutoff. Exact: the same float64 ratio a NetworkX graph would store, compared
    once per possible count instead of once per edge.
    """
    if max_count <= 0:
        return 1
    ratios = np.arange(1, max_count + 1, dtype=np.float64) / np.float64(max_count)
    above = np.flatnonzero(ratios > threshold)
    return int(above[0]) + 1 if above.size else max_count + 1
