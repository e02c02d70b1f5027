"""
Stage e's statistics and the method comparison: p-values, z-scores, Holm and t-intervals against direct
numpy/scipy computations written here, bootstrap CIs against exact enumeration, the prompt split, and the
verdict on constructed cases whose answer is known (an additive world of per-neuron effects).
"""

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from gelutrace.evaluate import ablation as pt
from gelutrace.evaluate import statistics as stats
from gelutrace.report import verdict


def test_percentile_and_ordinals_by_hand():
    assert stats.percentile(5.0, [1, 2, 3, 4]) == 100
    assert stats.percentile(2.0, [1, 2, 3, 4]) == 37.5  # a tie counts half
    assert np.isnan(stats.percentile(1.0, []))
    assert [verdict.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 33, 100, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "33rd", "100th", "101st", "111th"]


def reference_null(value, controls):
    """The null statistics written out directly, one control at a time."""
    c = [x for x in controls if not np.isnan(x)]
    n = len(c)
    at_least = sum(1 for x in c if x >= value)
    mean = sum(c) / n
    sd = (sum((x - mean) ** 2 for x in c) / (n - 1)) ** 0.5
    z = (value - mean) / sd
    return {"p_random": (1 + at_least) / (1 + n), "z_random": z, "p_random_normal": 1 - scipy_stats.norm.cdf(z),
            "random_mean": mean, "random_std": sd, "random_n": n}


@pytest.mark.parametrize("case", ["plain", "ties", "nan", "few"])
def test_null_test_against_direct_computation(case):
    rng = np.random.default_rng(7)
    controls = rng.normal(1.0, 0.3, 30)
    value = 1.4
    if case == "ties":
        controls[:5] = value  # a control equal to the value counts against it
    if case == "nan":
        controls[[3, 9, 20]] = np.nan
    if case == "few":
        controls = controls[:7]
    got, want = stats.null_test(value, controls), reference_null(value, controls)
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-9), key
    clean = controls[~np.isnan(controls)]
    assert got["random_q05"] == pytest.approx(np.quantile(clean, 0.05))
    assert got["random_q95"] == pytest.approx(np.quantile(clean, 0.95))
    assert got["p_random"] >= 1 / (len(clean) + 1)
    if case == "ties":
        assert got["p_random"] == pytest.approx((1 + 5 + (controls[5:] >= value).sum()) / 31)


def test_null_test_edge_cases():
    assert np.isnan(stats.null_test(1.0, [])["p_random"]) and stats.null_test(1.0, [np.nan])["random_n"] == 0
    const = stats.null_test(2.0, [1.0, 1.0, 1.0])
    assert const["z_random"] == np.inf and const["p_random_normal"] == 0.0 and const["p_random"] == 0.25
    assert np.isnan(stats.null_test(1.0, [1.0, 1.0])["z_random"])


def reference_holm(p):
    """Holm's step-down procedure as textbooks write it: sort, multiply by m - i, running maximum, cap at 1."""
    idx = [i for i, x in enumerate(p) if not np.isnan(x)]
    idx.sort(key=lambda i: p[i])
    m, out, running = len(idx), [np.nan] * len(p), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_holm_against_the_textbook_procedure():
    rng = np.random.default_rng(3)
    for _ in range(50):
        p = rng.uniform(0, 0.2, rng.integers(1, 12))
        p[rng.random(len(p)) < 0.2] = np.nan
        if rng.random() < 0.3 and len(p) > 2:
            p[1] = p[0]  # ties
        np.testing.assert_allclose(stats.holm(p), reference_holm(list(p)), rtol=1e-12)
    assert stats.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])


def test_t_ratio_uses_the_t_interval():
    c = np.array([0.9, 1.1, 1.0, 1.2, 0.8])
    half = scipy_stats.t.ppf(0.975, 4) * c.std(ddof=1) / np.sqrt(5)
    assert c.mean() - half > 0
    assert stats.t_ratio(3.0, c) == pytest.approx(3.0 / c.mean())
    # 2 standard errors would call this mean positive; the t-interval with 2 degrees of freedom does not
    c = np.array([0.2, 1.0, 1.9])
    se = c.std(ddof=1) / np.sqrt(3)
    assert c.mean() - 2 * se > 0 > c.mean() - scipy_stats.t.ppf(0.975, 2) * se
    assert np.isnan(stats.t_ratio(3.0, c)) and np.isnan(stats.t_ratio(3.0, [2.0]))


