"""Stages c, c_analyze, d and d_batch as a user runs them: subprocesses on a small synthetic dataset dir."""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gelutrace.files import atomic, formats, layout

from conftest import run_python
from graphdata import brute_force_graph, full_edges, make_dataset, random_activations

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
C, C_AN, D = (str(ROOT / s) for s in ("c_calculate_weighted_activation_graph.py",
                                       "c_analyze_weighted_activation_graph.py", "d_calculate_perturbation_subset.py"))
BATCH = str(ROOT / "d_batch_perturbation_calculate.sh")
ENV = {**os.environ, "PYTHON": PY, "MPLBACKEND": "Agg"}


def attempt(*args):
    """A stage script's run, or the batch script's command (in this process: conftest.run_python), whatever its
    exit status."""
    return run_python([*([] if args[0] == BATCH else [PY]), *args], env=ENV, cwd=ROOT)


def run(*args):
    r = attempt(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def run_each(*commands):
    for c in commands:
        run(*c)


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """c (store and .gpickle) -> c_analyze -> d, run end to end."""
    d = tmp_path_factory.mktemp("t1")
    make_dataset(d, random_activations(3, 10, 300, seed=11), 3, 10)
    run(C, "--input_dir", str(d))  # one after the other: a directory takes one writer at a time
    run(C, "--input_dir", str(d), "--output_path", str(d / "toy_weighted_graph.gpickle"))
    run_each([C_AN, "--input_path", str(d / "toy_weighted_graph")],
             [C_AN, "--input_path", str(d / "toy_weighted_graph.gpickle"), "--output_dir", str(d / "an_pickle")])
    an = d / layout.ANALYSIS_DIR
    run_each([D, "--input_graph_path", str(an / "toy_weighted_graph_analyzed.json"), "--threshold", "0.5",
              "--ratio", "0.2", "--method", "degree", "--output_path", str(d / "compact.npy")],
             [D, "--input_graph_path", str(d / "an_pickle" / "toy_weighted_graph_analyzed.gpickle"),
              "--threshold", "0.5", "--ratio", "0.2", "--method", "degree", "--output_path", str(d / "pickle.npy"),
              "--export_graph", str(d / "thr.graphml")])
    return d


def test_end_to_end_outputs(pipeline):
    d = pipeline
    an = d / layout.ANALYSIS_DIR
    assert json.loads((d / "toy_weighted_graph" / layout.GRAPH_STORE_HEADER).read_text())["model"] == "toy"
    for name in (layout.HIST_NODE_COUNT, layout.HIST_EDGE_COUNT, layout.HIST_DEGREE):
        assert list(pd.read_csv(an / f"{name}.csv").columns) == layout.HIST_COLUMNS
        assert (an / f"{name}.png").stat().st_size > 1000
    sweep = pd.read_csv(an / layout.THRESHOLD_CSV)
    assert list(sweep.columns) == layout.THRESHOLD_COLUMNS and len(sweep) == 10
    pd.testing.assert_frame_equal(sweep, pd.read_csv(d / "an_pickle" / layout.THRESHOLD_CSV))
    ref = json.loads((an / "toy_weighted_graph_analyzed.json").read_text())
    assert (an / "toy_weighted_graph_analyzed.json").stat().st_size < 4096  # a reference, not the edges
    assert ref["store"] == "../toy_weighted_graph"
    a, b = np.load(d / "compact.npy", allow_pickle=False), np.load(d / "pickle.npy", allow_pickle=False)
    assert a.dtype == np.int64 and a.ndim == 1 and len(a) == 6
    np.testing.assert_array_equal(a, b)
    side = json.loads((d / "compact.json").read_text())
    assert side["k"] == 6 and side["neurons"] == a.tolist() and sum(side["per_layer_counts"].values()) == 6
    import networkx as nx
    g = nx.read_graphml(d / "thr.graphml", node_type=int)
    assert g.number_of_nodes() == 30 and g.number_of_edges() == side["edges_kept"]
    # every node and edge with its attributes, against the thresholded brute-force graph
    active, _ = formats.read_activation_matrix(layout.path(d, layout.MATRIX, "toy"))
    ref = brute_force_graph(active, full_edges(3, 10))
    mx = max(c for *_, c in ref.edges(data="co_activation_count"))
    ma = max(c for _, c in ref.nodes(data="activation_count"))
    kept = {(min(u, v), max(u, v)): c for u, v, c in ref.edges(data="co_activation_count") if c / mx > 0.5}
    assert {(min(u, v), max(u, v)) for u, v in g.edges} == set(kept)
    for u, v, attrs in g.edges(data=True):
        c = kept[(min(u, v), max(u, v))]
        assert attrs["co_activation_count"] == c and attrs["co_activation_count_normalized"] == pytest.approx(c / mx)
    for u, attrs in g.nodes(data=True):
        assert (attrs["layer"], attrs["dimension"]) == (u // 10, u % 10)
        assert attrs["activation_count"] == ref.nodes[u]["activation_count"]
        assert attrs["activation_count_normalized"] == pytest.approx(ref.nodes[u]["activation_count"] / ma)


def test_batch_grid_skip_and_force(pipeline):
    d = pipeline
    graph = str(d / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    out = run(BATCH, "--thresholds", "0.5", "--ratios", "0.1 0.2", graph)
    files = sorted(p.name for p in (d / layout.SUBSETS_DIR).glob("*.npy"))
    assert files == ["toy_degree_t0.5_r0.1.npy", "toy_degree_t0.5_r0.2.npy"]
    assert "summary" in out and out.count("written") == 2
    np.testing.assert_array_equal(np.load(d / layout.SUBSETS_DIR / files[1]), np.load(d / "compact.npy"))
    again = run(BATCH, "--thresholds", "0.5", "--ratios", "0.2", graph)
    assert "skipped" in again and "written" not in again


def test_bad_input_one_error_line_and_outputs_untouched(pipeline, tmp_path):
    d = pipeline
    an = d / layout.ANALYSIS_DIR
    analyzed = str(an / "toy_weighted_graph_analyzed.json")
    # a damaged copy of the dataset, and a graph from another model
    bad = tmp_path / "bad"
    shutil.copytree(d, bad, ignore=shutil.ignore_patterns("toy_weighted_graph*", "weighted_graph_analysis", "*.npy"))
    layout.path(bad, layout.MATRIX, "toy").write_bytes(b"not an npz")
    other = tmp_path / "other"
    make_dataset(other, random_activations(2, 5, 50, seed=1), 2, 5, m="tiny")
    np.save(tmp_path / "tiny_sub.npy", np.array([0, 1]))
    (tmp_path / "tiny_sub.json").write_text(json.dumps({"model": "tiny"}))
    bad_meta = tmp_path / "badmeta"
    shutil.copytree(other, bad_meta)
    atomic.write_json({"model": "tiny", "n_layer": 2, "d_mlp": 3}, layout.path(bad_meta, layout.GRAPH_META, "tiny"))
    store = str(d / "toy_weighted_graph")
    before = snapshot(d)
    d_args = ["--input_graph_path", analyzed, "--output_path", str(d / "compact.npy")]
    cases = {
        "missing dir": [C, "--input_dir", str(tmp_path / "nope"), "--output_path", store],
        "corrupt matrix": [C, "--input_dir", str(bad), "--output_path", store],
        "meta of another model": [C, "--input_dir", str(bad_meta), "--output_path", store],
        "analyze corrupt pickle": [C_AN, "--input_path", str(bad / "toy_neuron_attributes.csv"), "--output_dir", str(an)],
        "threshold": [D, *d_args, "--threshold", "1.5", "--ratio", "0.1"],
        "ratio": [D, *d_args, "--threshold", "0.5", "--ratio", "0"],
        "method": [D, *d_args, "--threshold", "0.5", "--ratio", "0.1", "--method", "closeness"],
        "other model subset": [D, *d_args, "--threshold", "0.5", "--ratio", "0.1", "--method", "random",
                               "--match_layers", str(tmp_path / "tiny_sub.npy")],
        "d corrupt graph": [D, "--input_graph_path", str(bad / "toy_activation_matrix.npz"), "--threshold", "0.5",
                            "--ratio", "0.1", "--output_path", str(d / "compact.npy")],
    }
    procs = {k: attempt(*v) for k, v in cases.items()}
    procs["gpickle too big"] = attempt(C, "--input_dir", str(d), "--output_path", str(d / "toy_weighted_graph.gpickle"),
                                       "--memory_limit_gb", "1e-6")
    errs = {name: p.stderr for name, p in procs.items()}
    for name, p in procs.items():
        lines = errs[name].strip().splitlines()
        assert p.returncode == 2, (name, errs[name])
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, errs[name])
    assert "compact graph store" in errs["gpickle too big"]
    assert "another model" in errs["other model subset"] or "'tiny'" in errs["other model subset"]
    assert snapshot(d) == before
    assert not list(d.glob(".*.tmp")) and not list(an.glob(".*.tmp"))


def test_stale_analysis_reference_is_refused(pipeline, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(pipeline, d)
    # rebuilding the store (a new uid) invalidates the analysis that referenced it
    run_python([PY, C, "--input_dir", str(d)], check=True, capture_output=True, env=ENV)
    p = run_python([PY, D, "--input_graph_path", str(d / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json"),
                        "--threshold", "0.5", "--ratio", "0.1", "--output_path", str(d / "x.npy")],
                   capture_output=True, text=True, env=ENV)
    assert p.returncode == 2 and "rerun c_analyze" in p.stderr and not (d / "x.npy").exists()


def test_graph_free_methods_ignore_the_threshold(pipeline, tmp_path):
    d = pipeline
    graph = str(d / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    freq = layout.path(d, layout.FREQUENCY, "toy")
    n = len(pd.read_csv(freq))
    attr = np.arange(n)[::-1] * 0.5  # neuron 0 first
    pd.read_csv(freq).assign(attribution=attr).to_csv(freq, index=False)
    out = tmp_path / "subsets"
    log = run(BATCH, "--thresholds", "0.5 0.8", "--ratios", "0.1", "--methods", "degree attribution", graph, str(out))
    names = sorted(p.name for p in out.glob("*.npy"))
    assert names == ["toy_attribution_r0.1.npy", "toy_degree_t0.5_r0.1.npy", "toy_degree_t0.8_r0.1.npy"]
    assert log.count("[attribution") == 1
    np.testing.assert_array_equal(np.load(out / "toy_attribution_r0.1.npy"), [0, 1, 2])
    side = json.loads((out / "toy_attribution_r0.1.json").read_text())
    assert side["threshold"] is None and side["threshold_ignored"] is True and side["method"] == "attribution"
def test_weight_flag_names_and_records_the_weight(pipeline, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(pipeline, d)
    an = d / layout.ANALYSIS_DIR
    count_files = snapshot(an)
    run_each([C_AN, "--input_path", str(d / "toy_weighted_graph"), "--weight", "phi"],
                 [C_AN, "--input_path", str(d / "toy_weighted_graph.gpickle"), "--output_dir", str(d / "an_pickle"),
                  "--weight", "phi"])
    assert {k: v for k, v in snapshot(an).items() if k in count_files} == count_files  # count's files untouched
    sweep = pd.read_csv(an / "threshold_analysis_phi.csv")
    assert (an / "threshold_analysis_phi.png").stat().st_size > 1000
    assert list(sweep.columns) == layout.THRESHOLD_COLUMNS and len(sweep) == 10
    assert not sweep.equals(pd.read_csv(an / layout.THRESHOLD_CSV))
    pd.testing.assert_frame_equal(sweep, pd.read_csv(d / "an_pickle" / "threshold_analysis_phi.csv"))
    ref = json.loads((an / "toy_weighted_graph_analyzed_phi.json").read_text())
    assert ref["weight"] == "phi" and 0 < ref["max_weight"] <= 1
    assert json.loads((an / "toy_weighted_graph_analyzed.json").read_text())["weight"] == "count"
    import networkx as nx

    from gelutrace.graph.store import load_gpickle
    g = load_gpickle(d / "an_pickle" / "toy_weighted_graph_analyzed_phi.gpickle")
    assert g.graph["weight"] == "phi" and g.graph["max_weight"] == ref["max_weight"]
    assert max(w for *_, w in g.edges(data="phi_normalized")) == 1.0

    out = d / "subsets"
    run_each(*([D, "--input_graph_path", str(an / "toy_weighted_graph_analyzed_phi.json"), "--threshold", "0.3",
                    "--ratio", "0.2", "--method", method, "--weight", "phi", "--output_dir", str(out)]
                   for method in ("degree", "random")),
                 [D, "--input_graph_path", str(d / "an_pickle" / "toy_weighted_graph_analyzed_phi.gpickle"),
                  "--threshold", "0.3", "--ratio", "0.2", "--weight", "phi", "--output_path", str(d / "pick.npy"),
                  "--export_graph", str(d / "phi.graphml")])
    assert sorted(p.name for p in out.glob("*.npy")) == ["toy_degree_phi_t0.3_r0.2.npy", "toy_random_r0.2.npy"]
    side = json.loads((out / "toy_degree_phi_t0.3_r0.2.json").read_text())
    assert side["weight"] == "phi" and side["max_weight"] == ref["max_weight"]
    np.testing.assert_array_equal(np.load(out / "toy_degree_phi_t0.3_r0.2.npy"), np.load(d / "pick.npy"))
    assert json.loads((out / "toy_random_r0.2.json").read_text())["weight"] is None
    exported = nx.read_graphml(d / "phi.graphml")
    assert exported.number_of_edges() == side["edges_kept"]
    assert all(w > 0.3 for *_, w in exported.edges(data="phi_normalized"))

    batch = run(BATCH, "--thresholds", "0.3", "--ratios", "0.2", "--methods", "degree random",
                "--weights", "count phi", str(an / "toy_weighted_graph_analyzed.json"), str(out))
    table = batch.split("summary (")[1]
    assert table.count("toy_random_r0.2.npy") == 1 and table.count("toy_degree_phi_t0.3_r0.2.npy") == 1
    assert sorted(p.name for p in out.glob("*.npy")) == ["toy_degree_phi_t0.3_r0.2.npy", "toy_degree_t0.3_r0.2.npy",
                                                         "toy_random_r0.2.npy"]


def test_bad_weight_one_error_line(pipeline, tmp_path):
    from gelutrace.graph.store import load_gpickle, write_gpickle
    d = pipeline
    g = load_gpickle(d / "toy_weighted_graph.gpickle")
    del g.graph["num_samples"]
    write_gpickle(g, tmp_path / "toy_weighted_graph.gpickle")
    analyzed = str(d / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    d_args = ["--threshold", "0.5", "--ratio", "0.1", "--output_path", str(tmp_path / "x.npy")]
    cases = {
        "d unknown": [D, "--input_graph_path", analyzed, *d_args, "--weight", "cosine"],
        "analyze unknown": [C_AN, "--input_path", str(d / "toy_weighted_graph"), "--output_dir", str(tmp_path),
                            "--weight", "cosine"],
        "d phi without num_samples": [D, "--input_graph_path", str(tmp_path / "toy_weighted_graph.gpickle"),
                                      *d_args, "--weight", "phi"],
        "analyze pmi without num_samples": [C_AN, "--input_path", str(tmp_path / "toy_weighted_graph.gpickle"),
                                            "--output_dir", str(tmp_path), "--weight", "pmi"],
    }
    procs = {k: attempt(*v) for k, v in cases.items()}
    for name, p in procs.items():
        err = p.stderr
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert ("cosine" in err) if "unknown" in name else ("number of samples" in err), (name, err)
    assert not (tmp_path / "x.npy").exists() and not list(tmp_path.glob("threshold_analysis*"))
    run(D, "--input_graph_path", str(tmp_path / "toy_weighted_graph.gpickle"), *d_args, "--weight", "jaccard")
    assert json.loads((tmp_path / "x.json").read_text())["weight"] == "jaccard"


def test_a_refused_export_leaves_no_subset(pipeline, tmp_path):
    graph = str(pipeline / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    for export, extra in ((tmp_path / "g.txt", []), (tmp_path / "g.graphml", ["--memory_limit_gb", "1e-9"])):
        out = tmp_path / "s.npy"
        p = run_python([PY, D, "--input_graph_path", graph, "--threshold", "0.1", "--ratio", "0.1",
                            "--output_path", str(out), "--export_graph", str(export), *extra],
                       capture_output=True, text=True, env=ENV)
        assert p.returncode == 2 and p.stderr.startswith("error:"), p.stderr
        assert not out.exists() and not export.exists()


def test_k_grid_is_prefixes_of_one_ranking(pipeline, tmp_path):
    """--k writes one subset per k from one ranking: each the first k of the next, the ratio's subset of the same k
    identical, and the ranking the brute-force one (degree on the thresholded graph, ties in the seed's order)."""
    from gelutrace.selection import methods as sel

    d = pipeline
    graph = str(d / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    out = tmp_path / "ks"
    for method, thr in (("degree", ["--threshold", "0.5"]), ("activation_count", []), ("random", [])):
        run(D, "--input_graph_path", graph, *thr, "--k", "2", "6", "15", "--method", method, "--output_dir", str(out))
        stem = f"toy_{method}_t0.5" if thr else f"toy_{method}"
        picks = [np.load(out / f"{stem}_k{k}.npy", allow_pickle=False) for k in (2, 6, 15)]
        assert [len(p) for p in picks] == [2, 6, 15]
        side = json.loads((out / f"{stem}_k6.json").read_text())
        assert side["k"] == 6 and side["ratio"] is None
        if method != "random":
            assert picks[0].tolist() == picks[1][:2].tolist() and picks[1].tolist() == picks[2][:6].tolist()
    np.testing.assert_array_equal(np.load(out / "toy_degree_t0.5_k6.npy"), np.load(d / "compact.npy"))  # --ratio 0.2
    deg = reference_degree(d, 0.5)
    order = np.lexsort((sel.tie_order(30, 1337), -deg))
    assert np.load(out / "toy_degree_t0.5_k15.npy").tolist() == order[:15].tolist()


def reference_degree(d, threshold: float) -> np.ndarray:
    """Each toy neuron's degree after the threshold, from a brute-force NetworkX graph of the dataset's matrix."""
    active, _ = formats.read_activation_matrix(layout.path(d, layout.MATRIX, "toy"))
    ref = brute_force_graph(active, full_edges(3, 10))
    mx = max(c for *_, c in ref.edges(data="co_activation_count"))
    deg = np.zeros(30, np.int64)
    for u, v, c in ref.edges(data="co_activation_count"):
        if c / mx > threshold:
            deg[u] += 1
            deg[v] += 1
    return deg


def test_k_grid_bad_input(pipeline, tmp_path):
    graph = str(pipeline / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    out = ["--output_dir", str(tmp_path / "o")]
    for args in (["--k", "0", *out], ["--k", "31", *out], ["--k", "3", "3", *out], ["--k", "2", "--ratio", "0.1", *out],
                 ["--k", "2", "3", "--output_path", str(tmp_path / "a.npy")]):
        p = attempt(D, "--input_graph_path", graph, "--method", "activation_count", *args)
        err = p.stderr
        assert p.returncode == 2 and "error:" in err.strip().splitlines()[-1], (args, err)
    assert not list(tmp_path.rglob("*.npy"))


def test_k_values_counts_and_percentages():
    from gelutrace import PipelineError
    from gelutrace.selection import methods as sel

    assert sel.k_values(3072, ["30", "1%", "5%", "30"]) == [30, 153]  # 1 % of 3072 is int(30.72)
    assert sel.k_values(3072, list(sel.K_GRID)) == [3, 5, 11, 22, 42, 82, 159, 307]
    for bad in ("x", "0", "4000", "0%", "101%"):
        with pytest.raises(PipelineError):
            sel.k_values(3072, [bad])


def test_match_layers_refuses_another_k(pipeline, tmp_path):
    graph = str(pipeline / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    np.save(tmp_path / "other.npy", np.array([0, 1, 11, 25], np.int64))
    base = ["--input_graph_path", graph, "--method", "random", "--match_layers", str(tmp_path / "other.npy"),
            "--output_dir", str(tmp_path / "o")]
    p = attempt(D, *base, "--k", "7")
    err = p.stderr
    assert p.returncode == 2 and "k=4" in err and not (tmp_path / "o").exists()
    run(D, *base, "--k", "4")
    assert len(np.load(tmp_path / "o" / "toy_random_k4.npy")) == 4
    p = attempt(D, "--input_graph_path", graph, "--method", "degree", "--k", "2.5", "--output_dir", str(tmp_path / "o"))
    err = p.stderr
    assert p.returncode == 2 and err.strip().count("\n") == 0 and err.startswith("error:")  # argparse: one line


def test_exclude_layers_ranks_the_other_layers_alone(pipeline, tmp_path):
    """--exclude_layers 0: the picks are the brute-force degree ranking (ties in the seed's order over all neurons)
    restricted to layers 1 and 2, at the same k; the names, sidecar and scores file say so; the names without the
    flag stay as they were."""
    from gelutrace.selection import methods as sel

    d = pipeline
    graph = str(d / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    out = tmp_path / "x"
    for method, thr in (("degree", ["--threshold", "0.5"]), ("activation_count", []), ("random", [])):
        run(D, "--input_graph_path", graph, *thr, "--k", "2", "6", "15", "--method", method, "--output_dir", str(out))
        run(D, "--input_graph_path", graph, *thr, "--k", "2", "6", "15", "--method", method, "--output_dir", str(out),
            "--exclude_layers", "0")
    deg = reference_degree(d, 0.5)
    rest = np.arange(10, 30)  # layers 1 and 2
    order = rest[np.lexsort((sel.tie_order(30, 1337)[rest], -deg[rest]))]
    for k in (2, 6, 15):
        assert np.load(out / f"toy_degree_t0.5_x0_k{k}.npy").tolist() == order[:k].tolist()
        assert np.load(out / f"toy_degree_t0.5_k{k}.npy").tolist() == np.lexsort((sel.tie_order(30, 1337), -deg))[:k].tolist()
        for method in ("activation_count", "random"):
            picks = np.load(out / f"toy_{method}_x0_k{k}.npy")
            assert len(picks) == k and (picks >= 10).all() and len(set(picks.tolist())) == k
    active, _ = formats.read_activation_matrix(layout.path(d, layout.MATRIX, "toy"))
    count = active.sum(0)
    ac = rest[np.lexsort((sel.tie_order(30, 1337)[rest], -count[rest]))]
    assert np.load(out / "toy_activation_count_x0_k15.npy").tolist() == ac[:15].tolist()
    side = json.loads((out / "toy_degree_t0.5_x0_k6.json").read_text())
    assert side["exclude_layers"] == [0] and side["k"] == 6 and side["per_layer_counts"].keys() <= {"1", "2"}
    assert "exclude_layers" not in json.loads((out / "toy_degree_t0.5_k6.json").read_text())
    assert side["score_file"] == "scores/toy_degree_t0.5_x0.npy"
    scores = np.load(out / side["score_file"])
    assert np.isnan(scores[:10]).all() and scores[10:].tolist() == deg[10:].astype(float).tolist()
    assert sorted(p.name for p in out.glob("*_k6.npy")) == [
        "toy_activation_count_k6.npy", "toy_activation_count_x0_k6.npy", "toy_degree_t0.5_k6.npy",
        "toy_degree_t0.5_x0_k6.npy", "toy_random_k6.npy", "toy_random_x0_k6.npy"]


def test_exclude_layers_halves_leave_out_the_same_layers(pipeline):
    """The halves' selections (the sidecar's halves) rank without the excluded layers too: on two halves that
    are the whole graph, each is the numpy top k over layers 1 and 2."""
    from gelutrace.graph import store as gs
    from gelutrace.selection import methods as sel
    from gelutrace.selection import stability

    g = gs.read_graph(pipeline / "toy_weighted_graph")
    halves = stability.Halves([stability.Half(g), stability.Half(g)], "the whole graph twice")
    recs = stability.half_selections(halves, "activation_count", None, "count", [4, 9], 1337, exclude_layers=[0])
    count = formats.read_activation_matrix(layout.path(pipeline, layout.MATRIX, "toy"))[0].sum(0)
    rest = np.arange(10, 30)
    order = rest[np.lexsort((sel.tie_order(30, 1337)[rest], -count[rest]))]
    for rec, k in zip(recs, (4, 9)):
        assert rec["half_a"] == rec["half_b"] == order[:k].tolist()


def test_exclude_layers_bad_values_one_error_line(pipeline, tmp_path):
    graph = str(pipeline / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    out = ["--output_dir", str(tmp_path / "o")]
    for args in (["--exclude_layers", "3"], ["--exclude_layers", "-1"], ["--exclude_layers", "0", "1", "2"],
                 ["--exclude_layers", "0", "0"], ["--exclude_layers", "0", "--k", "21"],
                 ["--exclude_layers", "x"]):
        size = [] if "--k" in args else ["--k", "3"]
        for method in ("activation_count", "random"):
            p = attempt(D, "--input_graph_path", graph, "--method", method, *size, *args, *out)
            err = p.stderr
            assert p.returncode == 2 and err.count("\n") == 1 and err.startswith("error:"), (args, err)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.npy"))
    # the sweep: a layer the graph lacks is one line before any subset
    p = attempt(BATCH, "--ks", "3", "--methods", "activation_count", "--exclude_layers", "7", graph, str(tmp_path / "s"))
    err = p.stderr
    assert p.returncode == 2 and err.count("\n") == 1 and "--exclude_layers 7" in err
    assert not list(tmp_path.rglob("*.npy"))


def test_the_sweep_adds_the_excluded_variants_of_the_fixed_methods(pipeline, tmp_path):
    """--exclude_layers: besides the grid, influence, activation_count, attribution and ablation (of --methods)
    ranked without the layers, each as stage d writes it with the flag."""
    graph = str(pipeline / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    run(BATCH, "--thresholds", "0.5", "--ks", "3 6", "--methods", "degree activation_count random", "--exclude_layers",
        "0", graph, str(tmp_path / "s"))
    assert sorted(p.name for p in (tmp_path / "s").glob("*.npy")) == sorted(
        [f"toy_{v}_k{k}.npy" for v in ("degree_t0.5", "activation_count", "random", "activation_count_x0")
         for k in (3, 6)])
    run(D, "--input_graph_path", graph, "--k", "3", "6", "--method", "activation_count", "--exclude_layers", "0",
        "--output_dir", str(tmp_path / "d"))
    for name in ("toy_activation_count_x0_k6.npy", "toy_activation_count_x0_k6.json", "scores/toy_activation_count_x0.npy"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "d" / name).read_bytes(), name
