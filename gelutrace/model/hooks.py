"""
Forward hooks on a model, and their one owner. `NeuronHooks` registers a set of hooks when its `with` block
starts and removes every one when the block ends, error or not, and when registering fails part way. Every hook
class of the package builds on it; those that serve one stage live beside it (ActivationRecorder, CountingHooks,
DirectHooks, StepProgress). Only HFCausalLM's site pre-hooks stay for the model's life: they are part of it. Here:
- GeluHooks: a hook on every layer's neuron site (model.gelus(), every family); the recorders build on it.
- Ablation, RowAblation: the listed neurons' outputs replaced (by 0, or by a value per neuron such as its mean
  activation) at every position of every forward call (Ablation), or a different set of neurons per row of one
  batch (RowAblation), or one neuron at one position per row (PositionAblation).
- CleanPass, SiteMeans: what single-neuron effects and edge fidelity keep of a forward pass.
- StopAfter: a forward pass ended at a layer's neuron site, when nothing above it is needed.
- ResumePoints: what model.py's GPT.trunk_from resumes a pass from, kept from a full pass.
"""

import numpy as np
import torch


class NeuronHooks:
    """
    The owner of a set of hooks on `model`. Entering `with` calls register(), which adds the hooks through hook()
    and pre_hook() (they keep the handles); every one is removed on leaving the block, on an error inside it, and
    on an error inside register() itself. A subclass defines register(), or only site_hooks() for hooks on the
    neuron sites (model.gelus(), one module per layer whatever the family).
    """

    def __init__(self, model):
        self.model = model
        self.handles = []

    def site_hooks(self):
        """(layer, hook(module, inputs, output)) pairs, in the order they are registered."""
        return ()

    def register(self):
        sites = self.model.gelus()
        for layer, fn in self.site_hooks():
            self.hook(sites[layer], fn)

    def hook(self, module, fn):
        """fn(module, inputs, output) after module's forward; a value it returns replaces the output."""
        self.handles.append(module.register_forward_hook(fn))

    def pre_hook(self, module, fn):
        """fn(module, args) before module's forward; a value it returns replaces the args."""
        self.handles.append(module.register_forward_pre_hook(fn))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        try:
            self.register()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        self.remove()


class ResumePoints(NeuronHooks):
    """
    with ResumePoints(model, layers) as kept: for model.py's GPT, each listed layer's residual stream after its
    attention and its MLP's pre-activation in the forward pass run inside the block (kept.points[layer] = (x, pre)),
    what GPT.trunk_from resumes a pass from.
    """

    def __init__(self, model, layers):
        super().__init__(model)
        self.layers, self.points = sorted(set(layers)), {}

    def register(self):
        h = self.model.transformer.h
        for layer in self.layers:
            self.pre_hook(h[layer].ln_2, lambda module, args, layer=layer: self.points.__setitem__(layer, [args[0]]))
            self.hook(h[layer].mlp.c_fc, lambda module, args, out, layer=layer: self.points[layer].append(out))


class Stopped(Exception):
    """Raised by StopAfter's hook to end a forward pass early."""


class StopAfter(NeuronHooks):
    """
    with StopAfter(model, layer): a forward pass ends at that layer's neuron site, after the hooks registered there
    before this one (enter it last), for callers that need nothing of the layers above; the `with` block swallows
    the Stopped that ends it.
    """

    def __init__(self, model, layer: int):
        super().__init__(model)
        self.layer = layer

    def site_hooks(self):
        def stop(module, inputs, output):
            raise Stopped
        return ((self.layer, stop),)

    def __exit__(self, exc_type, exc, tb):
        self.remove()
        return exc_type is Stopped


class GeluHooks(NeuronHooks):
    """
    with GeluHooks(model, hook_for_layer): a forward hook on every layer's GELU (model.gelus(), either
    implementation), removed on leaving the block, error or not. hook_for_layer(layer) returns that layer's
    hook(module, inputs, output); a subclass may define _hook(layer) instead.
    """

    def __init__(self, model, hook_for_layer=None):
        super().__init__(model)
        self.hook_for_layer = hook_for_layer or self._hook

    def site_hooks(self):
        return ((i, self.hook_for_layer(i)) for i in range(len(self.model.gelus())))


