"""
The corpus modules (c_find_modules) of a per-prompt neuron graph's kept neurons: Neuronpedia's supernodes, one per
module that holds two or more kept nodes, each named by its module number and top tokens; the pinned nodes; and
whether the prompt's influence concentrates in few modules more than in random modules of the same sizes.

The concentration statistic is the Herfindahl index of the influence over modules, H = sum_k s_k^2, s_k the share
of the prompt's total neuron influence held by module k's neurons (a neuron in no module adds to the total only):
the probability that two draws of influence fall in the same module, and 1/H the effective number of modules the
influence spreads over. Unlike the share of a fixed top few modules it needs no cut-off, and unlike the entropy it
is not moved by the many modules that hold a sliver of influence. The null relabels the neurons the modules cover
to modules at random, every module keeping its size: the prompt's distinct neurons that are in a module draw their
labels without replacement from all the covered neurons' labels, and those in none stay in none (so that a prompt
whose neurons are covered more often than the model's at large does not look concentrated for that alone).
One-sided permutation p = (b + 1) / (N + 1), b the relabellings whose H reaches the observed one.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace import PipelineError
from gelutrace.circuit.faithfulness import kept_influence, top_nodes
from gelutrace.circuit.graph import NeuronGraph
from gelutrace.files import layout
from gelutrace.model.tokens import token_text
from gelutrace.report import cards, markdown
from gelutrace.selection import communities

SUPERNODE_TOKENS = 3  # top tokens in a supernode's name
PERMUTATIONS = 9999
PERMUTATION_BATCH = 1000  # relabellings whose statistic is computed in one bincount
TIE_RTOL = 1e-12  # a relabelling within this of the observed statistic counts as reaching it


def neuron_ids(graph: NeuronGraph, d_mlp: int) -> np.ndarray:
    """Each kept node's neuron id, layer * d_mlp + dimension (int64, n_kept)."""
    return (graph.neurons[:, 0] * d_mlp + graph.neurons[:, 2]).numpy().astype(np.int64)