def test_bootstrap_ci_against_exact_enumeration():
    """3 prompts with 1, 2 and 3 samples: the CI equals the quantiles of all 27 equally likely resamples."""
    per_sample = np.array([0.0, 1.0, 3.0, 2.0, 2.0, 8.0])
    prompt = np.array([0, 1, 1, 2, 2, 2])
    sums, counts = stats.prompt_sums(per_sample, prompt, 3)
    assert sums.tolist() == [0.0, 4.0, 12.0] and counts.tolist() == [1, 2, 3]
    exact = [sum(sums[list(c)]) / sum(counts[list(c)]) for c in itertools.product(range(3), repeat=3)]
    w = stats.bootstrap_weights(3, seed=1, n_boot=40000)
    assert (w.sum(axis=1) == 3).all()
    lo, hi = stats.bootstrap_ci(w, sums, counts)
    atoms = np.sort(exact)
    assert atoms[0] <= lo <= atoms[1] and atoms[-2] <= hi <= atoms[-1]
    assert stats.bootstrap_ci(w, np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0])) == (2.0, 2.0)
    # each prompt is drawn once per replicate on average (binomial: 3 * 40000 draws, p = 1/3)
    np.testing.assert_allclose(w.mean(axis=0), 1.0, atol=5 * np.sqrt(2 / 3 / 40000) * 3)


def test_split_is_seeded_disjoint_and_complete():
    s = stats.split_prompts(44, seed=5, share=0.5)
    assert s.nested and len(s.validation) == 22 and len(s.test) == 22
    assert not set(s.validation) & set(s.test) and sorted(set(s.validation) | set(s.test)) == list(range(44))
    again = stats.split_prompts(44, seed=5, share=0.5)
    assert s.validation.tolist() == again.validation.tolist()
    assert s.validation.tolist() != stats.split_prompts(44, seed=6, share=0.5).validation.tolist()
    assert len(stats.split_prompts(44, 5, 0.25).validation) == 11
    few = stats.split_prompts(9, 5)
    assert not few.nested and few.validation.tolist() == few.test.tolist() == list(range(9))


def test_control_part_is_a_seeded_share_of_the_test_part():
    whole = stats.split_prompts(32, seed=5)
    assert whole.control is None and whole.control_units.tolist() == whole.test.tolist()  # the default: all of it
    s = stats.split_prompts(32, seed=5, control_share=0.5)
    assert s.validation.tolist() == whole.validation.tolist() and s.test.tolist() == whole.test.tolist()
    assert len(s.control) == 8 and set(s.control) <= set(s.test) and s.control.tolist() == sorted(s.control)
    assert s.control.tolist() == stats.split_prompts(32, seed=5, control_share=0.5).control.tolist()
    assert s.control.tolist() != stats.split_prompts(32, seed=6, control_share=0.5).control.tolist()
    assert s.record(unit="windows")["control_windows"] == s.control.tolist()
    # fewer than MIN_CONTROL_UNITS units in the share: the controls take the whole test part
    small = stats.split_prompts(12, seed=5, control_share=0.5)
    assert len(small.test) * 0.5 < stats.MIN_CONTROL_UNITS and small.control_units.tolist() == small.test.tolist()


def test_the_report_says_where_the_controls_were_scored():
    from gelutrace.report.report import settings_sentence

    for share, said in ((0.5, True), (1.0, False)):
        record = {"metric": "real_text", "random_controls": 30,
                  **stats.split_prompts(32, seed=1, control_share=share).record(unit="windows")}
        text = settings_sentence({"ablation": "zero"}, record)
        assert ("The controls are scored on 8 of the test part's 16 windows (seeded, `--control_share 0.5`" in text) == said
        assert "on 16 windows" not in text and "measured on the other 16, which chose nothing" in text


