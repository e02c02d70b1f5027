"""
Stage e's real-text evaluation: what ablating neurons does to the loss on held-out text.

- The text is read as stage b's corpus mode reads it (gelutrace.record.corpus: each document tokenized and followed by
  end-of-text, the documents concatenated and cut into consecutive windows of `context` tokens), up to
  `eval_tokens` scored tokens.
- Teacher-forced, every position of a window but its last predicts the real next token. Measured there: the
  unablated model's negative log-likelihood (nll) of that token and, with a subset ablated, its increase
  (delta_nll) and KL(unablated || ablated) of the next-token distribution, both from the change of the logits
  (perturbation.shift_metrics, precise for small effects).
- Units: a scored token belongs to the document of the token it predicts. The bootstrap and the validation/test
  split resample documents, or windows when the text is one document. Means are over tokens: the sums over the
  units drawn divided by their tokens.
- Every condition (a subset or one of its random controls) shares each batch's unablated pass; several are
  computed in one forward pass, one block of rows each (perturbation.RowAblation).
"""

import contextlib
import hashlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from gelutrace import PipelineError
from gelutrace.evaluate import metrics
from gelutrace.evaluate import statistics as stats
from gelutrace.files import atomic, layout
from gelutrace.files import corpusfiles as cf
from gelutrace.model import hooks
from gelutrace.model.sites import resumed_body, split_head
from gelutrace.model.tokens import token_text
from gelutrace.record import corpus as cp

EVAL_TOKENS = 100_000  # scored tokens by default
POSITION_BUCKETS = ((0, 16), (16, 128), (128, None))  # a scored token's position in its window: its input's index
TOP_TOKENS = 20  # the breakdown by next token covers the text's most frequent next tokens
WINDOW_ROWS = 8  # windows per unablated pass (fewer when their logits would exceed a quarter of LOGIT_BUDGET)


@dataclass
class EvalText:
    """The evaluation text, tokenized and cut into windows, with each scored token's unit and breakdown buckets."""
    ids: np.ndarray  # every token read (int64)
    context: int
    batches: list[np.ndarray]  # window numbers per forward pass (corpus.plan: one rectangle each)
    unit: np.ndarray  # (len(ids),) the unit of each token as a prediction target (-1: not scored)
    units: str  # "documents" or "windows"
    n_units: int
    files: list[dict]  # stage b's corpus record of each file: path, sha256, documents, tokens, ...
    documents: int
    top_tokens: np.ndarray  # the TOP_TOKENS most frequent next tokens, most frequent first (ties: lower id)
    bucket: np.ndarray  # (len(ids),) each target's position bucket
    token_bucket: np.ndarray  # (len(ids),) each target's index in top_tokens, -1 when not among them

    @property
    def scored(self) -> int:
        return int((self.unit >= 0).sum())

    @property
    def n_buckets(self) -> int:
        return len(POSITION_BUCKETS) + len(self.top_tokens)

    def bucket_labels(self, tokenizer) -> list[tuple[str, str, int]]:
        """(breakdown, bucket, token id or -1) of each breakdown bucket, in order."""
        out = [("position", f"{lo}-{hi - 1}" if hi else f"{lo}+", -1) for lo, hi in POSITION_BUCKETS]

        return out + [("next_token", token_text(tokenizer, int(t)), int(t)) for t in self.top_tokens]

    def record(self, eval_tokens: int) -> dict:
        return {"files": [{k: f.get(k) for k in ("path", "format", "field", "sha256", "documents", "tokens")}
                          for f in self.files],
                "documents": self.documents, "context": self.context, "eval_tokens": eval_tokens,
                "tokens_read": int(len(self.ids)), "tokens_scored": self.scored, "units": self.units,
                "n_units": self.n_units, "windows": int(cp.num_windows(len(self.ids), self.context))}


def add_window_args(ap, text_flag: str, context_default: str):
    """--eval_tokens and --context, the flags that shape how `text_flag` is read (stage e, single-neuron effects)."""
    ap.add_argument("--eval_tokens", type=int, default=EVAL_TOKENS, metavar="N",
                    help=f"score at most this many tokens of {text_flag}, the first ones (default: %(default)s)")
    ap.add_argument("--context", type=int, default=None, metavar="N",
                    help=f"tokens per window of {text_flag} (default: {context_default})")


def check_context(context: int, block_size: int) -> int:
    if not 2 <= context <= block_size:
        raise PipelineError(f"--context {context} is outside 2..{block_size}, the model's context")
    return context


