"""
Honest statistics for stage e, and the method comparison that the report leads with.

- Uncertainty is over prompts: a seeded bootstrap resamples the evaluation prompts with replacement (every
  sample of a drawn prompt comes along) and recomputes the mean over samples. The same draws serve every
  subset, so differences between two subsets are paired.
- A subset is placed among its random controls by its empirical percentile; a subset / random ratio is
  given only when the random mean is clearly above 0 (mean - 2 standard errors > 0), since a ratio over a
  denominator near or below 0 reads as nonsense.
- The comparison puts every selection method side by side at each k: the best variant of each method (its
  best threshold, for the graph methods), their CIs, the overlap of their neurons, their agreement with
  measured single-neuron effects, and a verdict computed from these numbers alone.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

N_BOOT = 2000
LEVEL = 0.95
GRAPH_METHODS = ("degree", "weighted_degree", "pagerank")
BASELINES = ("activation_count", "attribution")  # what a graph method must beat to earn its graph


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


def guarded_ratio(value: float, controls) -> float:
    """value / mean(controls), only where that mean is clearly positive (mean - 2 SE > 0); else NaN."""
    c = np.asarray(controls, np.float64)
    c = c[~np.isnan(c)]
    if len(c) < 2:
        return np.nan
    mean, se = c.mean(), c.std(ddof=1) / np.sqrt(len(c))
    return float(value / mean) if mean - 2 * se > 0 else np.nan


# --- the comparison ---------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One evaluated subset chosen by a selection method."""
    stem: str
    method: str
    variant: str  # e.g. "t=0.8" for a graph method; "" otherwise
    k: int
    ids: np.ndarray
    sums: dict  # metric -> per-prompt sums (kl, delta_nll)
    counts: np.ndarray  # per-prompt number of samples
    metrics: dict  # metric -> mean over samples
    control_values: dict  # metric -> the random controls' means

    @property
    def label(self) -> str:
        return f"{self.method} ({self.variant})" if self.variant else self.method


def comparison_table(entries: list[Entry], weights: np.ndarray) -> pd.DataFrame:
    """One row per evaluated subset with a method, with CIs and percentiles; `best` marks each method's best
    variant at each k (largest delta_nll)."""
    rows = []
    for e in entries:
        row = {"k": e.k, "method": e.method, "variant": e.variant, "subset": e.stem}
        for metric in ("delta_nll", "kl"):
            row[metric] = e.metrics[metric]
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = bootstrap_ci(weights, e.sums[metric], e.counts)
            ctl = np.asarray(e.control_values.get(metric, []), np.float64)
            row[f"{metric}_random_mean"] = float(ctl.mean()) if len(ctl) else np.nan
            row[f"{metric}_percentile"] = percentile(e.metrics[metric], ctl)
        row["token_agreement"] = e.metrics["token_agreement"]
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        best = df.sort_values(["delta_nll", "subset"], ascending=[False, True]).groupby(["k", "method"]).head(1)
        df["best"] = df.index.isin(best.index)
        df = df.sort_values(["k", "delta_nll"], ascending=[True, False], kind="stable").reset_index(drop=True)
    return df


def _paired(weights, a: Entry, b: Entry, level: float = LEVEL):
    """a - b in mean delta_nll, with its paired bootstrap CI (same prompts, same draws)."""
    diff = a.metrics["delta_nll"] - b.metrics["delta_nll"]
    lo, hi = bootstrap_ci(weights, a.sums["delta_nll"] - b.sums["delta_nll"], a.counts, level)
    return diff, lo, hi


def _word(lo: float, hi: float) -> str:
    if lo > 0:
        return "beats"
    if hi < 0:
        return "loses to"
    return "is indistinguishable from"


