"""
The causal neuron graph: an edge (u, v) is the direct effect of neuron u's output on neuron v's value, through
the residual stream only, with the normalisation scales held fixed.

Neuron u = (layer i, dimension p) has value a_u(t) at the neuron site and writes a_u(t) * w_u into the residual
stream, w_u = W_out^i[p, :] (row p of the output projection). Neuron v = (layer j > i, dimension q) reads the
stream x(t) through its MLP's norm N_j: its pre-activation is z_v(t) = N_j(x(t)) . W_in^j[:, q] + b_q. With the
norm's scale sigma_j(t) held, u's write moves z_v by a_u(t) c_uv / sigma_j(t), where the coupling

    c_uv = w_u . P (gamma_j * W_in^j[:, q])     (LayerNorm; P the centring projection)
    c_uv = w_u . (gamma_j * W_in^j[:, q])       (RMSNorm, with the family's own gain: 1 + weight for Gemma)

is fixed by the weights. The edge weights are means over the samples t:

    direct      E_uv = c_uv * mean_t[a_u(t) f'(z_v(t)) / sigma_j(t)]          first-order change of v's value
    direct_abs  |c_uv| * mean_t[|a_u(t)| |f'(z_v(t))| / sigma_j(t)]

f the activation. A gated unit (value act(g) * up) has one coupling through the gate and one through up:
`direct` sums the two terms, `direct_abs` sums their absolute values (an upper bound of |direct| per sample).
Each sum is one float32 GEMM per layer pair per batch, A_i^T diag(w / sigma_j) F'_j (w the samples' weights),
added into float64 totals; the couplings multiply the totals once at the end. What the weights ignore: every
path through attention and through the MLPs in between, the change of the norm scales, and second-order terms;
`edge_fidelity` measures how much that matters.

Every neuron also has `direct_loss`: the direct effect of its write on the real next token's NLL through the
final norm (scale held) and the unembedding, a_u(t) w_u . G(t) with G(t) the NLL's gradient with respect to the
final residual stream at fixed scale; its mean and the mean of its absolute value are kept. Ablating u changes
the NLL by about -direct_loss along that path.

Every neuron's write norm ||w_u|| (float64, from the weights alone) is kept beside them, for the magnitude
baseline of stage d (mean |a_u| ||w_u||, the size of what the neuron writes into the stream).

Sums of shards and of torchrun processes add up to the whole run's; the batch products are float32, so a run
batched differently agrees to float32 rounding of the products (to float64 rounding when the batches match).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.graph.causal import CausalEdges
from gelutrace.graph.store import available_memory
from gelutrace.model.generation import left_pad
from gelutrace.model.hooks import NeuronHooks
from gelutrace.model.sites import FAMILIES

EDGE_SETS = ("adjacent", "all")
HEAD_LOGITS = 2 ** 22  # most logits (rows x vocab) one pass of the NLL's gradient holds


# --- where each family keeps the pieces ----------------------------------------------------------------------
@dataclass
class Norm:
    """A LayerNorm or RMSNorm as the direct path sees it: y = gain * (P x) / sigma(x) + bias."""
    module: nn.Module
    centred: bool
    gain: torch.Tensor
    eps: float
    dtype: torch.dtype = torch.float32  # the module's own

    def inv_sigma(self, x: torch.Tensor) -> torch.Tensor:
        """1 / sigma(x) of rows x (rows, d), float32."""
        x = x.float()
        var = x.var(dim=-1, unbiased=False) if self.centred else x.pow(2).mean(dim=-1)
        return torch.rsqrt(var + self.eps)

    def held(self, g: torch.Tensor) -> torch.Tensor:
        """dL/dx at fixed sigma from dL/dy (rows, d), before the 1 / sigma factor."""
        g = g * self.gain
        return g - g.mean(dim=-1, keepdim=True) if self.centred else g

    def coupling_rhs(self, w_in: torch.Tensor) -> torch.Tensor:
        """P (gain * W_in) of an input weight W_in (d_model, d_mlp), float64."""
        m = self.gain.double().view(-1, 1) * w_in.double()
        return m - m.mean(dim=0, keepdim=True) if self.centred else m


def _norm(module: nn.Module, where: str) -> Norm:
    """The module's parameters, checked against its own output on a probe: a norm of another convention is refused."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        d = module.normalized_shape[-1]
        gain = module.weight.detach() if module.weight is not None else torch.ones(d)
        bias = module.bias.detach() if module.bias is not None else torch.zeros(d)
        norm = Norm(module, True, gain.float(), float(module.eps))
    elif name.endswith("RMSNorm"):
        w = module.weight.detach().float()
        gain = 1 + w if name.startswith("Gemma") else w
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            raise PipelineError(f"{where}: {name} has no epsilon this pipeline knows")
        bias = torch.zeros_like(w)
        norm = Norm(module, False, gain, float(eps))
    else:
        raise PipelineError(f"{where}: the direct path through a {name} is not known (LayerNorm or RMSNorm)")
    x = torch.randn(4, gain.numel(), generator=torch.Generator().manual_seed(0)).to(gain.device) * 3 + 1
    centred = x - x.mean(dim=-1, keepdim=True) if norm.centred else x
    want = norm.gain * centred * norm.inv_sigma(x).view(-1, 1) + bias.float().to(gain.device)
    norm.dtype = next(module.parameters(), gain).dtype
    with torch.no_grad():
        got = module(x.to(norm.dtype)).float()
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise PipelineError(f"{where}: {name} does not compute gain * x / sigma(x) + bias as this pipeline assumes")
    return norm


