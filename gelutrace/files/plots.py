"""
Figures the stages write (matplotlib, written atomically as PNG). Each function stands alone. Figures are made
without pyplot: no backend is chosen and no global figure state touched, so that a notebook importing gelutrace
keeps its own (inline) backend.
"""

import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gelutrace.files import atomic


MANY_SUBSETS = 24  # more subsets than this in stage e's summary: a row per subset (plot_perturbation_summary)


def _save(fig, target):
    """Write the figure; returns it, so that its artists can be checked."""
    with atomic.atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return fig


def _subplots(nrows: int = 1, ncols: int = 1, figsize=None, **kw):
    """pyplot.subplots' (figure, axes), on a Figure of its own."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def plot_histogram(hist: pd.DataFrame, target, title: str, xlabel: str):
    """A density histogram from a bin_start, bin_end, density table (stage c_analyze)."""
    fig, ax = _subplots(figsize=(7, 4.5))
    if len(hist):
        ax.bar(hist["bin_start"], hist["density"], width=hist["bin_end"] - hist["bin_start"], align="edge",
               color="tab:blue", edgecolor="white", linewidth=0.3)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    return _save(fig, target)


def plot_threshold_sweep(sweep: pd.DataFrame, target, title: str = "Connected components vs. edge threshold",
                         weight: str = "count"):
    """Number of components and largest-component size against the normalised-weight threshold."""
    fig, ax = _subplots(figsize=(7, 4.5))
    ax.plot(sweep["threshold"], sweep["num_components"], "o-", color="tab:blue", label="number of components")
    quantity = "co-activation" if weight == "count" else weight
    ax.set_xlabel(f"threshold (edges with normalised {quantity} <= threshold removed)")
    ax.set_ylabel("number of components", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(sweep["threshold"], sweep["max_comp_size"], "s--", color="tab:red", label="largest component size")
    ax2.set_ylabel("largest component size (nodes)", color="tab:red")
    ax.set_title(title)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center left")
    return _save(fig, target)


def plot_degree_at_thresholds(degrees: dict, target, title: str):
    """Node degree distributions of the graph at the thresholds stage d used (label -> degrees), log counts,
    with each one's share of isolated nodes (degree 0) in the legend."""

    fig, ax = _subplots(figsize=(8, 4.5))
    top = max((int(d.max()) for d in degrees.values() if len(d)), default=0)
    bins = np.unique(np.r_[0, np.ceil(np.geomspace(1, top + 1, 40)).astype(int), top + 1]) if top else np.arange(3)
    for label, d in degrees.items():
        counts, edges = np.histogram(d, bins=bins)
        ax.stairs(counts, edges, label=f"{label}: {100 * float(np.mean(d == 0)):.0f} % of nodes with degree 0")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("node degree (edges kept at the threshold)")
    ax.set_ylabel("number of nodes")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, target)


def plot_trace(active, target, title: str):
    """One panel per layer, its neurons laid out as a near-square grid: dark = active (b_trace)."""

    n_layer, d = active.shape
    cols = int(np.ceil(np.sqrt(d)))
    rows = int(np.ceil(d / cols))
    ncol = min(n_layer, 6)
    nrow = int(np.ceil(n_layer / ncol))
    fig, axes = _subplots(nrow, ncol, figsize=(2.2 * ncol, 2.4 * nrow + 0.6), squeeze=False)
    for layer, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if layer >= n_layer:
            ax.axis("off")
            continue
        grid = np.full(rows * cols, np.nan)
        grid[:d] = active[layer]
        ax.imshow(grid.reshape(rows, cols), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"layer {layer}: {int(active[layer].sum())} active", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, target)


