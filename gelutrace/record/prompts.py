"""
Activation recording: forward hooks on every layer's GELU keep, for each forward call, the post-GELU values
at the last position of every row, which is the position that predicts the next token. During cached
generation each forward call (the prefill, then one call per new token) predicts exactly one token per row,
so call s of a generation holds the activations behind new token s.
"""

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.files import atomic, formats, layout
from gelutrace.files import resumestate as rs
from gelutrace.files.atomic import file_sha256, write_csv, write_json, write_npz
from gelutrace.files.formats import (
    frequency_table,
    packed_counts,
    write_activation_lists,
    write_packed_activation_matrix,
    write_top_examples,
)
from gelutrace.files.layout import (
    CONTEXT_TOKENS,
    DATASET,
    FREQUENCY,
    MATRIX,
    PARTIAL_DIR,
    TOP_EXAMPLES,
    dataset_columns,
    path,
)
from gelutrace.graph.causal import CausalEdges
from gelutrace.graph.counts import RunningTopK, merge_top
from gelutrace.model.generation import Batch, Prompt, StepProgress, generate_batch, plan_batches, repeat_rows
from gelutrace.model.hooks import GeluHooks
from gelutrace.record.attribution import distinct_sequences, neuron_attribution
from gelutrace.record.direct import prompt_mode


class ActivationRecorder(GeluHooks):
    """
    with ActivationRecorder(model, weights) as rec: model.generate(...)

    weights (steps, rows): how many samples each (call, row) stands for (0 for calls past a row's last
    wanted token, the repeat count for a greedy row standing for identical repeats).
    Afterwards rec.active[s, r] is the boolean (n_layer * d_mlp) vector of neurons whose post-GELU output
    was > 0 at call s in row r, in neuron id order, and rec.value_sum the weighted sum of post-GELU
    outputs over all recorded samples (for mean activations). With `top` (a statistics.RunningTopK) and
    sample_ids (steps, rows), the lowest sample id each (call, row) stands for (-1: none), each call's values
    also go to the running top-k.
    """

    def __init__(self, model, weights: torch.Tensor, top=None, sample_ids: torch.Tensor | None = None):
        super().__init__(model)
        cfg = model.config
        device = next(model.parameters()).device
        self.d = cfg.d_mlp
        self.n_layer = cfg.n_layer
        self.weights = weights.to(device=device, dtype=torch.float64)
        self.active = torch.zeros((*weights.shape, cfg.n_layer * cfg.d_mlp), dtype=torch.bool, device=device)
        self.value_sum = torch.zeros(cfg.n_layer * cfg.d_mlp, dtype=torch.float64, device=device)
        self.step = 0
        self.top = top
        self.sample_ids = None if sample_ids is None else sample_ids.to(device)

    def _hook(self, layer):
        cols = slice(layer * self.d, (layer + 1) * self.d)

        def hook(module, inputs, output):
            if self.step < self.active.size(0):
                last = output[:, -1, :]
                self.active[self.step, :, cols] = last > 0
                self.value_sum[cols] += self.weights[self.step] @ last.to(torch.float64)
                if self.top is not None:
                    self.top.add(layer, last, self.sample_ids[self.step])
            if layer == self.n_layer - 1:
                self.step += 1
        return hook


@torch.no_grad()
def trace(model, ids: list[int]) -> np.ndarray:
    """Post-GELU values (n_layer * d_mlp,) at the last position of `ids`: the activations behind its next token."""
    device = next(model.parameters()).device
    values = []
    with GeluHooks(model, lambda layer: lambda m, i, o: values.append(o[0, -1].float().cpu())):
        model(torch.tensor([ids], device=device))
    return torch.cat(values).numpy()


@dataclass
class Chunk:
    """Everything one batch recorded, samples in dataset order: the unit that --resume keeps."""
    prompt_index: np.ndarray  # (S,) per sample
    repeat: np.ndarray  # (S,) prompt_sample_idx
    position: np.ndarray  # (S,) token_position
    output_id: np.ndarray  # (S,) the generated token
    packed: np.ndarray  # (S, ceil(N / 8)) uint8, active neurons bit-packed (np.packbits, axis 1)
    value_sum: np.ndarray  # (N,) float64, summed post-GELU outputs over the chunk's samples
    top_values: np.ndarray  # (k', N) float64, each neuron's largest values in the chunk (k' = 0: not kept)
    top_ids: np.ndarray  # (k', N) int64, their global sample ids

    FIELDS = ("prompt_index", "repeat", "position", "output_id", "packed", "value_sum", "top_values", "top_ids")


