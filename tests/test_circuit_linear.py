"""
The per-prompt neuron graph's computation (gelutrace.circuit.linear and .attribute) against a frozen model built
here independently: a first forward pass of transformers' own model (eager attention) records every attention
probability (torch's softmax), every normalisation scale (LayerNorm's standard deviation, RMSNorm's rsqrt), every
gate projection and every neuron value; later passes replay them, so attention, norms and gates are constants
and the neuron values are whatever the test gives. On that model:

- each row of the graph equals torch autograd of the target's input with respect to the neuron values and the
  embeddings, times those values (kept columns, the "other neurons" sums per layer and position, embeddings);
- zeroing one source (a kept neuron, an embedding) changes each target's input by exactly its edge;
- each target's input is its row sum plus its constant;
- GPT-2 on model.py gives the graph of transformers' GPT2LMHeadModel with the same weights;
- the kept set: every neuron when max_nodes allows it; otherwise the neurons that circuit-tracer's phase 4,
  written here in numpy on the full adjacency, keeps.
"""

import contextlib
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_families import FAMILIES, build, get
from torch.nn import functional as F

from gelutrace import PipelineError
from gelutrace.circuit import attribute as attribution
from gelutrace.circuit import linear
from gelutrace.circuit.graph import TraceSettings
from gelutrace.model.loading import load_model

from conftest import make_checkpoint

PROMPT = "To be, or not to be, that is"


def spec(family):
    """(decoder layers, MLP input projection or (gate, up), output projection) of transformers' model."""
    if family == "gpt2":
        return "transformer.h", "mlp.c_fc", "mlp.c_proj"
    _, _, layers, first, _, proj = FAMILIES[family]
    return layers, first, proj


class Frozen:
    """transformers' model with attention, norm scales and gates recorded on the prompt and replayed."""

    def __init__(self, hf, family, ids):
        self.hf, self.ids = hf, torch.tensor([ids])
        layers, self.first, self.proj = spec(family)
        self.layers = list(get(hf, layers))
        self.gated = isinstance(self.first, tuple)
        self.tape = {"softmax": [], "scale": [], "gate": []}
        self.recording = True
        out = self.run()
        self.recording = False
        self.values = [v.clone() for v in out["values"]]
        self.embedding = out["embedding"].clone()
        self.inputs, self.logits = out["inputs"], out["logits"]

    @contextlib.contextmanager
    def patched(self):
        softmax, rsqrt, norm = F.softmax, torch.rsqrt, F.layer_norm
        step = {k: 0 for k in self.tape}

        def replay(kind, compute):
            if self.recording:
                y = compute()
                self.tape[kind].append(y.detach())
                return y
            step[kind] += 1
            return self.tape[kind][step[kind] - 1]

        def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
            sd = replay("scale", lambda: (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt())
            y = (x - x.mean(-1, keepdim=True)) / sd
            return y * (1 if weight is None else weight) + (0 if bias is None else bias)

        torch.nn.functional.softmax = lambda *a, **k: replay("softmax", lambda: softmax(*a, **k))
        torch.nn.functional.layer_norm = layer_norm
        torch.rsqrt = lambda *a, **k: replay("scale", lambda: rsqrt(*a, **k))
        try:
            yield
        finally:
            torch.nn.functional.softmax, torch.rsqrt, torch.nn.functional.layer_norm = softmax, rsqrt, norm

    def run(self, values=None, embedding=None):
        """Inputs (per layer (T, d_mlp): pre-activations, or values of gated units), demeaned last logits,
        values and embedding of one pass; `values`/`embedding` replace the recorded ones."""
        T = self.ids.size(1)
        seen = {"inputs": [None] * len(self.layers), "values": [None] * len(self.layers)}
        gate_step = [0]

        def fc_hook(layer):
            def hook(m, a, out):
                seen["inputs"][layer] = out.view(T, -1)
            return hook

        def gate_hook(m, a, out):
            if self.recording:
                self.tape["gate"].append(out.detach())
                return out
            gate_step[0] += 1
            return self.tape["gate"][gate_step[0] - 1]

        def proj_hook(layer):
            def hook(m, a):
                x = a[0]
                if self.gated:
                    seen["inputs"][layer] = x.view(T, -1)
                seen["values"][layer] = x.detach().view(T, -1)
                if values is None:
                    return None
                return (values[layer].reshape(x.shape), *a[1:])
            return hook

        def embed_hook(m, a, k):
            h = a[0] if a else k["hidden_states"]
            seen["embedding"] = h.detach()[0]
            if embedding is None:
                return None
            e = embedding.view(h.shape)
            return ((e, *a[1:]), k) if a else (a, {**k, "hidden_states": e})

        hooks = [self.layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True)]
        for i, layer in enumerate(self.layers):
            if self.gated:
                hooks.append(get(layer, self.first[0]).register_forward_hook(gate_hook))
            else:
                hooks.append(get(layer, self.first).register_forward_hook(fc_hook(i)))
            hooks.append(get(layer, self.proj).register_forward_pre_hook(proj_hook(i)))
        try:
            with self.patched():
                logits = self.hf(input_ids=self.ids).logits[0, -1]
        finally:
            for h in hooks:
                h.remove()
        return {**seen, "logits": logits - logits.mean()}

    def row(self, target):
        """Autograd row of a target ((layer, pos, dim) or the token of a logit): per-neuron edges
        (n_layers, T, d_mlp) and embedding edges (T,)."""
        values = [v.clone().requires_grad_() for v in self.values]
        embedding = self.embedding.clone().requires_grad_()
        out = self.run(values, embedding)
        y = out["logits"][target] if isinstance(target, int) else out["inputs"][target[0]][target[1], target[2]]
        grads = torch.autograd.grad(y, values + [embedding], allow_unused=True)
        edges = torch.stack([(g if g is not None else torch.zeros_like(v)) * v.detach()
                             for g, v in zip(grads[:-1], self.values)])
        return edges, (grads[-1] * self.embedding).sum(-1)

    def input_of(self, target, values=None, embedding=None):
        """A target's input with every neuron value held (the recorded ones, or `values`)."""
        with torch.no_grad():
            out = self.run(self.values if values is None else values, embedding)
        if isinstance(target, int):
            return float(out["logits"][target])
        return float(out["inputs"][target[0]][target[1], target[2]])


