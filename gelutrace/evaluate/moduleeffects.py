"""
What ablating a module (c_find_modules, written as a subset by stage d --modules) does, beyond its row of stage
e's summary: its standing against both of its nulls, Holm-adjusted across the modules tested; the next tokens whose
loss rises most without it; and the contexts where its neurons fire together most. The last two need the real-text
evaluation (--eval_text).
"""

import numpy as np
import pandas as pd
import torch

from gelutrace.evaluate import statistics as stats
from gelutrace.files import layout
from gelutrace.model.hooks import GeluHooks
from gelutrace.model.sites import run_trunk
from gelutrace.model.tokens import token_text

TOP_TOKENS = 10  # next tokens per module, by mean delta_nll
MIN_TOKEN_COUNT = 5  # a next token must be scored this often to be listed (one token's delta_nll is noise)
TOP_CONTEXTS = 5  # contexts per module, by the module's mean activation
CONTEXT_TOKENS = 16  # tokens shown up to and including the top position


def module_indices(subsets) -> list[int]:
    return [i for i, s in enumerate(subsets) if s.is_module]


def tokens_table(text_results, subsets, tokenizer) -> pd.DataFrame:
    """Per module: the TOP_TOKENS next tokens (scored at least MIN_TOKEN_COUNT times) with the largest mean
    delta_nll when it is ablated, with their counts and unablated mean nll; ties by the lower token id."""

    b = text_results.baseline
    rows = []
    for i in module_indices(subsets):
        d = text_results.mains[i].token_delta_nll
        if d is None or b.token_tokens is None:
            continue
        ok = np.flatnonzero(b.token_tokens >= MIN_TOKEN_COUNT)
        mean = d[ok] / b.token_tokens[ok]
        order = ok[np.lexsort((ok, -mean))][:TOP_TOKENS]
        for rank, t in enumerate(order):
            n = b.token_tokens[t]
            rows.append({"subset": subsets[i].stem, "module": subsets[i].info.get("module"), "rank": rank + 1,
                         "token_id": int(t), "token": token_text(tokenizer, int(t)), "tokens": int(n),
                         "nll": b.token_nll[t] / n, "delta_nll": d[t] / n})
    return pd.DataFrame(rows, columns=layout.MODULE_TOKENS_COLUMNS)


