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

from gelutrace.model.generation import left_pad
from gelutrace.model.hooks import GeluHooks

LOGIT_BUDGET = 2 ** 24  # most continuation logits (positions x vocab) one pass holds, with their gradient
ACTIVATION_BUDGET = 2 ** 24  # most MLP activations (positions x layers x d_mlp) one pass keeps for its backward


def distinct_sequences(prompt_index: np.ndarray, repeat: np.ndarray, position: np.ndarray, output_id: np.ndarray,
                       prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[np.ndarray], np.ndarray, np.ndarray]:
    """
    From stage b's samples (one per generated token, in dataset order): the distinct (prompt, continuation)
    sequences, how many samples (prompt repeats) each stands for, and each one's prompt index. Greedy repeats
    collapse into one.
    """
    starts = np.flatnonzero(np.r_[True, position[1:] == 0]) if len(position) else np.zeros(0, np.int64)
    weight: dict[tuple, int] = {}
    for lo, hi in zip(starts, list(starts[1:]) + [len(position)]):
        key = (int(prompt_index[lo]), tuple(int(t) for t in output_id[lo:hi]))
        weight[key] = weight.get(key, 0) + 1
    keys = list(weight)
    return ([prompt_ids[p] for p, _ in keys], [np.array(c, np.int64) for _, c in keys],
            np.array([weight[k] for k in keys], np.float64), np.array([p for p, _ in keys], np.int64))


def _chunks(lengths: np.ndarray, conts: np.ndarray, vocab: int, acts_per_position: int,
            batch_size: int) -> list[np.ndarray]:
    """Rows in passes of at most batch_size rows, LOGIT_BUDGET continuation logits and ACTIVATION_BUDGET kept
    activations (one row always fits)."""
    order = np.argsort(-lengths, kind="stable")  # similar lengths together: less padding
    out, cur, logits = [], [], 0
    for r in order:
        if cur and (len(cur) >= batch_size or (logits + conts[r]) * vocab > LOGIT_BUDGET
                    or (len(cur) + 1) * lengths[cur[0]] * acts_per_position > ACTIVATION_BUDGET):
            out.append(np.array(cur))
            cur, logits = [], 0
        cur.append(r)
        logits += conts[r]
    if cur:
        out.append(np.array(cur))
    return out


def _keeper(acts: list):
    """A GELU forward hook appending each output to `acts`, made to require the gradient."""
    def keep(module, inputs, output):
        if not output.requires_grad:  # parameters without gradients: make the activation a leaf of the graph
            output.requires_grad_(True)
        acts.append(output)
    return keep


