"""Stage c / c_analyze library: counts, normalisation, histograms and threshold sweep against independent
references (per-edge brute force, NetworkX, numpy.histogram)."""

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.selection import analysis as ga

from graphdata import brute_force_graph, full_edges, make_dataset, random_activations

N_LAYER, D_MLP = 3, 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    active = random_activations(N_LAYER, D_MLP, 400, seed=1)
    make_dataset(d, active, N_LAYER, D_MLP)
    ref = brute_force_graph(active, full_edges(N_LAYER, D_MLP))
    data = gr.load_activation_data(d)
    gs.write_store(d / "store", data)
    gs.write_gpickle(gs.build_networkx(data), d / "toy_weighted_graph.gpickle")
    return d, active, ref


def both_forms(d):
    return {"store": gs.read_graph(d / "store"), "gpickle": gs.read_graph(d / "toy_weighted_graph.gpickle")}


def test_store_counts_equal_brute_force(dataset):
    d, active, ref = dataset
    g = gs.read_store(d / "store")
    assert g.header["kind"] == "adjacent_dense" and len(g.blocks) == N_LAYER - 1
    np.testing.assert_array_equal(g.activation_count, [ref.nodes[u]["activation_count"] for u in range(g.num_nodes)])
    for i, b in enumerate(g.blocks):
        c = np.load(d / "store" / g.header["blocks"][i]["file"], mmap_mode="r", allow_pickle=False)
        expect = np.array([[ref.edges[i * D_MLP + a, (i + 1) * D_MLP + q]["co_activation_count"]
                            for q in range(D_MLP)] for a in range(D_MLP)])
        np.testing.assert_array_equal(c, expect)
    assert g.max_co_activation == max(c for _, _, c in ref.edges(data="co_activation_count")) > 127
    assert g.header["num_nonzero_edges"] == sum(1 for *_, c in ref.edges(data="co_activation_count") if c > 0)


