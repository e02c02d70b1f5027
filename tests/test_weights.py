"""Edge weights (count, jaccard, phi, pmi): the formulas against a per-pair Python loop, the normalisation and
threshold rule on a hand-checked graph, and the sweep and stage d's rankings against NetworkX graphs built from
the brute-force weights."""

import math

import networkx as nx
import numpy as np
import pytest

from gelutrace import PipelineError
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.selection import analysis as ga
from gelutrace.selection import methods as sel

from conftest import assert_top_k
from graphdata import full_edges, make_dataset, random_activations

N_LAYER, D_MLP = 3, 10
OTHER = ("jaccard", "phi", "pmi")


def brute_weight(name, a, i, j):
    """One pair of 0/1 columns, Python ints and the math module only."""
    col_i, col_j = [bool(x) for x in a[:, i]], [bool(x) for x in a[:, j]]
    n = len(col_i)
    c = sum(1 for x, y in zip(col_i, col_j) if x and y)
    nu, nv = sum(col_i), sum(col_j)
    if name == "count":
        return float(c)
    if name == "jaccard":
        return c / (nu + nv - c) if nu + nv - c else 0.0
    if name == "phi":
        var = nu * (n - nu) * nv * (n - nv)
        return (n * c - nu * nv) / math.sqrt(var) if var else 0.0
    return math.log(c * n / (nu * nv)) if c else -math.inf


def with_constant_columns(a, always=(3, 14, 25), never=(4, 15, 26)):
    a = a.copy()
    a[:, list(always)] = True
    a[:, list(never)] = False
    return a


