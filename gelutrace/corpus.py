"""
Stage b's corpus mode: documents -> tokens -> windows -> exact streamed statistics.

A `.txt` file is one document; a `.jsonl` file holds one document per line in the field `text`; a directory
means every `.txt`/`.jsonl` in it, sorted by name. Each document is tokenized alone and followed by the
tokenizer's end-of-text token; the documents are concatenated in order and cut into consecutive,
non-overlapping windows of `context` tokens (the last, shorter window is kept). Every position of every
window is one sample: the post-GELU outputs there, teacher-forced, are the ones behind predicting the next
token. Shard I of N takes windows I, I + N, I + 2N, ...

Batches of windows run through the model with hooks on every GELU that feed `CoactivationCounts` and drop
the batch; only the totals (and, with save_matrix, the bit-packed rows) are kept.
"""

import fnmatch
import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace import coactivation as co
from gelutrace import stagefiles as sf
from gelutrace.shards import CORPUS_FORMAT, CORPUS_VERSION
from gelutrace.sites import GeluHooks, run_trunk
from gelutrace.statistics import CoactivationCounts, RunningTopK, merge_top

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKENS_PER_BATCH = 4096  # the default batch: as many windows as hold about this many tokens
TOP_EXAMPLES_MAX_TOKENS = 2 ** 32  # RunningTopK's sample ids (global token positions) stay below this


# --- documents and tokens ----------------------------------------------------------------------------------
def corpus_files(inputs: list[str]) -> list[Path]:
    files = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix in TEXT_SUFFIXES)
            if not found:
                raise PipelineError(f"--input_text directory {p} holds no .txt or .jsonl file")
            files += found
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES:
                raise PipelineError(f"--input_text {p}: expected a .txt or .jsonl file, or a directory of them")
            files.append(p)
        else:
            raise PipelineError(f"--input_text {p} does not exist")
    return files


def read_documents(p: Path, raw: bytes) -> list[str]:
    if not raw:
        raise PipelineError(f"{p} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{p} is not UTF-8 text: byte {e.start} (0x{raw[e.start]:02x}) cannot be decoded") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is no text
    if p.suffix == ".txt":
        return [text]
    docs = []
    for k, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{p} line {k}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "text" not in rec:
            raise PipelineError(f"{p} line {k}: no field 'text'")
        if not isinstance(rec["text"], str):
            raise PipelineError(f"{p} line {k}: field 'text' is not a string")
        try:
            rec["text"].encode("utf-8")
        except UnicodeEncodeError as e:  # a JSON escape such as \ud800 that pairs with no other
            raise PipelineError(f"{p} line {k}: field 'text' holds a lone surrogate (U+{ord(rec['text'][e.start]):04X} "
                                f"at character {e.start}), which is not text") from None
        docs.append(rec["text"])
    if not docs:
        raise PipelineError(f"{p} holds no documents")
    return docs


@dataclass
class Corpus:
    ids: np.ndarray  # every token, documents concatenated, each followed by end-of-text
    files: list[dict] = field(default_factory=list)  # path, sha256, documents, tokens, first_token, document_starts
    documents: int = 0

    def record(self) -> dict:
        return {"files": self.files, "documents": self.documents,
                "tokens_read": int(sum(f["tokens"] for f in self.files))}


def read_corpus(inputs: list[str], tokenizer, max_tokens: int | None = None) -> Corpus:
    """
    Every file's documents, tokenized. Each file's record holds where its first token lies in the concatenated
    text (first_token) and where each of its documents read starts, counted from there (document_starts);
    documents past --max_tokens are not read.
    """
    eot = tokenizer.eos_token_id
    if eot is None:
        raise PipelineError("the tokenizer has no end-of-text token to separate documents")
    dtype = np.uint16 if len(tokenizer) <= 2 ** 16 else np.int32
    parts, files, documents, total = [], [], 0, 0
    for p in corpus_files(inputs):
        raw = p.read_bytes()
        docs = read_documents(p, raw)
        encoded = tokenizer(docs, verbose=False)["input_ids"]
        for k, ids in enumerate(encoded):
            if not ids:
                raise PipelineError(f"{p}: document {k + 1} has no tokens")
        tokens = sum(len(ids) + 1 for ids in encoded)
        first, starts = total, []
        for ids in encoded:
            if max_tokens is None or total < max_tokens:
                parts.append(np.array(ids + [eot], dtype=dtype))
                starts.append(total - first)
                total += len(ids) + 1
        files.append({"path": str(p.resolve()), "sha256": hashlib.sha256(raw).hexdigest(), "documents": len(docs),
                      "tokens": tokens, "first_token": first, "document_starts": starts})
        documents += len(docs)
    ids = np.concatenate(parts)
    return Corpus(ids[:max_tokens] if max_tokens is not None else ids, files, documents)