def sample_layout(batch: Batch, prompts: list[Prompt], greedy: bool):
    """(call, row, prompt, repeat, position) of each sample of the batch, in dataset order; call == position."""
    reps = np.array([t for t in repeat_rows(batch, prompts, greedy) if t[2] >= 0], np.int64).reshape(-1, 3)
    n = np.array([prompts[p].new_tokens for p in reps[:, 0]], np.int64)
    position = np.concatenate([np.arange(k) for k in n]) if len(n) else np.zeros(0, np.int64)
    prompt, repeat, row = (np.repeat(reps[:, i], n) for i in range(3))
    return position, row, prompt, repeat, position


def record_batch(model, batch: Batch, prompts: list[Prompt], prompt_ids: list[list[int]], temperature: float,
                 top_k: int | None, seed: int, top_examples: int = 0, first_sample: int = 0) -> Chunk:
    """One batch's chunk; with top_examples > 0 also each neuron's top samples (ids from first_sample on)."""
    greedy = temperature == 0
    call, row, prompt, repeat, position = sample_layout(batch, prompts, greedy)
    weights = np.zeros((batch.new_tokens, len(batch.row_prompt)))
    np.add.at(weights, (call, row), 1.0)
    cfg = model.config
    top, grid = None, None
    if top_examples > 0:
        top = RunningTopK(cfg.n_layer, cfg.d_mlp, top_examples, next(model.parameters()).device)
        big = np.iinfo(np.int64).max
        grid = np.full(weights.shape, big, np.int64)
        np.minimum.at(grid, (call, row), first_sample + np.arange(len(call)))  # greedy repeats: the first id
        grid[grid == big] = -1
        grid = torch.from_numpy(grid)
    with ActivationRecorder(model, torch.from_numpy(weights), top, grid) as rec:
        new_ids = generate_batch(model, batch, prompt_ids, temperature, top_k, seed)
    sel = torch.from_numpy(call).to(rec.active.device), torch.from_numpy(row).to(rec.active.device)
    active = rec.active[sel].cpu().numpy()
    n = cfg.n_layer * cfg.d_mlp
    top_values, top_ids = top.result() if top is not None else (np.zeros((0, n)), np.zeros((0, n), np.int64))
    return Chunk(prompt, repeat, position, new_ids[row, call] if len(row) else np.zeros(0, np.int64),
                 np.packbits(active, axis=1), rec.value_sum.cpu().numpy(), top_values, top_ids)


