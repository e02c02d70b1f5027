"""
Single-neuron ablation effects: for every neuron, what zero-ablating it alone does to the model along stage
b's continuations, measured exactly as stage e measures a subset (teacher-forced kl and delta_nll, each
sample's mean over its continuation, then the mean over samples).

The clean forward pass of each group of sequences keeps, for the layer being measured, the residual stream
after its block and its post-GELU outputs a. Zeroing neuron j of layer l changes the block's output by
-a_j(p) * W_out[:, j] at every position p, a rank-one change applied directly to the kept residual; only the
blocks after l, the final layer norm and the unembedding (at continuation positions only) run again, on a
batch whose rows are (neuron, sequence) pairs.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gelutrace import PipelineError
from gelutrace.evaluate import ablation as pt
from gelutrace.evaluate import metrics
from gelutrace.evaluate import realtext as rt
from gelutrace.files import atomic, formats, layout
from gelutrace.model import hooks
from gelutrace.model.generation import left_pad
from gelutrace.record.corpus import parse_shard
from gelutrace.record.prompts import prompt_halves
from model import GPT

BLOCK = 512  # most neurons per block kept for --resume (all from one layer)


@dataclass
class Sequences:
    """The distinct teacher-forced sequences of a dataset and how the dataset's samples map onto them."""
    prompt_ids: list[list[int]]  # per sequence: its prompt's ids
    conts: list[np.ndarray]  # per sequence: its continuation
    sample_rows: np.ndarray  # per (prompt, repeat) sample in CSV order: its sequence (-1: no continuation)
    sample_prompt: np.ndarray = None  # per (prompt, repeat) sample in CSV order: its prompt's row

    def half_rows(self) -> list[np.ndarray] | None:
        """sample_rows of each half of the prompt rows (gelutrace.selection.stability.prompt_halves); None for one prompt."""

        if self.sample_prompt is None or not len(self.sample_prompt):
            return None
        half = prompt_halves(int(self.sample_prompt.max()) + 1)
        return None if half is None else [self.sample_rows[half[self.sample_prompt] == h] for h in (0, 1)]


def dataset_sequences(dataset_path, m: str, prompts, prompt_ids, csv_name: str) -> Sequences:
    """
    The samples of stage b's dataset, checked against the prompt CSV (same prompts in the same order, same
    numbers of new tokens and samples), with identical (prompt, continuation) pairs computed once.
    """
    samples = formats.read_dataset_samples(dataset_path, m)
    ds_name = layout.path(dataset_path, layout.DATASET, m).name
    expected = [(p, r) for p, prompt in enumerate(prompts) if prompt.new_tokens > 0
                for r in range(prompt.num_samples)]
    if len(samples) != len(expected):
        raise PipelineError(f"{ds_name} holds {len(samples)} generated samples but {csv_name} asks for "
                            f"{len(expected)}: the dataset was made from another prompt CSV")
    index, sample_rows, seqs = {}, [], Sequences([], [], np.zeros(0, np.int64))
    got = iter(samples)
    for p, prompt in enumerate(prompts):
        for r in range(prompt.num_samples):
            if prompt.new_tokens == 0:
                sample_rows.append(-1)
                continue
            repeat, ids, cont = next(got)
            why = ("its prompt ids are not the prompt's" if ids != prompt_ids[p]
                   else f"its prompt_sample_idx is {repeat}" if repeat != r
                   else f"it has {len(cont)} new tokens, the CSV asks for {prompt.new_tokens}"
                   if len(cont) != prompt.new_tokens else None)
            if why:
                raise PipelineError(f"{ds_name} does not match {csv_name} at prompt {p + 1}, sample {r}: {why} "
                                    f"(the dataset was made from another prompt CSV)")
            key = (p, cont.tobytes())
            if key not in index:
                index[key] = len(seqs.conts)
                seqs.prompt_ids.append(prompt_ids[p])
                seqs.conts.append(cont)
            sample_rows.append(index[key])
    seqs.sample_rows = np.array(sample_rows, np.int64)
    seqs.sample_prompt = np.repeat(np.arange(len(prompts)), [p.num_samples for p in prompts])
    return seqs


def sequence_groups(seqs: Sequences, vocab_size: int, d_mlp: int, max_rows: int, max_values: int) -> list[np.ndarray]:
    """
    Consecutive sequences in groups small enough that one neuron's rows of a group fit the limits: at most
    max_rows rows, and max_values logits (rows x continuation positions x vocabulary) or MLP activations
    (rows x positions x d_mlp).
    """
    groups, cur, n, T = [], [], 0, 0
    for s, (p, c) in enumerate(zip(seqs.prompt_ids, seqs.conts)):
        n2, T2 = max(n, len(c)), max(T, len(p) + len(c) - 1)
        if cur and (len(cur) + 1 > max_rows or (len(cur) + 1) * max(n2 * vocab_size, T2 * d_mlp) > max_values):
            groups.append(np.array(cur))
            cur, n2, T2 = [], len(c), len(p) + len(c) - 1
        cur.append(s)
        n, T = n2, T2
    if cur:
        groups.append(np.array(cur))
    return groups


