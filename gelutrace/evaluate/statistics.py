"""
Honest statistics for stage e, and the method comparison that the report leads with.

- Uncertainty over prompts: a seeded bootstrap resamples the evaluation prompts with replacement (every sample
  of a drawn prompt comes along) and recomputes the mean over samples. The same draws serve every subset, so
  differences between two subsets are paired.
- The null: each subset's random controls have its number of neurons in every layer. Against them a subset
  gets the one-sided empirical p-value (1 + #controls >= value) / (1 + N), which cannot go below 1/(N + 1);
  z = (value - controls' mean) / controls' std; the Gaussian tail of z (an approximation, the one that can go
  below 1/(N + 1)); the controls' 5th, 50th and 95th percentiles; and, for the subsets the verdict speaks of
  (each method's best variant at each k, the m comparisons with controls), Holm's adjustment across them of the
  empirical p (p_random_empirical_holm, which cannot go below m/(N + 1)) and of the Gaussian p (p_random_holm,
  the normal approximation's, kept in the tables as such).
- Nested selection: the evaluation prompts are split, seeded, into a validation part, where each method's best
  variant (e.g. a graph method's threshold) is chosen, and a test part, where every figure of the verdict is
  measured. Below MIN_SPLIT_PROMPTS prompts there is no split and the verdict says it is biased.
- The control part: the random (and effect-weighted) controls may be scored on a seeded share of the test part
  only (stage e's --control_share); a subset is then judged against them on those same units, where the empirical
  p-value keeps its meaning (the subset and its controls exchangeable under the null), while its effect and every
  comparison between methods stay on the whole test part.
- A variant with more than half of its picks at score 0 (filled by the tie-break, not chosen by its score)
  cannot be a method's best variant.
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gelutrace.files import layout
from gelutrace.selection import methods as sel
from gelutrace.selection.stability import jaccard

N_BOOT = 2000
LEVEL = 0.95
ALPHA = 0.05  # the verdict's significance level against random controls
MIN_CONTROLS = 20  # fewer controls: p-values too coarse for any claim against random
MIN_SPLIT_PROMPTS = 10  # fewer evaluation prompts: no validation/test split
MIN_CONTROL_UNITS = 4  # a control part smaller than this: the controls are scored on the whole test part
GRAPH_METHODS = ("degree", "weighted_degree", "pagerank")  # the thresholded graph's (selection.GRAPH_METHODS)
CAUSAL_WEIGHTS = ("direct", "direct_abs")  # a graph method on one of these is a method of its own here
# what a graph method must beat to earn its graph: no graph, each a neuron's own figure
BASELINES = ("activation_count", "attribution", "direct_loss", "magnitude")
SEED = ("influence", "direct_loss")  # influence I = s + |E~| I and its graph-free seed s: what the graph adds
REFERENCE = "random"  # the method of one uniform draw: in the tables, never the "random" of a verdict
METRICS = ("delta_nll", "kl")
NULL_FIELDS = ("random_mean", "random_std", "random_q05", "random_q50", "random_q95", "p_random", "z_random",
               "p_random_normal")


def comparison_method(info: dict) -> str:
    """A subset's method as the comparison ranks it (stage d's sidecar `info`): degree on the co-activation
    counts and degree on the causal direct_abs weights answer different questions, so the latter is
    degree_direct_abs."""
    method, weight = info.get("method"), info.get("weight")
    return f"{method}_{weight}" if method in GRAPH_METHODS and weight in CAUSAL_WEIGHTS else method


def is_causal(method: str) -> bool:
    """Whether a comparison method ranks neurons by the causal graph (stage b --direct_edges)."""
    return method == "influence" or (method.split("_direct")[0] in GRAPH_METHODS and "_direct" in method)


def is_coactivation(method: str) -> bool:
    return method in GRAPH_METHODS


# the verdict's two kinds of graph method: (column prefix, words, membership)
GRAPH_KINDS = (("graph", "co-activation graph", is_coactivation), ("causal", "causal graph", is_causal))


# --- statistics over prompts ------------------------------------------------------------------------------
def prompt_sums(per_sample: np.ndarray, prompt: np.ndarray, n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the sum of a per-sample metric and the number of samples (NaN samples left out)."""
    ok = ~np.isnan(per_sample)
    sums = np.bincount(prompt[ok], weights=per_sample[ok], minlength=n_prompts)
    return sums, np.bincount(prompt[ok], minlength=n_prompts).astype(np.float64)


