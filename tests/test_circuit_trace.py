"""
A per-prompt neuron graph's labels, supernodes, concentration test, faithfulness and summary, against independent
references: a step-by-step simulation of the linearised network (predicted effects), a hand-written forward pass
of the shipped model with the neuron zeroed (ablations), scipy's exact permutation test and Spearman correlation,
numpy's sort of the weights' product (promoted tokens) and the neuron cards (labels).
"""

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from gelutrace import PipelineError
from gelutrace.circuit import faithfulness as fa
from gelutrace.circuit.graph import NeuronGraph
from gelutrace.files import layout
from gelutrace.model.hooks import GeluHooks, PositionAblation
from gelutrace.report import cards, supernodes, tracelabels, tracesummary
from gelutrace.selection.communities import ModuleFile

from conftest import REPO_ROOT, SHIPPED_NAME, run_python


def make_graph(neurons, values, slopes, n_layers, n_pos, rng, n_logits=1, dag=True) -> tuple[NeuronGraph, np.ndarray]:
    """A graph of random coefficients C[target, source] over the kept neurons (from earlier layers and positions
    up to the target's), the logits (from every kept neuron) and random columns for the other and embedding nodes;
    returns it with C."""
    neurons = torch.as_tensor(neurons, dtype=torch.int64)
    k = len(neurons)
    n = k + n_layers * n_pos + n_pos + n_logits
    c = np.zeros((n, n))
    for w in range(k):
        for v in range(k):
            if (neurons[v, 0] < neurons[w, 0] or not dag) and neurons[v, 1] <= neurons[w, 1] and v != w:
                c[w, v] = rng.normal()
        c[w, k:k + n_layers * n_pos + n_pos] = rng.normal(size=n_layers * n_pos + n_pos)
    c[n - n_logits:, :n - n_logits] = rng.normal(size=(n_logits, n - n_logits))
    a = np.ones(n)
    a[:k] = values
    adjacency = torch.tensor(c * a[None, :], dtype=torch.float32)
    probs = torch.linspace(0.5, 0.1, n_logits)
    g = NeuronGraph("p", "m", torch.arange(n_pos), n_layers, neurons, torch.tensor(values, dtype=torch.float32),
                    torch.zeros(k), torch.tensor(slopes, dtype=torch.float32), torch.arange(n_logits), probs,
                    adjacency, torch.zeros(n))
    return g, c


def simulated_effects(c, values, slopes, neurons, logit: int) -> np.ndarray:
    """Zero each kept neuron and run the linearised network layer by layer: a kept neuron's value moves by its
    slope times the move of its input (its coefficients times the earlier values' moves)."""
    k = len(values)
    order = np.argsort(np.asarray(neurons)[:, 0], kind="stable")
    out = np.empty(k)
    for u in range(k):
        dv = np.zeros(k)
        dv[u] = -values[u]
        for v in order:
            if v != u:
                dv[v] = slopes[v] * sum(c[v, w] * dv[w] for w in range(k))
        out[u] = sum(c[logit, w] * dv[w] for w in range(k))
    return out


# --- predicted effects ------------------------------------------------------------------------------------
def test_predicted_effects_on_a_hand_built_chain():
    # u (layer 0) -> v (layer 1) -> logit, and u -> logit directly
    rng = np.random.default_rng(0)
    g, c = make_graph([[0, 0, 5], [1, 0, 7]], [2.0, -0.5], [0.8, 0.3], 2, 1, rng)
    logit = g.logit_start
    a_u, a_v, s_v = 2.0, -0.5, 0.3
    expect_u = -(a_u * c[logit, 0] + c[logit, 1] * s_v * a_u * c[1, 0])
    expect_v = -a_v * c[logit, 1]
    np.testing.assert_allclose(fa.predicted_effects(g), [expect_u, expect_v], rtol=1e-5)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_predicted_effects_equal_a_layer_by_layer_simulation(seed):
    rng = np.random.default_rng(seed)
    n_layers, n_pos, k = 4, 3, 12
    neurons = np.stack([rng.integers(0, n_layers, k), rng.integers(0, n_pos, k), rng.integers(0, 50, k)], axis=1)
    values = rng.normal(size=k) * 0.7
    slopes = rng.uniform(-0.1, 1.1, size=k)
    g, c = make_graph(neurons, values, slopes, n_layers, n_pos, rng, n_logits=3)
    for target in range(3):
        ref = simulated_effects(c, values, slopes, neurons, g.logit_start + target)
        np.testing.assert_allclose(fa.predicted_effects(g, target), ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fa.predicted_effects(g), fa.predicted_effects(g, 0))  # the most probable logit