@torch.no_grad()
def contexts(model, text, groups: list[np.ndarray], d_mlp: int, k: int = TOP_CONTEXTS) -> list[tuple[np.ndarray, np.ndarray]]:
    """
    Per group of neurons: the k positions of the evaluation text (corpus.plan's windows, each token with its
    window's tokens before it) where the group's mean post-GELU value is largest, as (values, global positions),
    largest first (ties by the earlier position), from one unablated pass over the text.
    """
    device = next(model.parameters()).device
    G = len(groups)
    layer_parts = {}  # layer -> [(group, dims)]
    for g, ids in enumerate(groups):
        ids = np.asarray(ids, np.int64)
        for layer in np.unique(ids // d_mlp):
            dims = torch.from_numpy(ids[ids // d_mlp == layer] % d_mlp).to(device)
            layer_parts.setdefault(int(layer), []).append((g, dims))
    sizes = torch.tensor([max(len(g), 1) for g in groups], dtype=torch.float64, device=device)
    best_v = torch.full((G, 0), -np.inf, dtype=torch.float64, device=device)
    best_p = torch.zeros((G, 0), dtype=torch.long, device=device)
    ids_all = torch.from_numpy(text.ids)
    ctx = text.context
    acc = None

    def hook_for(layer):
        def hook(module, inputs, output):
            for g, dims in layer_parts.get(layer, ()):
                acc[g] += output[..., dims].double().sum(-1)
        return hook

    with GeluHooks(model, hook_for):
        for w in text.batches:
            lo = int(w[0]) * ctx
            length = min(ctx, len(text.ids) - lo)
            at = torch.from_numpy(w.astype(np.int64))[:, None] * ctx + torch.arange(length)
            acc = torch.zeros(G, len(w), length, dtype=torch.float64, device=device)
            run_trunk(model, ids_all[at].to(device))
            vals = torch.cat([best_v, (acc / sizes[:, None, None]).reshape(G, -1)], 1)
            pos = torch.cat([best_p, at.reshape(1, -1).to(device).expand(G, -1)], 1)
            # largest first, ties by the earlier position: sort by position, then a stable sort by value
            by_pos = torch.argsort(pos, dim=1, stable=True)
            vals, pos = vals.gather(1, by_pos), pos.gather(1, by_pos)
            order = torch.argsort(-vals, dim=1, stable=True)[:, :k]
            best_v, best_p = vals.gather(1, order), pos.gather(1, order)
    return [(best_v[g].cpu().numpy(), best_p[g].cpu().numpy()) for g in range(G)]


def contexts_table(model, text, subsets, tokenizer, d_mlp: int) -> pd.DataFrame:
    """Per module: its TOP_CONTEXTS contexts on the evaluation text (`contexts`), each the CONTEXT_TOKENS tokens
    up to the top position within its window, the token there in [[ ]]."""

    idx = module_indices(subsets)
    found = contexts(model, text, [subsets[i].ids for i in idx], d_mlp)
    rows = []
    for i, (vals, pos) in zip(idx, found):
        for rank, (v, p) in enumerate(zip(vals, pos)):
            p = int(p)
            start = max(p - CONTEXT_TOKENS + 1, (p // text.context) * text.context)
            before = tokenizer.decode([int(t) for t in text.ids[start:p]])
            tok = token_text(tokenizer, int(text.ids[p]))
            rows.append({"subset": subsets[i].stem, "module": subsets[i].info.get("module"), "rank": rank + 1,
                         "mean_activation": float(v), "position": p, "token": tok, "context": f"{before}[[{tok}]]"})
    return pd.DataFrame(rows, columns=layout.MODULE_CONTEXTS_COLUMNS)


def effects_table(subsets, summary: pd.DataFrame, text: bool, weights_source: str | None,
                  tokens: pd.DataFrame | None = None) -> pd.DataFrame:
    """
    One row per module subset: its module, weight, size and layers; its effect (real-text delta_nll with
    --eval_text, own-continuation delta_nll otherwise) with the bootstrap CI; its empirical p against the
    layer-matched controls (p_random) and the effect-weighted ones (p_weighted), with the Holm adjustment across
    the modules tested of each one's normal approximation (p_random_holm, p_weighted_holm: the empirical p of N
    controls cannot go below 1/(N+1), too coarse for Holm over several modules); a module beats a null when both
    its p and its Holm p are below stats.ALPHA, as the verdict's winner must; and its top next tokens.
    """
    prefix = "text_" if text else ""
    by_name = summary.set_index("subset")
    rows = []
    for i in module_indices(subsets):
        s = subsets[i]
        r = by_name.loc[s.name]
        top = ""
        if tokens is not None and len(tokens):
            t = tokens[tokens["subset"] == s.stem].head(3)
            top = ", ".join(f"{tok} (+{d:.2f}, n={n})" for tok, d, n in zip(t["token"], t["delta_nll"], t["tokens"]))
        layers = sorted((int(a), int(b)) for a, b in (s.info.get("per_layer_counts") or {}).items())
        rows.append({"subset": s.stem, "weight": s.info.get("weight"), "module": s.info.get("module"),
                     "k": len(s.ids), "layers": " ".join(f"L{a}:{b}" for a, b in layers),
                     "metric": "real_text" if text else "continuation", "delta_nll": r.get(f"{prefix}delta_nll"),
                     "ci_low": r.get(f"{prefix}delta_nll_ci_low"), "ci_high": r.get(f"{prefix}delta_nll_ci_high"),
                     "kl": r.get(f"{prefix}kl"), "random_mean": r.get(f"{prefix}delta_nll_random_mean", np.nan),
                     "p_random": r.get(f"{prefix}delta_nll_p_random", np.nan),
                     "p_random_normal": r.get(f"{prefix}delta_nll_p_random_normal", np.nan),
                     "weighted_mean": r.get(f"{prefix}delta_nll_weighted_mean", np.nan),
                     "p_weighted": r.get(f"{prefix}delta_nll_p_weighted", np.nan),
                     "p_weighted_normal": r.get(f"{prefix}delta_nll_p_weighted_normal", np.nan),
                     "control_weights": weights_source if pd.notna(r.get(f"{prefix}delta_nll_p_weighted")) else None,
                     "top_tokens": top})
    df = pd.DataFrame(rows, columns=[c.replace("_holm", "_normal") for c in layout.MODULE_EFFECTS_COLUMNS])
    for name in ("p_random", "p_weighted"):  # as the verdict's: the normal approximation, which N controls allow
        df[f"{name}_holm"] = stats.holm(df.pop(f"{name}_normal").to_numpy(np.float64))
    return df[layout.MODULE_EFFECTS_COLUMNS]