def test_subset_is_judged_against_its_controls_on_the_units_they_were_scored_on():
    """Controls scored on part of the test units (zero tokens elsewhere): p and z compare the subset's mean over
    those units with the controls' means there (numpy by hand), while its effect and CI stay on all test units."""
    rng = np.random.default_rng(3)
    n, n_ctl = 32, 30
    split = stats.split_prompts(n, seed=2, control_share=0.5)
    tokens = rng.integers(200, 260, n).astype(float)
    sums = {"delta_nll": rng.normal(0.05, 0.02, n) * tokens, "kl": rng.normal(0.04, 0.01, n) * tokens,
            "token_agreement": np.full(n, np.nan)}
    on = np.isin(np.arange(n), split.control)
    c_counts = np.where(on, tokens, 0.0)[None].repeat(n_ctl, 0)
    c_sums = {m: np.where(on, rng.normal(0.045, 0.01, (n_ctl, n)) * tokens, 0.0) for m in stats.METRICS}
    e = stats.Entry("s_k3", "influence", "", 3, np.arange(3), sums, tokens, c_sums, c_counts)
    row = stats.comparison_table([e], split, seed=1).iloc[0]
    part = split.control
    value = sums["delta_nll"][part].sum() / tokens[part].sum()
    controls = c_sums["delta_nll"][:, part].sum(1) / tokens[part].sum()
    want = reference_null(value, controls)
    for key in ("p_random", "z_random", "random_mean", "random_std", "random_n"):
        assert row[f"delta_nll_{key}"] == pytest.approx(want[key], rel=1e-9), key
    assert row["delta_nll"] == pytest.approx(sums["delta_nll"][split.test].sum() / tokens[split.test].sum())
    assert value != pytest.approx(row["delta_nll"])  # the two unit sets do differ here
    assert row["delta_nll_control_part"] == pytest.approx(value)


# --- an additive world: a subset's effect on a prompt is the sum of its neurons' effects there, plus noise ---
N_LAYER, D_MLP, N_PROMPTS = 4, 50, 40


class World:
    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.effect = rng.exponential(0.01, N_LAYER * D_MLP)  # per neuron
        self.effect[:D_MLP] = 0.002  # layer 0: every neuron alike
        self.prompt = rng.uniform(0.5, 1.5, N_PROMPTS)  # how much each prompt is moved
        self.rng = rng

    def per_prompt(self, ids):
        return self.effect[ids].sum() * self.prompt + self.rng.normal(0, 1e-4, N_PROMPTS)

    def entry(self, method, ids, variant="", n_controls=30, info=None):
        ids = np.sort(np.asarray(ids))
        ctl = [pt.random_control(ids, N_LAYER, D_MLP, 1, j) for j in range(n_controls)]
        sums = {m: self.per_prompt(ids) for m in stats.METRICS}
        sums["token_agreement"] = np.full(N_PROMPTS, 0.5)
        control = np.array([self.per_prompt(c) for c in ctl]).reshape(n_controls, N_PROMPTS)
        return stats.Entry(f"{method}_{variant}_{len(ids)}", method, variant, len(ids), ids, sums, np.ones(N_PROMPTS),
                         {m: control for m in stats.METRICS}, np.ones((n_controls, N_PROMPTS)), info or {})


def verdict_of(entries, n_prompts=N_PROMPTS):
    split = stats.split_prompts(n_prompts, 11)
    return stats.verdict_table(entries, split, 11).set_index("k"), stats.comparison_table(entries, split, 11)


def test_layer_zero_subset_is_not_distinguishable_and_top_effects_are_above_random():
    w = World()
    k = 10
    layer0 = np.arange(k)  # what an activation count that favours layer 0 would pick
    top = np.argsort(-w.effect)[:k]
    entries = [w.entry("activation_count", layer0), w.entry("ablation", top)]
    v, c = verdict_of(entries)
    row = c.set_index("method")
    assert row.loc["activation_count", "delta_nll_p_random"] > 0.05
    assert row.loc["ablation", "delta_nll_p_random"] == pytest.approx(1 / 31)
    assert row.loc["ablation", "delta_nll_p_random_holm"] < 0.05
    lines = "\n".join(verdict.verdict_lines(v.reset_index(), N_LAYER * D_MLP))
    assert "**ablation**" in lines and "above all 30 layer-matched controls (empirical p = 0.032, z = " in lines
    # alone, the layer-0 subset gets no claim above random
    v0, _ = verdict_of([w.entry("activation_count", layer0)])
    text = "\n".join(verdict.verdict_lines(v0.reset_index(), N_LAYER * D_MLP))
    assert "not distinguishable from random neurons of the same layers" in text and "above random" not in text


