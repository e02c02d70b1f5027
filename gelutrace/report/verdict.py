"""
The verdict's prose: the sentences the report and stage e print from the comparison's tables (which method
wins at each k, by how much, against what null), never a number that the tables do not hold.
"""

import math

import numpy as np
import pandas as pd

from gelutrace.evaluate.statistics import ALPHA, BASELINES, GRAPH_KINDS, LEVEL, MIN_CONTROLS, SEED


def ordinal(n: int) -> str:
    n = int(n)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _fmt(x: float) -> str:
    return f"{x:.3g}"


NORMAL_P_FLOOR = 1e-6  # a Gaussian fitted to a few dozen controls says nothing about its tail beyond this


def _p(x: float) -> str:
    return f"{x:.2g}" if x >= 1e-3 else f"{x:.1e}"


def normal_p_text(x: float) -> str:
    """' = p' of a normal approximation, or ' < NORMAL_P_FLOOR' below it."""
    return f" < {NORMAL_P_FLOOR:.0e}" if x < NORMAL_P_FLOOR else f" = {_p(x)}"


def null_phrase(n_controls, p, z=np.nan, p_holm=np.nan) -> str:
    """
    The standing of a subset against its N layer-matched controls, in words, from the empirical p = (1 + #controls
    at or above it) / (N + 1), z, and the empirical p Holm-adjusted across the verdict's comparisons (p_holm);
    '' when there are too few controls. Above random when p < ALPHA.
    """
    if pd.isna(n_controls) or n_controls < MIN_CONTROLS or pd.isna(p):
        return ""
    n = int(n_controls)
    beaten = n + 1 - int(round(p * (n + 1)))  # the controls strictly below the value
    figures = f"empirical p = {_p(p)}" + ("" if pd.isna(z) else f", z = {_fmt(z)}")
    figures += "" if pd.isna(p_holm) else f"; family-wise (Holm) p = {_p(p_holm)}"
    if beaten == n:
        return f"above all {n} layer-matched controls ({figures})"
    where = f"above {beaten} of {n} layer-matched controls"
    if p < ALPHA:
        return f"above random neurons of the same layers, {where} ({figures})"
    return f"not distinguishable from random neurons of the same layers, {where} ({figures})"


def controls_needed(m: int, alpha: float = ALPHA) -> int:
    """The fewest controls N with which Holm over m empirical p-values can reach alpha: m / (N + 1) <= alpha."""
    return max(0, math.ceil(m / alpha - 1e-9) - 1)


def familywise_line(verdict: pd.DataFrame) -> str:
    """What Holm's adjustment of the empirical p-values across the verdict's m comparisons with controls can
    claim: it cannot go below m / (N + 1); '' without enough controls."""
    if not len(verdict) or "holm_comparisons" not in verdict.columns:
        return ""
    n_col = [c for c in verdict.columns if c.endswith("_random_n")]
    counts = pd.concat([verdict[c] for c in n_col]).dropna() if n_col else pd.Series(dtype=float)
    counts = counts[counts > 0]  # the subsets that had controls (with --control_subsets best, the winners)
    m = int(verdict["holm_comparisons"].max())
    if not len(counts) or counts.min() < MIN_CONTROLS or m < 1:
        return ""
    n = int(counts.min())
    floor = m / (n + 1)
    s = (f"Family-wise: Holm's adjustment of the empirical p-values across the {m} comparison(s) with controls "
         f"cannot go below m/(N + 1) = {m}/{n + 1} = {_p(floor)}")
    if floor > ALPHA:
        need = controls_needed(m)
        return (s + f"; with {n} controls and {m} comparisons no family-wise claim at {ALPHA:g} is possible; it "
                    f"needs N ≥ {need} controls (--random_controls {need}).")
    held = int((verdict.get("winner_p_random_empirical_holm", pd.Series(dtype=float)) < ALPHA).sum())
    return s + f"; {held} of the {len(verdict)} winners stay below {ALPHA:g} after it."