def tokens_needed(eval_tokens: int, context: int) -> int:
    """The tokens to read for `eval_tokens` scored ones: every window of `context` tokens scores all but one."""
    return 1 + eval_tokens + (eval_tokens - 1) // (context - 1)


def read_eval_text(paths: list[str], tokenizer, context: int, vocab_size: int, eval_tokens: int = EVAL_TOKENS,
                   units: str | None = None, flag: str = "--eval_text", text_field: str = cf.DEFAULT_FIELD
                   ) -> EvalText:
    """The text, its windows and each scored token's unit: documents when there are two or more, else windows
    (units="windows" makes them windows in any case). Text of nothing but whitespace is refused."""
    if context < 2:
        raise PipelineError(f"--context {context}: a window needs at least 2 tokens to score one")
    if eval_tokens < 1:
        raise PipelineError(f"--eval_tokens must be >= 1, got {eval_tokens}")
    corpus = cp.read_corpus(paths, tokenizer, tokens_needed(eval_tokens, context), flag, text_field)
    ids = corpus.ids.astype(np.int64)
    if not tokenizer.decode(ids[ids != tokenizer.eos_token_id].tolist()).strip():
        raise PipelineError(f"{flag} {', '.join(map(str, paths))} holds no text but whitespace: nothing to evaluate on")
    n = len(ids)
    pos = np.arange(n)
    scored = (pos % context) != 0  # a window's first token is predicted by nothing in its window
    starts, _ = cp.document_starts({"files": corpus.files})
    if corpus.documents >= 2 and units != "windows":
        units, unit = "documents", np.searchsorted(starts, pos, side="right") - 1
    else:
        units, unit = "windows", pos // context
    n_units = int(unit.max()) + 1 if n else 0
    unit = np.where(scored, unit, -1)
    if not scored.any():
        raise PipelineError(f"{flag} {', '.join(map(str, paths))} has {n} token(s): nothing to score")
    freq = np.bincount(ids[scored], minlength=int(ids.max()) + 1)
    order = np.lexsort((np.arange(len(freq)), -freq))
    top = order[:TOP_TOKENS][freq[order[:TOP_TOKENS]] > 0]
    bucket, t = np.zeros(n, np.int64), (pos - 1) % context  # t: the input's position in the window
    for b, (lo, hi) in enumerate(POSITION_BUCKETS):
        bucket[(t >= lo) & (t < (hi or context))] = b
    lookup = np.full(len(freq), -1, np.int64)
    lookup[top] = np.arange(len(top))
    batch_windows = metrics.LOGIT_BUDGET // (4 * context * vocab_size)
    batches = cp.plan(np.arange(cp.num_windows(n, context)), n, context, max(1, min(WINDOW_ROWS, batch_windows)))
    return EvalText(ids, context, batches, unit, units, n_units, corpus.files, corpus.documents, top,
                    np.where(scored, bucket, -1), np.where(scored, lookup[ids], -1))


@dataclass
class Baseline:
    """The unablated model on the evaluation text: per unit and per breakdown bucket, tokens and summed nll."""
    tokens: np.ndarray  # (units,)
    nll: np.ndarray  # (units,)
    bucket_tokens: np.ndarray  # (buckets,)
    bucket_nll: np.ndarray  # (buckets,)
    token_tokens: np.ndarray | None = None  # (vocab,) with by_token: scored tokens of each next-token id
    token_nll: np.ndarray | None = None  # (vocab,) their summed nll
    position_nll: np.ndarray | None = None  # (tokens read,) with per_position: each target's nll, NaN if unscored

    @property
    def mean_nll(self) -> float:
        return float(self.nll.sum() / self.tokens.sum())


@dataclass
class Measured:
    """One ablation on the evaluation text: per-unit sums of delta_nll and kl (NaN on the units it was not scored
    on), per-bucket sums of delta_nll over the tokens it was scored on."""
    ids: np.ndarray
    delta_nll: np.ndarray  # (units,)
    kl: np.ndarray  # (units,)
    bucket_delta_nll: np.ndarray  # (buckets,)
    token_delta_nll: np.ndarray | None = None  # (vocab,) with by_token: summed delta_nll by the next token's id
    position_delta_nll: np.ndarray | None = None  # (tokens read,) with per_position: each target's, NaN if unscored

    @property
    def scored(self) -> np.ndarray:
        """The units it was scored on (a mask)."""
        return ~np.isnan(self.delta_nll)

    def mean(self, name: str, tokens: np.ndarray) -> float:
        """The mean over the tokens of the units it was scored on."""
        on = self.scored
        return float(getattr(self, name)[on].sum() / tokens[on].sum())


