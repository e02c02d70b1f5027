"""
{m}_causal_graph.html (f_render_neuron_cards.py --causal_graph N): the corpus-level causal graph of a dataset as a
viewer page (gelutrace.report.viewer). Its nodes are the N neurons of largest influence through the causal graph,
CausalEdges.influence, the score stage d's `influence` method ranks by (ties to the lower id); its links the
N x CAUSAL_LINKS_PER_NODE direct edges among them of largest |direct| weight (the mean direct effect stage b's
--direct_edges measured, source neuron on target neuron; ties to the earlier layer pair, then the lower ids). One
column per layer, the neurons of a column grouped by module (c_find_modules' count modules, where found) and
ordered by influence; modules with two or more of the neurons are the supernodes. Each node has its neuron's card
(gelutrace.report.cards). The sliders start at 1 (every node and link shown) and prune by cumulative influence
among the N nodes and by cumulative |weight| among the links.
"""

import json
from pathlib import Path

import numpy as np
import torch

from gelutrace import PipelineError
from gelutrace.circuit.prune import ranked_shares
from gelutrace.files import layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.graph import store as gs
from gelutrace.graph.causal import CausalEdges
from gelutrace.report import cards as cd
from gelutrace.report import tracelabels, viewer

CAUSAL_LINKS_PER_NODE = 4


def causal_source(data, m: str) -> Path:
    """Where the dataset's direct edges are: stage b's {m}_direct_edges.npz (prompt mode), else the graph store's
    (stage c; corpus mode); an error where it has none, or where the directory is not a dataset of the model."""
    DatasetDir(data, m).check_model()
    npz = layout.path(data, layout.DIRECT_EDGES, m)
    if npz.is_file():
        return npz
    store = layout.path(data, layout.WEIGHTED_GRAPH, m)
    header = store / layout.GRAPH_STORE_HEADER
    if header.is_file():
        try:
            if "direct" in json.loads(header.read_text(encoding="utf-8")):
                return store
        except (OSError, ValueError, TypeError) as e:
            raise PipelineError(f"cannot read {header}: {e}") from None
    raise PipelineError(f"{data} has no direct edges (no {npz.name}, and no {store.name}/ with them): the causal graph "
                        f"needs stage b's --direct_edges")


def read_causal(data, m: str, n_neurons: int, d_mlp: int) -> CausalEdges:
    source = causal_source(data, m)
    causal = (CausalEdges.read_npz(source, n_neurons, d_mlp) if source.suffix == ".npz"
              else gs.read_store(source).causal)
    if causal is None:
        raise PipelineError(f"{source} holds no direct edges: the causal graph needs stage b's --direct_edges")
    return causal


