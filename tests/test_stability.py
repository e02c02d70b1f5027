"""
The stability of a selection (gelutrace.selection.stability) against independent references: every half's graph against
numpy counts of its rows, and each half's subsets against the whole pipeline (stages b, c and d) run on that
half's prompts alone (prompt mode) or on one shard (corpus mode). Stage d records each subset chosen again on
each half, and every neuron's score, in its sidecar: both against the re-selection and the scores recomputed.
"""

import json

import numpy as np
import pandas as pd
import pytest
from test_corpus import run_here

from gelutrace import PipelineError
from gelutrace.evaluate import ablation as pt
from gelutrace.evaluate import statistics as stats
from gelutrace.files import formats, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.record import prompts as recording
from gelutrace.selection import methods as sel
from gelutrace.selection import stability
from gelutrace.selection.stability import jaccard

from conftest import SHIPPED_NAME

M = SHIPPED_NAME
PROMPTS = [("KING HENRY. Now, lords, ", 8, 2), ("And God said, Let there be ", 6, 1), ("ROMEO. ", 10, 1),
           ("Thou shalt not ", 5, 2), ("Friends, Romans, ", 7, 1), ("In the beginning ", 0, 1)]
THRESHOLDS, RATIOS = (0.3, 0.6), (0.01, 0.05)


def test_prompt_halves_partition_the_rows():
    assert recording.prompt_halves(0) is None and recording.prompt_halves(1) is None
    for n in (2, 3, 10, 101):
        half = recording.prompt_halves(n)
        assert half.shape == (n,) and set(np.unique(half)) == {0, 1}
        assert (half == 0).sum() == n // 2
        assert np.array_equal(half, recording.prompt_halves(n))  # seeded: every stage sees the same split


def test_jaccard_by_hand():
    assert jaccard([1, 2, 3], [2, 3, 4]) == 2 / 4
    assert jaccard([5], [5]) == 1.0 and jaccard([1], [2]) == 0.0
    assert np.isnan(jaccard([], []))


def numpy_counts(active: np.ndarray, n_layer: int, d: int):
    a = active.astype(np.int64)
    return a.sum(0), [a[:, i * d:(i + 1) * d].T @ a[:, (i + 1) * d:(i + 2) * d] for i in range(n_layer - 1)]


def test_count_graph_and_sum_graphs_against_numpy():
    rng = np.random.default_rng(3)
    n_layer, d = 3, 12
    active = rng.random((40, n_layer * d)) < 0.3
    data = gr.ActivationData("toy", n_layer, d, np.packbits(active, axis=1), None)
    nodes, pairs = numpy_counts(active, n_layer, d)
    g = gs.count_graph(data)
    assert np.array_equal(g.activation_count, nodes) and g.num_samples == 40
    for b, ref in zip(g.blocks, pairs):
        assert np.array_equal(np.asarray(b.counts(), np.int64), ref)
    rows = rng.permutation(40)
    parts = [gs.count_graph(data.rows(rows[:15])), gs.count_graph(data.rows(rows[15:]))]
    total = gs.sum_graphs(parts)
    assert np.array_equal(total.activation_count, nodes) and total.num_samples == 40
    for b, ref in zip(total.blocks, pairs):
        assert np.array_equal(np.asarray(b.counts(), np.int64), ref)
    # an edited edge list is counted on those edges
    edges = np.array([[0, 13], [2, 30], [5, 7]])
    g = gs.count_graph(gr.ActivationData("toy", n_layer, d, np.packbits(active, axis=1), edges))
    a = active.astype(np.int64)
    assert np.array_equal(np.asarray(g.blocks[0].counts(), np.int64), [a[:, u] @ a[:, v] for u, v in edges])


def write_csv(p, rows):
    pd.DataFrame(rows, columns=layout.PROMPT_COLUMNS).to_csv(p, index=False)
    return p


