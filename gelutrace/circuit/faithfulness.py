"""
How far a per-prompt neuron graph can be trusted, measured:

- predicted_effects: the graph's total effect of zeroing each kept neuron on a logit node's input, through every
  path of kept neurons. Zeroing u moves each target w's input by -A[w, u]; a kept neuron v whose input moves by
  dz_v moves its value by slope_v dz_v (first order) and so the input of each w it feeds by
  A[w, v] / value_v * slope_v dz_v (an edge is A[w, v] = value_v c_wv). With M[w, v] = A[w, v] slope_v / value_v
  (zero for sources that are not kept neurons: "other neurons" and embeddings stay as they are), the moves solve
  dz = -A[:, u] + M dz, so the target's is -(e_t^T (I - M)^-1 A)[u], for every u at once.
- ablation_effects: the real change, in the unfrozen model, of the same demeaned logit (the logit minus the mean
  logit over the vocabulary, the graph's logit input) when one neuron is zeroed at one position, many per batch.
- faithfulness: the two compared over the most influential kept neurons (Spearman, sign agreement).
- corpus_agreement: the prompt's top neurons' influence against stage d's corpus `influence` scores.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from gelutrace import PipelineError
from gelutrace.circuit.graph import NeuronGraph
from gelutrace.files import layout
from gelutrace.model.hooks import PositionAblation

TOP_NODES = 50  # the most influential kept neurons ablated / compared


def top_target(graph: NeuronGraph) -> int:
    """The logit node of the most probable token (index among the logit nodes)."""
    if not graph.n_logits:
        raise PipelineError("the graph has no logit node")
    return int(torch.argmax(graph.logit_probabilities))


def predicted_effects(graph: NeuronGraph, target: int | None = None) -> np.ndarray:
    """
    (n_kept,) float64: the graph's predicted change in logit node `target`'s input (default: the top token's)
    when each kept neuron is zeroed, through every path. The kept neurons form a DAG (an edge goes to a later
    layer), so M is nilpotent and e_t^T (I - M)^-1 = sum_j e_t^T M^j ends after at most n_layers + 1 terms.
    """
    target = top_target(graph) if target is None else int(target)
    a = graph.adjacency.double()
    k = graph.n_kept
    values, slopes = graph.values.double(), graph.slopes.double()
    scale = torch.zeros(graph.n_nodes, dtype=torch.float64)
    scale[:k] = torch.where(values != 0, slopes / torch.where(values != 0, values, 1.0), 0.0)
    m_t = (a * scale[None, :]).T  # M^T
    term = torch.zeros(graph.n_nodes, dtype=torch.float64)
    term[graph.logit_start + target] = 1.0
    row = term.clone()
    for _ in range(graph.n_layers + 1):
        term = m_t @ term
        row += term
    if bool((term != 0).any()):  # a path through more kept neurons than there are layers
        raise PipelineError("the graph's neuron edges are not a DAG (an edge into the same or an earlier layer)")
    return -(row @ a[:, :k]).numpy()


def demeaned(logits: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's logit target: each logit minus the mean logit over the vocabulary (float32)."""
    logits = logits.float()
    return logits - logits.mean(dim=-1, keepdim=True)


@torch.no_grad()
def ablation_effects(model, graph: NeuronGraph, nodes, token: int | None = None, batch_size: int = 32) -> np.ndarray:
    """
    (len(nodes),) float64: the change in the demeaned logit of `token` (default: the graph's top token) at the
    prompt's last position when kept neuron nodes[i] is zeroed at its position alone, in the unfrozen model.
    """
    nodes = np.asarray(nodes, np.int64)
    if len(nodes) and (nodes.min() < 0 or nodes.max() >= graph.n_kept):
        raise PipelineError(f"ablation_effects takes kept-neuron indices 0..{graph.n_kept - 1}")
    token = int(graph.logit_tokens[top_target(graph)]) if token is None else int(token)
    device = next(model.parameters()).device
    idx = graph.input_tokens.to(device)[None, :]
    clean = float(demeaned(model(idx, logits_to_keep=1)[0][0, -1])[token])
    out = np.empty(len(nodes))
    layer, pos, dim = (graph.neurons[:, c].numpy() for c in range(3))
    for lo in range(0, len(nodes), batch_size):
        batch = nodes[lo:lo + batch_size]
        with PositionAblation(model, layer[batch], pos[batch], dim[batch]):
            logits = model(idx.expand(len(batch), -1), logits_to_keep=1)[0][:, -1]
        out[lo:lo + len(batch)] = demeaned(logits)[:, token].double().cpu().numpy() - clean
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho, NaN where it is undefined (under 2 pairs, or a constant side)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def kept_influence(graph: NeuronGraph, influence) -> np.ndarray:
    """A node influence (a tensor or array, per kept neuron or per node) as float64 per kept neuron."""
    v = (influence.detach().cpu().double().numpy() if isinstance(influence, torch.Tensor)
         else np.asarray(influence, np.float64))
    if v.shape not in ((graph.n_kept,), (graph.n_nodes,)):
        raise PipelineError(f"expected an influence per kept neuron ({graph.n_kept}) or per node ({graph.n_nodes}), "
                            f"got shape {v.shape}")
    return v[:graph.n_kept]


def top_nodes(graph: NeuronGraph, influence, n: int = TOP_NODES) -> np.ndarray:
    """The n kept neurons of largest influence, largest first, ties to the earlier."""
    return np.argsort(-kept_influence(graph, influence), kind="stable")[:n]


@dataclass
class Faithfulness:
    nodes: np.ndarray  # kept-neuron indices compared, most influential first
    predicted: np.ndarray  # the graph's total effect on the top token's demeaned logit
    measured: np.ndarray  # its change when the neuron is zeroed at its position in the real model
    spearman: float
    sign_agreement: float  # share of nodes whose predicted and measured changes have the same sign


def faithfulness(model, graph: NeuronGraph, influence, n: int = TOP_NODES, batch_size: int = 32) -> Faithfulness:
    """The graph's predicted effects against zero-ablations in the real model, over the n most influential kept
    neurons."""
    nodes = top_nodes(graph, influence, n)
    predicted = predicted_effects(graph)[nodes]
    measured = ablation_effects(model, graph, nodes, batch_size=batch_size)
    agree = float(np.mean(np.sign(predicted) == np.sign(measured))) if len(nodes) else float("nan")
    return Faithfulness(nodes, predicted, measured, _spearman(predicted, measured), agree)


# --- against the corpus ranking ---------------------------------------------------------------------------
def read_corpus_influence(subsets_dir, m: str, n_neurons: int) -> np.ndarray:
    """
    Stage d's `influence` scores (layout.SCORES_DIR in its output directory, default <dataset>/SUBSETS_DIR): every
    neuron's influence through the corpus's causal graph, float64 in neuron id order.
    """
    p = Path(subsets_dir) / layout.SCORES_DIR / layout.scores_name(m, "influence", None, None)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist (stage d with --method influence writes it)")
    try:
        values = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{p} cannot be read ({e}); rerun stage d") from None
    if values.dtype != np.float64 or values.shape != (n_neurons,):
        raise PipelineError(f"{p} holds {values.shape} {values.dtype} scores, not one per neuron of this model "
                            f"({n_neurons}): a file of another model or graph")
    return values


@dataclass
class CorpusAgreement:
    neurons: np.ndarray  # the prompt's top distinct neuron ids, most influential first
    spearman: float  # their per-prompt influence against their corpus influence
    median_corpus_rank: float  # their median rank (1 = first) in the corpus ranking of every neuron


def corpus_agreement(graph: NeuronGraph, influence, corpus: np.ndarray, d_mlp: int,
                     n: int = TOP_NODES) -> CorpusAgreement:
    """
    The prompt's n most influential distinct neurons (a neuron's influence summed over its positions) and the
    Spearman correlation of their influence with the corpus `influence` scores (NaN scores, of layers stage d
    left out, are dropped): how typical of the corpus the prompt's circuit is.
    """
    inf = kept_influence(graph, influence)
    ids = (graph.neurons[:, 0] * d_mlp + graph.neurons[:, 2]).numpy()
    if len(ids) and ids.max() >= len(corpus):
        raise PipelineError(f"the corpus scores cover {len(corpus)} neurons, the graph names neuron {ids.max()}")
    distinct, where = np.unique(ids, return_inverse=True)
    per = np.bincount(where, np.abs(inf), len(distinct))
    top = distinct[np.argsort(-per, kind="stable")[:n]]
    prompt = per[np.searchsorted(distinct, top)]
    known = np.isfinite(corpus[top])
    order = np.argsort(-np.where(np.isfinite(corpus), corpus, -np.inf), kind="stable")
    rank = np.empty(len(corpus))
    rank[order] = np.arange(1, len(corpus) + 1)
    median = float(np.median(rank[top[known]])) if known.any() else float("nan")
    return CorpusAgreement(top, _spearman(prompt[known], corpus[top][known]), median)
