"""
Stage e's statistics and the method comparison: bootstrap CIs and percentiles against exact enumeration and
hand-made cases, the verdict on constructed cases whose answer is known, and --eval_csv end to end.
"""

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from gelutrace import comparison as cmp
from gelutrace import stagefiles as sf


def test_percentile_by_hand():
    assert cmp.percentile(5.0, [1, 2, 3, 4]) == 100
    assert cmp.percentile(0.0, [1, 2, 3, 4]) == 0
    assert cmp.percentile(2.5, [1, 2, 3, 4]) == 50
    assert cmp.percentile(2.0, [1, 2, 3, 4]) == 37.5  # a tie counts half
    assert np.isnan(cmp.percentile(1.0, []))


def test_guarded_ratio():
    assert cmp.guarded_ratio(6.0, [2.0, 2.1, 1.9]) == pytest.approx(3.0)
    assert np.isnan(cmp.guarded_ratio(6.0, [-0.01, 0.02, 0.005]))  # mean within noise of 0
    assert np.isnan(cmp.guarded_ratio(6.0, [-1.0, -2.0]))  # negative denominator
    assert np.isnan(cmp.guarded_ratio(6.0, [2.0]))  # one control: no error bar, no ratio


def test_bootstrap_ci_against_exact_enumeration():
    """3 prompts with 1, 2 and 3 samples: the CI equals the quantiles of all 27 equally likely resamples."""
    per_sample = np.array([0.0, 1.0, 3.0, 2.0, 2.0, 8.0])
    prompt = np.array([0, 1, 1, 2, 2, 2])
    sums, counts = cmp.prompt_sums(per_sample, prompt, 3)
    assert sums.tolist() == [0.0, 4.0, 12.0] and counts.tolist() == [1, 2, 3]
    exact = [sum(sums[list(c)]) / sum(counts[list(c)]) for c in itertools.product(range(3), repeat=3)]
    w = cmp.bootstrap_weights(3, seed=1, n_boot=40000)
    assert (w.sum(axis=1) == 3).all()
    lo, hi = cmp.bootstrap_ci(w, sums, counts)
    # the 2.5 % and 97.5 % points of the exact distribution (27 atoms) bracket the estimates
    atoms = np.sort(exact)
    assert atoms[0] <= lo <= atoms[1] and atoms[-2] <= hi <= atoms[-1]
    # constant per-prompt means: the CI collapses to that value
    assert cmp.bootstrap_ci(w, np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0])) == (2.0, 2.0)
    # seeded: the same draws again
    np.testing.assert_array_equal(cmp.bootstrap_weights(3, 1, 10), cmp.bootstrap_weights(3, 1, 10))


def entry(method, k, per_prompt, variant="", ids=None, controls=(0.0, 0.01)):
    per_prompt = np.asarray(per_prompt, np.float64)
    counts = np.ones(len(per_prompt))
    ids = np.arange(k) if ids is None else np.asarray(ids)
    return cmp.Entry(f"{method}{variant}_{k}", method, variant, k, ids, {"delta_nll": per_prompt, "kl": per_prompt},
                     counts, {"delta_nll": per_prompt.mean(), "kl": per_prompt.mean(), "token_agreement": 0.5},
                     {"delta_nll": list(controls), "kl": list(controls)})


def test_verdict_on_constructed_cases():
    rng = np.random.default_rng(0)
    n = 40
    noise = lambda s: rng.normal(0, s, n)  # noqa: E731
    w = cmp.bootstrap_weights(n, 3)
    # k = 10: attribution is far ahead; the graph method matches activation_count
    # k = 50: the graph method is far ahead of both baselines
    shared = 0.05 + noise(0.02)
    entries = [entry("attribution", 10, 1.0 + noise(0.05)), entry("activation_count", 10, shared),
               entry("degree", 10, shared + noise(0.001), "t=0.5"), entry("degree", 10, shared - 0.2, "t=0.8"),
               entry("random", 10, noise(0.01)),
               entry("degree", 50, 2.0 + noise(0.05), "t=0.8"), entry("activation_count", 50, 0.3 + noise(0.05)),
               entry("attribution", 50, 0.5 + noise(0.05))]
    v = cmp.verdict_table(entries, w).set_index("k")
    assert v.loc[10, "winner"] == "attribution" and v.loc[10, "margin_ci_low"] > 0
    assert v.loc[10, "graph_best"] == "degree (t=0.5)"  # the best threshold stands for the graph
    assert v.loc[10, "graph_vs_activation_count_verdict"] == "is indistinguishable from"
    assert v.loc[10, "graph_vs_attribution_verdict"] == "loses to"
    assert v.loc[10, "ranking"].split(" > ")[0] == "attribution" and v.loc[10, "ranking"].endswith("random")
    assert v.loc[50, "winner"] == "degree (t=0.8)"
    assert v.loc[50, "graph_vs_activation_count_verdict"] == "beats" == v.loc[50, "graph_vs_attribution_verdict"]
    text = "\n".join(cmp.verdict_lines(v.reset_index(), 1000))
    assert "k = 10 (1.0 % of neurons): **attribution**" in text and "loses to attribution" in text
    assert "**degree (t=0.8)**" in text


def test_overlap_and_agreement_by_hand():
    a = entry("attribution", 4, [1.0, 1.0], ids=[0, 1, 2, 3])
    b = entry("activation_count", 4, [0.5, 0.5], ids=[2, 3, 4, 5])
    ov = cmp.overlap_table([a, b])
    assert ov["jaccard"].tolist() == [2 / 6]
    effects = np.array([0.9, 0.1, 0.8, np.nan, 0.7, 0.0])  # neuron 3 not measured
    scores = {("attribution", ""): np.array([5.0, 1.0, 4.0, 0.0, 3.0, 0.0])}
    ag = cmp.agreement_table([a, b], effects, scores).set_index("method")
    assert ag.loc["attribution", "spearman"] == pytest.approx(1.0)  # same order over the measured neurons
    assert np.isnan(ag.loc["activation_count", "spearman"])  # no scores given
    # true top 4 over measured neurons: 0, 2, 4, 1
    assert ag.loc["attribution", "top_k_recall"] == 3 / 4 and ag.loc["activation_count", "top_k_recall"] == 2 / 4