# --- ablation hooks ---------------------------------------------------------------------------------------
class Ablation(NeuronHooks):
    """
    with Ablation(model, ids): ...  replaces the post-GELU outputs of neurons `ids` by 0 at every position;
    with Ablation(model, ids, values): by values[i] for ids[i] (e.g. each neuron's mean activation).
    Hooks go only on the layers that hold some of the neurons; an empty subset registers nothing.
    """

    def __init__(self, model, ids, values=None):
        super().__init__(model)
        d = model.config.d_mlp
        ids = np.asarray(ids, dtype=np.int64)
        device = next(model.parameters()).device
        dtype = model.transformer.wte.weight.dtype
        self.layers = {}
        for layer in np.unique(ids // d):
            sel = ids // d == layer
            dims = torch.as_tensor(ids[sel] % d, device=device)
            vals = None if values is None else torch.as_tensor(np.asarray(values, np.float64)[sel], dtype=dtype,
                                                               device=device)
            self.layers[int(layer)] = (dims, vals)

    @staticmethod
    def _hook(dims, vals):
        if vals is None:
            def hook(module, inputs, output):
                return output.index_fill_(-1, dims, 0.0)
        else:
            def hook(module, inputs, output):
                output[..., dims] = vals
                return output
        return hook

    def site_hooks(self):
        return ((layer, self._hook(dims, vals)) for layer, (dims, vals) in self.layers.items())


class RowAblation(NeuronHooks):
    """
    with RowAblation(model, [ids_0, ..., ids_{G-1}], rows): a batch of G * rows sequences, the g-th block of
    `rows` ablating the neurons ids_g (replaced by 0, or by `values` per neuron id): many ablations in one
    forward pass, one set of neurons per block of rows. `rows` may also list each block's row count. Hooks go
    only on layers where some block ablates a neuron, and write only the (row, neuron) pairs ablated.
    """

    def __init__(self, model, groups: list[np.ndarray], rows, values: np.ndarray | None = None):
        super().__init__(model)
        d_mlp = model.config.d_mlp
        device = next(model.parameters()).device
        dtype = model.transformer.wte.weight.dtype
        counts = np.full(len(groups), rows, np.int64) if np.ndim(rows) == 0 else np.asarray(rows, np.int64)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        # every (row, neuron) pair ablated: each of a block's rows with each of its neurons
        row = np.concatenate([np.repeat(np.arange(f, f + c), len(g)) for f, c, g in zip(first, counts, groups)]
                             + [np.zeros(0, np.int64)])
        unit = np.concatenate([np.tile(np.asarray(g, np.int64), c) for c, g in zip(counts, groups)]
                              + [np.zeros(0, np.int64)])
        fill = np.zeros(len(unit)) if values is None else np.asarray(values, np.float64)[unit]
        self.pairs = {}
        for layer in np.unique(unit // d_mlp):
            at = unit // d_mlp == layer
            self.pairs[int(layer)] = tuple(torch.as_tensor(a, device=device) for a in (
                row[at], unit[at] % d_mlp)) + (torch.tensor(fill[at], dtype=dtype, device=device)[:, None],)

    def _hook(self, layer):
        rows, dims, fill = self.pairs[layer]

        def hook(module, inputs, output):
            output.transpose(1, 2).index_put_((rows, dims), fill)  # output[rows[j], :, dims[j]] = fill[j]
            return output
        return hook

    def site_hooks(self):
        return ((layer, self._hook(layer)) for layer in self.pairs)


class PositionAblation(NeuronHooks):
    """
    with PositionAblation(model, layers, positions, dims): row r of the batch has neuron dims[r] of layer
    layers[r] zeroed at position positions[r] (of the forward call's sequence) alone; every other neuron, position
    and row is untouched. Hooks go only on the layers named.
    """

    def __init__(self, model, layers, positions, dims):
        super().__init__(model)
        device = next(model.parameters()).device
        layers, positions, dims = (np.asarray(a, np.int64) for a in (layers, positions, dims))
        self.sites = {int(layer): tuple(torch.as_tensor(a[layers == layer], device=device)
                                        for a in (np.arange(len(layers)), positions, dims))
                      for layer in np.unique(layers)}

    def _hook(self, layer):
        rows, positions, dims = self.sites[layer]

        def hook(module, inputs, output):
            output[rows, positions, dims] = 0.0
            return output
        return hook

    def site_hooks(self):
        return ((layer, self._hook(layer)) for layer in self.sites)


# --- what a clean pass keeps ------------------------------------------------------------------------------
class CleanPass(NeuronHooks):
    """
    with CleanPass(model, layer) (model.py's GPT-2): keeps, of each forward pass, one layer's post-GELU outputs
    (acts), its block's output (resid) and the final layer norm's output (final).
    """

    def __init__(self, model, layer: int):
        super().__init__(model)
        self.layer = layer

    def register(self):
        block = self.model.transformer.h[self.layer]
        self.hook(block.mlp.gelu, lambda m, i, o: setattr(self, "acts", o))
        self.hook(block, lambda m, i, o: setattr(self, "resid", o))
        self.hook(self.model.transformer.ln_f, lambda m, i, o: setattr(self, "final", o))


class SiteMeans(NeuronHooks):
    """Forward hooks on the neuron sites: per copy of the samples, the weighted mean value of every neuron of the
    recorded layers; with `zero` (layer, dims per copy), each copy's own neuron of that layer is zeroed."""

    def __init__(self, model, layers, weights: torch.Tensor, copies: int, zero: tuple | None = None):
        super().__init__(model)
        self.layers, self.copies, self.zero = set(layers), copies, zero
        w = weights.repeat(copies, 1)  # (copies * B, T)
        self.w = w.reshape(copies, -1)  # (copies, B * T)
        self.total = self.w.sum(dim=1, keepdim=True)
        self.means = {}

    def site_hooks(self):
        return ((j, self._hook(j)) for j in range(len(self.model.gelus()))
                if j in self.layers or (self.zero is not None and j == self.zero[0]))

    def _hook(self, j):
        def hook(module, inputs, output):
            out = output
            if self.zero is not None and j == self.zero[0]:
                dims = self.zero[1]
                rows = output.shape[0] // self.copies
                mask = torch.ones(self.copies, output.shape[-1], dtype=output.dtype, device=output.device)
                mask[torch.arange(self.copies, device=output.device), dims] = 0
                out = output * mask.repeat_interleave(rows, dim=0).view(output.shape[0], *([1] * (output.dim() - 2)),
                                                                        output.shape[-1])
            if j in self.layers:
                v = out.detach().reshape(self.copies, -1, out.shape[-1]).float()
                self.means[j] = (torch.einsum("cn,cnd->cd", self.w, v) / self.total).double().cpu().numpy()
            return out
        return hook
