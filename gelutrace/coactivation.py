"""
Stages c and c_analyze: exact co-activation counts, the compact graph store, normalisation, histograms and
the threshold sweep.

The co-activation count of an edge (u, v) is the number of samples in which both neurons are active. For a
pair of layers it is one matrix product, A_u^T @ A_v over the samples x neurons 0/1 matrix: every entry is
an integer <= n_samples, so float32 BLAS is exact while n_samples < 2**24 (float64 beyond, exact to 2**53).

Compact graph store (a directory; every file loads with np.load(..., allow_pickle=False), the count
matrices with mmap_mode='r' so one layer pair at a time is in memory):
    graph.json                  header: format, version, uid, model, n_layer, d_mlp, num_neurons,
                                num_samples, kind, num_edges, num_nonzero_edges, max_activation_count,
                                max_co_activation_count, count_dtype, blocks (one record per file below)
    node_activation_count.npy   int64, one per neuron in id order (node id = layer * d_mlp + dimension)
    pair_{i:03d}_{i+1:03d}.npy  kind "adjacent_dense": counts of every edge between layer i and i+1, a
                                d_mlp x d_mlp matrix, row = dimension in layer i, column = dimension in i+1
    edges.npy, edge_counts.npy  kind "edge_list" (a user-edited .el): (E, 2) int64 edges (u < v), counts
Counts are uint16 while n_samples <= 65535, else uint32/uint64.

A graph is handled as `CoactivationGraph`: node arrays plus "blocks" (a dense layer-pair matrix or an
explicit edge list) that are read one at a time, so nothing ever holds all 10^8-10^9 edges as objects.
An `EdgeWeight` (count, jaccard, phi, pmi) turns a block's counts into edge weights, and a `Cut` (a weight and
a threshold) into the block's kept edges; every degree, sweep, ranking and export goes through them.
"""

import json
import os
import pickle
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from gelutrace import PipelineError
from gelutrace import stagefiles as sf

STORE_FORMAT = "gelutrace-coactivation-graph"
ANALYZED_FORMAT = "gelutrace-analyzed-graph"
STORE_VERSION = 1
SWEEP_THRESHOLDS = tuple(round(i / 10, 1) for i in range(10))  # 0.0, 0.1 ... 0.9, as exact decimal literals
# A networkx.Graph costs roughly this much RAM per edge (two adjacency entries, an attribute dict, ints) and
# per node while being built and pickled; measured ~300 B/edge for building alone, the pickle memo adds more.
NX_BYTES_PER_EDGE = 600
NX_BYTES_PER_NODE = 1500
# edge weights (EdgeWeight); count is the original's
WEIGHTS = ("count", "jaccard", "phi", "pmi")
DEFAULT_WEIGHT = sf.DEFAULT_WEIGHT
NEEDS_NUM_SAMPLES = ("phi", "pmi")
WEIGHT_RULE = ("normalised weight = weight / max_weight (max over all edges) when max_weight > 0; an edge is kept "
               "at threshold t in [0, 1] iff its normalised weight > t, so only edges with a positive weight "
               "(and a count > 0) are ever kept")


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
    m = sf.model_prefix(d)
    meta = sf.read_graph_meta(d, m)
    try:
        n_layer, d_mlp = int(meta["n_layer"]), int(meta["d_mlp"])
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{sf.path(d, sf.GRAPH_META, m)} lacks n_layer/d_mlp") from None
    if meta.get("model") not in (None, m):
        raise PipelineError(f"{sf.path(d, sf.GRAPH_META, m)} describes model {meta['model']!r}, "
                            f"but the files are named for {m!r}")
    n = n_layer * d_mlp
    matrix_path = sf.path(d, sf.MATRIX, m)
    packed, n_cols, ids = sf.read_packed_activation_matrix(matrix_path)
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
    freq_path = sf.path(d, sf.FREQUENCY, m)
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
    if not sf.edges_are_canonical(d, m, meta):
        edges = canonical_edge_list(sf.read_edges(d, m), n, sf.path(d, sf.EDGES, m))
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


