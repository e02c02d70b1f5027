"""
The frozen linearisation of a loaded model on one prompt (circuit-tracer's local replacement model, with MLP
neurons in the place of transcoder features).

circuit-tracer (0.5.0, replacement_model/replacement_model_transformerlens.py, `_configure_gradient_flow`) stops
the gradient at every attention pattern and every normalisation scale; the model is then linear in its residual
stream. The frozen pass here does the same to the loaded model, whatever its family:

- attention probabilities: torch's `scaled_dot_product_attention` (model.py, and transformers' "sdpa"
  attention, which the pass selects) is replaced during the pass by the same computation with the
  probabilities detached; the families whose attention is eager only (PROBABILITY_DROPOUT) pass their
  probabilities through a dropout module, whose output a hook detaches;
- normalisation scales: every LayerNorm's standard deviation and every RMSNorm's root mean square, by a hook
  that recomputes the module's output with the scale detached (the recomputation must equal the module's own
  output, or the pass is refused);
- gated units (value = act(gate) * up): act(gate) is detached (the gate projection's output is), so a unit's
  value is linear in `up`: the unit's input is its value itself, and its edges are those of `up`, scaled by the
  frozen gain act(gate). This keeps the linearisation exact (a target's input is its row sum plus a constant),
  as freezing an attention pattern does; the gate's own dependence on earlier neurons is not an edge.

Each neuron's value is replaced by a detached copy that is a leaf of the graph (the gradient stops at the
nonlinearity), so a backward pass from a target's input gives the direct coefficients: the edge u -> v is
a_u * d input_v / d a_u (circuit-tracer's attribution/attribute.py, "direct effect" rows). The embedding node
of a position is the residual stream entering the first layer (token embedding, plus the position embedding
where the family has one), and its edge is e_t . d input_v / d e_t. The forward runs once on `batch` copies of
the prompt; each backward pass gives one row per copy (circuit-tracer's context_transformerlens.py
`compute_batch` injects one target per batch row the same way).
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from gelutrace import PipelineError
from gelutrace.model import sites

# the output of each family's MLP input projection: a neuron's pre-activation (transformers' families; model.py's
# is the input of its GELU module). Gated families: (gate, up).
PRE_ACTIVATION = {
    "gpt_neox": "mlp.dense_h_to_4h", "gpt_neo": "mlp.c_fc", "gptj": "mlp.fc_in", "opt": "fc1",
    "bloom": "mlp.dense_h_to_4h", "phi": "mlp.fc1", "gpt_bigcode": "mlp.c_fc", "falcon": "mlp.dense_h_to_4h",
    **{t: ("mlp.gate_proj", "mlp.up_proj") for t in ("llama", "mistral", "qwen2", "gemma")},
}
# eager-only attention: the dropout module (relative to a layer) that the probabilities pass through
PROBABILITY_DROPOUT = {"gpt_neo": "attn.attention.attn_dropout", "bloom": "self_attention.attention_dropout"}
COVERED = ("gpt2", *PRE_ACTIVATION)


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


class _Counter:
    def __init__(self):
        self.attention = 0


def _frozen_sdpa(counter: _Counter):
    """torch's scaled_dot_product_attention (its documented semantics) with the probabilities detached."""
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
             **kwargs):
        if dropout_p or kwargs:
            raise PipelineError(f"the frozen attention does not support dropout or {sorted(kwargs)}")
        counter.attention += 1
        if enable_gqa:
            rep = query.size(-3) // key.size(-3)
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
        scores = (query @ key.transpose(-2, -1)).float() * scale
        L, S = query.size(-2), key.size(-2)
        if is_causal:
            scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=scores.device).tril(), -math.inf)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
        probs = torch.softmax(scores, dim=-1).to(value.dtype).detach()
        return probs @ value
    return sdpa