def neuron_attribution(model, prompts: list[list[int]], conts: list[np.ndarray], weights: np.ndarray,
                       batch_size: int = 64, progress=None, groups: np.ndarray | None = None) -> np.ndarray:
    """
    -sum_p a_j(p) dL/da_j(p) for every neuron j (float64, neuron id order), where
    L = sum_r weights[r] * mean NLL of conts[r] given prompts[r] / sum(weights) over the rows with a continuation.
    With `groups` (each row's group, 0..G-1), one such estimate per group, L over that group's rows: (G, N).
    Rows do not interact, so one backward pass serves every group. `progress(n)` is called with the number of
    sequences done.
    """
    cfg = model.config
    device = next(model.parameters()).device
    given = groups is not None
    groups = np.zeros(len(conts), np.int64) if groups is None else np.asarray(groups, np.int64)
    n_groups = int(groups.max()) + 1 if len(groups) else 1
    out = torch.zeros(n_groups, cfg.n_layer * cfg.d_mlp, dtype=torch.float64, device=device)
    have = np.array([r for r in range(len(conts)) if len(conts[r])], np.int64)
    total = np.zeros(n_groups)
    np.add.at(total, groups[have], weights[have])
    lengths = np.array([len(prompts[r]) + len(conts[r]) - 1 for r in have], np.int64)
    cont_lengths = np.array([len(conts[r]) for r in have], np.int64)
    acts = []
    keep = _keeper(acts)
    chunks = _chunks(lengths, cont_lengths, cfg.vocab_size, cfg.n_layer * cfg.d_mlp, batch_size) if len(have) else []
    with GeluHooks(model, lambda layer: keep), torch.enable_grad():
        for chunk in chunks:
            rows = have[chunk]
            seqs = [list(prompts[r]) + [int(t) for t in conts[r][:-1]] for r in rows]
            idx, pad = left_pad(seqs, device)
            acts.clear()
            n = int(cont_lengths[chunk].max())
            logits, _ = model(idx, pad=pad if bool(pad.any()) else None, logits_to_keep=n)
            at = torch.zeros(len(rows), n, dtype=torch.bool, device=device)  # continuations are right-aligned
            for i, r in enumerate(rows):
                at[i, n - len(conts[r]):] = True
            target = torch.cat([torch.as_tensor(conts[r], device=device) for r in rows])
            scale = torch.cat([torch.full((len(conts[r]),), weights[r] / (len(conts[r]) * total[groups[r]]),
                                          dtype=torch.float32, device=device) for r in rows])
            logits = logits[at].float()
            loss = (F.cross_entropy(logits, target, reduction="none") * scale).sum()
            grads = torch.autograd.grad(loss, acts)
            row_group = torch.as_tensor(groups[rows], device=device)
            for layer, (a, g) in enumerate(zip(acts, grads)):
                per_row = (a.detach().double() * g.double()).sum(dim=1)  # (rows, d_mlp): rows do not interact
                out[:, layer * cfg.d_mlp:(layer + 1) * cfg.d_mlp].index_add_(0, row_group, -per_row)
            acts.clear()
            if progress is not None:
                progress(len(rows))
    result = out.cpu().numpy()
    return result if given else result[0]


class CorpusAttribution:
    """
    Corpus mode's attribution (stage b --attribution): the objective is the real next token's NLL summed over
    every position of every window but its last, and each neuron j gets -sum a_j(t) dL/da_j(t) over all
    positions t, summed in float64 as the windows stream by (`sum`, with the scored positions in `tokens`).
    sum / tokens estimates, to first order, the real-text delta_nll of zero-ablating j alone. Sums of shards
    and of torchrun processes add up to the whole run's.
    """

    def __init__(self, n_layer: int, d_mlp: int, device):
        self.d = d_mlp
        self.sum = torch.zeros(n_layer * d_mlp, dtype=torch.float64, device=device)
        self.tokens = 0

    @staticmethod
    def rows_per_pass(context: int, vocab: int, n_neurons: int) -> int:
        """Windows one forward and backward pass takes: their logits and kept activations within the budgets."""
        return max(1, min(LOGIT_BUDGET // (context * vocab), ACTIVATION_BUDGET // (context * n_neurons)))

    def add(self, model, x: torch.Tensor):
        """One forward pass over windows x (rows x length) with the gradient, and its backward pass; the caller's
        hooks (counting) see the same forward pass."""
        if x.size(1) < 2:
            return
        acts = []
        keep = _keeper(acts)
        with GeluHooks(model, lambda layer: keep), torch.enable_grad():
            logits, _ = model(x)
            logits = logits[:, :-1].reshape(-1, logits.size(-1))
            loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), x[:, 1:].reshape(-1),
                                   reduction="sum")
            grads = torch.autograd.grad(loss, acts)
        for layer, (a, g) in enumerate(zip(acts, grads)):
            self.sum[layer * self.d:(layer + 1) * self.d] -= (a.detach().double() * g.double()).sum(dim=(0, 1))
        self.tokens += x.size(0) * (x.size(1) - 1)

    def mean(self) -> np.ndarray:
        return (self.sum / max(self.tokens, 1)).cpu().numpy()

    def all_reduce(self):
        import torch.distributed as dist  # lazy: only torchrun runs need it

        tokens = torch.tensor([self.tokens], dtype=torch.int64, device=self.sum.device)
        dist.all_reduce(self.sum)
        dist.all_reduce(tokens)
        self.tokens = int(tokens.item())
