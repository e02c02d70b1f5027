"""
Attribution: a first-order estimate of what zero-ablating one neuron alone does to stage e's `delta_nll`.

The objective L is stage e's: the mean negative log-likelihood of each sample's continuation tokens
(teacher-forced), averaged over samples (every (prompt, repeat) counts once). Zeroing neuron j moves its
post-GELU output a_j(p) to 0 at every position p, so to first order

    delta_nll_j ~= -sum_p a_j(p) * dL/da_j(p)

summed over every position of every sequence, prompt and continuation. One forward and one backward pass per
distinct sequence gives the estimate for every neuron at once.
"""

import numpy as np
import torch
from torch.nn import functional as F

from gelutrace.generation import left_pad
from gelutrace.sites import GeluHooks

LOGIT_BUDGET = 2 ** 25  # most logits (rows x positions x vocab) one pass holds, with their gradient


def distinct_sequences(prompt_index: np.ndarray, repeat: np.ndarray, position: np.ndarray, output_id: np.ndarray,
                       prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[np.ndarray], np.ndarray]:
    """
    From stage b's samples (one per generated token, in dataset order): the distinct (prompt, continuation)
    sequences and how many samples (prompt repeats) each stands for. Greedy repeats collapse into one.
    """
    starts = np.flatnonzero(np.r_[True, position[1:] == 0]) if len(position) else np.zeros(0, np.int64)
    weight: dict[tuple, int] = {}
    for lo, hi in zip(starts, list(starts[1:]) + [len(position)]):
        key = (int(prompt_index[lo]), tuple(int(t) for t in output_id[lo:hi]))
        weight[key] = weight.get(key, 0) + 1
    keys = list(weight)
    return ([prompt_ids[p] for p, _ in keys], [np.array(c, np.int64) for _, c in keys],
            np.array([weight[k] for k in keys], np.float64))


def _chunks(lengths: np.ndarray, vocab: int, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(-lengths, kind="stable")  # similar lengths together: less padding
    out, cur = [], []
    for r in order:
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * lengths[cur[0]] * vocab > LOGIT_BUDGET):
            out.append(np.array(cur))
            cur = []
        cur.append(r)
    if cur:
        out.append(np.array(cur))
    return out


def neuron_attribution(model, prompts: list[list[int]], conts: list[np.ndarray], weights: np.ndarray,
                       batch_size: int = 64, progress=None) -> np.ndarray:
    """
    -sum_p a_j(p) dL/da_j(p) for every neuron j (float64, neuron id order), where
    L = sum_r weights[r] * mean NLL of conts[r] given prompts[r] / sum(weights) over the rows with a continuation.
    `progress(n)` is called with the number of sequences done.
    """
    cfg = model.config
    device = next(model.parameters()).device
    out = torch.zeros(cfg.n_layer, cfg.d_mlp, dtype=torch.float64, device=device)
    have = [r for r in range(len(conts)) if len(conts[r])]
    total = float(np.sum(weights[have])) if have else 0.0
    if not have:
        return out.flatten().cpu().numpy()
    lengths = np.array([len(prompts[r]) + len(conts[r]) - 1 for r in have])
    acts = []

    def keep(module, inputs, output):
        if not output.requires_grad:  # parameters without gradients: make the activation a leaf of the graph
            output.requires_grad_(True)
        acts.append(output)

    with GeluHooks(model, lambda layer: keep), torch.enable_grad():
        for chunk in _chunks(lengths, cfg.vocab_size, batch_size):
            rows = [have[i] for i in chunk]
            seqs = [list(prompts[r]) + [int(t) for t in conts[r][:-1]] for r in rows]
            n = max(len(conts[r]) for r in rows)
            idx, pad = left_pad(seqs, device)
            acts.clear()
            logits, _ = model(idx, pad=pad if bool(pad.any()) else None)
            logp = F.log_softmax(logits[:, -n:, :].float(), dim=-1)
            target = torch.zeros((len(rows), n), dtype=torch.long, device=device)
            scale = torch.zeros((len(rows), n), dtype=torch.float32, device=device)
            for i, r in enumerate(rows):  # continuation tokens are right-aligned
                c = conts[r]
                target[i, n - len(c):] = torch.as_tensor(c, device=device)
                scale[i, n - len(c):] = weights[r] / (len(c) * total)
            loss = -(logp.gather(-1, target[..., None])[..., 0] * scale).sum()
            grads = torch.autograd.grad(loss, acts)
            for layer, (a, g) in enumerate(zip(acts, grads)):
                out[layer] -= (a.detach().double() * g.double()).sum(dim=(0, 1))
            acts.clear()
            if progress is not None:
                progress(len(rows))
    return out.flatten().cpu().numpy()
