"""
Exact, mergeable activation statistics: the counts behind stage b's frequency file and stage c's graph,
accumulated a batch of samples at a time, so that no samples x neurons matrix is ever held whole.

For every neuron: how many samples it is active in (post-GELU output > 0) and the sum of its post-GELU
outputs; for every adjacent-layer pair (i, i+1): the d_mlp x d_mlp matrix of samples in which both neurons
are active. Each batch adds one matrix product per layer pair, A_i^T @ A_{i+1} over its 0/1 rows, in a type
exact for the batch's rows (int8 x int8 -> int32 where torch provides it, float32 otherwise, exact below
2**24 rows), into int64 totals. Counts are integers, so totals do not depend on how the samples were
batched, ordered or split into shards; the value sums are float64 (order changes them only in the last bits).

Each neuron's top-activating samples are kept the same way (RunningTopK): the k largest post-GELU values
and their sample ids, merged batch by batch; the top k of a union is the top k of its parts' top ks.

Shared by corpus mode (fed from the GELU hooks), stage c (fed blocks of the bit-packed matrix) and the merge
of shards (totals added).
"""

import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from gelutrace import PipelineError
from gelutrace.files.atomic import write_npz

_INT_MM: dict = {}  # device type -> whether torch._int_mm works there (probed once)
INT_MM_MAX_ROWS = 2 ** 31 - 1
FLOAT32_MAX_ROWS = 2 ** 24 - 1


def _int_mm_works(device: torch.device) -> bool:
    """Whether torch._int_mm works on this device and, on a CPU, beats the float32 GEMM (probed once): CPUs
    without int8 dot-product instructions (AVX-512 VNNI, AMX; e.g. an AVX2-only EPYC) run it on a reference
    path some 50x slower than float32. Both are exact, so the choice changes the speed only."""
    if device.type not in _INT_MM:
        try:
            a = torch.ones((32, 32), dtype=torch.int8, device=device)
            works = bool(torch._int_mm(a, a)[0, 0] == 32)
        except (AttributeError, RuntimeError, NotImplementedError):
            works = False
        _INT_MM[device.type] = works and (device.type != "cpu" or _int8_beats_float32())
    return _INT_MM[device.type]


def _int8_beats_float32(d: int = 128, rows: int = 1024, rounds: int = 3) -> bool:

    g = torch.Generator().manual_seed(0)
    at = torch.randint(0, 2, (d, rows), dtype=torch.int8, generator=g)
    b = torch.randint(0, 2, (rows, d), dtype=torch.int8, generator=g)
    atf, bf = at.float(), b.float()

    def best(f):
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(lambda: torch._int_mm(at, b)) < best(lambda: atf @ bf)


