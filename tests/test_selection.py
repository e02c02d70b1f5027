"""Stage d library: every method's ranking against a NetworkX reference, ties, and compact == .gpickle."""

import networkx as nx
import pandas as pd
import numpy as np
import pytest
from graphdata import brute_force_graph, full_edges, make_dataset, random_activations

from gelutrace import PipelineError
from gelutrace import coactivation as co
from gelutrace import selection as sel
from gelutrace import stagefiles as sf

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
    data = co.load_activation_data(d)
    co.write_store(d / "store", data)
    co.write_gpickle(co.build_networkx(data), d / "toy_weighted_graph.gpickle")
    ref = brute_force_graph(active, full_edges(N_LAYER, D_MLP))
    return co.read_graph(d / "store"), co.read_graph(d / "toy_weighted_graph.gpickle"), ref


def reference_threshold_graph(ref, t):
    """The original d: normalised weight > t, all nodes kept (inserted in id order)."""
    mx = max(c for *_, c in ref.edges(data="co_activation_count"))
    g = nx.Graph()
    g.add_nodes_from(sorted(ref.nodes))
    g.add_edges_from((u, v, {"w": c / mx}) for u, v, c in ref.edges(data="co_activation_count")
                     if c > 0 and c / mx > t)
    return g


def reference_top(scores: dict, k):
    """Python's stable sort over nodes in id order: ties go to the lower id, as in the original."""
    return [u for u, _ in sorted(sorted(scores.items()), key=lambda x: x[1], reverse=True)[:k]]


THRESHOLDS = [0.0, 0.3, 0.5, 0.8, 0.95]
RATIOS = [0.01, 0.1, 0.25, 1.0]


def test_degree_exactly_as_the_original(graphs):
    store, _, ref = graphs
    for t in THRESHOLDS:
        g = reference_threshold_graph(ref, t)
        for r in RATIOS:
            k = min(max(1, int(g.number_of_nodes() * r)), g.number_of_nodes())
            sub = sel.select(store, t, r, "degree")
            assert sub.ids.tolist() == reference_top(dict(g.degree()), k)
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
    assert sub.ids.tolist() == reference_top(counts, len(sub.ids))


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


@pytest.mark.parametrize("method", [m for m in sel.METHODS if m not in ("attribution", "ablation")])
def test_compact_and_gpickle_identical_downstream(graphs, method):
    store, pick, _ = graphs
    assert (store.max_activation, store.max_co_activation) == (pick.max_activation, pick.max_co_activation)
    for t in THRESHOLDS:
        a, b = sel.select(store, t, 0.15, method, seed=9), sel.select(pick, t, 0.15, method, seed=9)
        assert a.ids.tolist() == b.ids.tolist() and a.edges_kept == b.edges_kept
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-12)
    assert co.threshold_sweep(store).equals(co.threshold_sweep(pick))
    np.testing.assert_array_equal(co.edge_count_bincount(store), co.edge_count_bincount(pick))


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
    co.write_store(tmp_path / "store", co.load_activation_data(tmp_path))
    n = N_LAYER * D_MLP
    rng = np.random.default_rng(1)
    attr = np.round(rng.normal(size=n), 1)  # rounded: ties, broken to the lower id
    freq = sf.path(tmp_path, sf.FREQUENCY, "toy")
    pd.read_csv(freq).assign(attribution=attr).to_csv(freq, index=False)
    measured = rng.choice(n, 20, replace=False)
    effect = rng.normal(size=20)
    pd.DataFrame({"neuron_id": measured, "delta_nll": effect, "kl": effect ** 2}).to_csv(
        sf.path(tmp_path, sf.NEURON_EFFECTS, "toy"), index=False)
    return tmp_path, attr, dict(zip(measured.tolist(), effect.tolist()))


def test_attribution_and_ablation_rank_their_columns(scored):
    d, attr, effects = scored
    g = co.read_graph(d / "store")
    ref = sorted(range(len(attr)), key=lambda i: (-attr[i], i))[:6]  # k = int(30 * 0.2)
    for t in (None, 0.0, 0.9):  # the threshold plays no part
        sub = sel.select(g, t, 0.2, "attribution")
        assert sub.ids.tolist() == ref and sub.edges_kept is None
        np.testing.assert_array_equal(sub.scores, attr[ref])
    ab = sel.select(g, None, 0.2, "ablation")
    assert ab.ids.tolist() == sorted(effects, key=lambda i: (-effects[i], i))[:6]
    assert ab.info["neurons_measured"] == 20
    with pytest.raises(PipelineError, match="only 20 neurons were measured"):
        sel.select(g, None, 0.9, "ablation")
    with pytest.raises(PipelineError, match="needs --threshold"):
        sel.select(g, None, 0.2, "degree")


def test_attribution_missing_is_an_error(scored):
    d, *_ = scored
    freq = sf.path(d, sf.FREQUENCY, "toy")
    pd.read_csv(freq).assign(attribution=np.nan).to_csv(freq, index=False)
    with pytest.raises(PipelineError, match="no-attribution|--no_attribution"):
        sel.select(co.read_graph(d / "store"), None, 0.2, "attribution")
    sf.path(d, sf.NEURON_EFFECTS, "toy").unlink()
    with pytest.raises(PipelineError, match="d_calculate_neuron_effects"):
        sel.select(co.read_graph(d / "store"), None, 0.2, "ablation")
