"""
The viewer pages: {m}_trace_graph.html (a per-prompt neuron graph, beside its {m}_trace_graph.json) and
{m}_causal_graph.html (the corpus-level causal graph of a dataset). Each is one self-contained file that needs no
network: d3 (vendored from the npm registry into vendor/, its version, tarball and licence recorded there) and
viewer.js are inlined, and the data is embedded once, as JSON in <script type="application/json"
id="gelutrace-data">, with every <, >, &, U+2028 and U+2029 written as a \\u escape so that no text can end it.

The embedded data (columns of equal length; node indices into the node columns):
  kind "trace" | "causal", title, subtitle, hint;
  columns (the labels along x: the prompt's tokens, or the layers), rows (along y, bottom first);
  thresholds {node, edge}: where the sliders start; layout: the drawing's cell sizes (viewer.js has defaults);
  nodes {id, row, col, type (neuron, other, embedding, logit), label, size (the radius grows with it), influence,
         activation (null where none), share, card (an index into cards, -1: none)};
  links {source, target, weight, share};
  supernodes [{name, members}], pinned [node id], cards [{module, figures, examples [{tokens, acts, next, value}],
         promoted [[token, value]], suppressed [[token, value]]}].
A node is drawn iff its share <= the node slider, a link iff both its ends are drawn and its share <= the edge
slider. A share is prune.ranked_shares: the part of the total score held by the scores strictly above it, so
that the slider prunes by cumulative influence as the file's own pruning did; rounded down, and at most the
file's threshold for what the file holds, so that at the file's thresholds the page draws exactly the file's
nodes and links (embeddings and logits, always kept, have share 0).
"""

import json
from dataclasses import dataclass
from functools import cache
from html import escape
from pathlib import Path

import numpy as np

from gelutrace import PipelineError
from gelutrace.circuit.export import OTHER_TYPE, used_nodes
from gelutrace.circuit.graph import NeuronGraph
from gelutrace.circuit.prune import Pruned
from gelutrace.files import atomic
from gelutrace.report import cards as cd
from gelutrace.report import markdown

