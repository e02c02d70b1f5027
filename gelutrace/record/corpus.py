"""
Stage b's corpus mode: documents -> tokens -> windows -> exact streamed statistics.

The files and their documents are gelutrace.files.corpusfiles': a `.txt` file (or `.txt.gz`, `.txt.zst`) is one
document; a `.jsonl` file (or `.jsonl.gz`, `.json.gz`, `.jsonl.zst`) one per line in the field --text_field, a
`.parquet` or `.arrow` file one per row in that column; a directory is its files sorted by name, or a
`datasets.save_to_disk` directory its `.arrow` files in its order. Each document is tokenized alone (a long one
in checked pieces, see DocumentTokenizer) and followed by the tokenizer's end-of-text token; the documents are
concatenated in order and cut into consecutive, non-overlapping windows of `context` tokens (the last, shorter
window is kept). Every position of every window is one sample: the post-GELU outputs there, teacher-forced,
are the ones behind predicting the next token. Shard I of N takes windows I, I + N, I + 2N, ...

Batches of windows run through the model with hooks on every GELU that feed `CoactivationCounts` and drop
the batch; only the totals (and, with save_matrix, the bit-packed rows) are kept.
"""

import contextlib
import fnmatch
import hashlib
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.files import atomic, formats, layout
from gelutrace.files import resumestate as rs
from gelutrace.files.corpusfiles import DEFAULT_FIELD, corpus_files, file_documents, file_record, record_documents
from gelutrace.files.layout import CORPUS_FORMAT, CORPUS_VERSION
from gelutrace.graph import store as gs
from gelutrace.graph.counts import CoactivationCounts, RunningTopK, merge_top
from gelutrace.model.hooks import GeluHooks
from gelutrace.model.loading import load_model
from gelutrace.model.sites import run_trunk
from gelutrace.record.attribution import CorpusAttribution
from gelutrace.record.direct import DirectEdges, DirectHooks, corpus_targets, direct_totals
from gelutrace.record.prompts import fingerprint

TOKENS_PER_BATCH = 4096  # the default batch: as many windows as hold about this many tokens
TOP_EXAMPLES_MAX_TOKENS = 2 ** 32  # RunningTopK's sample ids (global token positions) stay below this


# --- documents and tokens ----------------------------------------------------------------------------------
PIECE_CHARS = 1 << 16  # a longer document is tokenized in pieces of about this many characters,
PIECES_PER_CALL = 8  # this many per tokenizer call (its working memory is about 150 bytes per character)
CUT_CHECK_CHARS = 512  # the text either side of a cut that is tokenized again to check the cut
CUT_TRIES = 8  # cut points checked of each kind (whitespace, other word boundaries, last characters) in turn
_SPACE_CUT = re.compile(r"\s(?=\S)")  # just before the last character of a whitespace run
_WORD_CUT = re.compile(r"\b")  # between a word character and another


def _head(doc: Iterable[str], n: int) -> tuple[str, Iterator[str] | None]:
    """A document's text up to past n characters, and the rest of its pieces (None when that was all of it)."""
    rest, parts, size = iter(doc), [], 0
    for part in rest:
        parts.append(part)
        size += len(part)
        if size > n:
            return "".join(parts), rest
    return "".join(parts), None