def _frozen_norm(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The module's output recomputed with its scale detached; refused unless it equals the module's output."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        mu = x.mean(-1, keepdim=True)
        sd = (x.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt().detach()
        y = (x - mu) / sd
        if module.weight is not None:
            y = y * module.weight
        if module.bias is not None:
            y = y + module.bias
        candidates = [y]
    elif name.endswith("RMSNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
        w = module.weight
        candidates = [w * y.to(x.dtype), (y * (1.0 + w.float())).to(x.dtype)]  # Llama's, Gemma's scale
    else:
        raise PipelineError(f"normalisation {name} has no frozen form here")
    for y in candidates:  # the rows are copies of one prompt: the first is checked
        if y.shape == out.shape and torch.allclose(y[:1], out[:1], rtol=1e-4, atol=1e-5):
            return y
    raise PipelineError(f"normalisation {name}: its frozen form does not reproduce its output")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__


@dataclass
class FrozenPass:
    """A forward pass of `batch` copies of the prompt through the frozen model, kept for backward passes."""
    tokens: torch.Tensor  # (T,)
    inputs: list[torch.Tensor]  # per layer (B, T, d_mlp): the neurons' inputs, in the graph
    leaves: list[torch.Tensor]  # per layer (B, T, d_mlp): the neurons' values as leaves
    embedding: torch.Tensor  # (B, T, d_model) leaf: the residual stream entering the first layer
    unembed_input: torch.Tensor  # (B, d) the unembedding's input at the last position, in the graph
    unembed_weight: torch.Tensor  # (vocab, d)
    unembed_bias: torch.Tensor | None
    logits: torch.Tensor  # (vocab,) the real logits at the last position
    values: torch.Tensor  # (n_layers, T, d_mlp) the neurons' values
    input_values: torch.Tensor  # (n_layers, T, d_mlp) their inputs
    slopes: torch.Tensor  # (n_layers, T, d_mlp) d value / d input

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.values.shape)

    def rows(self, layers: torch.Tensor, positions: torch.Tensor, dims: torch.Tensor,
             vectors: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """
        One backward pass: the direct-effect rows (n, n_layers * T * d_mlp + T) of up to `batch` targets. A
        target is a neuron (layer, position, dim) or, where layer == n_layers, the linear function
        vectors[dim] . (the unembedding's input at the last position). Columns: every neuron, in (layer,
        position, dim) order, then the embedding of every position. Written into `out` when given.
        """
        n_layers, T, d = self.shape
        n, B = len(layers), self.embedding.size(0)
        if n > B:
            raise ValueError(f"{n} targets for a pass of {B} rows")
        rows = torch.arange(n)
        outputs, grads = [], []
        for layer in layers.unique().tolist():
            m = layers == layer
            if layer == n_layers:
                g = torch.zeros_like(self.unembed_input)
                g[rows[m]] = vectors[dims[m]].to(g.dtype)
                outputs.append(self.unembed_input)
            else:
                g = torch.zeros_like(self.inputs[layer])
                g[rows[m], positions[m], dims[m]] = 1
                outputs.append(self.inputs[layer])
            grads.append(g)
        found = torch.autograd.grad(outputs, self.leaves + [self.embedding], grads, retain_graph=True,
                                    allow_unused=True)
        if out is None:
            out = torch.empty(n, n_layers * T * d + T)
        out = out[:n]
        edges = out[:, :n_layers * T * d].view(n, n_layers, T, d)
        for layer, g in enumerate(found[:-1]):
            if g is None:
                edges[:, layer] = 0
            elif out.device == g.device:
                torch.mul(g[:n], self.values[layer], out=edges[:, layer])
            else:
                edges[:, layer] = g[:n] * self.values[layer]
        e = found[-1]
        out[:, n_layers * T * d:] = 0 if e is None else (e[:n] * self.embedding[0].detach()).sum(-1)
        return out


def _layers(model) -> list[nn.Module]:
    if isinstance(model, sites.HFCausalLM):
        return list(_get(model.hf, sites.FAMILIES[model.config.architecture].layers))
    return list(model.transformer.h)


def check_family(model) -> str:
    arch = getattr(model.config, "architecture", "gpt2")
    if arch not in COVERED:
        raise PipelineError(f"the frozen linearisation does not cover the {arch} family (covered: "
                            f"{', '.join(COVERED)})")
    return arch


@contextlib.contextmanager
def _attn_implementation(model, arch):
    """transformers' "sdpa" attention for the pass (whose probabilities the frozen SDPA detaches)."""
    hf = getattr(model, "hf", None)
    before = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    if hf is None or arch in PROBABILITY_DROPOUT or before == "sdpa":
        yield
        return
    try:
        hf.set_attn_implementation("sdpa")
    except Exception as e:
        raise PipelineError(f"the {arch} model cannot run transformers' sdpa attention ({e})") from None
    try:
        yield
    finally:
        hf.set_attn_implementation(before)


@contextlib.contextmanager
def frozen_pass(lm, tokens: torch.Tensor, batch: int):
    """
    The FrozenPass of `tokens` (T,) for a LoadedModel or its model, `batch` rows; the model's parameters need
    no gradient and its attention and norms are frozen while the context is open.
    """
    model = getattr(lm, "model", lm)
    arch = check_family(model)
    layers = _layers(model)
    n_layers, T = len(layers), len(tokens)
    gated = isinstance(PRE_ACTIVATION.get(arch), tuple)
    counter = _Counter()
    inputs, leaves, slopes, pre = [None] * n_layers, [None] * n_layers, [None] * n_layers, [None] * n_layers
    captured = {}
    handles = []

    def as_rows(t):  # OPT's MLP sees (B * T, d)
        return t.view(batch, T, -1)

    def site_hook(layer):
        def hook(module, args, out):
            if arch == "gpt2":
                pre[layer] = args[0]
            value = as_rows(out)
            if gated:
                inputs[layer], slopes[layer] = value, torch.ones_like(value[0])
            else:  # the value is an elementwise function of the pre-activation: one gradient gives every slope
                inputs[layer] = as_rows(pre[layer])
                slope = torch.autograd.grad(out.sum(), pre[layer], retain_graph=True)[0]
                slopes[layer] = as_rows(slope)[0]
            leaves[layer] = value.detach().requires_grad_()
            return leaves[layer].view(out.shape)
        return hook

    def pre_hook(layer):
        def hook(module, args, out):
            pre[layer] = out
        return hook

    def embed_hook(module, args, kwargs):
        if args:
            h = args[0]
            captured["embedding"] = h.detach().requires_grad_()
            return (captured["embedding"], *args[1:]), kwargs
        captured["embedding"] = kwargs["hidden_states"].detach().requires_grad_()
        return args, {**kwargs, "hidden_states": captured["embedding"]}

    def norm_hook(module, args, out):
        return _frozen_norm(module, args[0], out)

    def dropout_hook(module, args, out):
        counter.attention += 1
        return out.detach()

    def values_only(module, args, out):
        # model.py's fused query/key/value projection: with the probabilities frozen only the values carry a
        # gradient, so they get their own product and the backward pass skips the queries' and keys' weights
        C = out.size(-1) // 3
        v = F.linear(args[0], module.weight[2 * C:], module.bias[2 * C:])
        return torch.cat([out[..., :2 * C].detach(), v], -1)

    def unembed_hook(module, args):
        captured["unembed_input"] = args[0][:, -1]

    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    sdpa = F.scaled_dot_product_attention
    try:
        for p, _ in grad_state:
            p.requires_grad_(False)
        for layer, site in enumerate(model.gelus()):
            handles.append(site.register_forward_hook(site_hook(layer)))
        if arch == "gpt2":
            handles += [block.attn.c_attn.register_forward_hook(values_only) for block in layers]
        else:
            for layer, block in enumerate(layers):
                if gated:
                    gate, _ = PRE_ACTIVATION[arch]
                    handles.append(_get(block, gate).register_forward_hook(lambda m, a, out: out.detach()))
                else:
                    handles.append(_get(block, PRE_ACTIVATION[arch]).register_forward_hook(pre_hook(layer)))
                if arch in PROBABILITY_DROPOUT:
                    handles.append(_get(block, PROBABILITY_DROPOUT[arch]).register_forward_hook(dropout_hook))
        handles.append(layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
        handles += [m.register_forward_hook(norm_hook) for m in model.modules() if _is_norm(m)]
        handles.append(model.lm_head.register_forward_pre_hook(unembed_hook))
        F.scaled_dot_product_attention = _frozen_sdpa(counter)
        with _attn_implementation(model, arch), torch.enable_grad():
            logits, _ = model(tokens.view(1, -1).expand(batch, -1).contiguous(), logits_to_keep=1)
        if counter.attention != n_layers:
            raise PipelineError(f"the {arch} model's attention did not pass where the frozen pass detaches its "
                                f"probabilities ({counter.attention} of {n_layers} layers)")
        logits = logits[0, -1].detach()
        head = model.lm_head
        u = captured["unembed_input"]
        if not torch.allclose(F.linear(u[0].detach(), head.weight, head.bias), logits, rtol=1e-4, atol=1e-4):
            raise PipelineError(f"the {arch} model's logits are not its unembedding of the last residual stream")
        yield FrozenPass(tokens=tokens, inputs=inputs, leaves=leaves, embedding=captured["embedding"],
                         unembed_input=u, unembed_weight=head.weight.detach(),
                         unembed_bias=None if head.bias is None else head.bias.detach(), logits=logits,
                         values=torch.stack([a[0].detach() for a in leaves]),
                         input_values=torch.stack([z[0].detach() for z in inputs]),
                         slopes=torch.stack([s.detach() for s in slopes]))
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
        for p, state in grad_state:
            p.requires_grad_(state)


@dataclass
class LogitTargets:
    tokens: torch.Tensor  # (k,) int64
    probabilities: torch.Tensor  # (k,)
    vectors: torch.Tensor  # (k, d) demeaned unembedding rows
    inputs: torch.Tensor  # (k,) demeaned logits: logit - mean over the vocabulary


def logit_targets(fp: FrozenPass, max_logits: int, probability: float) -> LogitTargets:
    """
    circuit-tracer's salient logits (attribution/targets.py, `_from_salient` and `_compute_logit_vecs`): the most
    probable tokens at the last position until their probabilities reach `probability`, at most `max_logits`,
    each with its unembedding row minus the mean row; the target's input is then the demeaned logit.
    """
    probs = torch.softmax(fp.logits.double(), dim=-1)
    top_p, top = torch.topk(probs, min(max_logits, len(probs)))
    k = min(int(torch.searchsorted(top_p.cumsum(0), torch.tensor([probability], dtype=top_p.dtype))) + 1, len(top))
    top, top_p = top[:k], top_p[:k]
    w = fp.unembed_weight
    vectors = w[top] - w.mean(0, keepdim=True)
    demeaned = fp.logits - fp.logits.double().mean().to(fp.logits.dtype)
    return LogitTargets(tokens=top, probabilities=top_p.float(), vectors=vectors, inputs=demeaned[top])