# --- stage c: build --------------------------------------------------------------------------------------
def nx_memory_estimate(num_nodes: int, num_edges: int) -> int:
    return num_nodes * NX_BYTES_PER_NODE + num_edges * NX_BYTES_PER_EDGE


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_nx_fits(num_nodes: int, num_edges: int, limit_bytes: int | None, what: str, alternative: str):
    """Refuse, before any heavy work, a NetworkX object that would not fit in memory."""
    need = nx_memory_estimate(num_nodes, num_edges)
    have = available_memory() if limit_bytes is None else limit_bytes
    if need > have:
        raise PipelineError(f"{what} of {num_nodes:,} nodes and {num_edges:,} edges needs about "
                            f"{need / 2**30:.1f} GiB of RAM but {have / 2**30:.1f} GiB is available; "
                            f"{alternative}")


def write_store(target, data: ActivationData, progress=None) -> dict:
    """
    Count and write the compact store of stage b's data. Full adjacent layers stream over blocks of rows of the
    packed matrix, one layer pair at a time (progress: one step per pass); an edited edge list unpacks it.
    """
    if data.edges is None:
        from gelutrace.statistics import PackedMatrixCounts  # imports torch: only the scripts that count need it

        counts = PackedMatrixCounts(data.packed, data.n_layer, data.d_mlp, progress=progress)
        node_counts = counts.node_counts()
        data.check_node_counts(node_counts)
        return write_count_store(target, data.model, data.n_layer, data.d_mlp, data.num_samples, node_counts,
                                 data.source, pair_counts=counts.pair_counts)
    node_counts = data.active.sum(axis=0, dtype=np.int64)
    data.check_node_counts(node_counts)
    return write_count_store(target, data.model, data.n_layer, data.d_mlp, data.num_samples, node_counts,
                             data.source, edges=data.edges, edge_counts=edge_list_counts(data, data.edges))


def write_count_store(target, model: str, n_layer: int, d_mlp: int, num_samples: int, node_counts: np.ndarray,
                      source: dict, pair_counts=None, edges: np.ndarray | None = None,
                      edge_counts: np.ndarray | None = None) -> dict:
    """
    The compact store directory, written atomically, from exact counts: either `pair_counts(i)`, the
    d_mlp x d_mlp counts between layers i and i+1 (kind adjacent_dense), or `edges` with their `edge_counts`
    (kind edge_list). Counts are stored in count_dtype(num_samples). Returns the header.
    """
    dt = count_dtype(num_samples)
    node_counts = np.asarray(node_counts, dtype=np.int64)
    blocks, max_c, nonzero = [], 0, 0
    with sf.atomic_dir(target) as tmp:
        np.save(tmp / sf.GRAPH_STORE_NODES, node_counts, allow_pickle=False)
        if edges is None:
            kind, num_edges = "adjacent_dense", (n_layer - 1) * d_mlp ** 2
            for i in range(n_layer - 1):
                c = np.asarray(pair_counts(i)).astype(dt)
                name = sf.GRAPH_STORE_PAIR.format(src=i, tgt=i + 1)
                np.save(tmp / name, c, allow_pickle=False)
                max_c, nonzero = max(max_c, int(c.max())), nonzero + int(np.count_nonzero(c))
                blocks.append({"file": name, "src_layer": i, "tgt_layer": i + 1, "shape": list(c.shape)})
                del c
        else:
            kind, num_edges = "edge_list", len(edges)
            counts = np.asarray(edge_counts).astype(dt)
            np.save(tmp / sf.GRAPH_STORE_EDGES, edges.astype(np.int64), allow_pickle=False)
            np.save(tmp / sf.GRAPH_STORE_EDGE_COUNTS, counts, allow_pickle=False)
            max_c = int(counts.max()) if counts.size else 0
            nonzero = int(np.count_nonzero(counts))
            blocks.append({"file": sf.GRAPH_STORE_EDGES, "counts_file": sf.GRAPH_STORE_EDGE_COUNTS,
                           "num_edges": num_edges})
        header = {"format": STORE_FORMAT, "version": STORE_VERSION, "uid": uuid.uuid4().hex, "model": model,
                  "n_layer": n_layer, "d_mlp": d_mlp, "num_neurons": n_layer * d_mlp,
                  "num_samples": num_samples, "kind": kind, "num_edges": num_edges, "num_nonzero_edges": nonzero,
                  "max_activation_count": int(node_counts.max()), "max_co_activation_count": max_c,
                  "count_dtype": np.dtype(dt).name, "blocks": blocks, "source": source}
        (tmp / sf.GRAPH_STORE_HEADER).write_text(json.dumps(header, indent=2) + "\n")
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
        from gelutrace.statistics import PackedMatrixCounts

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
    return _graph(g0.model, len(g0.blocks) + 1, d, samples, sum(g.activation_count for g in graphs), blocks)