def plot_perturbation_summary(summary: pd.DataFrame, target, title: str = "Effect of ablating each subset"):
    """
    Stage e: one panel per metric, a bar per subset (with its bootstrap CI where the summary has one) and
    beside it (grey) the mean of its random controls with their 5-95 % range, when the summary has them. Beyond
    MANY_SUBSETS subsets the bars run across, a row per subset, so that every name stays legible.
    """

    panels = [("text_delta_nll", "Δ NLL on the real text, nats/token"), ("text_kl", "KL on the real text, nats/token"),
              ("kl", "KL(baseline || perturbed), nats/token"), ("delta_nll", "Δ NLL of baseline tokens, nats/token"),
              ("token_agreement", "token agreement with baseline"),
              ("first_diff_position", "first differing position (tokens)")]
    panels = [(col, label) for col, label in panels  # a metric the run did not measure (all NaN) gets no panel
              if col in summary.columns and np.isfinite(summary[col].to_numpy(np.float64)).any()]
    x = np.arange(len(summary))
    across = len(summary) > MANY_SUBSETS
    if across:
        height = 0.2 * len(summary) + 2
        fig, axes = _subplots(1, len(panels), figsize=(4.5 * len(panels), height), squeeze=False, sharey=True)
    else:
        height = 3.75 * ((len(panels) + 1) // 2)
        fig, axes = _subplots((len(panels) + 1) // 2, 2, figsize=(max(8, 1.2 * len(summary) + 4), height),
                              squeeze=False)
        if len(panels) % 2:
            axes.flat[-1].set_visible(False)
    for ax, (col, label) in zip(axes.flat, panels):
        controls = f"{col}_random_q05" in summary.columns
        width = 0.4 if controls else 0.7
        bar = ax.barh if across else ax.bar
        err = "xerr" if across else "yerr"
        yerr = None
        if f"{col}_ci_low" in summary.columns:
            y = summary[col].to_numpy(np.float64)
            yerr = np.clip(np.nan_to_num(np.vstack([y - summary[f"{col}_ci_low"], summary[f"{col}_ci_high"] - y])),
                           0, None)
        bar(x - (width / 2 if controls else 0), summary[col], width, **{err: yerr}, capsize=3, color="tab:blue",
            label="subset (95 % CI)" if yerr is not None else "subset")
        if controls:
            m = summary[f"{col}_random_mean"].to_numpy(np.float64)
            spread = np.clip(np.nan_to_num(np.vstack([m - summary[f"{col}_random_q05"],
                                                      summary[f"{col}_random_q95"] - m])), 0, None)
            bar(x + width / 2, m, width, **{err: spread}, color="tab:gray", capsize=3,
                label="random, same layers (mean, 5-95 %)")
        ax.set_title(label, fontsize=10)
        if across:
            ax.set_yticks(x)
            ax.set_yticklabels(summary["subset"], fontsize=7)
            ax.set_ylim(len(summary) - 0.5, -0.5)  # the first subset on top
        else:
            ax.set_xticks(x)
            ax.set_xticklabels(summary["subset"], rotation=30, ha="right", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # room for the title above the panels' own
    return _save(fig, target)


def plot_layer_activity(freq: pd.DataFrame, target, title: str):
    """Per layer: the distribution of neurons' activation frequencies (box) and its mean (line) (report)."""
    layers = sorted(freq["layer"].unique())
    groups = [freq.loc[freq["layer"] == layer, "activation_frequency"].to_numpy() for layer in layers]
    fig, ax = _subplots(figsize=(max(6, 0.5 * len(layers) + 3), 4.5))
    ax.boxplot(groups, positions=layers, widths=0.6, showfliers=True,
               flierprops={"marker": ".", "markersize": 3, "alpha": 0.5}, label="neurons (box, outliers)")
    ax.plot(layers, [g.mean() for g in groups], "o-", color="tab:red", label="mean")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of samples in which a neuron fires")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, target)


def plot_method_comparison(comparison: pd.DataFrame, target, title: str = "Selection methods compared"):
    """
    Stage e: delta_nll (with its bootstrap CI) against k for each method's best variant, and beside each point,
    at the method's own offset and in its colour, the 5-95 % range and median of its random controls of the
    same layer composition.
    """

    best = comparison[comparison["best"].astype(bool)]
    fig, ax = _subplots(figsize=(9, 5))
    methods = sorted(best["method"].unique())
    ks = sorted(best["k"].unique())
    offsets = np.linspace(-0.12, 0.12, max(len(methods), 1)) if len(methods) > 1 else [0.0]
    null = "delta_nll_random_q05" in comparison.columns
    for i, (off, method) in enumerate(zip(offsets, methods)):
        colour = f"C{i}"
        rows = best[best["method"] == method].sort_values("k")
        x = rows["k"].to_numpy() * (1 + off)
        y = rows["delta_nll"].to_numpy(np.float64)
        err = np.vstack([y - rows["delta_nll_ci_low"].to_numpy(), rows["delta_nll_ci_high"].to_numpy() - y])
        label = method + (f" ({rows['variant'].iloc[0]})" if len(rows) == 1 and rows["variant"].iloc[0] else "")
        ax.errorbar(x, y, yerr=np.clip(np.nan_to_num(err), 0, None), fmt="o-", capsize=3, color=colour, label=label)
        if null and rows["delta_nll_random_q05"].notna().any():
            xc = x * 1.025
            q05, q50, q95 = (rows[f"delta_nll_random_q{q}"].to_numpy(np.float64) for q in ("05", "50", "95"))
            ax.vlines(xc, q05, q95, color=colour, alpha=0.45, linewidth=4)
            ax.scatter(xc, q50, color=colour, marker="_", s=120, alpha=0.8)
    if null:
        ax.plot([], [], color="gray", alpha=0.45, linewidth=4, label="its random controls, same layers (5-95 %, median)")
    ax.axhline(0, color="black", linewidth=0.5)
    if len(ks) > 1:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k (neurons ablated)")
    ax.set_ylabel("Δ NLL of baseline tokens (nats/token), 95 % CI over prompts")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, target)


def plot_dose_response(dose: pd.DataFrame, target, title: str, ylabel: str):
    """
    Stage e's dose-response curves: delta_nll against k (log axis) for each method's best variant, its bootstrap
    CI as a band, the method ranked first at each k ringed, and in grey the 5-95 % band (and median) of the random
    controls of the same layers, where the subset at that k had controls.
    """

    fig, ax = _subplots(figsize=(9, 5))
    for i, method in enumerate(sorted(dose["method"].unique())):
        rows = dose[dose["method"] == method].sort_values("k")
        x, y = rows["k"].to_numpy(np.float64), rows["delta_nll"].to_numpy(np.float64)
        ax.plot(x, y, "o-", color=f"C{i}", label=method, markersize=4)
        ax.fill_between(x, rows["delta_nll_ci_low"].to_numpy(np.float64), rows["delta_nll_ci_high"].to_numpy(np.float64),
                        color=f"C{i}", alpha=0.15, linewidth=0)
        won = rows["winner"].astype(bool).to_numpy()
        ax.scatter(x[won], y[won], s=90, facecolors="none", edgecolors=f"C{i}", linewidths=1.5)
    null = dose.dropna(subset=["random_q05"]).sort_values("k")
    null = null[null["winner"].astype(bool)] if null["winner"].astype(bool).any() else null
    null = null.drop_duplicates("k")
    if len(null):
        x = null["k"].to_numpy(np.float64)
        ax.fill_between(x, null["random_q05"].to_numpy(np.float64), null["random_q95"].to_numpy(np.float64),
                        color="gray", alpha=0.3, linewidth=0, label="random neurons, same layers as the winner (5-95 %)")
        ax.plot(x, null["random_q50"].to_numpy(np.float64), color="gray", linewidth=1, linestyle="--")
    ax.scatter([], [], s=90, facecolors="none", edgecolors="black", label="ranked first at k (test part)")
    ks = sorted(dose["k"].unique())
    if len(ks) > 1:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("k (neurons ablated together)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, target)


def plot_edge_fidelity(table: pd.DataFrame, target, title: str):
    """c_measure_edge_fidelity: each sampled edge's measured change of v against the predicted -direct, on
    symmetric-log axes, one colour per layer gap, with the identity line."""

    fig, ax = _subplots(figsize=(6, 5.5))
    for i, (gap, part) in enumerate(table.groupby("layer_gap")):
        ax.scatter(part["predicted"], part["measured"], s=9, alpha=0.6, color=f"C{i}", label=f"layer gap {gap}")
    lim = float(np.nanmax(np.abs(table[["predicted", "measured"]].to_numpy()))) if len(table) else 1.0
    lin = float(np.nanpercentile(np.abs(table["predicted"]), 10)) if len(table) else 1e-6
    ax.plot([-lim, lim], [-lim, lim], color="black", linewidth=0.7, label="measured = predicted")
    for axis in ("x", "y"):
        getattr(ax, f"set_{axis}scale")("symlog", linthresh=max(lin, 1e-12))
    ax.set_xlabel("predicted change of v's mean value (-direct)")
    ax.set_ylabel("measured change when u is zero-ablated")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, target)


MAX_MODULES_DRAWN = 40  # the module pictures show the largest modules; the rest are summed into one row / node


def plot_module_layers(composition, target, title: str):
    """c_find_modules: a module x layer heatmap of neuron counts (`composition`: (modules, layers) counts, modules
    by decreasing size)."""

    comp = np.asarray(composition)
    rows = [f"M{i}" for i in range(min(len(comp), MAX_MODULES_DRAWN))]
    if len(comp) > MAX_MODULES_DRAWN:
        comp = np.vstack([comp[:MAX_MODULES_DRAWN], comp[MAX_MODULES_DRAWN:].sum(0)])
        rows.append(f"rest ({len(composition) - MAX_MODULES_DRAWN})")
    fig, ax = _subplots(figsize=(1.2 + 0.45 * comp.shape[1], 1.2 + 0.28 * len(rows)))
    im = ax.imshow(comp, aspect="auto", cmap="viridis")
    ax.set_xticks(range(comp.shape[1]), [str(i) for i in range(comp.shape[1])])
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("module (largest first)")
    if comp.size <= 400:
        for (r, c), v in np.ndenumerate(comp):
            if v:
                ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=6,
                        color="white" if v < comp.max() / 2 else "black")
    fig.colorbar(im, ax=ax, label="neurons")
    ax.set_title(title, fontsize=10)
    return _save(fig, target)