def test_headline_is_the_empirical_standing_never_the_normal_tail():
    """A Gaussian fitted to 30 controls cannot speak for p = 1.9e-268: the headline gives the empirical p, z and the
    empirical p Holm-adjusted; the normal approximation is written as a bound where it is quoted at all."""
    assert verdict.null_phrase(30, 1 / 31, 14.23, 8 / 31) == ("above all 30 layer-matched controls (empirical p = "
                                                              "0.032, z = 14.2; family-wise (Holm) p = 0.26)")
    # 6 of 30 controls at or above the value: p = 7/31
    assert verdict.null_phrase(30, 7 / 31, 0.9) == ("not distinguishable from random neurons of the same layers, "
                                                    "above 24 of 30 layer-matched controls (empirical p = 0.23, "
                                                    "z = 0.9)")
    # 200 controls, 3 at or above: above random, but not above all
    assert verdict.null_phrase(200, 4 / 201, 2.5).startswith("above random neurons of the same layers, above 197 of "
                                                             "200 layer-matched controls (empirical p = 0.02")
    assert verdict.null_phrase(5, 1 / 6, 3.0) == "" and verdict.null_phrase(30, np.nan, 3.0) == ""
    assert "normal approximation" not in verdict.null_phrase(30, 1 / 31, 14.23, 8 / 31)
    assert verdict.normal_p_text(1.9e-268) == " < 1e-06" and verdict.normal_p_text(0.004) == " = 0.004"


def hand_holm(p):
    """Holm's step-down adjustment written out: the i-th smallest p times (m - i), never below the one before."""
    p = list(p)
    m = len(p)
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p[j])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_empirical_holm_against_a_hand_computation_and_the_floor_sentence():
    w = World(6)
    order = np.argsort(-w.effect)
    entries = []
    for k in (4, 8, 12):
        entries += [w.entry("ablation", order[:k]), w.entry("activation_count", np.arange(k)),
                    w.entry("attribution", order[60:60 + k])]
    v, c = verdict_of(entries)
    family = c[c["best"].astype(bool) & (c["method"] != "random")]
    assert len(family) == 9
    want = hand_holm(family["delta_nll_p_random"].tolist())
    np.testing.assert_allclose(family["delta_nll_p_random_empirical_holm"].to_numpy(), want, rtol=1e-12)
    assert c.loc[~c.index.isin(family.index), "delta_nll_p_random_empirical_holm"].isna().all()
    # the normal approximation stays beside it, under its own name
    np.testing.assert_allclose(family["delta_nll_p_random_holm"].to_numpy(),
                               hand_holm(family["delta_nll_p_random_normal"].tolist()), rtol=1e-12)
    by_subset = c.set_index("subset")
    for k, r in v.iterrows():
        assert r["holm_comparisons"] == 9
        winner = family[(family["k"] == k) & (family["method"] == r["winner"])].iloc[0]
        assert r["winner_p_random_empirical_holm"] == by_subset.loc[winner["subset"], "delta_nll_p_random_empirical_holm"]
        assert r["winner_z_random"] == by_subset.loc[winner["subset"], "delta_nll_z_random"]
    # 9 comparisons, 30 controls: Holm cannot go below 9/31 > 0.05, which the verdict says in so many words
    lines = verdict.verdict_lines(v.reset_index(), N_LAYER * D_MLP)
    assert lines[-1] == ("- Family-wise: Holm's adjustment of the empirical p-values across the 9 comparison(s) with "
                         "controls cannot go below m/(N + 1) = 9/31 = 0.29; with 30 controls and 9 comparisons no "
                         "family-wise claim at 0.05 is possible; it needs N ≥ 179 controls (--random_controls 179).")