HERE = Path(__file__).resolve().parent
CARD_EXAMPLES = 3  # top examples per card ...
CARD_TOKENS = 24  # ... of at most this many tokens, ending at the one the neuron fires on
CARD_EFFECT_TOKENS = 5  # promoted and suppressed tokens per card
SHARE_DIGITS = 6  # decimals of the node shares (rounded down); the links' take SHARE_DIGITS - 1
HINT = "Click a node for its card; shift-click it (or the card's pin button) to pin it."
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
header { padding: 0.4em 1em; border-bottom: 1px solid #ddd; }
header h1 { font-size: 1.2em; margin: 0.2em 0; }
#subtitle { font-size: 0.9em; color: #555; white-space: pre-wrap; }
#main { display: flex; height: calc(100vh - 4.5em); }
#view { position: relative; flex: 1; overflow: auto; }
#view canvas, #view svg { position: absolute; left: 0; top: 0; }
#side { width: 26em; border-left: 1px solid #ddd; padding: 0.5em 1em; overflow: auto; font-size: 0.9em; }
.control { margin: 0.3em 0; } .control input { width: 12em; vertical-align: middle; }
.column-label, .row-label { font-size: 11px; fill: #444; white-space: pre; }
.row-label { paint-order: stroke; stroke: #fff; stroke-width: 3px; }
.row-line { stroke: #eee; }
g.node { cursor: pointer; } g.node .shape { stroke: #555; stroke-width: 0.5; }
g.node.pinned .shape { stroke: #000; stroke-width: 1.5; }
g.node.selected .shape { stroke: #d62728; stroke-width: 2.5; }
.node-label { font-size: 10px; fill: #333; pointer-events: none; white-space: pre; }
.supernode-label { font-size: 10px; font-weight: bold; pointer-events: none; white-space: pre; }
.halo { stroke-width: 0.5; }
.link-highlight { stroke-opacity: 0.9; pointer-events: none; }
.card-label { font-weight: bold; margin: 0.4em 0; word-break: break-word; white-space: pre-wrap; }
.card-facts, .card-module, .card-figures { margin: 0.3em 0; color: #444; }
.card-heading { font-weight: bold; margin-top: 0.5em; }
.card-example { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 0.3em 0; padding: 0.2em;
                border: 1px solid #eee; word-break: break-all; }
.card-example .next { outline: 2px solid #1565c0; font-weight: bold; }
.card-promoted, .card-suppressed { margin: 0.3em 0; }
.token { font-family: ui-monospace, monospace; background: #eee; padding: 0 3px; margin-right: 4px;
         white-space: pre; display: inline-block; }
.legend span { display: inline-block; margin-right: 0.8em; }
"""

BODY = """<header><h1 id="title"></h1><div id="subtitle"></div></header>
<div id="main"><div id="view"></div><div id="side">
<div class="control"><label for="node-threshold">node threshold</label>
<input type="range" id="node-threshold" min="0" max="1" step="any"> <span id="node-threshold-value"></span></div>
<div class="control"><label for="edge-threshold">edge threshold</label>
<input type="range" id="edge-threshold" min="0" max="1" step="any"> <span id="edge-threshold-value"></span></div>
<div id="counts"></div>
<div class="legend"><span style="color:#2166ac">&#9644; positive</span>
<span style="color:#b2182b">&#9644; negative</span>
<span>&#9675; neuron</span><span>&#9633; other neurons</span></div>
<div id="card"></div></div></div>"""


@cache
def _asset(name: str) -> str:
    text = (HERE / name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "<!--" in text:
        raise PipelineError(f"{HERE / name} cannot be inlined in a <script> element")
    return text


def d3_version() -> str:
    return json.loads((HERE / "vendor" / "d3.json").read_text())["version"]


def embedded_json(data) -> str:
    """data as JSON that no text in it can end a <script> element with (nor open a comment in)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escaped in _ESCAPES.items():
        text = text.replace(char, escaped)
    return text


def page_html(data: dict) -> str:
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<link rel="icon" href="data:,">', f"<title>{escape(data['title'])}</title>", f"<style>{CSS}</style>",
        "</head>", "<body>", BODY,
        f'<script type="application/json" id="gelutrace-data">{embedded_json(data)}</script>',
        f"<script>{_asset('vendor/d3.min.js')}</script>", f"<script>{_asset('viewer.js')}</script>",
        "</body>", "</html>", ""])


def write_page(data: dict, target) -> Path:
    atomic.write_bytes(page_html(data).encode("utf-8"), target)
    return Path(target)


def rounded_down(values, digits: int, cap: float | None = None) -> list[float]:
    """Rounded down to `digits` decimals (and at most `cap`): a share never rounds past a threshold it is under."""
    v = np.floor(np.asarray(values, np.float64) * 10 ** digits) / 10 ** digits
    return (v if cap is None else np.minimum(v, cap)).tolist()


def significant(values, digits: int = 4) -> list[float]:
    return [float(f"{x:.{digits}g}") for x in np.asarray(values, np.float64).tolist()]


# --- cards ----------------------------------------------------------------------------------------------------
def card_json(examples: list[cd.Example], promoted: list[cd.TokenEffect], suppressed: list[cd.TokenEffect],
              module: str = "", figures: str = "") -> dict:
    """A card's data, bounded: CARD_EXAMPLES examples of CARD_TOKENS tokens, CARD_EFFECT_TOKENS tokens each way;
    control characters shown as the cards show them (markdown.visible; a context keeps its newlines)."""
    out = []
    for e in examples[:CARD_EXAMPLES]:
        acts = np.asarray(e.shades, np.float64)[-CARD_TOKENS:]
        out.append({"tokens": [markdown.visible(t, "\n") for t in e.tokens[-CARD_TOKENS:]],
                    "acts": significant(acts, 3), "next": markdown.visible(e.token), "value": float(f"{e.value:.4g}")})
    effects = [[[markdown.visible(t.token), float(f"{t.value:.3g}")] for t in ts[:CARD_EFFECT_TOKENS]]
               for ts in (promoted, suppressed)]
    return {"module": module, "figures": figures, "examples": out, "promoted": effects[0], "suppressed": effects[1]}


@dataclass
class NeuronCards:
    """Card data of a trace's kept neurons: each kept neuron's row in `cards` (a neuron kept at several positions
    shares its card); built by gelutrace.report.tracelabels.trace_cards."""
    rows: np.ndarray  # (n_kept,) int
    cards: list[dict]


# --- the trace page -------------------------------------------------------------------------------------------
def trace_data(doc: dict, graph: NeuronGraph, pruned: Pruned, cards: NeuronCards | None = None) -> dict:
    """The page data of a trace from its graph file's content `doc` (export.graph_json of graph and pruned)."""
    index = used_nodes(graph, pruned).nonzero().flatten().numpy()  # the file's nodes, in its order
    if len(index) != len(doc["nodes"]):
        raise PipelineError("the graph file's nodes are not the pruned graph's")
    ps = doc["metadata"]["pruning_settings"]
    t_node, t_edge = float(ps["node_threshold"]), float(ps["edge_threshold"])
    tokens = doc["metadata"]["prompt_tokens"]
    influence = pruned.node_influence.double().numpy()
    shares = pruned.node_shares.numpy()
    source_only = index >= graph.embedding_start
    order = np.argsort(-np.where(index >= graph.logit_start, 0.0, influence[index]), kind="stable")
    index, doc_nodes = index[order], [doc["nodes"][k] for k in order]
    page_of = np.full(graph.n_nodes, -1, np.int64)
    page_of[index] = np.arange(len(index))

    n_layers, kinds = graph.n_layers, {"embedding": "embedding", "logit": "logit", OTHER_TYPE: "other"}
    row, typ, label, size, activation, card = [], [], [], [], [], []
    for g, node in zip(index.tolist(), doc_nodes):
        kind = kinds.get(node["feature_type"], "neuron")
        typ.append(kind)
        row.append(0 if kind == "embedding" else n_layers + 1 if kind == "logit" else int(node["layer"]) + 1)
        label.append(node["clerp"] or f'"{markdown.visible(tokens[node["ctx_idx"]])}" (embedding)')
        size.append(node["token_prob"] if kind == "logit" else influence[g])
        activation.append(node["activation"])
        card.append(int(cards.rows[g]) if cards is not None and kind == "neuron" else -1)
    node_share = np.where(source_only[order], 0.0, shares[index])

    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    if len(targets) != len(doc["links"]):
        raise PipelineError("the graph file's links are not the pruned graph's")
    weights = graph.adjacency[targets, sources].double().numpy()
    ids = [n["node_id"] for n in doc_nodes]
    at = {node_id: k for k, node_id in enumerate(ids)}
    prompt = doc["metadata"]["prompt"]
    return {
        "kind": "trace", "title": f"Neuron graph of {graph.model_name}", "subtitle": f"Prompt: {markdown.visible(prompt)}",
        "hint": HINT, "columns": [markdown.visible(t) for t in tokens],
        "rows": ["embeddings", *(f"layer {i}" for i in range(n_layers)), "logits"],
        "thresholds": {"node": t_node, "edge": t_edge},
        "layout": {"cellWidth": 60, "spacing": 10, "perLine": 4},
        "nodes": {"id": ids, "row": row, "col": [n["ctx_idx"] for n in doc_nodes],
                  "type": typ, "label": label, "size": significant(size), "influence": significant(influence[index]),
                  "activation": [None if a is None else float(f"{a:.4g}") for a in activation],
                  "share": rounded_down(node_share, SHARE_DIGITS, t_node), "card": card},
        "links": {"source": page_of[sources.numpy()].tolist(), "target": page_of[targets.numpy()].tolist(),
                  "weight": significant(weights, 3),
                  "share": rounded_down(pruned.edge_shares.numpy(), SHARE_DIGITS - 1, t_edge)},
        "supernodes": [{"name": name, "members": [at[m] for m in members]}
                       for name, *members in doc["qParams"]["supernodes"]],
        "pinned": list(doc["qParams"]["pinnedIds"]),
        "cards": cards.cards if cards is not None else [],
    }