@dataclass
class Layer:
    norm: Norm  # the norm in front of the MLP: its input is the stream x(t) the neurons read
    fc: tuple  # the input linear(s): (fc,) or (gate, up)
    act: nn.Module  # the activation (of the gate, for a gated MLP)
    proj: nn.Linear  # the output projection: w_u = proj.weight[:, p]

    @property
    def gated(self) -> bool:
        return len(self.fc) == 2


@dataclass
class Anatomy:
    layers: list
    final_norm: Norm
    final_input: tuple  # (module, "output" | "pre"): where the stream entering the final norm is read
    head: object  # final-norm output -> logits

    @property
    def gated(self) -> bool:
        return self.layers[0].gated


def _get(root, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


# family -> (MLP norm, input linear(s), activation, final norm); paths relative to a layer / to the model
PATHS = {
    "gpt_neox": ("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp.act", "gpt_neox.final_layer_norm"),
    "gpt_neo": ("ln_2", ("mlp.c_fc",), "mlp.act", "transformer.ln_f"),
    "gptj": ("ln_1", ("mlp.fc_in",), "mlp.act", "transformer.ln_f"),
    "opt": ("final_layer_norm", ("fc1",), "activation_fn", "model.decoder.final_layer_norm"),
    "bloom": ("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp.gelu_impl", "transformer.ln_f"),
    "phi": ("input_layernorm", ("mlp.fc1",), "mlp.activation_fn", "model.final_layernorm"),
    "gpt_bigcode": ("ln_2", ("mlp.c_fc",), "mlp.act", "transformer.ln_f"),
    "falcon": (None, ("mlp.dense_h_to_4h",), "mlp.act", "transformer.ln_f"),
    **{t: ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.act_fn", "model.norm")
       for t in ("llama", "mistral", "qwen2", "gemma")},
}


def _falcon_norm(cfg) -> str:
    if cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 2:
        return "ln_mlp"
    return "input_layernorm" if cfg.parallel_attn else "post_attention_layernorm"


def anatomy(model) -> Anatomy:
    """The pieces of the direct path of a model.py GPT or an HFCausalLM; families whose MLP output does not reach
    the stream unnormalised (post-LN OPT, BLOOM's residual after the norm) are refused."""

    if not hasattr(model, "hf"):  # model.py
        blocks = model.transformer.h
        layers = [Layer(_norm(b.ln_2, f"layer {i} ln_2"), (b.mlp.c_fc,), b.mlp.gelu, b.mlp.c_proj)
                  for i, b in enumerate(blocks)]
        return Anatomy(layers, _norm(model.transformer.ln_f, "ln_f"), (blocks[-1], "output"), model.lm_head)
    hf, arch = model.hf, model.config.architecture
    cfg = hf.config
    if arch == "opt" and not cfg.do_layer_norm_before:
        raise PipelineError("--direct_edges: this OPT normalises after each block (do_layer_norm_before false), so "
                            "a neuron's write does not reach later layers unnormalised")
    if arch == "bloom" and cfg.apply_residual_connection_post_layernorm:
        raise PipelineError("--direct_edges: this BLOOM adds the normalised stream to the residual "
                            "(apply_residual_connection_post_layernorm)")
    norm_path, fc_paths, act_path, final_path = PATHS[arch]
    norm_path = norm_path or _falcon_norm(cfg)
    fam = FAMILIES[arch]
    layers = []
    for i, layer in enumerate(_get(hf, fam.layers)):
        layers.append(Layer(_norm(_get(layer, norm_path), f"layer {i} {norm_path}"),
                            tuple(_get(layer, p) for p in fc_paths), _get(layer, act_path), _get(layer, fam.proj)))
    final = _get(hf, final_path)
    if final is None:
        raise PipelineError("--direct_edges: this model has no final norm")
    lm_head = hf.get_output_embeddings()
    project_out = getattr(getattr(getattr(hf, "model", None), "decoder", None), "project_out", None)
    head = lm_head if project_out is None else nn.Sequential(project_out, lm_head)
    return Anatomy(layers, _norm(final, final_path), (final, "pre"), head)


def layer_pairs(n_layer: int, edges: str) -> list[tuple[int, int]]:
    if edges not in EDGE_SETS:
        raise PipelineError(f"--edges must be one of {', '.join(EDGE_SETS)}, got {edges!r}")
    if edges == "adjacent":
        return [(i, i + 1) for i in range(n_layer - 1)]
    return [(i, j) for i in range(n_layer) for j in range(i + 1, n_layer)]


def memory_needed(n_layer: int, d_mlp: int, edges: str, gated: bool) -> int:
    """Bytes of the running float64 totals (signed and absolute, per coupling term) and of the weights they give."""
    terms = 2 if gated else 1
    return len(layer_pairs(n_layer, edges)) * d_mlp * d_mlp * 8 * (2 * terms + 2)


def direct_totals(model, edges: str, device) -> tuple["DirectEdges", Anatomy]:
    """Empty totals for `model` over the layer pairs `edges`, once their memory is known to fit (printed)."""

    cfg = model.config
    an = anatomy(model)
    need = memory_needed(cfg.n_layer, cfg.d_mlp, edges, an.gated)
    dev = torch.device(device)
    have = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else available_memory()
    tqdm.write(f"--direct_edges {edges}: {len(layer_pairs(cfg.n_layer, edges))} layer pairs, {need / 2**30:.2f} GiB of "
          f"float64 totals on {dev.type} ({have / 2**30:.1f} GiB free)")
    if need > have:
        raise PipelineError(f"--direct_edges {edges} needs {need / 2**30:.1f} GiB for its totals but "
                            f"{have / 2**30:.1f} GiB is free on {dev.type}; use --edges adjacent or a larger machine")
    return DirectEdges(cfg.n_layer, cfg.d_mlp, edges, an.gated, dev), an


# --- the running totals ----------------------------------------------------------------------------------------
class DirectEdges:
    """
    Running float64 sums over samples, per layer pair (i, j) and coupling term k (1; 2 for gated units):
    signed[pair, k] = sum_t w(t) a_i(t)^T F'_jk(t) / sigma_j(t) and absolute[...] the same of |a| and |F'|;
    per neuron, loss = sum_t w_l(t) a_u(t) w_u . G(t) and loss_abs of its absolute value. samples = sum w(t),
    loss_tokens = sum w_l(t).
    """

    def __init__(self, n_layer: int, d_mlp: int, edges: str = "adjacent", gated: bool = False, device="cpu",
                 pairs: list | None = None):
        """pairs: only these layer pairs of the edge set (in memory only, e.g. the ones an edge sample needs)."""
        self.n_layer, self.d_mlp, self.edges, self.gated = n_layer, d_mlp, edges, gated
        self.pairs = layer_pairs(n_layer, edges) if pairs is None else list(pairs)
        self.device = torch.device(device)
        terms = 2 if gated else 1
        shape = (len(self.pairs), terms, d_mlp, d_mlp)
        self.signed = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.absolute = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.loss = torch.zeros(n_layer * d_mlp, dtype=torch.float64, device=self.device)
        self.loss_abs = torch.zeros_like(self.loss)
        self.value_abs = torch.zeros_like(self.loss)  # sum_t w(t) |a_u(t)|, for influence's shares
        self.samples = 0.0
        self.loss_tokens = 0.0

    ARRAYS = ("signed", "absolute", "loss", "loss_abs", "value_abs")

    def merge(self, other: "DirectEdges"):
        if (other.n_layer, other.d_mlp, other.edges, other.gated) != (self.n_layer, self.d_mlp, self.edges, self.gated):
            raise PipelineError("cannot add direct-effect sums of another shape or edge set")
        for name in self.ARRAYS:
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.samples += other.samples
        self.loss_tokens += other.loss_tokens

    def all_reduce(self):
        import torch.distributed as dist  # lazy: only torchrun runs need it

        totals = torch.tensor([self.samples, self.loss_tokens], dtype=torch.float64, device=self.device)
        for t in (totals, *(getattr(self, n) for n in self.ARRAYS)):
            dist.all_reduce(t)
        self.samples, self.loss_tokens = float(totals[0]), float(totals[1])

    def state(self) -> dict:
        """Arrays for a checkpoint's .npz, read back by load_state without pickle."""
        return {"direct_signed": self.signed.cpu().numpy(), "direct_absolute": self.absolute.cpu().numpy(),
                "direct_loss_sum": self.loss.cpu().numpy(), "direct_loss_abs_sum": self.loss_abs.cpu().numpy(),
                "direct_value_abs_sum": self.value_abs.cpu().numpy(),
                "direct_samples": np.float64(self.samples), "direct_loss_tokens": np.float64(self.loss_tokens),
                "direct_edges": np.array(self.edges), "direct_gated": np.bool_(self.gated),
                "direct_shape": np.array([self.n_layer, self.d_mlp], np.int64)}

    def load_state(self, z, where):
        try:
            if (tuple(z["direct_shape"]) != (self.n_layer, self.d_mlp) or str(z["direct_edges"]) != self.edges
                    or bool(z["direct_gated"]) != self.gated):
                raise PipelineError(f"{where}: direct-effect sums of another model or edge set")
            self.signed = torch.from_numpy(z["direct_signed"]).to(self.device)
            self.absolute = torch.from_numpy(z["direct_absolute"]).to(self.device)
            self.loss = torch.from_numpy(z["direct_loss_sum"]).to(self.device)
            self.loss_abs = torch.from_numpy(z["direct_loss_abs_sum"]).to(self.device)
            self.value_abs = torch.from_numpy(z["direct_value_abs_sum"]).to(self.device)
            self.samples, self.loss_tokens = float(z["direct_samples"]), float(z["direct_loss_tokens"])
        except (KeyError, ValueError) as e:
            raise PipelineError(f"cannot read the direct-effect sums of {where}: {e}") from None
        if self.signed.shape != (len(self.pairs), 2 if self.gated else 1, self.d_mlp, self.d_mlp):
            raise PipelineError(f"{where}: direct-effect sums of the wrong shape {tuple(self.signed.shape)}")

    def mean_loss(self) -> tuple[np.ndarray, np.ndarray]:
        """Each neuron's mean direct_loss and mean |direct_loss| per scored token."""
        n = max(self.loss_tokens, 1.0)
        return (self.loss / n).cpu().numpy(), (self.loss_abs / n).cpu().numpy()

    def mean_abs_value(self) -> np.ndarray:
        return (self.value_abs / max(self.samples, 1.0)).cpu().numpy()

    def result(self, an: Anatomy) -> CausalEdges:
        """The means the graph keeps (gelutrace.graph.coactivation.CausalEdges), the couplings applied: each layer pair's
        direct and direct_abs computed when read, so that one pair's couplings and weights are in memory."""
        n, last = max(self.samples, 1.0), {}

        def pair(k: int) -> tuple[np.ndarray, np.ndarray]:
            if k not in last:
                last.clear()
                cs = [c.to(self.device) for c in couplings(an, [self.pairs[k]])[0]]
                d = sum(c * self.signed[k, t] for t, c in enumerate(cs)) / n
                a = sum(c.abs() * self.absolute[k, t] for t, c in enumerate(cs)) / n
                last[k] = (d.cpu().numpy(), a.cpu().numpy())
            return last[k]

        K = range(len(self.pairs))
        loss, loss_abs = self.mean_loss()
        return CausalEdges(list(self.pairs), [lambda k=k: pair(k)[0] for k in K], [lambda k=k: pair(k)[1] for k in K],
                           loss, loss_abs, self.mean_abs_value(), self.samples, self.loss_tokens, self.edges,
                           self.gated, write_norms(an))


def write_norms(an: Anatomy) -> np.ndarray:
    """||w_u|| of every neuron in id order, float64: the norm of column p of each layer's output projection (the
    family's neuron site feeds it: c_proj for GPT-2, down_proj for gated MLPs)."""
    return np.concatenate([np.linalg.norm(layer.proj.weight.detach().cpu().double().numpy(), axis=0)
                           for layer in an.layers])


def couplings(an: Anatomy, pairs: list) -> list[tuple]:
    """c_uv of every layer pair: (through the gate, through up) for gated units, else (c,); float64 (d_mlp, d_mlp)."""
    out = []
    for i, j in pairs:
        w_out = an.layers[i].proj.weight.detach().double().T  # (d_mlp, d_model): row p is w_u
        lj = an.layers[j]
        out.append(tuple(w_out @ lj.norm.coupling_rhs(fc.weight.detach().T) for fc in lj.fc))
    return out


# --- the hooks that feed the totals -----------------------------------------------------------------------------
class DirectHooks(NeuronHooks):
    """
    with DirectHooks(model, edges): before each forward pass `begin(weights, targets)` gives each position's sample
    weight (B, T) and real next token (B, T; -1: none); after it, `finish()` adds the direct_loss terms. The
    hooks read each layer's norm input (sigma), pre-activations, neuron values and the stream entering the final
    norm; they change nothing.
    """

    def __init__(self, model, edges: DirectEdges, an: Anatomy | None = None):
        super().__init__(model)
        self.edges = edges
        self.an = an or anatomy(model)
        self.sources = {j: [(k, i) for k, (i, jj) in enumerate(edges.pairs) if jj == j] for j in range(edges.n_layer)}
        self._clear()

    def _clear(self):
        self.inv_sigma, self.deriv, self.up, self.gate, self.values, self.final = {}, {}, {}, {}, {}, None

    def register(self):
        for j, layer in enumerate(self.an.layers):
            self.pre_hook(layer.norm.module, self._norm_hook(j))
            self.hook(layer.act, self._act_hook(j))
            if layer.gated:
                self.hook(layer.fc[1], self._up_hook(j))
            self.hook(self.model.gelus()[j], self._site_hook(j))
        module, kind = self.an.final_input
        if kind == "pre":
            self.pre_hook(module, lambda m, args: self._final(args[0]))
        else:
            self.hook(module, lambda m, args, out: self._final(out[0] if isinstance(out, tuple) else out))

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._clear()

    def begin(self, weights: torch.Tensor, targets: torch.Tensor | None = None):
        self._clear()
        self.w = weights.reshape(-1).float()
        self.targets = None if targets is None else targets.reshape(-1)

    @staticmethod
    def _rows(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1, t.size(-1)).float()

    def _norm_hook(self, j):
        def hook(module, args):
            self.inv_sigma[j] = self.an.layers[j].norm.inv_sigma(self._rows(args[0]))
        return hook

    def _act_hook(self, j):
        act = self.an.layers[j].act

        def hook(module, inputs, output):
            z = self._rows(inputs[0])
            with torch.enable_grad():
                zz = z.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(act.forward(zz).sum(), zz)  # .forward: no hook sees this call
            self.deriv[j] = g
            if self.an.layers[j].gated:
                self.gate[j] = self._rows(output)
        return hook

    def _up_hook(self, j):
        def hook(module, inputs, output):
            self.up[j] = self._rows(output)
        return hook

    def _site_hook(self, j):
        e = self.edges

        def hook(module, inputs, output):
            a = self._rows(output)
            scale = self.w * self.inv_sigma.pop(j)
            g = self.deriv.pop(j)
            terms = (g * self.up.pop(j), self.gate.pop(j)) if self.an.layers[j].gated else (g,)
            for k, i in self.sources[j]:
                ai = self.values[i]
                for t, f in enumerate(terms):
                    sf = f * scale.view(-1, 1)
                    e.signed[k, t] += (ai.T @ sf).to(e.signed.dtype)
                    e.absolute[k, t] += (ai.abs().T @ sf.abs()).to(e.absolute.dtype)
            self.values[j] = a
            e.value_abs[j * e.d_mlp:(j + 1) * e.d_mlp] += (a.abs() * self.w.view(-1, 1)).sum(dim=0).double()
        return hook

    def _final(self, x):
        self.final = self._rows(x)

    def finish(self):
        """The batch's direct_loss terms (positions with a target), then the batch's per-layer state is dropped."""
        e, an = self.edges, self.an
        e.samples += float(self.w.sum())
        if self.targets is not None and self.final is not None:
            scored = torch.nonzero((self.targets >= 0) & (self.w > 0)).view(-1)
            if len(scored):
                x = self.final[scored]
                w = self.w[scored]
                vocab = an.head.out_features if hasattr(an.head, "out_features") else an.head[-1].out_features
                step = max(1, HEAD_LOGITS // vocab)
                for lo in range(0, len(scored), step):
                    sl = slice(lo, lo + step)
                    xs = x[sl]
                    with torch.enable_grad():
                        y = an.final_norm.module(xs.to(an.final_norm.dtype)).detach()
                        y.requires_grad_(True)
                        logits = an.head(y).float()
                        nll = F.cross_entropy(logits, self.targets[scored[sl]], reduction="none")
                        (gy,) = torch.autograd.grad((nll * w[sl]).sum(), y)
                    grad = an.final_norm.held(gy.float()) * an.final_norm.inv_sigma(xs).view(-1, 1)
                    for i, layer in enumerate(an.layers):
                        h = grad @ layer.proj.weight.detach().float()  # (rows, d_mlp): w_u . G(t), weighted
                        c = self.values[i][scored[sl]] * h
                        cols = slice(i * e.d_mlp, (i + 1) * e.d_mlp)
                        e.loss[cols] += c.sum(dim=0).double()
                        e.loss_abs[cols] += c.abs().sum(dim=0).double()
                e.loss_tokens += float(w.sum())
        self._clear()


# --- the two modes ---------------------------------------------------------------------------------------------
def prompt_mode(model, prompts: list[list[int]], conts: list[np.ndarray], weights: np.ndarray, edges: str = "adjacent",
                batch_size: int = 64, progress=None, groups: np.ndarray | None = None) -> list[CausalEdges]:
    """
    The weights over stage b's prompt-mode samples, one per group of rows (groups: each row's group 0, 1, ...;
    None: one group): one teacher-forced pass over each distinct (prompt, continuation)
    (attribution.distinct_sequences), the samples being the positions that predict the continuation's tokens,
    each weighted by the samples it stands for, their targets the continuation's tokens.
    """

    cfg = model.config
    device = next(model.parameters()).device
    direct, an = direct_totals(model, edges, device)
    groups = np.zeros(len(conts), np.int64) if groups is None else np.asarray(groups)
    out = []
    for g in range(int(groups.max()) + 1 if len(groups) else 1):
        e = direct if g == 0 else DirectEdges(cfg.n_layer, cfg.d_mlp, edges, an.gated, device)
        rows = [r for r in range(len(conts)) if len(conts[r]) and groups[r] == g]
        rows.sort(key=lambda r: -(len(prompts[r]) + len(conts[r])))  # similar lengths together: less padding
        with DirectHooks(model, e, an) as hooks, torch.no_grad():
            for lo in range(0, len(rows), batch_size):
                chunk = rows[lo:lo + batch_size]
                idx, pad = left_pad([list(prompts[r]) + [int(t) for t in conts[r][:-1]] for r in chunk], device)
                T = idx.size(1)
                w = torch.zeros(idx.shape, device=device)
                targets = torch.full(idx.shape, -1, dtype=torch.long, device=device)
                for b, r in enumerate(chunk):
                    n = len(conts[r])
                    w[b, T - n:] = float(weights[r])
                    targets[b, T - n:] = torch.as_tensor(np.asarray(conts[r], np.int64), device=device)
                hooks.begin(w, targets)
                model(idx, pad=pad if bool(pad.any()) else None)
                hooks.finish()
                if progress is not None:
                    progress(len(chunk))
        out.append(e.result(an))
    return out


def corpus_targets(x: torch.Tensor) -> torch.Tensor:
    """Each window position's real next token within the window (-1 at the last)."""
    t = torch.full_like(x, -1)
    t[:, :-1] = x[:, 1:]
    return t
