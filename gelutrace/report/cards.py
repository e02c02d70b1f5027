"""
Neuron cards: what a neuron does, in the terms neuron browsers use.

- The direct logit effect: the neuron's output weight vector times the final layer norm's gain, through the
  unembedding; the tokens whose logits it raises and lowers most. It ignores the final layer norm's scale
  (which depends on the whole residual stream) and everything the layers after the neuron's do with its output.
- The top-activating samples of a stage-b dataset: the samples with the largest post-GELU value. Prompt mode:
  found by running the model teacher-forced over the dataset's distinct (prompt, continuation) sequences and
  keeping a running top-k per neuron, batch by batch. Corpus mode: the ones stage b streamed, their windows
  re-read from the corpus for the shading.
- The neuron's degree in a thresholded co-activation graph.
- Cards that put these together with the stage files' per-neuron figures, as Markdown and as one
  self-contained HTML page (cards_html).
"""

import contextlib
import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gelutrace import PipelineError
from gelutrace.files import atomic, formats, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.graph.counts import merge_top
from gelutrace.model.generation import left_pad
from gelutrace.model.hooks import GeluHooks
from gelutrace.model.sites import run_trunk
from gelutrace.model.tokens import token_text
from gelutrace.record.corpus import window_tokens
from gelutrace.report import markdown
from gelutrace.selection import communities as md
from gelutrace.selection import methods as sel


@dataclass
class TokenEffect:
    token_id: int
    token: str
    value: float


@torch.no_grad()
def _output_weights(model, neuron_ids) -> torch.Tensor:
    """The neurons' output weight vectors times the final layer norm's gain, float64 (n_embd, neurons)."""
    cfg = model.config
    ids = np.asarray(neuron_ids, np.int64)
    bad = ids[(ids < 0) | (ids >= cfg.n_layer * cfg.d_mlp)]
    if len(bad):
        raise PipelineError(f"neuron {bad[0]} is outside this model's {cfg.n_layer * cfg.d_mlp} neurons")
    layers, dims = ids // cfg.d_mlp, ids % cfg.d_mlp
    w = torch.empty(model.lm_head.weight.shape[1], len(ids), dtype=torch.float64, device=model.lm_head.weight.device)
    for layer in np.unique(layers):
        cols = np.flatnonzero(layers == layer)
        w[:, cols] = model.transformer.h[int(layer)].mlp.c_proj.weight[:, dims[cols]].double()
    return w * model.transformer.ln_f.weight.double()[:, None]


@torch.no_grad()
def logit_effects(model, neuron_ids) -> np.ndarray:
    """The neurons' direct logit effects on every token, float64 (vocabulary, neurons): W_U (g * W_out[:, dim])."""
    return (model.lm_head.weight.double() @ _output_weights(model, neuron_ids)).cpu().numpy()


@torch.no_grad()
def summed_logit_effect(model, neuron_ids) -> np.ndarray:
    """The summed direct logit effect of a group of neurons all at unit value, float64 (vocabulary,)."""
    return (model.lm_head.weight.double() @ _output_weights(model, neuron_ids).sum(dim=1)).cpu().numpy()


def logit_effect(model, neuron_id: int) -> np.ndarray:
    """The neuron's direct logit effect on every token, float64 (vocabulary,): W_U (g * W_out[:, dim])."""
    return logit_effects(model, [neuron_id])[:, 0]


def has_logit_effect(model) -> bool:
    """Whether the direct logit view applies: model.py's GPT-2 weights (other families' cards go without it)."""
    return hasattr(model, "transformer") and hasattr(model.transformer, "ln_f")