def document_starts(record: dict) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Where every document read starts in the concatenated text (global token positions, ascending), and its
    (file index, document number in the file), from a {m}_corpus.json record."""
    starts, where = [], []
    for fi, f in enumerate(record["files"]):
        if not isinstance(f.get("first_token"), int) or not isinstance(f.get("document_starts"), list):
            raise PipelineError(f"the corpus record does not say where {f.get('path')}'s documents start (written by "
                                f"an older version?): rerun stage b")
        for k, s in enumerate(f["document_starts"]):
            starts.append(f["first_token"] + s)
            where.append((fi, k))
    return np.array(starts, np.int64), where


def locate(record: dict, sample_ids) -> list[tuple[str, int, int]]:
    """(file, document number in the file from 0, token offset in the document) of corpus-mode sample ids (global
    token positions), from a {m}_corpus.json record."""
    starts, where = document_starts(record)
    out = []
    for s in np.asarray(sample_ids, np.int64).ravel():
        if not 0 <= s < record["tokens"]:
            raise PipelineError(f"sample {s} is outside the corpus's {record['tokens']} tokens")
        d = int(np.searchsorted(starts, s, side="right")) - 1
        fi, k = where[d]
        out.append((record["files"][fi]["path"], k, int(s - starts[d])))
    return out


def window_tokens(record: dict, tokenizer, windows) -> dict[int, np.ndarray]:
    """
    The token ids of corpus-mode windows (numbers), each followed by the token after it where the corpus has
    one, re-read from the files a {m}_corpus.json record names: only the documents the windows overlap are
    tokenized. A file whose sha256 differs from the record's is refused.
    """
    context, total = int(record["context"]), int(record["tokens"])
    eot = tokenizer.eos_token_id
    starts, where = document_starts(record)
    starts = np.append(starts, total)
    spans = {int(w): (int(w) * context, min((int(w) + 1) * context + 1, total)) for w in windows}
    needed = sorted({d for lo, hi in spans.values()
                     for d in range(int(np.searchsorted(starts, lo, side="right")) - 1,
                                    int(np.searchsorted(starts, hi, side="left")))})
    docs = {}
    for fi in sorted({where[d][0] for d in needed}):
        f = record["files"][fi]
        p = Path(f["path"])
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise PipelineError(f"cannot read {p}, which stage b read: {e.strerror}") from None
        if hashlib.sha256(raw).hexdigest() != f["sha256"]:
            raise PipelineError(f"{p} changed since stage b read it (its sha256 differs)")
        texts = read_documents(p, raw)
        mine = [d for d in needed if where[d][0] == fi]
        for d, ids in zip(mine, tokenizer([texts[where[d][1]] for d in mine], verbose=False)["input_ids"]):
            n, expected = len(ids) + 1, starts[d + 1] - starts[d]
            if n != expected and not (d == len(where) - 1 and n > expected):  # the last may be cut by --max_tokens
                raise PipelineError(f"{p}: document {where[d][1] + 1} no longer tokenizes as stage b read it")
            docs[d] = np.array(ids + [eot], np.int64)
    out = {}
    for w, (lo, hi) in spans.items():
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        pieces, d = [], first
        while d < len(where) and starts[d] < hi:
            pieces.append(docs[d][max(lo - starts[d], 0):hi - starts[d]])
            d += 1
        out[w] = np.concatenate(pieces)
    return out


# --- shards and windows ------------------------------------------------------------------------------------
def parse_shard(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise PipelineError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise PipelineError(f"--shard {spec}: need 0 <= I < N")
    return i, n


def num_windows(n_tokens: int, context: int) -> int:
    return -(-n_tokens // context)


def shard_windows(n_windows: int, shard: tuple[int, int] | None) -> np.ndarray:
    i, n = shard or (0, 1)
    return np.arange(i, n_windows, n)


def plan(windows: np.ndarray, n_tokens: int, context: int, batch_size: int) -> list[np.ndarray]:
    """Batches of window indices; a shorter (last) window runs alone, so every batch is one rectangle."""
    full = windows[(windows + 1) * context <= n_tokens]
    batches = [full[k:k + batch_size] for k in range(0, len(full), batch_size)]
    return batches + [windows[[len(full)]]] if len(full) < len(windows) else batches


# --- streaming ------------------------------------------------------------------------------------------------
class CountingHooks(GeluHooks):
    """Forward hooks on every GELU that add each call's (rows x d_mlp) outputs to `counts`; with `keep_rows`
    they also keep the batch's active rows bit-packed (`take_packed`); with `top` (a RunningTopK) they feed it
    the values under `sample_ids`, the batch's rows' global token positions."""

    def __init__(self, model, counts: CoactivationCounts, keep_rows: bool = False, top: RunningTopK | None = None):
        super().__init__(model)
        self.counts, self.keep_rows, self.top = counts, keep_rows, top
        self.layers = []
        self.sample_ids = None

    def _hook(self, layer):
        def hook(module, inputs, output):
            values = output.reshape(-1, output.shape[-1])
            active = values > 0
            self.counts.add_layer(layer, values, active)
            if self.top is not None:
                self.top.add(layer, values, self.sample_ids)
            if self.keep_rows:
                self.layers.append(active.cpu())
        return hook

    def take_packed(self) -> np.ndarray:
        rows = torch.cat(self.layers, dim=1).numpy()
        self.layers = []
        return np.packbits(rows, axis=1)


def run_batch(model, x: torch.Tensor):
    run_trunk(model, x)


class Checkpoints:
    """
    The totals of an unfinished run in `<export_dir>/.{m}_corpus_partial/`, one set per shard: `state_I_N.json`
    (fingerprint, batches done, packed-row files) and `counts_I_N.npz`, rewritten atomically at most every
    `interval` seconds. `--resume` continues after the last checkpoint of a run with the same fingerprint.
    """

    def __init__(self, export_dir, m: str, fingerprint: str, shard: tuple[int, int] | None, interval: float):
        self.dir = sf.path(export_dir, sf.CORPUS_PARTIAL_DIR, m)
        i, n = shard or (0, 1)
        self.tag = f"{i}_{n}"
        self.fingerprint, self.interval = fingerprint, interval
        self.state_file = self.dir / f"state_{self.tag}.json"
        self.counts_file = self.dir / f"counts_{self.tag}.npz"
        self.last = time.monotonic()
        self.packed_files: list[str] = []

    def start(self, resume: bool, counts: CoactivationCounts, top: RunningTopK | None
              ) -> tuple[CoactivationCounts, int, list]:
        """The totals to go on from (`top` is loaded in place), the batches done and the packed rows kept."""
        if resume and self.state_file.is_file():
            state = json.loads(self.state_file.read_text())
            if state.get("fingerprint") != self.fingerprint:
                raise PipelineError(f"--resume: the unfinished run in {self.dir} read other text or used other "
                                    f"settings (model, context, max_tokens, batch size, shard, top_examples); rerun "
                                    f"without --resume")
            self.packed_files = state["packed"]
            packed = [np.load(self.dir / f, allow_pickle=False) for f in self.packed_files]
            loaded = CoactivationCounts.load(self.counts_file, counts.device)
            if top is not None:
                try:
                    with np.load(self.counts_file, allow_pickle=False) as z:
                        top.load(z["top_values"], z["top_ids"])
                except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
                    raise PipelineError(f"cannot read checkpoint {self.counts_file}: {e}") from None
            return loaded, state["batches_done"], packed
        self._remove()
        self.dir.mkdir(parents=True, exist_ok=True)
        return counts, 0, []

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval

    def save(self, counts: CoactivationCounts, top: RunningTopK | None, batches_done: int,
             new_packed: list[np.ndarray]):
        if new_packed:
            name = f"packed_{self.tag}_{len(self.packed_files):05d}.npy"
            sf.write_npy(np.concatenate(new_packed), self.dir / name)
            self.packed_files.append(name)
        extra = dict(zip(("top_values", "top_ids"), top.result())) if top is not None else {}
        counts.save(self.counts_file, **extra)
        sf.write_json({"fingerprint": self.fingerprint, "batches_done": batches_done, "packed": self.packed_files},
                      self.state_file)
        self.last = time.monotonic()

    def _remove(self):
        """This process's files; another torchrun process may remove the directory meanwhile."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        mine = (self.state_file.name, self.counts_file.name)
        for name in names:
            if name in mine or fnmatch.fnmatch(name, f"packed_{self.tag}_*.npy"):
                (self.dir / name).unlink(missing_ok=True)

    def finish(self):
        self._remove()
        try:  # the last process of a torchrun group to finish removes the directory
            self.dir.rmdir()
        except OSError:
            pass


