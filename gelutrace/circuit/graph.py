"""
The per-prompt neuron attribution graph: circuit-tracer's `Graph` (circuit_tracer/graph.py, 0.5.0) with MLP
neurons in the place of transcoder features and "other neurons" in the place of its error nodes.

Nodes, in circuit-tracer's order: the kept neurons, then one "other neurons" node per layer and position
(index n_kept + layer * n_pos + pos), then one embedding node per position, then the logit nodes.
`adjacency[target, source]` is the direct effect of the source on the target's input in the frozen model
(attention patterns, normalisation scales and, for gated units, act(gate) fixed at their values on the prompt):
the source's value times the coefficient of the target's input in it. A neuron's input is its pre-activation
(for a gated unit, act(gate) * up with the gate frozen: its value); a logit node's input is the demeaned logit.
"Other neurons" and embedding nodes have no inputs (zero rows).
"""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TraceSettings:
    max_nodes: int = 5000  # kept neurons at most, chosen by influence on the logits (circuit-tracer's max_feature_nodes)
    node_threshold: float = 0.8  # pruning: cumulative node influence kept
    edge_threshold: float = 0.98  # pruning: cumulative edge influence kept
    max_logits: int = 10  # logit nodes at most ...
    logit_probability: float = 0.95  # ... until their probabilities sum to this
    batch_size: int = 64  # backward rows per pass


@dataclass
class NeuronGraph:
    prompt: str
    model_name: str
    input_tokens: torch.Tensor  # (n_pos,) int64
    n_layers: int
    neurons: torch.Tensor  # (n_kept, 3) int64: layer, position, dimension of each kept neuron
    values: torch.Tensor  # (n_kept,) the neurons' values a_u(t)
    inputs: torch.Tensor  # (n_kept,) their inputs (pre-activation; for gated units the value itself)
    slopes: torch.Tensor  # (n_kept,) d value / d input at the prompt (GELU': act'(z); gated units: 1)
    logit_tokens: torch.Tensor  # (n_logits,) int64
    logit_probabilities: torch.Tensor  # (n_logits,)
    adjacency: torch.Tensor  # (n_nodes, n_nodes) float32, [target, source]
    constants: torch.Tensor  # (n_nodes,) each node's input minus the sum of its row (biases); 0 for source-only nodes
    settings: TraceSettings = field(default_factory=TraceSettings)

    @property
    def n_pos(self) -> int:
        return len(self.input_tokens)

    @property
    def n_kept(self) -> int:
        return len(self.neurons)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def other_start(self) -> int:
        return self.n_kept

    @property
    def embedding_start(self) -> int:
        return self.n_kept + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.embedding_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits

    def logit_weights(self) -> torch.Tensor:
        """circuit-tracer's logit weights: each logit node's probability, zero elsewhere."""
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        w[self.logit_start:] = self.logit_probabilities
        return w