def seed_phrase(r: dict, name=str) -> str:
    """Influence against its graph-free seed direct_loss (the verdict's seed_margin), in words; '' without both;
    `name` renders the seed's name."""
    d, lo, hi = (r.get(f"seed_margin{x}", np.nan) for x in ("", "_ci_low", "_ci_high"))
    if pd.isna(d) or pd.isna(lo) or pd.isna(hi):
        return ""
    inf, seed = SEED[0], name(SEED[1])
    ci = f"{_fmt(d)} [{_fmt(lo)}, {_fmt(hi)}]"
    if lo > 0:
        return f"{inf.capitalize()}: the causal graph adds {ci} nats/token over its graph-free seed ({seed})."
    if hi < 0:
        return (f"{inf.capitalize()} falls behind its graph-free seed ({seed}): difference {ci} nats/token; the "
                f"causal graph makes the ranking worse.")
    return (f"{inf.capitalize()}: the graph adds nothing measurable over its graph-free seed ({seed}): difference "
            f"{ci} nats/token.")


def verdict_lines(verdict: pd.DataFrame, n_neurons: int, level: float = LEVEL, name=str) -> list[str]:
    """The report's opening verdict, one bullet per k, worded from the numbers alone; `name` renders the
    methods' labels (markdown.escape for the report)."""
    lines = []
    pct_level = f"{100 * level:g} %"
    for r in verdict.to_dict("records"):
        pct = 100 * r["k"] / n_neurons if n_neurons else np.nan
        effect = (f"ΔNLL {_fmt(r['winner_delta_nll'])} nats/token [{_fmt(r['winner_ci_low'])}, "
                  f"{_fmt(r['winner_ci_high'])}] ({pct_level} CI)")
        if r["winner_ci_low"] > 0:
            s = f"k = {r['k']} ({pct:.1f} % of neurons): **{name(r['winner'])}** found the most influential neurons, {effect}"
        else:  # ranked first, but its ablation does not raise the loss
            s = (f"k = {r['k']} ({pct:.1f} % of neurons): **no method's neurons raise the loss** distinguishably from "
                 f"0; the largest effect, {name(r['winner'])}'s, is {effect}")
        vs = null_phrase(r.get("winner_random_n"), r.get("winner_p_random"), r.get("winner_z_random", np.nan),
                         r.get("winner_p_random_empirical_holm", np.nan))
        s += f", {vs}" if vs else ""
        if isinstance(r.get("runner_up"), str):
            clear = r["margin_ci_low"] > 0
            s += (f"; {'ahead of' if clear else 'not separable from'} {name(r['runner_up'])} "
                  f"(difference {_fmt(r['margin'])} [{_fmt(r['margin_ci_low'])}, {_fmt(r['margin_ci_high'])}])")
        s += "."
        for kind, words, _ in GRAPH_KINDS:
            if not isinstance(r.get(f"{kind}_best"), str) or r[f"{kind}_best"] == r["winner"]:
                continue
            parts = [f"{r[f'{kind}_vs_{b}_verdict']} {b} ({_fmt(r[f'{kind}_vs_{b}'])} "
                     f"[{_fmt(r[f'{kind}_vs_{b}_ci_low'])}, {_fmt(r[f'{kind}_vs_{b}_ci_high'])}])"
                     for b in BASELINES if isinstance(r.get(f"{kind}_vs_{b}_verdict"), str)]
            g_vs = null_phrase(r.get(f"{kind}_random_n"), r.get(f"{kind}_p_random"), r.get(f"{kind}_z_random", np.nan),
                               r.get(f"{kind}_p_random_empirical_holm", np.nan))
            if parts or g_vs:
                s += f" The best {words} method, {name(r[f'{kind}_best'])}, " + " and ".join(parts)
                s += (f"; it is {g_vs}" if parts else f"is {g_vs}") if g_vs else ""
                s += "."
        seed = seed_phrase(r, name)
        s += f" {seed}" if seed else ""
        lines.append("- " + s)
    familywise = familywise_line(verdict)
    return lines + (["- " + familywise] if familywise else [])