def bootstrap_weights(n_prompts: int, seed: int, n_boot: int = N_BOOT) -> np.ndarray:
    """(n_boot, n_prompts): how often each prompt is drawn in each bootstrap replicate."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB0075]))
    draws = rng.integers(0, n_prompts, size=(n_boot, n_prompts))
    flat = (draws + n_prompts * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_prompts).reshape(n_boot, n_prompts).astype(np.float64)


def bootstrap_ci(weights: np.ndarray, sums: np.ndarray, counts: np.ndarray, level: float = LEVEL):
    """Percentile CI of the mean over samples, prompts resampled. (nan, nan) without samples."""
    num, den = weights @ sums, weights @ counts
    means = num[den > 0] / den[den > 0]
    if not len(means):
        return np.nan, np.nan
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def percentile(value: float, controls) -> float:
    """Empirical percentile (0-100) of value among the controls; ties count half. NaN without controls."""
    c = np.asarray(controls, np.float64)
    c = c[~np.isnan(c)]
    if not len(c) or np.isnan(value):
        return np.nan
    return float(100 * ((c < value).sum() + 0.5 * (c == value).sum()) / len(c))


# --- the null of random neurons of the same layers -------------------------------------------------------
def null_test(value: float, controls) -> dict:
    """The subset's value against its controls (NaN controls left out): the NULL_FIELDS and random_n."""
    from scipy.stats import norm  # scipy.stats takes half a second to import: only where a test is made
    c = np.asarray(controls, np.float64)
    c = c[~np.isnan(c)]
    out = dict.fromkeys(NULL_FIELDS, np.nan)
    out["random_n"] = len(c)
    if not len(c):
        return out
    out["random_mean"] = float(c.mean())
    out["random_q05"], out["random_q50"], out["random_q95"] = (float(q) for q in np.percentile(c, [5, 50, 95]))
    if np.isnan(value):
        return out
    out["p_random"] = float((1 + (c >= value).sum()) / (1 + len(c)))
    if len(c) > 1:
        sd = float(c.std(ddof=1))
        out["random_std"] = sd
        diff = value - out["random_mean"]
        z = diff / sd if sd > 0 else (np.sign(diff) * np.inf if diff else np.nan)
        out["z_random"] = float(z)
        out["p_random_normal"] = float(norm.sf(z)) if not np.isnan(z) else np.nan
    return out


def holm(p) -> np.ndarray:
    """Holm's step-down adjustment of the p-values (NaN entries are not tests: they stay NaN)."""
    p = np.asarray(p, np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def t_ratio(value: float, controls, level: float = LEVEL) -> float:
    """value / mean(controls), only where the controls' mean is above 0 by its t-interval (df = N - 1)."""
    from scipy.stats import t as student_t  # lazy: scipy.stats takes half a second to import
    c = np.asarray(controls, np.float64)
    c = c[~np.isnan(c)]
    if len(c) < 2:
        return np.nan
    mean, se = c.mean(), c.std(ddof=1) / np.sqrt(len(c))
    return float(value / mean) if mean - student_t.ppf(0.5 + level / 2, len(c) - 1) * se > 0 else np.nan


# --- the validation / test split of the evaluation prompts -----------------------------------------------
@dataclass
class Split:
    """Which evaluation prompts choose the variants (validation) and which score them (test)."""
    validation: np.ndarray
    test: np.ndarray
    nested: bool  # False: too few prompts, both parts are every prompt
    seed: int
    share: float
    control: np.ndarray = None  # the units of the test part the controls are scored on (None: all of it)
    control_share: float = 1.0

    @property
    def control_units(self) -> np.ndarray:
        return self.test if self.control is None else self.control

    def record(self, prompts=None, unit: str = "prompts") -> dict:
        """The split, its parts named after the unit split (prompts, or the real text's documents or windows)."""
        rec = {"nested": self.nested, "seed": self.seed, "validation_share": self.share, "units": unit,
               f"validation_{unit}": self.validation.tolist(), f"test_{unit}": self.test.tolist(),
               "control_share": self.control_share, f"control_{unit}": self.control_units.tolist()}
        if prompts is not None:
            rec["test_prompt_texts"] = [prompts[i].text for i in self.test]
        return rec


def split_prompts(n_prompts: int, seed: int, share: float = 0.5, control_share: float = 1.0) -> Split:
    """A seeded split of prompt indices, validation share `share`, each part sorted; no split below
    MIN_SPLIT_PROMPTS prompts. The controls' part: a seeded `control_share` of the test part (all of it at 1, or
    where that share would be fewer than MIN_CONTROL_UNITS units)."""
    every = np.arange(n_prompts)
    if n_prompts < MIN_SPLIT_PROMPTS:
        split = Split(every, every, False, seed, share)
    else:
        perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5917])).permutation(n_prompts)
        n_val = min(max(1, int(round(share * n_prompts))), n_prompts - 1)
        split = Split(np.sort(perm[:n_val]), np.sort(perm[n_val:]), True, seed, share)
    n_control = int(round(control_share * len(split.test)))
    if control_share < 1 and n_control >= MIN_CONTROL_UNITS:
        pick = np.random.default_rng(np.random.SeedSequence([seed, 0xC0])).permutation(len(split.test))[:n_control]
        split.control, split.control_share = np.sort(split.test[pick]), control_share
    return split