def direct_logit_effects(model, tokenizer, neuron_ids, n: int = 10, chunk: int = 256
                         ) -> list[tuple[list[TokenEffect], list[TokenEffect]]]:
    """
    direct_logit_effect of many neurons, `chunk` neurons' effects on the whole vocabulary at a time (each one's
    float64 column is vocabulary x 8 bytes).
    """
    ids = np.asarray(neuron_ids, np.int64)
    out, text = [], {}  # each token id decoded once: neurons promote the same tokens

    def name(i: int) -> str:
        return text[i] if i in text else text.setdefault(i, token_text(tokenizer, i))

    for lo in range(0, len(ids), chunk):
        effect = logit_effects(model, ids[lo:lo + chunk])
        for c in range(effect.shape[1]):
            pick = [[TokenEffect(int(i), name(int(i)), float(effect[i, c])) for i in top_rows(e, n)]
                    for e in (effect[:, c], -effect[:, c])]
            out.append((pick[0], pick[1]))
    return out


def top_rows(values: np.ndarray, n: int) -> np.ndarray:
    """The indices of the n largest values, largest first, ties to the lower index (a stable sort's order), without
    sorting the whole vector."""
    n = min(n, len(values))
    if n == 0:
        return np.zeros(0, np.int64)
    kth = np.partition(values, len(values) - n)[len(values) - n]
    idx = np.flatnonzero(values >= kth)  # ascending: the stable sort keeps ties in id order
    return idx[np.argsort(-values[idx], kind="stable")][:n]


def direct_logit_effect(model, tokenizer, neuron_id: int, n: int = 10) -> tuple[list[TokenEffect], list[TokenEffect]]:
    """
    (promoted, suppressed): the n tokens whose logits the neuron's output raises most, largest first, and the n
    it lowers most, most lowered first, per unit of post-GELU activation: W_U (g * W_out[:, dim]), g the final
    layer norm's gain. Ties go to the lower token id.
    """
    return direct_logit_effects(model, tokenizer, [neuron_id], n)[0]


@dataclass
class Sequences:
    """
    The distinct (prompt, continuation) sequences of a prompt-mode stage-b dataset. Sample first_id[s] + t is
    token t of sequence s's continuation: its activations are those at the position that predicts it. A
    repeated sequence (greedy repeats of a prompt) is kept once, under the sample ids of its first occurrence.
    """
    ids: list[np.ndarray]  # prompt + continuation token ids
    prompt_len: np.ndarray  # (S,)
    first_id: np.ndarray  # (S,) sample id of token 0 of the continuation

    def locate(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sequence, index of the input position) of each sample id."""
        s = np.searchsorted(self.first_id, sample_ids, side="right") - 1
        return s, self.prompt_len[s] - 1 + (sample_ids - self.first_id[s])

    def prefix(self, sample_id: int) -> np.ndarray:
        """The token ids up to and including the sample's position (the input that predicts its token)."""
        s, pos = self.locate(np.array([sample_id]))
        return self.ids[s[0]][: pos[0] + 1]

    def token(self, sample_id: int) -> int:
        """The token the sample's activations predict."""
        s, pos = self.locate(np.array([sample_id]))
        return int(self.ids[s[0]][pos[0] + 1])


def dataset_sequences(directory, m: str) -> Sequences:
    samples = formats.read_dataset_samples(directory, m)
    seen, ids, plen, first = set(), [], [], []
    start = 0
    for _, prompt, cont in samples:
        key = (tuple(prompt), cont.tobytes())
        if key not in seen and len(cont):
            seen.add(key)
            ids.append(np.array(list(prompt) + cont.tolist(), np.int64))
            plen.append(len(prompt))
            first.append(start)
        start += len(cont)
    return Sequences(ids, np.array(plen, np.int64), np.array(first, np.int64))


