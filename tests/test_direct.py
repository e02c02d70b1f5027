"""
The causal edge weights (gelutrace.record.direct) against references written here:

- `direct`, `direct_abs` and `direct_loss` of a small corpus-mode run against a float64 numpy computation from
  transformers' own model: the raw weights and the hook-recorded stream, neuron values and pre-activations, with
  the norm scales and the activations' derivatives written out here (GPT-2 on model.py, Pythia, Llama, OPT);
- one position's `direct` against torch.autograd of v's value with respect to u's write, sigma detached, and its
  `direct_loss` against autograd of the next-token NLL;
- exactness on every family: removing u's write from layer j's norm input only, sigma held, moves z_v by exactly
  the predicted -a_u c_uv / sigma_j;
- sums of split runs add up to the whole run's; influence on a hand-built DAG.
"""

import math

import numpy as np
import pytest
import torch
from scipy.special import erf
from test_families import FAMILIES, build, get
from torch.nn import functional as F

from gelutrace import PipelineError
from gelutrace.graph.causal import CausalEdges
from gelutrace.model.loading import load_model
from gelutrace.record.direct import (
    DirectEdges,
    DirectHooks,
    anatomy,
    corpus_targets,
    couplings,
    layer_pairs,
    memory_needed,
    write_norms,
)


# --- the reference: float64 numpy ---------------------------------------------------------------------------------
def d_gelu_exact(z):
    return 0.5 * (1 + erf(z / math.sqrt(2))) + z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def d_gelu_tanh(z):
    k = math.sqrt(2 / math.pi)
    u = np.tanh(k * (z + 0.044715 * z ** 3))
    return 0.5 * (1 + u) + 0.5 * z * (1 - u * u) * k * (1 + 3 * 0.044715 * z * z)


def d_relu(z):
    return (z > 0).astype(np.float64)


def silu(z):
    return z / (1 + np.exp(-z))


def d_silu(z):
    s = 1 / (1 + np.exp(-z))
    return s + z * s * (1 - s)


def gelu_tanh(z):
    return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


# family: (n_layer override, MLP norm, input linear(s), (act, act'), output projection, final norm, centred,
#          Conv1D weights (in, out))
REF = {
    "gpt2": ({}, "ln_2", ("mlp.c_fc",), (None, d_gelu_tanh), "mlp.c_proj", "transformer.ln_f", True, True),
    "gpt_neox": (dict(num_hidden_layers=3), "post_attention_layernorm", ("mlp.dense_h_to_4h",),
                 (None, d_gelu_exact), "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", True, False),
    "llama": (dict(num_hidden_layers=3), "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"),
              (silu, d_silu), "mlp.down_proj", "model.norm", False, False),
    "opt": (dict(num_hidden_layers=3), "final_layer_norm", ("fc1",), (None, d_relu), "fc2",
            "model.decoder.final_layer_norm", True, False),
}
LAYERS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "llama": "model.layers",
          "opt": "model.decoder.layers"}


def _np(t):
    return t.detach().double().cpu().numpy()


def record(hf, family, idx):
    """The stream each MLP norm reads, each input linear's output, each neuron value, the final norm's input."""
    _, norm, fcs, _, proj, final, _, _ = REF[family]
    seen, handles = {}, []
    for j, layer in enumerate(get(hf, LAYERS[family])):
        handles.append(get(layer, norm).register_forward_pre_hook(
            lambda m, a, j=j: seen.__setitem__(("x", j), _np(a[0]).reshape(-1, a[0].size(-1)))))
        for k, fc in enumerate(fcs):
            handles.append(get(layer, fc).register_forward_hook(
                lambda m, a, o, j=j, k=k: seen.__setitem__(("z", j, k), _np(o).reshape(-1, o.size(-1)))))
        handles.append(get(layer, proj).register_forward_pre_hook(
            lambda m, a, j=j: seen.__setitem__(("a", j), _np(a[0]).reshape(-1, a[0].size(-1)))))
    handles.append(get(hf, final).register_forward_pre_hook(
        lambda m, a: seen.__setitem__("xf", _np(a[0]).reshape(-1, a[0].size(-1)))))
    with torch.no_grad():
        hf(idx)
    for h in handles:
        h.remove()
    return seen