# --- the comparison ---------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One evaluated subset chosen by a selection method, with per-prompt sums to score it on any prompts."""
    stem: str
    method: str
    variant: str  # e.g. "t=0.8" for a graph method; "" otherwise
    k: int
    ids: np.ndarray
    sums: dict  # metric -> per-prompt sums (delta_nll, kl, token_agreement)
    counts: np.ndarray  # per-prompt number of samples
    control_sums: dict  # metric -> (N controls, prompts) sums
    control_counts: np.ndarray  # (N, prompts)
    info: dict = field(default_factory=dict)  # stage d's sidecar

    @property
    def label(self) -> str:
        return f"{self.method} ({self.variant})" if self.variant else self.method

    @property
    def zero_score_picks(self) -> int:
        return int(self.info.get("zero_score_picks") or 0)

    @property
    def filler(self) -> bool:
        """More than half of the picks score 0: the tie-break, not the method, chose them."""
        return self.method != REFERENCE and self.zero_score_picks > self.k / 2

    def mean(self, metric: str, prompts: np.ndarray) -> float:
        den = self.counts[prompts].sum()
        return float(self.sums[metric][prompts].sum() / den) if den else np.nan

    def control_part(self, prompts: np.ndarray) -> np.ndarray:
        """The prompts (units) among `prompts` its controls were scored on; all of them without controls."""
        if not len(self.control_counts):
            return prompts
        return prompts[self.control_counts[:, prompts].min(0) > 0]

    def control_means(self, metric: str, prompts: np.ndarray) -> np.ndarray:
        if metric not in self.control_sums or not len(self.control_counts):
            return np.zeros(0)
        den = self.control_counts[:, prompts].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, self.control_sums[metric][:, prompts].sum(1) / den, np.nan)


def best_variants(entries: list[Entry], prompts: np.ndarray) -> dict:
    """(k, method) -> the entry with the largest mean delta_nll on `prompts`, filler variants excluded."""
    best = {}
    for e in sorted(entries, key=lambda e: (-np.nan_to_num(e.mean("delta_nll", prompts), nan=-np.inf), e.stem)):
        if not e.filler:
            best.setdefault((e.k, e.method), e)
    return best


def validation_winners(entries: list[Entry], split: Split) -> set[str]:
    """The stems of each k's winner on the validation prompts: the best variant with the largest mean delta_nll
    there, the random reference method left out (what --control_subsets best gives controls to)."""
    out = {}
    for (k, method), e in best_variants(entries, split.validation).items():
        v = np.nan_to_num(e.mean("delta_nll", split.validation), nan=-np.inf)
        if method != REFERENCE and (k not in out or v > out[k][0]):
            out[k] = (v, e.stem)
    return {stem for _, stem in out.values()}