@torch.no_grad()
def _selected_values(model, inputs: list[list[int]], neuron_ids: np.ndarray) -> np.ndarray:
    """One forward pass over left-padded `inputs`: the neurons' post-GELU values, float64 (rows, width, neurons)."""
    cfg = model.config
    device = next(model.parameters()).device
    layers = neuron_ids // cfg.d_mlp
    dims = torch.as_tensor(neuron_ids % cfg.d_mlp, device=device)
    acts = {}
    idx, pad = left_pad(inputs, device)
    with GeluHooks(model, lambda layer: lambda mod, i, o: acts.__setitem__(layer, o)):
        run_trunk(model, idx, pad if bool(pad.any()) else None)
    per = torch.empty((*idx.shape, len(neuron_ids)), dtype=torch.float32, device=device)
    for layer in np.unique(layers):
        cols = np.flatnonzero(layers == layer)
        per[:, :, cols] = acts[int(layer)][:, :, dims[cols]].float()
    return per.cpu().numpy().astype(np.float64)


@torch.no_grad()
def top_examples(model, seqs: Sequences, neuron_ids: np.ndarray, k: int = 10, batch_size: int = 32,
                 progress=None) -> tuple[np.ndarray, np.ndarray]:
    """
    values (n, k') float64 and sample_ids (n, k') int64, k' = min(k, samples): each neuron's samples with the
    largest post-GELU value, largest first, ties to the lower sample id. One teacher-forced forward pass per
    batch of sequences; memory beyond a batch is O(neurons x k).
    """
    neuron_ids = np.asarray(neuron_ids, np.int64)
    best_v = np.zeros((0, len(neuron_ids)))
    best_i = np.zeros((0, len(neuron_ids)), np.int64)
    for lo in range(0, len(seqs.ids), batch_size):
        rows = range(lo, min(lo + batch_size, len(seqs.ids)))
        per = _selected_values(model, [seqs.ids[r][:-1].tolist() for r in rows], neuron_ids)
        vals, sids = [], []
        for i, r in enumerate(rows):  # the continuation's predicting positions are right-aligned
            n = len(seqs.ids[r]) - seqs.prompt_len[r]
            vals.append(per[i, per.shape[1] - n:])
            sids.append(seqs.first_id[r] + np.arange(n))
        s = np.repeat(np.concatenate(sids)[:, None], len(neuron_ids), axis=1)
        best_v, best_i = merge_top([(best_v, best_i), (np.concatenate(vals), s)], k)
        if progress is not None:
            progress(len(rows))
    return best_v.T.copy(), best_i.T.copy()


def _context(tokenizer, ids: np.ndarray) -> str:
    return tokenizer.decode(ids[-layout.CONTEXT_TOKENS:].tolist())


def examples_table(tokenizer, seqs: Sequences, neuron_ids: np.ndarray, values: np.ndarray,
                   sample_ids: np.ndarray) -> pd.DataFrame:
    """The top examples as layout.TOP_EXAMPLES_COLUMNS rows, neuron by neuron, rank 0 first."""
    rows = []
    for n, vs, ss in zip(neuron_ids, values, sample_ids):
        for rank, (v, s) in enumerate(zip(vs, ss)):
            rows.append((int(n), rank, float(v), int(s), _context(tokenizer, seqs.prefix(int(s))),
                         tokenizer.decode([seqs.token(int(s))])))
    return pd.DataFrame(rows, columns=layout.TOP_EXAMPLES_COLUMNS)


@torch.no_grad()
def context_activations(model, seqs: Sequences, neuron_ids: np.ndarray, sample_ids: np.ndarray,
                        batch_size: int = 32) -> list[list[np.ndarray]]:
    """
    shades[i][j]: neuron_ids[i]'s post-GELU value at each of the last layout.CONTEXT_TOKENS positions up to sample
    sample_ids[i, j] (so the last value is the sample's value), from one forward pass over the distinct
    sequences those samples come from (a causal model's values at a position do not depend on what follows).
    """
    neuron_ids = np.asarray(neuron_ids, np.int64)
    s_idx, pos = seqs.locate(np.asarray(sample_ids, np.int64).ravel())
    s_idx, pos = s_idx.reshape(np.shape(sample_ids)), pos.reshape(np.shape(sample_ids))
    shades = [[None] * np.shape(sample_ids)[1] for _ in neuron_ids]
    needed = np.unique(s_idx)
    for lo in range(0, len(needed), batch_size):
        rows = needed[lo:lo + batch_size]
        inputs = [seqs.ids[r][:-1].tolist() for r in rows]
        per = _selected_values(model, inputs, neuron_ids)
        for b, r in enumerate(rows):
            start = per.shape[1] - len(inputs[b])
            for i, j in zip(*np.nonzero(s_idx == r)):
                p = start + pos[i, j]
                shades[i][j] = per[b, max(start, p - layout.CONTEXT_TOKENS + 1):p + 1, i]
    return shades