def test_gpickle_equals_brute_force(dataset):
    d, _, ref = dataset
    g = gs.load_gpickle(d / "toy_weighted_graph.gpickle")
    assert sorted(g.nodes(data=True)) == sorted(
        (u, {**a, "layer": u // D_MLP, "dimension": u % D_MLP}) for u, a in ref.nodes(data=True))
    assert {(min(u, v), max(u, v)): c for u, v, c in g.edges(data="co_activation_count")} == \
           {(min(u, v), max(u, v)): c for u, v, c in ref.edges(data="co_activation_count")}


def test_edited_edge_list_keeps_only_its_edges(tmp_path):
    active = random_activations(N_LAYER, D_MLP, 300, seed=2)
    rng = np.random.default_rng(3)
    n = N_LAYER * D_MLP
    edges = rng.integers(0, n, size=(60, 2))
    edges = edges[edges[:, 0] != edges[:, 1]]
    edges = np.vstack([edges, edges[:5, ::-1], edges[:3]])  # reversed and repeated lines collapse
    make_dataset(tmp_path, active, N_LAYER, D_MLP, edges=edges)
    gs.write_store(tmp_path / "store", gr.load_activation_data(tmp_path))
    g = gs.read_store(tmp_path / "store")
    assert g.header["kind"] == "edge_list"
    ref = brute_force_graph(active, edges)
    got = {(int(g.node_ids[u]), int(g.node_ids[v])): int(c) for u, v, c in
           zip(g.blocks[0].src, g.blocks[0].tgt, g.blocks[0].c)}
    assert got == {(min(u, v), max(u, v)): c for u, v, c in ref.edges(data="co_activation_count")}


def test_pair_counts_exact_beyond_uint16():
    rng = np.random.default_rng(4)
    a, b = rng.random((70000, 5)) < 0.9, rng.random((70000, 4)) < 0.95
    c = gr.pair_counts(a, b)
    assert c.dtype == np.uint32
    np.testing.assert_array_equal(c, a.astype(np.int64).T @ b.astype(np.int64))


def test_count_cutoff_matches_float_ratio():
    for mx in (1, 7, 10, 87, 400, 2500):
        c = np.arange(1, mx + 1)
        for t in ga.SWEEP_THRESHOLDS + (0.05, 0.99, 1.0):
            kept = [x for x in c.tolist() if x / mx > t]
            assert gr.count_cutoff(t, mx) == (kept[0] if kept else mx + 1)


def nx_analyzed(ref):
    h = ref.copy()
    h.remove_edges_from([(u, v) for u, v, c in h.edges(data="co_activation_count") if c <= 0])
    mx = max(c for *_, c in h.edges(data="co_activation_count"))
    for u, v, a in h.edges(data=True):
        a["w"] = a["co_activation_count"] / mx
    return h


def nx_thresholded(h, t):
    k = nx.Graph()
    k.add_nodes_from(sorted(h.nodes))
    k.add_edges_from((u, v, a) for u, v, a in h.edges(data=True) if a["w"] > t)
    return k


@pytest.mark.parametrize("form", ["store", "gpickle"])
def test_threshold_sweep_every_row_matches_networkx(dataset, form):
    d, _, ref = dataset
    h = nx_analyzed(ref)
    got = ga.threshold_sweep(both_forms(d)[form])
    assert list(got["threshold"]) == [i / 10 for i in range(10)]
    for row in got.itertuples():
        k = nx_thresholded(h, row.threshold)
        sizes = [len(c) for c in nx.connected_components(k)]
        assert (row.num_nodes, row.num_edges, row.num_components, row.max_comp_size, row.min_comp_size) == \
               (k.number_of_nodes(), k.number_of_edges(), len(sizes), max(sizes), min(sizes))
        assert row.avg_comp_size == pytest.approx(np.mean(sizes), rel=1e-12)


@pytest.mark.parametrize("form", ["store", "gpickle"])
def test_histograms_match_numpy_on_reference_values(dataset, form):
    d, _, ref = dataset
    g = both_forms(d)[form]
    h = nx_analyzed(ref)
    cases = [
        (ga.histogram(g.activation_count, 20), [a for _, a in ref.nodes(data="activation_count")]),
        (ga.histogram(bins=20, bincount=ga.edge_count_bincount(g)), [c for *_, c in h.edges(data="co_activation_count")]),
        (ga.histogram(g.degrees(g.cut(0.0)), 20), [deg for _, deg in h.degree()]),
    ]
    for got, values in cases:
        dens, edges = np.histogram(values, bins=20, density=True)
        np.testing.assert_allclose(got["density"], dens, rtol=1e-12)
        np.testing.assert_allclose(got["bin_start"], edges[:-1])
        np.testing.assert_allclose(got["bin_end"], edges[1:])
        assert ((got["bin_end"] - got["bin_start"]) * got["density"]).sum() == pytest.approx(1.0)
        counts, _ = np.histogram(values, bins=edges)
        assert counts.sum() == len(values)  # every value (edge / node) counted once


def test_analyzed_gpickle_normalised_weights_match_networkx(dataset):
    d, _, ref = dataset
    h = nx_analyzed(ref)
    graph = gs.read_graph(d / "toy_weighted_graph.gpickle")
    an = gs.analyzed_networkx(gs.load_gpickle(d / "toy_weighted_graph.gpickle"), graph)
    assert an.number_of_edges() == h.number_of_edges()
    for u, v, w in h.edges(data="w"):
        assert an.edges[u, v]["co_activation_count_normalized"] == w
    mx = max(a for _, a in ref.nodes(data="activation_count"))
    for u, a in ref.nodes(data="activation_count"):
        assert an.nodes[u]["activation_count_normalized"] == a / mx
    np.testing.assert_array_equal(gs.read_store(d / "store").normalized_activation(),
                                  [a / mx for _, a in sorted(ref.nodes(data="activation_count"))])


def test_store_loads_one_pair_memory_mapped_without_pickle(dataset):
    d, _, _ = dataset
    g = gs.read_store(d / "store")
    c = g.blocks[0].counts()
    assert isinstance(c, np.memmap)
    assert pd.read_json(d / "store" / "graph.json", typ="series")["format"] == gs.STORE_FORMAT


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 100, 1001])
def test_pair_product_exact_for_any_row_count(rows):
    import torch

    from gelutrace.graph.counts import pair_product
    rng = np.random.default_rng(rows)
    a, b = rng.random((rows, 40)) < 0.4, rng.random((rows, 24)) < 0.7
    got = pair_product(torch.from_numpy(a), torch.from_numpy(b))
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), a.astype(np.int64).T @ b.astype(np.int64))


@pytest.mark.parametrize("d_mlp", [12, 16])  # layers that are, and are not, whole bytes of the packed matrix
def test_packed_matrix_counts_in_blocks_equal_numpy(d_mlp):
    from gelutrace.graph.counts import PackedMatrixCounts
    active = random_activations(4, d_mlp, 1000, seed=d_mlp)
    counts = PackedMatrixCounts(np.packbits(active, axis=1), 4, d_mlp, block_rows=96)
    a = active.astype(np.int64)
    np.testing.assert_array_equal(counts.node_counts(), a.sum(axis=0))
    for i in range(3):
        np.testing.assert_array_equal(counts.pair_counts(i),
                                      a[:, i * d_mlp:(i + 1) * d_mlp].T @ a[:, (i + 1) * d_mlp:(i + 2) * d_mlp])
