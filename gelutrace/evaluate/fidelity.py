"""
How faithful the causal edges are (c_measure_edge_fidelity.py): the first-order prediction against the model.

For a sample of edges (u, v) with a nonzero `direct` weight, stratified so that every decile of |direct| has
its share, u is zero-ablated outright and the change of v's mean value over the samples is measured: that
change includes every path (attention, the MLPs in between, the norm scales) that the weight ignores. The
prediction is -E_uv (removing u's write entirely, to first order), with E measured on the same samples by a
clean pass (gelutrace.record.direct), so that the comparison sees no sampling noise of the weights themselves.
Reported: Spearman(predicted, measured) overall and per layer gap, and R^2 of the line through 0 that fits
measured ~ beta * predicted.

One batched forward pass serves several sources of one layer: the samples repeated once per source, each copy
with its own neuron zeroed.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from gelutrace import PipelineError
from gelutrace.files import atomic, formats
from gelutrace.files.corpusfiles import record_text_field
from gelutrace.graph.causal import CausalEdges
from gelutrace.model.generation import left_pad
from gelutrace.model.hooks import SiteMeans, StopAfter
from gelutrace.model.sites import run_trunk
from gelutrace.record.corpus import read_corpus
from gelutrace.record.direct import DirectEdges, DirectHooks, anatomy

EDGES = 500
DECILES = 10
POOL = 200_000  # edges drawn uniformly first; the deciles are of their |direct|
TOKENS_PER_PASS = 16384


@dataclass
class Samples:
    """The positions the fidelity is measured on: token rows, their left padding (or None), their weights."""
    idx: torch.Tensor  # (B, T)
    pad: torch.Tensor | None  # (B,) left padding per row
    weights: torch.Tensor  # (B, T)


def corpus_samples(record: dict, tokenizer, tokens: int, device) -> Samples:
    """The first `tokens` tokens of a corpus-mode dataset's text (its record's files), in windows of its context;
    every position a sample."""


    context = int(record["context"])
    for f in record["files"]:  # the text the weights were measured on, unchanged
        p = Path(f["path"])
        if not p.is_file() or ("sha256" in f and atomic.file_sha256(p) != f["sha256"]):
            raise PipelineError(f"{p}, which stage b read, is gone or has changed since; rerun stage b")
    ids = read_corpus([f["path"] for f in record["files"]], tokenizer, max(tokens, 2),
                      "the corpus record's files", record_text_field(record)).ids.astype(np.int64)
    n = max(1, len(ids) // context)
    width = min(context, len(ids))
    rows = torch.as_tensor(ids[:n * width].reshape(n, width), device=device)
    return Samples(rows, None, torch.ones(rows.shape, device=device))


def prompt_samples(dataset_path, m: str, tokens: int, device) -> Samples:
    """Stage b's generated samples as teacher-forced sequences, each distinct (prompt, continuation) once and
    weighted by its samples, the positions that predict the continuation scored, until `tokens` are."""

    count: dict = {}
    for _, prompt, cont in formats.read_dataset_samples(dataset_path, m):
        if len(cont):
            key = (tuple(prompt), tuple(int(t) for t in cont))
            count[key] = count.get(key, 0) + 1
    rows, scored = [], 0
    for key, n in count.items():
        if scored >= tokens:
            break
        rows.append((key, n))
        scored += len(key[1])
    if not rows:
        raise PipelineError(f"{dataset_path}: no generated tokens to measure on")
    idx, pad = left_pad([list(p) + list(c[:-1]) for (p, c), _ in rows], device)
    w = torch.zeros(idx.shape, device=device)
    for b, ((_, c), n) in enumerate(rows):
        w[b, idx.size(1) - len(c):] = n
    return Samples(idx, pad if bool(pad.any()) else None, w)


def sample_edges(causal: CausalEdges, d_mlp: int, n: int = EDGES, seed: int = 0) -> pd.DataFrame:
    """n edges with nonzero `direct` (as many per decile of |direct| as the pool allows): src, tgt (neuron ids),
    pair (index into causal.pairs), decile and direct. Seeded, so the same store gives the same edges."""
    rng = np.random.default_rng(seed)
    sizes = np.array([d_mlp * d_mlp] * len(causal.pairs), np.int64)
    if not len(sizes):
        raise PipelineError("the graph has no layer pairs with direct-effect weights")
    draws = rng.choice(int(sizes.sum()), size=min(POOL, int(sizes.sum())), replace=False)
    pair, flat = np.divmod(draws, d_mlp * d_mlp)
    w = np.empty(len(draws))
    for k in np.unique(pair):  # one matrix in memory at a time
        sel = pair == k
        w[sel] = np.asarray(causal.matrix("direct", int(k))).reshape(-1)[flat[sel]]
    keep = w != 0
    pair, flat, w = pair[keep], flat[keep], w[keep]
    if not len(w):
        raise PipelineError("every sampled edge has direct weight 0")
    edges = np.quantile(np.abs(w), np.linspace(0, 1, DECILES + 1)[1:-1])
    decile = np.searchsorted(edges, np.abs(w), side="right")
    per = -(-n // DECILES)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(decile == q))[:per] for q in range(DECILES)])[:n]
    chosen.sort()
    pairs = np.array(causal.pairs, np.int64)
    i, j = pairs[pair[chosen], 0], pairs[pair[chosen], 1]
    p, q = np.divmod(flat[chosen], d_mlp)
    return pd.DataFrame({"src": i * d_mlp + p, "tgt": j * d_mlp + q, "pair": pair[chosen],
                         "decile": decile[chosen], "direct": w[chosen]})


def _forward(model, samples: Samples, copies: int):
    idx = samples.idx.repeat(copies, 1)
    pad = None if samples.pad is None else samples.pad.repeat(copies)
    run_trunk(model, idx, pad)


def measure(model, samples: Samples, edges: pd.DataFrame, progress=None) -> pd.DataFrame:
    """edges with predicted (-E_uv on the samples, first order) and measured (the change of v's weighted mean
    value when u is zero-ablated) added, and layer_gap."""
    cfg = model.config
    d = cfg.d_mlp
    an = anatomy(model)
    tgt_layers = sorted(set((edges["tgt"] // d).tolist()))
    pairs = sorted({(int(s // d), int(t // d)) for s, t in zip(edges["src"], edges["tgt"])})
    direct = DirectEdges(cfg.n_layer, d, "all", an.gated, samples.idx.device, pairs=pairs)  # the pairs sampled only
    with torch.no_grad(), DirectHooks(model, direct, an) as hooks, \
            SiteMeans(model, tgt_layers, samples.weights, 1) as clean:
        hooks.begin(samples.weights, None)
        _forward(model, samples, 1)
        hooks.finish()
    E = direct.result(an)
    out = edges.copy()
    out["layer_gap"] = (out["tgt"] // d - out["src"] // d).astype(np.int64)
    predicted = np.zeros(len(out))
    src, tgt = out["src"].to_numpy(), out["tgt"].to_numpy()
    for i, j in pairs:  # one layer pair's weights at a time
        rows = np.flatnonzero((src // d == i) & (tgt // d == j))
        predicted[rows] = -np.asarray(E.matrix("direct", E.pair_index(i, j)))[src[rows] % d, tgt[rows] % d]
    out["predicted"] = predicted
    measured = np.full(len(out), np.nan)
    per_pass = max(1, TOKENS_PER_PASS // samples.idx.numel())
    sources = np.unique(out["src"].to_numpy())
    for layer in np.unique(sources // d):
        srcs = sources[sources // d == layer]
        for lo in range(0, len(srcs), per_pass):
            chunk = srcs[lo:lo + per_pass]
            dims = torch.as_tensor(chunk % d, device=samples.idx.device)
            rows = np.flatnonzero(np.isin(src, chunk))  # the chunk's edges; copy c ablated chunk[c]
            layers = sorted(set((tgt[rows] // d).tolist()))  # the pass stops after the last of them
            with torch.no_grad(), SiteMeans(model, layers, samples.weights, len(chunk), (int(layer), dims)) as rec, \
                    StopAfter(model, layers[-1]):
                _forward(model, samples, len(chunk))
            copy = np.searchsorted(chunk, src[rows])
            layer_of = tgt[rows] // d
            for j in np.unique(layer_of):  # one target layer at a time
                at, c = rows[layer_of == j], copy[layer_of == j]
                measured[at] = rec.means[j][c, tgt[at] % d] - clean.means[j][0, tgt[at] % d]
            if progress is not None:
                progress(len(chunk))
    out["measured"] = measured
    return out


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer gap and overall ("all"): edges, Spearman(predicted, measured), and beta and R^2 of the line
    through 0 (R^2 = 1 - sum (m - beta p)^2 / sum m^2)."""
    rows = []
    groups = [(str(g), table[table["layer_gap"] == g]) for g in sorted(table["layer_gap"].unique())]
    for name, part in groups + ([("all", table)] if len(groups) > 1 else []):
        p, m = part["predicted"].to_numpy(), part["measured"].to_numpy()
        rho = spearmanr(p, m).statistic if len(p) > 2 else np.nan
        beta = float(p @ m / (p @ p)) if (p @ p) > 0 else np.nan
        r2 = 1 - float(((m - beta * p) ** 2).sum() / (m @ m)) if (m @ m) > 0 else np.nan
        rows.append({"layer_gap": name, "edges": len(part), "spearman": rho, "beta": beta, "r2_through_0": r2})
    return pd.DataFrame(rows)