# --- module names -----------------------------------------------------------------------------------------
def read_module_tokens(modules_csv, m: str) -> pd.DataFrame | None:
    """Stage e's next tokens per module subset (layout.MODULE_TOKENS) of the dataset the modules file lies in
    (<dataset>/MODULES_DIR/...), or None where stage e did not ablate modules there."""
    p = Path(modules_csv).resolve().parent.parent / layout.RESULTS_DIR / layout.MODULE_TOKENS
    if not p.is_file():
        return None
    try:
        t = pd.read_csv(p, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise PipelineError(f"{p} cannot be read: {e}") from None
    if not set(layout.MODULE_TOKENS_COLUMNS) <= set(t.columns):
        raise PipelineError(f"{p}: expected the columns {', '.join(layout.MODULE_TOKENS_COLUMNS)}")
    return t


def module_names(model, tokenizer, modules: communities.ModuleFile, which, m: str,
                 module_tokens: pd.DataFrame | None = None) -> dict[int, str]:
    """
    `M{k}: "tok" "tok" "tok"` for each module k in `which`: the report's top tokens of the module where stage e
    ablated it (module_tokens: the next tokens whose loss rises most without it), else the tokens the module's
    neurons' summed direct logit effect promotes most (model.py's GPT-2 weights), else `M{k}`.
    """
    weight = Path(modules.path).stem[len(f"{m}_modules_"):]
    out = {}
    for k in sorted({int(k) for k in which}):
        tokens = []
        if module_tokens is not None:
            stem = Path(layout.SUBSET_FILE_MODULE.format(m=m, module=k, weight=weight)).stem
            rows = module_tokens[module_tokens["subset"] == stem].sort_values("rank", kind="stable")
            tokens = [str(t) for t in rows["token"].head(SUPERNODE_TOKENS)]
        if not tokens and cards.has_logit_effect(model):
            effect = cards.summed_logit_effect(model, modules.ids(k))
            tokens = [token_text(tokenizer, int(i)) for i in cards.top_rows(effect, SUPERNODE_TOKENS)]
        out[k] = f"M{k}" + (": " + " ".join(f'"{markdown.visible(t)}"' for t in tokens) if tokens else "")
    return out


# --- supernodes and pins ----------------------------------------------------------------------------------
def node_modules(graph: NeuronGraph, module_of: np.ndarray, d_mlp: int) -> np.ndarray:
    """Each kept node's corpus module (-1: in none), from c_find_modules' module_of (neuron id order)."""
    ids = neuron_ids(graph, d_mlp)
    if len(ids) and ids.max() >= len(module_of):
        raise PipelineError(f"the modules file covers {len(module_of)} neurons, the graph names neuron {ids.max()}: "
                            f"a modules file of another model")
    return module_of[ids] if len(ids) else np.zeros(0, np.int64)


def supernodes(graph: NeuronGraph, influence, modules_of_nodes: np.ndarray, names: dict[int, str],
               min_nodes: int = 2) -> list[tuple[str, list[int]]]:
    """(name, kept-node indices) per module holding at least `min_nodes` kept nodes, the module with the most
    influence first (ties: lower module number); the nodes in their graph order."""
    inf = kept_influence(graph, influence)
    found = [k for k in np.unique(modules_of_nodes) if k >= 0 and (modules_of_nodes == k).sum() >= min_nodes]
    found.sort(key=lambda k: (-inf[modules_of_nodes == k].sum(), k))
    return [(names.get(int(k), f"M{k}"), np.flatnonzero(modules_of_nodes == k).tolist()) for k in found]


def pinned_nodes(graph: NeuronGraph, influence, n: int = 10) -> list[int]:
    """The `n` kept nodes of largest influence, largest first (ties: the earlier node)."""
    return top_nodes(graph, influence, n).tolist()


# --- concentration ----------------------------------------------------------------------------------------
@dataclass
class Concentration:
    herfindahl: float  # sum over modules of (module's share of the influence)^2
    effective_modules: float  # 1 / herfindahl
    null_effective_modules: float  # 1 / the relabellings' mean herfindahl
    p_value: float  # (b + 1) / (permutations + 1)
    permutations: int
    seed: int
    neurons: int  # distinct neurons of the prompt tested
    modules: int  # modules they fall in
    unassigned_share: float  # the influence share of neurons in no module


def herfindahl(weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """sum_k (w in module k / all w)^2 per row of labels (..., n); label -1 (no module) counts in the total only."""
    weights = np.asarray(weights, np.float64)
    labels = np.asarray(labels, np.int64)
    rows = labels.reshape(-1, labels.shape[-1])
    width = int(max(rows.max(initial=-1), -1)) + 2
    flat = rows + 1 + width * np.arange(len(rows))[:, None]
    sums = np.bincount(flat.ravel(), np.broadcast_to(weights, rows.shape).ravel(), width * len(rows))
    shares = sums.reshape(len(rows), width)[:, 1:] / weights.sum()
    return (shares ** 2).sum(axis=1).reshape(labels.shape[:-1])


def concentration_test(ids: np.ndarray, influence: np.ndarray, module_of: np.ndarray,
                       permutations: int = PERMUTATIONS, seed: int = 0) -> Concentration:
    """
    The Herfindahl index of `influence` (of the distinct neurons `ids`) over their modules in `module_of` (every
    neuron's module, -1: none), against `permutations` relabellings of the covered neurons that keep every
    module's size, seeded.
    """
    ids = np.asarray(ids, np.int64)
    w = np.abs(np.asarray(influence, np.float64))
    if len(np.unique(ids)) != len(ids):
        raise PipelineError("the concentration test takes each neuron once")
    if not len(ids) or w.sum() <= 0:
        raise PipelineError("the concentration test needs neurons with some influence")
    if permutations < 1:
        raise PipelineError("the concentration test needs at least one permutation")
    labels = np.asarray(module_of, np.int64)
    own = labels[ids]
    covered = labels[labels >= 0]  # every module's neurons, whose labels the null deals out again
    inside = np.flatnonzero(own >= 0)
    observed = float(herfindahl(w, own))
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    for lo in range(0, permutations, PERMUTATION_BATCH):
        n = min(PERMUTATION_BATCH, permutations - lo)
        relabelled = np.repeat(own[None, :], n, axis=0)
        relabelled[:, inside] = covered[np.stack([rng.choice(len(covered), len(inside), replace=False)
                                                  for _ in range(n)])]
        null[lo:lo + n] = herfindahl(w, relabelled)
    b = int((null >= observed * (1 - TIE_RTOL)).sum())
    effective = lambda h: 1 / h if h > 0 else np.inf  # noqa: E731
    return Concentration(observed, effective(observed), effective(float(null.mean())), (b + 1) / (permutations + 1),
                         permutations, seed, len(ids), len(np.unique(own[own >= 0])), float(w[own < 0].sum() / w.sum()))


def graph_concentration(graph: NeuronGraph, influence, module_of: np.ndarray, d_mlp: int,
                        permutations: int = PERMUTATIONS, seed: int = 0) -> Concentration:
    """concentration_test over the graph's kept neurons, each neuron's influence summed over its positions."""
    ids = neuron_ids(graph, d_mlp)
    node_modules(graph, module_of, d_mlp)  # the file covers the graph's neurons
    distinct, where = np.unique(ids, return_inverse=True)
    per_neuron = np.bincount(where, np.abs(kept_influence(graph, influence)), len(distinct))
    return concentration_test(distinct, per_neuron, module_of, permutations, seed)
