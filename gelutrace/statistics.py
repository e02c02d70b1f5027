"""
Exact, mergeable activation statistics: the counts behind stage b's frequency file and stage c's graph,
accumulated a batch of samples at a time, so that no samples x neurons matrix is ever held whole.

For every neuron: how many samples it is active in (post-GELU output > 0) and the sum of its post-GELU
outputs; for every adjacent-layer pair (i, i+1): the d_mlp x d_mlp matrix of samples in which both neurons
are active. Each batch adds one matrix product per layer pair, A_i^T @ A_{i+1} over its 0/1 rows, in a type
exact for the batch's rows (int8 x int8 -> int32 where torch provides it, float32 otherwise, exact below
2**24 rows), into int64 totals. Counts are integers, so totals do not depend on how the samples were
batched, ordered or split into shards; the value sums are float64 (order changes them only in the last bits).

Shared by corpus mode (fed from the GELU hooks), stage c (fed blocks of the bit-packed matrix) and the merge
of shards (totals added).
"""

from pathlib import Path

import numpy as np
import torch

from gelutrace import PipelineError
from gelutrace.stagefiles import write_npz

_INT_MM: dict = {}  # device type -> whether torch._int_mm works there (probed once)
INT_MM_MAX_ROWS = 2 ** 31 - 1
FLOAT32_MAX_ROWS = 2 ** 24 - 1


def _int_mm_works(device: torch.device) -> bool:
    if device.type not in _INT_MM:
        try:
            a = torch.ones((32, 32), dtype=torch.int8, device=device)
            _INT_MM[device.type] = bool(torch._int_mm(a, a)[0, 0] == 32)
        except (AttributeError, RuntimeError, NotImplementedError):
            _INT_MM[device.type] = False
    return _INT_MM[device.type]


def pair_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact a^T @ b (int64, d_a x d_b) of two rows x neurons boolean matrices."""
    rows = a.shape[0]
    if rows <= INT_MM_MAX_ROWS and _int_mm_works(a.device):
        at, bt = a.T.to(torch.int8), b.to(torch.int8)
        pad = max(32, rows + (-rows) % 8) - rows  # int8 GEMM wants whole groups of 8 rows; zero rows add nothing
        if pad:
            at, bt = torch.nn.functional.pad(at, (0, pad)), torch.nn.functional.pad(bt, (0, 0, 0, pad))
        try:
            return torch._int_mm(at.contiguous(), bt.contiguous()).to(torch.int64)
        except RuntimeError:  # a shape this device's int8 GEMM does not take
            pass
    ft = torch.float32 if rows <= FLOAT32_MAX_ROWS else torch.float64
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
        import torch.distributed as dist

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
        except (OSError, KeyError, ValueError) as e:
            raise PipelineError(f"cannot read checkpoint {p}: {e}") from None
        return c


class PackedMatrixCounts:
    """
    Stage c's exact counts of a saved bit-packed samples x neurons matrix (np.packbits, axis 1), computed one
    layer pair at a time over blocks of `block_rows` rows: only the packed matrix, one block of two layers and
    one d_mlp x d_mlp total are ever in memory.
    """

    def __init__(self, packed: np.ndarray, n_layer: int, d_mlp: int, block_rows: int = 8192, progress=None):
        self.packed, self.n_layer, self.d_mlp = packed, n_layer, d_mlp
        self.block_rows, self.progress = block_rows, progress

    def _layers(self, first: int, count: int):
        """Blocks of rows of layers first .. first + count - 1 as (rows x count * d_mlp) boolean tensors."""
        d, n = self.d_mlp, self.n_layer * self.d_mlp
        for lo in range(0, len(self.packed), self.block_rows):
            block = self.packed[lo:lo + self.block_rows]
            if d % 8 == 0:  # whole layers are whole bytes: unpack only their columns
                bits = np.unpackbits(block[:, first * d // 8:(first + count) * d // 8], axis=1)
            else:
                bits = np.unpackbits(block, axis=1, count=n)[:, first * d:(first + count) * d]
            yield torch.from_numpy(bits.view(bool))

    def node_counts(self) -> np.ndarray:
        total = np.zeros(self.n_layer * self.d_mlp, dtype=np.int64)
        for rows in self._layers(0, self.n_layer):
            total += np.count_nonzero(rows.numpy(), axis=0)  # no int64 copy of the block, unlike a sum
        self._tick()
        return total

    def pair_counts(self, i: int) -> np.ndarray:
        total = torch.zeros((self.d_mlp, self.d_mlp), dtype=torch.int64)
        for rows in self._layers(i, 2):
            total += pair_product(rows[:, :self.d_mlp], rows[:, self.d_mlp:])
        self._tick()
        return total.numpy()

    def _tick(self):
        if self.progress is not None:
            self.progress.update(1)