def _special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a text (e.g. Llama's <s>; none for GPT-2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise PipelineError("cannot tell which special tokens the tokenizer adds around a text")


class DocumentTokenizer:
    """
    The token ids of documents, each as the tokenizer gives them for its whole text, in memory bounded by the
    pieces tokenized at a time, never by a document's length. Short documents are tokenized together; a document
    longer than piece_chars x PIECES_PER_CALL characters in pieces of about piece_chars. A piece ends where
    tokenizing the two sides apart gives the same tokens as tokenizing them together, which is checked for every
    cut by tokenizing the CUT_CHECK_CHARS either side of it both ways. Cuts are tried in the second half of the
    piece: first just before the last character of a whitespace run (where GPT-2's pre-tokenizer always splits:
    a word takes the one space before it), then at the other word boundaries, then at the piece's last few
    characters (inside one long "word", where a cut at a token boundary can still pass). Where none passes, the
    piece is cut at its end anyway, its tokens there may differ from the whole text's, and the cut is counted
    in `unchecked_cuts`.
    """

    def __init__(self, tokenizer, piece_chars: int | None = None):
        self.tok, self.piece = tokenizer, piece_chars or PIECE_CHARS
        self.batch_chars = self.piece * PIECES_PER_CALL
        self.dtype = np.uint16 if len(tokenizer) <= 2 ** 16 else np.int32
        self.prefix, self.suffix = (np.array(x, self.dtype) for x in _special_ends(tokenizer))
        self.unchecked_cuts = 0

    def _ids(self, texts: list[str], special: bool) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=special, verbose=False)["input_ids"] if texts else []

    def documents(self, docs: Iterable[Iterable[str]], limit: int | None = None) -> Iterator[np.ndarray]:
        """Each document's ids, in order, until `limit` tokens are had, counting one end-of-text token after each
        document: the document that reaches the limit is the last one yielded, and the documents after it are not
        read. Short documents wait to be tokenized together until they may reach the limit, counting each at
        most its UTF-8 bytes and the special tokens around it (a byte-level BPE token holds at least one byte)."""
        pending, chars, bound, total = [], 0, 0, 0
        extra = len(self.prefix) + len(self.suffix) + 1  # the special tokens around a document, its end-of-text

        def flush():
            nonlocal total
            for ids in self._ids(pending, True):
                if limit is not None and total >= limit:
                    return
                total += len(ids) + 1
                yield np.array(ids, self.dtype)

        docs = iter(docs)
        while limit is None or total < limit:
            if pending and limit is not None and total + bound >= limit:
                yield from flush()  # reading another document might read past the limit
                pending, chars, bound = [], 0, 0
                continue
            doc = next(docs, None)
            if doc is None:
                break
            text, rest = _head(doc, self.batch_chars)
            if rest is None:
                pending.append(text)
                chars += len(text)
                bound += (len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))) + extra
                if chars < self.batch_chars:
                    continue
            yield from flush()
            pending, chars, bound = [], 0, 0
            if rest is not None and (limit is None or total < limit):
                ids, _ = self._pieces(text, rest, None if limit is None else limit - total)
                total += len(ids) + 1
                yield ids
        yield from flush()

    def document(self, doc: Iterable[str], limit: int | None = None) -> tuple[np.ndarray, bool]:
        """One document's ids, and whether it was read to its end: it stops once it has `limit` tokens."""
        text, rest = _head(doc, self.batch_chars)
        if rest is None:
            return np.array(self._ids([text], True)[0], self.dtype), True
        return self._pieces(text, rest, limit)

    def _pieces(self, buf: str, rest: Iterator[str], limit: int | None) -> tuple[np.ndarray, bool]:
        out, pieces, n, pos, ended = [self.prefix], [], 0, 0, False
        while True:
            if not ended and len(buf) - pos <= self.piece + CUT_CHECK_CHARS:
                part = next(rest, None)
                ended = part is None
                if not ended:
                    buf, pos = buf[pos:] + part, 0
                continue
            last = len(buf) - pos <= self.piece + CUT_CHECK_CHARS
            cut = len(buf) if last else self._cut(buf, pos)
            pieces.append(buf[pos:cut])
            pos = cut
            if last or len(pieces) == PIECES_PER_CALL:
                for ids in self._ids(pieces, False):
                    out.append(np.array(ids, self.dtype))
                    n += len(ids)
                pieces = []
                if last or (limit is not None and n >= limit):
                    return np.concatenate(out + [self.suffix] if last else out), last

    def _cut(self, buf: str, pos: int) -> int:
        lo, hi = pos + self.piece // 2, pos + self.piece
        tiers = [[m.start() for m in pattern.finditer(buf, lo, hi + 1) if m.start() <= hi]  # hi + 1: see buf[hi]
                 for pattern in (_SPACE_CUT, _WORD_CUT)] + [list(range(max(lo, hi - CUT_TRIES), hi + 1))]
        for found in tiers:
            for cut in reversed(found[-CUT_TRIES:]):
                if cut > pos and self._keeps_tokens(buf, cut):
                    return cut
        self.unchecked_cuts += 1
        return hi

    def _keeps_tokens(self, buf: str, cut: int) -> bool:
        a, b = max(0, cut - CUT_CHECK_CHARS), cut + CUT_CHECK_CHARS
        whole, left, right = self._ids([buf[a:b], buf[a:cut], buf[cut:b]], False)
        return whole == left + right


@dataclass
class Corpus:
    ids: np.ndarray  # every token, documents concatenated, each followed by end-of-text
    files: list[dict] = field(default_factory=list)  # path, format, field, sha256, documents, tokens, first_token,
    # document_starts
    documents: int = 0
    unchecked_cuts: int = 0  # pieces of long documents cut where the tokens could not be checked (DocumentTokenizer)

    def record(self) -> dict:
        return {"files": self.files, "documents": self.documents,
                "tokens_read": int(sum(f["tokens"] for f in self.files))}