def blocks(ids: np.ndarray, d_mlp: int) -> list[np.ndarray]:
    """Sorted neuron ids cut into blocks of at most BLOCK neurons of one layer: the units --resume keeps."""
    out = []
    for layer in np.unique(ids // d_mlp):
        sel = ids[ids // d_mlp == layer]
        out += [sel[i:i + BLOCK] for i in range(0, len(sel), BLOCK)]
    return out


@torch.no_grad()
def group_effects(model, layer: int, dims: np.ndarray, prompt_ids: list[list[int]], conts: list[np.ndarray],
                  max_rows: int, max_values: int, on_chunk=None) -> tuple[np.ndarray, np.ndarray]:
    """
    Per-sequence kl and delta_nll (neurons x sequences, float64) of zero-ablating each neuron `dims` of
    `layer` alone, for one group of sequences. on_chunk(k) is called after every k neurons.
    """
    device = next(model.parameters()).device
    h = model.transformer.h
    with hooks.CleanPass(model, layer) as clean:
        base = metrics.continuation_logprobs(model, prompt_ids, conts)
    clean_out = clean.final[:, -base.size(1):]
    S, n, V = base.shape
    seqs = [list(p) + [int(t) for t in c[:-1]] for p, c in zip(prompt_ids, conts)]
    _, pad = left_pad(seqs, device)
    T = clean.resid.size(1)
    w_out = h[layer].mlp.c_proj.weight  # (n_embd, d_mlp)
    per_pass = max(1, min(max_rows // S, max_values // (S * T * model.config.d_mlp)))  # rows through the blocks
    p = metrics.base_probabilities(base).view(S * n, V)
    tokens, in_cont = metrics.continuation_positions(conts, n, device)
    on = torch.nonzero(in_cont.reshape(-1))[:, 0]  # the continuations' positions, flattened
    kl = np.empty((len(dims), S))
    dnll = np.empty((len(dims), S))
    for lo in range(0, len(dims), per_pass):
        j = torch.as_tensor(dims[lo:lo + per_pass], device=device)
        k = len(j)
        # the block's output without neuron j: minus a_j(p) * W_out[:, j]  -> (k, S, T, n_embd)
        x = clean.resid[None] - clean.acts[..., j].permute(2, 0, 1)[..., None] * w_out[:, j].T[:, None, None, :]
        x = x.reshape(k * S, T, -1)
        rows_pad = pad.repeat(k)
        _, mask = model.attention_layout(T, 0, rows_pad if bool(rows_pad.any()) else None, device)
        for i in range(layer + 1, len(h)):
            x = h[i](x, i, None, mask)
        # the unembedding is linear: the logits change by lm_head(the change of the final layer norm's output)
        x = (model.transformer.ln_f(x[:, -n:]).view(k, S, n, -1) - clean_out).view(k, S * n, -1)
        per_position = metrics.blocked_shift_metrics(
            len(on), lambda sl: (p[on[sl]], model.lm_head(x[:, on[sl]]).float()), tokens.view(-1)[on],
            metrics.metric_block(device, k, V))
        full = torch.zeros((2, k, S * n), dtype=torch.float64, device=device)
        full[:, :, on] = torch.stack(per_position)
        kl[lo:lo + k], dnll[lo:lo + k] = metrics.continuation_means(*full.view(2, k, S, n), in_cont)
        if on_chunk is not None:
            on_chunk(k)
    return kl, dnll


@torch.no_grad()
def group_effects_forward(model, layer: int, dims: np.ndarray, prompt_ids: list[list[int]], conts: list[np.ndarray],
                          max_rows: int, max_values: int, on_chunk=None) -> tuple[np.ndarray, np.ndarray]:
    """
    group_effects for every family (transformers' model classes too): whole forward passes whose rows are
    (neuron, sequence) pairs, each block of rows ablating one neuron at the neuron site (perturbation.RowAblation).
    Slower than group_effects, which reruns only the blocks after the layer, but needs nothing of the model but
    its neuron site.
    """
    d = model.config.d_mlp
    base = metrics.continuation_logits(model, prompt_ids, conts)
    S, n, V = base.shape
    T = max(len(p) + len(c) - 1 for p, c in zip(prompt_ids, conts))
    per_pass = max(1, min(max_rows // S, max_values // (S * max(n * V, T * d))))
    p = metrics.base_probabilities(base)
    kl = np.empty((len(dims), S))
    dnll = np.empty((len(dims), S))
    for lo in range(0, len(dims), per_pass):
        chunk = dims[lo:lo + per_pass]
        with hooks.RowAblation(model, [np.array([layer * d + int(j)]) for j in chunk], S):
            shift = metrics.continuation_logits(model, prompt_ids * len(chunk), conts * len(chunk))
        shift = shift.view(len(chunk), S, n, V).sub_(base)
        kl[lo:lo + len(chunk)], dnll[lo:lo + len(chunk)] = metrics.compare_logit_shifts(p, shift, conts)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return kl, dnll


def block_effects(model, ids: np.ndarray, seqs: Sequences, groups: list[np.ndarray], max_rows: int,
                  max_values: int, on_chunk=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summary kl and delta_nll of each neuron of a one-layer block, as stage e's summary reports them, and (2, n)
    its delta_nll over each half of the prompt rows (NaN for one prompt)."""
    d = model.config.d_mlp
    layer = int(ids[0] // d)
    kl = np.empty((len(ids), len(seqs.conts)))
    dnll = np.empty_like(kl)

    effects = group_effects if isinstance(model, GPT) else group_effects_forward
    for g in groups:
        kl[:, g], dnll[:, g] = effects(model, layer, ids % d, [seqs.prompt_ids[s] for s in g],
                                             [seqs.conts[s] for s in g], max_rows, max_values,
                                             None if on_chunk is None else lambda k: on_chunk(k / len(groups)))
    halves = seqs.half_rows()
    half_dnll = (np.full((2, len(ids)), np.nan) if halves is None else
                 np.array([[pt.sample_mean(r, rows) for r in dnll] for rows in halves]))
    return (np.array([pt.sample_mean(r, seqs.sample_rows) for r in kl]),
            np.array([pt.sample_mean(r, seqs.sample_rows) for r in dnll]), half_dnll)


def text_block_effects(model, ids: np.ndarray, text, window_half: np.ndarray | None, batch_size: int,
                       on_chunk=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    block_effects on real text (realtext.EvalText, its units windows): each neuron's zero-ablation kl and
    delta_nll per scored token, and (2, n) its delta_nll over each half of the windows (window_half: each
    window's half, 0 or 1; NaN without).
    """

    progress = None if on_chunk is None else (lambda n: on_chunk(n / text.scored))
    base, measured = rt.evaluate(model, text, [np.array([int(j)]) for j in ids], None, batch_size, progress)
    tokens = base.tokens
    kl = np.array([m.kl.sum() for m in measured]) / tokens.sum()
    dnll = np.array([m.delta_nll.sum() for m in measured]) / tokens.sum()
    halves = np.full((2, len(ids)), np.nan)
    for h in (0, 1):
        sel = window_half == h if window_half is not None else np.zeros(len(tokens), bool)
        if tokens[sel].sum():
            halves[h] = [m.delta_nll[sel].sum() / tokens[sel].sum() for m in measured]
    return kl, dnll, halves


def shard_blocks(n_blocks: int, spec: str | None, dist_ctx=None) -> np.ndarray:
    """The blocks this process measures: all, those of --neurons I/N (blocks I, I+N, ...), or a torchrun rank's."""

    i, n = (dist_ctx[0], dist_ctx[1]) if dist_ctx is not None else (parse_shard(spec, "--neurons") or (0, 1))
    return np.arange(i, n_blocks, n)


class Staging:
    """
    Finished blocks of an unfinished run in `<dataset>/.{m}_neuron_effects_partial/`, one `.npz` each, plus
    `state.json` with the run's fingerprint; --resume keeps the blocks of a run with the same fingerprint.
    """

    def __init__(self, dataset_path, m: str, fingerprint: str, tag: str = ""):
        self.dir = Path(str(layout.path(dataset_path, layout.NEURON_EFFECTS_PARTIAL, m)) + tag)  # tag: one per torchrun process
        self.fingerprint = fingerprint

    def start(self, resume: bool) -> dict:
        """{block index: (kl, delta_nll, delta_nll of each half)} of the blocks already done (with --resume)."""
        state = self.dir / "state.json"
        if resume and state.is_file():
            if json.loads(state.read_text()).get("fingerprint") != self.fingerprint:
                raise PipelineError(f"--resume: the unfinished run in {self.dir} used other inputs or settings "
                                    f"(dataset, prompt CSV, model, neurons or batch sizes); rerun without --resume")
            done = {}
            for p in sorted(self.dir.glob("block_*.npz")):
                with np.load(p, allow_pickle=False) as z:
                    done[int(p.stem.split("_")[1])] = (z["kl"], z["delta_nll"], z["delta_nll_halves"])
            return done
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        atomic.write_json({"fingerprint": self.fingerprint}, state)
        return {}

    def add(self, index: int, kl: np.ndarray, dnll: np.ndarray, dnll_halves: np.ndarray):
        atomic.write_npz(self.dir / f"block_{index:05d}.npz", kl=kl, delta_nll=dnll, delta_nll_halves=dnll_halves)

    def finish(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def write_effects(dataset_path, m: str, ids: np.ndarray, kl: np.ndarray, dnll: np.ndarray, meta: dict,
                  dnll_halves: np.ndarray | None = None):
    halves = np.full((2, len(ids)), np.nan) if dnll_halves is None else dnll_halves
    df = pd.DataFrame({"neuron_id": ids, "delta_nll": dnll, "kl": kl,
                       **{f"delta_nll_{h}": halves[i] for i, h in enumerate(layout.HALVES)}},
                      columns=layout.NEURON_EFFECTS_COLUMNS)
    atomic.write_csv(df, layout.path(dataset_path, layout.NEURON_EFFECTS, m))
    atomic.write_json(meta, layout.path(dataset_path, layout.NEURON_EFFECTS_META, m), indent=2)