def int8_product(at: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """
    at @ b of 0/1 int8 matrices at (d_a x rows, row-major) and b (rows x d_b), exact in int32 (rows < 2**31),
    by torch's int8 GEMM; None where this device's int8 GEMM is missing or does not take the shape.
    """
    rows = at.shape[1]
    if rows > INT_MM_MAX_ROWS or not _int_mm_works(at.device):
        return None
    pad = max(32, rows + (-rows) % 8) - rows  # int8 GEMM wants whole groups of 8 rows; zero rows add nothing
    if pad:
        at, b = torch.nn.functional.pad(at, (0, pad)), torch.nn.functional.pad(b, (0, 0, 0, pad))
    try:
        return torch._int_mm(at.contiguous(), b.contiguous())
    except RuntimeError:
        return None


def pair_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact a^T @ b (int64, d_a x d_b) of two rows x neurons boolean matrices."""
    c = int8_product(a.T.to(torch.int8), b.to(torch.int8))
    if c is not None:
        return c.to(torch.int64)
    ft = torch.float32 if a.shape[0] <= FLOAT32_MAX_ROWS else torch.float64
    return (a.T.to(ft) @ b.to(ft)).to(torch.int64)


class CoactivationCounts:
    """
    Running totals over samples. Feed a batch either layer by layer (`add_layer`, layers 0, 1, ... in
    order, as forward hooks see them) or from several processes (`all_reduce`); `merge` adds another set of totals.
    """

    def __init__(self, n_layer: int, d_mlp: int, device="cpu"):
        self.n_layer, self.d_mlp = n_layer, d_mlp
        self.device = torch.device(device)
        n = n_layer * d_mlp
        self.samples = 0
        self.node = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.value_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.pairs = torch.zeros((max(n_layer - 1, 0), d_mlp, d_mlp), dtype=torch.int64, device=self.device)
        self._prev = None

    def add_layer(self, layer: int, values: torch.Tensor | None = None, active: torch.Tensor | None = None):
        """One layer of a batch: `values` (rows x d_mlp post-GELU outputs) or only `active` (rows x d_mlp bool)."""
        if active is None:
            active = values > 0
        if layer == 0:
            self.samples += active.shape[0]
        cols = slice(layer * self.d_mlp, (layer + 1) * self.d_mlp)
        self.node[cols] += active.view(torch.int8).sum(dim=0, dtype=torch.int32)  # exact below 2**31 rows, fast
        if values is not None:
            self.value_sum[cols] += values.to(torch.float64).sum(dim=0)
        if layer > 0:
            self.pairs[layer - 1] += pair_product(self._prev, active)
        self._prev = active if layer < self.n_layer - 1 else None

    def merge(self, other: "CoactivationCounts"):
        if (other.n_layer, other.d_mlp) != (self.n_layer, self.d_mlp):
            raise PipelineError(f"cannot add counts of {other.n_layer} x {other.d_mlp} neurons to "
                                f"{self.n_layer} x {self.d_mlp}")
        self.samples += other.samples
        self.node += other.node.to(self.device)
        self.value_sum += other.value_sum.to(self.device)
        self.pairs += other.pairs.to(self.device)

    def all_reduce(self):
        """Sum the totals of every process of a torch.distributed group into each of them."""
        import torch.distributed as dist  # lazy: only torchrun runs need it

        samples = torch.tensor([self.samples], dtype=torch.int64, device=self.device)
        for t in (samples, self.node, self.value_sum, self.pairs):
            dist.all_reduce(t)
        self.samples = int(samples.item())

    # --- numpy views, checkpoints ---------------------------------------------------------------------------
    def node_counts(self) -> np.ndarray:
        return self.node.cpu().numpy()

    def pair_counts(self, i: int) -> np.ndarray:
        return self.pairs[i].cpu().numpy()

    def mean_activation(self) -> np.ndarray:
        s = self.value_sum.cpu().numpy()
        return s / self.samples if self.samples else np.zeros_like(s)

    def save(self, target, **extra):
        """An uncompressed .npz (written atomically) that `load` reads back without pickle."""
        write_npz(target, compress=False, samples=np.int64(self.samples), n_layer=np.int64(self.n_layer),
                  d_mlp=np.int64(self.d_mlp), node=self.node_counts(), value_sum=self.value_sum.cpu().numpy(),
                  pairs=self.pairs.cpu().numpy(), **extra)

    @classmethod
    def load(cls, source, device="cpu") -> "CoactivationCounts":
        p = Path(source)
        try:
            with np.load(p, allow_pickle=False) as z:
                c = cls(int(z["n_layer"]), int(z["d_mlp"]), device)
                c.samples = int(z["samples"])
                c.node = torch.from_numpy(z["node"]).to(c.device)
                c.value_sum = torch.from_numpy(z["value_sum"]).to(c.device)
                c.pairs = torch.from_numpy(z["pairs"]).to(c.device)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise PipelineError(f"cannot read checkpoint {p}: {e}") from None
        return c


class PackedMatrixCounts:
    """
    Stage c's exact counts of a saved bit-packed samples x neurons matrix (np.packbits, axis 1), computed one
    layer pair at a time over blocks of `block_rows` rows: only the packed matrix, one block of two layers and
    one d_mlp x d_mlp total are ever in memory. The int8 GEMM wants its left operand transposed (neurons x
    rows); that layer is unpacked straight into that layout from its transposed bytes, 8 times cheaper to
    transpose than the bits.
    """

    def __init__(self, packed: np.ndarray, n_layer: int, d_mlp: int, block_rows: int = 16384, progress=None):
        self.packed, self.n_layer, self.d_mlp = packed, n_layer, d_mlp
        self.block_rows, self.progress = block_rows, progress
        self._shifts = torch.arange(7, -1, -1, dtype=torch.uint8)

    def _blocks(self, rows: int | None = None):
        rows = rows or self.block_rows
        for lo in range(0, len(self.packed), rows):
            yield self.packed[lo:lo + rows]

    def _bits(self, block: np.ndarray, layer: int, count: int = 1) -> np.ndarray:
        """Layers layer .. layer + count - 1 of a block, unpacked: (rows x count * d_mlp) uint8 0/1."""
        d = self.d_mlp
        if d % 8 == 0:  # whole layers are whole bytes: unpack only their columns
            return np.unpackbits(block[:, layer * d // 8:(layer + count) * d // 8], axis=1)
        return np.unpackbits(block, axis=1, count=self.n_layer * d)[:, layer * d:(layer + count) * d]

    def _bits_transposed(self, block: np.ndarray, layer: int) -> torch.Tensor:
        """A layer of a block unpacked as (d_mlp x rows) int8 0/1, row-major."""
        d = self.d_mlp
        if d % 8:
            return torch.from_numpy(self._bits(block, layer).view(np.int8)).T.contiguous()
        packed_t = torch.from_numpy(block[:, layer * d // 8:(layer + 1) * d // 8]).T.contiguous()
        out = torch.empty((d // 8, 8, len(block)), dtype=torch.uint8)
        for bit in range(8):  # bit 0 is the most significant, as np.packbits packs
            o = out[:, bit, :]
            torch.bitwise_right_shift(packed_t, 7 - bit, out=o)
            o &= 1
        return out.view(d, len(block)).view(torch.int8)

    def node_counts(self) -> np.ndarray:
        total = np.zeros(self.n_layer * self.d_mlp, dtype=np.int64)
        # every layer at once: blocks of fewer rows keep the unpacked bits in cache (4 times faster here)
        for block in self._blocks(min(self.block_rows, 8192)):
            total += np.count_nonzero(self._bits(block, 0, self.n_layer).view(bool), axis=0)
        self._tick()
        return total

    def pair_counts(self, i: int) -> np.ndarray:
        d = self.d_mlp
        # int32 totals are exact below 2**31 samples and much cheaper to add to than int64
        dtype = torch.int32 if len(self.packed) <= INT_MM_MAX_ROWS else torch.int64
        total = torch.zeros((d, d), dtype=dtype)
        for block in self._blocks():
            b = torch.from_numpy(self._bits(block, i + 1).view(np.int8))
            c = int8_product(self._bits_transposed(block, i), b)
            if c is None:
                bits = torch.from_numpy(self._bits(block, i, 2).view(bool))
                c = pair_product(bits[:, :d], bits[:, d:])
            total += c.to(dtype)
        self._tick()
        return total.to(torch.int64).numpy()

    def _tick(self):
        if self.progress is not None:
            self.progress.update(1)

# --- each neuron's top-activating samples ---------------------------------------------------------------------
def _order_key(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One exact int64 per (value, id), larger for a larger value and, among equal values, for a lower id: the
    float32's bits made order-preserving as a signed int in the high half, 2^32 - 1 - id in the low half."""
    bits = (values.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 makes -0.0 +0.0: a tie, not less
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.long)  # negative floats: every bit but the sign flipped
    key <<= 32
    key += 2 ** 32 - 1
    key -= ids
    return key


class RunningTopK:
    """
    Each neuron's k largest post-GELU values seen so far and their sample ids (ties to the lower id; ids below
    2**32), kept on the model's device in O(neurons x k) memory. Exact whatever the batches and their order.

    Calls of few rows (prompt mode: one generation step) are buffered as they come and merged every
    `merge_rows` rows by one top-k over an exact key of every buffered value. A call of many rows (corpus
    mode: a batch of windows) is first compared with each neuron's current k-th value (or, before k are held,
    the call's own k-th): only the values that can still enter, few once a run is under way, become
    (value, id, column) candidates, merged at once by a sort (kept waiting, such small tensors would scatter
    the heap between the batches' large ones). A value below a neuron's k-th can never enter its top k; one
    equal to it is kept as a candidate.
    """

    def __init__(self, n_layer: int, d_mlp: int, k: int, device, merge_rows: int = 256):
        self.k, self.d, self.n_layer = k, d_mlp, n_layer
        self.device = torch.device(device)
        self.merge_rows = max(merge_rows, k)
        self.values = [torch.zeros((0, d_mlp), device=self.device) for _ in range(n_layer)]
        self.ids = [torch.zeros((0, d_mlp), dtype=torch.long, device=self.device) for _ in range(n_layer)]
        self.floor = [torch.full((d_mlp,), -torch.inf, device=self.device) for _ in range(n_layer)]
        self.rows = [[] for _ in range(n_layer)]  # buffered calls of few rows: (values, ids)
        self.waiting = [0] * n_layer  # buffered rows

    def add(self, layer: int, values: torch.Tensor, ids: torch.Tensor):
        """values (rows, d_mlp) of one layer, ids (rows,) their sample ids; rows with an id < 0 are ignored."""
        if len(values) <= self.merge_rows:
            self.rows[layer].append((values.to(torch.float32, copy=True), ids))
            self.waiting[layer] += len(values)
            if self.waiting[layer] >= self.merge_rows:
                self._merge(layer)
            return
        if self.rows[layer]:
            self._merge(layer)
        values = values.float()
        valid = (ids >= 0).view(-1, 1)
        if not bool(valid.all()):
            values = torch.where(valid, values, -torch.inf)
        floor = self.floor[layer]
        if len(self.values[layer]) < self.k:
            floor = torch.topk(values, self.k, dim=0).values[-1]  # this call's own k-th
        rows, cols = torch.nonzero((values >= floor) & valid, as_tuple=True)
        self._merge_candidates(layer, values[rows, cols], ids[rows], cols)
        self._set_floor(layer)

    def _merge(self, layer: int):
        if self.rows[layer]:
            self._merge_rows(layer)
        self.waiting[layer] = 0
        self._set_floor(layer)

    def _set_floor(self, layer: int):
        if len(self.values[layer]) == self.k:
            self.floor[layer] = self.values[layer][-1].clone()

    def _merge_rows(self, layer: int):
        v = torch.cat([self.values[layer]] + [b[0] for b in self.rows[layer]])
        ids = torch.cat([self.ids[layer]] + [b[1].view(-1, 1).expand(-1, self.d) for b in self.rows[layer]])
        self.rows[layer] = []
        valid = ids >= 0
        key = torch.where(valid, _order_key(v, ids), torch.iinfo(torch.long).min)
        n = min(self.k, int(valid[:, 0].sum()))  # every column sees the same rows
        best = torch.topk(key, n, dim=0).indices
        self.values[layer], self.ids[layer] = v.gather(0, best), ids.gather(0, best)

    def _merge_candidates(self, layer: int, values: torch.Tensor, ids: torch.Tensor, cols: torch.Tensor):
        held = self.ids[layer]
        v = torch.cat([self.values[layer].reshape(-1), values])
        ids = torch.cat([held.reshape(-1), ids])
        col = torch.cat([torch.arange(self.d, device=self.device).expand_as(held).reshape(-1), cols])
        # by key, largest first, then (stably) by column: each column's candidates in rank order
        order = torch.sort(_order_key(v, ids), descending=True, stable=True).indices
        order = order[torch.sort(col[order], stable=True).indices]
        col = col[order]
        per_col = torch.bincount(col, minlength=self.d)
        rank = torch.arange(len(col), device=self.device) - (torch.cumsum(per_col, 0) - per_col)[col]
        keep = rank < self.k
        n = min(self.k, int(per_col.min()))  # every column holds min(k, rows seen) once merged
        out_v = torch.empty((n, self.d), device=self.device)
        out_i = torch.empty((n, self.d), dtype=torch.long, device=self.device)
        out_v[rank[keep], col[keep]] = v[order][keep]
        out_i[rank[keep], col[keep]] = ids[order][keep]
        self.values[layer], self.ids[layer] = out_v, out_i

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, ids), each (k', n_layer * d_mlp) in rank order; k' the fewer of k and the samples seen."""
        for layer in range(self.n_layer):
            self._merge(layer)
        return (torch.cat(self.values, dim=1).double().cpu().numpy(), torch.cat(self.ids, dim=1).cpu().numpy())

    def load(self, values: np.ndarray, ids: np.ndarray):
        """Start from an earlier result() (a checkpoint)."""
        for layer in range(self.n_layer):
            cols = slice(layer * self.d, (layer + 1) * self.d)
            self.values[layer] = torch.as_tensor(values[:, cols], dtype=torch.float32, device=self.device)
            self.ids[layer] = torch.as_tensor(ids[:, cols], dtype=torch.long, device=self.device)
            if len(values) == self.k:
                self.floor[layer] = self.values[layer][-1].clone()


def merge_top(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """
    Per column, the k (value, id) pairs with the largest value, ties to the lower id, of the parts' (values, ids)
    arrays (rows, cols) stacked: the top k of a union from its parts' top ks, exactly.
    """
    values = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] for p in parts])
    order = np.lexsort((ids, -values), axis=0)[:k]
    return np.take_along_axis(values, order, axis=0), np.take_along_axis(ids, order, axis=0)
