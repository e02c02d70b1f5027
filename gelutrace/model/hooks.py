"""
Forward hooks on the neuron site that change what the model computes: the listed neurons' outputs replaced
(by 0, or by a value per neuron such as its mean activation) at every position of every forward call
(Ablation), or a different set of neurons per row of one batch (RowAblation).
"""

import numpy as np
import torch


# --- ablation hooks ---------------------------------------------------------------------------------------
class Ablation:
    """
    with Ablation(model, ids): ...  replaces the post-GELU outputs of neurons `ids` by 0 at every position;
    with Ablation(model, ids, values): by values[i] for ids[i] (e.g. each neuron's mean activation).
    Hooks go only on the layers that hold some of the neurons; an empty subset registers nothing.
    """

    def __init__(self, model, ids, values=None):
        d = model.config.d_mlp
        ids = np.asarray(ids, dtype=np.int64)
        device = next(model.parameters()).device
        dtype = model.transformer.wte.weight.dtype
        self.model = model
        self.layers = {}
        for layer in np.unique(ids // d):
            sel = ids // d == layer
            dims = torch.as_tensor(ids[sel] % d, device=device)
            vals = None if values is None else torch.as_tensor(np.asarray(values, np.float64)[sel], dtype=dtype,
                                                               device=device)
            self.layers[int(layer)] = (dims, vals)
        self.handles = []

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

    def __enter__(self):
        gelus = self.model.gelus()
        self.handles = [gelus[layer].register_forward_hook(self._hook(dims, vals))
                        for layer, (dims, vals) in self.layers.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


class RowAblation:
    """
    with RowAblation(model, [ids_0, ..., ids_{G-1}], rows): a batch of G * rows sequences, the g-th block of
    `rows` ablating the neurons ids_g (replaced by 0, or by `values` per neuron id): many ablations in one
    forward pass, one mask per batch row. Hooks go only on layers where some block ablates a neuron.
    """

    def __init__(self, model, groups: list[np.ndarray], rows: int, values: np.ndarray | None = None):
        cfg = model.config
        device = next(model.parameters()).device
        dtype = model.transformer.wte.weight.dtype
        self.model = model
        self.masks = {}
        for g, ids in enumerate(groups):
            ids = np.asarray(ids, np.int64)
            for layer in np.unique(ids // cfg.d_mlp):
                keep = self.masks.setdefault(int(layer), torch.ones(len(groups) * rows, cfg.d_mlp, dtype=torch.bool))
                keep[g * rows:(g + 1) * rows, torch.as_tensor(ids[ids // cfg.d_mlp == layer] % cfg.d_mlp)] = False
        self.masks = {layer: m.to(device)[:, None, :] for layer, m in self.masks.items()}
        self.fill = {layer: (torch.zeros((), dtype=dtype, device=device) if values is None else
                             torch.tensor(np.asarray(values, np.float64)[layer * cfg.d_mlp:(layer + 1) * cfg.d_mlp],
                                          dtype=dtype, device=device))
                     for layer in self.masks}
        self.handles = []

    def _hook(self, layer):
        keep, fill = self.masks[layer], self.fill[layer]

        def hook(module, inputs, output):
            return torch.where(keep, output, fill)
        return hook

    def __enter__(self):
        gelus = self.model.gelus()
        self.handles = [gelus[layer].register_forward_hook(self._hook(layer)) for layer in self.masks]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
