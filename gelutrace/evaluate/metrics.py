"""
What an ablation does to the model's predictions, against the unperturbed baseline on the baseline's own
continuations: teacher-forced KL(baseline || perturbed) and the increase in negative log-likelihood (or the
same from the change of the logits, precise for tiny effects), and free-running token agreement and first
differing position.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from gelutrace.model.generation import Batch, generate_batch, left_pad
from gelutrace.model.hooks import Ablation, RowAblation

LOGIT_BUDGET = 2 ** 26  # most logits (rows x positions x vocab) one teacher-forced pass holds at once


# --- generation and metrics -------------------------------------------------------------------------------
@dataclass
class Rows:
    """The distinct sequences computed: one per prompt when greedy, one per (prompt, repeat) otherwise."""
    prompt: np.ndarray  # (R,) prompt index
    length: np.ndarray  # (R,) continuation tokens wanted
    where: list[tuple[int, int]]  # (batch index, row within the batch's output)


def plan_rows(batches: list[Batch], prompts) -> Rows:
    prompt, length, where = [], [], []
    for b, batch in enumerate(batches):
        for i, p in enumerate(batch.row_prompt):
            prompt.append(p)
            length.append(prompts[p].new_tokens)
            where.append((b, i))
    return Rows(np.array(prompt, np.int64), np.array(length, np.int64), where)


def generate_rows(model, batches: list[Batch], rows: Rows, prompt_ids, temperature, top_k, seed,
                  ablation: Ablation | None = None, on_batch=None) -> list[np.ndarray]:
    """Each row's continuation (its prompt's number of new tokens), under `ablation` when given."""
    outs = []
    for batch in batches:
        if ablation is None:
            outs.append(generate_batch(model, batch, prompt_ids, temperature, top_k, seed))
        else:
            with ablation:
                outs.append(generate_batch(model, batch, prompt_ids, temperature, top_k, seed))
        if on_batch is not None:
            on_batch(batch)
    return [outs[b][i, :n] for (b, i), n in zip(rows.where, rows.length)]


GENERATION_GROUP = 16  # most ablations generated together, each in its own block of a batch's rows
KV_BUDGET = 2 ** 26  # most key/value cache entries one grouped generation holds


def generation_group(model, batch: Batch, prompt_ids) -> int:
    """How many ablations generate_groups runs together on `batch`: within GENERATION_GROUP and KV_BUDGET."""
    cfg = model.config
    width = max(len(prompt_ids[p]) for p in batch.row_prompt) + batch.new_tokens
    per_row = width * cfg.n_layer * 2 * getattr(cfg, "n_embd", cfg.d_mlp)  # other families: the wider, d_mlp
    return max(1, min(GENERATION_GROUP, KV_BUDGET // max(1, per_row * len(batch.row_prompt))))


def generate_groups(model, batches: list[Batch], rows: Rows, prompt_ids, temperature, top_k, seed,
                    groups: list[np.ndarray], values: np.ndarray | None = None, on_batch=None) -> list[list[np.ndarray]]:
    """
    generate_rows under each ablation of `groups` (0, or `values` per neuron id), several at once: a batch's rows
    repeated once per ablation, each block of rows ablating its own neurons (RowAblation). A row draws from its
    own generator (greedy needs none), so its tokens are those of the ablation generated alone, float rounding
    apart. on_batch(batch) is called once per ablation and batch. Returns each group's rows' continuations.
    """
    outs = [[] for _ in groups]
    for batch in batches:
        g = generation_group(model, batch, prompt_ids)
        for lo in range(0, len(groups), g):
            part = groups[lo:lo + g]
            block = Batch(batch.prompts, batch.row_prompt * len(part), batch.row_repeat * len(part),
                          batch.new_tokens)
            with RowAblation(model, part, len(batch.row_prompt), values):
                out = generate_batch(model, block, prompt_ids, temperature, top_k, seed)
            for j, o in enumerate(out.reshape(len(part), len(batch.row_prompt), -1)):
                outs[lo + j].append(o)
                if on_batch is not None:
                    on_batch(batch)
    return [[o[b][i, :n] for (b, i), n in zip(rows.where, rows.length)] for o in outs]


@torch.no_grad()
def continuation_logprobs(model, prompt_ids: list[list[int]], conts: list[np.ndarray]) -> torch.Tensor:
    """
    Teacher-forced next-token log-probabilities (rows x max_len x vocab, float32) of each row's continuation:
    one forward pass over prompt + continuation (left-padded), the prediction of continuation token t in
    entry [row, max_len - len + t] (right-aligned; the entries before are unused).
    """
    return F.log_softmax(continuation_logits(model, prompt_ids, conts), dim=-1)


@torch.no_grad()
def continuation_logits(model, prompt_ids: list[list[int]], conts: list[np.ndarray]) -> torch.Tensor:
    """The logits behind continuation_logprobs (float32, the same layout)."""
    device = next(model.parameters()).device
    seqs = [list(p) + [int(t) for t in c[:-1]] for p, c in zip(prompt_ids, conts)]
    n = max(len(c) for c in conts)
    idx, pad = left_pad(seqs, device)
    logits, _ = model(idx, pad=pad if bool(pad.any()) else None, logits_to_keep=n)
    return logits[:, -n:, :].float()


def continuation_positions(conts: list[np.ndarray], n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mask), both (rows, n): each row's continuation right-aligned in n positions, mask True there."""
    tokens = torch.zeros((len(conts), n), dtype=torch.long, device=device)
    mask = torch.zeros((len(conts), n), dtype=torch.bool, device=device)
    for i, c in enumerate(conts):
        tokens[i, n - len(c):] = torch.as_tensor(np.asarray(c, np.int64), device=device)
        mask[i, n - len(c):] = True
    return tokens, mask


