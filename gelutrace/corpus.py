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

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace import coactivation as co
from gelutrace import stagefiles as sf
from gelutrace.shards import CORPUS_FORMAT, CORPUS_VERSION
from gelutrace.statistics import CoactivationCounts

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKENS_PER_BATCH = 4096  # the default batch: as many windows as hold about this many tokens


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
        docs.append(rec["text"])
    if not docs:
        raise PipelineError(f"{p} holds no documents")
    return docs


@dataclass
class Corpus:
    ids: np.ndarray  # every token, documents concatenated, each followed by end-of-text
    files: list[dict] = field(default_factory=list)  # path, sha256, documents, tokens
    documents: int = 0

    def record(self) -> dict:
        return {"files": self.files, "documents": self.documents,
                "tokens_read": int(sum(f["tokens"] for f in self.files))}


def read_corpus(inputs: list[str], tokenizer, max_tokens: int | None = None) -> Corpus:
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
        files.append({"path": str(p), "sha256": hashlib.sha256(raw).hexdigest(), "documents": len(docs),
                      "tokens": tokens})
        documents += len(docs)
        for ids in encoded:
            if max_tokens is None or total < max_tokens:
                parts.append(np.array(ids + [eot], dtype=dtype))
                total += len(ids) + 1
    ids = np.concatenate(parts)
    return Corpus(ids[:max_tokens] if max_tokens is not None else ids, files, documents)


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
class CountingHooks:
    """Forward hooks on every GELU that add each call's (rows x d_mlp) outputs to `counts`; with `keep_rows`
    they also keep the batch's active rows bit-packed (`take_packed`)."""

    def __init__(self, model, counts: CoactivationCounts, keep_rows: bool = False):
        self.model, self.counts, self.keep_rows = model, counts, keep_rows
        self.layers, self.handles = [], []

    def _hook(self, layer):
        def hook(module, inputs, output):
            values = output.reshape(-1, output.shape[-1])
            active = values > 0
            self.counts.add_layer(layer, values, active)
            if self.keep_rows:
                self.layers.append(active.cpu())
        return hook

    def take_packed(self) -> np.ndarray:
        rows = torch.cat(self.layers, dim=1).numpy()
        self.layers = []
        return np.packbits(rows, axis=1)

    def __enter__(self):
        self.handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.model.gelus())]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def run_batch(model, x: torch.Tensor):
    (model.trunk if hasattr(model, "trunk") else model)(x)  # model.py stops before the logits


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

    def start(self, resume: bool, counts: CoactivationCounts) -> tuple[CoactivationCounts, int, list]:
        if resume and self.state_file.is_file():
            state = json.loads(self.state_file.read_text())
            if state.get("fingerprint") != self.fingerprint:
                raise PipelineError(f"--resume: the unfinished run in {self.dir} read other text or used other "
                                    f"settings (model, context, max_tokens, batch size, shard); rerun without --resume")
            self.packed_files = state["packed"]
            packed = [np.load(self.dir / f, allow_pickle=False) for f in self.packed_files]
            return CoactivationCounts.load(self.counts_file, counts.device), state["batches_done"], packed
        self._remove()
        self.dir.mkdir(parents=True, exist_ok=True)
        return counts, 0, []

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval

    def save(self, counts: CoactivationCounts, batches_done: int, new_packed: list[np.ndarray]):
        if new_packed:
            name = f"packed_{self.tag}_{len(self.packed_files):05d}.npy"
            sf.write_npy(np.concatenate(new_packed), self.dir / name)
            self.packed_files.append(name)
        counts.save(self.counts_file)
        sf.write_json({"fingerprint": self.fingerprint, "batches_done": batches_done, "packed": self.packed_files},
                      self.state_file)
        self.last = time.monotonic()

    def _remove(self):
        for pattern in (self.state_file.name, self.counts_file.name, f"packed_{self.tag}_*.npy"):
            for f in self.dir.glob(pattern):
                f.unlink()

    def finish(self):
        self._remove()
        try:  # the last process of a torchrun group to finish removes the directory
            self.dir.rmdir()
        except OSError:
            pass


def stream(model, tokens: np.ndarray, batches: list[np.ndarray], context: int, counts: CoactivationCounts,
           checkpoints: Checkpoints, start: int, packed: list | None, progress=None):
    """Run the batches from `start` on, adding to `counts` (and appending packed rows to `packed` if given)."""
    device = next(model.parameters()).device
    ids = torch.from_numpy(tokens.astype(np.int64))
    unsaved = []
    with CountingHooks(model, counts, keep_rows=packed is not None) as hooks:
        for b in range(start, len(batches)):
            w = batches[b]
            lo = int(w[0]) * context
            length = min(context, len(tokens) - lo)
            x = torch.stack([ids[int(k) * context:int(k) * context + length] for k in w]).to(device)
            run_batch(model, x)
            if packed is not None:
                unsaved.append(hooks.take_packed())
            if progress is not None:
                progress.update(x.numel())
            if checkpoints.due() and b + 1 < len(batches):
                checkpoints.save(counts, b + 1, unsaved)
                if packed is not None:
                    packed += unsaved
                unsaved = []
    if packed is not None:
        packed += unsaved