def verdict_table(entries: list[Entry], weights: np.ndarray) -> pd.DataFrame:
    """Per k: the ranking of methods (best variants), the winner's margin over the runner-up, and the best graph
    method against each baseline, each difference with its paired bootstrap CI."""
    rows = []
    for k in sorted({e.k for e in entries}):
        at_k = [e for e in entries if e.k == k]
        best = {}
        for e in sorted(at_k, key=lambda e: (-e.metrics["delta_nll"], e.stem)):
            best.setdefault(e.method, e)
        ranked = list(best.values())
        win = ranked[0]
        row = {"k": k, "ranking": " > ".join(e.method for e in ranked), "winner": win.label,
               "winner_delta_nll": win.metrics["delta_nll"]}
        row["winner_ci_low"], row["winner_ci_high"] = bootstrap_ci(weights, win.sums["delta_nll"], win.counts)
        if len(ranked) > 1:
            row["runner_up"] = ranked[1].label
            row["margin"], row["margin_ci_low"], row["margin_ci_high"] = _paired(weights, win, ranked[1])
        graph = [e for e in ranked if e.method in GRAPH_METHODS]
        if graph:
            row["graph_best"] = graph[0].label
            for base in BASELINES:
                if base in best:
                    d, lo, hi = _paired(weights, graph[0], best[base])
                    row[f"graph_vs_{base}"], row[f"graph_vs_{base}_ci_low"], row[f"graph_vs_{base}_ci_high"] = d, lo, hi
                    row[f"graph_vs_{base}_verdict"] = _word(lo, hi)
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def verdict_lines(verdict: pd.DataFrame, n_neurons: int) -> list[str]:
    """The report's opening verdict, one bullet per k, worded from the numbers alone."""
    lines = []
    for r in verdict.to_dict("records"):
        pct = 100 * r["k"] / n_neurons if n_neurons else np.nan
        s = (f"k = {r['k']} ({pct:.1f} % of neurons): **{r['winner']}** found the most influential neurons, "
             f"ΔNLL {_fmt(r['winner_delta_nll'])} [{_fmt(r['winner_ci_low'])}, {_fmt(r['winner_ci_high'])}]")
        if isinstance(r.get("runner_up"), str):
            clear = r["margin_ci_low"] > 0
            s += (f", {'ahead of' if clear else 'not separable from'} {r['runner_up']} "
                  f"(difference {_fmt(r['margin'])} [{_fmt(r['margin_ci_low'])}, {_fmt(r['margin_ci_high'])}])")
        s += "."
        if isinstance(r.get("graph_best"), str):
            parts = [f"{r[f'graph_vs_{b}_verdict']} {b} ({_fmt(r[f'graph_vs_{b}'])} "
                     f"[{_fmt(r[f'graph_vs_{b}_ci_low'])}, {_fmt(r[f'graph_vs_{b}_ci_high'])}])"
                     for b in BASELINES if isinstance(r.get(f"graph_vs_{b}_verdict"), str)]
            if parts:
                s += f" The best graph method, {r['graph_best']}, " + " and ".join(parts) + "."
        lines.append("- " + s)
    return lines


def overlap_table(entries: list[Entry]) -> pd.DataFrame:
    """Jaccard overlap of the neurons of every pair of methods' best variants, at each k."""
    rows = []
    for k in sorted({e.k for e in entries}):
        best = {}
        for e in sorted((e for e in entries if e.k == k), key=lambda e: (-e.metrics["delta_nll"], e.stem)):
            best.setdefault(e.method, e)
        ms = sorted(best)
        for i, a in enumerate(ms):
            for b in ms[i + 1:]:
                sa, sb = set(best[a].ids.tolist()), set(best[b].ids.tolist())
                rows.append({"k": k, "method_a": best[a].label, "method_b": best[b].label,
                             "jaccard": len(sa & sb) / len(sa | sb) if sa | sb else np.nan})
    return pd.DataFrame(rows, columns=["k", "method_a", "method_b", "jaccard"])


def agreement_table(entries: list[Entry], effects: np.ndarray, scores: dict) -> pd.DataFrame:
    """
    Against measured single-neuron effects (delta_nll per neuron, NaN where not measured): each method's
    Spearman correlation of its score with the effects over the measured neurons (scores: (method, variant)
    -> per-neuron score), and each subset's top-k recall, the share of the k largest effects it holds.
    """
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


def method_scores(entries: list[Entry], infos: dict, dataset_path) -> dict:
    """
    Every neuron's score under each (method, variant) of the entries, recomputed from the graph and files the
    subset was chosen from (infos: stem -> stage d's sidecar). A method whose graph is gone is left out.
    """
    from gelutrace import PipelineError
    from gelutrace import coactivation as co
    from gelutrace import selection as sel

    out, graphs = {}, {}
    for e in entries:
        key = (e.method, e.variant)
        if key in out or e.method == "random":
            continue
        info = infos.get(e.stem, {})
        try:
            src = info.get("graph")
            if src not in graphs:
                graphs[src] = co.read_graph(src)
            out[key] = np.asarray(sel.scores(graphs[src], e.method, info.get("threshold"),
                                             info.get("weight") or co.DEFAULT_WEIGHT, dataset_path), np.float64)
        except (PipelineError, TypeError, OSError):
            continue
    return out
