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

    def kept_csr(self, cut: int) -> sp.csr_matrix:
        """The edges with count >= cut as a rows x cols CSR matrix of counts."""
        c = self.counts()
        mask = c >= cut
        flat = np.flatnonzero(mask)
        ncol = c.shape[1]
        indptr = np.zeros(c.shape[0] + 1, dtype=np.int64)
        np.cumsum(mask.sum(axis=1), out=indptr[1:])
        return sp.csr_matrix((np.asarray(c).ravel()[flat], (flat % ncol).astype(np.int32), indptr), shape=c.shape)

    def degree_into(self, deg: np.ndarray, cut: int, weighted: bool = False):
        c = self.counts()
        w = np.where(c >= cut, c, 0) if weighted else (c >= cut)
        deg[self.rows] += w.sum(axis=1, dtype=np.int64)
        deg[self.cols] += w.sum(axis=0, dtype=np.int64)

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

    def kept_csr(self, cut: int) -> sp.csr_matrix:
        k = self.c >= cut
        n = self.rows.stop
        return sp.csr_matrix((self.c[k], (self.src[k], self.tgt[k])), shape=(n, n))

    def degree_into(self, deg: np.ndarray, cut: int, weighted: bool = False):
        k = self.c >= cut
        w = self.c[k].astype(np.int64) if weighted else None
        n = len(deg)
        deg += np.bincount(self.src[k], weights=w, minlength=n).astype(np.int64)
        deg += np.bincount(self.tgt[k], weights=w, minlength=n).astype(np.int64)

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

    def cut(self, threshold: float) -> int:
        return count_cutoff(threshold, self.max_co_activation)

    def degrees(self, cut: int, weighted: bool = False) -> np.ndarray:
        """Degree (or sum of counts) of every node over the edges with count >= cut."""
        deg = np.zeros(self.num_nodes, dtype=np.int64)
        for b in self.blocks:
            b.degree_into(deg, cut, weighted)
        return deg

    def normalized_activation(self) -> np.ndarray:
        m = self.max_activation
        return self.activation_count / m if m else np.zeros(self.num_nodes)


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
    p = Path(store)
    hp = p / sf.GRAPH_STORE_HEADER
    if not hp.is_file():
        raise PipelineError(f"{p} is not a graph store (no {sf.GRAPH_STORE_HEADER}); stage c writes it")
    try:
        h = json.loads(hp.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{hp} is not valid JSON: {e}") from None
    if h.get("format") != STORE_FORMAT or h.get("version") != STORE_VERSION:
        raise PipelineError(f"{hp}: not a {STORE_FORMAT} v{STORE_VERSION} header")
    try:
        n, d = int(h["num_neurons"]), int(h["d_mlp"])
        counts = np.load(p / sf.GRAPH_STORE_NODES, allow_pickle=False).astype(np.int64)
        if counts.shape != (n,):
            raise PipelineError(f"{p / sf.GRAPH_STORE_NODES}: expected {n} counts, found {counts.shape}")
        blocks = []
        if h["kind"] == "adjacent_dense":
            for b in h["blocks"]:
                f = p / b["file"]
                arr = np.load(f, mmap_mode="r", allow_pickle=False)  # validates the header, maps no data
                if list(arr.shape) != [d, d] or list(b["shape"]) != [d, d]:
                    raise PipelineError(f"{f}: shape {arr.shape}, expected {d} x {d}")
                i, j = int(b["src_layer"]), int(b["tgt_layer"])
                blocks.append(DenseBlock(slice(i * d, (i + 1) * d), slice(j * d, (j + 1) * d), f))
        elif h["kind"] == "edge_list":
            e = np.load(p / sf.GRAPH_STORE_EDGES, allow_pickle=False)
            c = np.load(p / sf.GRAPH_STORE_EDGE_COUNTS, allow_pickle=False)
            if e.ndim != 2 or e.shape[1:] != (2,) or len(c) != len(e):
                raise PipelineError(f"{p}: edges and edge counts do not match")
            blocks.append(EdgeBlock(n, e[:, 0], e[:, 1], c))
        else:
            raise PipelineError(f"{hp}: unknown kind {h['kind']!r}")
    except PipelineError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"graph store {p} is damaged: {type(e).__name__}: {e}") from None
    ids = np.arange(n, dtype=np.int64)
    return CoactivationGraph(h.get("model"), ids, counts, ids // d, ids % d, blocks, int(h["num_samples"]),
                             int(h["max_activation_count"]), int(h["max_co_activation_count"]), str(p), h)


