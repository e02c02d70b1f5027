"""
run_pipeline.sh end to end on the shipped model with a tiny prompt CSV: every contract file exists, the
files agree with each other, the report states the run, and a second run skips every stage.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from gelutrace.files import formats, layout
from gelutrace.report import cards as cd
from gelutrace.report import markdown
from gelutrace.report.verdict import ordinal

from conftest import REPO_ROOT, SHIPPED_NAME, run_python

pytestmark = pytest.mark.slow  # every test here runs run_pipeline.sh
M = SHIPPED_NAME
DEFAULT_METHODS = ("degree", "influence", "activation_count", "attribution", "direct_loss", "magnitude", "random")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, shipped_path):
    d = tmp_path_factory.mktemp("pipeline")
    csv = d / "prompts.csv"
    pd.DataFrame([("KING HENRY. Now, lords, ", 6, 2), ("And God said, ", 5, 3), ("O Romeo, ", 4, 1)],
                 columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    held = d / "heldout.csv"
    pd.DataFrame([("To be, or not ", 6, 1), ("ROMEO. I will ", 6, 1), ("Blessed are the ", 5, 1),
                  ("Now is the winter ", 4, 1)], columns=layout.PROMPT_COLUMNS).to_csv(held, index=False)
    data = d / "run"
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    # the original's ratios and the own-continuation metric, every subset with controls (real text: corpus test)
    cmd = [str(REPO_ROOT / "run_pipeline.sh"), "--thresholds", "0.3 0.8", "--ratios", "0.01 0.05",
           "--random_controls", "2", "--device", "cpu", "--effects", "0", "--eval_csv", str(held),
           "--eval_text", "none", "--control_subsets", "all", "--modules_top", "1", "--module_controls", "2",
           "--trace", "1", M, str(csv), str(data)]
    first = run_python(cmd, env=env)  # the driver in this process (test_bad_grid_and_flags...: run_pipeline.sh's own)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_python(cmd, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    return data, first.stdout, second.stdout


def test_contract_files_agree(pipeline):
    data, _, _ = pipeline
    meta = formats.read_graph_meta(data, M)
    n = meta["num_neurons"]
    ds = pd.read_csv(layout.path(data, layout.DATASET, M), keep_default_na=False)
    assert len(ds) == 6 * 2 + 5 * 3 + 4 * 1
    matrix, ids = formats.read_activation_matrix(layout.path(data, layout.MATRIX, M))
    assert matrix.shape == (len(ds), n)
    freq = pd.read_csv(layout.path(data, layout.FREQUENCY, M))
    assert (freq["activation_count"].to_numpy() == matrix.sum(axis=0)).all()
    assert len(pd.read_csv(layout.path(data, layout.ATTRIBUTES, M))) == n
    assert layout.path(data, layout.EDGES, M).stat().st_size == formats.canonical_edges_size(meta["n_layer"], meta["d_mlp"])
    assert len(json.loads(layout.path(data, layout.ACTIVATIONS_JSON, M).read_text())) == len(ds)

    store = data / layout.WEIGHTED_GRAPH.format(m=M)
    header = json.loads((store / layout.GRAPH_STORE_HEADER).read_text())
    assert header["num_samples"] == len(ds)
    assert header["direct"]["samples"] == len(ds)  # stage b's causal weights, folded in by stage c
    pair = np.load(store / layout.GRAPH_STORE_PAIR.format(src=0, tgt=1), mmap_mode="r", allow_pickle=False)
    d = meta["d_mlp"]
    a = matrix[:, :d].astype(np.int64)
    b = matrix[:, d:2 * d].astype(np.int64)
    assert (np.asarray(pair) == a.T @ b).all()  # exact co-activation counts

    sweep = pd.read_csv(data / layout.ANALYSIS_DIR / layout.THRESHOLD_CSV)
    assert list(sweep.columns) == layout.THRESHOLD_COLUMNS and len(sweep) == 10
    assert (sweep["num_nodes"] == n).all()

    subsets = sorted((data / layout.SUBSETS_DIR).glob("*.npy"))
    methods = {json.loads(p.with_suffix(".json").read_text())["method"] for p in subsets}
    assert methods == set(DEFAULT_METHODS) | {"module"}
    # degree at 2 thresholds and 2 weights (count, direct_abs); the rest ignore both; the largest module of each;
    # and, ranked without layer 0 (the default --exclude_layers 0), influence, activation_count and attribution
    assert len(subsets) == 2 * 2 * 2 + 2 * (len(DEFAULT_METHODS) - 1) + 2 + 2 * 3
    without = [p for p in subsets if "_x0_" in p.name]
    assert len(without) == 2 * 3 and all((np.load(p) >= meta["d_mlp"]).all() for p in without)
    assert {json.loads(p.with_suffix(".json").read_text())["weight"] for p in subsets} == {None, "count", "direct_abs"}
    summary = pd.read_csv(data / layout.RESULTS_DIR / layout.PERTURBATION_SUMMARY)
    assert set(summary["subset"]) == {"none"} | {p.name for p in subsets}
    for p in subsets:
        ids = np.load(p, allow_pickle=False)
        side = json.loads((p.parent / layout.SUBSET_SIDECAR.format(stem=p.stem)).read_text())
        ratio = side["ratio"]
        assert len(ids) == side["k"] == (max(1, int(n * ratio)) if side["method"] != "module" else len(ids))
        row = summary[summary["subset"] == p.name].iloc[0]
        assert row["k"] == len(ids)
        assert sum(row[f"layer_{i}_count"] for i in range(meta["n_layer"])) == len(ids)
        assert row["random_controls"] == 2
        result = pd.read_csv(data / layout.RESULTS_DIR / layout.RESULT_FILE.format(stem=p.stem), keep_default_na=False)
        assert list(result.columns) == layout.RESULT_COLUMNS and len(result) == 4  # the held-out prompts
    none = summary[summary["subset"] == "none"].iloc[0]
    assert none["kl"] == 0 and none["token_agreement"] == 1


def test_comparison_measured_on_held_out_prompts(pipeline):
    data, _, _ = pipeline
    results = data / layout.RESULTS_DIR
    ev = json.loads((results / layout.EVALUATION).read_text())
    assert ev["held_out"] and ev["eval_prompts"] == 4 and ev["selection_prompts"] == 3
    summary = pd.read_csv(results / layout.PERTURBATION_SUMMARY).set_index("subset")
    comp = pd.read_csv(results / layout.COMPARISON)
    apart = pd.read_csv(results / layout.COMPARISON_EXCLUDED)  # the subsets ranked without layer 0, compared apart
    assert len(comp) + len(apart) == len(summary) - 1 - 2  # every subset but none and the two modules
    assert apart["subset"].str.contains("_x0_").all() and not comp["subset"].str.contains("_x0_").any()
    record = json.loads((results / layout.COMPARISON_RECORD).read_text())
    assert not record["nested"] and record["test_prompts"] == list(range(4))  # 4 prompts: too few to split
    for r in comp.to_dict("records"):
        per = pd.read_csv(results / layout.PER_SAMPLE_DIR / f"{r['subset']}.csv")
        assert r["delta_nll"] == pytest.approx(per["delta_nll"].mean(), rel=1e-9) and r["k"] == summary.loc[
            r["subset"] + ".npy", "k"]
        assert r["delta_nll_ci_low"] <= r["delta_nll"] <= r["delta_nll_ci_high"]
        assert r["delta_nll_random_n"] == 2 and r["delta_nll_p_random"] in (1 / 3, 2 / 3, 1.0)
    verdict = pd.read_csv(results / layout.METHOD_VERDICT)
    assert sorted(verdict["k"]) == sorted(comp["k"].unique())
    for r in verdict.to_dict("records"):  # the winner: the largest per-sample mean among the methods' best variants
        at_k = comp[(comp["k"] == r["k"]) & comp["best"].astype(bool) & (comp["method"] != "random")]
        means = {row.subset: pd.read_csv(results / layout.PER_SAMPLE_DIR / f"{row.subset}.csv")["delta_nll"].mean()
                 for row in at_k.itertuples()}
        top = max(means, key=means.get)
        assert r["winner_delta_nll"] == pytest.approx(means[top], rel=1e-9)
        assert r["winner"].split(" (")[0] == at_k.set_index("subset").loc[top, "method"]
        assert "random" not in r["ranking"].split(" > ")
    overlap = pd.read_csv(results / layout.METHOD_OVERLAP)
    # 8 comparison methods (degree, degree_direct_abs, influence, activation_count, attribution, direct_loss,
    # magnitude, random): 28 pairs per k
    assert overlap["jaccard"].between(0, 1).all() and len(overlap) == 2 * 28


def test_report_and_summary(pipeline):
    data, out, second = pipeline
    report = (data / "report.md").read_text()
    for needle in ("## Parameters", "0.3 0.8", "0.01 0.05", "## Threshold sweep", "## Ablation effects",
                   "b_generate_activation_dataset.py", "31 samples from 3 prompts", "## Method comparison",
                   "measured on held-out prompts (heldout.csv, 4 prompts, none shared)"):
        assert needle in report
    assert report.index("## Verdict") < report.index("## Without layer 0") < report.index("## Method comparison")
    assert report.index("## Method comparison") < report.index("## Parameters") and "With layer 0 excluded" in report
    # the commands to rerun are the scripts each stage ran, not run_pipeline.sh's shell functions
    commands = report[report.index("Commands, in order"):report.index("## Dataset")].splitlines()[3:-2]
    assert [c.split()[1] for c in commands if c.startswith("python ")] == [
        "a_generate_gelu_graph.py", "b_generate_activation_dataset.py", "c_calculate_weighted_activation_graph.py",
        "c_measure_edge_fidelity.py", "c_analyze_weighted_activation_graph.py", "c_find_modules.py",
        "c_find_modules.py", "d_calculate_perturbation_subset.py", "d_calculate_perturbation_subset.py",
        "e_generate_perturbed_results.py", "f_render_neuron_cards.py", "b_trace_gelu_activations.py"]
    # the first evaluation prompt traced: its graph file, and its section in the report
    assert layout.path(data / layout.TRACES_DIR / "0", layout.TRACE_GRAPH, M).is_file()
    assert "## Per-prompt graphs" in report and "### To be, or not" in report and "faithfulness: Spearman" in report
    # the trace's page and the causal graph's page (the cards stage's --causal_graph 50), each linked from the report
    for page in (f"{layout.TRACES_DIR}/0/{layout.TRACE_PAGE.format(m=M)}",
                 f"{layout.CARDS_DIR}/{layout.CAUSAL_PAGE.format(m=M)}"):
        assert (data / page).is_file() and f"]({page})" in report
    assert report.index(f"]({layout.CARDS_DIR}/{layout.CAUSAL_PAGE.format(m=M)})") > report.index("## Causal graph")
    (sweep,) = [c for c in commands if not c.startswith("python ")]
    assert sweep.startswith("env THRESHOLDS=0.3\\ 0.8 RATIOS=0.01\\ 0.05 ")
    assert "./d_batch_perturbation_calculate.sh" in sweep
    # the run's settings in its words: zero ablation, 2 controls (too few for any claim), 4 prompts (no split)
    assert "outputs are set to 0 together" in report and "95 % bootstrap CI" in report
    assert "p-values are too coarse" in report and "above random" not in report
    assert "biased toward the variants chosen" in report
    verdict = pd.read_csv(data / layout.RESULTS_DIR / layout.METHOD_VERDICT)
    for r in verdict.to_dict("records"):  # no claim of influence for neurons whose ablation does not raise the loss
        claim = (f"**{markdown.escape(r['winner'])}** found the most influential neurons, ΔNLL "
                 f"{r['winner_delta_nll']:.3g} nats/token")
        modest = (f"**no method's neurons raise the loss** distinguishably from 0; the largest effect, "
                  f"{markdown.escape(r['winner'])}'s, is ΔNLL {r['winner_delta_nll']:.3g} nats/token")
        assert (claim in report) == (r["winner_ci_low"] > 0) and (modest in report) == (r["winner_ci_low"] <= 0)
    for name in ("activation_frequency_per_layer.png", f"{layout.ANALYSIS_DIR}/{layout.THRESHOLD_PLOT}",
                 f"{layout.RESULTS_DIR}/{layout.PERTURBATION_PLOT}"):
        assert f"]({name})" in report and (data / name).is_file()
    comp = pd.read_csv(data / layout.RESULTS_DIR / layout.COMPARISON)
    assert "31 samples from 3 prompts" in out and "percentile of random neurons of the same layers" in out
    assert "verdict:" in out
    ordinals = re.findall(r"(\d+)(st|nd|rd|th) percentile", out)
    assert ordinals and all(n + suffix == ordinal(int(n)) for n, suffix in ordinals)
    assert second.count("up to date") == 10  # nothing reran (a, b, c, fidelity, c_analyze, modules, d, e, cards, trace)
    assert report.index("## Method comparison") < report.index("## Neuron cards") < report.index("## Parameters")
    assert f"]({layout.CARDS_DIR}/{layout.CARDS_HTML})" in report and (data / layout.CARDS_DIR / layout.CARDS_HTML).is_file()
    # the modules of both weights, the largest of each ablated (own continuations: no eval text), its card
    modules = report[report.index("## Modules"):report.index("## Own-continuation") if "## Own-continuation" in report
                     else report.index("## Neuron cards")]
    for w in ("count", "direct_abs"):
        rec = json.loads((data / layout.MODULES_DIR / layout.MODULES_RECORD.format(m=M, weight=w)).read_text())
        assert f"**{w.replace('_', chr(92) + '_')} graph.**" in modules and f"Q = {rec['modularity']:.3f}" in modules
        assert f"![modules by layer]({layout.MODULES_DIR}/{layout.MODULES_LAYER_PLOT.format(m=M, weight=w)})" in modules
        assert f"### Module 0 of the {w.replace('_', chr(92) + '_')} graph" in modules
    eff = pd.read_csv(data / layout.RESULTS_DIR / layout.MODULE_EFFECTS)
    assert sorted(eff["weight"]) == ["count", "direct_abs"] and (eff["metric"] == "continuation").all()
    assert not comp["subset"].str.contains("_module").any()
    html = (data / layout.CARDS_DIR / layout.CARDS_HTML).read_text()
    table = pd.read_csv(data / layout.MODULES_DIR / layout.MODULES.format(m=M, weight="count")).set_index("node_id")
    for n in [int(x) for x in re.findall(r'<div class="card" id="neuron-(\d+)"', html)][:5]:
        colour = cd.module_colour(int(table.loc[n, "module"]))
        assert f'id="neuron-{n}" style="border-left: 6px solid {colour}"' in html
    best = comp[comp["best"].astype(bool) & (comp["method"] != "random") & (comp["k"] == comp["k"].min())]
    for stem in best["subset"]:  # each method's best subset at the smallest k has its cards
        for n in np.load(data / layout.SUBSETS_DIR / f"{stem}.npy")[:20]:
            assert f"### Neuron {n} (layer" in report


def test_rerun_after_a_csv_change_force_and_a_failing_stage(pipeline, tmp_path):
    """(Last in this file: it changes the pipeline's directory.)"""
    data, _, _ = pipeline
    copy = data
    csv = data.parent / "prompts.csv"  # the same CSV file, edited
    pd.DataFrame([("KING HENRY. Now, lords, ", 6, 2), ("And God said, ", 5, 3), ("O Romeo, ", 3, 1)],
                 columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    held = data.parent / "heldout.csv"
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    # a lighter run than the fixture's (the stages' commands change, but a's does not; no traces): what reruns is
    # the point
    base = [str(REPO_ROOT / "run_pipeline.sh"), "--thresholds", "0.8", "--ratios", "0.01", "--direct_edges", "0",
            "--methods", "degree random", "--random_controls", "2", "--device", "cpu", "--effects", "0",
            "--eval_csv", str(held), "--eval_text", "none", "--control_subsets", "all", "--modules_top", "0",
            "--trace", "0"]
    r = run_python(base + [M, str(csv), str(copy)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(ln.startswith("== a: up to date") for ln in lines)
    for stage in ("b", "c", "c_analyze", "d", "e", "cards"):  # the prompts changed: b and everything after it reran
        assert f"== {stage}" in lines, stage
    ds = pd.read_csv(layout.path(copy, layout.DATASET, M), keep_default_na=False)
    assert len(ds) == 6 * 2 + 5 * 3 + 3
    # one method fewer: stage d reruns (its settings are in its stamp) and leaves no subset of the other behind
    r = run_python(base + ["--methods", "degree", M, str(csv), str(copy)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert "== d" in lines and any(ln.startswith("== c_analyze: up to date") for ln in lines)
    methods = {json.loads(p.read_text())["method"] for p in (copy / layout.SUBSETS_DIR).glob("*.json")}
    assert methods == {"degree"}
    r = run_python(base + ["--force", "--methods", "degree no_such_method", M, str(csv), str(copy)], env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no_such_method" in r.stderr  # before any stage
    assert "==" not in r.stdout and {json.loads(p.read_text())["method"] for p in
                                     (copy / layout.SUBSETS_DIR).glob("*.json")} == {"degree"}
    ks = [("--ks" if a == "--ratios" else "100000" if a == "0.01" else a) for a in base]  # past the model's neurons
    r = run_python(ks + ["--force", M, str(csv), str(copy)], env=env)
    assert r.returncode != 0  # the grid fails after stage a (the model's neurons), and so does the pipeline
    lines = r.stdout.splitlines()
    assert "== a" in lines and "== b" not in lines  # --force reran from the start


def test_bad_grid_and_flags_fail_before_any_stage(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    for i, flags in enumerate((["--ks", "abc"], ["--ks", "3 101%"], ["--effect_tokens", "0"], ["--effect_tokens", "x"],
                               ["--fidelity_tokens", "0"], ["--text_field", ""], ["--eval_text_field", ""],
                               ["--seed", ""], ["--control_subsets", "bogus"], ["--random_controls", "-1"],
                               ["--ks", "30", "--ratios", "0.01"])):
        run = subprocess.run if i == 0 else run_python  # the script's own process once, then its driver here
        r = run([str(REPO_ROOT / "run_pipeline.sh"), *flags, M, str(REPO_ROOT / "parcellation_datasets" /
                 "test_1.csv"), str(tmp_path / "run")], capture_output=True, text=True, env=env)
        assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, (flags, r.stderr)
        assert not (tmp_path / "run").exists(), flags