def test_predicted_effects_refuse_a_cycle():
    rng = np.random.default_rng(4)
    g, _ = make_graph([[0, 0, 1], [0, 0, 2]], [1.0, 1.0], [1.0, 1.0], 1, 1, rng, dag=False)
    with pytest.raises(PipelineError, match="DAG"):
        fa.predicted_effects(g)


# --- ablations in the real model --------------------------------------------------------------------------
PROMPT = "KING HENRY. Now, lords, what"


def manual_logits(model, idx, zero=None) -> torch.Tensor:
    """model.py's forward written out, block by block, with neuron (layer, position, dim) zeroed: (T, vocab)."""
    t = model.transformer
    x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))[None]
    for i, block in enumerate(t.h):
        x = x + block.attn(block.ln_1(x), i, None, None)
        h = block.mlp.gelu(block.mlp.c_fc(block.ln_2(x)))
        if zero is not None and zero[0] == i:
            h = h.clone()
            h[0, zero[1], zero[2]] = 0.0
        x = x + block.mlp.c_proj(h)
    return model.lm_head(t.ln_f(x))[0]


@torch.no_grad()
def test_position_ablation_zeroes_exactly_one_neuron_at_one_position(shipped):
    model = shipped.model
    idx = torch.tensor([shipped.tokenizer.encode(PROMPT)])
    sites = [(1, 2, 7), (3, idx.shape[1] - 1, 100), (0, 0, 511)]
    acts = {}
    record = GeluHooks(model, lambda layer: lambda mod, i, o: acts.__setitem__(layer, o.clone()))
    with record:
        model(idx)
    clean = dict(acts)
    with PositionAblation(model, *zip(*sites)), record:  # the record hooks run after the ablation's
        logits = model(idx.expand(len(sites), -1))[0]
    for r, (layer, pos, dim) in enumerate(sites):
        assert acts[layer][r, pos, dim] == 0.0
        same = torch.ones_like(acts[layer][r], dtype=torch.bool)
        same[pos, dim] = False
        assert torch.equal(acts[layer][r][same], clean[layer][0][same])  # the rest of its layer, untouched
        for j in range(layer):
            assert torch.equal(acts[j][r], clean[j][0])
        for j in range(layer + 1, model.config.n_layer):
            assert torch.equal(acts[j][r, :pos], clean[j][0, :pos])  # a causal model: earlier positions untouched
        torch.testing.assert_close(logits[r], manual_logits(model, idx, (layer, pos, dim)), atol=1e-4, rtol=1e-4)


def autograd_graph(model, tokenizer, picks) -> NeuronGraph:
    """A graph of the kept neurons `picks` (layer, position, dim) with edges from autograd of the real model:
    A[w, v] = a_v * d input_w / d a_v, each kept neuron's value a leaf of its own in the forward pass (so that an
    edge does not pass through another kept neuron: it is direct), into the kept neurons and the top token's
    demeaned logit."""
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    pre, leaves = {}, {}

    def hook(layer):
        def h(mod, inputs, output):
            out = output.clone()
            for v, (a, p, d) in enumerate(picks):
                if a == layer:
                    pre[v] = inputs[0][0, p, d]
                    leaves[v] = output[0, p, d].detach().clone().requires_grad_(True)
                    out[0, p, d] = leaves[v]
            return out
        return h
    with GeluHooks(model, hook):
        logits = model(idx)[0][0, -1]
    probs = torch.softmax(logits.float(), -1)
    top = int(probs.argmax())
    k = len(picks)
    n_layers, n_pos = model.config.n_layer, idx.shape[1]
    n = k + n_layers * n_pos + n_pos + 1
    adjacency = torch.zeros(n, n)
    values = torch.stack([leaves[v] for v in range(k)]).detach()
    inputs = torch.stack([pre[v] for v in range(k)]).detach()
    zs = inputs.clone().requires_grad_(True)
    slopes = torch.autograd.grad(torch.nn.functional.gelu(zs, approximate="tanh").sum(), zs)[0]
    for w, out in enumerate([pre[v] for v in range(k)] + [fa.demeaned(logits)[top]]):
        srcs = [v for v in range(k) if picks[v][0] < (picks[w][0] if w < k else n_layers)]
        if not srcs:
            continue
        grads = torch.autograd.grad(out, [leaves[v] for v in srcs], retain_graph=True, allow_unused=True)
        for v, gr in zip(srcs, grads):
            adjacency[w if w < k else n - 1, v] = values[v] * (gr if gr is not None else 0.0)
    return NeuronGraph(PROMPT, "tinybard", idx[0], n_layers, torch.tensor(picks), values, inputs, slopes,
                       torch.tensor([top]), probs[top:top + 1].detach(), adjacency.detach(), torch.zeros(n))