# --- outputs -------------------------------------------------------------------------------------------------
def write_corpus_dataset(export_dir, m: str, counts: CoactivationCounts, record: dict, packed: np.ndarray | None,
                         site: dict | None = None):
    """Every file of a corpus-mode dataset directory; the corpus record last, as the mark of a finished run."""
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
    source = {"input_dir": str(Path(export_dir).resolve()), "corpus": sf.CORPUS.format(m=m)}
    co.write_count_store(sf.path(export_dir, sf.WEIGHTED_GRAPH, m), m, n_layer, d_mlp, counts.samples,
                         counts.node_counts(), source, pair_counts=counts.pair_counts)
    sf.write_json(record, sf.path(export_dir, sf.CORPUS, m), indent=2)
    written = (sf.FREQUENCY, sf.ATTRIBUTES, sf.GRAPH_META, sf.CORPUS) + ((sf.MATRIX,) if packed is not None else ())
    sf.commit_output_set(manifest, run, [sf.path(export_dir, f, m) for f in written])


def corpus_record(m: str, model_path, corpus: Corpus, context: int, max_tokens, shard, windows: int,
                  shard_windows_: int, samples: int, n_layer: int, d_mlp: int) -> dict:
    return {"format": CORPUS_FORMAT, "version": CORPUS_VERSION, "model": m, "model_path": str(model_path),
            "n_layer": n_layer, "d_mlp": d_mlp, **corpus.record(), "max_tokens": max_tokens,
            "tokens": int(len(corpus.ids)), "context": context, "windows": windows,
            "shard": None if shard is None else {"index": shard[0], "count": shard[1], "windows": shard_windows_},
            "samples": samples}


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
def run_corpus_mode(inputs: list[str], export_dir, model_type: str, device: str, context: int | None,
                    max_tokens: int | None, batch_size: int | None, save_matrix: bool, resume: bool,
                    shard_spec: str | None, checkpoint_seconds: float) -> dict | None:
    """Stage b over a corpus; returns the corpus record (None on the torchrun ranks that do not write)."""
    from gelutrace.loading import load_model
    from gelutrace.recording import fingerprint

    shard = parse_shard(shard_spec)
    dist_ctx = distributed()
    if dist_ctx is not None and shard is not None:
        raise PipelineError("--shard cannot be combined with torchrun: each torchrun process already streams "
                            "its own shard")
    if dist_ctx is not None and save_matrix:
        raise PipelineError("--save_matrix needs a single process (the matrix holds every sample in corpus "
                            "order); run without torchrun or use --shard")
    if max_tokens is not None and max_tokens < 1:
        raise PipelineError(f"--max_tokens must be >= 1, got {max_tokens}")
    if batch_size is not None and batch_size < 1:
        raise PipelineError(f"--batch_size must be >= 1, got {batch_size}")
    if checkpoint_seconds < 0:
        raise PipelineError("--checkpoint_minutes must be >= 0")
    if dist_ctx is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(dist_ctx[2])
    lm = load_model(model_type, device)
    cfg = lm.model.config
    context = cfg.block_size if context is None else context
    if not 1 <= context <= cfg.block_size:
        raise PipelineError(f"--context {context} is outside 1..{cfg.block_size}, the model's context")
    batch_size = batch_size or max(1, TOKENS_PER_BATCH // context)
    corpus = read_corpus(inputs, lm.tokenizer, max_tokens)
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
                     max_tokens, batch_size, shard, save_matrix)
    checkpoints = Checkpoints(export, lm.name, fp, shard, checkpoint_seconds)
    counts, start, packed = checkpoints.start(resume, CoactivationCounts(cfg.n_layer, cfg.d_mlp, lm.device))
    if start:
        print(f"resuming after batch {start} of {len(batches)}")
    sizes = [len(b) * min(context, len(corpus.ids) - int(b[0]) * context) for b in batches]
    with torch.no_grad(), tqdm(total=sum(sizes), initial=sum(sizes[:start]), unit="tok", unit_scale=True,
                               desc="reading", disable=rank != 0) as bar:
        stream(lm.model, corpus.ids, batches, context, counts, checkpoints, start,
               packed if save_matrix else None, bar)
    if dist_ctx is not None:
        counts.all_reduce()
        shard = None
    record = corpus_record(lm.name, lm.path, corpus, context, max_tokens, shard, n_win, len(windows),
                           counts.samples, cfg.n_layer, cfg.d_mlp)
    if rank == 0:
        matrix = (np.concatenate(packed) if packed else np.zeros((0, (cfg.n_layer * cfg.d_mlp + 7) // 8), np.uint8)
                  ) if save_matrix else None
        write_corpus_dataset(export, lm.name, counts, record, matrix, lm.site)
    if dist_ctx is not None:
        import torch.distributed as dist
        dist.barrier()
    checkpoints.finish()
    if dist_ctx is not None:
        dist.destroy_process_group()
    return record if rank == 0 else None