def comparison_table(entries: list[Entry], split: Split, seed: int, level: float = LEVEL) -> pd.DataFrame:
    """
    One row per evaluated subset with a method. Every figure is on the test prompts, CIs by the bootstrap over
    them; delta_nll_validation is what chose `best` (each method's best variant at each k).
    """
    test = split.test
    weights = bootstrap_weights(len(test), seed)
    best = {id(e) for e in best_variants(entries, split.validation).values()}
    rows = []
    for e in entries:
        row = {"k": e.k, "method": e.method, "variant": e.variant, "subset": e.stem,
               "delta_nll_validation": e.mean("delta_nll", split.validation)}
        for metric in METRICS:
            row[metric] = e.mean(metric, test)
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = bootstrap_ci(weights, e.sums[metric][test],
                                                                             e.counts[test], level)
            on = e.control_part(test)  # the subset against its controls on the units they were scored on
            row[f"{metric}_control_part"] = e.mean(metric, on)  # what p and z compare with the controls
            null = null_test(row[f"{metric}_control_part"], e.control_means(metric, on))
            row.update({f"{metric}_{name}": v for name, v in null.items()})
        row["token_agreement"] = e.mean("token_agreement", test)
        row["tied_picks"] = e.info.get("tied_picks")
        row["tie_pool"] = e.info.get("tie_pool")
        row["zero_score_picks"] = e.info.get("zero_score_picks")
        row["filler"] = e.filler
        row["selection_jaccard"] = e.info.get("selection_jaccard", np.nan)
        row["best"] = id(e) in best
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        family = (df["best"] & (df["method"] != REFERENCE)).to_numpy()  # the subsets the verdict speaks of
        for metric in METRICS:
            for name, p in (("p_random_holm", "p_random_normal"), ("p_random_empirical_holm", "p_random")):
                col = np.full(len(df), np.nan)
                col[family] = holm(df.loc[family, f"{metric}_{p}"].to_numpy())
                df[f"{metric}_{name}"] = col
        df = df.sort_values(["k", "delta_nll"], ascending=[True, False], kind="stable").reset_index(drop=True)
    return df


def paired_difference(weights, a: Entry, b: Entry, test: np.ndarray, level: float = LEVEL):
    """a - b in mean delta_nll on the test prompts, with its paired bootstrap CI (same prompts, same draws)."""
    diff = a.mean("delta_nll", test) - b.mean("delta_nll", test)
    lo, hi = bootstrap_ci(weights, a.sums["delta_nll"][test] - b.sums["delta_nll"][test], a.counts[test], level)
    return diff, lo, hi


def _null_of(who: str, row: dict) -> dict:
    """A comparison row's delta_nll null, under the verdict's column names for `who`."""
    return {f"{who}_{name}": row[f"delta_nll_{name}"] for name in ("random_n", "random_mean", "p_random",
                                                                    "p_random_holm", "z_random",
                                                                    "p_random_empirical_holm")}


def _word(lo: float, hi: float) -> str:
    if lo > 0:
        return "beats"
    if hi < 0:
        return "loses to"
    return "is indistinguishable from"


def verdict_table(entries: list[Entry], split: Split, seed: int, level: float = LEVEL,
                  table: pd.DataFrame | None = None) -> pd.DataFrame:
    """
    Per k, over each method's best variant (chosen on the validation prompts; the random reference method left
    out): the ranking on the test prompts, the winner's margin over the runner-up, the winner's and the best
    graph method's standing against their layer-matched controls, the best graph method against each
    baseline, and influence against its graph-free seed direct_loss (seed_margin), each difference with its
    paired bootstrap CI; holm_comparisons: m, the tests with controls that the Holm adjustments span.
    `table`: comparison_table's, when already made.
    """
    table = comparison_table(entries, split, seed, level) if table is None else table
    test = split.test
    weights = bootstrap_weights(len(test), seed)
    best = best_variants(entries, split.validation)
    null = {r["subset"]: r for r in table.to_dict("records")}
    n_tests = int(table["delta_nll_p_random_empirical_holm"].notna().sum()) if len(table) else 0
    rows = []
    for k in sorted({e.k for e in entries}):
        ranked = sorted((e for (kk, m), e in best.items() if kk == k and m != REFERENCE),
                        key=lambda e: (-np.nan_to_num(e.mean("delta_nll", test), nan=-np.inf), e.stem))
        if not ranked:
            continue
        win = ranked[0]
        row = {"k": k, "ranking": " > ".join(e.method for e in ranked), "winner": win.label,
               "winner_delta_nll": win.mean("delta_nll", test), "holm_comparisons": n_tests}
        row["winner_ci_low"], row["winner_ci_high"] = bootstrap_ci(weights, win.sums["delta_nll"][test],
                                                                   win.counts[test], level)
        row.update(_null_of("winner", null[win.stem]))
        if len(ranked) > 1:
            row["runner_up"] = ranked[1].label
            row["margin"], row["margin_ci_low"], row["margin_ci_high"] = paired_difference(weights, win, ranked[1], test, level)
        by_method = {e.method: e for e in ranked}
        for kind, _, member in GRAPH_KINDS:
            graph = [e for e in ranked if member(e.method)]
            if not graph:
                continue
            g = graph[0]
            row.update({f"{kind}_best": g.label, **_null_of(kind, null[g.stem])})
            for base in BASELINES:
                if base in by_method:
                    d, lo, hi = paired_difference(weights, g, by_method[base], test, level)
                    row[f"{kind}_vs_{base}"], row[f"{kind}_vs_{base}_ci_low"], row[f"{kind}_vs_{base}_ci_high"] = d, lo, hi
                    row[f"{kind}_vs_{base}_verdict"] = _word(lo, hi)
        if all(s in by_method for s in SEED):
            row["seed_margin"], row["seed_margin_ci_low"], row["seed_margin_ci_high"] = paired_difference(
                weights, *(by_method[s] for s in SEED), test, level)
        rows.append(row)
    return pd.DataFrame(rows)