def test_ablation_effects_equal_a_hand_written_forward(shipped):
    model = shipped.model
    picks = [(4, 5, 10), (5, 6, 20), (5, 2, 300), (3, 6, 77)]
    g = autograd_graph(model, shipped.tokenizer, picks)
    token = int(g.logit_tokens[0])
    idx = g.input_tokens[None]
    with torch.no_grad():
        clean = fa.demeaned(manual_logits(model, idx)[-1])[token]
        ref = [float(fa.demeaned(manual_logits(model, idx, p)[-1])[token] - clean) for p in picks]
    for batch_size in (1, 3):
        got = fa.ablation_effects(model, g, np.arange(len(picks)), batch_size=batch_size)
        np.testing.assert_allclose(got, ref, atol=2e-4)


def test_faithfulness_compares_the_graph_with_the_real_model(shipped):
    model = shipped.model
    idx = torch.tensor([shipped.tokenizer.encode(PROMPT)])
    acts = {}
    with torch.no_grad(), GeluHooks(model, lambda layer: lambda mod, i, o: acts.__setitem__(layer, o[0])):
        model(idx)
    picks = []  # the 4 largest values of layers 3-5 at the last 3 positions each: effects well above rounding
    for layer in (3, 4, 5):
        for pos in range(idx.shape[1] - 3, idx.shape[1]):
            picks += [(layer, pos, int(d)) for d in torch.topk(acts[layer][pos].abs(), 4).indices]
    g = autograd_graph(model, shipped.tokenizer, picks)
    influence = np.abs(fa.predicted_effects(g)) + np.arange(g.n_kept)[::-1] * 1e-9
    f = fa.faithfulness(model, g, influence, n=12, batch_size=5)
    assert f.nodes.tolist() == np.argsort(-influence, kind="stable")[:12].tolist()
    np.testing.assert_allclose(f.predicted, fa.predicted_effects(g)[f.nodes])
    np.testing.assert_allclose(f.measured, fa.ablation_effects(model, g, f.nodes), atol=1e-6)
    assert f.spearman == pytest.approx(stats.spearmanr(f.predicted, f.measured).statistic)
    assert f.sign_agreement == pytest.approx(np.mean(np.sign(f.predicted) == np.sign(f.measured)))
    # a first-order prediction through every path of kept neurons (edges among them included): close to the real
    # effects of these small ablations
    assert (g.adjacency[:g.n_kept, :g.n_kept] != 0).sum() > 100
    assert f.spearman > 0.9 and f.sign_agreement == 1.0
    np.testing.assert_allclose(f.predicted, f.measured, rtol=0.15, atol=4e-3)


# --- against the corpus ranking ---------------------------------------------------------------------------
def test_corpus_agreement_sums_positions_and_ranks_against_the_corpus(tmp_path):
    rng = np.random.default_rng(6)
    d_mlp, n_layers = 10, 3
    neurons = [[0, 0, 1], [0, 2, 1], [1, 1, 4], [2, 2, 9], [1, 0, 3], [2, 1, 0]]
    g, _ = make_graph(neurons, rng.normal(size=6), np.ones(6), n_layers, 3, rng)
    influence = np.array([0.5, 0.6, 0.9, 0.2, 0.3, 0.05])
    corpus = rng.uniform(size=n_layers * d_mlp)
    corpus[0] = np.nan  # a layer stage d left out would be NaN; this neuron is not among the prompt's
    agree = fa.corpus_agreement(g, influence, corpus, d_mlp, n=4)
    per = {1: 1.1, 14: 0.9, 13: 0.3, 29: 0.2, 20: 0.05}  # by hand: neuron 1 at two positions
    assert agree.neurons.tolist() == [1, 14, 13, 29]
    assert agree.spearman == pytest.approx(stats.spearmanr([per[i] for i in agree.neurons],
                                                           corpus[agree.neurons]).statistic)
    ranks = stats.rankdata(-np.nan_to_num(corpus, nan=-np.inf), method="ordinal")
    assert agree.median_corpus_rank == pytest.approx(np.median(ranks[agree.neurons]))
    scores = tmp_path / layout.SCORES_DIR
    scores.mkdir()
    np.save(scores / f"{SHIPPED_NAME}_influence.npy", corpus)
    np.testing.assert_array_equal(fa.read_corpus_influence(tmp_path, SHIPPED_NAME, len(corpus)), corpus)
    with pytest.raises(PipelineError, match="another model"):
        fa.read_corpus_influence(tmp_path, SHIPPED_NAME, len(corpus) + 1)
    with pytest.raises(PipelineError, match="stage d"):
        fa.read_corpus_influence(tmp_path, "other", len(corpus))