def continuation_means(kl: torch.Tensor, dnll: torch.Tensor, mask: torch.Tensor):
    """Per-position metrics (..., rows, n) averaged over each row's continuation: two float64 arrays (..., rows)."""
    lengths = mask.sum(1).double()
    return tuple(((v.double() * mask).sum(-1) / lengths).cpu().numpy() for v in (kl, dnll))


def compare_logprobs(base: torch.Tensor, pert: torch.Tensor, conts: list[np.ndarray]):
    """
    Per row: mean over the continuation's positions of KL(base || pert) of the next-token distributions and
    of the increase in negative log-likelihood of the continuation's tokens (-log p_pert + log p_base).
    Arguments as continuation_logprobs returns them; `pert` may also hold G ablations of every row,
    (G, rows, n, vocab). Returns two float64 arrays, (rows,) or (G, rows).
    """
    n = base.size(1)
    kl = (base.exp() * (base - pert)).sum(-1)
    tokens, mask = continuation_positions(conts, n, base.device)
    at = tokens[..., None]
    dnll = (base.gather(-1, at) - pert.gather(-1, at.expand(*pert.shape[:-1], 1)))[..., 0]
    return continuation_means(kl, dnll, mask)


def compare_logit_shifts(p: torch.Tensor, shift: torch.Tensor, conts: list[np.ndarray]):
    """
    The metrics of compare_logprobs from the change of the logits, shift = perturbed - base logits, given as
    (rows, n, vocab) or as k perturbations of every row (k, rows, n, vocab); p: the base's next-token
    probabilities (rows, n, vocab), in shift's dtype: base_probabilities(continuation_logprobs(...)).
    Since log p_pert = log p_base + shift - log E[exp(shift)] (E: the expectation under p_base),
    KL(base || pert) = log E[exp(shift)] - E[shift] and delta_nll = log E[exp(shift)] - shift[token].
    With the shift centred on its mean and exp(x) - 1 summed directly (expm1, log1p), float32 keeps its
    precision for effects far smaller than the distributions' entropies, which differencing two log-softmax
    outputs loses. `shift` is overwritten. Returns two float64 arrays, (rows,) or (k, rows).
    """
    tokens, mask = continuation_positions(conts, p.size(1), p.device)
    return continuation_means(*shift_metrics(p, shift, tokens), mask)