def plot_module_graph(sizes, between, target, title: str):
    """c_find_modules: the module graph, modules as nodes sized by neuron count, edges weighted by the summed
    weight between them (networkx layout, seeded)."""
    import networkx as nx  # lazy: only the NetworkX paths need it (slow to import)

    sizes = np.asarray(sizes)
    # modules are numbered by decreasing size: the single neurons (no edge kept) come last and are not drawn
    n = min(int((sizes > 1).sum()) or len(sizes), MAX_MODULES_DRAWN)
    w = np.asarray(between, np.float64)[:n, :n]
    g = nx.Graph()
    g.add_nodes_from(range(n))
    iu = np.triu_indices(n, 1)
    for a, b, x in zip(*iu, w[iu]):
        if x > 0:
            g.add_edge(int(a), int(b), weight=float(x))
    pos = (nx.circular_layout(g) if n <= 12 else nx.spring_layout(g, seed=0)) if n > 1 else {0: (0.0, 0.0)}
    fig, ax = _subplots(figsize=(6.5, 6))
    top = max((d["weight"] for *_, d in g.edges(data=True)), default=1.0)
    nx.draw_networkx_edges(g, pos, ax=ax, width=[0.3 + 5 * d["weight"] / top for *_, d in g.edges(data=True)],
                           alpha=0.5, edge_color="gray")
    s = np.asarray(sizes[:n], np.float64)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=60 + 1500 * s / s.max(), node_color=range(n), cmap="tab20")
    nx.draw_networkx_labels(g, pos, ax=ax, labels={i: f"M{i}\n{int(s[i])}" for i in range(n)}, font_size=7)
    singles = int((sizes[n:] == 1).sum())
    rest = len(sizes) - n - singles
    note = ", ".join(x for x in (f"{singles} single-neuron modules" if singles else "",
                                 f"{rest} smaller modules" if rest else "") if x)
    ax.set_title(title + (f"\n(not drawn: {note})" if note else ""), fontsize=10)
    ax.axis("off")
    return _save(fig, target)
