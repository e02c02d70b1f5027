"""
gelutrace.cards and f_render_neuron_cards.py against independent references: transformers' GPT2LMHeadModel
with hooks on `mlp.act` over the dataset's sequences and a brute-force sort (top examples), a numpy
computation from the weights (direct logit effect), and Python's html.parser (the page).
"""

import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT, SHIPPED_NAME
from gelutrace import cards
from gelutrace import stagefiles as sf

# greedy: the 3 repeats of the first prompt are one sequence, kept under the first repeat's sample ids
PROMPTS = [("KING HENRY. Now, lords, ", 6, 3), ("And God said, \"Let there be\", ", 5, 1),
           ("To be, or not to be", 7, 1), ("Amen", 0, 2)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped_path):
    d = tmp_path_factory.mktemp("cards")
    csv = d / "prompts.csv"
    pd.DataFrame(PROMPTS, columns=sf.PROMPT_COLUMNS).to_csv(csv, index=False)
    r = subprocess.run([sys.executable, str(REPO_ROOT / "b_generate_activation_dataset.py"), "--input_csv", str(csv),
                        "--export_dir", str(d / "ds"), "--model_type", SHIPPED_NAME, "--device", "cpu",
                        "--no_edge_list", "--no_activation_lists"], capture_output=True, text=True, cwd=REPO_ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    return d / "ds"


def reference_values(hf, data):
    """(sample ids, values samples x neurons) from transformers, over each distinct sequence's first occurrence."""
    df = pd.read_csv(sf.path(data, sf.DATASET, SHIPPED_NAME), keep_default_na=False)
    starts = list(np.flatnonzero(df["token_position"].to_numpy() == 0)) + [len(df)]
    seen, sids, vals = set(), [], []
    for lo, hi in zip(starts[:-1], starts[1:]):
        prompt = json.loads(df["input_text_ids"].iloc[lo])
        cont = df["output_id"].iloc[lo:hi].tolist()
        if (tuple(prompt), tuple(cont)) in seen:
            continue
        seen.add((tuple(prompt), tuple(cont)))
        acts = []
        hooks = [b.mlp.act.register_forward_hook(lambda m, i, o: acts.append(o[0])) for b in hf.transformer.h]
        try:
            with torch.no_grad():
                hf(torch.tensor([prompt + cont[:-1]]))
        finally:
            for h in hooks:
                h.remove()
        full = torch.cat(acts, dim=1).double().numpy()  # positions x neurons
        vals.append(full[len(prompt) - 1:])
        sids.append(df["sample_id"].iloc[lo:hi].to_numpy())
    return np.concatenate(sids), np.concatenate(vals)


def test_top_examples_equal_transformers_and_a_brute_force_sort(dataset, shipped, shipped_hf):
    model, cfg = shipped.model, shipped.model.config
    sids, ref = reference_values(shipped_hf, dataset)
    assert len(sids) == 6 + 5 + 7  # the greedy repeats collapse into one sequence
    rng = np.random.default_rng(1)
    neurons = np.sort(rng.choice(cfg.n_layer * cfg.d_mlp, 48, replace=False))
    seqs = cards.dataset_sequences(dataset, SHIPPED_NAME)
    k = 5
    for batch_size in (1, 2, 64):  # the running top-k merged batch by batch equals one merge of everything
        values, ids = cards.top_examples(model, seqs, neurons, k, batch_size=batch_size)
        assert values.shape == ids.shape == (len(neurons), k)
        for row, n in enumerate(neurons):
            order = sorted(range(len(sids)), key=lambda s: (-ref[s, n], sids[s]))[:k]  # brute force
            np.testing.assert_array_equal(ids[row], sids[order])
            np.testing.assert_allclose(values[row], ref[order, n], atol=1e-4)
    values, ids = cards.top_examples(model, seqs, neurons[:3], 100)
    assert ids.shape == (3, len(sids))  # k larger than the samples: every sample, sorted


def test_ties_go_to_the_lower_sample_id():
    v = np.array([[1.0, 2.0], [3.0, 2.0], [3.0, 1.0]])
    i = np.array([[5, 0], [4, 1], [2, 2]])
    top_v, top_i = cards._merge_top(v, i, 2)
    np.testing.assert_array_equal(top_i, [[2, 0], [4, 1]])
    np.testing.assert_array_equal(top_v, [[3.0, 2.0], [3.0, 2.0]])


def test_examples_table_context_and_token(dataset, shipped):
    seqs = cards.dataset_sequences(dataset, SHIPPED_NAME)
    values, ids = cards.top_examples(shipped.model, seqs, np.array([7, 900]), 3)
    table = cards.examples_table(shipped.tokenizer, seqs, np.array([7, 900]), values, ids)
    assert list(table.columns) == sf.TOP_EXAMPLES_COLUMNS
    df = pd.read_csv(sf.path(dataset, sf.DATASET, SHIPPED_NAME), keep_default_na=False).set_index("sample_id")
    for r in table.itertuples():
        assert r.token == df.loc[r.sample_id, "output"]  # the token the activation predicts
        assert df.loc[r.sample_id, "input_text"].endswith(r.context)  # the text before it


def test_context_activations_end_with_the_sample_value(dataset, shipped):
    seqs = cards.dataset_sequences(dataset, SHIPPED_NAME)
    neurons = np.array([3, 600, 2000])
    values, ids = cards.top_examples(shipped.model, seqs, neurons, 2)
    prefixes = [seqs.prefix(int(s)) for s in ids.ravel()]
    shades = cards.context_activations(shipped.model, prefixes, np.repeat(neurons, 2), batch_size=4)
    for p, s, v in zip(prefixes, shades, values.ravel()):
        assert len(s) == min(len(p), cards.CONTEXT_TOKENS)
        assert s[-1] == pytest.approx(v, abs=1e-5)


def test_direct_logit_effect_equals_a_numpy_computation(shipped, shipped_hf):
    cfg = shipped.model.config
    w_u = shipped_hf.lm_head.weight.detach().double().numpy()
    gain = shipped_hf.transformer.ln_f.weight.detach().double().numpy()
    for neuron in (0, 777, cfg.n_layer * cfg.d_mlp - 1):
        layer, dim = divmod(neuron, cfg.d_mlp)
        w_out = shipped_hf.transformer.h[layer].mlp.c_proj.weight.detach().double().numpy()[dim]  # Conv1D: (in, out)
        effect = w_u @ (w_out * gain)
        up, down = np.argsort(-effect)[:10], np.argsort(effect)[:10]
        promoted, suppressed = cards.direct_logit_effect(shipped.model, shipped.tokenizer, neuron)
        assert [t.token_id for t in promoted] == up.tolist()
        assert [t.token_id for t in suppressed] == down.tolist()
        np.testing.assert_allclose([t.value for t in promoted], effect[up], rtol=1e-6)
        np.testing.assert_allclose([t.value for t in suppressed], effect[down], rtol=1e-6)
        assert promoted[0].token == shipped.tokenizer.decode([int(up[0])])