# --- supernodes and concentration -------------------------------------------------------------------------
def test_herfindahl_by_hand():
    assert supernodes.herfindahl([1, 1, 2], [0, 0, 1]) == pytest.approx(0.5)
    assert supernodes.herfindahl([1, 1, 2], [0, -1, 1]) == pytest.approx(0.25 ** 2 + 0.5 ** 2)
    assert supernodes.herfindahl([1, 3], [-1, -1]) == 0.0
    np.testing.assert_allclose(supernodes.herfindahl([1, 1, 2], [[0, 0, 1], [2, 1, 0]]), [0.5, 0.375])


@pytest.mark.parametrize("influence, module_of", [
    ([3.0, 2.0, 0.5], [0, 0, 1, 1, 1, -1, 2]),
    ([1.0, 1.0, 1.0, 0.2, 0.7], [0, 0, 0, -1, 1, 1, 1, 2, -1]),
])
def test_concentration_p_value_matches_scipys_exact_permutation_test(influence, module_of):
    module_of = np.array(module_of)
    ids = np.arange(len(influence))  # the prompt's neurons are the first ones; the rest of the model has 0
    full = np.zeros(len(module_of))
    full[ids] = influence
    covered = np.flatnonzero(module_of >= 0)

    def statistic(labels):  # the covered neurons' labels in some order, the others in no module
        every = module_of.copy()
        every[covered] = labels
        return supernodes.herfindahl(full, every)
    exact = stats.permutation_test((module_of[covered],), statistic, permutation_type="pairings",
                                   n_resamples=np.inf, alternative="greater").pvalue
    got = supernodes.concentration_test(ids, influence, module_of, permutations=20000, seed=3)
    assert abs(got.p_value - exact) < 4 * np.sqrt(exact * (1 - exact) / 20000) + 1e-3
    assert got.herfindahl == pytest.approx(statistic(module_of[covered]))
    assert got.permutations == 20000 and got.p_value >= 1 / 20001
    again = supernodes.concentration_test(ids, influence, module_of, permutations=20000, seed=3)
    assert again.p_value == got.p_value  # seeded


def test_concentrated_influence_has_a_small_p_value():
    rng = np.random.default_rng(7)
    module_of = np.repeat(np.arange(20), 50)  # 20 modules of 50 neurons
    rng.shuffle(module_of)
    in_0 = np.flatnonzero(module_of == 0)[:15]
    spread = rng.choice(np.flatnonzero(module_of != 0), 15, replace=False)
    c = supernodes.concentration_test(in_0, np.ones(15), module_of, permutations=999, seed=0)
    assert c.p_value == pytest.approx(1 / 1000) and c.effective_modules == pytest.approx(1.0)
    assert c.null_effective_modules > 5
    s = supernodes.concentration_test(np.sort(spread), np.ones(15), module_of, permutations=999, seed=0)
    assert s.p_value > 0.05