def inv_sigma(x, module, centred):
    eps = module.eps if hasattr(module, "eps") and not isinstance(module.eps, torch.Tensor) else \
        getattr(module, "variance_epsilon", getattr(module, "eps", None))
    xc = x - x.mean(axis=1, keepdims=True) if centred else x
    return 1 / np.sqrt((xc ** 2).mean(axis=1) + float(eps))


def weight_in(lin, conv1d):
    """A linear's weight as (in, out)."""
    return _np(lin.weight) if conv1d else _np(lin.weight).T


def reference(hf, family, idx, pairs, weights=None, targets=None):
    """(direct, direct_abs) per pair and (mean direct_loss, mean |direct_loss|) per neuron, float64: every
    position a sample of weight 1 and its next token the target, or the positions' `weights` and `targets`
    (-1: none)."""
    _, norm, fcs, (act, dact), proj, final, centred, conv = REF[family]
    seen = record(hf, family, idx)  # rows of equal length: no padding, no mask
    layers = get(hf, LAYERS[family])
    w = np.ones(idx.numel()) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    n = w.sum()
    direct, absolute = [], []
    for i, j in pairs:
        a = seen[("a", i)]
        w_out = weight_in(get(layers[i], proj), conv)  # (d_mlp, d)
        nm = get(layers[j], norm)
        s = inv_sigma(seen[("x", j)], nm, centred)
        gain = _np(nm.weight)
        if len(fcs) == 1:
            terms = [dact(seen[("z", j, 0)])]
        else:
            g, up = seen[("z", j, 0)], seen[("z", j, 1)]
            terms = [dact(g) * up, act(g)]
        d = np.zeros((a.shape[1], terms[0].shape[1]))
        b = np.zeros_like(d)
        for k, f in enumerate(terms):
            rhs = gain[:, None] * weight_in(get(layers[j], fcs[k]), conv)
            if centred:
                rhs = rhs - rhs.mean(axis=0, keepdims=True)
            c = w_out @ rhs
            d += c * (a.T @ (f * (w * s)[:, None])) / n
            b += np.abs(c) * (np.abs(a).T @ np.abs(f * (w * s)[:, None])) / n
        direct.append(d)
        absolute.append(b)
    # direct_loss: a_u(t) w_u . G(t), G the NLL's gradient at the final norm's input with its scale held
    xf = seen["xf"]
    fn = get(hf, final)
    sf = inv_sigma(xf, fn, centred)
    xc = xf - xf.mean(axis=1, keepdims=True) if centred else xf
    y = _np(fn.weight) * xc * sf[:, None] + (_np(fn.bias) if getattr(fn, "bias", None) is not None else 0)
    head = hf.get_output_embeddings()
    logits = y @ _np(head.weight).T + (_np(head.bias) if head.bias is not None else 0)
    targets = (corpus_targets(idx) if targets is None else torch.as_tensor(targets)).reshape(-1).numpy()
    rows = np.nonzero((targets >= 0) & (w > 0))[0]
    p = np.exp(logits[rows] - logits[rows].max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(rows)), targets[rows]] -= 1
    gy = (p @ _np(head.weight)) * _np(fn.weight)
    if centred:
        gy = gy - gy.mean(axis=1, keepdims=True)
    G = gy * sf[rows, None]
    loss = []
    for i in range(len(layers)):
        w_out = weight_in(get(layers[i], proj), conv)
        loss.append(seen[("a", i)][rows] * (G @ w_out.T))
    loss = np.concatenate(loss, axis=1)
    wl = w[rows, None] / w[rows].sum()
    return direct, absolute, (wl * loss).sum(axis=0), (wl * np.abs(loss)).sum(axis=0)


def run_library(model, idx, edges="adjacent", weights=None):
    an = anatomy(model)
    cfg = model.config
    e = DirectEdges(cfg.n_layer, cfg.d_mlp, edges, an.gated)
    with DirectHooks(model, e, an) as hooks, torch.no_grad():
        hooks.begin(torch.ones(idx.shape) if weights is None else weights, corpus_targets(idx))
        model(idx)
        hooks.finish()
    return e, an


