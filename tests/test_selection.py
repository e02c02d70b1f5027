"""Stage d library: every method's ranking against a NetworkX reference, ties, and compact == .gpickle."""

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from gelutrace import PipelineError
from gelutrace.files import layout
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.selection import analysis as ga
from gelutrace.selection import methods as sel

from conftest import assert_top_k
from graphdata import brute_force_graph, full_edges, make_dataset, random_activations

N_LAYER, D_MLP = 3, 10


def tie_heavy(n_samples=300, seed=5):
    """Many identical columns: identical degrees at every threshold, so ties decide the ranking."""
    a = random_activations(N_LAYER, 4, n_samples, seed)
    return np.repeat(a.reshape(n_samples, N_LAYER, 4), [3, 2, 3, 2], axis=2).reshape(n_samples, -1)[:, :N_LAYER * D_MLP]


@pytest.fixture(scope="module", params=["random", "ties"])
def graphs(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    active = random_activations(N_LAYER, D_MLP, 350, seed=7) if request.param == "random" else tie_heavy()
    make_dataset(d, active, N_LAYER, D_MLP)
    data = gr.load_activation_data(d)
    gs.write_store(d / "store", data)
    gs.write_gpickle(gs.build_networkx(data), d / "toy_weighted_graph.gpickle")
    ref = brute_force_graph(active, full_edges(N_LAYER, D_MLP))
    return gs.read_graph(d / "store"), gs.read_graph(d / "toy_weighted_graph.gpickle"), ref


def reference_threshold_graph(ref, t):
    """The original d: normalised weight > t, all nodes kept (inserted in id order)."""
    mx = max(c for *_, c in ref.edges(data="co_activation_count"))
    g = nx.Graph()
    g.add_nodes_from(sorted(ref.nodes))
    g.add_edges_from((u, v, {"w": c / mx}) for u, v, c in ref.edges(data="co_activation_count")
                     if c > 0 and c / mx > t)
    return g


THRESHOLDS = [0.0, 0.3, 0.5, 0.8, 0.95]
RATIOS = [0.01, 0.1, 0.25, 1.0]
# the methods that read the dataset's files or stage b's direct-effect record, which these graphs lack
NEEDS_RECORD = ("attribution", "ablation", "influence", "direct_loss", "magnitude")


def test_degree_exactly_as_the_original(graphs):
    store, _, ref = graphs
    for t in THRESHOLDS:
        g = reference_threshold_graph(ref, t)
        for r in RATIOS:
            k = min(max(1, int(g.number_of_nodes() * r)), g.number_of_nodes())
            sub = sel.select(store, t, r, "degree")
            assert_top_k(sub.ids.tolist(), dict(g.degree()), k)
            assert sub.scores.tolist() == [g.degree(u) for u in sub.ids.tolist()]
            assert sub.edges_kept == g.number_of_edges()


def test_weighted_degree_pagerank_activation_count_match_networkx(graphs):
    store, _, ref = graphs
    counts = dict(ref.nodes(data="activation_count"))
    for t in (0.0, 0.5):
        g = reference_threshold_graph(ref, t)
        wd = dict(g.degree(weight="w"))
        sub = sel.select(store, t, 0.2, "weighted_degree")
        np.testing.assert_allclose(sub.scores, [wd[u] for u in sub.ids.tolist()], rtol=1e-12)
        assert sorted(wd[u] for u in sub.ids.tolist()) == pytest.approx(sorted(wd.values())[-len(sub.ids):])
        pr = nx.pagerank(g, weight="w", tol=1e-13, max_iter=10000)
        got = sel.pagerank(store, store.cut(t))
        np.testing.assert_allclose(got, [pr[u] for u in range(store.num_nodes)], atol=1e-9)
    sub = sel.select(store, 0.5, 0.3, "activation_count")
    assert_top_k(sub.ids.tolist(), counts, len(sub.ids))


def test_random_is_seeded_and_match_layers_keeps_composition(graphs, tmp_path):
    store, _, _ = graphs
    a = sel.select(store, 0.5, 0.2, "random", seed=3)
    assert a.ids.tolist() == sel.select(store, 0.5, 0.2, "random", seed=3).ids.tolist()
    assert len(set(a.ids.tolist())) == a.k == int(store.num_nodes * 0.2)
    other = np.array([0, 1, 2, 25, 26])
    np.save(tmp_path / "other.npy", other)
    m = sel.select(store, 0.5, 0.2, "random", seed=4, match_layers=tmp_path / "other.npy")
    assert np.array_equal(np.bincount(m.ids // D_MLP, minlength=N_LAYER), np.bincount(other // D_MLP, minlength=N_LAYER))
    np.save(tmp_path / "alien.npy", np.array([0, 10_000]))
    with pytest.raises(PipelineError):
        sel.select(store, 0.5, 0.2, "random", match_layers=tmp_path / "alien.npy")


@pytest.mark.parametrize("method", [m for m in sel.METHODS if m not in NEEDS_RECORD])
def test_compact_and_gpickle_identical_downstream(graphs, method):
    store, pick, _ = graphs
    assert (store.max_activation, store.max_co_activation) == (pick.max_activation, pick.max_co_activation)
    for t in THRESHOLDS:
        a, b = sel.select(store, t, 0.15, method, seed=9), sel.select(pick, t, 0.15, method, seed=9)
        assert a.ids.tolist() == b.ids.tolist() and a.edges_kept == b.edges_kept
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-12)
    assert ga.threshold_sweep(store).equals(ga.threshold_sweep(pick))
    np.testing.assert_array_equal(ga.edge_count_bincount(store), ga.edge_count_bincount(pick))


@pytest.mark.parametrize("t,r,m", [(-0.1, 0.1, "degree"), (1.01, 0.1, "degree"), (0.5, 0.0, "degree"),
                                   (0.5, 1.5, "degree"), (0.5, 0.1, "closeness")])
def test_bad_parameters(graphs, t, r, m):
    with pytest.raises(PipelineError):
        sel.select(graphs[0], t, r, m)


@pytest.fixture()
def scored(tmp_path):
    """A store whose dataset directory also holds an attribution column and a partial neuron-effects file."""
    active = random_activations(N_LAYER, D_MLP, 120, seed=3)
    make_dataset(tmp_path, active, N_LAYER, D_MLP)
    gs.write_store(tmp_path / "store", gr.load_activation_data(tmp_path))
    n = N_LAYER * D_MLP
    rng = np.random.default_rng(1)
    attr = np.round(rng.normal(size=n), 1)  # rounded: ties
    freq = layout.path(tmp_path, layout.FREQUENCY, "toy")
    pd.read_csv(freq).assign(attribution=attr).to_csv(freq, index=False)
    measured = rng.choice(n, 20, replace=False)
    effect = rng.normal(size=20)
    pd.DataFrame({"neuron_id": measured, "delta_nll": effect, "kl": effect ** 2}).to_csv(
        layout.path(tmp_path, layout.NEURON_EFFECTS, "toy"), index=False)
    return tmp_path, attr, dict(zip(measured.tolist(), effect.tolist()))


def test_attribution_and_ablation_rank_their_columns(scored):
    d, attr, effects = scored
    g = gs.read_graph(d / "store")
    for t in (None, 0.0, 0.9):  # the threshold plays no part
        sub = sel.select(g, t, 0.2, "attribution")  # k = int(30 * 0.2)
        assert_top_k(sub.ids.tolist(), dict(enumerate(attr.tolist())), 6)
        assert sub.edges_kept is None
        np.testing.assert_array_equal(sub.scores, attr[sub.ids])
    ab = sel.select(g, None, 0.2, "ablation")
    assert_top_k(ab.ids.tolist(), effects, 6)
    assert ab.info["neurons_measured"] == 20
    with pytest.raises(PipelineError, match="only 20 neurons were measured"):
        sel.select(g, None, 0.9, "ablation")
    with pytest.raises(PipelineError, match="needs --threshold"):
        sel.select(g, None, 0.2, "degree")


def test_attribution_missing_is_an_error(scored):
    d, *_ = scored
    freq = layout.path(d, layout.FREQUENCY, "toy")
    pd.read_csv(freq).assign(attribution=np.nan).to_csv(freq, index=False)
    with pytest.raises(PipelineError, match="no-attribution|--no_attribution"):
        sel.select(gs.read_graph(d / "store"), None, 0.2, "attribution")
    layout.path(d, layout.NEURON_EFFECTS, "toy").unlink()
    with pytest.raises(PipelineError, match="d_calculate_neuron_effects"):
        sel.select(gs.read_graph(d / "store"), None, 0.2, "ablation")


def test_ties_are_broken_at_random_in_proportion_to_the_tied_pool(tmp_path):
    """90 % of the nodes never fire (degree 0 at any threshold): a top k past the 20 connected nodes is filled
    from the tied pool, whose layers are 40, 40, 50 and 50 nodes; the filled picks follow those shares."""
    from scipy.stats import chisquare

    n_layer, d = 4, 50
    rng = np.random.default_rng(0)
    active = np.zeros((300, n_layer * d), bool)
    live = np.r_[rng.choice(d, 10, replace=False), d + rng.choice(d, 10, replace=False)]
    active[:, live] = rng.random((300, 20)) < 0.5
    make_dataset(tmp_path, active, n_layer, d)
    gs.write_store(tmp_path / "store", gr.load_activation_data(tmp_path))
    store = gs.read_graph(tmp_path / "store")
    deg = store.degrees(store.cut(0.0))
    assert (deg[live] > 0).all() and (np.delete(deg, live) == 0).all()
    pool = np.setdiff1d(np.arange(n_layer * d), live)
    filled = np.zeros(n_layer)
    for seed in range(40):
        sub = sel.select(store, 0.0, 0.5, "degree", seed=seed)  # k = 100: 20 connected + 80 of the 180 tied
        assert set(live) <= set(sub.ids.tolist())
        picked = np.setdiff1d(sub.ids, live)
        filled += np.bincount(picked // d, minlength=n_layer)
        assert sub.info["tied_picks"] == len(picked) == 80  # by hand: every pick past the connected ones
        assert sub.info["tie_pool"] == len(pool) and sub.info["zero_score_picks"] == 80
    expected = np.bincount(pool // d, minlength=n_layer) / len(pool) * filled.sum()
    assert chisquare(filled, expected).pvalue > 1e-3
    # the old rule (lowest ids first) would take layer 0's and layer 1's 80 tied nodes: rejected by the same test
    assert chisquare([40 * 40, 40 * 40, 0, 0], expected).pvalue < 1e-6
    # nested: one seed, growing k, prefixes of one ranking
    small, large = (sel.select(store, 0.0, r, "degree", seed=3).ids for r in (0.2, 0.5))
    assert large[:len(small)].tolist() == small.tolist()


@pytest.mark.parametrize("excluded", [[0], [0, 2], [2]])
def test_exclude_layers_is_a_numpy_top_k_over_the_other_layers(scored, excluded):
    """Attribution (rounded: many ties) ranked without some layers: never a pick there, and the picks are numpy's
    top k over the other neurons, ties in the seeded order of all neurons; random draws there too."""
    d, attr, effects = scored
    g = gs.read_graph(d / "store")
    n = N_LAYER * D_MLP
    rest = np.flatnonzero(~np.isin(np.arange(n) // D_MLP, excluded))
    for seed in (0, 1337):
        subs = sel.select_sizes(g, None, [3, 8], "attribution", seed, exclude_layers=excluded)
        order = rest[np.lexsort((sel.tie_order(n, seed)[rest], -attr[rest]))]
        for sub, k in zip(subs, (3, 8)):
            assert sub.ids.tolist() == order[:k].tolist() and sub.info["exclude_layers"] == sorted(excluded)
            tied = attr[order[k - 1]]
            assert sub.info["tie_pool"] == int((attr[rest] == tied).sum())  # the pool counts the other layers only
        assert np.isnan(subs[0].every[np.isin(np.arange(n) // D_MLP, excluded)]).all()
        rnd = sel.select_sizes(g, None, [8], "random", seed, exclude_layers=excluded)[0].ids
        assert len(set(rnd.tolist())) == 8 and not np.isin(rnd // D_MLP, excluded).any()
    # the ratio is of all neurons: the same k as without the flag
    assert sel.select(g, None, 0.2, "attribution", exclude_layers=excluded).k == sel.select(g, None, 0.2, "attribution").k
    measured = np.array(sorted(effects))
    left = int((~np.isin(measured // D_MLP, excluded)).sum())
    with pytest.raises(PipelineError, match="layers not excluded"):
        sel.select_sizes(g, None, [left + 1], "ablation", exclude_layers=excluded)


def test_exclude_layers_bad_values(scored):
    g = gs.read_graph(scored[0] / "store")
    for layers, words in (([3], "layers 0..2"), ([-1], "layers 0..2"), ([0, 1, 2], "every layer")):
        with pytest.raises(PipelineError, match=words):
            sel.select_sizes(g, None, [2], "activation_count", exclude_layers=layers)
    with pytest.raises(PipelineError, match="not excluded"):
        sel.select_sizes(g, None, [21], "activation_count", exclude_layers=[0])
