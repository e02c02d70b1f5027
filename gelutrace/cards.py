"""
Neuron cards: what a neuron does, in the terms neuron browsers use.

- The direct logit effect: the neuron's output weight vector times the final layer norm's gain, through the
  unembedding; the tokens whose logits it raises and lowers most. It ignores the final layer norm's scale
  (which depends on the whole residual stream) and everything the layers after the neuron's do with its output.
- The top-activating samples of a stage-b dataset: the samples with the largest post-GELU value, found by
  running the model teacher-forced over the dataset's distinct (prompt, continuation) sequences and keeping a
  running top-k per neuron, batch by batch.
- Cards that put these together with the stage files' per-neuron figures, as Markdown and as one
  self-contained HTML page (gelutrace.cardpage).
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from gelutrace import PipelineError
from gelutrace import stagefiles as sf
from gelutrace.generation import left_pad

CONTEXT_TOKENS = 32  # tokens of text shown before (and including) a sample's position


@dataclass
class TokenEffect:
    token_id: int
    token: str
    value: float


@torch.no_grad()
def direct_logit_effect(model, tokenizer, neuron_id: int, n: int = 10) -> tuple[list[TokenEffect], list[TokenEffect]]:
    """
    (promoted, suppressed): the n tokens whose logits the neuron's output raises most, largest first, and the n
    it lowers most, most lowered first, per unit of post-GELU activation: W_U (g * W_out[:, dim]), g the final
    layer norm's gain. Ties go to the lower token id.
    """
    cfg = model.config
    layer, dim = divmod(int(neuron_id), cfg.d_mlp)
    if not 0 <= layer < cfg.n_layer:
        raise PipelineError(f"neuron {neuron_id} is outside this model's {cfg.n_layer * cfg.d_mlp} neurons")
    w = model.transformer.h[layer].mlp.c_proj.weight[:, dim].double()
    effect = (model.lm_head.weight.double() @ (w * model.transformer.ln_f.weight.double())).cpu().numpy()
    order = np.argsort(-effect, kind="stable")
    low = np.argsort(effect, kind="stable")
    pick = lambda ids: [TokenEffect(int(i), tokenizer.decode([int(i)]), float(effect[i])) for i in ids[:n]]  # noqa: E731
    return pick(order), pick(low)


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
    samples = sf.read_dataset_samples(directory, m)
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


def _merge_top(values: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the k rows with the largest value, ties to the lower id; values, ids (rows, cols)."""
    order = np.lexsort((ids, -values), axis=0)[:k]
    return np.take_along_axis(values, order, axis=0), np.take_along_axis(ids, order, axis=0)


@torch.no_grad()
def top_examples(model, seqs: Sequences, neuron_ids: np.ndarray, k: int = 10, batch_size: int = 32,
                 progress=None) -> tuple[np.ndarray, np.ndarray]:
    """
    values (n, k') float64 and sample_ids (n, k') int64, k' = min(k, samples): each neuron's samples with the
    largest post-GELU value, largest first, ties to the lower sample id. One teacher-forced forward pass per
    batch of sequences; memory beyond a batch is O(neurons x k).
    """
    cfg = model.config
    device = next(model.parameters()).device
    neuron_ids = np.asarray(neuron_ids, np.int64)
    layers = neuron_ids // cfg.d_mlp
    dims = torch.as_tensor(neuron_ids % cfg.d_mlp, device=device)
    best_v = np.zeros((0, len(neuron_ids)))
    best_i = np.zeros((0, len(neuron_ids)), np.int64)
    acts = {}
    handles = [g.register_forward_hook(lambda mod, i, o, layer=layer: acts.__setitem__(layer, o))
               for layer, g in enumerate(model.gelus())]
    try:
        for lo in range(0, len(seqs.ids), batch_size):
            rows = range(lo, min(lo + batch_size, len(seqs.ids)))
            inputs = [seqs.ids[r][:-1].tolist() for r in rows]
            idx, pad = left_pad(inputs, device)
            acts.clear()
            model.trunk(idx, pad=pad if bool(pad.any()) else None)
            width = idx.size(1)
            per = torch.empty((len(rows), width, len(neuron_ids)), dtype=torch.float32, device=device)
            for layer in np.unique(layers):
                cols = np.flatnonzero(layers == layer)
                per[:, :, cols] = acts[int(layer)][:, :, dims[cols]].float()
            per = per.cpu().numpy().astype(np.float64)
            vals, sids = [], []
            for i, r in enumerate(rows):  # the continuation's predicting positions are right-aligned
                n = len(seqs.ids[r]) - seqs.prompt_len[r]
                vals.append(per[i, width - n:])
                sids.append(seqs.first_id[r] + np.arange(n))
            v = np.concatenate([best_v, *vals])
            s = np.concatenate([best_i, np.repeat(np.concatenate(sids)[:, None], len(neuron_ids), axis=1)])
            best_v, best_i = _merge_top(v, s, k)
            if progress is not None:
                progress(len(rows))
    finally:
        for h in handles:
            h.remove()
    return best_v.T.copy(), best_i.T.copy()


def _context(tokenizer, ids: np.ndarray) -> str:
    return tokenizer.decode(ids[-CONTEXT_TOKENS:].tolist())


def examples_table(tokenizer, seqs: Sequences, neuron_ids: np.ndarray, values: np.ndarray,
                   sample_ids: np.ndarray) -> pd.DataFrame:
    """The top examples as sf.TOP_EXAMPLES_COLUMNS rows, neuron by neuron, rank 0 first."""
    rows = []
    for n, vs, ss in zip(neuron_ids, values, sample_ids):
        for rank, (v, s) in enumerate(zip(vs, ss)):
            rows.append((int(n), rank, float(v), int(s), _context(tokenizer, seqs.prefix(int(s))),
                         tokenizer.decode([seqs.token(int(s))])))
    return pd.DataFrame(rows, columns=sf.TOP_EXAMPLES_COLUMNS)


@torch.no_grad()
def context_activations(model, prefixes: list[np.ndarray], neuron_ids: np.ndarray,
                        batch_size: int = 64) -> list[np.ndarray]:
    """
    For each (prefix, neuron) pair, the neuron's post-GELU value at each of the prefix's last CONTEXT_TOKENS
    positions, from forward passes over the whole prefixes (so the last value is the sample's value).
    """
    cfg = model.config
    device = next(model.parameters()).device
    out = []
    acts = {}
    handles = [g.register_forward_hook(lambda mod, i, o, layer=layer: acts.__setitem__(layer, o))
               for layer, g in enumerate(model.gelus())]
    try:
        for lo in range(0, len(prefixes), batch_size):
            chunk = prefixes[lo:lo + batch_size]
            idx, pad = left_pad([p.tolist() for p in chunk], device)
            acts.clear()
            model.trunk(idx, pad=pad if bool(pad.any()) else None)
            width = idx.size(1)
            for i, (p, n) in enumerate(zip(chunk, neuron_ids[lo:lo + batch_size])):
                layer, dim = divmod(int(n), cfg.d_mlp)
                shown = min(len(p), CONTEXT_TOKENS)
                out.append(acts[layer][i, width - shown:, dim].double().cpu().numpy())
    finally:
        for h in handles:
            h.remove()
    return out