def stream(model, tokens: np.ndarray, batches: list[np.ndarray], context: int, counts: CoactivationCounts,
           top: RunningTopK | None, checkpoints: Checkpoints, start: int, packed: list | None, progress=None):
    """Run the batches from `start` on, adding to `counts` and `top` (and appending packed rows to `packed`)."""
    device = next(model.parameters()).device
    ids = torch.from_numpy(tokens.astype(np.int64))
    unsaved = []
    with CountingHooks(model, counts, keep_rows=packed is not None, top=top) as hooks:
        for b in range(start, len(batches)):
            w = batches[b]
            lo = int(w[0]) * context
            length = min(context, len(tokens) - lo)
            x = torch.stack([ids[int(k) * context:int(k) * context + length] for k in w]).to(device)
            if top is not None:
                hooks.sample_ids = (torch.from_numpy(w.astype(np.int64)).view(-1, 1) * context
                                    + torch.arange(length)).view(-1).to(device)
            run_batch(model, x)
            if packed is not None:
                unsaved.append(hooks.take_packed())
            if progress is not None:
                progress.update(x.numel())
            if checkpoints.due() and b + 1 < len(batches):
                checkpoints.save(counts, top, b + 1, unsaved)
                if packed is not None:
                    packed += unsaved
                unsaved = []
    if packed is not None:
        packed += unsaved