def top_neurons(causal: CausalEdges, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n neuron ids of largest influence, largest first (ties to the lower id), and every neuron's influence."""
    influence = causal.influence()
    return np.argsort(-influence, kind="stable")[:n], influence


def strongest_edges(causal: CausalEdges, ids: np.ndarray, d_mlp: int, n: int) -> list[tuple[int, int, float]]:
    """The n (source id, target id, direct weight) among `ids` of largest |weight|, nonzero, strongest first."""
    ids = np.asarray(ids, np.int64)
    found = []
    for k, (i, j) in enumerate(causal.pairs):
        src, tgt = ids[ids // d_mlp == i], ids[ids // d_mlp == j]
        if not (len(src) and len(tgt)):
            continue
        w = np.asarray(causal.matrix("direct", k), np.float64)[np.ix_(src % d_mlp, tgt % d_mlp)]
        for a, b in zip(*np.nonzero(w)):
            found.append((int(src[a]), int(tgt[b]), float(w[a, b])))
    order = np.argsort([-abs(w) for _, _, w in found], kind="stable")[:n]
    return [found[r] for r in order]


def _figures(c: cd.Card, influence: float) -> str:
    parts = [f"influence {influence:.4g}", f"activation frequency {c.frequency:.4g}",
             f"mean activation {c.mean_activation:.4g}"]
    if np.isfinite(c.delta_nll):
        parts.append(f"single-neuron ΔNLL {c.delta_nll:.4g}")
    return "; ".join(parts)


def causal_data(causal: CausalEdges, ids: np.ndarray, influence: np.ndarray, cards: list[cd.Card], m: str,
                n_layer: int, d_mlp: int) -> dict:
    """The page data of the neurons `ids` (most influential first) with their cards (in that order)."""
    modules = np.array([c.module for c in cards], np.int64)
    inf = influence[ids]
    # a column's neurons: those of one module together (the module's most influential first), then by influence
    lead = {}
    for k, v in zip(modules.tolist(), inf.tolist()):
        lead[k] = max(lead.get(k, -np.inf), v)
    order = sorted(range(len(ids)), key=lambda r: (modules[r] < 0, -lead[modules[r]], modules[r], -inf[r]))
    ids, inf, modules, cards = ids[order], inf[order], modules[order], [cards[r] for r in order]
    node_id = [f"{n // d_mlp}_{n % d_mlp}" for n in ids.tolist()]
    at = {n: r for r, n in enumerate(ids.tolist())}
    edges = strongest_edges(causal, ids, d_mlp, CAUSAL_LINKS_PER_NODE * len(ids))
    weights = torch.tensor([abs(w) for _, _, w in edges], dtype=torch.float64)
    graph = cards[0].module_graph if cards else ""
    groups = [{"name": f"M{k}", "members": np.flatnonzero(modules == k).tolist()}
              for k in dict.fromkeys(modules.tolist()) if k >= 0 and (modules == k).sum() >= 2]
    return {
        "kind": "causal", "title": f"Causal graph of {m}",
        "subtitle": f"The {len(ids)} neurons of largest influence through the causal graph (stage d's influence) and "
                    + (f"the {len(edges)} strongest direct edges among them" if edges else
                       f"no direct edge among them (stage b measured the {causal.edges} layer pairs)")
                    + (f"; supernodes: their modules ({graph} graph)" if groups else ""),
        "hint": viewer.HINT, "columns": [f"layer {i}" for i in range(n_layer)], "rows": [""],
        "thresholds": {"node": 1.0, "edge": 1.0},
        "layout": {"cellWidth": 280, "spacing": 22, "perLine": 1, "labels": True},
        "nodes": {"id": node_id, "row": [0] * len(ids), "col": (ids // d_mlp).tolist(), "type": ["neuron"] * len(ids),
                  "label": [tracelabels.compose_label(c.layer, c.dimension, c.examples, c.promoted) for c in cards],
                  "size": viewer.significant(inf), "influence": viewer.significant(inf),
                  "activation": [None] * len(ids),
                  "share": viewer.rounded_down(ranked_shares(torch.from_numpy(inf)).numpy(), viewer.SHARE_DIGITS),
                  "card": list(range(len(ids)))},
        "links": {"source": [at[s] for s, _, _ in edges], "target": [at[t] for _, t, _ in edges],
                  "weight": viewer.significant([w for _, _, w in edges], 3),
                  "share": viewer.rounded_down(ranked_shares(weights).numpy(), viewer.SHARE_DIGITS - 1)},
        "supernodes": groups, "pinned": [],
        "cards": [viewer.card_json(c.examples, c.promoted, c.suppressed,
                                   f"module {c.module} of the {c.module_graph} graph" if c.module >= 0 else "",
                                   _figures(c, float(v))) for c, v in zip(cards, inf.tolist())],
    }


def write_causal_page(model, tokenizer, data, m: str, n: int, target, batch_size: int = 32, progress=None) -> Path:
    """The causal page of the dataset `data` (prefix m) with its top n neurons, written to target."""
    cfg = model.config
    n_neurons = cfg.n_layer * cfg.d_mlp
    causal = read_causal(data, m, n_neurons, cfg.d_mlp)
    ids, influence = top_neurons(causal, n)
    cards = cd.build_cards(model, tokenizer, data, m, ids, viewer.CARD_EXAMPLES, batch_size, progress,
                           modules=cd.dataset_modules(data, m, n_neurons))
    return viewer.write_page(causal_data(causal, ids, influence, cards, m, cfg.n_layer, cfg.d_mlp), target)
