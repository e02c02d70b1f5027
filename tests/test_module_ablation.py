"""
Modules ablated as units (stage d --modules, stage e): the module written as a subset holds exactly the module's
neurons; its ablation equals stage e on the same neurons as a plain subset; it stays out of the method
comparison; effect-weighted controls are drawn with the stated probabilities (seeded chi-square tests against
the brute-force probabilities of successive sampling); the per-token and context tables against independent
computations (stage e's next-token breakdown; transformers' own GPT-2 with a hook on its activation); and the
Python API (gelutrace.api) against the stage scripts' files from the same inputs.
"""

import itertools
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chisquare

from gelutrace.evaluate import ablation as pt
from gelutrace.evaluate import moduleeffects as me
from gelutrace.files import layout

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, run_python

M = SHIPPED_NAME
EVAL_TEXT = REPO_ROOT / "parcellation_datasets" / f"heldout_eval_{M}.txt"
EVAL_CSV = REPO_ROOT / "parcellation_datasets" / f"heldout_{M}.csv"


def run(*args, ok=True):
    r = run_python([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


# --- effect-weighted controls ------------------------------------------------------------------------------------
def test_weighted_controls_one_per_layer_follow_the_weights():
    n_layer, d = 2, 6
    w = np.array([[3.0, 1.0, 0.0, -2.0, 2.0, np.nan], [1.0, 1.0, 1.0, 1.0, 4.0, 0.5]])
    ids = np.array([2, d + 5])  # one neuron in each layer
    draws = np.array([pt.weighted_control(ids, w.ravel(), n_layer, d, 7, j) for j in range(4000)])
    assert draws.shape == (4000, 2) and (draws[:, 0] < d).all() and (draws[:, 1] >= d).all()
    for layer in range(n_layer):
        p = np.nan_to_num(np.maximum(w[layer], 0))
        p = p / p.sum()
        seen = np.bincount(draws[:, layer] - layer * d, minlength=d)
        assert (seen[p == 0] == 0).all()  # weight <= 0 or NaN: never drawn while others can be
        assert chisquare(seen[p > 0], 4000 * p[p > 0]).pvalue > 1e-3
    again = pt.weighted_control(ids, w.ravel(), n_layer, d, 7, 3)
    assert np.array_equal(again, draws[3])  # seeded by (seed, ids, index)


def test_weighted_controls_of_two_follow_successive_sampling():
    d = 5
    w = np.array([5.0, 3.0, 1.0, 1.0, 0.5])
    p = w / w.sum()
    ids = np.array([0, 1])
    n = 6000
    draws = [tuple(pt.weighted_control(ids, w, 1, d, 11, j)) for j in range(n)]
    pairs = list(itertools.combinations(range(d), 2))
    # P({a, b}) of two successive draws without replacement, each proportional to the weights left
    expected = np.array([p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b]) for a, b in pairs])
    assert expected.sum() == pytest.approx(1.0)
    seen = np.array([draws.count(pr) for pr in pairs])
    assert seen.sum() == n and chisquare(seen, n * expected).pvalue > 1e-3


def test_weighted_controls_fill_uniformly_when_too_few_neurons_weigh():
    d = 8
    w = np.array([2.0, 0, 0, 1.0, 0, 0, 0, 0])
    ids = np.arange(4)
    draws = np.array([pt.weighted_control(ids, w, 1, d, 0, j) for j in range(3000)])
    assert np.isin([0, 3], draws).all(axis=None) and all({0, 3} <= set(r) for r in draws)
    rest = np.bincount(draws.ravel(), minlength=d)[[1, 2, 4, 5, 6, 7]]
    assert chisquare(rest).pvalue > 1e-3  # the other two picks uniform over the zero-weight neurons