def test_holm_floor_of_the_demo_grid():
    """m = 8 k, N = 30 controls: the floor 8/31 = 0.26; a claim at 0.05 needs N + 1 >= 8 / 0.05, N >= 159."""
    assert verdict.controls_needed(8) == 159 and verdict.controls_needed(1) == 19
    rows = pd.DataFrame({"k": range(1, 9), "winner": "influence", "winner_delta_nll": 0.1, "winner_ci_low": 0.05,
                         "winner_ci_high": 0.15, "winner_random_n": 30, "winner_p_random": 1 / 31,
                         "winner_z_random": 9.0, "winner_p_random_empirical_holm": 8 / 31, "holm_comparisons": 8})
    line = verdict.familywise_line(rows)
    assert "cannot go below m/(N + 1) = 8/31 = 0.26" in line
    assert "with 30 controls and 8 comparisons no family-wise claim at 0.05 is possible; it needs N ≥ 159" in line
    text = "\n".join(verdict.verdict_lines(rows, 3072))
    assert text.count("above all 30 layer-matched controls (empirical p = 0.032, z = 9; family-wise (Holm) p = 0.26)") == 8
    enough = rows.assign(winner_random_n=159, winner_p_random=1 / 160, winner_p_random_empirical_holm=8 / 160)
    line = verdict.familywise_line(enough)
    assert "= 8/160 = 0.05" in line and "8 of the 8 winners stay below 0.05" not in line  # 0.05 is not below 0.05
    more = rows.assign(winner_random_n=199, winner_p_random=1 / 200, winner_p_random_empirical_holm=8 / 200)
    assert verdict.familywise_line(more).endswith("; 8 of the 8 winners stay below 0.05 after it.")
    assert verdict.familywise_line(rows.assign(winner_random_n=5)) == ""


def seed_rows(diff, lo, hi, **extra):
    return pd.DataFrame([{"k": 30, "winner": "influence", "winner_delta_nll": 0.5, "winner_ci_low": 0.4,
                          "winner_ci_high": 0.6, "ranking": "influence > direct_loss", "causal_best": "influence",
                          "seed_margin": diff, "seed_margin_ci_low": lo, "seed_margin_ci_high": hi, **extra}])


def test_the_seed_sentence_even_when_influence_wins():
    """influence - direct_loss: indistinguishable -> nothing measurable; ahead -> the margin; behind -> said."""
    (same,) = verdict.verdict_lines(seed_rows(0.01, -0.02, 0.04), 3072)
    assert ("Influence: the graph adds nothing measurable over its graph-free seed (direct_loss): difference 0.01 "
            "[-0.02, 0.04] nats/token.") in same
    (ahead,) = verdict.verdict_lines(seed_rows(0.3, 0.2, 0.4), 3072)
    assert "Influence: the causal graph adds 0.3 [0.2, 0.4] nats/token over its graph-free seed (direct_loss)." in ahead
    (behind,) = verdict.verdict_lines(seed_rows(-0.3, -0.4, -0.2), 3072)
    assert "Influence falls behind its graph-free seed (direct_loss): difference -0.3 [-0.4, -0.2]" in behind
    (none,) = verdict.verdict_lines(seed_rows(np.nan, np.nan, np.nan), 3072)
    assert "seed" not in none


def test_seed_margin_and_the_new_baselines_in_the_verdict_table():
    w = World(7)
    order = np.argsort(-w.effect)
    inf, seed = w.entry("influence", order[:10]), w.entry("direct_loss", order[30:40])
    entries = [inf, seed, w.entry("magnitude", order[80:90]), w.entry("activation_count", np.arange(10))]
    assert {"direct_loss", "magnitude"} <= set(stats.BASELINES)
    assert not any(stats.is_causal(m) or stats.is_coactivation(m) for m in ("direct_loss", "magnitude"))
    v, _ = verdict_of(entries)
    r = v.loc[10]
    test = stats.split_prompts(N_PROMPTS, 11).test
    by_hand = inf.sums["delta_nll"][test].sum() / inf.counts[test].sum() - \
        seed.sums["delta_nll"][test].sum() / seed.counts[test].sum()
    assert r["seed_margin"] == pytest.approx(by_hand, rel=1e-12)
    assert r["seed_margin_ci_low"] > 0 and r["seed_margin"] == r["causal_vs_direct_loss"]
    assert r["causal_vs_magnitude_verdict"] == "beats" and "graph_best" not in v.columns
    text = "\n".join(verdict.verdict_lines(v.reset_index(), 200))
    assert "Influence: the causal graph adds " in text and "over its graph-free seed (direct_loss)" in text
    # no direct_loss subset: no seed margin
    v2, _ = verdict_of([inf, w.entry("activation_count", np.arange(10))])
    assert "seed_margin" not in v2.columns