def load_gpickle(p: Path):
    # pickle.load runs code from the file: acceptable only because the user explicitly chose the .gpickle
    # format (the original pipeline's); nothing the pipeline writes by default needs it.
    try:
        with open(p, "rb") as f:
            g = pickle.load(f)
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
    p = Path(path)
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
def analyzed_name(graph_path) -> str:
    p = Path(graph_path)
    name = p.name[: -len(".gpickle")] if p.name.endswith(".gpickle") else p.name
    return sf.ANALYZED.format(name=name) + (".gpickle" if p.suffix == ".gpickle" else ".json")


def write_analyzed_reference(graph: CoactivationGraph, target):
    """The analyzed artefact of a store: a reference to it plus the maxima used to normalise; no edge data."""
    target = Path(target)
    store = Path(graph.source).resolve()
    try:
        rel = os.path.relpath(store, target.parent.resolve())
    except ValueError:
        rel = str(store)
    nonzero = graph.header.get("num_nonzero_edges")
    sf.write_json({"format": ANALYZED_FORMAT, "version": STORE_VERSION, "store": rel,
                   "store_absolute": str(store), "store_uid": graph.header.get("uid"), "model": graph.model,
                   "num_nodes": graph.num_nodes, "num_edges": nonzero, "num_edges_with_zero": graph.num_edges,
                   "max_activation_count": graph.max_activation, "max_co_activation_count": graph.max_co_activation,
                   "activation_count_normalized": "activation_count / max_activation_count (float64)",
                   "co_activation_count_normalized": "co_activation_count / max_co_activation_count (float64); "
                                                     "edges with count 0 are dropped"},
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


def analyzed_networkx(g, graph: CoactivationGraph):
    """The original's analyzed graph: zero-count edges removed, exact float64 normalised weights added."""
    import networkx as nx
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


def components(graph: CoactivationGraph, cut: int) -> tuple[int, np.ndarray]:
    """
    Connected components of the graph restricted to edges with count >= cut: (number of kept edges, label of
    every node). Each block is labelled on its own (scipy.sparse.csgraph), then the per-block labels are
    joined by one small graph of <= 2 links per node and block.
    """
    n = graph.num_nodes
    link_src, link_dst, offset, kept = [], [], n, 0
    for b in graph.blocks:
        m = b.kept_csr(cut)
        if m.nnz == 0:
            continue
        kept += m.nnz
        r, c = m.shape
        sq = sp.csr_matrix((m.data, m.indices + r, np.concatenate([m.indptr, np.full(c, m.nnz)])),
                           shape=(r + c, r + c))
        k, lab = connected_components(sq, directed=False)
        del sq, m
        nodes = np.concatenate([np.arange(b.rows.start, b.rows.stop), np.arange(b.cols.start, b.cols.stop)])
        link_src.append(nodes)
        link_dst.append(offset + lab)
        offset += k
    if not link_src:
        return 0, np.arange(n)
    s, t = np.concatenate(link_src), np.concatenate(link_dst)
    joined = sp.csr_matrix((np.ones(len(s), dtype=np.int8), (s, t)), shape=(offset, offset))
    _, lab = connected_components(joined, directed=False)
    return kept, lab[:n]


def threshold_sweep(graph: CoactivationGraph, thresholds=SWEEP_THRESHOLDS) -> pd.DataFrame:
    """For each threshold t: drop edges with normalised weight <= t, keep all nodes, describe components."""
    rows = []
    for t in thresholds:
        kept, lab = components(graph, graph.cut(t))
        sizes = np.bincount(np.unique(lab, return_inverse=True)[1]) if graph.num_nodes else np.zeros(0, int)
        rows.append({"threshold": t, "num_nodes": graph.num_nodes, "num_edges": kept,
                     "num_components": len(sizes), "max_comp_size": int(sizes.max()) if sizes.size else 0,
                     "avg_comp_size": float(sizes.mean()) if sizes.size else 0.0,
                     "min_comp_size": int(sizes.min()) if sizes.size else 0})
    return pd.DataFrame(rows, columns=sf.THRESHOLD_COLUMNS)