def assert_rel(got, want, rel=1e-6):
    got, want = np.asarray(got), np.asarray(want)
    scale = np.abs(want).max()
    assert scale > 0
    assert np.abs(got - want).max() <= rel * scale, (np.abs(got - want).max() / scale)


@pytest.fixture(scope="module", params=list(REF))
def loaded(request, tmp_path_factory, random_ckpt):
    from transformers import AutoModelForCausalLM

    family = request.param
    if family == "gpt2":
        path = random_ckpt
    else:
        path = build(family, tmp_path_factory.mktemp(family) / f"tiny_{family}", **REF[family][0])
    lm = load_model(str(path), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    return family, lm.model, hf


def tokens(seed, shape=(2, 12), vocab=300):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("edges", ["adjacent", "all"])
def test_weights_match_float64_reference(loaded, edges):
    family, model, hf = loaded
    idx = tokens(1)
    e, an = run_library(model, idx, edges)
    res = e.result(an)
    direct = [res.matrix("direct", k) for k in range(len(e.pairs))]
    absolute = [res.matrix("direct_abs", k) for k in range(len(e.pairs))]
    ref_d, ref_a, ref_loss, ref_loss_abs = reference(hf, family, idx, e.pairs)
    assert e.pairs == layer_pairs(model.config.n_layer, edges) and len(e.pairs) == (2 if edges == "adjacent" else 3)
    for k in range(len(e.pairs)):
        assert_rel(direct[k], ref_d[k])
        assert_rel(absolute[k], ref_a[k])
        assert (absolute[k] >= np.abs(direct[k]) - 1e-12).all()
    loss, loss_abs = e.mean_loss()
    assert_rel(loss, ref_loss)
    assert_rel(loss_abs, ref_loss_abs)
    assert e.samples == idx.numel() and e.loss_tokens == idx.size(0) * (idx.size(1) - 1)


def held_norm(module, centred, x, delta):
    """The norm's output on x - delta with x's scale: the module's own output on x - delta, rescaled."""
    bias = module.bias if getattr(module, "bias", None) is not None else 0
    def s(v):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        vc = v - v.mean(dim=-1, keepdim=True) if centred else v
        return torch.sqrt(vc.pow(2).mean(dim=-1, keepdim=True) + float(eps))
    return (module.forward(x - delta) - bias) * s(x - delta) / s(x) + bias  # .forward: no hook sees it


def test_coupling_and_direct_loss_against_autograd(loaded):
    """One position: E_uv = d value_v / d s_u and direct_loss_u = d NLL / d s_u, u's write scaled by s_u."""
    family, model, hf = loaded
    _, norm, fcs, _, proj, final, centred, conv = REF[family]
    idx = tokens(2, (1, 10))
    t0 = 6
    w = torch.zeros(idx.shape)
    w[0, t0] = 1
    e, an = run_library(model, idx, "adjacent", w)
    res = e.result(an)
    direct = [res.matrix("direct", k) for k in range(len(e.pairs))]
    seen = record(hf, family, idx)
    layers = get(hf, LAYERS[family])
    double = lambda t: t.detach().double()
    for k, (i, j) in enumerate(e.pairs):
        a = torch.from_numpy(seen[("a", i)][t0])
        w_out = double(get(layers[i], proj).weight) if conv else double(get(layers[i], proj).weight).T
        x = torch.from_numpy(seen[("x", j)][t0])
        nm = get(layers[j], norm).double()

        def value(s):
            xs = x + ((s - 1) * a) @ w_out
            y = held_norm(nm, centred, x, x - xs)
            z = [F.linear(y, double(get(layers[j], fc).weight).T if conv else double(get(layers[j], fc).weight),
                          double(get(layers[j], fc).bias) if get(layers[j], fc).bias is not None else None)
                 for fc in fcs]
            if len(z) == 2:
                return F.silu(z[0]) * z[1]
            act = {"gpt2": lambda v: F.gelu(v, approximate="tanh"), "gpt_neox": F.gelu, "opt": F.relu}[family]
            return act(z[0])

        jac = torch.autograd.functional.jacobian(value, torch.ones_like(a)).numpy()  # (v, u)
        assert_rel(direct[k], jac.T, 1e-5)
        get(layers[j], norm).float()
    # the NLL through the final norm (scale held) and the head, each neuron's write scaled
    xf = torch.from_numpy(seen["xf"][t0])
    fn = get(hf, final).double()
    head = hf.get_output_embeddings().double()
    target = int(idx[0, t0 + 1])
    grads = []
    for i in range(len(layers)):
        a = torch.from_numpy(seen[("a", i)][t0])
        w_out = double(get(layers[i], proj).weight) if conv else double(get(layers[i], proj).weight).T

        def nll(s):
            xs = xf + ((s - 1) * a) @ w_out
            logits = head(held_norm(fn, centred, xf, xf - xs))
            return F.cross_entropy(logits.view(1, -1), torch.tensor([target]))

        grads.append(torch.autograd.functional.jacobian(nll, torch.ones_like(a)).numpy())
    fn.float()
    head.float()
    loss, _ = e.mean_loss()
    assert_rel(loss, np.concatenate(grads), 1e-5)


def _stream(norm, hf, idx):
    seen = []
    h = norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].size(-1))))
    with torch.no_grad():
        hf(idx)
    h.remove()
    return seen[0]


