"""
Modules (gelutrace.selection.communities, c_find_modules.py): the partition against a direct call of igraph's Leiden on the
same thinned graph, Q against networkx's modularity, the thinning against a brute-force sort, the rewiring's
invariants, a planted partition recovered and an Erdős–Rényi graph of the same density found without modules.
"""

import json
import random
import sys

import igraph as ig
import networkx as nx
import numpy as np
import pandas as pd
import pytest

from gelutrace.files import layout
from gelutrace.graph.coactivation import CoactivationGraph, DenseBlock
from gelutrace.selection import communities as md

from conftest import REPO_ROOT, run_python


def layered(weights: list[np.ndarray], d: int) -> CoactivationGraph:
    """A graph of len(weights) + 1 layers of d neurons, block i the (d, d) weights between layers i and i + 1."""
    L = len(weights) + 1
    ids = np.arange(L * d)
    counts = np.asarray(weights).astype(np.int64)
    node = np.maximum(counts.sum(axis=2).max() if counts.size else 0, 1) * np.ones(L * d, np.int64)
    blocks = [DenseBlock(slice(i * d, (i + 1) * d), slice((i + 1) * d, (i + 2) * d), w) for i, w in enumerate(counts)]
    return CoactivationGraph("test", ids, node, ids // d, ids % d, blocks, num_samples=int(counts.max()) + 1)


def planted(d=64, L=4, modules=4, p_in=0.5, p_out=0.02, seed=0):
    """Adjacent layers joined by a stochastic block model drawn with networkx: dims i // (d / modules) form a
    module across every layer."""
    sizes = [d // modules] * modules
    p = np.full((modules, modules), p_out) + np.eye(modules) * (p_in - p_out)
    blocks = []
    for i in range(L - 1):
        g = nx.stochastic_block_model(sizes + sizes, np.block([[p, p], [p, p]]).tolist(), seed=seed + i)
        w = np.zeros((d, d), np.int64)
        for u, v in g.edges():
            if (u < d) != (v < d):  # between the two layers only
                a, b = min(u, v), max(u, v) - d
                w[a, b] = 1 + (a * 7 + b) % 5  # weights 1..5
        blocks.append(w)
    truth = np.tile(np.repeat(np.arange(modules), d // modules), L)
    return layered(blocks, d), truth


def test_partition_equals_igraph_leiden_and_q_equals_networkx():
    g, _ = planted()
    s = md.ModuleSettings(top_edges_per_node=8, seed=5)
    e = md.thin(g, s)
    got = md.leiden(e, None, 5)
    h = ig.Graph(n=e.n_nodes, edges=list(zip(e.src.tolist(), e.tgt.tolist())))
    h.es["weight"] = e.weight.tolist()
    ig.set_random_number_generator(random.Random(5))
    want = h.community_leiden(objective_function="modularity", weights="weight").membership  # igraph's defaults
    ig.set_random_number_generator(random)
    assert got.tolist() == want
    G = nx.Graph()
    G.add_nodes_from(range(e.n_nodes))
    G.add_weighted_edges_from(zip(e.src.tolist(), e.tgt.tolist(), e.weight.tolist()))
    comms = [set(np.flatnonzero(got == k).tolist()) for k in range(got.max() + 1)]
    assert md.modularity(e, got) == pytest.approx(nx.algorithms.community.modularity(G, comms, weight="weight"),
                                                  abs=1e-12)
    cpm = md.leiden(e, 0.5, 5)
    ig.set_random_number_generator(random.Random(5))
    assert cpm.tolist() == h.community_leiden(objective_function="CPM", weights="weight", resolution=0.5).membership
    ig.set_random_number_generator(random)


def brute_force_top(g: CoactivationGraph, K: int, tiebreak: np.ndarray) -> set:
    """Every edge among the K strongest of either end, by sorting each node's edge list."""
    edges = {}
    for b in g.blocks:
        w = b.counts()
        for r in range(w.shape[0]):
            for c in range(w.shape[1]):
                if w[r, c] > 0:
                    edges[(r + b.rows.start, c + b.cols.start)] = float(w[r, c])
    by_node = {}
    for (u, v), x in edges.items():
        by_node.setdefault(u, []).append((-x, tiebreak[v], (u, v)))
        by_node.setdefault(v, []).append((-x, tiebreak[u], (u, v)))
    return {e for lst in by_node.values() for _, _, e in sorted(lst)[:K]}


@pytest.mark.parametrize("K", [1, 3, 10])
def test_thinning_keeps_each_nodes_k_strongest_edges(K):
    rng = np.random.default_rng(K)
    d = 12
    w = [rng.integers(0, 6, (d, d)) for _ in range(3)]  # small integers: plenty of ties
    g = layered(w, d)
    s = md.ModuleSettings(top_edges_per_node=K, seed=3)
    e = md.thin(g, s)
    tiebreak = np.random.default_rng(3).permutation(g.num_nodes)
    assert set(zip(e.src.tolist(), e.tgt.tolist())) == brute_force_top(g, K, tiebreak)
    for u, v, x in zip(e.src, e.tgt, e.weight):
        assert x == w[u // d][u % d, v % d]
    # by threshold: exactly the edges whose count / max count is > t
    t = 0.5
    e = md.thin(g, md.ModuleSettings(threshold=t))
    mx = max(x.max() for x in w)
    want = {(i * d + r, (i + 1) * d + c) for i, x in enumerate(w) for r, c in zip(*np.nonzero(x / mx > t))}
    assert set(zip(e.src.tolist(), e.tgt.tolist())) == want


def test_rewiring_preserves_degrees_and_layer_pairs_and_is_seeded():
    g, _ = planted()
    e = md.thin(g, md.ModuleSettings(top_edges_per_node=8))
    r = md.rewire(e, g.layer, 7)
    n = g.num_nodes
    for a, b in ((e.src, r.src), (e.tgt, r.tgt)):
        assert (np.bincount(a, minlength=n) == np.bincount(b, minlength=n)).all()
    pair = lambda x: list(zip(g.layer[x.src].tolist(), g.layer[x.tgt].tolist()))  # noqa: E731
    assert sorted(pair(e)) == sorted(pair(r))
    assert len(set(zip(r.src.tolist(), r.tgt.tolist()))) == len(r.src)  # no duplicate edge
    assert sorted(r.weight.tolist()) == sorted(e.weight.tolist())
    assert (r.tgt != e.tgt).mean() > 0.5  # it did rewire
    again = md.rewire(e, g.layer, 7)
    assert (again.tgt == r.tgt).all() and not (md.rewire(e, g.layer, 8).tgt == r.tgt).all()


def test_planted_modules_are_found_and_random_graphs_have_none():
    g, truth = planted()
    mods = md.find_modules(g, md.ModuleSettings(top_edges_per_node=16, null_graphs=20, seeds=3))
    assert md.ari(mods.membership, truth) >= 0.95
    rec = md.describe(mods, g)
    assert rec["null"]["structured"] and rec["modularity"] > rec["null"]["mean"] + 5 * rec["null"]["std"]
    assert "no module structure" not in md.verdict(rec)
    # Erdős–Rényi between adjacent layers, the planted graph's density
    d = 64
    density = np.mean([np.asarray(b.counts()) > 0 for b in g.blocks])
    rng = np.random.default_rng(1)
    er = layered([(rng.random((d, d)) < density).astype(np.int64) * rng.integers(1, 6, (d, d)) for _ in range(3)], d)
    rec = md.describe(md.find_modules(er, md.ModuleSettings(top_edges_per_node=16, null_graphs=20, seeds=2)), er)
    assert not rec["null"]["structured"]
    assert md.verdict(rec).startswith("The graph has no module structure")


def test_script_writes_modules_and_refuses_bad_settings(tmp_path, shipped_path):
    from test_corpus_direct import ENV, corpus_run

    out = tmp_path / "c"
    corpus_run(out, "--max_tokens", 1000)
    store = layout.path(out, layout.WEIGHTED_GRAPH, "tinybard")
    cmd = [sys.executable, "c_find_modules.py", "--input_path", str(store), "--weight", "direct_abs",
           "--null_graphs", "3", "--seeds", "2"]
    r = run_python(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    table = pd.read_csv(out / layout.MODULES_DIR / layout.MODULES.format(m="tinybard", weight="direct_abs"))
    assert list(table.columns) == layout.MODULES_COLUMNS and len(table) == 6 * 512
    sizes = table["module"].value_counts().sort_index().to_numpy()
    assert (np.diff(sizes) <= 0).all()  # numbered by decreasing size
    rec = json.loads((out / layout.MODULES_DIR / layout.MODULES_RECORD.format(m="tinybard", weight="direct_abs")).read_text())
    assert rec["num_modules"] == len(sizes) and rec["sizes"] == sizes.tolist() and rec["null"]["graphs"] == 3
    assert "too few" in r.stdout
    for bad in (["--threshold", "2"], ["--weight", "nope"]):  # the script's error line; the other checks below
        r = run_python(cmd + bad, capture_output=True, text=True, cwd=REPO_ROOT, env=ENV)
        assert r.returncode == 2 and "error:" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
    for bad in (dict(top_edges_per_node=0), dict(resolution=-1.0), dict(negative="sign"), dict(null_graphs=-1)):
        with pytest.raises(md.PipelineError):
            md.ModuleSettings(**bad).check()
