"""
How stable a selection is: each method's subset chosen again on each half of the selection data (by stage d,
which records both in the subset's sidecar), and the Jaccard overlap of the two subsets (stage e; 1: the same
neurons; what random draws share is the chance level). A low overlap says that the selection data is too little
for the method's choice to be trusted.

The halves: in prompt mode, the prompt CSV's rows split in two by one seeded permutation (`prompt_halves`, the
same in every stage: stage b's attribution_half_* and d_calculate_neuron_effects's delta_nll_half_* columns
are measured on them); the graph and activation counts of a half are counted from the activation matrix's
rows of that half's prompts, its causal weights (stage b --direct_edges) measured on them by stage b. In corpus mode, the windows split in two: the shards of a run merged from
`--shard I/N` shards (windows I, I+N, ...), the first half of the shards against the rest (run_pipeline.sh runs
stage b as two shards for this).
"""

from dataclasses import dataclass, field

import numpy as np

from gelutrace import PipelineError
from gelutrace.files import formats, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.graph import causal
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.record.prompts import prompt_halves
from gelutrace.selection import methods as sel


def jaccard(a, b) -> float:
    """|A & B| / |A | B| of two sets of neuron ids (NaN when both are empty)."""
    a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    return len(a & b) / len(a | b) if a | b else np.nan


MEASURED = {"attribution": (layout.FREQUENCY, "attribution"), "ablation": (layout.NEURON_EFFECTS, "delta_nll")}


def half_columns(name: str) -> list[str]:
    return [f"{name}_{h}" for h in layout.HALVES]


@dataclass
class Half:
    """One half of the selection data as stage d sees it: its graph and its per-neuron measured scores."""
    graph: gr.CoactivationGraph
    measured: dict = field(default_factory=dict)  # method -> scores per neuron id (NaN: not measured)


@dataclass
class Halves:
    halves: list  # two Half, or empty
    how: str  # what the halves are, or why there are none


def _measured(dataset_path, m: str, n: int) -> list[dict]:
    out = [{}, {}]
    for method, (template, column) in MEASURED.items():
        p = layout.path(dataset_path, template, m)
        if not p.is_file():
            continue
        for h, name in enumerate(half_columns(column)):
            values = formats.read_neuron_column(p, name, n, "", missing_ok=True, optional=True)
            if values is not None:
                out[h][method] = values
    return out


def prompt_mode_halves(dataset_path, m: str, prompts) -> Halves:
    """The halves of a prompt-mode dataset made from `prompts` (the prompt CSV's rows)."""
    half = prompt_halves(len(prompts))
    if half is None:
        return Halves([], "one prompt cannot be split")
    data = gr.load_activation_data(dataset_path)
    per_prompt = np.array([p.new_tokens * p.num_samples for p in prompts], np.int64)
    if per_prompt.sum() != data.num_samples:
        return Halves([], f"the activation matrix has {data.num_samples} samples, the prompt CSV asks for "
                          f"{per_prompt.sum()}")
    sample_half = np.repeat(half, per_prompt)
    measured = _measured(dataset_path, m, data.num_neurons)
    out = []
    for h in (0, 1):
        rows = np.flatnonzero(sample_half == h)
        if not len(rows):
            return Halves([], "a half of the prompts generates no tokens")
        g = gs.count_graph(data.rows(rows))
        direct = layout.path(dataset_path, layout.DIRECT_EDGES, m)
        if direct.is_file():  # stage b --direct_edges measured each half's causal weights too
            g.causal = causal.CausalEdges.read_npz(direct, data.num_neurons, data.d_mlp, half=h)
        out.append(Half(g, measured[h]))
    n_a = int((half == 0).sum())
    return Halves(out, f"prompt rows split {n_a} + {len(prompts) - n_a}, seeded")


def shard_attribution(shards: list, m: str) -> dict:
    """{"attribution": per neuron} of a group of shards run with --attribution (their token-weighted mean), or {}."""
    total, tokens = None, 0
    for d in shards:
        rec = DatasetDir(d, m).corpus_record()
        if rec.get("attribution_tokens") is None:
            return {}
        values = formats.read_neuron_column(layout.path(d, layout.FREQUENCY, m), "attribution", int(rec["n_layer"]) * int(rec["d_mlp"]),
                                       "stage b --attribution writes it")
        total = values * rec["attribution_tokens"] + (0 if total is None else total)
        tokens += rec["attribution_tokens"]
    return {"attribution": total / max(tokens, 1)} if total is not None else {}


