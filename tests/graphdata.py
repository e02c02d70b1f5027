"""Synthetic stage-b output directories for the stage c/d tests, written with the package's own writers (gelutrace.files)."""

from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace.files import atomic, formats, layout


def random_activations(n_layer=3, d_mlp=12, n_samples=400, seed=0) -> np.ndarray:
    """Bool samples x neurons: varied firing rates, some neurons never active, some samples empty.
    n_samples > 255 so that an int8 dot product (the original's bug) would wrap."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.05, 0.7, size=n_layer * d_mlp)
    p[rng.choice(p.size, size=max(1, p.size // 8), replace=False)] = 0.0
    a = rng.random((n_samples, p.size)) < p
    a[rng.choice(n_samples, size=n_samples // 10, replace=False)] = False
    return a


def make_dataset(d: Path, active: np.ndarray, n_layer: int, d_mlp: int, m: str = "toy", edges=None) -> Path:
    """A stage-b export dir; `edges` (an (E, 2) array) replaces the canonical .el as a user's edit would."""
    d = Path(d)
    formats.write_graph_files(d, m, n_layer, d_mlp, write_el=True)
    formats.write_activation_matrix(layout.path(d, layout.MATRIX, m), active)
    n = active.shape[1]
    c = active.sum(axis=0)
    ids = np.arange(n)
    atomic.write_csv(pd.DataFrame({"neuron_id": ids, "activation_count": c, "activation_frequency": c / len(active),
                               "layer": ids // d_mlp, "dimension": ids % d_mlp, "mean_activation": 0.0}),
                 layout.path(d, layout.FREQUENCY, m))
    if edges is not None:
        with open(layout.path(d, layout.EDGES, m), "w") as f:
            f.writelines(f"{u} {v}\n" for u, v in edges)
    return d


def brute_force_graph(active: np.ndarray, edges):
    """Reference networkx graph: one explicit per-edge count, Python ints, no matrix algebra."""
    import networkx as nx
    g = nx.Graph()
    d = [[int(x) for x in np.flatnonzero(row)] for row in active]
    sets = [set(r) for r in d]
    n = active.shape[1]
    for u in range(n):
        g.add_node(u, activation_count=sum(1 for s in sets if u in s))
    for u, v in edges:
        g.add_edge(int(u), int(v), co_activation_count=sum(1 for s in sets if u in s and v in s))
    return g


def full_edges(n_layer: int, d_mlp: int):
    return [(i * d_mlp + a, (i + 1) * d_mlp + b) for i in range(n_layer - 1) for a in range(d_mlp)
            for b in range(d_mlp)]