def _add(acc: torch.Tensor, index: torch.Tensor, values: torch.Tensor):
    """acc[..., index[j]] += values[..., j] over the positions with index >= 0."""
    ok = index >= 0
    acc.index_add_(-1, index[ok], values[..., ok].to(acc.dtype))


def _unit_sets(groups: list[np.ndarray], units, n_units: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The distinct unit sets the groups are scored on (boolean masks over the units) and each group's set."""
    masks, index = {}, []
    for g in range(len(groups)):
        on = np.ones(n_units, bool) if units is None or units[g] is None else np.isin(np.arange(n_units), units[g])
        index.append(masks.setdefault(on.tobytes(), (len(masks), on))[0])
    return [on for _, on in sorted(masks.values(), key=lambda v: v[0])], np.asarray(index, np.int64)


@torch.no_grad()
def evaluate(model, text: EvalText, groups: list[np.ndarray], mean_values: np.ndarray | None, batch_size: int,
             progress=None, by_token=(), units: list[np.ndarray | None] | None = None, per_position: bool = False,
             resume: bool = True) -> tuple[Baseline, list[Measured]]:
    """
    The baseline and every group's ablation (0, or `mean_values` per neuron) over the evaluation text; for
    the groups whose index is in `by_token` (and the baseline, when any is) also by the next token's id, over
    the whole vocabulary. With `units`, group g is scored only on the units units[g] (None: all): its forward
    passes cover only the windows that hold them (a random control needs only the test part, where every
    figure it enters is measured). `progress(tokens)` is called as ablated tokens are scored. With
    `per_position`, also each scored token's nll and every group's delta_nll at each position of the text.
    With `resume` (model.py only), a group's passes start at its first ablated layer's GELU from what the
    unablated pass computed below it (the same values; bench_perturbation.py compares both).
    """
    device = next(model.parameters()).device
    U, NB, NP = text.n_units, text.n_buckets, len(POSITION_BUCKETS)
    ids = torch.from_numpy(text.ids)
    unit, pos_b, tok_b = (torch.from_numpy(a).to(device) for a in (text.unit, text.bucket, text.token_bucket))
    f64 = dict(dtype=torch.float64, device=device)
    tokens, nll, b_tokens, b_nll = (torch.zeros(n, **f64) for n in (U, U, NB, NB))
    ablating = [i for i, g in enumerate(groups) if len(g)]
    sets, group_set = _unit_sets(groups, units, U)
    on_units = [torch.from_numpy(on).to(device) for on in sets]
    dnll_u, kl_u, dnll_b = (torch.zeros(len(ablating), n, **f64) for n in (U, U, NB))  # in `ablating` order
    V = model.config.vocab_size
    by_token = sorted(set(by_token) & set(ablating))
    tok_row = torch.full((max(len(ablating), 1),), -1, dtype=torch.long, device=device)
    tok_row[[ablating.index(i) for i in by_token]] = torch.arange(len(by_token), device=device)
    dnll_t = torch.zeros(len(by_token), V, **f64)
    t_tokens, t_nll = (torch.zeros(V if by_token else 0, **f64) for _ in range(2))
    n_pos = len(text.ids) if per_position else 0
    pos_nll, pos_dnll = torch.full((n_pos,), torch.nan, **f64), torch.full((len(ablating), n_pos), torch.nan, **f64)
    ctx = text.context
    body, head = split_head(model)
    resume = resumed_body(model) if resume else None
    first = {i: int(np.min(groups[i])) // model.config.d_mlp for i in ablating}
    points = hooks.ResumePoints(model, set(first.values())) if resume is not None else contextlib.nullcontext()
    for w in text.batches:
        lo = int(w[0]) * ctx
        length = min(ctx, len(text.ids) - lo)
        if length < 2:
            continue
        starts = torch.from_numpy(w.astype(np.int64)) * ctx
        at = (starts[:, None] + torch.arange(length)).to(device)  # global positions of the window's tokens
        x = ids[at.cpu()].to(device)
        inp, tgt, where = x[:, :-1], x[:, 1:], at[:, 1:]
        u, pb = unit[where], pos_b[where]
        tb = torch.where(tok_b[where] >= 0, tok_b[where] + NP, -1)
        with points:
            h = body(inp)
        base_nll = torch.empty(tgt.shape, **f64)
        flat_h, flat_tgt = h.reshape(-1, h.size(-1)), tgt.reshape(-1)
        if ablating:  # the base's logits and probabilities, kept for every chunk of ablations below
            base_logits = torch.empty((len(flat_tgt), V), dtype=torch.float32, device=device)
            base_p = torch.empty_like(base_logits)
        block = metrics.metric_block(device, 1, V)
        for a in range(0, len(flat_tgt), block):
            sl = slice(a, a + block)
            z = head(flat_h[sl]).float()
            base_nll.view(-1)[sl] = -F.log_softmax(z, -1).gather(-1, flat_tgt[sl, None])[:, 0].double()
            if ablating:
                base_logits[sl], base_p[sl] = z, metrics.base_probabilities(z, z.dtype)
        ones = torch.ones_like(base_nll)
        _add(tokens, u, ones), _add(nll, u, base_nll)
        for b in (pb, tb):
            _add(b_tokens, b, ones), _add(b_nll, b, base_nll)
        t_id = torch.where(u >= 0, tgt, -1)
        if per_position:
            pos_nll[where[u >= 0]] = base_nll[u >= 0]
        if by_token:
            _add(t_tokens, t_id.reshape(-1), ones.reshape(-1)), _add(t_nll, t_id.reshape(-1), base_nll.reshape(-1))
        if not ablating:
            continue
        for s_i, on in enumerate(on_units):
            todo = [i for i in ablating if group_set[i] == s_i]
            scored = (u >= 0) & on[u.clamp(min=0)]  # the tokens this unit set scores
            rows = torch.nonzero(scored.any(1))[:, 0]
            if not todo or not len(rows):
                continue
            on_pos = torch.nonzero(scored[rows].reshape(-1))[:, 0]  # the scored positions of those rows, flattened
            L = tgt.size(1)
            at_base = rows[on_pos // L] * L + on_pos % L  # the same positions in the whole batch's flattening
            idx = [a[rows].reshape(-1)[on_pos] for a in (u, pb, tb, t_id)]
            inp_s = inp if len(rows) == len(w) else inp[rows]
            tgt_s = tgt[rows].reshape(-1)[on_pos]
            # what body returns for a chunk's rows (its logits, or model.py's final norm output) within LOGIT_BUDGET
            g = max(1, min(batch_size // len(rows), metrics.LOGIT_BUDGET // max(1, len(rows) * L * h.size(-1))))
            by_layer = first.get if resume is not None else (lambda i: 0)  # a chunk's groups share it
            chunks = [part[s:s + g] for _, part in itertools.groupby(sorted(todo, key=by_layer), key=by_layer)
                      for part in [list(part)] for s in range(0, len(part), g)]
            for chunk in chunks:
                acc = [ablating.index(i) for i in chunk]
                with hooks.RowAblation(model, [groups[i] for i in chunk], len(rows), mean_values):
                    if resume is None:
                        h_g = body(inp_s.repeat(len(chunk), 1))
                    else:
                        layer = first[chunk[0]]
                        h_g = resume(layer, *(a[rows].repeat(len(chunk), 1, 1) for a in points.points[layer]))
                    h_g = h_g.view(len(chunk), -1, h.size(-1))

                def logits(sl):  # the base's probabilities and the chunk's logit shifts at scored positions sl
                    at = at_base[sl]
                    return base_p[at], head(h_g[:, on_pos[sl]]).float().sub_(base_logits[at])

                kl, dnll = metrics.blocked_shift_metrics(len(on_pos), logits, tgt_s,
                                                         metrics.metric_block(device, len(chunk), V))
                for j, a in enumerate(acc):
                    for store, vals, index in ((dnll_u, dnll, idx[0]), (kl_u, kl, idx[0]), (dnll_b, dnll, idx[1]),
                                               (dnll_b, dnll, idx[2])):
                        _add(store[a], index, vals[j])
                    if (r := int(tok_row[a])) >= 0:
                        _add(dnll_t[r], idx[3], dnll[j])
                    if per_position:
                        pos_dnll[a, where[rows].reshape(-1)[on_pos]] = dnll[j]
                if progress is not None:
                    progress(len(chunk) * len(on_pos))
    base = Baseline(*(t.cpu().numpy() for t in (tokens, nll, b_tokens, b_nll)),
                    *((t_tokens.cpu().numpy(), t_nll.cpu().numpy()) if by_token else (None, None)),
                    pos_nll.cpu().numpy() if per_position else None)
    row = {i: j for j, i in enumerate(ablating)}
    out = []
    for i, gr in enumerate(groups):
        if i in row:
            sums = [a[row[i]].cpu().numpy() for a in (dnll_u, kl_u, dnll_b)]
        else:  # nothing ablated: no change
            sums = [np.zeros(n) for n in (U, U, NB)]
        for a in sums[:2]:
            a[~sets[group_set[i]]] = np.nan
        position = None
        if per_position:
            position = (pos_dnll[row[i]].cpu().numpy() if i in row
                        else np.where(np.isnan(base.position_nll), np.nan, 0.0))
        out.append(Measured(np.asarray(gr, np.int64), *sums,
                            dnll_t[by_token.index(i)].cpu().numpy() if i in by_token else None, position))
    return base, out


LEAK_CHECK_BYTES = 64 << 20  # the text read of each side (its documents' decompressed UTF-8), at most
LEAK_PASSAGES, LEAK_PASSAGE_WORDS = 100, 12  # passages of the evaluation text looked up in the selection corpus
LEAK_SHARE = 0.1  # more than this share of them found there: the texts overlap
LEAK_BLOCK_CHARS = 4 << 20  # normalised text searched for passages (or prompts) at a time


def _normalised(text: str) -> str:
    """Text with every run of whitespace one space: line endings and trailing newlines do not hide a copy."""
    return " ".join(text.split())


def _normalised_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """A text given a piece at a time, whitespace normalised a piece at a time: "".join of the output is _normalised
    of "".join of the input."""
    started = gap = False
    for piece in pieces:
        words = piece.split()
        if not words:
            gap = gap or (started and bool(piece))
            continue
        out = " ".join(words)
        yield " " + out if started and (gap or piece[0].isspace()) else out
        started, gap = True, piece[-1].isspace()


def _utf8_size(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


class _CheckedText:
    """
    The documents of corpus records' files (with `recorded`, each file's first `documents` of its record: those in
    its corpus; else all), each whitespace normalised a piece at a time, until `limit` bytes of their text
    (decompressed UTF-8) are read: the document the limit cuts ends there, and the rest is not read. `whole` says
    whether the last document was read to its end, `cut` whether the limit left text unread.
    """

    def __init__(self, files: list[dict], recorded: bool, limit: int | None = None):
        self.files, self.recorded, self.left = files, recorded, LEAK_CHECK_BYTES if limit is None else limit
        self.read, self.cut, self.whole = 0, False, True

    def documents(self) -> Iterator[Iterator[str]]:
        for f in self.files:
            docs = cf.record_documents(f)
            if self.recorded and isinstance(f.get("documents"), int):
                docs = itertools.islice(docs, f["documents"])
            for doc in docs:
                if self.left <= 0:
                    self.cut = True
                    return
                self.whole = True
                yield _normalised_pieces(self._pieces(doc))

    def _pieces(self, doc: Iterable[str]) -> Iterator[str]:
        for piece in doc:
            n = _utf8_size(piece)
            if n > self.left:
                piece = piece[:self.left] if piece.isascii() else piece.encode("utf-8", "surrogatepass")[
                    :self.left].decode("utf-8", "ignore")
                self.read, self.left, self.cut, self.whole = self.read + self.left, 0, True, False
                yield piece
                return
            self.read, self.left = self.read + n, self.left - n
            yield piece


class _Finder:
    """Which of some strings (none holding a newline) occur in a text given a piece at a time, as `s in text` finds
    them: the text is searched LEAK_BLOCK_CHARS at a time, each block with the end of the one before."""

    def __init__(self, needles: list[str]):
        self.needles, self.found = needles, [False] * len(needles)
        self.keep = max(map(len, needles), default=1) - 1
        self.parts, self.size, self.tail = [], 0, ""

    def add(self, piece: str):
        self.parts.append(piece)
        self.size += len(piece)
        if self.size >= LEAK_BLOCK_CHARS:
            self.flush()

    def flush(self) -> int:
        """The number of the strings found so far (those given twice counted twice)."""
        if self.parts:
            block = self.tail + "".join(self.parts)
            self.parts, self.size = [], 0
            for i, s in enumerate(self.needles):
                if not self.found[i] and s in block:
                    self.found[i] = True
            self.tail = block[max(0, len(block) - self.keep):] if self.keep else ""
        return sum(self.found)


def _digest(pieces: Iterable[str], *also) -> bytes:
    """The sha256 of a normalised document's text, its pieces also handed to each of `also` (a callable)."""
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece.encode("utf-8", "surrogatepass"))
        for f in also:
            f(piece)
    return h.digest()


def _passages(files: list[dict], words_per_doc: list[int], n: int = LEAK_PASSAGES,
              words: int = LEAK_PASSAGE_WORDS) -> list[str]:
    """Up to n passages of `words` consecutive words, their starts evenly spaced over every word start of the
    documents (their numbers of words given) that leaves room for a passage; the documents are read again a piece
    at a time, and only the picked passages are held."""
    counts = np.maximum(np.asarray(words_per_doc, np.int64) - words + 1, 0)
    total = int(counts.sum())
    if not total:
        return []
    picks = np.unique(np.linspace(0, total - 1, min(n, total)).astype(np.int64))
    first = np.concatenate([[0], np.cumsum(counts)])
    doc_of = np.searchsorted(first, picks, side="right") - 1
    wanted: dict[int, list[int]] = {}
    for d, k in zip(doc_of.tolist(), picks.tolist()):
        wanted.setdefault(d, []).append(k - int(first[d]))
    out = []
    text = _CheckedText(files, recorded=False)
    for d, doc in enumerate(text.documents()):
        if d > max(wanted):
            break
        starts = wanted.get(d)
        if not starts:
            for _ in doc:
                pass
            continue
        held, base, carry, i = [], 0, "", 0  # held: the complete words from index base on
        for piece in itertools.chain(doc, [None]):
            if piece is None:
                held.append(carry)
            else:
                ws = piece.split(" ")
                ws[0] = carry + ws[0]
                carry = ws.pop()
                held += ws
            while i < len(starts) and starts[i] + words <= base + len(held):
                out.append(" ".join(held[starts[i] - base:starts[i] - base + words]))
                i += 1
            drop = max(0, len(held) - (words - 1))
            held, base = held[drop:], base + drop
    return out


def unchanged(files: list[dict]) -> str | None:
    """None when every file of a corpus record is where it was, with the sha256 it had when stage b read it (the
    text the neurons were chosen on); else why not, in words. A file changed since is never read as that text."""

    for f in files:
        p = Path(f["path"])
        if not p.is_file():
            return f"{p} is missing"
        want = f.get("sha256")
        try:
            if isinstance(want, str) and _sha256(p) != want:
                return f"{p} changed since stage b read it"
        except OSError as e:
            return f"{p} cannot be read ({e.strerror})"
    return None


_HASHED: dict = {}  # (path, size, mtime) -> sha256: a corpus is hashed once per process (the leak check, the record)


def _sha256(p) -> str:
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = atomic.file_sha256(p)
    return _HASHED[key]


def texts_in_corpus(files: list[dict], texts) -> int | None:
    """How many of `texts` occur (whitespace normalised) in the documents a corpus record's files gave its corpus,
    read a piece at a time; None when a file is missing or changed since stage b, or the documents are longer
    than LEAK_CHECK_BYTES (a text not found in their first part might lie after it)."""
    if unchanged(files) is not None:
        return None
    finder = _Finder([_normalised(t) for t in texts if t.strip()])
    corpus = _CheckedText(files, recorded=True)
    for doc in corpus.documents():
        for piece in doc:
            finder.add(piece)
        finder.add("\n")
    return None if corpus.cut else finder.flush()


def leak_check(text: EvalText, corpus_record: dict | None, selection_prompts=None) -> dict:
    """
    Refuses an evaluation text that shares text with the corpus the neurons were chosen on: a file (sha256) or,
    where that corpus's files are there to read again, a document (whitespace normalised) or more than LEAK_SHARE
    of LEAK_PASSAGES passages of 12 words sampled over the evaluation text. With a prompt-mode selection, records
    how many of its prompts occur verbatim in the evaluation text. The evaluation text's files are compared with all
    their documents, the selection corpus's with those in its corpus (its record's `documents`: the neurons were
    chosen on them), each read a piece at a time up to its first LEAK_CHECK_BYTES; a document that limit cuts is
    not compared whole, and the record says how much of each text was read (leak_note). Returns what was
    checked.
    """

    out = {"selection_files_checked": 0, "shared_files": 0, "documents_checked": False, "shared_documents": 0}
    unread = None if corpus_record is None else unchanged(corpus_record.get("files", []))
    need_docs = corpus_record is not None and unread is None
    if unread is not None:
        out["documents_unchecked"] = unread
    if corpus_record is not None:
        files = corpus_record.get("files", [])
        mine = {f["sha256"]: f["path"] for f in text.files}
        shared = [(mine[f["sha256"]], f["path"]) for f in files if f.get("sha256") in mine]
        out.update(selection_files_checked=len(files), shared_files=len(shared))
        if shared:
            raise PipelineError(f"--eval_text {shared[0][0]} is the selection corpus's file {shared[0][1]} (same "
                                f"sha256): the neurons were chosen on it; evaluate on text they were not chosen on")
    if need_docs or selection_prompts is not None:
        ours, counts = set(), []  # the evaluation text's whole documents' digests, each document's words
        prompts = _Finder([_normalised(pr.text) for pr in selection_prompts or () if pr.text.strip()])
        evaluated = _CheckedText(text.files, recorded=False)
        for doc in evaluated.documents():
            spaces = [0]

            def count(piece, spaces=spaces):
                spaces[0] += piece.count(" ")

            digest = _digest(doc, count, *((prompts.add,) if prompts.needles else ()))
            if prompts.needles:
                prompts.add("\n")
            counts.append(spaces[0] + 1)
            if evaluated.whole:
                ours.add(digest)
        read = {"bytes_limit": LEAK_CHECK_BYTES, "eval_bytes_checked": evaluated.read,
                "eval_checked_whole": not evaluated.cut}
        if selection_prompts is not None:
            out.update(selection_prompts_in_text=prompts.flush(), **read)
    if need_docs:
        files = corpus_record["files"]
        sample = _passages(text.files, counts)
        found, common = _Finder(sample), set()
        theirs = _CheckedText(files, recorded=True)
        for doc in theirs.documents():
            digest = _digest(doc, found.add)
            found.add("\n")
            if theirs.whole and digest in ours:
                common.add(digest)
        found = found.flush()
        out.update(documents_checked=True, shared_documents=len(common), passages_checked=len(sample),
                   passages_found=found, **read, selection_bytes_checked=theirs.read,
                   selection_checked_whole=not theirs.cut)
        if common:
            sel_paths = [f["path"] for f in files]
            raise PipelineError(f"--eval_text shares {len(common)} document(s) with the selection corpus "
                                f"({', '.join(str(p) for p in sel_paths[:3])}): the neurons were chosen on them")
        if sample and found > LEAK_SHARE * len(sample):
            raise PipelineError(f"--eval_text overlaps the selection corpus: {found} of {len(sample)} passages "
                                f"of {LEAK_PASSAGE_WORDS} words sampled over it occur there verbatim")
    out["passed"] = True
    return out


def leak_note(leak: dict) -> str | None:
    """A note when the leak check read only the first LEAK_CHECK_BYTES of a text; None when it read them whole."""
    if leak.get("documents_unchecked"):
        return (f"the leak check compared the selection corpus's files by sha256 only, not its documents: "
                f"{leak['documents_unchecked']}")
    parts = [what for what, whole in (("the selection corpus's", "selection_checked_whole"),
                                      ("the evaluation text's", "eval_checked_whole")) if leak.get(whole) is False]
    if not parts:
        return None
    return (f"the leak check compared only the first {leak['bytes_limit'] / 2**20:g} MiB of {' and '.join(parts)} "
            f"documents (decompressed text): what lies after was not compared")


# --- results ---------------------------------------------------------------------------------------------------
@dataclass
class TextResults:
    """Every subset (and its controls) on the evaluation text, with the bootstrap and split over its units."""
    text: EvalText
    baseline: Baseline
    mains: list[Measured]  # one per subset, in the subsets' order
    controls: list[list[Measured]]  # per subset: its random controls
    boot: np.ndarray  # bootstrap draws over the units
    split: "stats.Split"  # the units' validation and test parts
    weighted: list[list[Measured]] = None  # per subset: its effect-weighted controls (modules)


def measure_subsets(model, text: EvalText, subsets, mean_values, seed: int, validation_share: float, batch_size: int,
                    progress=None, test_only: list[bool] | None = None, per_position: bool = False,
                    control_share: float = 1.0) -> TextResults:
    """Every subset on the evaluation text, a module's also by next token (controls come later: add_controls);
    subset i with test_only[i] on the test part of the units only; with per_position also token by token. The
    split's control part is `control_share` of the test part (stats.split_prompts)."""
    modules = [i for i, s in enumerate(subsets) if s.is_module]
    split = stats.split_prompts(text.n_units, seed, validation_share, control_share)
    test_only = test_only or [False] * len(subsets)
    base, mains = evaluate(model, text, [s.ids for s in subsets], mean_values, batch_size, progress, modules,
                           [split.test if t else None for t in test_only], per_position)
    return TextResults(text, base, mains, [[] for _ in subsets], stats.bootstrap_weights(text.n_units, seed),
                       split, [[] for _ in subsets])


def add_controls(res: TextResults, model, controls: list[list[np.ndarray]], mean_values, batch_size: int,
                 progress=None, weighted: list[list[np.ndarray]] | None = None):
    """Each subset's random controls (id arrays, per subset), and its effect-weighted ones, on the evaluation
    text's control part (the test part, or the share of it the split gives the controls): a subset is judged
    against them there."""
    weighted = weighted or [[] for _ in controls]
    flat = [c for cs in controls + weighted for c in cs]
    if not flat:
        return
    _, measured = evaluate(model, res.text, flat, mean_values, batch_size, progress,
                           units=[res.split.control_units] * len(flat))
    it = iter(measured)
    res.controls = [[next(it) for _ in cs] for cs in controls]
    res.weighted = [[next(it) for _ in cs] for cs in weighted]


def entry(res: TextResults, i: int, stem: str, method: str, variant: str, info: dict) -> "stats.Entry":
    """Subset i as the method comparison sees it, its units standing for prompts."""
    main, ctl, tokens = res.mains[i], res.controls[i], res.baseline.tokens
    sums = {"delta_nll": main.delta_nll, "kl": main.kl, "token_agreement": np.full(len(tokens), np.nan)}
    # a control's units it was not scored on: no tokens and no sum there (stats.Entry.control_part)
    scored = np.array([c.scored for c in ctl], bool).reshape(len(ctl), len(tokens))
    control_sums = {name: np.nan_to_num(np.array([getattr(c, name) for c in ctl]).reshape(len(ctl), len(tokens)))
                    for name in stats.METRICS}
    return stats.Entry(stem, method, variant, len(main.ids), main.ids, sums, tokens, control_sums,
                       np.where(scored, tokens, 0), info)


SUMMARY_METRICS = ("delta_nll", "kl")


def summary_columns(res: TextResults, i: int) -> dict:
    """Subset i's real-text columns of stage e's summary: text_nll (unablated), text_delta_nll and text_kl with
    bootstrap CIs over the units, and with controls their null (stats.NULL_FIELDS), on the units the controls
    were scored on (a method subset's: the test part)."""
    tokens = res.baseline.tokens
    main = res.mains[i]
    row = {"text_tokens": int(tokens.sum()), "text_nll": res.baseline.mean_nll}
    for name in SUMMARY_METRICS:
        value = main.mean(name, tokens)
        row[f"text_{name}"] = value
        row[f"text_{name}_ci_low"], row[f"text_{name}_ci_high"] = stats.bootstrap_ci(
            res.boot, getattr(main, name), tokens)
        for ctl, test in ((res.controls[i], stats.null_test), (res.weighted[i] if res.weighted else [],
                                                                stats.weighted_null)):
            if ctl:
                on = ctl[0].scored
                there = float(getattr(main, name)[on].sum() / tokens[on].sum())
                row.update({f"text_{name}_{k}": v for k, v in test(there, [c.mean(name, tokens) for c in ctl]).items()})
    return row


def breakdown_table(res: TextResults, names: list[str], tokenizer) -> "pd.DataFrame":
    """Per subset and breakdown bucket (position in the window; the most frequent next tokens): tokens, the
    unablated nll and the subset's delta_nll, each a mean over the bucket's tokens."""

    labels = res.text.bucket_labels(tokenizer)
    b = res.baseline
    with np.errstate(invalid="ignore", divide="ignore"):
        nll = b.bucket_nll / b.bucket_tokens
        rows = [{"subset": name, "k": len(m.ids), "breakdown": kind, "bucket": label, "token_id": tok,
                 "tokens": int(n), "nll": base, "delta_nll": d / n if n else np.nan}
                for name, m in zip(names, res.mains)
                for (kind, label, tok), n, base, d in zip(labels, b.bucket_tokens, nll, m.bucket_delta_nll)]
    return pd.DataFrame(rows, columns=layout.TEXT_BREAKDOWN_COLUMNS)