def corpus_mode_halves(record: dict, m: str, dataset_path=None) -> Halves:
    """The halves of a corpus-mode dataset merged from shards: the first half of its shards against the rest
    (attribution from the shards' frequency files; single-neuron effects from the dataset's, measured on its
    corpus by window, d_calculate_neuron_effects.py --input_text)."""
    shards = record.get("merged_shards") or []
    if len(shards) < 2:
        return Halves([], "stage b ran as one shard; run it as --shard 0/2 and 1/2 and merge them for the halves")
    missing = [d for d in shards
               if not layout.path(d, layout.WEIGHTED_GRAPH, m).is_dir() or not DatasetDir(d, m).is_corpus]
    if missing:
        return Halves([], f"the shard directory {missing[0]} is gone")
    groups = [shards[:len(shards) // 2], shards[len(shards) // 2:]]
    n = int(record["n_layer"]) * int(record["d_mlp"])
    effects = _measured(dataset_path, m, n) if dataset_path is not None else [{}, {}]
    out = [Half(gs.sum_graphs([gs.read_store(layout.path(d, layout.WEIGHTED_GRAPH, m)) for d in g]),
                {**shard_attribution(g, m), **({"ablation": e["ablation"]} if "ablation" in e else {})})
           for g, e in zip(groups, effects)]
    if any(h.graph.num_samples == 0 for h in out):
        return Halves([], "a half of the windows is empty (the corpus is shorter than two windows)")
    return Halves(out, f"windows split by shard: {len(groups[0])} + {len(groups[1])} of {len(shards)} shards")


def halves_of(dataset_path, m: str, prompts=None, corpus_record: dict | None = None) -> Halves:
    """The dataset's two halves, or none and why (stage e reports either; a dataset it can still evaluate, e.g.
    without its activation matrix, is no reason to fail)."""
    try:
        if corpus_record is not None:
            return corpus_mode_halves(corpus_record, m, dataset_path)
        return prompt_mode_halves(dataset_path, m, prompts)
    except PipelineError as e:
        return Halves([], f"the selection data cannot be split: {e}")


def _choose(half: Half, method: str, threshold: float | None, weight: str, ks: list[int], seed: int,
            exclude_layers=()) -> list:
    """The subsets of sizes ks chosen on one half (None for a size that cannot be: too few neurons measured)."""
    if method in MEASURED and method not in half.measured:
        return [None] * len(ks)
    try:
        return [s.ids for s in sel.select_sizes(half.graph, threshold, ks, method, seed, weight=weight,
                                                measured=half.measured, exclude_layers=exclude_layers)]
    except PipelineError:
        if len(ks) == 1:
            return [None]
        return [_choose(half, method, threshold, weight, [k], seed, exclude_layers)[0] for k in ks]


def half_selections(halves: Halves, method: str, threshold: float | None, weight: str, ks: list[int], seed: int,
                    match_layers=None, exclude_layers=()) -> list[dict]:
    """
    What stage d records in each sidecar of a method variant's subsets (sizes ks) as `halves`: whether there are
    halves and what they are, and the subset chosen again on each half (half_a, half_b: neuron ids in rank
    order; None where it cannot be: a method not measured on the halves, too few neurons measured, random matched
    to another subset's layers). Random draws with the next two seeds: the overlap that chance gives. With
    exclude_layers, the halves rank without those layers too.
    """
    out = [{"available": len(halves.halves) == 2, "how": halves.how, **dict.fromkeys(layout.HALVES)} for _ in ks]
    if len(halves.halves) != 2 or match_layers:
        return out
    offsets = (1, 2) if method == "random" else (0, 0)
    for name, half, offset in zip(layout.HALVES, halves.halves, offsets):
        for rec, ids in zip(out, _choose(half, method, threshold, weight, ks, seed + offset, exclude_layers)):
            rec[name] = None if ids is None else ids.tolist()
    return out


def recorded_overlap(info: dict) -> float:
    """The Jaccard overlap of the subset chosen on each half, from its sidecar (NaN where it could not be chosen
    again, or where the sidecar records no halves)."""
    rec = info.get("halves") or {}
    picks = [rec.get(h) for h in layout.HALVES]
    return np.nan if any(p is None for p in picks) else jaccard(*picks)


OLDER_SIDECARS = "the subsets' sidecars record no halves (written by an older stage d; rerun it)"


def recorded_halves(infos: list[dict]) -> dict:
    """Whether the subsets' sidecars (`infos`) had halves and what they were, for comparison.json."""
    seen = list(dict.fromkeys((bool(h.get("available")), str(h.get("how")))
                              for h in (i.get("halves") for i in infos) if isinstance(h, dict)))
    if not seen:
        return {"available": False, "halves": OLDER_SIDECARS}
    return {"available": all(a for a, _ in seen), "halves": "; ".join(how for _, how in seen)}
