"""
The summary of a per-prompt neuron graph: {m}_trace_summary.md (for reading), .csv (its top kept neurons by
influence with their labels, modules and effects) and .json (its figures), written together as one output set.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace.circuit.faithfulness import (
    CorpusAgreement,
    Faithfulness,
    kept_influence,
    predicted_effects,
    top_nodes,
    top_target,
)
from gelutrace.circuit.graph import NeuronGraph
from gelutrace.files import atomic, layout
from gelutrace.model.tokens import token_text
from gelutrace.report import markdown, viewer
from gelutrace.report.supernodes import Concentration

TOP_NEURONS = 20  # rows of the summary's table


@dataclass
class TraceSummary:
    graph: NeuronGraph
    influence: np.ndarray  # per kept neuron (or per node)
    labels: list[str]  # per kept neuron
    replacement: float  # circuit-tracer's replacement score, "other neurons" as its error nodes
    completeness: float  # its completeness score
    modules: np.ndarray | None = None  # each kept node's corpus module (-1: none); None: no modules file
    module_names: dict = field(default_factory=dict)  # module -> its supernode name
    faithfulness: Faithfulness | None = None
    corpus: CorpusAgreement | None = None
    concentration: Concentration | None = None


def _number(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def summary_table(s: TraceSummary, tokenizer, top: int = TOP_NEURONS) -> pd.DataFrame:
    """The `top` kept neurons of largest influence as layout.TRACE_SUMMARY_COLUMNS rows, most influential first."""
    g = s.graph
    nodes = top_nodes(g, s.influence, top)
    inf = kept_influence(g, s.influence)
    predicted = predicted_effects(g) if g.n_logits else np.full(g.n_kept, np.nan)
    measured = np.full(g.n_kept, np.nan)
    if s.faithfulness is not None:
        measured[s.faithfulness.nodes] = s.faithfulness.measured
    layer, pos, dim = (g.neurons[nodes, c].numpy() for c in range(3))
    return pd.DataFrame({
        "rank": np.arange(1, len(nodes) + 1), "node": nodes, "layer": layer, "position": pos, "dimension": dim,
        "token": [token_text(tokenizer, int(g.input_tokens[p])) for p in pos], "influence": inf[nodes],
        "activation": g.values[nodes].double().numpy(),
        "module": s.modules[nodes] if s.modules is not None else np.full(len(nodes), -1),
        "predicted": predicted[nodes], "measured": measured[nodes], "label": [s.labels[i] for i in nodes]},
        columns=layout.TRACE_SUMMARY_COLUMNS)


def summary_record(s: TraceSummary, tokenizer) -> dict:
    """The figures, JSON-ready (NaN as null)."""
    g = s.graph
    t = top_target(g) if g.n_logits else None
    out = {"prompt": g.prompt, "model": g.model_name, "kept_neurons": g.n_kept,
           "top_token": None if t is None else token_text(tokenizer, int(g.logit_tokens[t])),
           "top_probability": None if t is None else float(g.logit_probabilities[t]),
           "replacement_score": _number(s.replacement), "completeness_score": _number(s.completeness),
           "faithfulness": None, "corpus": None, "concentration": None}
    f = s.faithfulness
    if f is not None:
        out["faithfulness"] = {"nodes": len(f.nodes), "spearman": _number(f.spearman),
                               "sign_agreement": _number(f.sign_agreement)}
    if s.corpus is not None:
        out["corpus"] = {"neurons": len(s.corpus.neurons), "spearman": _number(s.corpus.spearman),
                         "median_corpus_rank": _number(s.corpus.median_corpus_rank)}
    c = s.concentration
    if c is not None:
        out["concentration"] = {"statistic": "herfindahl", "herfindahl": c.herfindahl,
                                "effective_modules": _number(c.effective_modules),
                                "null_effective_modules": _number(c.null_effective_modules), "p_value": c.p_value,
                                "permutations": c.permutations, "seed": c.seed, "neurons": c.neurons,
                                "modules": c.modules, "unassigned_share": c.unassigned_share}
    return out


def _fmt(x, spec: str = ".3g") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def summary_markdown(s: TraceSummary, table: pd.DataFrame, record: dict, m: str) -> str:
    g = s.graph
    lines = [f"# Per-prompt neuron graph of {markdown.escape(m)}", "",
             f"Prompt: {markdown.escape(markdown.visible(g.prompt))}", ""]
    if record["top_token"] is not None:
        lines += [f"Top token: \"{markdown.escape(markdown.visible(record['top_token']))}\" (probability "
                  f"{record['top_probability']:.3g}); {g.n_logits} logit nodes, {g.n_kept} kept neurons.", ""]
    lines += ["## Scores", "",
              f"Replacement score {_fmt(record['replacement_score'])}, completeness score "
              f"{_fmt(record['completeness_score'])} (circuit-tracer's definitions, with the \"other neurons\" nodes "
              f"as its error nodes).", "", "## Faithfulness", ""]
    f = record["faithfulness"]
    if f is not None:
        lines += [f"Against the real model: the {f['nodes']} most influential kept neurons, each zeroed at its "
                  f"position alone in the unfrozen model, against the graph's total effect through every path on "
                  f"the top token's demeaned logit: Spearman {_fmt(f['spearman'])}, same sign "
                  f"{_fmt(100 * f['sign_agreement'] if f['sign_agreement'] is not None else None, '.0f')} %.", ""]
    else:
        lines += ["Not measured against the real model.", ""]
    c = record["corpus"]
    if c is not None:
        lines += [f"Against the corpus: the prompt's {c['neurons']} most influential neurons' influence against "
                  f"stage d's corpus `influence` scores: Spearman {_fmt(c['spearman'])}; their median rank in the "
                  f"corpus ranking {_fmt(c['median_corpus_rank'], '.0f')}.", ""]
    k = record["concentration"]
    if k is not None:
        lines += ["## Modules", "",
                  f"The prompt's influence over the corpus modules of its {k['neurons']} distinct neurons (in "
                  f"{k['modules']} modules; {100 * k['unassigned_share']:.0f} % in none) spreads over "
                  f"{_fmt(k['effective_modules'])} effective modules (1 / Herfindahl index), "
                  f"{_fmt(k['null_effective_modules'])} when the neurons are relabelled to random modules of the same "
                  f"sizes: permutation p = {k['p_value']:.3g} ({k['permutations']} relabellings, seed {k['seed']}; "
                  f"a small p: the influence concentrates in fewer modules than chance).", ""]
        if s.module_names:
            lines += ["Supernodes: " + "; ".join(markdown.escape(n) for _, n in sorted(s.module_names.items())), ""]
    lines += [f"## Top {len(table)} neurons by influence", "",
              "Predicted: the graph's total effect of zeroing the neuron on the top token's demeaned logit; "
              "measured: the real model's (– where not ablated).", "",
              "| rank | node | layer | position | token | dimension | influence | activation | module | predicted | "
              "measured | label |", "|" + "---|" * 12]
    for r in table.itertuples():
        lines.append(f"| {r.rank} | {r.node} | {r.layer} | {r.position} | "
                     f"{markdown.escape(markdown.token_cell(r.token))} | {r.dimension} | {r.influence:.3g} | "
                     f"{r.activation:.3g} | {r.module if r.module >= 0 else '–'} | {_fmt(r.predicted)} | "
                     f"{_fmt(r.measured)} | {markdown.escape(r.label)} |")
    return "\n".join(lines + [""])


def write_trace_summary(directory, m: str, s: TraceSummary, tokenizer, top: int = TOP_NEURONS,
                        graph_doc: dict | None = None, extra=None, page: dict | None = None) -> list[Path]:
    """The summary's three files in `directory` (with `graph_doc` the graph file, layout.TRACE_GRAPH; with `page`,
    viewer data, its page layout.TRACE_PAGE; with `extra`, (names, write(directory) -> paths), the caller's files),
    swapped in together (atomic.OutputSet): a failure leaves the earlier ones as they were."""
    directory = Path(directory)
    table = summary_table(s, tokenizer, top)
    record = summary_record(s, tokenizer)
    names = [f.format(m=m) for f in layout.TRACE_SUMMARY_SET]
    graph_name, page_name = layout.TRACE_GRAPH.format(m=m), layout.TRACE_PAGE.format(m=m)
    extra_names, write_extra = extra or ([], None)
    with atomic.OutputSet(directory, layout.path(directory, layout.TRACE_SUMMARY_MANIFEST, m),
                          names + [graph_name, page_name] + list(extra_names), "the trace") as out:
        md, csv, js = (out.dir / n for n in names)
        atomic.write_bytes(summary_markdown(s, table, record, m).encode("utf-8"), md)
        atomic.write_csv(table, csv)
        atomic.write_json(record, js, indent=2)
        written = [md, csv, js]
        if graph_doc is not None:
            atomic.write_json(graph_doc, out.dir / graph_name)
            written.append(out.dir / graph_name)
        if page is not None:
            written.append(viewer.write_page(page, out.dir / page_name))
        if write_extra is not None:
            written += [Path(f) for f in write_extra(out.dir)]
        out.vouch(written)
    return [directory / p.name for p in written]


def write_trace_files(directory, m: str, extra) -> list[Path]:
    """Only the caller's files (extra: (names, write(directory) -> paths)) as the trace's output set: the summary,
    graph and page of an earlier run in `directory` are removed as they are swapped in."""
    directory = Path(directory)
    names, write = extra
    owned = [f.format(m=m) for f in (*layout.TRACE_SUMMARY_SET, layout.TRACE_GRAPH, layout.TRACE_PAGE)] + list(names)
    with atomic.OutputSet(directory, layout.path(directory, layout.TRACE_SUMMARY_MANIFEST, m), owned,
                          "the trace") as out:
        written = [Path(f) for f in write(out.dir)]
        out.vouch(written)
    return [directory / p.name for p in written]