@pytest.mark.parametrize("name", gr.COACTIVATION_WEIGHTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_edge_weight_equals_a_loop_over_every_pair_of_columns(name, seed):
    rng = np.random.default_rng(seed)
    a = rng.random((40, 9)) < rng.uniform(0.1, 0.9, size=9)
    a[:, 0], a[:, 1], a[:, 2] = True, False, False  # always fires; never fires (twice: jaccard's 0/0)
    a[:, 8] = a[:, 7]  # identical columns: jaccard 1, phi 1
    n = a.sum(axis=0).astype(np.float64)
    c = a.astype(np.int64).T @ a.astype(np.int64)
    got = gr.edge_weight(name, c.astype(np.uint16), n[:, None], n[None, :], len(a))
    want = np.array([[brute_weight(name, a, i, j) for j in range(9)] for i in range(9)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    # the 1-D (edge list) form gives the very same floats
    iu, ju = np.triu_indices(9, 1)
    np.testing.assert_array_equal(gr.edge_weight(name, c[iu, ju], n[iu], n[ju], len(a)), got[iu, ju])
    if name == "phi":  # and phi is the Pearson correlation of the columns that vary
        v = slice(3, 9)
        np.testing.assert_allclose(got[v, v], np.corrcoef(a[:, v].T.astype(float)), rtol=1e-12, atol=1e-15)
        assert np.all(got[0] == 0) and np.all(got[1] == 0)
    if name == "jaccard":
        assert got[1, 2] == 0.0 and got[7, 8] == 1.0


# --- a hand-checked graph ----------------------------------------------------------------------------------
# layer 0: A, B, E (E always fires); layer 1: C, D, F (F never fires); ids A0 B1 E2 C3 D4 F5; 4 samples
HAND = np.array([[1, 1, 1, 1, 0, 0],
                 [1, 0, 1, 1, 0, 0],
                 [0, 1, 1, 0, 1, 0],
                 [0, 0, 1, 0, 1, 0]], dtype=bool)
A, B, E, C, D, F = range(6)
# by hand: counts n_A = n_B = n_C = n_D = 2, n_E = 4, n_F = 0; c(AC) = 2, c(BC) = c(BD) = 1, c(EC) = c(ED) = 2
HAND_WEIGHTS = {
    "count": {(A, C): 2, (A, D): 0, (A, F): 0, (B, C): 1, (B, D): 1, (B, F): 0, (E, C): 2, (E, D): 2, (E, F): 0},
    "jaccard": {(A, C): 1, (A, D): 0, (A, F): 0, (B, C): 1 / 3, (B, D): 1 / 3, (B, F): 0, (E, C): 0.5,
                (E, D): 0.5, (E, F): 0},
    "phi": {(A, C): 1, (A, D): -1, (A, F): 0, (B, C): 0, (B, D): 0, (B, F): 0, (E, C): 0, (E, D): 0, (E, F): 0},
    "pmi": {(A, C): math.log(2), (A, D): -math.inf, (A, F): -math.inf, (B, C): 0, (B, D): 0, (B, F): -math.inf,
            (E, C): 0, (E, D): 0, (E, F): -math.inf},
}
# kept edges (normalised weight > t): the max normalises (count 2, jaccard 1, phi 1, pmi log 2); the always-
# firing E keeps its edges under count and jaccard, none under phi or pmi; phi's A-D stays at -1, never kept
HAND_KEPT = {
    ("count", 0.0): {(A, C), (B, C), (B, D), (E, C), (E, D)},
    ("count", 0.5): {(A, C), (E, C), (E, D)},
    ("jaccard", 0.3): {(A, C), (B, C), (B, D), (E, C), (E, D)},
    ("jaccard", 0.4): {(A, C), (E, C), (E, D)},
    ("jaccard", 0.5): {(A, C)},
    ("phi", 0.0): {(A, C)},
    ("pmi", 0.0): {(A, C)},
    ("pmi", 0.99): {(A, C)},
    ("pmi", 1.0): set(),
}


@pytest.fixture(scope="module")
def hand_graph(tmp_path_factory):
    d = tmp_path_factory.mktemp("hand")
    make_dataset(d, HAND, 2, 3)
    gs.write_store(d / "store", gr.load_activation_data(d))
    return gs.read_graph(d / "store")


@pytest.mark.parametrize("name", gr.COACTIVATION_WEIGHTS)
def test_hand_checked_weights_and_maxima(hand_graph, name):
    w = hand_graph.weight(name)
    (block,) = hand_graph.blocks
    raw = w.raw(block)
    for (u, v), x in HAND_WEIGHTS[name].items():
        assert raw[u, v - 3] == pytest.approx(x, rel=1e-15, abs=0), (u, v)
    assert w.max == pytest.approx({"count": 2, "jaccard": 1, "phi": 1, "pmi": math.log(2)}[name], rel=1e-15)
    assert w.normalise(np.asarray(raw, dtype=float))[A, D - 3] == {"count": 0, "jaccard": 0, "phi": -1,
                                                                    "pmi": -math.inf}[name]


@pytest.mark.parametrize("name,t", list(HAND_KEPT))
def test_hand_checked_threshold_rule(hand_graph, name, t):
    cut = hand_graph.cut(t, name)
    (block,) = hand_graph.blocks
    mask, _ = cut.keep(block)
    assert {(int(u), int(v) + 3) for u, v in zip(*np.nonzero(mask))} == HAND_KEPT[name, t]
    deg = hand_graph.degrees(cut)
    assert deg.tolist() == [sum(x in e for e in HAND_KEPT[name, t]) for x in range(6)]
    row = ga.threshold_sweep(hand_graph, [t], name).iloc[0]
    assert row.num_edges == len(HAND_KEPT[name, t])


# --- random graphs against NetworkX ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    active = with_constant_columns(random_activations(N_LAYER, D_MLP, 300, seed=21))
    active[:, 7] = active[:, 8]  # tied neurons
    make_dataset(d, active, N_LAYER, D_MLP)
    data = gr.load_activation_data(d)
    gs.write_store(d / "store", data)
    gs.write_gpickle(gs.build_networkx(data), d / "toy_weighted_graph.gpickle")
    return gs.read_graph(d / "store"), gs.read_graph(d / "toy_weighted_graph.gpickle"), active


def reference_graph(active, name, t):
    """All nodes (in id order), the edges with brute-force weight / max > t, attribute w = weight / max."""
    edges = full_edges(N_LAYER, D_MLP)
    raw = {(u, v): brute_weight(name, active, u, v) for u, v in edges}
    mx = max(raw.values())
    g = nx.Graph()
    g.add_nodes_from(range(active.shape[1]))
    g.add_edges_from((u, v, {"w": x / mx, "count": brute_weight("count", active, u, v)})
                     for (u, v), x in raw.items() if x / mx > t)
    return g


@pytest.mark.parametrize("name", OTHER)
@pytest.mark.parametrize("form", [0, 1], ids=["store", "gpickle"])
def test_sweep_matches_networkx(graphs, name, form):
    active = graphs[2]
    got = ga.threshold_sweep(graphs[form], weight=name)
    for row in got.itertuples():
        k = reference_graph(active, name, row.threshold)
        sizes = [len(c) for c in nx.connected_components(k)]
        assert (row.num_nodes, row.num_edges, row.num_components, row.max_comp_size, row.min_comp_size) == \
               (k.number_of_nodes(), k.number_of_edges(), len(sizes), max(sizes), min(sizes))
        assert row.avg_comp_size == pytest.approx(np.mean(sizes), rel=1e-12)
    assert got["num_edges"].iloc[0] > got["num_edges"].iloc[-1] > 0


@pytest.mark.parametrize("name", OTHER)
def test_selection_matches_networkx(graphs, name):
    store, pick, active = graphs
    for t in (0.0, 0.3, 0.6):
        g = reference_graph(active, name, t)
        for r in (0.1, 0.5):
            k = min(max(1, int(g.number_of_nodes() * r)), g.number_of_nodes())
            sub = sel.select(store, t, r, "degree", weight=name)
            assert_top_k(sub.ids.tolist(), dict(g.degree()), k)
            assert sub.edges_kept == g.number_of_edges()
            assert sub.info["weight"] == name and sub.info["max_weight"] == store.weight(name).max
        wd = dict(g.degree(weight="w"))
        sub = sel.select(store, t, 0.2, "weighted_degree", weight=name)
        np.testing.assert_allclose(sub.scores, [wd[u] for u in sub.ids.tolist()], rtol=1e-12)
        assert sorted(wd[u] for u in sub.ids.tolist()) == pytest.approx(sorted(wd.values())[-len(sub.ids):])
        pr = nx.pagerank(g, weight="w", tol=1e-13, max_iter=10000)
        np.testing.assert_allclose(sel.pagerank(store, store.cut(t, name)), [pr[u] for u in range(store.num_nodes)],
                                   atol=1e-9)
        # no dataset files and no direct-effect record here
        for method in [m for m in sel.METHODS if m not in ("attribution", "ablation", "influence", "direct_loss",
                                                           "magnitude")]:
            a, b = sel.select(store, t, 0.15, method, seed=9, weight=name), \
                sel.select(pick, t, 0.15, method, seed=9, weight=name)
            assert a.ids.tolist() == b.ids.tolist() and a.edges_kept == b.edges_kept, method
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-12)


def test_weights_that_differ_pick_different_neurons(graphs):
    """The always-firing neurons are hubs under count but have no kept edge under phi or pmi."""
    store, _, active = graphs
    always = np.flatnonzero(active.all(axis=0))
    top = {n: set(sel.select(store, 0.3, 0.1, "degree", weight=n).ids.tolist()) for n in gr.COACTIVATION_WEIGHTS}
    for n in ("phi", "pmi"):
        assert not top[n] & set(always.tolist())
        assert store.degrees(store.cut(0.0, n))[always].sum() == 0


def test_weight_does_not_apply_to_activation_count_and_random(graphs):
    store = graphs[0]
    for method in ("activation_count", "random"):
        a = sel.select(store, 0.5, 0.2, method, seed=3)
        b = sel.select(store, 0.5, 0.2, method, seed=3, weight="phi")
        assert a.ids.tolist() == b.ids.tolist() and a.edges_kept == b.edges_kept
        assert b.info["weight"] is None and b.info["max_weight"] is None
        assert sel.subset_file_name("toy", method, 0.5, 0.2, "phi") == f"toy_{method}_r0.2.npy"
    assert sel.subset_file_name("toy", "degree", 0.5, 0.2, "phi") == "toy_degree_phi_t0.5_r0.2.npy"
    assert sel.subset_file_name("toy", "weighted_degree", 0.5, 0.2) == "toy_weighted_degree_t0.5_r0.2.npy"


def test_phi_and_pmi_need_the_number_of_samples(graphs):
    store = graphs[0]
    g = gr.CoactivationGraph(store.model, store.node_ids, store.activation_count, store.layer, store.dimension,
                             store.blocks, num_samples=None, source="x.gpickle")
    assert g.weight("jaccard").max == store.weight("jaccard").max
    for name in ("phi", "pmi"):
        with pytest.raises(PipelineError, match="number of samples"):
            g.weight(name)
    with pytest.raises(PipelineError, match="unknown --weight"):
        store.weight("cosine")
