"""
The pruned graph as an attribution-graph file, the format Neuronpedia's graph viewer and circuit-tracer's local
viewer read (Neuronpedia's graph-schema.json; circuit-tracer 0.5.0's frontend/graph_models.py and
utils/create_graph_files.py write it).

Nodes and their fields as circuit-tracer forms them:
- a neuron: id `{layer}_{dim}_{pos}`, feature the Cantor pairing of (layer, dim), feature_type "cross layer
  transcoder" (the one type of feature node the viewers know: Neuronpedia counts only it, and "lorsa", as
  features in its replacement and completeness scores), influence and activation;
- "other neurons" of a layer at a position, in the role of an error node: feature_type "mlp reconstruction
  error", feature -1; its id is circuit-tracer's error id `0_{layer}_{pos}` with `err` for the 0, which would
  make it the id of neuron `layer` of layer 0 at the same position;
- an embedding: `E_{token id}_{pos}`; a logit: `{n_layers + 1}_{token id}_{last pos}`, with the clerp
  `Output "{token}" (p={probability:.3f})` that the viewers read the token and its probability from.
A node's influence is its cumulative score (Pruned.cumulative_scores), what the viewers' pruning slider compares
with metadata.node_threshold. The file holds the nodes kept that an edge kept touches, and every embedding and
logit; its links are the edges kept, with their weights adjacency[target, source].
"""

import re
from importlib import metadata

import torch

from gelutrace import PipelineError
from gelutrace.circuit.graph import NeuronGraph
from gelutrace.circuit.prune import Pruned
from gelutrace.files import atomic
from gelutrace.model.tokens import token_text

NEURON_TYPE = "cross layer transcoder"
OTHER_TYPE = "mlp reconstruction error"


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id, feature, layer, pos, feature_type, js_id, clerp="", influence=None, activation=None, **logit):
    return {"node_id": node_id, "feature": feature, "layer": str(layer), "ctx_idx": pos, "feature_type": feature_type,
            "token_prob": logit.get("token_prob", 0.0), "is_target_logit": logit.get("is_target_logit", False),
            "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_id, "clerp": clerp, "influence": influence,
            "activation": activation}


def _nodes(graph: NeuronGraph, influence: list, labels: list[str], text) -> list[dict]:
    """Every node of the graph, in its order."""
    n_pos, last = graph.n_pos, graph.n_pos - 1
    out = []
    for i, ((layer, pos, dim), value) in enumerate(zip(graph.neurons.tolist(), graph.values.tolist())):
        out.append(_node(f"{layer}_{dim}_{pos}", cantor(layer, dim), layer, pos, NEURON_TYPE, f"{layer}_{dim}-0",
                         labels[i], influence[i], value))
    for k in range(graph.n_layers * n_pos):
        layer, pos = divmod(k, n_pos)
        out.append(_node(f"err_{layer}_{pos}", -1, layer, pos, OTHER_TYPE, f"{layer}_{pos}-0",
                         f"L{layer} other neurons", influence[graph.other_start + k]))
    for pos, token in enumerate(graph.input_tokens.tolist()):
        out.append(_node(f"E_{token}_{pos}", pos, "E", pos, "embedding", f"E_{token}-{pos}",
                         influence=influence[graph.embedding_start + pos]))
    layer = graph.n_layers + 1
    for j, (token, p) in enumerate(zip(graph.logit_tokens.tolist(), graph.logit_probabilities.tolist())):
        out.append(_node(f"{layer}_{token}_{last}", token, layer, last, "logit", f"L_{token}-{last}",
                         f'Output "{text(token)}" (p={p:.3f})', token_prob=p, is_target_logit=j == 0))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:64].strip("-") or "trace"


def _version() -> str | None:
    try:
        return metadata.version("gelutrace")
    except metadata.PackageNotFoundError:
        return None


def used_nodes(graph: NeuronGraph, pruned: Pruned) -> torch.Tensor:
    """(n_nodes,) bool: the nodes the file holds, as circuit-tracer's create_used_nodes_and_edges: the nodes kept that
    an edge kept touches, embeddings and logits."""
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    used = torch.zeros(graph.n_nodes, dtype=torch.bool)
    used[targets] = used[sources] = True
    used[graph.embedding_start:] = True
    return used & pruned.node_mask