def stage_b_to_d(csv, d):
    """Stages b (greedy, one sequence per pass), c and d (every method but ablation) into d: the sidecars."""
    run_here("b_generate_activation_dataset.py", "--input_csv", csv, "--export_dir", d, "--model_type", M,
             "--device", "cpu", "--batch_size", 1, "--no_edge_list", "--no_activation_lists", "--top_examples", 0)
    run_here("c_calculate_weighted_activation_graph.py", "--input_dir", d)
    return stage_d(layout.path(d, layout.WEIGHTED_GRAPH, M), d / layout.SUBSETS_DIR, dataset=d, csv=csv)


def stage_d(graph, out, dataset=None, csv=None) -> dict:
    extra = ["--dataset_path", dataset] if dataset is not None else []
    extra += ["--input_csv", csv] if csv is not None else []
    methods = [("degree", t) for t in THRESHOLDS] + [("pagerank", THRESHOLDS[0]), ("activation_count", None),
                                                     ("random", None)]
    methods += [("attribution", None)] if dataset is not None else []
    for method, t in methods:
        for r in RATIOS:
            thr = ["--threshold", t] if t is not None else []
            run_here("d_calculate_perturbation_subset.py", "--input_graph_path", graph, *thr, "--ratio", r,
                     "--method", method, "--output_dir", out, *extra)
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def reselect(half, info: dict, seed_offset: int = 0):
    """The reference for the sidecar's halves: the subset of a sidecar chosen again on one half, one k at a time,
    as stage e chose it before stage d recorded it (None when it cannot be)."""
    method = info.get("method")
    if method not in sel.METHODS or info.get("match_layers"):
        return None
    if method in stability.MEASURED and method not in half.measured:
        return None
    seed = int(info.get("seed", 1337)) + seed_offset
    try:
        return sel.select_sizes(half.graph, info.get("threshold"), [int(info["k"])], method, seed,
                                weight=info.get("weight") or gr.DEFAULT_WEIGHT, measured=half.measured)[0].ids
    except PipelineError:
        return None


def check_recorded(infos: dict, halves, subsets, dataset):
    """Each sidecar's halves equal reselect on the halves, and its scores file equals the method's scores
    recomputed on the graph it was chosen on."""
    graph = gs.read_graph(layout.path(dataset, layout.WEIGHTED_GRAPH, M))
    for stem, info in infos.items():
        rec = info["halves"]
        assert rec["available"] and rec["how"] == halves.how, stem
        offsets = (1, 2) if info["method"] == "random" else (0, 0)
        for name, half, o in zip(layout.HALVES, halves.halves, offsets):
            ref = reselect(half, info, o)
            assert (rec[name] is None) == (ref is None), (stem, name)
            if ref is not None:
                assert rec[name] == ref.tolist(), (stem, name)  # the same neurons in the same rank order
        if info["method"] == "random":
            assert info["score_file"] is None
            continue
        got = np.load(subsets / info["score_file"], allow_pickle=False)
        want = np.asarray(sel.scores(graph, info["method"], info["threshold"], info["weight"] or gr.DEFAULT_WEIGHT,
                                     dataset), np.float64)
        assert got.dtype == np.float64 and np.array_equal(got, want, equal_nan=True), stem
        assert np.array_equal(sel.read_scores(subsets, info), want, equal_nan=True)
    # the subsets of one variant at every k share one scores file
    files = {(i["method"], i["threshold"], i["weight"]): i["score_file"] for i in infos.values()}
    assert len(set(files.values())) == len(files)
    assert len({i["score_file"] for i in infos.values()}) < len(infos)


@pytest.fixture(scope="module")
def prompt_runs(tmp_path_factory):
    """The whole prompt CSV, and each half of its rows alone (in CSV order), through stages b to d."""
    root = tmp_path_factory.mktemp("stability")
    half = recording.prompt_halves(len(PROMPTS))
    runs = {"all": (write_csv(root / "all.csv", PROMPTS), root / "all")}
    for h in (0, 1):
        rows = [p for p, x in zip(PROMPTS, half) if x == h]
        runs[h] = (write_csv(root / f"half{h}.csv", rows), root / f"half{h}")
    return {k: (csv, d, stage_b_to_d(csv, d)) for k, (csv, d) in runs.items()}