# --- stage d and e on the shipped model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ablated(tmp_path_factory, shipped_path):
    d = tmp_path_factory.mktemp("modules")
    run("b_generate_activation_dataset.py", "--input_text", HELDOUT_PATH, "--export_dir", d, "--model_type", M,
        "--max_tokens", 1500, "--context", 128, "--device", "cpu", "--attribution")
    run("c_find_modules.py", "--input_path", layout.path(d, layout.WEIGHTED_GRAPH, M), "--null_graphs", 3, "--seeds", 2)
    modules = d / layout.MODULES_DIR / layout.MODULES.format(m=M, weight="count")
    subsets = d / layout.SUBSETS_DIR
    run("d_calculate_perturbation_subset.py", "--modules", modules, "--modules_top", 2, "--output_dir", subsets)
    run("d_calculate_perturbation_subset.py", "--input_graph_path", layout.path(d, layout.WEIGHTED_GRAPH, M), "--method",
        "attribution", "--k", 10, "--output_dir", subsets)
    # the smaller module again as a plain subset: the same neurons without the module's sidecar
    small = sorted(subsets.glob(f"{M}_module*_count.npy"))[1]
    (subsets / "plain.npy").write_bytes(small.read_bytes())
    names = ["none", f"{M}_attribution_k10.npy", *(p.name for p in sorted(subsets.glob("*_module*.npy"))), "plain.npy"]
    eval_csv = d / "eval.csv"  # 4 of the held-out prompts: what is compared here holds on any prompts
    pd.read_csv(EVAL_CSV, keep_default_na=False)[:4].to_csv(eval_csv, index=False)
    run("e_generate_perturbed_results.py", "--dataset_path", d, "--eval_csv", eval_csv, "--eval_text", EVAL_TEXT,
        "--eval_tokens", 600, "--context", 128, "--model_type", M, "--device", "cpu", "--random_controls", 4,
        "--perturbation_subset_filenames", *names)
    return d, modules, small


def test_module_subsets_hold_the_modules_neurons(ablated):
    d, modules, _ = ablated
    table = pd.read_csv(modules)
    for k in (0, 1):
        npy = d / layout.SUBSETS_DIR / layout.SUBSET_FILE_MODULE.format(m=M, module=k, weight="count")
        ids = np.load(npy)
        assert np.array_equal(ids, np.sort(table.loc[table["module"] == k, "node_id"].to_numpy()))
        side = json.loads(npy.with_suffix(".json").read_text())
        assert side["method"] == "module" and side["module"] == k and side["k"] == len(ids)
        assert sum(side["per_layer_counts"].values()) == len(ids)
    assert not (d / layout.SUBSETS_DIR / layout.SUBSET_FILE_MODULE.format(m=M, module=2, weight="count")).exists()


def test_module_ablation_equals_the_same_neurons_as_a_subset(ablated):
    d, _, small = ablated
    s = pd.read_csv(d / layout.RESULTS_DIR / layout.PERTURBATION_SUMMARY).set_index("subset")
    # the same neurons ablated in another block of rows of a batched pass: equal up to float32 rounding, which
    # depends on where in the batch a row is
    for col in ("kl", "delta_nll", "token_agreement", "text_delta_nll", "text_kl"):
        assert s.loc[small.name, col] == pytest.approx(s.loc["plain.npy", col], rel=1e-6, abs=1e-12)
    comparison = pd.read_csv(d / layout.RESULTS_DIR / layout.COMPARISON)
    assert not comparison["subset"].str.contains("module").any()  # a module is not a selection method
    # the module has both nulls, the plain subset only the layer-matched one
    assert s.loc[small.name, "text_delta_nll_weighted_n"] == 4 and np.isnan(s.loc["plain.npy", "text_delta_nll_weighted_n"])