def exactness(model, hf, layers, norm_name, fcs, proj_name, conv, idx, u):
    """Measured change of layer 1's input linear outputs when u (layer 0) leaves layer 1's norm input only, sigma
    held, against the library's prediction -a_u(t) c_uv / sigma_1(t)."""
    an = anatomy(model)
    c = couplings(an, [(0, 1)])[0]
    proj = get(layers[0], proj_name)
    w_u = proj.weight.detach()[u] if conv else proj.weight.detach()[:, u]
    norm = get(layers[1], norm_name)
    centred = isinstance(norm, torch.nn.LayerNorm)
    seen = {}
    handles = [proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("a", a[0].detach()[..., u].clone()))]
    handles += [get(layers[1], fc).register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(k, o.detach().clone()))
                for k, fc in enumerate(fcs)]
    inv = an.layers[1].norm.inv_sigma(_stream(norm, hf, idx))
    with torch.no_grad():
        hf(idx)
        before, a_u = [seen[k] for k in range(len(fcs))], seen["a"]
        handles.append(norm.register_forward_hook(
            lambda m, args, out: held_norm(m, centred, args[0], a_u[..., None] * w_u)))
        hf(idx)
    for h in handles:
        h.remove()
    for k in range(len(fcs)):
        measured = (seen[k] - before[k]).reshape(-1, before[k].size(-1)).double()
        predicted = -(a_u.reshape(-1) * inv).double()[:, None] * c[k][u][None, :]
        assert predicted.abs().max() > 0
        assert torch.allclose(measured, predicted, rtol=1e-4, atol=1e-4 * float(predicted.abs().max())), \
            float((measured - predicted).abs().max())


