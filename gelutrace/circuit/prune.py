"""
Influence, pruning and the graph's scores, under circuit-tracer's definitions (circuit_tracer/graph.py, 0.5.0:
normalize_matrix, compute_influence, compute_edge_influence, find_threshold, prune_graph, compute_graph_scores),
with the "other neurons" nodes in the role of its error nodes.

With A the adjacency normalised row by row (|A[t, s]| / sum_s |A[t, s]|) and w the logit nodes' probabilities, a
node's influence is its share of the probability-weighted logits through every path: (w A + w A^2 + ...)[node].
The graph is acyclic (a neuron reads only earlier layers), so the series ends after its depth.
"""

from dataclasses import dataclass

import torch

from gelutrace import PipelineError
from gelutrace.circuit.graph import NeuronGraph


@dataclass
class Pruned:
    node_mask: torch.Tensor  # (n_nodes,) bool: the nodes kept (embeddings and logits always)
    edge_mask: torch.Tensor  # (n_nodes, n_nodes) bool, [target, source]: the edges kept (all between kept nodes)
    node_influence: torch.Tensor  # (n_nodes,) each node's influence on the probability-weighted logits
    cumulative_scores: torch.Tensor  # (n_nodes,) the share of the total influence of the nodes at least as influential
    node_shares: torch.Tensor  # (n_nodes,) float64 ranked_shares of the node influence: kept at a fraction f iff < f
    edge_shares: torch.Tensor  # (n_edges kept,) float64 ranked_shares of the edge scores, edge_mask.nonzero() order


@dataclass(frozen=True)
class GraphScores:
    replacement: float  # the share of the embeddings' influence on the logits not passing through "other neurons"
    completeness: float  # the influence-weighted share of the nodes' inputs not from "other neurons"


def normalized_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with each row scaled to sum 1 (rows without inputs stay zero): circuit-tracer's normalize_matrix."""
    a = adjacency.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(normalized: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_{k >= 1} weights @ normalized^k: circuit-tracer's compute_influence. The series is finite in an acyclic
    graph (no path is longer than the number of nodes)."""
    total = torch.zeros_like(weights)
    step = weights @ normalized
    for _ in range(len(weights)):
        if not step.any():
            return total
        total += step
        step = step @ normalized
    raise PipelineError("the graph has a cycle: the influence along its paths never vanishes")


def node_influence(graph: NeuronGraph) -> torch.Tensor:
    return influence(normalized_adjacency(graph.adjacency), graph.logit_weights())


def threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """
    The lowest score to keep so that the kept scores, the highest first, reach `fraction` of their total:
    circuit-tracer's find_threshold over the positive scores alone. It is the same threshold wherever
    circuit-tracer's is positive; where circuit-tracer's lands on a zero score (a fraction of 1), it would keep
    every score, every pair of unconnected nodes included: here a score of zero is never kept.
    """
    positive = scores[scores > 0]
    if len(positive) == 0:
        return torch.tensor(torch.inf, dtype=scores.dtype)
    ranked = positive.sort(descending=True).values
    cumulative = ranked.cumsum(0) / ranked.sum()
    return ranked[min(int((cumulative < fraction).sum()), len(ranked) - 1)]


def cumulative_scores(scores: torch.Tensor) -> torch.Tensor:
    """Each node's share of the total influence of the nodes ranked at or above it (circuit-tracer's
    cumulative_scores in prune_graph: what the viewers' pruning slider compares with its threshold)."""
    ranked, order = scores.sort(descending=True)
    out = torch.zeros_like(scores)
    out[order] = ranked.cumsum(0) / ranked.sum().clamp(min=1e-30)
    return out


def ranked_shares(scores: torch.Tensor, population: torch.Tensor | None = None) -> torch.Tensor:
    """
    Each score's share of the total of the `population` scores (default: `scores`; non-negative) strictly greater
    than it, in float64: the slider value of the viewer pages. threshold(population, f) keeps a positive score iff
    its share is < f (to rounding; at f = 0 the largest), so a slider at f that shows the scores whose share is
    <= f prunes as threshold() does.
    """
    x = scores.double().flatten()
    ascending = (x if population is None else population.double().flatten()).sort().values
    ranked = ascending.flip(0)
    before = torch.cat([x.new_zeros(1), ranked.cumsum(0)])  # before[k]: the sum of the k largest
    greater = len(ranked) - torch.searchsorted(ascending, x, right=True)  # how many are strictly greater
    return before[greater] / ranked.sum().clamp(min=1e-300)


def prune(graph: NeuronGraph) -> Pruned:
    """
    circuit-tracer's prune_graph at graph.settings.node_threshold and .edge_threshold: keep the most influential
    nodes up to node_threshold of the total influence (embeddings and logits always), then, in the graph of the
    kept nodes, the edges of highest influence (normalised weight times the influence of their target, a logit's
    own weight included) up to edge_threshold; then drop, until none is left, every neuron or "other neurons"
    node without an outgoing edge and every neuron without an incoming one.
    """
    s = graph.settings
    for name, value in (("node_threshold", s.node_threshold), ("edge_threshold", s.edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise PipelineError(f"{name} must be between 0 and 1, not {value}")
    weights = graph.logit_weights()
    scores = influence(normalized_adjacency(graph.adjacency), weights)
    node_mask = scores >= threshold(scores, s.node_threshold)
    node_mask[graph.embedding_start:] = True

    kept = node_mask[:, None] & node_mask[None, :]
    normalized = normalized_adjacency(torch.where(kept, graph.adjacency, 0.0))
    edge_scores = normalized * (influence(normalized, weights) + weights)[:, None]
    edge_mask = edge_scores >= threshold(edge_scores.flatten(), s.edge_threshold)

    sources, neurons = graph.embedding_start, graph.n_kept  # neurons and "other neurons"; neurons alone
    while True:
        mask = node_mask.clone()
        mask[:sources] &= edge_mask[:, :sources].any(0)
        mask[:neurons] &= edge_mask[:neurons].any(1)
        if torch.equal(mask, node_mask):
            break
        node_mask = mask
        edge_mask &= node_mask[:, None] & node_mask[None, :]
    # each kept edge's share among the edge scores of the graph of the nodes that passed node_threshold
    edge_shares = ranked_shares(edge_scores[edge_mask], edge_scores[edge_scores > 0])
    return Pruned(node_mask, edge_mask, scores, cumulative_scores(scores), ranked_shares(scores), edge_shares)


def graph_scores(graph: NeuronGraph) -> GraphScores:
    """circuit-tracer's compute_graph_scores on the whole (unpruned) graph, "other neurons" as its error nodes."""
    weights = graph.logit_weights()
    normalized = normalized_adjacency(graph.adjacency)
    scores = influence(normalized, weights)
    others = slice(graph.other_start, graph.embedding_start)
    embedding = scores[graph.embedding_start:graph.logit_start].sum()
    replacement = embedding / (embedding + scores[others].sum())
    explained = 1 - normalized[:, others].sum(dim=1)  # the share of each node's input not from "other neurons"
    output = scores + weights
    completeness = (explained * output).sum() / output.sum()
    return GraphScores(float(replacement), float(completeness))