# --- cards ------------------------------------------------------------------------------------------------
@dataclass
class Example:
    value: float
    sample_id: int
    tokens: list[str]  # the context, token by token (its last layout.CONTEXT_TOKENS tokens)
    shades: np.ndarray  # the neuron's post-GELU value at each of those tokens' positions
    token: str  # the token the sample's activations predict


@dataclass
class Card:
    neuron_id: int
    layer: int
    dimension: int
    frequency: float
    mean_activation: float
    attribution: float  # NaN: not computed
    delta_nll: float  # NaN: not measured
    examples: list[Example]
    promoted: list[TokenEffect]
    suppressed: list[TokenEffect]
    degree: float = np.nan  # in a thresholded co-activation graph; NaN: none given
    degree_graph: str = ""  # which: "t=<threshold>, <weight>"
    module: int = -1  # its module (c_find_modules); -1: none found
    module_graph: str = ""  # the weight of the graph the modules were found on


def parse_neurons(spec: str, n_neurons: int, data=None, m: str = "") -> np.ndarray:
    """
    --neurons: a .npy file of neuron ids, ids separated by commas (checked, in the order given), or `report`
    (report_neurons of the dataset directory `data`).
    """
    if spec == "report":
        return report_neurons(data, m, n_neurons)
    if spec.endswith(".npy"):
        ids = formats.read_subset(spec, n_neurons)
        if not len(ids):
            raise PipelineError(f"--neurons {spec} holds no neuron ids")
        return ids
    try:
        ids = [int(x) for x in spec.replace(",", " ").split()]
    except ValueError:
        raise PipelineError(f"--neurons {spec!r}: expected a .npy file or neuron ids separated by commas") from None
    if not ids:
        raise PipelineError("--neurons names no neuron")
    bad = [i for i in ids if not 0 <= i < n_neurons]  # checked as Python ints: any size, before numpy sees them
    if bad:
        raise PipelineError(f"--neurons: id {bad[0]} is outside this model's neurons 0..{n_neurons - 1}")
    if len(set(ids)) != len(ids):
        raise PipelineError("--neurons lists a neuron more than once")
    return np.array(ids, np.int64)


def report_neurons(data, m: str, n_neurons: int, per_subset: int = 20, top_effects: int = 10) -> np.ndarray:
    """
    The neurons the report shows: the first `per_subset` of each selection method's best subset at the smallest
    k that stage e compared (random controls excluded), then the `top_effects` with the largest single-neuron
    delta_nll where {m}_neuron_effects.csv exists; each once, in that order.
    """
    data = Path(data)
    ids = []
    comparison = data / layout.RESULTS_DIR / layout.COMPARISON
    if comparison.is_file():
        c = pd.read_csv(comparison)
        c = c[c["best"].astype(bool) & (c["method"] != "random")]
        for stem in c[c["k"] == c["k"].min()].sort_values("method")["subset"]:
            ids += formats.read_subset(data / layout.SUBSETS_DIR / f"{stem}.npy", n_neurons)[:per_subset].tolist()
    effects = layout.path(data, layout.NEURON_EFFECTS, m)
    if effects.is_file():
        dnll = formats.read_neuron_column(effects, "delta_nll", n_neurons, "d_calculate_neuron_effects.py writes it",
                                     missing_ok=True)
        measured = np.flatnonzero(np.isfinite(dnll))
        ids += measured[np.argsort(-dnll[measured], kind="stable")[:top_effects]].tolist()
    if not ids:
        raise PipelineError(f"{data} has neither stage e's {layout.COMPARISON} nor {effects.name}: name the neurons")
    return np.array(list(dict.fromkeys(ids)), np.int64)


