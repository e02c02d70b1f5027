"""
Stage c_analyze's analysis of a co-activation graph: histograms of the counts and the threshold sweep of
connected components.
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from gelutrace.files import layout
from gelutrace.graph.coactivation import DEFAULT_WEIGHT, CoactivationGraph, EdgeWeight

SWEEP_THRESHOLDS = tuple(round(i / 10, 1) for i in range(10))  # 0.0, 0.1 ... 0.9, as exact decimal literals


def histogram(values: np.ndarray | None = None, bins: int = 50, bincount: np.ndarray | None = None) -> pd.DataFrame:
    """np.histogram(values, bins, density=True) as bin_start, bin_end, density; integer values may be given
    as their bincount (value -> how often) instead, which gives the same bins and densities."""
    if bincount is not None:
        nz = np.flatnonzero(bincount)
        if nz.size == 0:
            return pd.DataFrame(columns=layout.HIST_COLUMNS)
        lo, hi = nz[0], nz[-1]
        dens, edges = np.histogram(np.arange(lo, hi + 1), bins=bins, weights=bincount[lo:hi + 1], density=True)
    else:
        if values.size == 0:
            return pd.DataFrame(columns=layout.HIST_COLUMNS)
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
    return pd.DataFrame(rows, columns=layout.THRESHOLD_COLUMNS)