def test_corpus_report_says_there_is_no_single_neuron_ablation():
    from gelutrace.report import report

    info = {"m": "tinybard", "corpus": True, "neuron_effects": False,
            "comparison": pd.DataFrame({"method": ["influence", "direct_loss"]})}
    (note, _) = report.effects_note(info, 3072, {"effect_tokens": "2000"})
    assert note.startswith("**No single-neuron ablation is compared here**")
    assert "`run_pipeline.sh --effects 1`" in note and "`--effect_tokens N`" in note
    assert "neurons × N token-forwards (3,072 × 2,000 = 6.14 M here)" in note
    assert "3,072 × N here" in report.effects_note(info, 3072)[0]
    assert report.effects_note({**info, "neuron_effects": True}, 3072) == []
    with_ablation = {**info, "comparison": pd.DataFrame({"method": ["ablation"]})}
    assert report.effects_note(with_ablation, 3072) == []


def test_not_separable_margin_random_runner_up_and_nan_cis():
    w = World(1)
    top = np.argsort(-w.effect)[:8]
    twin = w.entry("attribution", top)
    # the random method scores second: it must not be the "random" of the sentence, nor the runner-up
    uniform = w.entry("random", np.argsort(-w.effect)[8:16])
    entries = [w.entry("ablation", top), twin, uniform, w.entry("activation_count", np.arange(8))]
    v, _ = verdict_of(entries)
    r = v.loc[8]
    assert "random" not in r["ranking"].split(" > ")
    assert r["runner_up"] != "random" and r["margin_ci_low"] <= 0 <= r["margin_ci_high"]
    text = "\n".join(verdict.verdict_lines(v.reset_index(), 200))
    assert "not separable from" in text
    # NaN effects (no samples): CIs and p-values are NaN, and nothing is claimed
    e = w.entry("degree", np.arange(100, 108), "t=0.5")
    e.sums = {m: np.full(N_PROMPTS, np.nan) for m in e.sums}
    _, c = verdict_of([e])
    assert np.isnan(c.loc[0, "delta_nll_ci_low"]) and np.isnan(c.loc[0, "delta_nll_p_random"])


def test_few_controls_make_no_claim():
    w = World(2)
    top = np.argsort(-w.effect)[:10]
    v, c = verdict_of([w.entry("ablation", top, n_controls=5)])
    assert c.loc[0, "delta_nll_p_random"] == pytest.approx(1 / 6)
    text = "\n".join(verdict.verdict_lines(v.reset_index(), 200))
    assert "random neurons" not in text


def test_filler_variants_cannot_be_best_and_the_variant_is_chosen_on_validation():
    w = World(3)
    top = np.argsort(-w.effect)[:10]
    filler = w.entry("degree", top, "t=0.8", info={"zero_score_picks": 6, "tied_picks": 6})
    honest = w.entry("degree", np.arange(150, 160), "t=0.5", info={"zero_score_picks": 0})
    _, c = verdict_of([filler, honest, w.entry("activation_count", np.arange(10))])
    row = c.set_index("subset")
    assert bool(row.loc[filler.stem, "filler"]) and not bool(row.loc[filler.stem, "best"])
    assert bool(row.loc[honest.stem, "best"])
    # variants chosen on validation prompts: one that is better only on the test prompts loses
    split = stats.split_prompts(N_PROMPTS, 11)
    a, b = w.entry("degree", np.arange(100, 110), "t=0.1"), w.entry("degree", np.arange(110, 120), "t=0.2")
    a.sums["delta_nll"] = np.where(np.isin(np.arange(N_PROMPTS), split.validation), 1.0, 0.0)
    b.sums["delta_nll"] = np.where(np.isin(np.arange(N_PROMPTS), split.validation), 0.5, 2.0)
    c = stats.comparison_table([a, b], split, 11).set_index("variant")
    assert bool(c.loc["t=0.1", "best"]) and not bool(c.loc["t=0.2", "best"])
    assert c.loc["t=0.1", "delta_nll"] == 0.0 and c.loc["t=0.1", "delta_nll_validation"] == 1.0


def test_graph_method_against_baselines():
    w = World(4)
    order = np.argsort(-w.effect)
    entries = [w.entry("attribution", order[:10]), w.entry("activation_count", order[40:50]),
               w.entry("degree", order[40:50], "t=0.5"), w.entry("degree", order[150:160], "t=0.8")]
    v, _ = verdict_of(entries)
    r = v.loc[10]
    assert r["winner"] == "attribution" and r["graph_vs_attribution_verdict"] == "loses to"
    assert r["graph_best"] == "degree (t=0.5)"
    text = "\n".join(verdict.verdict_lines(v.reset_index(), 200))
    assert "The best co-activation graph method, degree (t=0.5), " in text and "loses to attribution" in text