def build_networkx(data: ActivationData, progress=None):
    """The original's graph object: all nodes (layer, dimension, activation_count), every base edge."""
    import networkx as nx
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
    with sf.atomic_open(target, "wb") as f:
        pickle.dump(g, f, protocol=pickle.HIGHEST_PROTOCOL)


# --- reading a graph in any form -------------------------------------------------------------------------
def is_store(p: Path) -> bool:
    return p.is_dir() and (p / sf.GRAPH_STORE_HEADER).is_file()


def read_store(store) -> CoactivationGraph:
    """
    A compact store, its header checked against its arrays: types and shapes, the block list, the count dtype
    (unsigned, the one num_samples calls for), every count within 0..num_samples, and both maxima equal to the
    arrays' (one pass over the counts). A mismatch is a damaged store, never a silently wrong graph. A store of
    no samples (a shard that was given no window) holds only zeros.
    """
    p = Path(store)
    hp = p / sf.GRAPH_STORE_HEADER
    if not hp.is_file():
        raise PipelineError(f"{p} is not a graph store (no {sf.GRAPH_STORE_HEADER}); stage c writes it")
    try:
        h = json.loads(hp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{hp} is not valid JSON: {e}") from None
    if not isinstance(h, dict) or h.get("format") != STORE_FORMAT or h.get("version") != STORE_VERSION:
        raise PipelineError(f"{hp}: not a {STORE_FORMAT} v{STORE_VERSION} header")

    def damaged(why):
        return PipelineError(f"graph store {p} is damaged: {why}; rerun stage c")

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

        counts = np.load(p / sf.GRAPH_STORE_NODES, allow_pickle=False)
        if counts.shape != (n,) or counts.dtype != np.int64:
            raise damaged(f"{sf.GRAPH_STORE_NODES} holds {counts.dtype} {counts.shape}, expected int64 ({n},)")
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
                if b.get("file") != sf.GRAPH_STORE_PAIR.format(src=i, tgt=j) or b.get("shape") != [d, d]:
                    raise damaged(f"block record {b}")
                arr = counts_file(p / b["file"], (d, d))
                seen_max = max(seen_max, int(arr.max()) if arr.size else 0)
                blocks.append(DenseBlock(slice(i * d, (i + 1) * d), slice(j * d, (j + 1) * d), p / b["file"]))
        elif h.get("kind") == "edge_list":
            e = np.load(p / sf.GRAPH_STORE_EDGES, allow_pickle=False)
            c = np.asarray(counts_file(p / sf.GRAPH_STORE_EDGE_COUNTS))
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
    return CoactivationGraph(h.get("model"), ids, counts, ids // d, ids % d, blocks, samples, max_a, max_c, str(p), h)


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
    p = sf.recover_dir(path)
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
    return sf.weighted_name(sf.ANALYZED.format(name=name) + (".gpickle" if p.suffix == ".gpickle" else ".json"),
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
    sf.write_json({"format": ANALYZED_FORMAT, "version": STORE_VERSION, "store": rel,
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
    import networkx as nx
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


def histogram(values: np.ndarray | None = None, bins: int = 50, bincount: np.ndarray | None = None) -> pd.DataFrame:
    """np.histogram(values, bins, density=True) as bin_start, bin_end, density; integer values may be given
    as their bincount (value -> how often) instead, which gives the same bins and densities."""
    if bincount is not None:
        nz = np.flatnonzero(bincount)
        if nz.size == 0:
            return pd.DataFrame(columns=sf.HIST_COLUMNS)
        lo, hi = nz[0], nz[-1]
        dens, edges = np.histogram(np.arange(lo, hi + 1), bins=bins, weights=bincount[lo:hi + 1], density=True)
    else:
        if values.size == 0:
            return pd.DataFrame(columns=sf.HIST_COLUMNS)
        dens, edges = np.histogram(values, bins=bins, density=True)
    return pd.DataFrame({"bin_start": edges[:-1], "bin_end": edges[1:], "density": dens})


def edge_count_bincount(graph: CoactivationGraph) -> np.ndarray:
    """How many edges have each count, over all edges, with the count-0 edges removed."""
    total = np.zeros(graph.max_co_activation + 1, dtype=np.int64)
    for b in graph.blocks:
        bc = b.bincount()
        total[: len(bc)] += bc
    total[0] = 0
    return total


@dataclass
class _Joined:
    """One threshold's per-block component labels, to be joined into the graph's components."""
    offset: int
    kept: int = 0
    src: list = field(default_factory=list)
    dst: list = field(default_factory=list)


def components(graph: CoactivationGraph, weight: EdgeWeight, thresholds) -> list[tuple[int, np.ndarray]]:
    """
    For each threshold, the connected components of the graph restricted to the edges `weight` keeps there:
    (number of kept edges, label of every node). Each block's weights are computed once for all thresholds;
    each block is labelled on its own (scipy.sparse.csgraph), then the per-block labels are joined by one
    small graph of <= 2 links per node and block.
    """
    n = graph.num_nodes
    state = [_Joined(n) for _ in thresholds]
    for b in graph.blocks:
        scores = weight.scores(b)
        nodes = np.concatenate([np.arange(b.rows.start, b.rows.stop), np.arange(b.cols.start, b.cols.stop)])
        for t, j in zip(thresholds, state):
            m = b.csr(weight.kept(scores, t), scores)
            if m.nnz == 0:
                continue
            j.kept += m.nnz
            r, c = m.shape
            sq = sp.csr_matrix((m.data, m.indices + r, np.concatenate([m.indptr, np.full(c, m.nnz)])),
                               shape=(r + c, r + c))
            k, lab = connected_components(sq, directed=False)
            del sq, m
            j.src.append(nodes)
            j.dst.append(j.offset + lab)
            j.offset += k
        del scores
    out = []
    for j in state:
        if not j.src:
            out.append((0, np.arange(n)))
            continue
        s, t = np.concatenate(j.src), np.concatenate(j.dst)
        joined = sp.csr_matrix((np.ones(len(s), dtype=np.int8), (s, t)), shape=(j.offset, j.offset))
        _, lab = connected_components(joined, directed=False)
        out.append((j.kept, lab[:n]))
    return out


def threshold_sweep(graph: CoactivationGraph, thresholds=SWEEP_THRESHOLDS,
                    weight: str = DEFAULT_WEIGHT) -> pd.DataFrame:
    """For each threshold t: drop edges that `weight` does not keep at t (normalised weight <= t), keep all
    nodes, describe components."""
    rows = []
    for t, (kept, lab) in zip(thresholds, components(graph, graph.weight(weight), thresholds)):
        sizes = np.bincount(np.unique(lab, return_inverse=True)[1]) if graph.num_nodes else np.zeros(0, int)
        rows.append({"threshold": t, "num_nodes": graph.num_nodes, "num_edges": kept,
                     "num_components": len(sizes), "max_comp_size": int(sizes.max()) if sizes.size else 0,
                     "avg_comp_size": float(sizes.mean()) if sizes.size else 0.0,
                     "min_comp_size": int(sizes.min()) if sizes.size else 0})
    return pd.DataFrame(rows, columns=sf.THRESHOLD_COLUMNS)
