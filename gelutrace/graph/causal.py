"""
The causal edge weights of a graph (CausalEdges): the direct effects stage b measured (gelutrace.record.direct)
as means over samples, per pair of layers, with each neuron's direct effect on the loss.
"""

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gelutrace import PipelineError
from gelutrace.files import atomic, layout


@dataclass
class CausalEdges:
    """
    The direct-effect weights of a graph (gelutrace.record.direct), as means over samples: per layer pair (i, j) in
    `pairs` the d_mlp x d_mlp matrices direct and direct_abs (arrays, or .npy paths read memory-mapped), and per
    neuron in id order the mean direct_loss and |direct_loss| per scored token, the mean |value| per sample and
    write_norm, the norm of the neuron's output weight vector ||w_out,u|| (None in a record stage b wrote before it
    kept them).
    """
    pairs: list  # [(i, j)], i < j
    direct: list
    direct_abs: list
    loss: np.ndarray
    loss_abs: np.ndarray
    value_abs: np.ndarray
    samples: float
    loss_tokens: float
    edges: str = "adjacent"
    gated: bool = False
    write_norm: np.ndarray | None = None

    ARRAYS = ("loss", "loss_abs", "value_abs")

    def matrix(self, name: str, k: int) -> np.ndarray:
        m = getattr(self, name)[k]
        if callable(m):  # a merge's, computed when read
            return m()
        return np.load(m, mmap_mode="r", allow_pickle=False) if isinstance(m, (str, Path)) else m

    def pair_index(self, i: int, j: int) -> int:
        try:
            return self.pairs.index((i, j))
        except ValueError:
            raise PipelineError(f"the direct-effect weights have no layer pair ({i}, {j})") from None

    def header(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs], "samples": self.samples, "loss_tokens": self.loss_tokens,
                "edges": self.edges, "gated": self.gated, "write_norm": self.write_norm is not None}

    @staticmethod
    def merge(parts: list) -> "CausalEdges":
        """Runs on disjoint samples as one: each mean weighted by its run's samples (to float64 rounding); the
        write norms, the model's, are the same in every run (None when a run has none)."""
        first = parts[0]
        if any((p.pairs, p.edges, p.gated) != (first.pairs, first.edges, first.gated) for p in parts):
            raise PipelineError("cannot merge direct-effect weights of other layer pairs")
        norms = [p.write_norm for p in parts]
        write_norm = None if any(w is None for w in norms) else np.asarray(norms[0], np.float64)
        if write_norm is not None and not all(np.allclose(w, write_norm, rtol=1e-9, atol=0) for w in norms):
            raise PipelineError("cannot merge direct-effect weights of models with other output weights")
        n = np.array([p.samples for p in parts], np.float64)
        nl = np.array([p.loss_tokens for p in parts], np.float64)
        wn, wl = n / max(n.sum(), 1.0), nl / max(nl.sum(), 1.0)

        def mean(get, w):  # read when written: one matrix of each part in memory at a time
            return lambda: sum(wi * np.asarray(get(p), np.float64) for wi, p in zip(w, parts))

        K = range(len(first.pairs))
        return CausalEdges(first.pairs, [mean(lambda p, k=k: p.matrix("direct", k), wn) for k in K],
                           [mean(lambda p, k=k: p.matrix("direct_abs", k), wn) for k in K],
                           mean(lambda p: p.loss, wl)(), mean(lambda p: p.loss_abs, wl)(),
                           mean(lambda p: p.value_abs, wn)(), float(n.sum()), float(nl.sum()), first.edges,
                           first.gated, write_norm)

    def arrays(self):
        """(name, array) of every array, by its name in stage b's .npz and the graph store (layout.GRAPH_STORE_DIRECT
        ...), one at a time."""
        for k, (i, j) in enumerate(self.pairs):
            yield layout.GRAPH_STORE_DIRECT.format(src=i, tgt=j)[:-4], np.asarray(self.matrix("direct", k), np.float64)
            yield (layout.GRAPH_STORE_DIRECT_ABS.format(src=i, tgt=j)[:-4],
                   np.asarray(self.matrix("direct_abs", k), np.float64))
        for name, file in zip(self.ARRAYS, layout.GRAPH_STORE_DIRECT_NODES):
            yield file[:-4], np.asarray(getattr(self, name), np.float64)
        if self.write_norm is not None:
            yield layout.GRAPH_STORE_DIRECT_WRITE_NORM[:-4], np.asarray(self.write_norm, np.float64)

    @classmethod
    def from_arrays(cls, header: dict, get, n_neurons: int, d_mlp: int, where) -> "CausalEdges":
        """The weights from a header (as header() gives) and get(name) -> array (arrays() names), checked."""
        try:
            pairs = [tuple(int(x) for x in p) for p in header["pairs"]]
            samples, loss_tokens = float(header["samples"]), float(header["loss_tokens"])
            edges, gated = str(header["edges"]), bool(header["gated"])
            with_norm = bool(header.get("write_norm", False))  # a record of an older stage b has none
        except (KeyError, TypeError, ValueError) as e:
            raise PipelineError(f"{where}: the direct-effect record is damaged ({e})") from None

        n_layer = n_neurons // d_mlp
        want = {"adjacent": [(i, i + 1) for i in range(n_layer - 1)],
                "all": [(i, j) for i in range(n_layer) for j in range(i + 1, n_layer)]}.get(edges)
        if want is None or pairs != want:
            raise PipelineError(f"{where}: the direct-effect record's pairs are not the {edges!r} layer pairs of "
                                f"{n_layer} layers")
        if not (np.isfinite([samples, loss_tokens]).all() and samples >= 0 and loss_tokens >= 0):
            raise PipelineError(f"{where}: the direct-effect record counts {samples} samples, {loss_tokens} tokens")

        def checked(name, shape, nonnegative=False):  # one pass over each array: damage is refused, not used
            a = get(name)
            if a.shape != shape or a.dtype != np.float64:
                raise PipelineError(f"{where}: {name} holds {a.dtype} {a.shape}, expected float64 {shape}")
            if not np.isfinite(a).all() or (nonnegative and (a < 0).any()):
                raise PipelineError(f"{where}: {name} holds {'non-finite' if not np.isfinite(a).all() else 'negative'} "
                                    f"values; it is damaged")
            return a

        d = (d_mlp, d_mlp)
        direct = [checked(layout.GRAPH_STORE_DIRECT.format(src=i, tgt=j)[:-4], d) for i, j in pairs]
        absolute = [checked(layout.GRAPH_STORE_DIRECT_ABS.format(src=i, tgt=j)[:-4], d, True) for i, j in pairs]
        nodes = [checked(f[:-4], (n_neurons,), nonneg) for f, nonneg in zip(layout.GRAPH_STORE_DIRECT_NODES,
                                                                            (False, True, True))]
        norm = checked(layout.GRAPH_STORE_DIRECT_WRITE_NORM[:-4], (n_neurons,), True) if with_norm else None
        return cls(pairs, direct, absolute, *nodes, samples, loss_tokens, edges, gated, norm)

    def influence(self) -> np.ndarray:
        """
        Each neuron's influence on the output through the causal graph, I = s + |E~| I over the layer DAG, by one
        back-substitution from the last layer: s_u the mean |direct_loss|, E~_uv = |E_uv| / mean_t |a_v(t)| (E the
        signed `direct` weight), the share of v's value that u's write moves, so that |E~_uv| I_v is the loss
        effect through v of the part of v that u drives. float64, neuron id order.
        """
        inf = np.array(self.loss_abs, dtype=np.float64)
        d = self.matrix("direct", 0).shape[0] if self.pairs else len(inf)
        scale = np.divide(1.0, self.value_abs, out=np.zeros(len(inf)), where=np.asarray(self.value_abs) > 0)
        for i in sorted({i for i, _ in self.pairs}, reverse=True):  # every target layer j > i is final by now
            for k, (src, j) in enumerate(self.pairs):
                if src == i:
                    target = inf[j * d:(j + 1) * d] * scale[j * d:(j + 1) * d]
                    inf[i * d:(i + 1) * d] += np.abs(self.matrix("direct", k)) @ target
        return inf

    def write_npz(self, target, halves: list | None = None):
        """Stage b's prompt-mode file (layout.DIRECT_EDGES): every array and the header, and those of each half of the
        prompt rows (gelutrace.selection.stability) under the prefix half{h}_; no pickle."""
        arrays = dict(self.arrays(), header=np.array(json.dumps(self.header())))
        for h, part in enumerate(halves or []):
            arrays.update({f"half{h}_{k}": v for k, v in part.arrays()},
                          **{f"half{h}_header": np.array(json.dumps(part.header()))})
        atomic.write_npz(target, compress=False, **arrays)

    @classmethod
    def read_npz(cls, path, n_neurons: int, d_mlp: int, half: int | None = None) -> "CausalEdges | None":
        """The weights of stage b's file, or of one half of its prompt rows (None when it has no halves)."""
        p = Path(path)
        pre = "" if half is None else f"half{half}_"
        try:
            with np.load(p, allow_pickle=False) as z:
                if f"{pre}header" not in z.files and half is not None:
                    return None
                header = json.loads(str(z[f"{pre}header"]))
                return cls.from_arrays(header, lambda name: z[pre + name], n_neurons, d_mlp, p)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise PipelineError(f"cannot read {p}: {e}") from None