def shift_metrics(p: torch.Tensor, shift: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    compare_logit_shifts' kl and delta_nll at every position (float64, shift's shape without the vocabulary),
    `tokens` (rows, n) the token whose delta_nll is taken at each position. `shift` is overwritten.
    """
    def expect(x):  # E[x] at every position: a batched matrix product over the vocabulary
        return torch.einsum("rnv,...rnv->...rn", p, x)

    shift -= expect(shift)[..., None]
    at_token = shift.gather(-1, tokens.expand(shift.shape[:-1])[..., None])[..., 0].double()
    rest = expect(shift).double()  # what is left of the mean after centring (rounding)
    log_mgf = torch.log1p(expect(shift.expm1_()).double())  # log E[exp(shift)]
    return log_mgf - rest, log_mgf - at_token


METRIC_VALUES = 2 ** 20  # logits per CPU thread that one block of blocked_shift_metrics holds: they stay in cache


def metric_block(device, perturbations: int, vocab_size: int) -> int:
    """Positions blocked_shift_metrics forms the logits of at once: on a CPU few enough that a block's logits and
    their metrics stay in cache (formed whole, they are streamed through memory once per operation)."""
    if torch.device(device).type != "cpu":
        return 4096
    return max(1, METRIC_VALUES * torch.get_num_threads() // max(1, perturbations * vocab_size))


def blocked_shift_metrics(n: int, block, tokens: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    shift_metrics of G perturbations at n positions, `size` positions at a time: block(sl) gives the base's
    probabilities (b, vocab) and the logit shifts (G, b, vocab) at positions sl (the shifts are overwritten),
    tokens (n,) the token whose delta_nll is taken at each; n >= 1. Returns kl and delta_nll, (G, n) float64.
    """
    for lo in range(0, n, size):
        sl = slice(lo, min(n, lo + size))
        p, shift = block(sl)
        kl, dnll = shift_metrics(p[None], shift[:, None], tokens[None, sl])
        if lo == 0:
            out = torch.empty((2, shift.size(0), n), dtype=torch.float64, device=shift.device)
        out[0, :, sl], out[1, :, sl] = kl[:, 0], dnll[:, 0]
    return out[0], out[1]


def base_probabilities(base: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Probabilities from log-probabilities, normalised in float64 (the p that compare_logit_shifts takes)."""
    return torch.softmax(base.double(), dim=-1).to(dtype)


def agreement(base: np.ndarray, pert: np.ndarray) -> tuple[float, int]:
    """(fraction of positions where the tokens agree, first position where they differ — len if none)."""
    same = np.asarray(base) == np.asarray(pert)
    diff = np.flatnonzero(~same)
    return float(same.mean()), int(diff[0]) if len(diff) else len(same)


def metric_chunks(rows: Rows, prompt_ids, vocab_size: int, max_rows: int) -> list[np.ndarray]:
    """Rows with a continuation, in chunks whose teacher-forced logits stay within LOGIT_BUDGET."""
    todo = np.flatnonzero(rows.length > 0)
    chunks, cur, width = [], [], 0
    for r in todo:
        w = max(width, len(prompt_ids[rows.prompt[r]]) + int(rows.length[r]))
        if cur and (len(cur) >= max_rows or (len(cur) + 1) * w * vocab_size > LOGIT_BUDGET):
            chunks.append(np.array(cur))
            cur, w = [], len(prompt_ids[rows.prompt[r]]) + int(rows.length[r])
        cur.append(r)
        width = w
    if cur:
        chunks.append(np.array(cur))
    return chunks