def test_prompt_halves_equal_the_pipeline_on_each_half(prompt_runs):
    csv, d, infos = prompt_runs["all"]
    halves = stability.halves_of(d, M, formats.read_prompts(csv))
    assert len(halves.halves) == 2 and "3 + 3" in halves.how
    for h in (0, 1):
        hcsv, hd, hinfos = prompt_runs[h]
        ref = gs.read_store(layout.path(hd, layout.WEIGHTED_GRAPH, M))
        got = halves.halves[h].graph
        assert got.num_samples == ref.num_samples
        assert np.array_equal(got.activation_count, ref.activation_count)
        for a, b in zip(got.blocks, ref.blocks):
            assert np.array_equal(np.asarray(a.counts()), np.asarray(b.counts()))
        # stage b's attribution of one half equals that of the half's prompts alone
        whole = pd.read_csv(layout.path(d, layout.FREQUENCY, M))
        alone = pd.read_csv(layout.path(hd, layout.FREQUENCY, M))["attribution"].to_numpy()
        # sums of terms of both signs: the tolerance scales with the largest neuron's, not with each sum
        np.testing.assert_allclose(whole[f"attribution_{layout.HALVES[h]}"], alone, rtol=1e-4,
                                   atol=1e-4 * np.abs(alone).max())
        # every non-random method chooses on the half what stage d chooses on the half's own dataset
        for stem, info in infos.items():
            if info["method"] in ("random", "attribution"):
                continue  # attribution: equal up to float rounding, so its order may differ at near-ties
            assert np.array_equal(np.sort(info["halves"][layout.HALVES[h]]), np.sort(hinfos[stem]["neurons"])), (stem, h)
    check_recorded(infos, halves, d / layout.SUBSETS_DIR, d)


def test_overlap_is_the_jaccard_of_the_halves_subsets(prompt_runs):
    csv, d, infos = prompt_runs["all"]
    halves = stability.halves_of(d, M, formats.read_prompts(csv))
    overlap = {stem: stability.recorded_overlap(info) for stem, info in infos.items()}
    for stem, info in infos.items():
        if info["method"] in ("random", "attribution"):
            continue
        a, b = (set(prompt_runs[h][2][stem]["neurons"]) for h in (0, 1))
        assert overlap[stem] == pytest.approx(len(a & b) / len(a | b)), stem
    # random: two uniform draws of the next seeds, whatever the data
    n = halves.halves[0].graph.num_nodes
    for stem, info in infos.items():
        if info["method"] == "random":
            a, b = (set(np.random.default_rng(info["seed"] + o).choice(n, info["k"], replace=False).tolist())
                    for o in (1, 2))
            assert overlap[stem] == pytest.approx(len(a & b) / len(a | b))
    values = np.array([v for v in overlap.values()])
    assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()
    assert stability.recorded_halves(list(infos.values())) == {"available": True, "halves": halves.how}


def test_stage_d_without_the_prompt_csv_records_why_there_are_no_halves(prompt_runs, tmp_path):
    csv, d, infos = prompt_runs["all"]
    graph = layout.path(d, layout.WEIGHTED_GRAPH, M)
    run_here("d_calculate_perturbation_subset.py", "--input_graph_path", graph, "--threshold", 0.3, "--ratio", 0.01,
             "--method", "degree", "--output_dir", tmp_path)
    info = json.loads((tmp_path / f"{M}_degree_t0.3_r0.01.json").read_text())
    assert info["halves"] == {"available": False, "how": info["halves"]["how"], "half_a": None, "half_b": None}
    assert "--input_csv" in info["halves"]["how"]
    assert info["score_file"] == infos[f"{M}_degree_t0.3_r0.01"]["score_file"]  # the scores do not need the CSV
    assert np.array_equal(sel.read_scores(tmp_path, info), sel.read_scores(d / layout.SUBSETS_DIR, infos[
        f"{M}_degree_t0.3_r0.01"]))