def graph_targets(g):
    """(node index, target) of every node with an input: kept neurons, then logits."""
    out = [(i, tuple(int(x) for x in g.neurons[i][[0, 1, 2]])) for i in range(g.n_kept)]
    return out + [(g.logit_start + k, int(t)) for k, t in enumerate(g.logit_tokens)]


def expected_row(g, edges, emb):
    """A graph row from a full autograd row: kept columns, "other neurons" sums, embeddings."""
    row = torch.zeros(g.n_nodes, dtype=torch.float64)
    e = edges.double()
    kept = e[g.neurons[:, 0], g.neurons[:, 1], g.neurons[:, 2]]
    row[:g.n_kept] = kept
    other = e.sum(-1)
    other.index_put_((g.neurons[:, 0], g.neurons[:, 1]), -kept, accumulate=True)
    row[g.other_start:g.embedding_start] = other.flatten()
    row[g.embedding_start:g.logit_start] = emb.double()
    return row


def check_graph(g, frozen, n_neuron_rows=6, atol=1e-5):
    T = g.n_pos
    targets = graph_targets(g)
    rng = np.random.default_rng(0)
    neuron_rows = [targets[i] for i in sorted(rng.choice(g.n_kept, min(n_neuron_rows, g.n_kept), replace=False))]
    checked = neuron_rows + targets[g.n_kept:]
    for node, target in checked:
        edges, emb = frozen.row(target)
        want = expected_row(g, edges, emb)
        torch.testing.assert_close(g.adjacency[node].double(), want, atol=atol, rtol=1e-4)
        # the target's input: the frozen model's, and its row sum plus its constant
        y = frozen.input_of(target)
        assert abs(float(g.adjacency[node].double().sum() + g.constants[node]) - y) < 1e-4 * max(1, abs(y))
        if node < g.n_kept:
            assert abs(float(g.inputs[node]) - y) < 1e-4 * max(1, abs(y))
    # zeroing one source changes each target's input by its edge
    for node, target in checked[-3:] + neuron_rows[-2:]:
        base = frozen.input_of(target)
        row = g.adjacency[node]
        for src in torch.argsort(row[:g.n_kept].abs(), descending=True)[:2].tolist():
            l, t, d = (int(x) for x in g.neurons[src])
            values = [v.clone() for v in frozen.values]
            values[l][t, d] = 0
            assert abs((base - frozen.input_of(target, values=values)) - float(row[src])) < atol
        t = int(torch.argmax(row[g.embedding_start:g.logit_start].abs()))
        embedding = frozen.embedding.clone()
        embedding[t] = 0
        assert abs((base - frozen.input_of(target, embedding=embedding)) - float(row[g.embedding_start + t])) < atol
    # the kept neurons' values and source-only nodes
    values = torch.stack(frozen.values).view(g.n_layers, T, -1)
    torch.testing.assert_close(g.values, values[g.neurons[:, 0], g.neurons[:, 1], g.neurons[:, 2]],
                               atol=1e-5, rtol=1e-5)
    assert not g.adjacency[g.other_start:g.logit_start].any() and not g.constants[g.other_start:g.logit_start].any()


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    from transformers import GPT2LMHeadModel

    path = make_checkpoint(tmp_path_factory.mktemp("trace") / "tracegpt", seed=3)
    lm = load_model(str(path), device="cpu")
    hf = GPT2LMHeadModel.from_pretrained(str(path), attn_implementation="eager").eval()
    return lm, hf