class Staging:
    """
    Chunks of an unfinished stage-b run in `<export_dir>/.{m}_partial/`, one `.npz` per completed batch, and,
    written after each, `state.json`: the run's fingerprint, the chunks, the (prompt, repeat) samples they cover
    and each chunk's sha256 (the set's manifest). `--resume` continues after the last completed batch of a run
    with the same fingerprint, only if every chunk matches the manifest and the chunks hold exactly the samples
    the state says are done (check_chunks); anything else is refused (gelutrace.files.resumestate). The final outputs
    are written only when every prompt is done.
    """

    STATE_KEYS = {"fingerprint", "chunks", "samples_done", "files"}

    def __init__(self, export_dir, m: str, fingerprint: str):
        self.dir = path(export_dir, PARTIAL_DIR, m)
        self.fingerprint = fingerprint
        self.hashes: dict[str, str] = {}

    @staticmethod
    def chunk_name(i: int) -> str:
        return f"chunk_{i:05d}.npz"

    def start(self, resume: bool, prompts: list[Prompt] | None = None, greedy: bool = False,
              n_neurons: int | None = None, vocab: int | None = None, top_examples: int = 0
              ) -> tuple[list[Chunk], int]:
        """The chunks already done (resume) and the number of (prompt, repeat) samples they cover. With the run's
        prompts (and its decoding, neurons, vocabulary and top_examples), the chunks are checked against them."""
        state_file = self.dir / "state.json"
        if resume:
            rs.check_place(self.dir, state_file)
        if resume and state_file.is_file():
            where = str(state_file)
            state = rs.read_state(state_file, self.STATE_KEYS)
            if state["fingerprint"] != self.fingerprint:
                raise PipelineError(f"--resume: the unfinished run in {self.dir} used other inputs or settings "
                                    f"(prompt CSV, model, seed, temperature, top_k or batch size); rerun without --resume")
            names = rs.names(state["chunks"], f"{where}: chunks")
            for i, name in enumerate(names):
                rs.member(self.dir, name, self.chunk_name(i), f"{where}: chunks")
            done = rs.whole(state["samples_done"], f"{where}: samples_done")
            if done < 0:
                raise rs.damaged(f"{where}: samples_done is {done}")
            rs.verify_files(self.dir, state["files"], names, where)
            chunks = [self._load(self.dir / name) for name in names]
            if prompts is not None:
                check_chunks(chunks, done, prompts, greedy, n_neurons, vocab, top_examples, where)
            self.hashes = {name: state["files"][name] for name in names}
            return chunks, done
        if self.dir.is_symlink():  # not ours: the link goes, never what it points to
            self.dir.unlink()
        elif self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.hashes = {}
        self._state([], 0)
        return [], 0

    def add(self, chunk: Chunk, chunks_so_far: int, samples_done: int):
        name = self.chunk_name(chunks_so_far)
        write_npz(self.dir / name, compress=False, fingerprint=np.array(self.fingerprint),
                  **{f: getattr(chunk, f) for f in Chunk.FIELDS})
        self.hashes[name] = file_sha256(self.dir / name)
        self._state([self.chunk_name(i) for i in range(chunks_so_far + 1)], samples_done)

    def finish(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def _state(self, chunks, samples_done):
        write_json({"fingerprint": self.fingerprint, "chunks": chunks, "samples_done": samples_done,
                    "files": {c: self.hashes[c] for c in chunks}}, self.dir / "state.json")

    def _load(self, p: Path) -> Chunk:
        """A saved chunk of this run; one of another run, or a damaged one, is refused."""
        try:
            with np.load(p, allow_pickle=False) as z:
                owner = str(z["fingerprint"]) if "fingerprint" in z.files else None
                chunk = Chunk(*(z[f] for f in Chunk.FIELDS))
        except Exception as e:
            raise rs.damaged(f"{p}: {type(e).__name__}: {e}") from None
        if owner != self.fingerprint:
            raise PipelineError(f"--resume: {p} belongs to another run (other inputs or settings); rerun without "
                                f"--resume")
        return chunk


def check_chunks(chunks: list[Chunk], done: int, prompts: list[Prompt], greedy: bool, n_neurons: int, vocab: int,
                 k: int, where: str):
    """
    Saved chunks against the first `done` (prompt, repeat) samples of the prompts, in CSV order: their prompt,
    repeat and position columns are exactly those samples' tokens, each chunk whole continuations; the generated
    tokens within the vocabulary (and, greedy, every repeat of a prompt the same); the packed rows one per sample,
    of n_neurons bits; finite sums; each chunk's top examples (min(k, its computed samples) per neuron) among its
    own samples, each the first sample of its (call, row), in rank order and positive exactly where its packed row
    has the neuron active.
    """
    total = sum(p.num_samples for p in prompts)
    if done > total:
        raise rs.damaged(f"{where}: samples_done is {done}, but the prompts have {total} samples")
    pairs = [(i, r) for i, p in enumerate(prompts) for r in range(p.num_samples)][:done]
    n_new = np.array([prompts[i].new_tokens for i, _ in pairs], np.int64)
    want = {"prompt_index": np.repeat([i for i, _ in pairs], n_new).astype(np.int64),
            "repeat": np.repeat([r for _, r in pairs], n_new).astype(np.int64),
            "position": np.concatenate([np.arange(t) for t in n_new]) if len(n_new) else np.zeros(0, np.int64)}
    width = (n_neurons + 7) // 8
    first = 0
    for c, chunk in enumerate(chunks):
        name = f"{where}: chunk {c}"
        S = len(chunk.position)
        for f in ("prompt_index", "repeat", "position", "output_id"):
            a = getattr(chunk, f)
            if a.shape != (S,) or a.dtype.kind not in "iu":
                raise rs.damaged(f"{name}: {f} is {a.dtype} {a.shape}, not {S} whole numbers")
        if S and chunk.position[0] != 0:
            raise rs.damaged(f"{name} does not start a continuation")
        if ((chunk.output_id < 0) | (chunk.output_id >= vocab)).any():
            raise rs.damaged(f"{name}: a generated token outside the vocabulary")
        packed = chunk.packed
        if packed.dtype != np.uint8 or packed.shape != (S, width) or not rs.padding_clear(packed, n_neurons):
            raise rs.damaged(f"{name}: packed rows are {packed.dtype} {packed.shape}, not uint8 {(S, width)}")
        if chunk.value_sum.dtype != np.float64 or chunk.value_sum.shape != (n_neurons,) or \
                not np.isfinite(chunk.value_sum).all():
            raise rs.damaged(f"{name}: value_sum is not {n_neurons} finite float64 sums")
        # the (call, row) each sample was computed in: a greedy row stands for all repeats of its prompt
        cell = np.stack([chunk.prompt_index, np.zeros_like(chunk.repeat) if greedy else chunk.repeat, chunk.position],
                        axis=1)
        _, firsts = np.unique(cell, axis=0, return_index=True)
        kk = min(k, len(firsts))
        values, ids = chunk.top_values, chunk.top_ids
        if values.dtype != np.float64 or ids.dtype != np.int64 or values.shape != (kk, n_neurons) or \
                ids.shape != (kk, n_neurons):
            raise rs.damaged(f"{name}: top examples are {values.dtype} {values.shape}, not {kk} per neuron")
        rows = ids - first
        if kk and (~np.isin(rows, firsts)).any():
            raise rs.damaged(f"{name}: top_ids name samples outside the chunk's own")
        if kk:
            rs.check_top(values, ids, rs.packed_bits(packed, rows), name)
        first += S
    got = {f: np.concatenate([getattr(c, f) for c in chunks]).astype(np.int64) if chunks else np.zeros(0, np.int64)
           for f in want}
    for f in want:
        if got[f].shape != want[f].shape or (got[f] != want[f]).any():
            raise rs.damaged(f"{where}: samples_done is {done}, but the chunks hold other samples ({f} differs)")
    if greedy:  # every repeat of a prompt is its one row's continuation
        out = np.concatenate([c.output_id for c in chunks]) if chunks else np.zeros(0, np.int64)
        packed = np.concatenate([c.packed for c in chunks]) if chunks else np.zeros((0, width), np.uint8)
        lead = {}
        for lo, (i, _) in zip(np.cumsum(np.r_[0, n_new[:-1]]).tolist(), pairs):
            t = prompts[i].new_tokens
            if i not in lead:
                lead[i] = lo
            elif (out[lo:lo + t] != out[lead[i]:lead[i] + t]).any() or \
                    (packed[lo:lo + t] != packed[lead[i]:lead[i] + t]).any():
                raise rs.damaged(f"{where}: greedy repeats of prompt {i + 1} differ")


def fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()


def concat_samples(chunks: list[Chunk]) -> dict:
    """prompt_index, repeat, position and output_id of every sample of the chunks, in dataset order."""
    return {f: np.concatenate([getattr(c, f) for c in chunks]) if chunks else np.zeros(0, np.int64)
            for f in ("prompt_index", "repeat", "position", "output_id")}


def record_attribution(model, chunks: list[Chunk], prompt_ids: list[list[int]], batch_size: int,
                       progress=None) -> tuple[np.ndarray, np.ndarray | None]:
    """
    Each neuron's attribution (gelutrace.record.attribution) over the recorded continuations, and (2, N) the same over
    each half of the prompt rows (gelutrace.selection.stability.prompt_halves; None for one prompt), from one pass: the
    whole is the halves' mean weighted by their samples.
    """

    cat = concat_samples(chunks)
    prompts, conts, weights, prompt = distinct_sequences(cat["prompt_index"], cat["repeat"], cat["position"],
                                                         cat["output_id"], prompt_ids)
    half = prompt_halves(len(prompt_ids))
    if half is None:
        return neuron_attribution(model, prompts, conts, weights, batch_size, progress), None
    groups = half[prompt]
    halves = neuron_attribution(model, prompts, conts, weights, batch_size, progress, groups=groups)
    counted = np.array([len(c) > 0 for c in conts])
    w = np.array([weights[counted & (groups == h)].sum() for h in (0, 1)])
    if len(halves) < 2:  # no row of the second half has a continuation
        halves = np.vstack([halves, np.zeros_like(halves[0])])
    whole = (w @ halves) / w.sum() if w.sum() else np.zeros(halves.shape[1])
    return whole, halves


def record_direct(model, chunks: list[Chunk], prompt_ids: list[list[int]], batch_size: int, edges: str,
                  progress=None) -> tuple:
    """The causal edge weights (gelutrace.record.direct) over the recorded continuations, and a list of the same over
    each half of the prompt rows (None for one prompt), from one pass: the whole is the halves' merge."""

    cat = concat_samples(chunks)
    prompts, conts, weights, prompt = distinct_sequences(cat["prompt_index"], cat["repeat"], cat["position"],
                                                         cat["output_id"], prompt_ids)
    half = prompt_halves(len(prompt_ids))
    if half is None:
        return prompt_mode(model, prompts, conts, weights, edges, batch_size, progress)[0], None
    halves = prompt_mode(model, prompts, conts, weights, edges, batch_size, progress, groups=half[prompt])
    return CausalEdges.merge(halves), halves


def top_examples_text(top_ids: np.ndarray, cat: dict, tokenizer, prompt_ids: list[list[int]]) -> dict:
    """(context, token) of every sample among the top examples: up to CONTEXT_TOKENS tokens of the input that
    predicts the sample's token (prompt and earlier continuation), and that token."""
    text = {}
    for s in np.unique(top_ids).tolist():
        lo = s - cat["position"][s]
        ids = prompt_ids[cat["prompt_index"][s]] + cat["output_id"][lo:s].tolist()
        text[s] = (tokenizer.decode(ids[-CONTEXT_TOKENS:]), tokenizer.decode([int(cat["output_id"][s])]))
    return text


def write_dataset(export_dir, m: str, chunks: list[Chunk], tokenizer, prompts: list[Prompt],
                  prompt_ids: list[list[int]], n_layer: int, d_mlp: int, activation_lists: bool = True,
                  attribution: tuple | None = None, top: tuple[np.ndarray, np.ndarray] | None = None):
    """Stage b's dataset files from the recorded chunks (graph files are written separately)."""
    n = n_layer * d_mlp
    cat = concat_samples(chunks)
    packed = np.concatenate([c.packed for c in chunks]) if chunks else np.zeros((0, (n + 7) // 8), np.uint8)
    value_sum = np.sum([c.value_sum for c in chunks], axis=0) if chunks else np.zeros(n)
    samples = len(packed)
    counts, per_layer = packed_counts(packed, n, n_layer)

    input_text, output = [], []
    starts = np.flatnonzero(np.r_[True, cat["position"][1:] == 0]) if samples else []
    for lo, hi in zip(starts, list(starts[1:]) + [samples]):  # one (prompt, repeat) continuation each
        p = int(cat["prompt_index"][lo])
        ids = cat["output_id"][lo:hi].tolist()
        input_text += [prompts[p].text + tokenizer.decode(ids[:t]) for t in range(len(ids))]
        output += [tokenizer.decode([i]) for i in ids]
    table = {
        "sample_id": np.arange(samples),
        "prompt_sample_idx": cat["repeat"],
        "token_position": cat["position"],
        "input_text": input_text,
        "output": output,
        "input_text_ids": [str(prompt_ids[p]) for p in cat["prompt_index"]],
        "output_id": cat["output_id"],
        "number_of_active_neurons": per_layer.sum(axis=1),
    }
    table.update({f"layer_{i}_num_active_neurons": per_layer[:, i] for i in range(n_layer)})
    write_csv(pd.DataFrame(table, columns=dataset_columns(n_layer)), path(export_dir, DATASET, m))

    whole, halves = attribution if attribution is not None else (None, None)
    write_csv(frequency_table(counts, value_sum, samples, d_mlp, whole, halves), path(export_dir, FREQUENCY, m))
    write_packed_activation_matrix(path(export_dir, MATRIX, m), packed, n)
    if activation_lists:
        write_activation_lists(export_dir, m, packed, n)
    if top is not None:
        write_top_examples(path(export_dir, TOP_EXAMPLES, m), *top, top_examples_text(top[1], cat, tokenizer,
                                                                                      prompt_ids))
    fraction = per_layer.mean(axis=0) / d_mlp if samples else np.zeros(n_layer)
    return {"samples": samples, "active_fraction_per_layer": fraction.tolist()}


HALVES_SEED = 0x4A1F  # the prompt rows' split: fixed, so that stage b, the effects and stage e agree on it


def prompt_halves(n_prompts: int) -> np.ndarray | None:
    """Each prompt row's half (0 or 1; the first half holds n_prompts // 2 rows), or None below 2 rows."""
    if n_prompts < 2:
        return None
    perm = np.random.default_rng(np.random.SeedSequence([HALVES_SEED, n_prompts])).permutation(n_prompts)
    half = np.ones(n_prompts, np.int64)
    half[perm[:n_prompts // 2]] = 0
    return half


# --- the run ----------------------------------------------------------------------------------------------
@dataclass
class PromptSettings:
    """Stage b's prompt mode (b_generate_activation_dataset.py --input_csv): sampling, and what it records."""
    input_csv: str  # its bytes go into the --resume fingerprint
    seed: int = 42
    temperature: float = 0.0
    top_k: int | None = None
    batch_size: int = 64
    top_examples: int = 10
    resume: bool = False
    attribution: bool = True
    direct_edges: bool = False
    edges: str = "adjacent"
    activation_lists: bool = True
    edge_list: bool = True


@torch.no_grad()
def run(lm, export, prompts: list[Prompt], prompt_ids: list[list[int]], s: PromptSettings) -> dict:
    """Stage b over the prompts (encoded: prompt_ids) with a loaded model, into export (locked by the caller);
    returns the dataset's summary."""
    cfg = lm.model.config
    greedy = s.temperature == 0

    staging = Staging(export, lm.name, fingerprint(
        Path(s.input_csv).read_bytes(), lm.name, str(lm.path.resolve()), vars(cfg), s.seed,
        s.temperature, s.top_k, s.batch_size, s.top_examples))
    chunks, start = staging.start(s.resume, prompts, greedy, cfg.n_layer * cfg.d_mlp, cfg.vocab_size,
                                  s.top_examples)
    top = merge_chunk_tops(None, chunks, s.top_examples)
    if start:
        print(f"resuming after {start} of {sum(p.num_samples for p in prompts)} prompt samples")
    batches = plan_batches(prompts, prompt_ids, greedy, s.batch_size, cfg.block_size, start)
    total = sum(len(b.row_prompt) * b.new_tokens for b in batches)
    with tqdm(total=total, unit="tok", desc=f"generating ({'greedy' if greedy else 'sampling'})") as bar:
        for batch in batches:
            with StepProgress(lm.model, bar, len(batch.row_prompt)):
                chunk = record_batch(lm.model, batch, prompts, prompt_ids, s.temperature, s.top_k, s.seed,
                                     s.top_examples, sum(len(c.position) for c in chunks))
            start += len(batch.samples)
            staging.add(chunk, len(chunks), start)
            chunks.append(chunk)
            top = merge_chunk_tops(top, [chunk], s.top_examples)
    attribution = None
    if s.attribution:
        rows = sum(len(b.row_prompt) for b in plan_batches(prompts, prompt_ids, greedy, s.batch_size, cfg.block_size))
        with tqdm(total=rows, unit="seq", desc="attribution (forward + backward)") as bar:
            attribution = record_attribution(lm.model, chunks, prompt_ids, s.batch_size, bar.update)
    direct = None
    if s.direct_edges:
        rows = sum(len(b.row_prompt) for b in plan_batches(prompts, prompt_ids, greedy, s.batch_size, cfg.block_size))
        with tqdm(total=rows, unit="seq", desc="direct edges (forward)") as bar:
            direct = record_direct(lm.model, chunks, prompt_ids, s.batch_size, s.edges, bar.update)

    with atomic.OutputSet(export, layout.path(export, layout.DATASET_MANIFEST, lm.name), layout.dataset_files(lm.name),
                      "stage b") as out:
        summary = write_dataset(out.dir, lm.name, chunks, lm.tokenizer, prompts, prompt_ids, cfg.n_layer, cfg.d_mlp,
                                activation_lists=s.activation_lists, attribution=attribution, top=top)
        formats.write_graph_files_if_stale(export, lm.name, cfg.n_layer, cfg.d_mlp, write_el=s.edge_list,
                                      site=lm.site, into=out.dir)
        vouched = layout.DATASET_SET + ((layout.TOP_EXAMPLES,) if top is not None else ())
        if direct is not None:
            direct[0].write_npz(layout.path(out.dir, layout.DIRECT_EDGES, lm.name), direct[1])
            vouched += (layout.DIRECT_EDGES,)
        out.vouch(layout.path(out.dir, f, lm.name) for f in vouched)
    staging.finish()
    return summary


def merge_chunk_tops(top, chunks, k: int):
    """The running top-k merged with the chunks' own (exact: the top k of a union is the top k of the parts' top
    ks); the chunks' copies are dropped, so memory stays O(neurons x k)."""
    if k == 0:
        return None
    parts = ([top] if top is not None else []) + [(c.top_values, c.top_ids) for c in chunks]
    for c in chunks:
        c.top_values = c.top_ids = None
    return merge_top(parts, k) if parts else None