def test_one_prompt_has_no_halves(tmp_path):
    csv = write_csv(tmp_path / "one.csv", PROMPTS[:1])
    run_here("b_generate_activation_dataset.py", "--input_csv", csv, "--export_dir", tmp_path / "d", "--model_type",
             M, "--device", "cpu", "--no_edge_list", "--no_activation_lists", "--top_examples", 0)
    freq = pd.read_csv(layout.path(tmp_path / "d", layout.FREQUENCY, M))
    assert freq["attribution"].notna().all() and freq["attribution_half_a"].isna().all()
    halves = stability.halves_of(tmp_path / "d", M, formats.read_prompts(csv))
    assert halves.halves == [] and "one prompt" in halves.how
    recs = stability.half_selections(halves, "degree", 0.3, "count", [3, 5], 1337)
    assert recs == [{"available": False, "how": halves.how, "half_a": None, "half_b": None}] * 2
    assert np.isnan(stability.recorded_overlap({"method": "degree", "halves": recs[0]}))


def test_corpus_halves_are_the_shards(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(p for p, _, _ in PROMPTS) * 12)
    for i in (0, 1):
        run_here("b_generate_activation_dataset.py", "--input_text", text, "--export_dir", tmp_path / f"s{i}",
                 "--model_type", M, "--device", "cpu", "--context", 16, "--shard", f"{i}/2", "--attribution")
    run_here("c_merge_activation_statistics.py", "--output_dir", tmp_path / "all", tmp_path / "s0", tmp_path / "s1")
    record = DatasetDir(tmp_path / "all", M).corpus_record()
    halves = stability.halves_of(tmp_path / "all", M, corpus_record=record)
    assert len(halves.halves) == 2 and "1 + 1 of 2 shards" in halves.how
    infos = stage_d(layout.path(tmp_path / "all", layout.WEIGHTED_GRAPH, M), tmp_path / "subsets", tmp_path / "all")
    per_shard = [stage_d(layout.path(tmp_path / f"s{i}", layout.WEIGHTED_GRAPH, M), tmp_path / f"subsets{i}",
                         tmp_path / f"s{i}") for i in (0, 1)]
    assert any(info["method"] == "attribution" for info in infos.values())
    code, err = run_here("d_calculate_perturbation_subset.py", "--input_graph_path",
                         layout.path(tmp_path / "all", layout.WEIGHTED_GRAPH, M), "--k", 3, "--method",
                         "activation_count", "--output_dir", tmp_path / "refused", "--input_csv",
                         write_csv(tmp_path / "p.csv", PROMPTS), check=False)
    assert code == 2 and "corpus-mode dataset" in err and not list((tmp_path / "refused").glob("*.npy"))
    check_recorded(infos, halves, tmp_path / "subsets", tmp_path / "all")
    overlap = {stem: stability.recorded_overlap(info) for stem, info in infos.items()}
    for stem, info in infos.items():
        if info["method"] == "random":
            continue
        a, b = (set(p[stem]["neurons"]) for p in per_shard)
        assert overlap[stem] == pytest.approx(len(a & b) / len(a | b)), stem
    # a corpus of one window leaves the second shard empty: no halves, and the reason
    short = tmp_path / "short.txt"
    short.write_text("KING HENRY. Now, lords,")
    for i in (0, 1):
        run_here("b_generate_activation_dataset.py", "--input_text", short, "--export_dir", tmp_path / f"t{i}",
                 "--model_type", M, "--device", "cpu", "--context", 16, "--shard", f"{i}/2")
    run_here("c_merge_activation_statistics.py", "--output_dir", tmp_path / "tall", tmp_path / "t0", tmp_path / "t1")
    empty = stability.halves_of(tmp_path / "tall", M, corpus_record=DatasetDir(tmp_path / "tall", M).corpus_record())
    assert empty.halves == [] and "empty" in empty.how
    # a dataset of one run has no halves, and says how to get them
    run_here("b_generate_activation_dataset.py", "--input_text", text, "--export_dir", tmp_path / "one",
             "--model_type", M, "--device", "cpu", "--context", 16)
    one = stability.halves_of(tmp_path / "one", M, corpus_record=DatasetDir(tmp_path / "one", M).corpus_record())
    assert one.halves == [] and "--shard" in one.how