def dose_response_table(table: pd.DataFrame, verdict: pd.DataFrame) -> pd.DataFrame:
    """Each method's best variant at each k (comparison_table's rows), with its delta_nll null where it had
    controls, and whether it is the verdict's winner at that k: the dose-response curves."""
    if not len(table):
        return pd.DataFrame(columns=layout.DOSE_RESPONSE_COLUMNS)
    best = table[table["best"].astype(bool)].copy()
    won = set(zip(verdict["k"], verdict["winner"])) if len(verdict) else set()
    best["winner"] = [(k, f"{m} ({v})" if isinstance(v, str) and v else m) in won
                      for k, m, v in zip(best["k"], best["method"], best["variant"])]
    for name in ("random_n", "random_q05", "random_q50", "random_q95", "p_random", "p_random_holm"):
        best[name] = best[f"delta_nll_{name}"]
    return best[layout.DOSE_RESPONSE_COLUMNS].sort_values(["method", "k"], kind="stable").reset_index(drop=True)


def overlap_table(entries: list[Entry], split: Split) -> pd.DataFrame:
    """Jaccard overlap of the neurons of every pair of methods' best variants, at each k."""
    best = best_variants(entries, split.validation)
    rows = []
    for k in sorted({e.k for e in entries}):
        at_k = {m: e for (kk, m), e in best.items() if kk == k}
        ms = sorted(at_k)
        for i, a in enumerate(ms):
            for b in ms[i + 1:]:
                rows.append({"k": k, "method_a": at_k[a].label, "method_b": at_k[b].label,
                             "jaccard": jaccard(at_k[a].ids, at_k[b].ids)})
    return pd.DataFrame(rows, columns=["k", "method_a", "method_b", "jaccard"])


def agreement_table(entries: list[Entry], effects: np.ndarray, scores: dict) -> pd.DataFrame:
    """
    Against measured single-neuron effects (delta_nll per neuron, NaN where not measured): each method's
    Spearman correlation of its score with the effects over the measured neurons (scores: (method, variant)
    -> per-neuron score), and each subset's top-k recall, the share of the k largest effects it holds.
    """
    from scipy.stats import spearmanr  # lazy: scipy.stats takes half a second to import

    measured = np.flatnonzero(~np.isnan(effects))
    order = measured[np.lexsort((measured, -effects[measured]))]
    rows = []
    for e in entries:
        sc = scores.get((e.method, e.variant))
        rho = np.nan
        if sc is not None and np.ptp(sc[measured]) > 0:
            rho = float(spearmanr(sc[measured], effects[measured]).correlation)
        top = set(order[:e.k].tolist())
        rows.append({"k": e.k, "method": e.method, "variant": e.variant, "spearman": rho,
                     "top_k_recall": len(top & set(e.ids.tolist())) / e.k if e.k else np.nan})
    return pd.DataFrame(rows, columns=["k", "method", "variant", "spearman", "top_k_recall"])


def recorded_scores(entries: list[Entry], directory) -> dict:
    """
    Every neuron's score under each (method, variant) of the entries, as stage d recorded it beside their subsets
    in `directory` (a subset of an older stage d has none, and random none at all). A graph method on causal
    weights (degree_direct_abs...) is left out, as when stage e recomputed the scores by the comparison's method
    name, which no selection method has.
    """
    out = {}
    for e in entries:
        key = (e.method, e.variant)
        if key in out or e.method != e.info.get("method"):
            continue
        values = sel.read_scores(directory, e.info)
        if values is not None:
            out[key] = values
    return out


def weighted_null(value: float, controls) -> dict:
    """null_test against effect-weighted controls, its fields named for them: weighted_mean, p_weighted, ..."""
    return {k.replace("random", "weighted"): v for k, v in null_test(value, controls).items()}