def graph_json(graph: NeuronGraph, pruned: Pruned, *, slug: str | None = None, tokenizer=None,
               labels: list[str] | None = None, supernodes: list[tuple[str, list[int]]] | None = None,
               pinned: list[int] | None = None) -> dict:
    """
    The graph file's content. `labels`: one per kept neuron (default `L{layer}/N{dim}`); `supernodes`: (label,
    kept-neuron indices) pairs; `pinned`: node indices (in the graph's order). Members and pinned nodes not in the
    file (pruned) are left out, and a supernode left without members; every supernode member is also pinned,
    since the viewers' subgraph shows only pinned nodes. Token strings come from `tokenizer` when given, else
    they are the token ids.
    """
    n_kept = graph.n_kept
    if labels is None:
        labels = [f"L{layer}/N{dim}" for layer, _, dim in graph.neurons.tolist()]
    if len(labels) != n_kept:
        raise PipelineError(f"{len(labels)} labels for {n_kept} kept neurons")
    if pruned.node_mask.shape != (graph.n_nodes,):
        raise PipelineError(f"the pruning is of a graph of {len(pruned.node_mask)} nodes, not {graph.n_nodes}")
    for _, members in supernodes or []:
        if any(not 0 <= m < n_kept for m in members):
            raise PipelineError(f"a supernode's members are kept neurons, indices 0 to {n_kept - 1}: {members}")
    if any(not 0 <= i < graph.n_nodes for i in pinned or []):
        raise PipelineError(f"pinned nodes are node indices, 0 to {graph.n_nodes - 1}: {pinned}")

    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources]
    values = graph.values[pruned.node_mask[:n_kept]]
    if not (torch.isfinite(weights).all() and torch.isfinite(values).all()):
        raise PipelineError("the graph has non-finite edge weights or neuron values")

    text = (lambda t: token_text(tokenizer, t)) if tokenizer is not None else str
    nodes = _nodes(graph, pruned.cumulative_scores.tolist(), labels, text)
    used = used_nodes(graph, pruned)
    ids = [node["node_id"] for node in nodes]
    links = [{"source": ids[s], "target": ids[t], "weight": w}
             for t, s, w in zip(targets.tolist(), sources.tolist(), weights.tolist())]

    groups = []
    for label, members in supernodes or []:
        members = [ids[m] for m in dict.fromkeys(members) if used[m]]
        if members:
            groups.append([label, *members])
    pins = [ids[i] for i in pinned or [] if used[i]]
    pins = list(dict.fromkeys(pins + [m for group in groups for m in group[1:]]))

    s = graph.settings
    generator = {"name": "gelutrace"}
    if version := _version():
        generator["version"] = version
    return {
        "metadata": {
            "slug": slug or _slug(f"{graph.model_name}-{graph.prompt}"),
            "scan": graph.model_name,
            "transcoder_list": [],
            "prompt_tokens": [text(t) for t in graph.input_tokens.tolist()],
            "prompt": graph.prompt,
            "node_threshold": s.node_threshold,
            "schema_version": 1,  # Neuronpedia: node.feature is a Cantor pairing of (layer, index)
            "info": {"generator": generator},
            "generation_settings": {"max_feature_nodes": s.max_nodes, "max_n_logits": s.max_logits,
                                    "desired_logit_prob": s.logit_probability, "batch_size": s.batch_size},
            "pruning_settings": {"node_threshold": s.node_threshold, "edge_threshold": s.edge_threshold},
        },
        "qParams": {"pinnedIds": pins, "supernodes": groups, "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": [node for node, keep in zip(nodes, used.tolist()) if keep],
        "links": links,
    }


def write_graph_json(graph: NeuronGraph, pruned: Pruned, target, **options) -> None:
    """Write graph_json(graph, pruned, **options) to `target` atomically."""
    atomic.write_json(graph_json(graph, pruned, **options), target)
