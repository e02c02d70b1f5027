"""Figures the stages write (matplotlib, Agg backend, written atomically as PNG). Each function stands alone."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from gelutrace import stagefiles as sf  # noqa: E402


def _save(fig, target):
    with sf.atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_histogram(hist: pd.DataFrame, target, title: str, xlabel: str):
    """A density histogram from a bin_start, bin_end, density table (stage c_analyze)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(hist):
        ax.bar(hist["bin_start"], hist["density"], width=hist["bin_end"] - hist["bin_start"], align="edge",
               color="tab:blue", edgecolor="white", linewidth=0.3)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    _save(fig, target)


def plot_threshold_sweep(sweep: pd.DataFrame, target, title: str = "Connected components vs. edge threshold",
                         weight: str = "count"):
    """Number of components and largest-component size against the normalised-weight threshold."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    _save(fig, target)


def plot_trace(active, target, title: str):
    """One panel per layer, its neurons laid out as a near-square grid: dark = active (b_trace)."""
    import numpy as np

    n_layer, d = active.shape
    cols = int(np.ceil(np.sqrt(d)))
    rows = int(np.ceil(d / cols))
    ncol = min(n_layer, 6)
    nrow = int(np.ceil(n_layer / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.2 * ncol, 2.4 * nrow + 0.6), squeeze=False)
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
    _save(fig, target)


def plot_perturbation_summary(summary: pd.DataFrame, target, title: str = "Effect of ablating each subset"):
    """
    Stage e: one panel per metric, a bar per subset, and beside it (grey, with a ±std error bar) the mean
    of its random controls when the summary has them.
    """
    import numpy as np

    panels = [("kl", "KL(baseline || perturbed), nats/token"), ("delta_nll", "Δ NLL of baseline tokens, nats"),
              ("token_agreement", "token agreement with baseline"),
              ("first_diff_position", "first differing position (tokens)")]
    x = np.arange(len(summary))
    controls = "kl_random_mean" in summary.columns
    width = 0.4 if controls else 0.7
    fig, axes = plt.subplots(2, 2, figsize=(max(8, 1.2 * len(summary) + 4), 7.5), squeeze=False)
    for ax, (col, label) in zip(axes.flat, panels):
        ax.bar(x - (width / 2 if controls else 0), summary[col], width, color="tab:blue", label="subset")
        if controls:
            ax.bar(x + width / 2, summary[f"{col}_random_mean"], width, yerr=summary[f"{col}_random_std"].fillna(0),
                   color="tab:gray", capsize=3, label="random, same layers (mean ± std)")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(summary["subset"], rotation=30, ha="right", fontsize=8)
    if controls:
        axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, target)


def plot_layer_activity(freq: pd.DataFrame, target, title: str):
    """Per layer: the distribution of neurons' activation frequencies (box) and its mean (line) (report)."""
    layers = sorted(freq["layer"].unique())
    groups = [freq.loc[freq["layer"] == layer, "activation_frequency"].to_numpy() for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(layers) + 3), 4.5))
    ax.boxplot(groups, positions=layers, widths=0.6, showfliers=False)
    ax.plot(layers, [g.mean() for g in groups], "o-", color="tab:red", label="mean")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of samples in which a neuron fires")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    _save(fig, target)


def plot_method_comparison(comparison: pd.DataFrame, target, title: str = "Selection methods compared"):
    """
    Stage e: delta_nll (with its bootstrap CI) against k for each method's best variant, and the random
    controls of the same layer composition as grey dots, one per subset evaluated at that k.
    """
    import numpy as np

    best = comparison[comparison["best"]]
    fig, ax = plt.subplots(figsize=(8, 5))
    methods = sorted(best["method"].unique())
    ks = sorted(best["k"].unique())
    offsets = np.linspace(-0.08, 0.08, max(len(methods), 1))
    for off, method in zip(offsets, methods):
        rows = best[best["method"] == method].sort_values("k")
        x = rows["k"].to_numpy() * (1 + off)
        y = rows["delta_nll"].to_numpy()
        err = np.vstack([y - rows["delta_nll_ci_low"].to_numpy(), rows["delta_nll_ci_high"].to_numpy() - y])
        label = method + (f" ({rows['variant'].iloc[0]})" if len(rows) == 1 and rows["variant"].iloc[0] else "")
        ax.errorbar(x, y, yerr=np.clip(err, 0, None), fmt="o-", capsize=3, label=label)
    if "delta_nll_random_mean" in comparison.columns:
        ctl = comparison.dropna(subset=["delta_nll_random_mean"])
        ax.scatter(ctl["k"], ctl["delta_nll_random_mean"], color="tab:gray", marker="_", s=200,
                   label="random, same layers (mean of controls)")
    ax.axhline(0, color="black", linewidth=0.5)
    if len(ks) > 1:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k (neurons ablated)")
    ax.set_ylabel("Δ NLL of baseline tokens (nats/token), 95 % CI over prompts")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, target)