def gather_top(top: RunningTopK, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every torchrun process's top k merged (on every process): each pads its own to k rows, as all_gather
    wants equal shapes, and the padding (value -inf, the largest id) sorts last and is dropped."""
    import torch.distributed as dist

    values, ids = top.result()
    pad = k - len(values)
    v = torch.from_numpy(np.pad(values, ((0, pad), (0, 0)), constant_values=-np.inf)).to(top.device)
    i = torch.from_numpy(np.pad(ids, ((0, pad), (0, 0)), constant_values=np.iinfo(np.int64).max)).to(top.device)
    vs, iss = [torch.empty_like(v) for _ in range(dist.get_world_size())], [torch.empty_like(i) for _ in
                                                                             range(dist.get_world_size())]
    dist.all_gather(vs, v)
    dist.all_gather(iss, i)
    values, ids = merge_top([(a.cpu().numpy(), b.cpu().numpy()) for a, b in zip(vs, iss)], k)
    keep = (ids != np.iinfo(np.int64).max).all(axis=1)
    return values[keep], ids[keep]


def top_examples_text(ids: np.ndarray, tokens: np.ndarray, context: int, tokenizer) -> dict:
    """(context, token) of every sample among the top examples: up to CONTEXT_TOKENS tokens of the sample's
    window ending at (and including) its position, and the token at the position."""
    text = {}
    for s in np.unique(ids).tolist():
        lo = max(s - sf.CONTEXT_TOKENS + 1, (s // context) * context)
        text[s] = (tokenizer.decode(tokens[lo:s + 1].tolist()), tokenizer.decode([int(tokens[s])]))
    return text


# --- outputs -------------------------------------------------------------------------------------------------
def write_corpus_dataset(export_dir, m: str, counts: CoactivationCounts, record: dict, packed: np.ndarray | None,
                         site: dict | None = None, top_examples: tuple | None = None):
    """
    Every file of a corpus-mode dataset directory; the corpus record last, as the mark of a finished run.
    top_examples: (values, sample ids, texts), as sf.write_top_examples takes them.
    """
    n_layer, d_mlp = counts.n_layer, counts.d_mlp
    manifest = sf.path(export_dir, sf.DATASET_MANIFEST, m)
    run = sf.begin_output_set(manifest)
    sf.path(export_dir, sf.CORPUS, m).unlink(missing_ok=True)
    sf.write_graph_files_if_stale(export_dir, m, n_layer, d_mlp, write_el=False, site=site)
    value_sum = counts.value_sum.cpu().numpy()
    sf.write_csv(sf.frequency_table(counts.node_counts(), value_sum, counts.samples, d_mlp),
                 sf.path(export_dir, sf.FREQUENCY, m))
    if packed is not None:
        sf.write_packed_activation_matrix(sf.path(export_dir, sf.MATRIX, m), packed, n_layer * d_mlp)
    if top_examples is not None:
        sf.write_top_examples(sf.path(export_dir, sf.TOP_EXAMPLES, m), *top_examples)
    else:
        sf.path(export_dir, sf.TOP_EXAMPLES, m).unlink(missing_ok=True)
    source = {"input_dir": str(Path(export_dir).resolve()), "corpus": sf.CORPUS.format(m=m)}
    co.write_count_store(sf.path(export_dir, sf.WEIGHTED_GRAPH, m), m, n_layer, d_mlp, counts.samples,
                         counts.node_counts(), source, pair_counts=counts.pair_counts)
    sf.write_json(record, sf.path(export_dir, sf.CORPUS, m), indent=2)
    written = ((sf.FREQUENCY, sf.ATTRIBUTES, sf.GRAPH_META, sf.CORPUS) + ((sf.MATRIX,) if packed is not None else ())
               + ((sf.TOP_EXAMPLES,) if top_examples is not None else ()))
    sf.commit_output_set(manifest, run, [sf.path(export_dir, f, m) for f in written])


def corpus_record(m: str, model_path, corpus: Corpus, context: int, max_tokens, shard, windows: int,
                  shard_windows_: int, samples: int, n_layer: int, d_mlp: int, top_examples: int) -> dict:
    return {"format": CORPUS_FORMAT, "version": CORPUS_VERSION, "model": m, "model_path": str(model_path),
            "n_layer": n_layer, "d_mlp": d_mlp, **corpus.record(), "max_tokens": max_tokens,
            "tokens": int(len(corpus.ids)), "context": context, "windows": windows,
            "shard": None if shard is None else {"index": shard[0], "count": shard[1], "windows": shard_windows_},
            "samples": samples, "top_examples": top_examples}


# --- torchrun ------------------------------------------------------------------------------------------------
def distributed() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun (or any launcher that sets its variables)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


# --- the whole run -------------------------------------------------------------------------------------------
@dataclass
class CorpusSettings:
    """Stage b's corpus-mode flags that shape a run (and its resume fingerprint, all but checkpoint_seconds)."""
    context: int | None = None  # tokens per window; None: the model's context
    max_tokens: int | None = None
    batch_size: int | None = None  # windows per forward pass; None: about TOKENS_PER_BATCH tokens' worth
    save_matrix: bool = False
    shard: str | None = None  # "I/N"
    top_examples: int = 10
    resume: bool = False
    checkpoint_seconds: float = 300.0


def check_settings(s: CorpusSettings, dist_ctx) -> tuple[int, int] | None:
    """The shard to run; bad settings raise before any heavy work."""
    shard = parse_shard(s.shard)
    if dist_ctx is not None and shard is not None:
        raise PipelineError("--shard cannot be combined with torchrun: each torchrun process already streams "
                            "its own shard")
    if dist_ctx is not None and s.save_matrix:
        raise PipelineError("--save_matrix needs a single process (the matrix holds every sample in corpus "
                            "order); run without torchrun or use --shard")
    for flag, value in (("--max_tokens", s.max_tokens), ("--batch_size", s.batch_size)):
        if value is not None and value < 1:
            raise PipelineError(f"{flag} must be >= 1, got {value}")
    if s.top_examples < 0:
        raise PipelineError(f"--top_examples must be >= 0, got {s.top_examples}")
    if s.checkpoint_seconds < 0:
        raise PipelineError("--checkpoint_minutes must be >= 0")
    return shard


def run_corpus_mode(inputs: list[str], export_dir, model_type: str, device: str, settings: CorpusSettings
                    ) -> dict | None:
    """Stage b over a corpus; returns the corpus record (None on the torchrun ranks that do not write)."""
    from gelutrace.loading import load_model
    from gelutrace.recording import fingerprint

    s = settings
    dist_ctx = distributed()
    shard = check_settings(s, dist_ctx)
    if dist_ctx is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(dist_ctx[2])
    lm = load_model(model_type, device)
    cfg = lm.model.config
    context = cfg.block_size if s.context is None else s.context
    if not 1 <= context <= cfg.block_size:
        raise PipelineError(f"--context {context} is outside 1..{cfg.block_size}, the model's context")
    batch_size = s.batch_size or max(1, TOKENS_PER_BATCH // context)
    corpus = read_corpus(inputs, lm.tokenizer, s.max_tokens)
    if s.top_examples and len(corpus.ids) > TOP_EXAMPLES_MAX_TOKENS:
        raise PipelineError(f"--top_examples keeps sample ids below 2**32, but the corpus has {len(corpus.ids):,} "
                            f"tokens: give --top_examples 0 or --max_tokens {TOP_EXAMPLES_MAX_TOKENS}")
    rank = 0
    if dist_ctx is not None:
        init_distributed(lm.device)
        rank, world, _ = dist_ctx
        shard = (rank, world)

    export = sf.check_output_dir(export_dir, "--export_dir")
    if rank == 0:  # the other ranks write into the same directory as part of the same run
        sf.lock_directory(export, "stage b (corpus mode)")
    export.mkdir(parents=True, exist_ok=True)
    n_win = num_windows(len(corpus.ids), context)
    windows = shard_windows(n_win, shard)
    batches = plan(windows, len(corpus.ids), context, batch_size)
    fp = fingerprint([f["sha256"] for f in corpus.files], lm.name, str(lm.path.resolve()), vars(cfg), context,
                     s.max_tokens, batch_size, shard, s.save_matrix, s.top_examples)
    checkpoints = Checkpoints(export, lm.name, fp, shard, s.checkpoint_seconds)
    top = RunningTopK(cfg.n_layer, cfg.d_mlp, s.top_examples, lm.device) if s.top_examples else None
    counts, start, packed = checkpoints.start(s.resume, CoactivationCounts(cfg.n_layer, cfg.d_mlp, lm.device), top)
    if start:
        print(f"resuming after batch {start} of {len(batches)}")
    sizes = [len(b) * min(context, len(corpus.ids) - int(b[0]) * context) for b in batches]
    with torch.no_grad(), tqdm(total=sum(sizes), initial=sum(sizes[:start]), unit="tok", unit_scale=True,
                               desc="reading", disable=rank != 0) as bar:
        stream(lm.model, corpus.ids, batches, context, counts, top, checkpoints, start,
               packed if s.save_matrix else None, bar)
    best = None
    if dist_ctx is not None:
        counts.all_reduce()
        best = gather_top(top, s.top_examples) if top is not None else None
        shard = None
    elif top is not None:
        best = top.result()
    record = corpus_record(lm.name, lm.path, corpus, context, s.max_tokens, shard, n_win, len(windows),
                           counts.samples, cfg.n_layer, cfg.d_mlp, s.top_examples)
    if rank == 0:
        matrix = (np.concatenate(packed) if packed else np.zeros((0, (cfg.n_layer * cfg.d_mlp + 7) // 8), np.uint8)
                  ) if s.save_matrix else None
        top_examples = (*best, top_examples_text(best[1], corpus.ids, context, lm.tokenizer)) if best else None
        write_corpus_dataset(export, lm.name, counts, record, matrix, lm.site, top_examples)
    if dist_ctx is not None:
        import torch.distributed as dist
        dist.barrier()
    checkpoints.finish()
    if dist_ctx is not None:
        dist.destroy_process_group()
    return record if rank == 0 else None
