"""
Generation for a prompt CSV, shared by stage b (recording) and stage e (ablation): prompts are tokenised
and checked against the context window, grouped into batches of up to `batch_size` sequences (left-padded),
and generated with the key/value cache. Greedy decoding (temperature 0) computes one row per prompt, since
its repeats would be identical; sampling gives every (prompt, repeat) row its own seeded torch.Generator,
so a row's tokens depend on the seed, the prompt's index and the repeat number alone.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from gelutrace import PipelineError
from gelutrace.model.hooks import NeuronHooks


@dataclass
class Prompt:
    text: str
    new_tokens: int
    num_samples: int


@dataclass
class Batch:
    prompts: list[int]  # indices of the prompts with samples in this batch, in CSV order
    row_prompt: list[int]  # for each row: its prompt's index
    row_repeat: list[int]  # for each row: its repeat number (greedy: 0, standing for every repeat)
    new_tokens: int  # the most new tokens any of its prompts asks for
    samples: list[tuple[int, int]] = field(default_factory=list)  # its (prompt, repeat) samples, in CSV order


def encode_prompts(tokenizer, prompts: list[Prompt], block_size: int) -> list[list[int]]:
    ids = []
    for i, p in enumerate(prompts):
        toks = tokenizer(p.text)["input_ids"]
        if not toks:
            raise PipelineError(f"prompt {i + 1} encodes to no tokens")
        if len(toks) + p.new_tokens > block_size:
            raise PipelineError(f"prompt {i + 1}: {len(toks)} prompt tokens + {p.new_tokens} new tokens exceed "
                                f"the model's context window of {block_size}")
        ids.append(toks)
    return ids


def plan_batches(prompts: list[Prompt], prompt_ids: list[list[int]], greedy: bool, batch_size: int,
                 block_size: int, start: int = 0) -> list[Batch]:
    """
    The (prompt, repeat) samples in CSV order, from the `start`-th on, packed into batches of at most
    batch_size rows: consecutive samples share a batch while it has room, a sampled prompt with more repeats
    than batch_size is split across batches, and a greedy prompt is one row standing for all its repeats. A
    batch's longest prompt plus its most new tokens stays within the context window.
    """
    units, pos = [], 0  # (prompt, repeats, rows): the pieces that go into batches whole
    for i, p in enumerate(prompts):
        first, pos = max(0, start - pos), pos + p.num_samples
        if first >= p.num_samples:
            continue
        reps = list(range(first, p.num_samples))
        if p.new_tokens == 0:
            units.append((i, reps, []))
        elif greedy:
            units.append((i, reps, [0]))
        else:
            units += [(i, reps[j:j + batch_size], reps[j:j + batch_size]) for j in range(0, len(reps), batch_size)]
    batches, cur, width = [], None, 0
    for i, reps, rows in units:
        p = prompts[i]
        if (cur is None or (cur.row_prompt and len(cur.row_prompt) + len(rows) > batch_size)
                or max(width, len(prompt_ids[i])) + max(cur.new_tokens, p.new_tokens) > block_size):
            cur, width = Batch([], [], [], 0), 0
            batches.append(cur)
        if not cur.prompts or cur.prompts[-1] != i:
            cur.prompts.append(i)
        cur.samples += [(i, r) for r in reps]
        cur.row_prompt += [i] * len(rows)
        cur.row_repeat += rows
        if rows:
            cur.new_tokens = max(cur.new_tokens, p.new_tokens)
            width = max(width, len(prompt_ids[i]))
    return batches


def repeat_rows(batch: Batch, prompts: list[Prompt], greedy: bool) -> list[tuple[int, int, int]]:
    """
    (prompt, repeat, row) for every sample of the batch, in CSV order: `row` is the batch row whose
    continuation that repeat is (greedy repeats share their prompt's one row), -1 for a prompt of 0 tokens.
    """
    row_of = {(p, r): i for i, (p, r) in enumerate(zip(batch.row_prompt, batch.row_repeat))}
    return [(p, r, row_of.get((p, 0 if greedy else r), -1)) for p, r in batch.samples]


def row_generator(seed: int, prompt_index: int, repeat: int, device) -> torch.Generator:
    state = np.random.SeedSequence([seed, prompt_index, repeat]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    idx = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, width - len(r):] = torch.tensor(r)
    pad = torch.tensor([width - len(r) for r in rows], dtype=torch.long, device=device)
    return idx.to(device), pad


@torch.no_grad()
def generate_batch(model, batch: Batch, prompt_ids: list[list[int]], temperature: float, top_k: int | None,
                   seed: int) -> np.ndarray:
    """New token ids (rows x batch.new_tokens) of the batch's rows; a row's tokens past its prompt's count are spare."""
    if not batch.row_prompt:
        return np.zeros((0, 0), dtype=np.int64)
    device = next(model.parameters()).device
    idx, pad = left_pad([prompt_ids[p] for p in batch.row_prompt], device)
    generators = None
    if temperature > 0:
        generators = [row_generator(seed, p, r, device) for p, r in zip(batch.row_prompt, batch.row_repeat)]
    out = model.generate(idx, batch.new_tokens, temperature=temperature, top_k=top_k, generators=generators,
                         pad=pad if bool(pad.any()) else None)
    return out[:, idx.size(1):].cpu().numpy()


class StepProgress(NeuronHooks):
    """Advance a tqdm bar by `rows` tokens at each forward call of the model (one new token per row)."""

    def __init__(self, model, bar, rows: int):
        super().__init__(model)
        self.bar, self.rows = bar, rows

    def register(self):
        self.hook(self.model.lm_head, self._step)

    def _step(self, *_):
        self.bar.update(self.rows)  # returns nothing: a forward hook's return value would replace the output