def test_module_effects_table_and_holm(ablated):
    d, _, _ = ablated
    s = pd.read_csv(d / layout.RESULTS_DIR / layout.PERTURBATION_SUMMARY).set_index("subset")
    eff = pd.read_csv(d / layout.RESULTS_DIR / layout.MODULE_EFFECTS)
    assert list(eff.columns) == layout.MODULE_EFFECTS_COLUMNS and list(eff["module"]) == [0, 1]
    for _, r in eff.iterrows():
        row = s.loc[r["subset"] + ".npy"]
        assert r["delta_nll"] == pytest.approx(row["text_delta_nll"])
        assert r["p_random"] == pytest.approx(row["text_delta_nll_p_random"])
        assert r["p_weighted"] == pytest.approx(row["text_delta_nll_p_weighted"])
        assert r["control_weights"] == "attribution"
    for name in ("p_random", "p_weighted"):  # Holm by hand: sorted, times (m - rank), running max, capped at 1
        p = np.array([s.loc[x + ".npy", f"text_delta_nll_{name}_normal"] for x in eff["subset"]])
        order = np.argsort(p)
        adj = np.minimum(1, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
        want = np.empty_like(adj)
        want[order] = adj
        assert np.allclose(eff[f"{name}_holm"], want)


def test_per_token_delta_nll_agrees_with_the_breakdown_and_the_units(ablated, shipped):
    """The next-token accumulation against two other paths of the same pass: the breakdown's most frequent next
    tokens, and the per-unit sums (every scored token once)."""
    from gelutrace.evaluate import realtext

    d, _, small = ablated
    text = realtext.read_eval_text([str(EVAL_TEXT)], shipped.tokenizer, 128, shipped.model.config.vocab_size, 600)
    group = np.load(small)
    base, (m,) = realtext.evaluate(shipped.model, text, [group], None, 8, by_token=[0])
    top = text.top_tokens
    NP = len(realtext.POSITION_BUCKETS)
    assert np.array_equal(base.token_tokens[top], base.bucket_tokens[NP:])
    assert np.allclose(m.token_delta_nll[top], m.bucket_delta_nll[NP:], rtol=1e-9, atol=1e-12)
    assert np.allclose(base.token_nll[top], base.bucket_nll[NP:], rtol=1e-9)
    assert base.token_tokens.sum() == text.scored
    assert m.token_delta_nll.sum() == pytest.approx(m.delta_nll.sum(), rel=1e-9)
    # the file: the largest mean delta_nll of the tokens scored often enough, in order
    tokens = pd.read_csv(d / layout.RESULTS_DIR / layout.MODULE_TOKENS, keep_default_na=False)
    part = tokens[tokens["subset"] == small.stem]
    ok = base.token_tokens >= me.MIN_TOKEN_COUNT
    mean = np.where(ok, m.token_delta_nll / np.maximum(base.token_tokens, 1), -np.inf)
    want = np.lexsort((np.arange(len(mean)), -mean))[:min(me.TOP_TOKENS, int(ok.sum()))]
    assert list(part["token_id"]) == want.tolist()
    assert np.allclose(part["delta_nll"], mean[want], rtol=1e-6)


def test_module_contexts_against_transformers(ablated, shipped, shipped_hf):
    from gelutrace.evaluate import realtext

    d, _, _ = ablated
    ctx = pd.read_csv(d / layout.RESULTS_DIR / layout.MODULE_CONTEXTS, keep_default_na=False)
    text = realtext.read_eval_text([str(EVAL_TEXT)], shipped.tokenizer, 128, shipped.model.config.vocab_size, 600)
    cfg = shipped.model.config
    acts = {}
    hooks = [blk.mlp.act.register_forward_hook(lambda mod, i, o, L=L: acts.__setitem__(L, o.detach()))
             for L, blk in enumerate(shipped_hf.transformer.h)]
    try:
        every = []
        for w in range(-(-len(text.ids) // 128)):
            x = torch.from_numpy(text.ids[w * 128:(w + 1) * 128])[None]
            with torch.no_grad():
                shipped_hf(x)
            every.append(torch.cat([acts[L][0] for L in range(cfg.n_layer)], -1).double().numpy())
    finally:
        for h in hooks:
            h.remove()
    values = np.concatenate(every)  # (positions, neurons): every post-GELU value of the text
    for subset, part in ctx.groupby("subset"):
        ids = np.load(d / layout.SUBSETS_DIR / f"{subset}.npy")
        mean = values[:, ids].mean(1)
        assert np.allclose(part["mean_activation"], mean[part["position"].to_numpy()], atol=1e-5)
        assert part["mean_activation"].iloc[0] == pytest.approx(mean.max(), abs=1e-5)
        assert np.allclose(np.sort(mean)[::-1][:me.TOP_CONTEXTS], part["mean_activation"], atol=1e-5)
        for _, r in part.iterrows():
            assert r["context"].endswith(f"[[{r['token']}]]")


def test_bad_module_requests_are_refused(ablated):
    d, modules, _ = ablated
    out = d / "other_subsets"
    for bad in (["--modules", modules, "--module", 99], ["--modules", modules],
                ["--modules", modules, "--modules_top", 0], ["--module", 1],
                ["--modules", d / "missing.csv", "--module", 0],
                ["--modules", modules, "--module", 0, "--k", 5]):
        r = run("d_calculate_perturbation_subset.py", *bad, "--output_dir", out, ok=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines[-1].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    # files that are not c_find_modules' own: a cut copy, a module 1.5, a record without model and sizes, another
    # model's modules written into this dataset; and the ranking's flags, which a module does not use
    table, record = pd.read_csv(modules), json.loads(modules.with_suffix(".json").read_text())
    edits = {"cut": (table.head(100), record), "fraction": (table.astype({"module": float}).assign(
        module=lambda t: t["module"].where(t.index != 1, 1.5)), record), "bare": (table, {}),
        "other": (table, {**record, "model": "gpt2"})}
    for name, (t, rec) in edits.items():
        t.to_csv(d / f"{name}.csv", index=False)
        (d / f"{name}.json").write_text(json.dumps(rec))
        r = run("d_calculate_perturbation_subset.py", "--modules", d / f"{name}.csv", "--module", 0, "--output_dir",
                d / layout.SUBSETS_DIR, ok=False)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:"), (name, r.stderr)
    assert "model 'gpt2'" in r.stderr
    r = run("d_calculate_perturbation_subset.py", "--modules", modules, "--module", 0, "--method", "pagerank",
            "--output_dir", out, ok=False)
    assert r.returncode == 2 and "without --method" in r.stderr
    assert not out.exists() and not list((d / layout.SUBSETS_DIR).glob("gpt2_*"))


# --- the Python API returns what the stage scripts write ------------------------------------------------------
def test_api_equals_the_stage_scripts(ablated, shipped, tmp_path):
    import gelutrace as gt

    d, _, _ = ablated
    ds = gt.record_corpus(shipped, str(HELDOUT_PATH), out_dir=tmp_path / "api", max_tokens=1500, context=128,
                          attribution=True)  # one path alone, as a list of one
    for name in (layout.FREQUENCY, layout.TOP_EXAMPLES):
        assert layout.path(ds.path, name, M).read_bytes() == layout.path(d, name, M).read_bytes()
    sub = gt.select(ds.graph(), method="attribution", k=10, dataset=ds)
    assert np.array_equal(sub.ids, np.load(d / layout.SUBSETS_DIR / f"{M}_attribution_k10.npy"))
    res = gt.ablate(shipped, sub, eval_text=[EVAL_TEXT], eval_tokens=600, context=128, random_controls=4)
    row = pd.read_csv(d / layout.RESULTS_DIR / layout.PERTURBATION_SUMMARY).set_index("subset").loc[f"{M}_attribution_k10.npy"]
    for col in ("text_delta_nll", "text_kl", "text_delta_nll_ci_low", "text_delta_nll_p_random",
                "text_delta_nll_random_mean"):
        assert res.summary[col] == pytest.approx(row[col], rel=1e-5)  # float32, other batch groupings
    html = gt.neuron_cards(shipped, ds, sub.ids[:2]).to_html(tmp_path / "n.html").read_text()
    assert f'id="neuron-{sub.ids[0]}"' in html and f'id="neuron-{sub.ids[1]}"' in html


def test_api_refuses_bad_calls_with_pipeline_errors(ablated, shipped):
    import gelutrace as gt

    d, _, _ = ablated
    ds = gt.Dataset(d, M)
    for call in (lambda: gt.ablate(shipped, ["a"], eval_text=EVAL_TEXT), lambda: gt.ablate(shipped, [1.5], EVAL_TEXT),
                 lambda: gt.ablate(shipped, [10 ** 8], eval_text=EVAL_TEXT), lambda: gt.neuron_cards(shipped, ds, []),
                 lambda: gt.neuron_cards(shipped, ds, [1], k=0), lambda: gt.select(None, method="degree", k=3),
                 lambda: gt.select(ds.graph(), method="nope", k=3), lambda: gt.load_model("no-such-model"),
                 lambda: gt.neuron_cards(shipped, ds, [1], k=2.5), lambda: gt.neuron_cards(shipped, ds, [1], k="3"),
                 lambda: gt.neuron_cards(shipped, ds, [-1]), lambda: gt.neuron_cards(shipped, ds, [10 ** 9]),
                 lambda: gt.record_corpus(shipped, [])):
        with pytest.raises(gt.PipelineError):
            call()
    with pytest.raises(gt.PipelineError, match="outside 0-3071"):
        gt.neuron_cards(shipped, ds, [3072])
    with pytest.raises(gt.PipelineError, match="at least one text"):
        gt.record_corpus(shipped, [])