def test_overlap_and_agreement_by_hand():
    w = World(5)
    a = w.entry("attribution", [0, 1, 2, 3])
    b = w.entry("activation_count", [2, 3, 4, 5])
    ov = stats.overlap_table([a, b], stats.split_prompts(N_PROMPTS, 1))
    assert ov["jaccard"].tolist() == [2 / 6]
    effects = np.array([0.9, 0.1, 0.8, np.nan, 0.7, 0.0])  # neuron 3 not measured
    scores = {("attribution", ""): np.array([5.0, 1.0, 4.0, 0.0, 3.0, 0.0])}
    ag = stats.agreement_table([a, b], effects, scores).set_index("method")
    assert ag.loc["attribution", "spearman"] == pytest.approx(1.0)  # same order over the measured neurons
    assert np.isnan(ag.loc["activation_count", "spearman"])  # no scores given
    assert ag.loc["attribution", "top_k_recall"] == 3 / 4 and ag.loc["activation_count", "top_k_recall"] == 2 / 4



def test_the_report_says_whether_the_winner_holds_without_layer_0(tmp_path):
    """report.md's sentence on constructed verdict tables: the same winner at every k, a different one at some k
    (among the methods ranked both ways), and a full winner that was not ranked without the layer."""
    import pandas as pd

    from gelutrace.report import report

    def table(rankings):
        return pd.DataFrame({"k": list(rankings), "ranking": list(rankings.values()),
                             "winner": [r.split(" > ")[0] for r in rankings.values()]})

    record = {"exclude_layers": [0]}
    full = table({3: "influence > attribution > activation_count", 42: "influence > activation_count > attribution"})
    same = table({3: "influence > activation_count > attribution", 42: "influence > attribution > activation_count"})
    assert report.excluded_winner_sentence(full, same, record, str) == (
        "With layer 0 excluded (among the methods ranked both ways: activation_count, attribution, influence), the "
        "winner is the same at every k.")
    other = table({3: "influence > attribution", 42: "attribution > influence"})
    assert report.excluded_winner_sentence(full, other, record, str).endswith(
        "the winner differs at k = 42: attribution instead of influence.")
    graph = table({3: "degree > attribution > influence", 42: "influence > attribution"})
    assert report.excluded_winner_sentence(graph, table({3: "attribution > influence", 42: "influence"}),
                                           {"exclude_layers": [0, 1]}, str) == (
        "With layers 0 and 1 excluded (among the methods ranked both ways: attribution, influence), the winner is "
        "the same at every k. The full comparison's own winner was not ranked without layers 0 and 1: degree at "
        "k = 3.")
    assert report.excluded_winner_sentence(full, None, record) == ""
    dose = pd.DataFrame({"k": [3, 3], "method": ["influence", "attribution"], "delta_nll": [0.5, 0.2],
                         "delta_nll_ci_low": [0.4, 0.1], "delta_nll_ci_high": [0.6, 0.3], "p_random": [0.03, None],
                         "winner": [True, False]})
    info = {"dose": dose, "dose_excluded": dose.assign(delta_nll=[0.1, 0.3], winner=[False, True]),
            "verdict": full, "verdict_excluded": other, "record": record, "data": tmp_path}
    lines = "\n".join(report.excluded_section(info))
    assert lines.startswith("## Without layer 0") and "| k | method | ΔNLL without layer 0 |" in lines
    assert "| 3 | attribution | 0.3 | \\[0.1, 0.3\\] |  | yes | 0.2 |" in lines  # brackets escaped
    assert report.excluded_section({**info, "dose_excluded": None}) == []


def test_the_floor_sentence_holds_when_some_subsets_had_no_controls():
    """With --control_subsets best only the winners have controls: a graph method's 0 controls leave the
    family-wise sentence, which speaks of the N controls the winners had, as it is."""
    v = pd.DataFrame({"k": [3, 5], "holm_comparisons": [2, 2], "winner_random_n": [30, 30],
                      "graph_random_n": [0, np.nan], "winner_p_random_empirical_holm": [0.065, 0.065]})
    line = verdict.familywise_line(v)
    assert "m/(N + 1) = 2/31 = 0.065" in line and "it needs N ≥ 39 controls" in line