def test_report_names_the_unstable_methods_and_the_chance_level():
    from gelutrace.report.report import stability_lines

    best = pd.DataFrame({"k": [30, 30, 30], "method": ["degree", "ablation", "random"],
                         "selection_jaccard": [0.21, 0.8, 0.02]})
    line = stability_lines(best, {"selection_halves": {"available": True, "halves": "prompt rows split 5 + 5"}})[0]
    assert "degree 0.21 (k=30)" in line and "ablation 0.80 (k=30)" in line
    assert "two random draws share 0.02 (k=30)" in line
    assert "Below 0.5, degree would choose mostly other neurons" in line and "ablation would" not in line
    stable = stability_lines(best.iloc[1:], {"selection_halves": {"available": True, "halves": "x"}})[0]
    assert "Below" not in stable
    missing = stability_lines(best, {"selection_halves": {"available": False, "halves": "one prompt <b>"}})[0]
    assert "not measured (one prompt &lt;b&gt;)" in missing


def test_stage_e_reads_what_stage_d_recorded(tmp_path):
    """Stage e's agreement scores and stability columns come from the sidecars; an older stage d's sidecar (no
    scores, no halves) leaves them empty, and a scores file rewritten since is refused."""
    active = np.random.default_rng(0).random((20, 8)) < 0.4
    graph = gs.count_graph(gr.ActivationData("toy", 2, 4, np.packbits(active, axis=1), None))
    every = np.array([3.0, 1.0, np.nan, 2.0, 0.5, 7.0, 1.5, 4.0])
    sub = sel.Subset(np.array([5, 7, 0]), every[[5, 7, 0]], 3, None, {}, every)
    fields = sel.write_scores(sub, graph, tmp_path, "attribution", None)
    assert fields["score_file"] == f"{layout.SCORES_DIR}/toy_attribution.npy"
    halves = {"available": True, "how": "prompt rows split 3 + 3, seeded"}

    def entry(stem, method, info):
        z = np.zeros(2)
        return stats.Entry(stem, method, "", 3, np.array([0, 5, 7]), {}, z, {}, np.zeros((0, 2)), info)

    new = {"method": "attribution", "subset": "a.npy", **fields,
           "halves": {**halves, "half_a": [5, 7, 0], "half_b": [5, 1, 0]}}
    causal = {"method": "degree", "weight": "direct_abs", "subset": "c.npy", **fields,
              "halves": {**halves, "half_a": [1, 2, 3], "half_b": None}}
    old = {"method": "activation_count", "subset": "o.npy"}
    entries = [entry("a", "attribution", new), entry("c", "degree_direct_abs", causal),
               entry("o", "activation_count", old)]
    scores = stats.recorded_scores(entries, tmp_path)
    assert list(scores) == [("attribution", "")] and np.array_equal(scores["attribution", ""], every, equal_nan=True)
    subsets = [pt.Subset(f"{e.stem}.npy", e.ids, info=e.info) for e in entries]
    assert pt.unrecorded(subsets) == ["o"]
    res = pt.Results({}, pd.DataFrame(), entries, np.zeros(0), stats.split_prompts(2, 0), 0)
    pt.add_selection_overlap(res, subsets)
    assert [e.info["selection_jaccard"] for e in entries][0] == pytest.approx(2 / 4)
    assert all(np.isnan(e.info["selection_jaccard"]) for e in entries[1:])
    assert res.halves == {"available": True, "halves": halves["how"]}
    pt.add_selection_overlap(res, subsets[2:])
    assert res.halves == {"available": False, "halves": stability.OLDER_SIDECARS}
    sel.write_scores(sel.Subset(sub.ids, sub.scores, 3, None, {}, every + 1), graph, tmp_path, "attribution", None)
    with pytest.raises(PipelineError, match="rewritten since"):
        stats.recorded_scores(entries, tmp_path)