# every family's MLP norm, written out here as a test of anatomy()'s table
NORMS = {"gpt_neox": "post_attention_layernorm", "gpt_neo": "ln_2", "gptj": "ln_1", "opt": "final_layer_norm",
         "bloom": "post_attention_layernorm", "phi": "input_layernorm", "gpt_bigcode": "ln_2",
         "falcon": "input_layernorm", "llama": "post_attention_layernorm", "mistral": "post_attention_layernorm",
         "qwen2": "post_attention_layernorm", "gemma": "post_attention_layernorm"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exactness_on_every_family(family, tmp_path):
    from transformers import AutoModelForCausalLM

    assert set(NORMS) == set(FAMILIES)
    path = build(family, tmp_path / family)
    model = load_model(str(path), device="cpu").model
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    _, _, layers, first, _, proj = FAMILIES[family]
    fcs = (first,) if isinstance(first, str) else first
    for u in (0, 7):
        exactness(model, hf, get(hf, layers), NORMS[family], fcs, proj, False, tokens(3, (2, 9)), u)


def test_exactness_on_model_py(random_model, random_hf):
    for u in (0, 5):
        exactness(random_model, random_hf, random_hf.transformer.h, "ln_2", ("mlp.c_fc",), "mlp.c_proj", True,
                  tokens(4, (2, 9)), u)


# --- sums, shapes, refusals ---------------------------------------------------------------------------------------
def test_split_runs_add_up_to_the_whole(random_model):
    """Two halves of a batch merged, and a state round trip, equal one pass over the batch (float64 rounding)."""
    idx = tokens(5, (4, 10))
    whole, an = run_library(random_model, idx)
    first, _ = run_library(random_model, idx[:2])
    second, _ = run_library(random_model, idx[2:])
    first.merge(second)
    back = DirectEdges(3, random_model.config.d_mlp)
    back.load_state({k: v for k, v in first.state().items()}, "state")
    for name in DirectEdges.ARRAYS:
        want = getattr(whole, name).numpy()
        assert np.allclose(getattr(back, name).numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert back.samples == whole.samples and back.loss_tokens == whole.loss_tokens
    with pytest.raises(PipelineError):
        first.merge(DirectEdges(3, random_model.config.d_mlp, "all"))


def test_memory_needed_and_edge_sets():
    assert layer_pairs(4, "all") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert memory_needed(12, 3072, "adjacent", False) == 11 * 3072 ** 2 * 8 * 4
    with pytest.raises(PipelineError):
        layer_pairs(4, "every")


def test_influence_on_a_hand_built_dag():
    """3 layers of 2 neurons: I_2 = s_2; I_1 = s_1 + |E12| (I_2 / m_2); I_0 = s_0 + |E01| (I_1 / m_1) + |E02| (...)."""
    s = np.array([0.1, 0.2, 0.3, 0.0, 1.0, 2.0])
    m = np.array([1.0, 1.0, 2.0, 4.0, 0.5, 1.0])
    e01 = np.array([[1.0, -2.0], [0.0, 0.5]])
    e12 = np.array([[0.5, 0.0], [-1.0, 3.0]])
    e02 = np.array([[0.0, 1.0], [0.0, 0.0]])
    i2 = np.array([1.0, 2.0])
    i1 = np.array([0.3 + 0.5 * 1.0 / 0.5, 0.0 + 1.0 * 1.0 / 0.5 + 3.0 * 2.0 / 1.0])
    i0 = np.array([0.1 + 1.0 * i1[0] / 2.0 + 2.0 * i1[1] / 4.0 + 1.0 * i2[1] / 1.0, 0.2 + 0.5 * i1[1] / 4.0])
    def graph(pairs, direct):
        return CausalEdges(pairs, direct, [np.abs(x) for x in direct], np.zeros(6), s, m, 10.0, 9.0, "all")

    got = graph([(0, 1), (0, 2), (1, 2)], [e01, e02, e12]).influence()
    assert np.allclose(got, np.concatenate([i0, i1, i2]))
    adj = graph([(0, 1), (1, 2)], [e01, e12]).influence()
    assert np.allclose(adj[:2], [0.1 + i1[0] / 2.0 + 2.0 * i1[1] / 4.0, 0.2 + 0.5 * i1[1] / 4.0])


def test_gated_write_norms_are_the_down_proj_column_norms(tmp_path):
    """A Llama neuron (i, p) writes a_u * down_proj.weight[:, p]: its write norm is that column's norm, read here from
    the checkpoint's safetensors, not through the model."""
    from safetensors.numpy import load_file

    path = build("llama", tmp_path / "llama")
    model = load_model(str(path), device="cpu").model
    weights = load_file(str(path / "model.safetensors"))
    n_layer = model.config.n_layer
    want = np.concatenate([np.sqrt((weights[f"model.layers.{i}.mlp.down_proj.weight"].astype(np.float64) ** 2)
                                   .sum(axis=0)) for i in range(n_layer)])
    got = write_norms(anatomy(model))
    assert got.shape == (n_layer * model.config.d_mlp,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)