def read_corpus(inputs: list[str], tokenizer, max_tokens: int | None = None, flag: str = "--input_text",
                text_field: str = DEFAULT_FIELD) -> Corpus:
    """
    Every file's documents, tokenized (DocumentTokenizer), until --max_tokens: the files and documents after are
    not read. Each file's record holds its format, the field read (None for a text file), its sha256 (of all its
    bytes as stored), the documents read and their tokens in the corpus, where its first token lies in the
    concatenated text (first_token) and where each of its documents read starts, counted from there
    (document_starts).
    """
    if not isinstance(text_field, str) or not text_field:
        raise PipelineError("--text_field must name a field")
    eot = tokenizer.eos_token_id
    if eot is None:
        raise PipelineError("the tokenizer has no end-of-text token to separate documents")
    encoder = DocumentTokenizer(tokenizer)
    end = np.array([eot], encoder.dtype)
    parts, files, total = [], [], 0
    for p in corpus_files(inputs, flag):
        if max_tokens is not None and total >= max_tokens:
            break
        first, starts = total, []
        limit = None if max_tokens is None else max_tokens - total
        for k, ids in enumerate(encoder.documents(file_documents(p, text_field), limit)):
            if not len(ids):
                raise PipelineError(f"{p}: document {k + 1} has no tokens")
            parts += [ids, end]
            starts.append(total - first)
            total += len(ids) + 1
        kept = (total if max_tokens is None else min(total, max_tokens)) - first
        files.append({"path": str(p.resolve()), **file_record(p, text_field), "documents": len(starts),
                      "tokens": kept, "first_token": first, "document_starts": starts})
    ids = np.concatenate(parts)
    return Corpus(ids[:max_tokens] if max_tokens is not None else ids, files, sum(f["documents"] for f in files),
                  encoder.unchecked_cuts)


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
    encoder = DocumentTokenizer(tokenizer)
    docs = {}
    for fi in sorted({where[d][0] for d in needed}):
        f = record["files"][fi]
        p = Path(f["path"])
        try:
            digest = atomic.file_sha256(p)
        except OSError as e:
            raise PipelineError(f"cannot read {p}, which stage b read: {e.strerror}") from None
        if digest != f["sha256"]:
            raise PipelineError(f"{p} changed since stage b read it (its sha256 differs)")
        mine = {where[d][1]: d for d in needed if where[d][0] == fi}
        for k, doc in enumerate(record_documents(f)):
            if k in mine:
                d = mine[k]
                expected = starts[d + 1] - starts[d]
                need = max(hi for lo, hi in spans.values() if lo < starts[d + 1] and hi > starts[d]) - starts[d]
                ids, whole = encoder.document(doc, need)
                # the last document may be cut by --max_tokens
                if whole and len(ids) + 1 != expected and not (d == len(where) - 1 and len(ids) + 1 > expected):
                    raise PipelineError(f"{p}: document {k + 1} no longer tokenizes as stage b read it")
                docs[d] = np.append(ids, eot).astype(np.int64) if whole else ids.astype(np.int64)
            if k >= max(mine):
                break
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
def parse_shard(spec: str | None, flag: str = "--shard") -> tuple[int, int] | None:
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise PipelineError(f"{flag} must look like I/N (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise PipelineError(f"{flag} {spec}: need 0 <= I < N")
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
            values = output.detach().reshape(-1, output.shape[-1])
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
    The totals of an unfinished run in `<export_dir>/.{m}_corpus_partial/`, one set per shard, saved at most every
    `interval` seconds: `counts_I_N_B.npz` (the totals after B batches), with save_matrix `packed_I_N_K.npy` (the
    packed rows of save K), and, written last, `state_I_N.json`, the set's manifest (fingerprint, batches done, the
    files and each one's sha256). A save writes its new files under new names, then the state by one rename, then
    removes the previous counts, so an interruption at any moment leaves one complete set. `--resume` continues
    from it (a run with the same fingerprint) only if every file matches the manifest and every field agrees with
    the run's plan and with the others (gelutrace.files.resumestate, check_checkpoint); anything else is refused.
    """

    STATE_KEYS = {"fingerprint", "batches_done", "counts", "packed", "files"}

    def __init__(self, export_dir, m: str, fingerprint: str, shard: tuple[int, int] | None, interval: float):
        self.dir = layout.path(export_dir, layout.CORPUS_PARTIAL_DIR, m)
        i, n = shard or (0, 1)
        self.tag = f"{i}_{n}"
        self.fingerprint, self.interval = fingerprint, interval
        self.state_file = self.dir / f"state_{self.tag}.json"
        self.counts_file = None  # the counts of the last save
        self.last = time.monotonic()
        self.packed_files: list[str] = []
        self.hashes: dict[str, str] = {}  # sha256 of each packed file

    def counts_name(self, batches_done: int) -> str:
        return f"counts_{self.tag}_{batches_done:05d}.npz"

    def packed_name(self, k: int) -> str:
        return f"packed_{self.tag}_{k:05d}.npy"

    def start(self, resume: bool, counts: CoactivationCounts, top: RunningTopK | None,
              attribution: CorpusAttribution | None = None, direct: DirectEdges | None = None, *,
              batches: list[np.ndarray], context: int, n_tokens: int, save_matrix: bool
              ) -> tuple[CoactivationCounts, int, list]:
        """The totals to go on from (`top`, `attribution` and `direct` are loaded in place), the batches done and
        the packed rows kept; the run's plan (batches of windows of `context` tokens of `n_tokens`) checks them."""
        if resume:
            rs.check_place(self.dir, self.state_file)
        if resume and self.state_file.is_file():
            return self._resume(counts, top, attribution, direct, batches, context, n_tokens, save_matrix)
        if self.dir.is_symlink():  # not ours: the link goes, never the files it points to
            self.dir.unlink(missing_ok=True)
        self._remove()
        self.dir.mkdir(parents=True, exist_ok=True)
        return counts, 0, []

    def _resume(self, counts, top, attribution, direct, batches, context, n_tokens, save_matrix):
        state = rs.read_state(self.state_file, self.STATE_KEYS)
        if state["fingerprint"] != self.fingerprint:
            raise PipelineError(f"--resume: the unfinished run in {self.dir} read other text or used other "
                                f"settings (model, context, max_tokens, batch size, shard, top_examples, "
                                f"attribution, direct_edges, edges); rerun without --resume")
        where = str(self.state_file)
        done = rs.whole(state["batches_done"], f"{where}: batches_done")
        if not 1 <= done < len(batches):
            raise rs.damaged(f"{where}: batches_done is {done}, but this run saves after batch 1 to "
                             f"{len(batches) - 1} of its {len(batches)}")
        packed_files = rs.names(state["packed"], f"{where}: packed")
        for k, name in enumerate(packed_files):
            rs.member(self.dir, name, self.packed_name(k), f"{where}: packed")
        if packed_files and not save_matrix:
            raise rs.damaged(f"{where}: packed rows of a run without --save_matrix")
        counts_name = state["counts"]
        rs.member(self.dir, counts_name, self.counts_name(done), f"{where}: counts")
        rs.verify_files(self.dir, state["files"], packed_files + [counts_name], where)

        self.counts_file = self.dir / counts_name
        arrays = rs.load_npz(self.counts_file)
        packed = [rs.load_npy(self.dir / f) for f in packed_files]
        check_checkpoint(arrays, packed, str(self.counts_file), batches[:done], context, n_tokens, counts, top,
                         attribution, direct, save_matrix)
        loaded = CoactivationCounts(counts.n_layer, counts.d_mlp, counts.device)
        loaded.samples = int(arrays["samples"])
        loaded.node = torch.from_numpy(arrays["node"]).to(loaded.device)
        loaded.value_sum = torch.from_numpy(arrays["value_sum"]).to(loaded.device)
        loaded.pairs = torch.from_numpy(arrays["pairs"]).to(loaded.device)
        if top is not None:
            top.load(arrays["top_values"], arrays["top_ids"])
        if attribution is not None:
            attribution.sum = torch.from_numpy(arrays["attribution_sum"]).to(attribution.sum.device)
            attribution.tokens = int(arrays["attribution_tokens"])
        if direct is not None:
            direct.load_state(arrays, self.counts_file)
        self.packed_files = list(packed_files)
        self.hashes = {f: state["files"][f] for f in packed_files}
        return loaded, done, packed

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.interval

    def save(self, counts: CoactivationCounts, top: RunningTopK | None, batches_done: int,
             new_packed: list[np.ndarray], attribution: CorpusAttribution | None = None,
             direct: DirectEdges | None = None):
        if new_packed:
            name = self.packed_name(len(self.packed_files))
            atomic.write_npy(np.concatenate(new_packed), self.dir / name)
            self.packed_files.append(name)
            self.hashes[name] = atomic.file_sha256(self.dir / name)
        extra = dict(zip(("top_values", "top_ids"), top.result())) if top is not None else {}
        if attribution is not None:
            extra.update(attribution_sum=attribution.sum.cpu().numpy(), attribution_tokens=np.int64(attribution.tokens))
        if direct is not None:
            extra.update(direct.state())
        previous, self.counts_file = self.counts_file, self.dir / self.counts_name(batches_done)
        counts.save(self.counts_file, **extra)
        files = {**{f: self.hashes[f] for f in self.packed_files}, self.counts_file.name: atomic.file_sha256(self.counts_file)}
        atomic.write_json({"fingerprint": self.fingerprint, "batches_done": batches_done, "counts": self.counts_file.name,
                       "packed": self.packed_files, "files": files}, self.state_file)  # the manifest, last
        if previous is not None and previous != self.counts_file:
            previous.unlink(missing_ok=True)
        self.last = time.monotonic()

    def _remove(self):
        """This process's files; another torchrun process may remove the directory meanwhile."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for name in names:
            if name == self.state_file.name or any(fnmatch.fnmatch(name, f"{kind}_{self.tag}{end}") for kind, end in
                                                   (("packed", "_*.npy"), ("counts", "_*.npz"), ("counts", ".npz"))):
                (self.dir / name).unlink(missing_ok=True)

    def finish(self):
        self._remove()
        try:  # the last process of a torchrun group to finish removes the directory
            self.dir.rmdir()
        except OSError:
            pass


def check_checkpoint(arrays: dict, packed: list[np.ndarray], where: str, done: list[np.ndarray], context: int,
                     n_tokens: int, counts: CoactivationCounts, top: RunningTopK | None,
                     attribution: CorpusAttribution | None, direct: DirectEdges | None, save_matrix: bool):
    """
    A checkpoint's arrays against the batches it says are done (`done`, windows of `context` tokens of
    `n_tokens`) and each other: shapes and dtypes; the samples (and direct_samples) equal to those batches'
    tokens, the scored tokens of attribution and direct_loss to their tokens that have a next one in the window;
    0 <= count of a pair <= either neuron's count <= samples; finite sums (and the absolute ones >= 0); each
    neuron's top examples among those batches' positions, in rank order, positive exactly as often as the neuron's
    count allows; the packed rows, one per sample, counting what the counts say.
    """
    L, d = counts.n_layer, counts.d_mlp
    n = L * d
    lengths = [min(context, n_tokens - int(b[0]) * context) for b in done]
    samples = sum(len(b) * t for b, t in zip(done, lengths))
    scored = sum(len(b) * (t - 1) for b, t in zip(done, lengths))
    batches = f"the {len(done)} batches done"
    for key, want in (("n_layer", L), ("d_mlp", d)):
        if rs.scalar(arrays, key, np.int64, where) != want:
            raise rs.damaged(f"{where}: {key} is not the model's {want}")
    got = rs.scalar(arrays, "samples", np.int64, where)
    if got != samples:
        raise rs.damaged(f"{where}: samples is {got}, but {batches} hold {samples}")
    node = rs.array(arrays, "node", (n,), np.int64, where, nonnegative=True)
    if (node > samples).any():
        raise rs.damaged(f"{where}: a neuron is counted active in more than the {samples} samples")
    rs.array(arrays, "value_sum", (n,), np.float64, where, finite=True)
    pairs = rs.array(arrays, "pairs", (max(L - 1, 0), d, d), np.int64, where)
    for i in range(L - 1):
        a, b = node[i * d:(i + 1) * d, None], node[None, (i + 1) * d:(i + 2) * d]
        p = pairs[i]
        if (p < np.maximum(a + b - samples, 0)).any() or (p > np.minimum(a, b)).any():
            raise rs.damaged(f"{where}: pair counts of layers {i} and {i + 1} disagree with the neurons' counts")
    if top is not None:
        k = min(top.k, samples)
        values = rs.array(arrays, "top_values", (k, n), np.float64, where)
        ids = rs.array(arrays, "top_ids", (k, n), np.int64, where)
        w = ids // context  # a window's positions: w * context up to n_tokens or the next window
        if (ids < 0).any() or not np.isin(w, np.concatenate(done)).all() or (ids >= n_tokens).any():
            raise rs.damaged(f"{where}: top_ids name samples outside {batches}")
        # a neuron's top k are positive exactly min(k, its count) times: its largest values, positive where active
        rs.check_top(values, ids, np.arange(k)[:, None] < node[None, :], where)
    if attribution is not None:
        rs.array(arrays, "attribution_sum", (n,), np.float64, where, finite=True)
        got = rs.scalar(arrays, "attribution_tokens", np.int64, where)
        if got != scored:
            raise rs.damaged(f"{where}: attribution_tokens is {got}, but {batches} score {scored}")
    if direct is not None:
        shape = tuple(direct.signed.shape)
        for key, dims, nonneg in (("direct_signed", shape, False), ("direct_absolute", shape, True),
                                  ("direct_loss_sum", (n,), False), ("direct_loss_abs_sum", (n,), True),
                                  ("direct_value_abs_sum", (n,), True)):
            rs.array(arrays, key, dims, np.float64, where, finite=True, nonnegative=nonneg)
        for key, want in (("direct_samples", samples), ("direct_loss_tokens", scored)):
            got = rs.scalar(arrays, key, np.float64, where)
            if got != want:
                raise rs.damaged(f"{where}: {key} is {got:g}, but {batches} hold {want}")
        edges = arrays.get("direct_edges")
        if (tuple(rs.array(arrays, "direct_shape", (2,), np.int64, where)) != (L, d)
                or rs.scalar(arrays, "direct_gated", np.bool_, where) != direct.gated
                or edges is None or edges.dtype.kind != "U" or edges.shape != () or str(edges) != direct.edges):
            raise rs.damaged(f"{where}: direct-effect sums of another model or edge set")
    if save_matrix:
        width = (n + 7) // 8
        for p in packed:
            if p.dtype != np.uint8 or p.ndim != 2 or p.shape[1] != width or not rs.padding_clear(p, n):
                raise rs.damaged(f"{where}: packed rows of another shape")
        rows = sum(len(p) for p in packed)
        if rows != samples:
            raise rs.damaged(f"{where}: {rows} packed rows, but {batches} hold {samples} samples")
        total = np.zeros(n, np.int64)
        for p in packed:
            total += formats.packed_counts(p, n, L)[0]
        if (total != node).any():
            raise rs.damaged(f"{where}: the packed rows disagree with the neurons' counts")


def stream(model, tokens: np.ndarray, batches: list[np.ndarray], context: int, counts: CoactivationCounts,
           top: RunningTopK | None, checkpoints: Checkpoints, start: int, packed: list | None, progress=None,
           attribution: CorpusAttribution | None = None, direct: DirectEdges | None = None):
    """Run the batches from `start` on, adding to `counts`, `top`, `attribution` and `direct` (and appending packed
    rows to `packed`). With attribution, each batch runs in passes of attribution.rows_per_pass windows, forward
    and backward; with direct, every position is a sample and its next token in the window its target."""
    device = next(model.parameters()).device
    ids = torch.from_numpy(tokens.astype(np.int64))
    cfg = model.config
    per_pass = CorpusAttribution.rows_per_pass(context, cfg.vocab_size, cfg.n_layer * cfg.d_mlp)
    unsaved = []
    with CountingHooks(model, counts, keep_rows=packed is not None, top=top) as hooks, \
            (DirectHooks(model, direct) if direct is not None else contextlib.nullcontext()) as direct_hooks:
        for b in range(start, len(batches)):
            w = batches[b]
            lo = int(w[0]) * context
            length = min(context, len(tokens) - lo)
            x = torch.stack([ids[int(k) * context:int(k) * context + length] for k in w]).to(device)
            rows = len(w) if attribution is None else per_pass
            for lo in range(0, len(w), rows):
                if top is not None:
                    hooks.sample_ids = (torch.from_numpy(w[lo:lo + rows].astype(np.int64)).view(-1, 1) * context
                                        + torch.arange(length)).view(-1).to(device)
                part = x[lo:lo + rows]
                if direct is not None:
                    direct_hooks.begin(torch.ones(part.shape, device=device), corpus_targets(part))
                if attribution is None:
                    run_batch(model, part)
                else:
                    attribution.add(model, part)
                if direct is not None:
                    direct_hooks.finish()
            if packed is not None:
                unsaved.append(hooks.take_packed())
            if progress is not None:
                progress.update(x.numel())
            if checkpoints.due() and b + 1 < len(batches):
                checkpoints.save(counts, top, b + 1, unsaved, attribution, direct)
                if packed is not None:
                    packed += unsaved
                unsaved = []
    if packed is not None:
        packed += unsaved


def gather_top(top: RunningTopK, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every torchrun process's top k merged (on every process): each pads its own to k rows, as all_gather
    wants equal shapes, and the padding (value -inf, the largest id) sorts last and is dropped."""
    import torch.distributed as dist  # lazy: only torchrun runs need it

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
        lo = max(s - layout.CONTEXT_TOKENS + 1, (s // context) * context)
        text[s] = (tokenizer.decode(tokens[lo:s + 1].tolist()), tokenizer.decode([int(tokens[s])]))
    return text


# --- outputs -------------------------------------------------------------------------------------------------
def write_corpus_dataset(export_dir, m: str, n_layer: int, d_mlp: int, samples: int, node: np.ndarray,
                         value_sum: np.ndarray, pair_counts, record: dict, packed: np.ndarray | None = None,
                         site: dict | None = None, top_examples: tuple | None = None, what: str = "stage b",
                         attribution: np.ndarray | None = None, causal=None):
    """
    Every file of a corpus-mode dataset directory, from exact totals (node counts, value sums, and pair_counts(i)
    for each layer pair), as one output set (atomic.OutputSet: written beside the earlier files, then swapped in;
    the other files stage b may have left there are removed). The manifest lists every file, the graph store's
    included. top_examples: (values, sample ids, texts), as formats.write_top_examples takes them; attribution: each
    neuron's (CorpusAttribution.mean), or None; causal: the direct-effect weights (gelutrace.graph.coactivation.CausalEdges).
    """
    export_dir = Path(export_dir)
    with atomic.OutputSet(export_dir, layout.path(export_dir, layout.DATASET_MANIFEST, m), layout.dataset_files(m), what) as out:
        written = [layout.FREQUENCY, layout.ATTRIBUTES, layout.GRAPH_META, layout.CORPUS]
        formats.write_graph_files_if_stale(export_dir, m, n_layer, d_mlp, write_el=False, site=site, into=out.dir)
        atomic.write_csv(formats.frequency_table(node, value_sum, samples, d_mlp, attribution), layout.path(out.dir, layout.FREQUENCY, m))
        if packed is not None:
            formats.write_packed_activation_matrix(layout.path(out.dir, layout.MATRIX, m), packed, n_layer * d_mlp)
            written.append(layout.MATRIX)
        if top_examples is not None:
            formats.write_top_examples(layout.path(out.dir, layout.TOP_EXAMPLES, m), *top_examples)
            written.append(layout.TOP_EXAMPLES)
        source = {"input_dir": str(export_dir.resolve()), "corpus": layout.CORPUS.format(m=m),
                  **({"merged_from": record["merged_shards"]} if "merged_shards" in record else {})}
        store = layout.path(out.dir, layout.WEIGHTED_GRAPH, m)
        gs.write_count_store(store, m, n_layer, d_mlp, samples, node, source, pair_counts=pair_counts, causal=causal)
        atomic.write_json(record, layout.path(out.dir, layout.CORPUS, m), indent=2)
        out.vouch([layout.path(out.dir, f, m) for f in written] + atomic.store_files(store))


def model_weights(lm) -> list[dict]:
    """
    A corpus record's fingerprint of the model's weights, so that the merge and stage e refuse a dataset of other
    weights under the same name: of a checkpoint, each safetensors file's name, size and sha256 (the whole file:
    a header and size would not see a changed weight of the same shape; it was just read to load the model, so
    it is hashed from the page cache at about 1-2 GB/s, once per run); of a model object (lm.path None), one entry
    {"memory": true, size, sha256} over its state dict (memory_weights).
    """
    if lm.path is None:
        return [memory_weights(lm.model)]
    return [{"file": f.name, "size": f.stat().st_size, "sha256": atomic.file_sha256(f)}
            for f in sorted(Path(lm.path).glob("*.safetensors"))]


def memory_weights(model) -> dict:
    """
    The fingerprint of weights in memory: sha256 over the state dict of the model as gelutrace runs it (model.py's
    for GPT-2, the transformers model's inside HFCausalLM), each tensor's name, dtype, shape and bytes in order, so
    that a checkpoint loaded from disk gives the same hash as the same weights in memory.
    """
    h, size = hashlib.sha256(), 0
    for name, t in model.state_dict().items():
        data = t.detach().contiguous().cpu().view(torch.uint8).numpy()  # the bytes as they are (bf16 too)
        h.update(f"{name.replace('._original_component', '')}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(data)
        size += data.nbytes
    return {"memory": True, "size": size, "sha256": h.hexdigest()}


def weights_origin(weights: list[dict]) -> str:
    """Where a corpus record's weights came from, in words."""
    return "weights in memory" if any(w.get("memory") for w in weights) else "checkpoint files"


def check_recorded_weights(record: dict | None, lm, where):
    """
    A dataset recorded from weights in memory is used only with the same weights: the model's state dict is hashed
    as memory_weights does (a checkpoint loaded from disk too) and compared. A model in memory and a dataset of
    checkpoint files are a mix whose weights cannot be compared: refused as well.
    """
    recorded = (record or {}).get("weights")
    if not recorded:
        return
    if weights_origin(recorded) != "weights in memory":
        if lm.path is None:
            raise PipelineError(f"{where} was recorded from the checkpoint files of {record.get('model')}, but the "
                                f"model given holds its weights in memory: their weights cannot be shown to be the "
                                f"same; load the model from its checkpoint, or record the dataset with this model")
        return
    want = next(w for w in recorded if w.get("memory"))["sha256"]
    if memory_weights(lm.model)["sha256"] != want:
        source = "the model given" if lm.path is None else f"its checkpoint {lm.path}"
        raise PipelineError(f"{where} was recorded from weights in memory (state dict sha256 {want[:12]}...) that "
                            f"are not those of model {lm.name} ({source}): the dataset is from other weights; "
                            f"record it again with this model")


def corpus_record(m: str, model_path, corpus: Corpus, context: int, max_tokens, shard, windows: int,
                  shard_windows_: int, samples: int, n_layer: int, d_mlp: int, top_examples: int,
                  weights: list[dict]) -> dict:
    return {"format": CORPUS_FORMAT, "version": CORPUS_VERSION, "model": m,
            "model_path": None if model_path is None else str(model_path),
            "weights": weights, "n_layer": n_layer, "d_mlp": d_mlp, **corpus.record(), "max_tokens": max_tokens,
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
    import torch.distributed as dist  # lazy: only torchrun runs need it

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
    attribution: bool = False  # also each neuron's attribution, the real next token's NLL the objective
    direct_edges: str | None = None  # also the causal edge weights over these layer pairs (adjacent | all)
    text_field: str = DEFAULT_FIELD  # the field or column of JSON lines, Parquet and Arrow files that holds the text


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


def load(model_type: str, device: str):
    """The model for a run, under torchrun on this process's own GPU."""
    dist_ctx = distributed()
    if dist_ctx is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(dist_ctx[2])
    return load_model(model_type, device)


@dataclass
class Job:
    """A corpus run's checked inputs: the text read and tokenized, its windows' size and the share to stream."""
    corpus: Corpus
    context: int
    batch_size: int
    shard: tuple[int, int] | None
    dist_ctx: tuple[int, int, int] | None


def lock(export: Path):
    """The output directory's writer lock (torchrun: process 0's; the other ranks write into it as part of the same
    run)."""
    dist_ctx = distributed()
    if dist_ctx is None or dist_ctx[0] == 0:
        atomic.lock_directory(export, "stage b (corpus mode)")


def prepare(lm, inputs: list[str], settings: CorpusSettings) -> Job:
    """The settings checked against the model and the text read: bad inputs raise here, before any heavy work."""
    s = settings
    dist_ctx = distributed()
    shard = check_settings(s, dist_ctx)
    cfg = lm.model.config
    context = cfg.block_size if s.context is None else s.context
    if not 1 <= context <= cfg.block_size:
        raise PipelineError(f"--context {context} is outside 1..{cfg.block_size}, the model's context")
    batch_size = s.batch_size or max(1, TOKENS_PER_BATCH // context)
    corpus = read_corpus(inputs, lm.tokenizer, s.max_tokens, text_field=s.text_field)
    if s.top_examples and len(corpus.ids) > TOP_EXAMPLES_MAX_TOKENS:
        raise PipelineError(f"--top_examples keeps sample ids below 2**32, but the corpus has "
                            f"{len(corpus.ids):,} tokens: give --top_examples 0 or --max_tokens "
                            f"{TOP_EXAMPLES_MAX_TOKENS}")
    return Job(corpus, context, batch_size, shard, dist_ctx)


def run(lm, inputs: list[str], export_dir, settings: CorpusSettings) -> dict | None:
    """Stage b over a corpus with a loaded model; returns the corpus record (None on the torchrun ranks that do not
    write)."""
    export = atomic.check_output_dir(export_dir, "--export_dir")  # before a token is read
    with atomic.removed_if_unused(export):  # the lock first; an input refused after it leaves no directory
        lock(export)
        job = prepare(lm, inputs, settings)
    return run_job(lm, job, export, settings)


@torch.no_grad()
def run_job(lm, job: Job, export: Path, settings: CorpusSettings) -> dict | None:
    """The prepared run streamed and written into export, whose lock this process holds: run's second half."""
    s, cfg, corpus, context, batch_size, shard, dist_ctx = (settings, lm.model.config, job.corpus, job.context,
                                                            job.batch_size, job.shard, job.dist_ctx)
    if corpus.unchecked_cuts:
        print(f"note: {corpus.unchecked_cuts} piece(s) of long documents were cut where no cut point that keeps "
              f"the tokens lay within {PIECE_CHARS // 2:,} characters (a 'word' that long); the tokens at those "
              f"cuts may differ from tokenizing the document whole", file=sys.stderr)
    weights = model_weights(lm)
    rank = 0
    if dist_ctx is not None:
        init_distributed(lm.device)
        rank, world, _ = dist_ctx
        shard = (rank, world)

    export.mkdir(parents=True, exist_ok=True)
    n_win = num_windows(len(corpus.ids), context)
    windows = shard_windows(n_win, shard)
    batches = plan(windows, len(corpus.ids), context, batch_size)
    fp = fingerprint([f["sha256"] for f in corpus.files], lm.name, str(lm.path.resolve()) if lm.path else "memory",
                     weights, vars(cfg),
                     context, s.max_tokens, batch_size, shard, s.save_matrix, s.top_examples,
                     *(["attribution"] if s.attribution else []),
                     *([f"direct_edges={s.direct_edges}"] if s.direct_edges else []),
                     *([f"text_field={s.text_field}"] if s.text_field != DEFAULT_FIELD else []))
    checkpoints = Checkpoints(export, lm.name, fp, shard, s.checkpoint_seconds)
    top = RunningTopK(cfg.n_layer, cfg.d_mlp, s.top_examples, lm.device) if s.top_examples else None
    attribution = CorpusAttribution(cfg.n_layer, cfg.d_mlp, lm.device) if s.attribution else None
    direct, anatomy = direct_totals(lm.model, s.direct_edges, lm.device) if s.direct_edges else (None, None)
    counts, start, packed = checkpoints.start(s.resume, CoactivationCounts(cfg.n_layer, cfg.d_mlp, lm.device), top,
                                              attribution, direct, batches=batches, context=context,
                                              n_tokens=len(corpus.ids), save_matrix=s.save_matrix)
    if start:
        print(f"resuming after batch {start} of {len(batches)}")
    sizes = [len(b) * min(context, len(corpus.ids) - int(b[0]) * context) for b in batches]
    with tqdm(total=sum(sizes), initial=sum(sizes[:start]), unit="tok", unit_scale=True, desc="reading",
              disable=rank != 0) as bar:
        stream(lm.model, corpus.ids, batches, context, counts, top, checkpoints, start,
               packed if s.save_matrix else None, bar, attribution, direct)
    best = None
    if dist_ctx is not None:
        counts.all_reduce()
        if attribution is not None:
            attribution.all_reduce()
        if direct is not None:
            direct.all_reduce()
        best = gather_top(top, s.top_examples) if top is not None else None
        shard = None
    elif top is not None:
        best = top.result()
    record = corpus_record(lm.name, lm.path, corpus, context, s.max_tokens, shard, n_win, len(windows),
                           counts.samples, cfg.n_layer, cfg.d_mlp, s.top_examples, weights)
    record["attribution_tokens"] = attribution.tokens if attribution is not None else None
    record["direct_edges"] = s.direct_edges
    if rank == 0:
        matrix = (np.concatenate(packed) if packed else np.zeros((0, (cfg.n_layer * cfg.d_mlp + 7) // 8), np.uint8)
                  ) if s.save_matrix else None
        top_examples = (*best, top_examples_text(best[1], corpus.ids, context, lm.tokenizer)) if best else None
        write_corpus_dataset(export, lm.name, cfg.n_layer, cfg.d_mlp, counts.samples, counts.node_counts(),
                             counts.value_sum.cpu().numpy(), counts.pair_counts, record, matrix, lm.site, top_examples,
                             attribution=attribution.mean() if attribution is not None else None,
                             causal=direct.result(anatomy) if direct is not None else None)
    if dist_ctx is not None:
        import torch.distributed as dist  # lazy: only torchrun runs need it
        dist.barrier()
    checkpoints.finish()
    if dist_ctx is not None:
        dist.destroy_process_group()
    return record if rank == 0 else None