def test_supernodes_group_kept_neurons_by_module_and_pin_the_most_influential(shipped):
    rng = np.random.default_rng(8)
    d_mlp = shipped.model.config.d_mlp
    neurons = [[0, 0, 1], [0, 2, 1], [1, 1, 4], [2, 2, 9], [1, 0, 3], [2, 1, 0]]
    g, _ = make_graph(neurons, rng.normal(size=6), np.ones(6), 3, 3, rng)
    module_of = np.full(6 * d_mlp, -1)
    module_of[[1, d_mlp + 4, 2 * d_mlp + 9, d_mlp + 3, 2 * d_mlp]] = [0, 1, 1, 2, 0]
    module_of[[5, 6, 7]] = [2, 2, 0]
    influence = np.array([0.5, 0.6, 0.9, 0.2, 0.3, 0.05])
    nodes = supernodes.node_modules(g, module_of, d_mlp)
    assert nodes.tolist() == [0, 0, 1, 1, 2, 0]
    names = {0: "M0: a", 1: "M1: b", 2: "M2: c"}
    groups = supernodes.supernodes(g, influence, nodes, names)
    assert groups == [("M0: a", [0, 1, 5]), ("M1: b", [2, 3])]  # influence 1.15, 1.1; module 2 has one node
    assert supernodes.pinned_nodes(g, influence, 3) == [2, 1, 0]
    mf = ModuleFile(f"x/{SHIPPED_NAME}_modules_count.csv", module_of, {}, d_mlp)
    got = supernodes.module_names(shipped.model, shipped.tokenizer, mf, [0, 2], SHIPPED_NAME)
    effect = cards.logit_effects(shipped.model, mf.ids(0)).sum(axis=1)
    top = [shipped.tokenizer.decode([int(i)]) for i in np.argsort(-effect, kind="stable")[:3]]
    assert got[0] == "M0: " + " ".join(f'"{t}"' for t in top)
    tokens = pd.DataFrame({"subset": [f"{SHIPPED_NAME}_module2_count"] * 2 + [f"{SHIPPED_NAME}_module2_phi"],
                           "module": 2, "rank": [2, 1, 1], "token_id": 0, "token": ["y", "x", "z"], "tokens": 1,
                           "nll": 0.0, "delta_nll": 0.0})
    got = supernodes.module_names(shipped.model, shipped.tokenizer, mf, [2], SHIPPED_NAME, tokens)
    assert got == {2: 'M2: "x" "y"'}
    with pytest.raises(PipelineError, match="another model"):
        supernodes.node_modules(g, module_of[:d_mlp], d_mlp)


def test_graph_concentration_sums_a_neurons_positions():
    rng = np.random.default_rng(9)
    d_mlp = 10
    g, _ = make_graph([[0, 0, 1], [0, 2, 1], [1, 1, 4]], rng.normal(size=3), np.ones(3), 2, 3, rng)
    module_of = np.array([0] * 10 + [1] * 10)
    c = supernodes.graph_concentration(g, [0.5, 0.25, 0.25], module_of, d_mlp, permutations=99)
    assert c.neurons == 2 and c.herfindahl == pytest.approx(0.75 ** 2 + 0.25 ** 2)


# --- labels -----------------------------------------------------------------------------------------------
def test_direct_logit_effects_of_many_neurons_equal_numpy(shipped):
    model = shipped.model
    ids = np.array([3, 700, 701, 2000, 3071 % (model.config.n_layer * model.config.d_mlp)])
    w_u = model.lm_head.weight.detach().double().numpy()
    gain = model.transformer.ln_f.weight.detach().double().numpy()
    for (up, down), n in zip(cards.direct_logit_effects(model, shipped.tokenizer, ids, 5, chunk=2), ids):
        layer, dim = divmod(int(n), model.config.d_mlp)
        effect = w_u @ (model.transformer.h[layer].mlp.c_proj.weight.detach().double().numpy()[:, dim] * gain)
        assert [t.token_id for t in up] == np.argsort(-effect, kind="stable")[:5].tolist()
        assert [t.token_id for t in down] == np.argsort(effect, kind="stable")[:5].tolist()


def test_labels_without_a_dataset_are_layer_and_dimension(shipped):
    rng = np.random.default_rng(10)
    g, _ = make_graph([[0, 0, 1], [2, 1, 17]], rng.normal(size=2), np.ones(2), 3, 2, rng)
    assert tracelabels.neuron_labels(shipped.model, shipped.tokenizer, g) == ["L0/N1", "L2/N17"]