def _examples_from_sequences(model, tokenizer, seqs: Sequences, neuron_ids: np.ndarray, k: int, batch_size: int,
                             progress=None, shades: bool = True) -> list[list[Example]]:
    """Prompt mode: the top examples found by running the model over the dataset's distinct sequences."""
    values, sample_ids = top_examples(model, seqs, neuron_ids, k, batch_size, progress)
    shaded = (context_activations(model, seqs, neuron_ids, sample_ids, batch_size) if shades else
              [[np.zeros(0)] * sample_ids.shape[1] for _ in neuron_ids])
    out = []
    text = {}  # each token id decoded once: many neurons share contexts
    for row in range(len(neuron_ids)):
        examples = []
        for v, s, shade in zip(values[row], sample_ids[row], shaded[row]):
            shown = seqs.prefix(int(s))[-layout.CONTEXT_TOKENS:].tolist()
            tokens = [text[t] if t in text else text.setdefault(t, token_text(tokenizer, t)) for t in shown]
            examples.append(Example(float(v), int(s), tokens, shade, tokenizer.decode([seqs.token(int(s))])))
        out.append(examples)
    return out


@torch.no_grad()
def _examples_from_corpus(model, tokenizer, data, m: str, record: dict, neuron_ids: np.ndarray, k: int,
                          batch_size: int, progress=None, shades: bool = True) -> list[list[Example]]:
    """
    Corpus mode: the top examples stage b streamed ({m}_neuron_top_examples.csv); each context is shaded from one
    forward pass over the windows they lie in, re-read from the corpus (only the documents those windows overlap).
    """

    table = formats.read_top_examples(layout.path(data, layout.TOP_EXAMPLES, m))
    table = table[table["rank"] < k].sort_values(["neuron_id", "rank"])
    by_neuron = {int(n): g for n, g in table.groupby("neuron_id")}
    missing = [int(n) for n in neuron_ids if int(n) not in by_neuron]
    if missing:
        raise PipelineError(f"{layout.path(data, layout.TOP_EXAMPLES, m)} has no examples of neuron {missing[0]}")
    context = int(record["context"])
    samples = np.concatenate([by_neuron[int(n)]["sample_id"].to_numpy() for n in neuron_ids])
    if samples.max() >= int(record["tokens"]):
        raise PipelineError(f"{layout.path(data, layout.TOP_EXAMPLES, m)} names sample {samples.max()}, past the corpus's "
                            f"{record['tokens']} tokens: it belongs to another run; rerun stage b")
    kept = min(len(g) for g in by_neuron.values())
    if kept < k:
        print(f"note: stage b kept {kept} examples per neuron; showing {kept}")
    windows = np.unique(samples // context)
    tokens = window_tokens(record, tokenizer, windows)
    last = {int(w): int(samples[samples // context == w].max() - w * context) for w in windows}
    values = {}  # (window, position) -> the neurons' values up to the position
    for lo in range(0, len(windows) if shades else 0, batch_size):
        rows = [int(w) for w in windows[lo:lo + batch_size]]
        per = _selected_values(model, [tokens[w][:last[w] + 1].tolist() for w in rows], neuron_ids)
        for b, w in enumerate(rows):
            values[w] = per[b, per.shape[1] - last[w] - 1:]
        if progress is not None:
            progress(len(rows))
    out = []
    text = {}  # each token id decoded once: many neurons share contexts
    for i, n in enumerate(neuron_ids):
        examples = []
        for v, s in zip(by_neuron[int(n)]["value"], by_neuron[int(n)]["sample_id"]):
            w, pos = divmod(int(s), context)
            first = max(0, pos - layout.CONTEXT_TOKENS + 1)
            shown = [text[t] if t in text else text.setdefault(t, token_text(tokenizer, t))
                     for t in tokens[w][first:pos + 1].tolist()]
            nxt = tokens[w][pos + 1:pos + 2].tolist()
            examples.append(Example(float(v), int(s), shown,
                                    values[w][first:pos + 1, i] if shades else np.zeros(0), tokenizer.decode(nxt)))
        out.append(examples)
    return out


def graph_degrees(data, m: str, n_neurons: int, threshold: float | None = None, weight: str | None = None
                  ) -> tuple[np.ndarray, str] | None:
    """
    Every neuron's degree in a thresholded co-activation graph and a note of which: the graph, threshold and
    weight given, or else those of the best graph-method subset stage e compared (None where neither exists).
    """

    graph = layout.path(data, layout.WEIGHTED_GRAPH, m)
    if threshold is None:
        comparison = Path(data) / layout.RESULTS_DIR / layout.COMPARISON
        if not comparison.is_file():
            return None
        c = pd.read_csv(comparison)
        c = c[c["best"].astype(bool) & c["method"].isin(("degree", "weighted_degree", "pagerank"))]
        if c.empty:
            return None
        stem = c.sort_values(["k", "delta_nll"], ascending=[True, False])["subset"].iloc[0]
        meta = json.loads((Path(data) / layout.SUBSETS_DIR / f"{stem}.json").read_text())

        threshold, weight = meta["threshold"], meta.get("weight", gr.DEFAULT_WEIGHT)
        graph = Path(sel.subset_graph(meta, data))  # a copied dataset's own store, not the original's
    weight = weight or gr.DEFAULT_WEIGHT
    g = gs.read_store(graph)
    deg = np.full(n_neurons, np.nan)
    deg[g.node_ids] = g.degrees(g.cut(threshold, weight))
    return deg, f"t={threshold:g}, {weight}"


def dataset_modules(data, m: str, n_neurons: int) -> tuple[np.ndarray, str] | None:
    """Each neuron's module from c_find_modules' default output (the count graph's, else the first weight's),
    with that weight; None when modules were not found."""

    found = sorted((Path(data) / layout.MODULES_DIR).glob(layout.MODULES.format(m=m, weight="*")))
    if not found:
        return None
    default = [p for p in found if p.name == layout.MODULES.format(m=m, weight=layout.DEFAULT_WEIGHT)]
    p = (default or found)[0]
    mf = md.read_modules(p, n_neurons)
    return mf.module_of, p.stem[len(f"{m}_modules_"):]


def neuron_examples(model, tokenizer, data, m: str, neuron_ids: np.ndarray, k: int = 10, batch_size: int = 32,
                    progress=None, shades: bool = True) -> list[list[Example]]:
    """Each neuron's top-activating examples in a stage-b dataset directory of either mode, largest first; without
    `shades`, each Example's shades are empty (no forward pass beyond those that find the examples)."""
    record = DatasetDir(data, m).corpus_record()
    if record is not None:
        return _examples_from_corpus(model, tokenizer, data, m, record, neuron_ids, k, batch_size, progress, shades)
    seqs = dataset_sequences(data, m)
    if not seqs.ids:
        raise PipelineError(f"{layout.path(data, layout.DATASET, m)} holds no generated tokens: there are no examples")
    return _examples_from_sequences(model, tokenizer, seqs, neuron_ids, k, batch_size, progress, shades)


def build_cards(model, tokenizer, data, m: str, neuron_ids: np.ndarray, k: int = 10, batch_size: int = 32,
                progress=None, degrees: tuple[np.ndarray, str] | None = None,
                modules: tuple[np.ndarray, str] | None = None) -> list[Card]:
    """The cards of `neuron_ids` (in that order) from a stage-b dataset directory of either mode."""

    cfg = model.config
    n = cfg.n_layer * cfg.d_mlp
    what = "stage b writes it"
    freq_p = layout.path(data, layout.FREQUENCY, m)
    frequency = formats.read_neuron_column(freq_p, "activation_frequency", n, what)
    mean = formats.read_neuron_column(freq_p, "mean_activation", n, what)
    attribution = pd.to_numeric(pd.read_csv(freq_p)["attribution"], errors="coerce").to_numpy(np.float64)
    effects_p = layout.path(data, layout.NEURON_EFFECTS, m)
    dnll = (formats.read_neuron_column(effects_p, "delta_nll", n, "d_calculate_neuron_effects.py writes it", missing_ok=True)
            if effects_p.is_file() else np.full(n, np.nan))
    examples = neuron_examples(model, tokenizer, data, m, neuron_ids, k, batch_size, progress)
    deg, deg_note = degrees if degrees is not None else (np.full(n, np.nan), "")
    cards = []
    for row, nid in enumerate(neuron_ids):
        up, down = direct_logit_effect(model, tokenizer, int(nid)) if has_logit_effect(model) else ([], [])
        layer, dim = divmod(int(nid), cfg.d_mlp)
        cards.append(Card(int(nid), layer, dim, float(frequency[nid]), float(mean[nid]), float(attribution[nid]),
                          float(dnll[nid]), examples[row], up, down, float(deg[nid]), deg_note,
                          int(modules[0][nid]) if modules is not None else -1, modules[1] if modules else ""))
    return cards


def _figures(c: Card) -> str:
    parts = [f"activation frequency {c.frequency:.4g}", f"mean activation {c.mean_activation:.4g}"]
    if np.isfinite(c.attribution):
        parts.append(f"attribution {c.attribution:.4g}")
    if np.isfinite(c.delta_nll):
        parts.append(f"single-neuron ΔNLL {c.delta_nll:.4g}")
    if np.isfinite(c.degree):
        parts.append(f"degree {c.degree:.0f} in the co-activation graph ({c.degree_graph})")
    if c.module >= 0:
        parts.append(f"module {c.module} of the {c.module_graph} graph")
    return "; ".join(parts)


def _md_text(s: str) -> str:
    """Token or context text as literal Markdown: control characters shown, markup characters escaped."""
    return markdown.escape(markdown.visible(s))


def _md_bold(s: str) -> str:
    """Strong emphasis around the text but not its outer spaces (a delimiter next to a space is not emphasis)."""
    core = s.strip(" ")
    if not core:
        return _md_text(s)
    lead = s[:len(s) - len(s.lstrip(" "))]
    return f"{lead}**{_md_text(core)}**{s[len(lead) + len(core):]}"


def _md_tokens(tokens: list[TokenEffect]) -> str:
    return ", ".join(f'"{_md_text(t.token)}" ({t.value:+.3g})' for t in tokens)


def cards_markdown(cards: list[Card], m: str, heading: str = "#") -> str:
    lines = [f"{heading} Neuron cards of {markdown.escape(m)}", "",
             "Top-activating samples of the dataset (largest post-GELU value; the context ends at the sample's "
             "position and **the token** is the one its activations predict). Promoted / suppressed: the direct "
             "logit effect, the neuron's output weights times the final layer norm's gain through the unembedding "
             "(ignores the layer norm's scale and every later layer).", ""]
    for c in cards:
        lines += [f"{heading}# Neuron {c.neuron_id} (layer {c.layer}, dimension {c.dimension})", "",
                  markdown.escape(_figures(c)), "",
                  "| rank | value | sample | context |", "|---|---|---|---|"]
        lines += [f"| {r} | {e.value:.4g} | {e.sample_id} | {_md_text(''.join(e.tokens))}{_md_bold(e.token)} |"
                  for r, e in enumerate(c.examples)]
        lines += ["", f"Promoted: {_md_tokens(c.promoted)}", "", f"Suppressed: {_md_tokens(c.suppressed)}", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; color: #222; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.5em 1em; margin: 1em 0; }
.card h2 { font-size: 1.15em; margin: 0.3em 0; }
table { border-collapse: collapse; }
td, th { padding: 2px 8px; vertical-align: top; text-align: left; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.ctx span { border-radius: 2px; }
.next { outline: 2px solid #1565c0; font-weight: bold; }
.tok { font-family: ui-monospace, monospace; background: #eee; padding: 0 3px; margin-right: 4px; }
"""


def _shade(value: float, top: float) -> str:
    alpha = 0.0 if top <= 0 else min(max(value / top, 0.0), 1.0)
    return f"background: rgba(255, 140, 0, {alpha:.3f})"


# tab20's colours: a card's left border shows its module
MODULE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                  "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
                  "#dbdb8d", "#9edae5")


def module_colour(module: int) -> str | None:
    return MODULE_COLOURS[module % len(MODULE_COLOURS)] if module >= 0 else None


def cards_html(cards: list[Card], m: str) -> str:
    """One self-contained page: inline CSS, no script, no external resource."""

    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>Neuron cards of {escape(m)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>Neuron cards of {escape(m)}</h1>",
           "<p>Top-activating samples; each context token is shaded by the neuron's post-GELU value at its position "
           "(orange = the card's largest value; hover for the value), and the outlined token is the one the "
           "sample's activations predict. Promoted / suppressed: the direct logit effect through the final layer "
           "norm's gain and the unembedding (ignores the layer norm's scale and every later layer).</p>"]
    shown = sorted({c.module for c in cards if c.module >= 0})
    if shown:
        keys = "".join(f'<span class="tok" style="border-left: 6px solid {module_colour(k)}">module {k}</span>'
                       for k in shown)
        out.append(f"<p>Each card's left border is its neuron's module ({escape(cards[0].module_graph)} graph, "
                   f"c_find_modules): {keys}</p>")
    for c in cards:
        top = max((float(e.shades.max()) for e in c.examples if len(e.shades)), default=0.0)
        border = f' style="border-left: 6px solid {module_colour(c.module)}"' if c.module >= 0 else ""
        out += [f'<div class="card" id="neuron-{c.neuron_id}"{border}>',
                f"<h2>Neuron {c.neuron_id} (layer {c.layer}, dimension {c.dimension})</h2>",
                f"<p>{escape(_figures(c))}</p>", "<table>", "<tr><th>rank</th><th>value</th><th>sample</th>"
                "<th>context</th></tr>"]
        for r, e in enumerate(c.examples):
            spans = "".join(f'<span style="{_shade(float(v), top)}" title="{v:.4g}">{escape(markdown.visible(t, chr(10)))}'
                            f'</span>' for t, v in zip(e.tokens, e.shades))
            out.append(f"<tr><td>{r}</td><td>{e.value:.4g}</td><td>{e.sample_id}</td><td class=\"ctx\">{spans}"
                       f'<span class="next">{escape(markdown.visible(e.token))}</span></td></tr>')
        out.append("</table>")
        for label, toks in (("Promoted", c.promoted), ("Suppressed", c.suppressed)):
            items = "".join(f'<span class="tok" title="{t.value:+.4g}">{escape(markdown.visible(t.token))}</span>'
                            for t in toks)
            out.append(f"<p>{label}: {items}</p>")
        out.append("</div>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def write_cards(directory, cards: list[Card], m: str):
    """The Markdown and HTML cards, both written beside the earlier ones before either is renamed in (so a failure
    leaves the earlier pair as it was, never a new page beside an old one); a full disk is one line naming the
    directory."""
    try:
        with contextlib.ExitStack() as stack:
            for name, text in ((layout.CARDS_MD, cards_markdown(cards, m)), (layout.CARDS_HTML, cards_html(cards, m))):
                tmp = stack.enter_context(atomic.atomic_path(Path(directory) / name))
                atomic.write_bytes(text.encode("utf-8"), tmp)
    except OSError as e:
        if atomic.disk_full(e, directory):
            raise PipelineError(f"no space left on {directory} (disk full) while writing the neuron cards") from None
        raise
