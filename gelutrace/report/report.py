"""
The closing report of a pipeline run: `<dataset>/report.md`, which embeds the plots and states every
parameter, and a short summary on the terminal. Reads only what the stages wrote.

    python -m gelutrace.report DATASET_DIR [--model_type M --input_csv CSV ...]   (run_pipeline.sh calls it)
"""

import datetime
import json
from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace import PipelineError
from gelutrace.evaluate import statistics as stats
from gelutrace.files import atomic, formats, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.files.plots import plot_degree_at_thresholds, plot_layer_activity
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.report import markdown, verdict
from gelutrace.selection import communities

UNSTABLE_JACCARD = 0.5  # below this, most of a subset's neurons change between the halves of the selection data


def md_table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else floatfmt.format(v)
        return markdown.escape(v)
    lines = ["| " + " | ".join(map(markdown.escape, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def collect(data: Path) -> dict:
    ds = DatasetDir.find(data)
    m = ds.m
    out = {"m": m, "data": data}
    freq = ds.frequencies()
    meta = formats.read_graph_meta(data, m)
    rec = ds.corpus_record()
    out["corpus"] = rec is not None
    out["neuron_effects"] = layout.path(data, layout.NEURON_EFFECTS, m).is_file()
    if rec is not None:
        out.update(samples=int(rec["samples"]), source=f"{rec['documents']:,} documents ({rec['tokens']:,} tokens, "
                                                          f"windows of {rec['context']}), read teacher-forced")
    else:
        ds = pd.read_csv(layout.path(data, layout.DATASET, m), usecols=["sample_id", "input_text_ids", "prompt_sample_idx"],
                         keep_default_na=False)
        out.update(samples=len(ds), source=f"{ds['input_text_ids'].nunique()} prompts")
    out.update(meta=meta, freq=freq)
    layer = freq.groupby("layer")
    out["layers"] = pd.DataFrame({
        "layer": layer.size().index,
        "mean_fraction_active": layer["activation_frequency"].mean().values,
        "never_active": layer["activation_count"].apply(lambda c: int((c == 0).sum())).values,
        "always_active": layer["activation_frequency"].apply(lambda f: int((f == 1).sum())).values,
    })
    analysis = data / layout.ANALYSIS_DIR
    out["sweep"] = pd.read_csv(analysis / layout.THRESHOLD_CSV) if (analysis / layout.THRESHOLD_CSV).is_file() else None
    subsets = []
    for side in sorted((data / layout.SUBSETS_DIR).glob("*.json")):
        s = json.loads(side.read_text())
        subsets.append({"subset": s.get("subset", side.stem + ".npy"), "method": s.get("method"),
                        "graph": s.get("graph"), "weight": s.get("weight"),
                        "threshold": s.get("threshold"), "ratio": s.get("ratio"), "k": s.get("k"),
                        "edges_kept": s.get("edges_kept"),
                        "per_layer": " ".join(f"L{a}:{b}" for a, b in s.get("per_layer_counts", {}).items())})
    out["subsets"] = pd.DataFrame(subsets)
    results = data / layout.RESULTS_DIR
    summary = results / layout.PERTURBATION_SUMMARY
    tables = {"comparison": layout.COMPARISON, "verdict": layout.METHOD_VERDICT, "overlap": layout.METHOD_OVERLAP,
              "agreement": layout.METHOD_AGREEMENT, "continuation_comparison": layout.CONTINUATION_COMPARISON,
              "continuation_verdict": layout.CONTINUATION_VERDICT, "dose": layout.DOSE_RESPONSE,
              "breakdown": layout.TEXT_BREAKDOWN, "module_effects": layout.MODULE_EFFECTS, "module_tokens": layout.MODULE_TOKENS,
              "module_contexts": layout.MODULE_CONTEXTS, "mean_check": layout.MEAN_CHECK,
              "mean_dose": layout.MEAN_DOSE_RESPONSE, "verdict_excluded": layout.METHOD_VERDICT_EXCLUDED,
              "dose_excluded": layout.DOSE_RESPONSE_EXCLUDED}
    atomic.verify_output_set(results / layout.RESULTS_MANIFEST, [p for p in (summary, *(results / n for n in (
        layout.EVALUATION, layout.COMPARISON_RECORD, *tables.values()))) if p.is_file()], "stage e")
    out["effects"] = pd.read_csv(summary) if summary.is_file() else None
    for key, name in tables.items():
        # token texts such as "NA" or "" stay text
        kw = (dict(keep_default_na=False, na_values={"nll": [""], "delta_nll": [""]})
              if key in ("breakdown", "module_tokens", "module_contexts") else {})
        out[key] = pd.read_csv(results / name, **kw) if (results / name).is_file() else None
    ev = results / layout.EVALUATION
    out["evaluation"] = json.loads(ev.read_text()) if ev.is_file() else None
    rec = results / layout.COMPARISON_RECORD
    out["record"] = json.loads(rec.read_text()) if rec.is_file() else None
    fidelity = [layout.path(data, f, m) for f in (layout.EDGE_FIDELITY, layout.EDGE_FIDELITY_SUMMARY)]
    out["fidelity"] = None
    if all(p.is_file() for p in fidelity):
        atomic.verify_output_set(layout.path(data, layout.EDGE_FIDELITY_MANIFEST, m), fidelity, "c_measure_edge_fidelity")
        f = pd.read_csv(fidelity[1])
        store = layout.path(data, layout.WEIGHTED_GRAPH, m) / layout.GRAPH_STORE_HEADER
        uid = json.loads(store.read_text()).get("uid") if store.is_file() else None
        # measured on another store than the dataset's own (rebuilt since): not quoted, and said
        current = "store_uid" in f and (f["store_uid"] == uid).all()
        out["fidelity"] = f if current else None
        out["fidelity_stale"] = not current
    out["modules"] = []
    for side in sorted((data / layout.MODULES_DIR).glob(layout.MODULES_RECORD.format(m=m, weight="*"))):
        if side.name.endswith("_manifest.json"):
            continue
        weight = side.stem[len(f"{m}_modules_"):]
        names = [data / layout.MODULES_DIR / f.format(m=m, weight=weight) for f in (layout.MODULES, layout.MODULES_RECORD)]
        atomic.verify_output_set(data / layout.MODULES_DIR / layout.MODULES_MANIFEST.format(m=m, weight=weight), names,
                             "c_find_modules")
        out["modules"].append((weight, json.loads(side.read_text())))
    out["commands"] = {}  # per stage of run_pipeline.sh: the commands it ran (.run), else its stamp's command
    for p in sorted((data / layout.PIPELINE_STAMPS).glob("*.cmd")):
        ran = p.with_suffix(".run")
        out["commands"][p.stem] = (ran.read_text().splitlines() if ran.is_file()
                                   else [p.read_text().split("# csv ")[0].strip()])
    return out


def effect_table(effects: pd.DataFrame) -> pd.DataFrame:
    cols = ["subset", "k", "delta_nll", "delta_nll_ci_low", "delta_nll_ci_high", "delta_nll_random_mean",
            "delta_nll_random_q95", "delta_nll_p_random", "delta_nll_z_random", "kl", "kl_ci_low", "kl_ci_high",
            "kl_random_mean", "kl_p_random", "kl_vs_random", "token_agreement", "first_diff_position"]
    return effects[[c for c in cols if c in effects.columns]]


def evaluation_sentence(ev: dict | None, name=markdown.escape) -> str:
    """The sentence saying what the neurons were chosen and measured on; `name` formats file names."""
    if ev is None:
        return ""
    evl = name(Path(ev["eval_csv"]).name)
    if "selection_corpus" in ev:
        corpus = ", ".join(name(Path(p).name) for p in ev["selection_corpus"])
        s = (f"The neurons were chosen on a corpus ({corpus}, {ev.get('selection_tokens') or 0:,} tokens read "
             f"teacher-forced) and their effects measured on the prompts of {evl} ({ev['eval_prompts']} prompts)")
        if ev["prompts_in_both"] is None:
            return s + ("; whether those prompts occur in the corpus was not checked (corpus too large, moved or "
                        "changed since stage b).")
        if ev["held_out"]:
            return s + ", none of which occurs in the corpus."
        return s + (f", {ev['prompts_in_both']} of which occur in the corpus: **not a held-out evaluation**, so "
                    f"every method's effect may be overstated.")
    sel = name(Path(ev["selection_csv"]).name)
    if ev["held_out"]:
        return (f"The neurons were chosen on the dataset's prompts ({sel}, {ev['selection_prompts']} prompts) and "
                f"their effects measured on held-out prompts ({evl}, {ev['eval_prompts']} prompts, none shared).")
    return (f"The neurons were chosen on {sel} and their effects measured on {evl}, which shares "
            f"{ev['prompts_in_both']} of its {ev['eval_prompts']} prompts with it: **not a held-out evaluation**, so "
            f"every method's effect may be overstated.")


def text_sentence(ev: dict | None, name=markdown.escape) -> str:
    """What real text measured the effects, and what the leak check found; '' without a real-text evaluation."""
    t = (ev or {}).get("eval_text")
    if not t:
        return ""
    files = ", ".join(name(Path(f["path"]).name) for f in t["files"])
    s = (f"The verdict's effects are measured on real held-out text: {t['tokens_scored']:,} tokens of {files} "
         f"({t['documents']:,} document(s), windows of {t['context']} tokens), teacher-forced.")
    leak = t.get("leak_check") or {}
    if leak.get("selection_files_checked"):
        what = "no file and no document" if leak.get("documents_checked") else (
            "no file (its documents were not compared: corpus moved or changed since stage b)")
        if leak.get("documents_checked") and False in (leak.get("selection_checked_whole"),
                                                       leak.get("eval_checked_whole")):
            what += f" in the first {leak['bytes_limit'] / 2**20:g} MiB of each text's documents"
        s += f" It shares {what} with the corpus the neurons were chosen on (sha256)."
    if leak.get("selection_prompts_in_text") is not None:
        s += f" {leak['selection_prompts_in_text']} of the prompts the neurons were chosen on occur in it verbatim."
    return s


def settings_sentence(ev: dict | None, record: dict | None) -> str:
    """What the verdict's numbers are, in the run's own words: the ablation, the metric, the CI, the split."""
    ev, record = ev or {}, record or {}
    level = f"{100 * ev.get('confidence_level', stats.LEVEL):g} %"
    ablation = {"zero": "set to 0", "mean": "set to their mean activation"}.get(ev.get("ablation"), "ablated")
    units = record.get("units", "prompts")
    if record.get("metric") == "real_text":
        s = (f"Effect = increase in the negative log-likelihood of the real next token (ΔNLL, nats/token) when the "
             f"k neurons' outputs are {ablation} together, at every position of every window; [{level} bootstrap "
             f"CI over the text's {units}]; differences are paired (same {units}, same resamples).")
    else:
        s = (f"Effect = increase in the negative log-likelihood of the unablated model's own continuation (ΔNLL, "
             f"nats/token) when the k neurons' outputs are {ablation} together, at every position; [{level} "
             f"bootstrap CI over prompts]; differences are paired (same prompts, same resamples).")
    if record.get("nested"):
        s += (f" Each method is represented by its best variant (for graph methods, a threshold), chosen on a "
              f"validation part of the evaluation {units} ({len(record[f'validation_{units}'])} {units}, seeded "
              f"split, `{layout.RESULTS_DIR}/{layout.COMPARISON_RECORD}`); every figure here is measured on the other "
              f"{len(record[f'test_{units}'])}, which chose nothing.")
    elif record:
        s += (f" Too few evaluation {units} to split (fewer than {stats.MIN_SPLIT_PROMPTS}): each method's best "
              f"variant was chosen on the same {units} that score it, so the figures are **biased toward the "
              f"variants chosen**.")
    n = record.get("random_controls") or ev.get("random_controls") or 0
    if n >= stats.MIN_CONTROLS:
        whose = ("each k's winner on the validation part (the only subsets given controls)"
                 if record.get("control_subsets") == "best" else "the subset")
        s += (f" The null: {n} random subsets with the number of neurons in every layer of {whose}; p is the "
              f"one-sided empirical p-value (at least {1 / (n + 1):.2g} with {n} controls), z the controls' "
              f"standard deviations the value lies above their mean, and a method is above random when p is "
              f"below {stats.ALPHA:g}; the family-wise p is Holm's adjustment of the empirical p-values across the "
              f"m comparisons with controls, at least m/(N + 1). The normal approximation (z's Gaussian tail) is "
              f"in the CSVs only, labelled as such.")
        control = record.get(f"control_{units}")
        if control is not None and record.get("nested") and len(control) < len(record[f"test_{units}"]):
            s += (f" The controls are scored on {len(control)} of the test part's {len(record[f'test_{units}'])} "
                  f"{units} (seeded, `--control_share {record.get('control_share'):g}`, for their cost), and p and "
                  f"z compare the subset with them on those same {units}.")
    else:
        s += (f" **{n} random controls per subset: p-values are too coarse (at least {1 / (n + 1):.2g}), so no "
              f"claim against random neurons is made** (run with --random_controls {stats.MIN_CONTROLS} or more).")
    return s


def effects_note(info: dict, n_neurons: int, params: dict | None = None) -> list[str]:
    """Without measured single-neuron effects, that the comparison has no single-neuron ablation to stand against,
    the flag that adds it and its cost; [] with them."""
    c = info.get("comparison")
    if info.get("neuron_effects") or (c is not None and "method" in c.columns and "ablation" in set(c["method"])):
        return []
    s = ("**No single-neuron ablation is compared here**: stage d had no measured single-neuron effects "
         f"(`{layout.NEURON_EFFECTS.format(m=info['m'])}`), so there is no `ablation` method and no "
         "agreement with measured effects. ")
    if info.get("corpus"):
        tokens = str((params or {}).get("effect_tokens", ""))
        cost = (f"{n_neurons:,} × {int(tokens):,} = {n_neurons * int(tokens) / 1e6:.3g} M here" if tokens.isdigit()
                else f"{n_neurons:,} × N here")
        s += ("`run_pipeline.sh --effects 1` adds them (off by default in corpus mode for their cost): each neuron "
              "ablated alone over the corpus's first `--effect_tokens N` tokens, one forward pass over them per "
              f"neuron, so neurons × N token-forwards ({cost}).")
    else:
        s += ("`run_pipeline.sh --effects 1` adds them: one ablated pass over the dataset's samples per neuron "
              f"({n_neurons:,} neurons).")
    return [s, ""]


def verdict_section(info: dict, n_neurons: int, params: dict | None = None) -> list[str]:
    v = info["verdict"]
    if v is None or not len(v):
        return []
    ev = info["evaluation"]
    level = (ev or {}).get("confidence_level", stats.LEVEL)
    lines = ["## Verdict", ""]
    if info.get("dose") is not None and len(info["dose"]) and (info["data"] / layout.RESULTS_DIR / layout.DOSE_RESPONSE_PLOT).is_file():
        lines += [f"![dose-response]({markdown.url(f'{layout.RESULTS_DIR}/{layout.DOSE_RESPONSE_PLOT}')})", ""]
    lines += [evaluation_sentence(ev), ""]
    real = text_sentence(ev)
    lines += [real, ""] if real else []
    lines += [settings_sentence(ev, info["record"]), ""]
    lines += budget_lines(info)
    lines += verdict.verdict_lines(v, n_neurons, level, markdown.escape)
    lines += verdict.dose_lines(v, markdown.escape) + [""]
    lines += effects_note(info, n_neurons, params)
    other = info.get("continuation_verdict")
    if other is not None:
        lines += [verdict.winner_disagreement(v, other, markdown.escape), ""]
    lines += [same, ""] if (same := excluded_winner_sentence(v, info.get("verdict_excluded"), info["record"])) else []
    c = info["comparison"]
    if c is not None and len(c):
        filler = c[c["filler"].astype(bool)] if "filler" in c.columns else c.iloc[:0]
        best = c[c["best"].astype(bool)]
        if "tie_pool" in best.columns:
            split = best[best["tie_pool"].fillna(0) > best["tied_picks"].fillna(0)]
            if len(split):
                lines += ["Picks drawn by the seeded random tie-break (the k-th pick's score is shared by neurons "
                          "left out): " + "; ".join(f"{markdown.escape(r.subset)} {int(r.tied_picks)} of {int(r.k)} picks, from "
                                                    f"{int(r.tie_pool)} tied neurons" for r in split.itertuples())
                          + ".", ""]
        if "selection_jaccard" in best.columns:
            lines += stability_lines(best, info["record"])
        if len(filler):
            lines += [f"{len(filler)} variant(s) had more than half of their picks at score 0 (filled by the "
                      f"random tie-break, not chosen by their score) and could not stand for their method: "
                      + ", ".join(markdown.escape(x) for x in filler["subset"]) + ".", ""]
    return lines


def budget_lines(info: dict) -> list[str]:
    """What this run's evaluation budget buys: the smallest p-value its controls allow and the CIs' widths."""
    record, dose = info["record"] or {}, info.get("dose")
    n = record.get("random_controls") or 0
    units = record.get("units", "prompts")
    t = (info["evaluation"] or {}).get("eval_text") or {}
    parts = []
    if t:
        parts.append(f"{t['tokens_scored']:,} tokens scored")
    if record.get(f"test_{units}") is not None:
        parts.append(f"{len(record[f'test_{units}'])} test {units}")
    if dose is not None and len(dose):
        ks = sorted(dose["k"].unique())
        parts.append(f"a grid of {len(ks)} k ({', '.join(map(str, ks))})")
    if n:
        whose = "for each k's winner" if record.get("control_subsets") == "best" else "per subset"
        parts.append(f"{n} random controls {whose}, so the smallest possible p is 1/{n + 1} = {1 / (n + 1):.2g}")
    if not parts:
        return []
    s = "This evaluation's budget: " + "; ".join(parts) + "."
    if dose is not None and len(dose) and dose["winner"].astype(bool).any():
        w = dose[dose["winner"].astype(bool)]
        width = (w["delta_nll_ci_high"] - w["delta_nll_ci_low"]).to_numpy(np.float64)
        rel = width / np.abs(w["delta_nll"].to_numpy(np.float64))
        s += (f" The winners' CIs are {np.nanmin(width):.2g} to {np.nanmax(width):.2g} nats/token wide "
              f"({100 * np.nanmin(rel):.0f} to {100 * np.nanmax(rel):.0f} % of their ΔNLL).")
    return [s, ""]


def layer_words(layers: list) -> str:
    """'layer 0', 'layers 0 and 1', 'layers 0, 1 and 2'."""
    names = [str(a) for a in layers] or ["?"]
    return f"layer {names[0]}" if len(names) == 1 else f"layers {', '.join(names[:-1])} and {names[-1]}"


def excluded_winner_sentence(full: pd.DataFrame | None, excluded: pd.DataFrame | None, record: dict | None,
                             name=markdown.escape) -> str:
    """
    Whether each k's winner is the same when stage d ranks without some layers (its --exclude_layers): the
    excluded comparison's winner against the full comparison's first among the same methods (its `ranking`); ''
    without an excluded comparison.
    """
    if full is None or excluded is None or not len(full) or not len(excluded):
        return ""
    what = layer_words((record or {}).get("exclude_layers") or [])
    ranked = dict(zip(full["k"], full["ranking"].astype(str).str.split(" > ")))
    both, compared, differ, absent = set(), 0, [], []
    for k, ranking in sorted(zip(excluded["k"], excluded["ranking"].astype(str))):
        methods = ranking.split(" > ")
        first = next((m for m in ranked.get(k, []) if m in methods), None)
        if first is None:
            continue
        both.update(methods)
        compared += 1
        if first != methods[0]:
            differ.append(f"k = {k}: {name(methods[0])} instead of {name(first)}")
        if ranked[k][0] not in methods:
            absent.append(f"{name(ranked[k][0])} at k = {k}")
    if not compared:
        return ""
    s = f"With {what} excluded (among the methods ranked both ways: {', '.join(name(m) for m in sorted(both))}), "
    s += "the winner differs at " + "; ".join(differ) + "." if differ else "the winner is the same at every k."
    if absent:
        s += f" The full comparison's own winner was not ranked without {what}: {', '.join(absent)}."
    return s


def excluded_section(info: dict) -> list[str]:
    """The dose-response of the subsets stage d ranked without some layers (--exclude_layers) beside the full
    one: the two plots and a table of each method's best variant at each k both ways."""
    full, dx = info.get("dose"), info.get("dose_excluded")
    if dx is None or not len(dx):
        return []
    what = layer_words((info["record"] or {}).get("exclude_layers") or [])
    results = info["data"] / layout.RESULTS_DIR
    lines = [f"## Without {what}", "",
             f"The methods ranked again with the neurons of {what} left out (stage d `--exclude_layers`: each neuron "
             f"keeps its score, k counts neurons of the other layers), compared among themselves on the same "
             f"{'text' if (info['record'] or {}).get('metric') == 'real_text' else 'prompts'}"
             + (", with random controls drawn from the same layers as each subset (so none from " + what + ")"
                if dx.get("random_n", pd.Series(dtype=float)).fillna(0).gt(0).any() else
                " (without random controls: `--control_subsets best` gives them to the main comparison's winners; "
                "the question here is whether the winner is the same)")
             + f"; all of it in `{layout.RESULTS_DIR}/{layout.COMPARISON_EXCLUDED}`.", ""]
    plots = [(t, f"{layout.RESULTS_DIR}/{f}") for t, f in (("all layers", layout.DOSE_RESPONSE_PLOT),
                                                          (f"without {what}", layout.DOSE_RESPONSE_EXCLUDED_PLOT))
             if (results / f).is_file()]
    if plots:
        lines += ["| " + " | ".join(t for t, _ in plots) + " |", "|" + "---|" * len(plots),
                  "| " + " | ".join(f"![dose-response, {t}]({markdown.url(p)})" for t, p in plots) + " |", ""]
    sentence = excluded_winner_sentence(info.get("verdict"), info.get("verdict_excluded"), info["record"])
    lines += [sentence, ""] if sentence else []

    def ci(d):
        return [f"[{lo:.3g}, {hi:.3g}]" for lo, hi in zip(d["delta_nll_ci_low"], d["delta_nll_ci_high"])]

    def columns(d, where):
        return pd.DataFrame({"k": d["k"], "method": d["method"], f"ΔNLL {where}": d["delta_nll"],
                             f"CI {where}": ci(d), f"p_random {where}": d["p_random"],
                             f"first {where}": np.where(d["winner"].astype(bool), "yes", "")})

    table = columns(dx, f"without {what}")
    if full is not None and len(full):
        table = table.merge(columns(full, "all layers"), on=["k", "method"], how="left")
        table[["CI all layers", "first all layers"]] = table[["CI all layers", "first all layers"]].fillna("")
    lines += ["Each method's best variant at each k, both ways (`first`: ranked first at that k; `p_random`: "
              "empirical, against its layer-matched controls, where it had them):", "",
              md_table(table.sort_values(["k", "method"], kind="stable")), ""]
    return lines


def continuation_section(info: dict, n_neurons: int) -> list[str]:
    """With a real-text verdict, the own-continuation comparison as the second table."""
    v, c = info.get("continuation_verdict"), info.get("continuation_comparison")
    ev = info["evaluation"] or {}
    if (v is None or not len(v)) and ev.get("own_continuation") is False and ev.get("eval_text"):
        cost = ev.get("own_continuation_token_forwards")
        return ["## Own-continuation comparison", "",
                "Not measured: stage e ran with `--own_continuation 0`, so the subsets were scored on the real text "
                "only (the prompts' free-running token agreement is still in the summary). `--own_continuation 1` "
                "adds the original metric, the increase in the loss of the unablated model's own greedy continuations"
                + (f", at {cost:,} more teacher-forced token-forwards" if cost else "") + ".", ""]
    if v is None or not len(v):
        return []
    record = {**(info["record"] or {}).get("continuation_split", {}), "random_controls": (info["record"] or {}).get(
        "random_controls"), "control_subsets": (info["record"] or {}).get("control_subsets")}
    lines = ["## Own-continuation comparison", "",
             "The same subsets measured the original way, on the unablated model's own greedy continuations of the "
             "evaluation prompts (its confidence in its own argmax, not the loss on real text). " +
             settings_sentence(ev, {**record, "metric": "continuation"}), ""]
    lines += verdict.verdict_lines(v, n_neurons, ev.get("confidence_level", stats.LEVEL), markdown.escape) + [""]
    if c is not None and len(c):
        best = c[c["best"].astype(bool)]
        cols = ["k", "method", "variant", "delta_nll", "delta_nll_ci_low", "delta_nll_ci_high", "delta_nll_p_random",
                "kl", "token_agreement"]
        lines += [md_table(best[[x for x in cols if x in best.columns]]), ""]
    return lines


def mean_check_section(info: dict) -> list[str]:
    """With --mean_ablation_top: whether the best methods keep their order when mean-ablated instead of zeroed."""
    check = info.get("mean_check")
    if check is None or not len(check):
        return []
    lines = ["## Under mean ablation", "",
             "Zeroing a neuron that fires on most tokens moves the residual stream where it never goes. Each k's "
             f"{int(check['methods'].max())} best methods (chosen on the validation part, under zero ablation) are "
             "measured again with each neuron replaced by its mean over the selection data, on the same test part, "
             "each k's first of them against its own layer-matched controls, mean-ablated too.", ""]
    plot = info["data"] / layout.RESULTS_DIR / layout.MEAN_DOSE_RESPONSE_PLOT
    if plot.is_file():
        lines += [f"![dose-response under mean ablation]"
                  f"({markdown.url(f'{layout.RESULTS_DIR}/{layout.MEAN_DOSE_RESPONSE_PLOT}')})", ""]
    lines += verdict.mean_check_lines(check, markdown.escape) + [""]
    cols = ["k", "zero_order", "mean_order", "order_holds", "zero_delta_nll", "mean_delta_nll", "mean_margin",
            "mean_margin_ci_low", "mean_margin_ci_high", "mean_first_p_random"]
    lines += [md_table(check[cols]), ""]
    return lines


def breakdown_section(info: dict) -> list[str]:
    """Real-text ΔNLL of each k's winner by position in the window and by next token."""
    b, dose = info.get("breakdown"), info.get("dose")
    if b is None or not len(b) or dose is None or not dose["winner"].astype(bool).any():
        return []
    winners = dose[dose["winner"].astype(bool)].sort_values("k")
    base = b[b["subset"] == b["subset"].iloc[0]]
    table = pd.DataFrame({"breakdown": base["breakdown"].to_numpy(),
                          "bucket": [markdown.token_cell(str(x)) if kind == "next_token" else str(x)
                                     for kind, x in zip(base["breakdown"], base["bucket"])],  # md_table escapes it
                          "tokens": base["tokens"].to_numpy(), "NLL": base["nll"].to_numpy()})
    for r in winners.itertuples():
        rows = b[b["subset"] == r.subset]
        if len(rows) == len(table):
            table[f"k={r.k} {r.method}"] = rows["delta_nll"].to_numpy()
    lines = ["## Where the loss goes", "",
             "Real-text ΔNLL of each k's winner by the token's position in its window and for the text's most "
             "frequent next tokens (`NLL`: the unablated model's, nats/token; all subsets in "
             f"`{layout.RESULTS_DIR}/{layout.TEXT_BREAKDOWN}`):", ""]
    return lines + [md_table(table), ""]


def stability_lines(best: pd.DataFrame, record: dict | None) -> list[str]:
    """How stable each method's choice is between the halves of the selection data, from the comparison rows."""
    halves = (record or {}).get("selection_halves") or {}
    if not halves.get("available"):
        why = halves.get("halves")
        return [f"Stability of the selection not measured{f' ({markdown.escape(why)})' if why else ''}.", ""]
    rows = best[best["method"] != stats.REFERENCE].dropna(subset=["selection_jaccard"])
    if not len(rows):
        return []
    unstable = rows[rows["selection_jaccard"] < UNSTABLE_JACCARD]
    chance = best[best["method"] == stats.REFERENCE]
    parts = ", ".join(f"{markdown.escape(r.method)} {r.selection_jaccard:.2f} (k={int(r.k)})" for r in rows.itertuples())
    line = (f"Stability of the selection ({markdown.escape(halves.get('halves', ''))}): the Jaccard overlap of the "
            f"neurons each method chooses on either half is {parts}")
    if len(chance):
        line += ("; two random draws share " + ", ".join(f"{r.selection_jaccard:.2f} (k={int(r.k)})"
                                                         for r in chance.itertuples()))
    line += "."
    if len(unstable):
        line += (f" Below {UNSTABLE_JACCARD}, " + ", ".join(sorted({markdown.escape(m) for m in unstable["method"]}))
                 + " would choose mostly other neurons on other data: more selection data is needed before its "
                   "neurons are quoted.")
    return [line, ""]


def comparison_section(info: dict, data: Path) -> list[str]:
    c = info["comparison"]
    if c is None or not len(c):
        return []
    results = data / layout.RESULTS_DIR
    lines = ["## Method comparison", ""]
    if (results / layout.COMPARISON_PLOT).is_file():
        lines += [f"![method comparison]({markdown.url(f'{layout.RESULTS_DIR}/{layout.COMPARISON_PLOT}')})", ""]
    cols = ["k", "method", "variant", "delta_nll", "delta_nll_ci_low", "delta_nll_ci_high", "delta_nll_random_mean",
            "delta_nll_random_q95", "delta_nll_p_random", "delta_nll_z_random", "delta_nll_p_random_empirical_holm",
            "delta_nll_p_random_holm", "kl",
            "kl_p_random", "token_agreement", "delta_nll_validation", "selection_jaccard", "tied_picks",
            "zero_score_picks"]
    best = c[c["best"].astype(bool)]
    lines += ["Each method's best variant at each k, on the test prompts (`*_random_*`: random subsets with the "
              "same number of neurons in each layer; `p_random`: empirical one-sided p-value; "
              "`p_random_empirical_holm`: it Holm-adjusted across these rows (at least m/(N + 1)); `z_random`: "
              "standard deviations above the controls' mean; `p_random_holm`: the normal approximation (z's "
              "Gaussian tail), Holm-adjusted across these rows; `delta_nll_validation`: "
              "the figure that chose the variant; `selection_jaccard`: overlap of the subsets the method chooses on each "
              "half of the selection data, for random two independent draws; `tied_picks`: picks sharing the k-th "
              "pick's score):", "",
              md_table(best[[x for x in cols if x in best.columns]]), ""]
    if len(best) < len(c):
        every = c[[x for x in cols + ["filler", "subset"] if x in c.columns]]
        lines += ["Every variant (`filler`: more than half of its picks at score 0, never a method's best):", "",
                  md_table(every), ""]
    ov = info["overlap"]
    if ov is not None and len(ov):
        lines += ["Overlap of the methods' neurons (Jaccard):", "", md_table(ov, "{:.2f}"), ""]
    ag = info["agreement"]
    if ag is not None and len(ag):
        lines += ["Agreement with measured single-neuron effects (the dataset's prompts): Spearman correlation of "
                  "each method's score with every neuron's single-ablation ΔNLL, and top-k recall, the share of the "
                  "k neurons with the largest single effects that the subset holds:", "", md_table(ag, "{:.3f}"), ""]
    return lines


def cards_section(data: Path) -> list[str]:
    """The neuron cards f_render_neuron_cards.py wrote into the dataset directory, one heading level down."""
    md, page = data / layout.CARDS_DIR / layout.CARDS_MD, data / layout.CARDS_DIR / layout.CARDS_HTML
    if not md.is_file():
        return []
    lines = md.read_text(encoding="utf-8").split("\n")
    body = ["#" + line if line.startswith("#") else line for line in lines[1:]]  # the file's title is ours
    link = (f" The same cards, with each context shaded by the neuron's activation: "
            f"[{layout.CARDS_HTML}]({markdown.url(f'{layout.CARDS_DIR}/{layout.CARDS_HTML}')}).") if page.is_file() else ""
    return ["## Neuron cards", "", "The neurons of each selection method's best subset at the smallest k (at most 20 "
            "each) and the 10 with the largest single-neuron ΔNLL, where measured." + link, *body, ""]


def degree_plot(info: dict, data: Path) -> Path | None:
    """The node degrees at every threshold (and weight) stage d's graph methods used, or None without any."""

    subs = info["subsets"]
    if not len(subs):
        return None
    used = subs[subs["method"].isin(stats.GRAPH_METHODS)].dropna(subset=["threshold"])
    degrees = {}
    for (graph, weight, t), _ in used.groupby(["graph", "weight", "threshold"], dropna=False):
        try:
            g = gs.read_graph(graph)
        except (PipelineError, OSError):
            continue
        w = weight if isinstance(weight, str) else gr.DEFAULT_WEIGHT
        degrees[f"t={t:g}" + ("" if w == gr.DEFAULT_WEIGHT else f", {w}")] = g.degrees(g.cut(float(t), w))
    if not degrees:
        return None
    target = data / layout.ANALYSIS_DIR / layout.DEGREE_AT_THRESHOLDS_PLOT
    plot_degree_at_thresholds(degrees, target, f"{info['m']}: node degree at the thresholds stage d used")
    return target


def causal_page_lines(data: Path, m: str) -> list[str]:
    """The link to the causal graph's page (f_render_neuron_cards.py --causal_graph), where it was written."""
    rel = f"{layout.CARDS_DIR}/{layout.CAUSAL_PAGE.format(m=m)}"
    if not (data / rel).is_file():
        return []
    return [f"The most influential neurons and the strongest direct edges among them, with their modules and "
            f"cards, as a page to explore (no network needed): [{markdown.escape(rel)}]({markdown.url(rel)}).", ""]


def fidelity_section(info: dict, data: Path) -> list[str]:
    """How well the causal edges' first-order prediction matches zero-ablation (c_measure_edge_fidelity), and the
    link to the causal graph's page."""
    f = info.get("fidelity")
    m = info["m"]
    page = causal_page_lines(data, m)
    if info.get("fidelity_stale"):
        return ["## Causal graph: how faithful its edges are", "", *page,
                "The edge fidelity files measured another graph store than this dataset's (rebuilt since); rerun "
                "`c_measure_edge_fidelity.py` for figures.", ""]
    if f is None or not len(f):
        return ["## Causal graph", "", *page] if page else []
    overall = f[f["layer_gap"].astype(str) == "all"]
    row = (overall if len(overall) else f).iloc[0]
    lines = ["## Causal graph: how faithful its edges are", "", *page,
             f"{int(row['edges'])} edges of the causal graph (stage b `--direct_edges`), sampled across every decile "
             f"of |direct|: the first-order prediction (−direct, through the residual stream with the norm scales "
             f"held) against the change of the target neuron's mean value when the source is zero-ablated "
             f"outright (every path). Spearman {row['spearman']:.2f}; a line through 0 fits measured ≈ "
             f"{row['beta']:.2f} × predicted with R² {row['r2_through_0']:.2f}.", ""]
    plot = layout.path(data, layout.EDGE_FIDELITY_PLOT, m)
    if plot.is_file():
        lines += [f"![edge fidelity]({markdown.url(plot.name)})", ""]
    return lines + [md_table(f.drop(columns=["store_uid"], errors="ignore")), ""]


def modules_section(info: dict, data: Path) -> list[str]:
    """c_find_modules' modules of each weight against their null, and stage e's module ablations with module
    cards for the most effective."""

    if not info["modules"]:
        return []
    m = info["m"]
    lines = ["## Modules", "",
             "Leiden communities of the thinned neuron graph (`c_find_modules.py`), their modularity Q against "
             "the same detection on degree-preserving rewired graphs (each layer pair's edges swapped, every node's "
             "degree kept).", ""]
    for weight, rec in info["modules"]:
        ari = rec.get("seed_ari") or {}
        halves = (rec.get("halves") or {}).get("ari")
        stab = [f"adjusted Rand index between {ari['runs']} seeds: mean {ari['mean']:.3f}"] if ari.get("mean") is not None else []
        if halves is not None:
            stab.append(f"between the halves of the selection data: {halves:.3f}")
        sizes = rec.get("sizes") or []
        lines += [f"**{markdown.escape(weight)} graph.** " + markdown.escape(communities.verdict(rec))
                  + (f" Sizes: {', '.join(map(str, sizes[:12]))}{', ...' if len(sizes) > 12 else ''}." if sizes else "")
                  + (" " + "; ".join(stab) + "." if stab else ""), ""]
        pics = [(t, data / layout.MODULES_DIR / f.format(m=m, weight=weight)) for t, f in (
            ("modules by layer", layout.MODULES_LAYER_PLOT), ("module graph", layout.MODULES_GRAPH_PLOT))]
        lines += [" ".join(f"![{t}]({markdown.url(p.relative_to(data).as_posix())})"
                           for t, p in pics if p.is_file()), ""]
    eff = info.get("module_effects")
    if eff is None or not len(eff):
        return lines + ["No module was ablated (stage d `--modules`, then stage e).", ""]
    metric = "real-text ΔNLL" if (eff["metric"] == "real_text").all() else "own-continuation ΔNLL"
    alpha = stats.ALPHA
    beat = {n: int(((eff[n] < alpha) & (eff[f"{n}_holm"] < alpha)).sum()) for n in ("p_random", "p_weighted")}
    weighted = eff["p_weighted"].notna().any()
    lines += [f"Each module ablated as a unit ({metric}, nats/token, {100 * stats.LEVEL:g} % CI), against random "
              f"neurons of the same layers (`p_random`)"
              + (f" and against random neurons of the same layers drawn with probability proportional to each "
                 f"neuron's own strength ({markdown.escape(str(eff['control_weights'].dropna().iloc[0]))}; "
                 f"`p_weighted`): does the grouping matter beyond its neurons' individual effects?" if weighted else
                 "; no single-neuron effects or attribution were measured, so there is no effect-weighted null.")
              + f" `p`: the empirical p among the controls; `Holm`: the normal approximation's, Holm-adjusted across "
              f"the {len(eff)} modules; a module beats a null when both are below {alpha:g}. "
              f"{beat['p_random']} of {len(eff)} beat the layer-matched null"
              + (f" and {beat['p_weighted']} the effect-weighted null" if weighted else "") + ".", ""]
    table = pd.DataFrame({"module": [f"{w} M{k}" for w, k in zip(eff["weight"], eff["module"])], "k": eff["k"],
                          "layers": eff["layers"], "ΔNLL": eff["delta_nll"],
                          "CI": [f"[{lo:.3g}, {hi:.3g}]" for lo, hi in zip(eff["ci_low"], eff["ci_high"])],
                          "random": eff["random_mean"], "p_random": eff["p_random"], "Holm": eff["p_random_holm"],
                          "weighted": eff["weighted_mean"], "p_weighted": eff["p_weighted"],
                          "Holm ": eff["p_weighted_holm"],
                          "top tokens": eff["top_tokens"].fillna("").map(markdown.visible)})
    lines += [md_table(table), ""]
    tokens, contexts = info.get("module_tokens"), info.get("module_contexts")
    for r in eff.sort_values("delta_nll", ascending=False, kind="stable").head(5).itertuples():
        lines += [f"### Module {r.module} of the {markdown.escape(r.weight)} graph", "",
                  f"{r.k} neurons ({markdown.escape(r.layers)}); ablated: ΔNLL {r.delta_nll:.3g} [{r.ci_low:.3g}, "
                  f"{r.ci_high:.3g}], layer-matched random {r.random_mean:.3g} (empirical p = {r.p_random:.3g}; Holm "
                  f"on its normal approximation p{verdict.normal_p_text(r.p_random_holm)})"
                  + (f", effect-weighted random {r.weighted_mean:.3g} (empirical p = {r.p_weighted:.3g}; Holm on its "
                     f"normal approximation p{verdict.normal_p_text(r.p_weighted_holm)})"
                     if pd.notna(r.p_weighted) else "") + ".", ""]
        if tokens is not None and len(tokens):
            t = tokens[tokens["subset"] == r.subset]
            if len(t):
                lines += ["Next tokens whose loss rises most without it:", "",
                          md_table(pd.DataFrame({"token": [markdown.token_cell(str(x)) for x in t["token"]],
                                                 "count": t["tokens"], "NLL": t["nll"], "ΔNLL": t["delta_nll"]})), ""]
        if contexts is not None and len(contexts):
            c = contexts[contexts["subset"] == r.subset]
            if len(c):
                lines += ["Where its neurons fire together most (mean activation; the token in bold):", ""]
                for x in c.itertuples():
                    before = str(x.context)[:-len(f"[[{x.token}]]")]
                    lines.append(f"- {x.mean_activation:.3f}: {markdown.escape(markdown.visible(before))}"
                                 f"<b>{markdown.escape(markdown.visible(str(x.token)))}</b>")
                lines.append("")
    return lines


def trace_section(data: Path, m: str) -> list[str]:
    """With run_pipeline.sh --trace N: each traced prompt's top neurons by influence on its next token, the graph's
    scores and how faithful it is to the real model and typical of the corpus."""
    runs = sorted((p for p in (data / layout.TRACES_DIR).glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    runs = [p for p in runs if layout.path(p, layout.TRACE_SUMMARY_JSON, m).is_file()]
    if not runs:
        return []
    lines = ["## Per-prompt graphs", "",
             "For each traced evaluation prompt: which neurons made the model predict its next token, through which "
             "others (`b_trace_gelu_activations.py --graph`: attention patterns and normalisation scales frozen at "
             "the prompt's values, every edge exact for that frozen model; kept neurons chosen by influence on the "
             "top logits as circuit-tracer does). The replacement and completeness scores are circuit-tracer's, with "
             "the neurons not kept (\"other neurons\") in the role of its error nodes. Faithfulness: the 50 most "
             "influential nodes zeroed one at a time in the real model, the change of the top logit against the "
             "graph's prediction. Against the corpus: the Spearman correlation of the prompt's top neurons' influence "
             "with their corpus `influence` score (how typical the prompt is). Modules: whether the influence "
             "concentrates in few corpus modules, against random modules of the same sizes.", ""]
    for run in runs:
        rec = json.loads(layout.path(run, layout.TRACE_SUMMARY_JSON, m).read_text())
        table = pd.read_csv(layout.path(run, layout.TRACE_SUMMARY_CSV, m), keep_default_na=False).head(10)
        f, c, k = rec.get("faithfulness"), rec.get("corpus"), rec.get("concentration")
        facts = [f"{rec['kept_neurons']:,} neurons kept; next token "
                 f"{markdown.escape(markdown.token_cell(str(rec['top_token'])))} "
                 f"(p = {rec['top_probability']:.3g}); replacement score {rec['replacement_score']:.3f}, "
                 f"completeness {rec['completeness_score']:.3f}"]
        if f:
            facts.append(f"faithfulness: Spearman {f['spearman']:.3f}, signs agree for {100 * f['sign_agreement']:.0f} % "
                         f"of the {f['nodes']} most influential nodes")
        if c and c.get("spearman") is not None:
            facts.append(f"against the corpus ranking: Spearman {c['spearman']:.3f} (median corpus rank "
                         f"{c['median_corpus_rank']:.0f})")
        if k:
            facts.append(f"modules: {k['effective_modules']:.2f} effective modules against "
                         f"{k['null_effective_modules']:.2f} at random (permutation p = {k['p_value']:.3g})")
        rel = (run / layout.TRACE_GRAPH.format(m=m)).relative_to(data).as_posix()
        page = (run / layout.TRACE_PAGE.format(m=m)).relative_to(data).as_posix()
        view = (f" Page (no network needed): [{markdown.escape(page)}]({markdown.url(page)})."
                if (data / page).is_file() else "")
        lines += [f"### {markdown.escape(markdown.visible(rec['prompt']))}", "", "; ".join(facts) +
                  f". Graph file: [{markdown.escape(rel)}]({markdown.url(rel)})." + view, ""]
        shown = pd.DataFrame({"rank": table["rank"], "neuron": [f"L{a}/N{b}" for a, b in zip(table["layer"],
                                                                                            table["dimension"])],
                              "position": table["position"],
                              "token": [markdown.token_cell(str(t)) for t in table["token"]],
                              "influence": table["influence"], "module": table["module"],
                              "label": [markdown.visible(str(x)) for x in table["label"]]})
        lines += [md_table(shown), ""]
    return lines


def write_report(data: Path, params: dict) -> str:
    info = collect(data)
    m = info["m"]
    plot_layer_activity(info["freq"], data / layout.LAYER_ACTIVITY_PLOT, f"{m}: how often each GELU neuron fires, per layer")
    rel = lambda p: Path(p).relative_to(data).as_posix()  # noqa: E731
    analysis = data / layout.ANALYSIS_DIR
    results = data / layout.RESULTS_DIR
    meta = info["meta"]
    lines = [f"# Influential GELU neurons of {markdown.escape(m)}", "",
             f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by `run_pipeline.sh`.", ""]
    lines += verdict_section(info, int(meta["num_neurons"]), params)
    lines += excluded_section(info)
    lines += comparison_section(info, data)
    lines += mean_check_section(info)
    lines += breakdown_section(info)
    lines += modules_section(info, data)
    lines += continuation_section(info, int(meta["num_neurons"]))
    lines += trace_section(data, m)
    lines += cards_section(data)
    lines += ["## Parameters", "", md_table(pd.DataFrame(list(params.items()), columns=["parameter", "value"])), ""]
    if info["commands"]:
        commands = [c for k in ("a", "b", "effects", "c", "fidelity", "c_analyze", "modules", "d", "e", "cards",
                                "trace")
                    for c in info["commands"].get(k, [])]
        fence = markdown.fence(commands)
        lines += ["Commands, in order (rerun them to reproduce this report):", "", fence, *commands, fence, ""]
    lines += ["## Dataset", "",
              f"{info['samples']} samples from {info['source']}; "
              f"{meta['n_layer']} layers x {meta['d_mlp']} GELU neurons = {meta['num_neurons']} neurons, "
              f"{meta['num_edges']} adjacent-layer edges.", "",
              f"![activation frequency per layer]({markdown.url(layout.LAYER_ACTIVITY_PLOT)})", "",
              md_table(info["layers"]), ""]
    hists = [(t, analysis / f"{n}.png") for t, n in (("Node activation counts", layout.HIST_NODE_COUNT),
                                                     ("Edge co-activation counts", layout.HIST_EDGE_COUNT),
                                                     ("Node degrees", layout.HIST_DEGREE))]
    at_thresholds = degree_plot(info, data)
    if at_thresholds is not None:
        hists.append(("Node degrees at the thresholds stage d used", at_thresholds))
    if any(p.is_file() for _, p in hists):
        lines += ["## Co-activation graph", ""]
        lines += [f"![{t}]({markdown.url(rel(p))})" for t, p in hists if p.is_file()] + [""]
    if info["sweep"] is not None:
        lines += ["## Threshold sweep", "", "Edges with normalised co-activation <= t removed.", ""]
        if (analysis / layout.THRESHOLD_PLOT).is_file():
            lines += [f"![threshold sweep]({markdown.url(rel(analysis / layout.THRESHOLD_PLOT))})", ""]
        lines += [md_table(info["sweep"]), ""]
    lines += fidelity_section(info, data)
    if len(info["subsets"]):
        lines += ["## Perturbation subsets", "", md_table(info["subsets"].drop(columns=["graph"])), ""]
    if info["effects"] is not None:
        ev = info["evaluation"] or {}
        ablation = {"zero": "set to 0", "mean": "set to their mean activation"}.get(ev.get("ablation"), "ablated")
        lines += ["## Ablation effects", "", evaluation_sentence(info["evaluation"]), "",
                  f"Every subset on every evaluation prompt, its neurons' outputs {ablation}: KL(baseline || "
                  f"ablated) of the next-token distribution and the increase in the baseline continuation's "
                  f"negative log-likelihood (nats/token), teacher-forced along the baseline's tokens, with "
                  f"{100 * ev.get('confidence_level', stats.LEVEL):g} % bootstrap CIs over prompts; token agreement "
                  f"of the ablated generation with the baseline; `*_random_*`: random subsets with the same number "
                  f"of neurons in each layer (mean, 95th percentile); `p_random`: the one-sided empirical p-value "
                  f"among them; `z_random`: standard deviations above their mean; `kl_vs_random`: subset / random "
                  f"mean, given only where that mean is above 0 by its t-interval.", ""]
        if (results / layout.PERTURBATION_PLOT).is_file():
            lines += [f"![ablation effects]({markdown.url(rel(results / layout.PERTURBATION_PLOT))})", ""]
        lines += [md_table(effect_table(info["effects"])), ""]
    with atomic.atomic_open(data / layout.REPORT, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return terminal_summary(info, data)


def terminal_summary(info: dict, data: Path) -> str:
    out = [f"dataset {data}: {info['samples']} samples from {info['source']}",
           "active per layer: " + " ".join(f"L{int(r.layer)} {100 * r.mean_fraction_active:.0f}%"
                                           for r in info["layers"].itertuples())]
    if info["sweep"] is not None:
        out.append("threshold sweep (t: edges, components, largest): " + "; ".join(
            f"{r.threshold:g}: {int(r.num_edges)}, {int(r.num_components)}, {int(r.max_comp_size)}"
            for r in info["sweep"].itertuples()))
    if info["effects"] is not None:
        for r in info["effects"].to_dict("records"):
            line = (f"  {r['subset']}: k={r['k']}, dNLL {r['delta_nll']:.4g} [{r.get('delta_nll_ci_low', np.nan):.3g}, "
                    f"{r.get('delta_nll_ci_high', np.nan):.3g}], KL {r['kl']:.4g}, agreement {r['token_agreement']:.2f}")
            if not pd.isna(r.get("delta_nll_percentile", np.nan)):
                line += (f"; {verdict.ordinal(round(r['delta_nll_percentile']))} percentile of random neurons of the "
                         f"same layers, p = {r['delta_nll_p_random']:.2g} (dNLL {r['delta_nll_random_mean']:.3g})")
            out.append(line)
    if info["verdict"] is not None and len(info["verdict"]):
        out.append("verdict: " + evaluation_sentence(info["evaluation"], name=str))
        out += verdict.verdict_lines(info["verdict"], int(info["meta"]["num_neurons"]),
                                 (info["evaluation"] or {}).get("confidence_level", stats.LEVEL))
        if same := excluded_winner_sentence(info["verdict"], info.get("verdict_excluded"), info["record"], str):
            out.append(same)
    out.append(f"report: {data / layout.REPORT}")
    return "\n".join(out)