def test_compose_label_is_short_and_shows_where_it_fires():
    ex = [cards.Example(1.0, 0, ["a", " long", " long", " prefix", "\n", " dog"], np.zeros(0), "x"),
          cards.Example(0.5, 1, [" cat"], np.zeros(0), "y")]
    up = [cards.TokenEffect(1, " bark", 1.0), cards.TokenEffect(2, " ran", 0.5), cards.TokenEffect(3, "!", 0.1),
          cards.TokenEffect(4, "?", 0.0)]
    assert tracelabels.compose_label(3, 17, ex, up) == 'L3/N17 " prefix⏎[ dog]" "[ cat]" → " bark" " ran" "!"'
    long = [cards.Example(1.0, 0, ["x" * 40, "y" * 10, "z"], np.zeros(0), "")]
    label = tracelabels.compose_label(0, 0, long, [])
    assert label.startswith('L0/N0 "…') and label.endswith('y[z]"')
    assert len(label) <= len('L0/N0 ""') + tracelabels.LABEL_CONTEXT_CHARS


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped_path):
    d = tmp_path_factory.mktemp("trace")
    csv = d / "prompts.csv"
    pd.DataFrame([("KING HENRY. Now, lords, ", 6, 1), ("To be, or not to be", 7, 1)],
                 columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    r = run_python([sys.executable, str(REPO_ROOT / "b_generate_activation_dataset.py"), "--input_csv", str(csv),
                    "--export_dir", str(d / "ds"), "--model_type", SHIPPED_NAME, "--device", "cpu",
                    "--no_edge_list", "--no_activation_lists"], cwd=REPO_ROOT,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    return d / "ds"


@pytest.fixture(scope="module")
def corpus_dataset(tmp_path_factory, shipped_path):
    d = tmp_path_factory.mktemp("trace_corpus")
    text = (REPO_ROOT / "parcellation_datasets" / "heldout_corpus_tinybard.txt").read_text()[:3000]
    (d / "text.txt").write_text(text)
    r = run_python([sys.executable, str(REPO_ROOT / "b_generate_activation_dataset.py"), "--input_text",
                    str(d / "text.txt"), "--export_dir", str(d / "ds"), "--model_type", SHIPPED_NAME,
                    "--device", "cpu"],
                   cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    return d / "ds"


@pytest.mark.parametrize("mode", ["dataset", "corpus_dataset"])
def test_examples_without_shades_are_the_cards_examples(mode, request, shipped):
    data = request.getfixturevalue(mode)
    ids = np.array([1, 600, 2047, 3000])
    shaded = cards.neuron_examples(shipped.model, shipped.tokenizer, data, SHIPPED_NAME, ids, 3)
    plain = cards.neuron_examples(shipped.model, shipped.tokenizer, data, SHIPPED_NAME, ids, 3, shades=False)
    for a, b in zip(shaded, plain):
        assert [(e.value, e.sample_id, e.tokens, e.token) for e in a] == [(e.value, e.sample_id, e.tokens, e.token)
                                                                          for e in b]
        assert all(len(e.shades) == len(e.tokens) for e in a) and all(len(e.shades) == 0 for e in b)
    labels = tracelabels.neuron_labels(shipped.model, shipped.tokenizer, make_graph(
        [[0, 0, 1], [5, 1, 440]], [1.0, 1.0], [1.0, 1.0], 6, 2, np.random.default_rng(0))[0], data, SHIPPED_NAME)
    d = shipped.model.config.d_mlp
    card = cards.build_cards(shipped.model, shipped.tokenizer, data, SHIPPED_NAME, np.array([5 * d + 440]), k=2)[0]
    assert labels[1] == tracelabels.compose_label(5, 440, card.examples, card.promoted)


def test_labels_from_a_dataset_agree_with_the_cards_and_look_each_neuron_up_once(dataset, shipped, monkeypatch):
    rng = np.random.default_rng(11)
    neurons = [[0, 0, 1], [2, 1, 17], [0, 3, 1], [5, 2, 400]]  # neuron (0, 1) at two positions
    g, _ = make_graph(neurons, rng.normal(size=4), np.ones(4), 6, 4, rng)
    calls = []
    real = cards.neuron_examples
    monkeypatch.setattr(cards, "neuron_examples", lambda *a, **k: calls.append(a[4].tolist()) or real(*a, **k))
    labels = tracelabels.neuron_labels(shipped.model, shipped.tokenizer, g, dataset, SHIPPED_NAME)
    d = shipped.model.config.d_mlp
    assert calls == [[1, 2 * d + 17, 5 * d + 400]]
    assert labels[0] == labels[2]
    monkeypatch.setattr(cards, "neuron_examples", real)
    for label, (layer, _, dim) in zip(labels, neurons):
        card = cards.build_cards(shipped.model, shipped.tokenizer, dataset, SHIPPED_NAME,
                                 np.array([layer * d + dim]), k=2)[0]
        assert label == tracelabels.compose_label(layer, dim, card.examples, card.promoted)
        assert label.startswith(f"L{layer}/N{dim} ") and card.promoted[0].token in label
    with pytest.raises(PipelineError, match="another model|neither"):
        tracelabels.neuron_labels(shipped.model, shipped.tokenizer, g, dataset, "othermodel")


# --- the summary ------------------------------------------------------------------------------------------
def test_summary_writes_three_files_with_escaped_text(tmp_path, shipped):
    rng = np.random.default_rng(12)
    neurons = [[0, 0, 1], [1, 1, 4], [2, 2, 9]]
    g, _ = make_graph(neurons, rng.normal(size=3), rng.uniform(size=3), 3, 3, rng)
    g.prompt = "a | b *c* <b>x</b>"
    g.input_tokens = torch.tensor(shipped.tokenizer.encode(" | *x"))[:3]
    assert len(g.input_tokens) == 3
    influence = np.array([0.2, 0.9, 0.4])
    f = fa.Faithfulness(np.array([1, 2]), np.array([0.1, -0.2]), np.array([0.3, -0.1]), 1.0, 1.0)
    conc = supernodes.Concentration(0.5, 2.0, 4.0, 0.01, 99, 0, 3, 2, 0.1)
    corpus = fa.CorpusAgreement(np.array([1]), np.nan, 3)
    s = tracesummary.TraceSummary(g, influence, ["L0/N1 \"[x]\"", "L1/N4 | *y*", "L2/N9"], 0.8, 0.9,
                                  np.array([0, -1, 0]), {0: "M0: \"|\""}, f, corpus, conc)
    written = tracesummary.write_trace_summary(tmp_path, SHIPPED_NAME, s, shipped.tokenizer, top=2)
    assert [p.name for p in written] == [f.format(m=SHIPPED_NAME) for f in layout.TRACE_SUMMARY_SET]
    manifest = json.loads(layout.path(tmp_path, layout.TRACE_SUMMARY_MANIFEST, SHIPPED_NAME).read_text())
    assert manifest["state"] == "complete" and sorted(manifest["files"]) == sorted(p.name for p in written)
    table = pd.read_csv(written[1], keep_default_na=False)
    assert list(table.columns) == layout.TRACE_SUMMARY_COLUMNS
    assert table["node"].tolist() == [1, 2] and table["rank"].tolist() == [1, 2]
    assert table["label"].tolist() == ["L1/N4 | *y*", "L2/N9"]
    assert table["module"].tolist() == [-1, 0]
    np.testing.assert_allclose(table["measured"].astype(float), [0.3, -0.1])
    np.testing.assert_allclose(table["predicted"].astype(float), fa.predicted_effects(g)[[1, 2]], rtol=1e-6)
    assert table["token"].tolist() == [shipped.tokenizer.decode([int(t)]) for t in g.input_tokens[[1, 2]]]
    record = json.loads(written[2].read_text())
    assert record["replacement_score"] == 0.8 and record["corpus"]["spearman"] is None
    assert record["concentration"]["p_value"] == 0.01 and record["faithfulness"]["sign_agreement"] == 1.0
    md = written[0].read_text()
    assert "<b>" not in md and "a \\| b \\*c\\* &lt;b&gt;x&lt;/b&gt;" in md
    assert "L1/N4 \\| \\*y\\*" in md and 'M0: "\\|"' in md
    rows = [line for line in md.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1 and rows[0].replace("\\|", "").count("|") == 13  # 12 cells, none split
    assert "p = 0.01" in md


def test_a_failed_summary_leaves_the_earlier_one(tmp_path, shipped, monkeypatch):
    rng = np.random.default_rng(13)
    g, _ = make_graph([[0, 0, 1], [1, 1, 4]], rng.normal(size=2), np.ones(2), 2, 2, rng)
    s = tracesummary.TraceSummary(g, np.array([0.3, 0.7]), ["a", "b"], 0.5, 0.6)
    written = tracesummary.write_trace_summary(tmp_path, SHIPPED_NAME, s, shipped.tokenizer)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == sorted([p.name for p in written]
                                    + [layout.TRACE_SUMMARY_MANIFEST.format(m=SHIPPED_NAME)])

    def broken(*a, **k):
        raise OSError("disk trouble")
    monkeypatch.setattr(tracesummary.atomic, "write_json", broken)
    s.replacement = 0.1
    with pytest.raises(OSError):
        tracesummary.write_trace_summary(tmp_path, SHIPPED_NAME, s, shipped.tokenizer)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