def test_gpt2_model_py_graph_equals_transformers_frozen_autograd(gpt2_pair):
    lm, hf = gpt2_pair
    ids = lm.tokenizer(PROMPT)["input_ids"]
    g = attribution.attribute(lm, ids, TraceSettings(max_nodes=60, batch_size=16), progress=False)
    assert g.n_kept == 60 and g.n_logits >= 1 and g.neurons.dtype == torch.int64
    assert torch.equal(g.input_tokens, torch.tensor(ids)) and g.model_name == "tracegpt"
    check_graph(g, Frozen(hf, "gpt2", ids))


def family_graph(tmp_path, family, max_nodes=40):
    from transformers import AutoModelForCausalLM

    path = build(family, tmp_path / f"tiny_{family}")
    lm = load_model(str(path), device="cpu")
    ids = lm.tokenizer(PROMPT)["input_ids"]
    g = attribution.attribute(lm, ids, TraceSettings(max_nodes=max_nodes, batch_size=16), progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    return g, Frozen(hf, family, ids), lm


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_graph_equals_frozen_autograd(tmp_path, family):
    g, frozen, _ = family_graph(tmp_path, family)
    check_graph(g, frozen)


def test_slopes_are_the_activation_derivative(gpt2_pair):
    lm, _ = gpt2_pair
    g = attribution.attribute(lm, PROMPT, TraceSettings(max_nodes=30, batch_size=16), progress=False)
    z = g.inputs.double().requires_grad_()
    gelu = 0.5 * z * (1 + torch.tanh((2 / np.pi) ** 0.5 * (z + 0.044715 * z ** 3)))
    torch.testing.assert_close(g.values.double(), gelu.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.slopes.double(), torch.autograd.grad(gelu.sum(), z)[0], atol=1e-5, rtol=1e-4)


def test_logit_targets_follow_circuit_tracer(gpt2_pair):
    lm, hf = gpt2_pair
    ids = lm.tokenizer(PROMPT)["input_ids"]
    settings = TraceSettings(max_nodes=5, batch_size=16, max_logits=4, logit_probability=0.5)
    g = attribution.attribute(lm, ids, settings, progress=False)
    with torch.no_grad():
        p = torch.softmax(hf(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    top = torch.argsort(p, descending=True)
    cum = p[top].cumsum(0)
    k = min(4, int((cum < 0.5).sum()) + 1)  # until the probabilities reach 0.5, at most 4
    assert g.logit_tokens.tolist() == top[:k].tolist()
    torch.testing.assert_close(g.logit_probabilities.double(), p[top[:k]], atol=1e-6, rtol=1e-5)


def numpy_phase4(full: np.ndarray, n_cand: int, n_logits: int, probs: np.ndarray, max_nodes: int, batch: int,
                 interval: int = 4) -> set:
    """circuit-tracer's phase 4 (attribute.py, compute_partial_influences) on full rows: the neurons it keeps.
    full: (n_cand + n_logits, n_cand + extra) rows of every neuron then the logits, over neuron columns first."""
    n_cols = full.shape[1]
    logit_node = np.arange(n_cols, n_cols + n_logits)  # logit nodes get their own columns
    rows = [full[n_cand + k] for k in range(n_logits)]
    row_node = list(logit_node)
    visited = []
    while len(visited) < max_nodes:
        m = np.abs(np.array(rows, dtype=np.float64))
        m /= np.maximum(m.sum(1, keepdims=True), 1e-8)
        m = np.concatenate([m, np.zeros((len(m), n_logits))], 1)
        prod = np.zeros(n_cols + n_logits)
        prod[-n_logits:] = probs
        influence = np.zeros(n_cols + n_logits)
        for _ in range(100):
            prod = prod[row_node] @ m
            if not prod.any():
                break
            influence += prod
        rank = np.argsort(-influence[:n_cand], kind="stable")
        pending = [i for i in rank if i not in set(visited)][:min(interval * batch, max_nodes - len(visited))]
        visited += pending
        rows += [full[i] for i in pending]
        row_node += pending
    return set(visited)


def test_kept_set(tmp_path):
    g_all, _, lm = family_graph(tmp_path, "llama", max_nodes=10 ** 6)
    n_layers, T = g_all.n_layers, g_all.n_pos
    d_mlp = lm.model.config.d_mlp
    n_cand = n_layers * T * d_mlp
    # every neuron, in (layer, position, dim) order, and no "other neurons"
    assert g_all.n_kept == n_cand
    grid = torch.stack(torch.meshgrid(torch.arange(n_layers), torch.arange(T), torch.arange(d_mlp), indexing="ij"))
    assert torch.equal(g_all.neurons, grid.reshape(3, -1).T)
    assert not g_all.adjacency[:, g_all.other_start:g_all.embedding_start].any()

    full = g_all.adjacency.numpy()
    full = np.concatenate([full[:n_cand], full[g_all.logit_start:]])[:, :g_all.logit_start]
    probs = g_all.logit_probabilities.numpy().astype(np.float64)
    for max_nodes, batch in ((13, 16), (70, 8)):  # one ranking; several, with a partial last batch
        g = attribution.attribute(lm, g_all.input_tokens.tolist(), TraceSettings(max_nodes=max_nodes, batch_size=batch),
                                  progress=False)
        kept = set(((g.neurons[:, 0] * T + g.neurons[:, 1]) * d_mlp + g.neurons[:, 2]).tolist())
        assert kept == numpy_phase4(full, n_cand, g.n_logits, probs, max_nodes, batch)


def test_refusals(gpt2_pair, monkeypatch):
    lm, _ = gpt2_pair
    with pytest.raises(PipelineError, match="rwkv"):
        linear.check_family(types.SimpleNamespace(config=types.SimpleNamespace(architecture="rwkv")))
    monkeypatch.setattr(attribution, "available_memory", lambda: 1000)
    with pytest.raises(PipelineError, match="GiB available") as e:
        attribution.attribute(lm, PROMPT, TraceSettings(max_nodes=5), progress=False)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    with pytest.raises(PipelineError, match="context"):
        attribution.attribute(lm, [1] * (lm.model.config.block_size + 1), TraceSettings(max_nodes=5), progress=False)

    # an attention that does not go through scaled_dot_product_attention is refused, not traced unfrozen
    attn = lm.model.transformer.h[0].attn

    def eager(x, layer, cache, mask):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in attn.c_attn(x).split(C, 2))
        s = (q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        return attn.c_proj((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, C))

    monkeypatch.setattr(attn, "forward", eager)
    with pytest.raises(PipelineError, match="did not pass"):
        attribution.attribute(lm, PROMPT, TraceSettings(max_nodes=5), progress=False)


def test_unknown_norm_is_refused():
    class ScaleNorm(nn.Module):
        def forward(self, x):
            return x / x.norm(dim=-1, keepdim=True)

    x = torch.randn(2, 3, 4)
    with pytest.raises(PipelineError, match="ScaleNorm"):
        linear._frozen_norm(ScaleNorm(), x, ScaleNorm()(x))