def graph_beats_from(verdict: pd.DataFrame, base: str = "activation_count", kind: str = "graph") -> int | None:
    """The smallest k from which the best graph method of `kind` (GRAPH_KINDS) beats `base` at every k of the
    verdict (its paired CI above 0), or None when it does not at the largest k."""
    col = f"{kind}_vs_{base}_verdict"
    if not len(verdict) or col not in verdict.columns:
        return None
    rows = verdict.sort_values("k")
    beats = (rows[col] == "beats").to_numpy()
    if not beats[-1]:
        return None
    first = len(beats) - int(np.argmin(beats[::-1])) if not beats.all() else 0
    return int(rows["k"].iloc[first])


def dose_lines(verdict: pd.DataFrame, name=str) -> list[str]:
    """The dose-response verdict: the winner at each k, and the k from which the graph method beats activation
    count, if any."""
    if not len(verdict):
        return []
    rows = verdict.sort_values("k")
    ks = rows["k"].tolist()
    s = "Winner at each k: " + ", ".join(f"{k}: {name(w) if lo > 0 else 'none (no CI above 0)'}"
                                         for k, w, lo in zip(ks, rows["winner"], rows["winner_ci_low"])) + "."
    for kind, words, _ in GRAPH_KINDS:
        col = f"{kind}_vs_activation_count_verdict"
        if col in rows.columns and rows[col].notna().any():
            k0 = graph_beats_from(rows, kind=kind)
            s += (f" The best {words} method beats activation_count from k = {k0} on (paired CI above 0 at every k "
                  f"from there)." if k0 is not None else
                  f" There is no k of the grid ({ks[0]} to {ks[-1]}) from which the best {words} method beats "
                  f"activation_count at every larger k.")
    return ["- " + s]


def winner_disagreement(primary: pd.DataFrame, other: pd.DataFrame, name=str) -> str:
    """Where two verdicts (real text, own continuations) name different winners at the same k, in words."""
    if primary is None or other is None or not len(primary) or not len(other):
        return ""
    a = dict(zip(primary["k"], primary["winner"]))
    b = dict(zip(other["k"], other["winner"]))
    differ = [k for k in sorted(a) if k in b and a[k] != b[k]]
    if not differ:
        return "The own-continuation metric names the same winner at every k."
    return ("**The two metrics name different winners** at " + ", ".join(
        f"k = {k} (real text: {name(a[k])}; own continuations: {name(b[k])})" for k in differ) + ".")


def mean_check_lines(check: pd.DataFrame, name=str) -> list[str]:
    """The mean-ablation check (layout.MEAN_CHECK_COLUMNS) in words: at which k the best methods keep their order
    on the test part when each neuron is replaced by its mean instead of 0, and where the order changes."""
    if not len(check):
        return []
    held = [int(r["k"]) for r in check.to_dict("records") if r["order_holds"]]
    top = int(check["methods"].max())
    out = [f"Under mean ablation (each neuron replaced by its mean over the selection data, not 0), the order of "
           f"each k's {top} best methods "
           + (f"holds at every k ({', '.join(map(str, held))})." if len(held) == len(check) else
              f"holds at k = {', '.join(map(str, held))}." if held else "holds at no k.")]
    for r in check.to_dict("records"):
        if r["order_holds"]:
            continue
        margin = ("" if pd.isna(r.get("mean_margin")) else
                  f", difference {_fmt(r['mean_margin'])} [{_fmt(r['mean_margin_ci_low'])}, "
                  f"{_fmt(r['mean_margin_ci_high'])}]" + ("" if r["mean_margin_ci_low"] > 0 else
                                                          ", not separable"))
        out.append(f"At k = {int(r['k'])} it changes: zero ablation ranks {name(r['zero_order'])}, mean ablation "
                   f"{name(r['mean_order'])}{margin}.")
    return ["- " + line for line in out]
