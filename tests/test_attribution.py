"""
Stage b's attribution column against independent references: gradients taken through transformers'
GPT2LMHeadModel (hooks on `mlp.act`), and brute-force single-neuron zero-ablation of the same model.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from test_recording import run, write_prompts
from torch.nn import functional as F

from gelutrace.files import layout
from gelutrace.record.attribution import distinct_sequences, neuron_attribution
from gelutrace.record.prompts import prompt_halves

from conftest import SHIPPED_NAME

PROMPTS = [("KING HENRY. Now, lords, ", 16, 3), ("And God said, Let there be ", 12, 2), ("ROMEO. ", 20, 1),
           ("Thou shalt not ", 0, 2)]


def hf_nll(hf, seqs, conts, weights, ablate=None):
    """Mean over samples of the continuation's mean NLL (each distinct sequence run once, weighted by the samples
    it stands for, as stage e averages), with neuron (layer, dim) zeroed when given."""
    handle = None
    if ablate is not None:
        layer, dim = ablate

        def zero(module, inputs, output):
            output = output.clone()
            output[..., dim] = 0
            return output
        handle = hf.transformer.h[layer].mlp.act.register_forward_hook(zero)
    try:
        vals = []
        with torch.no_grad():
            for p, c in zip(seqs, conts):
                ids = torch.tensor([list(p) + list(c[:-1])])
                logp = F.log_softmax(hf(ids).logits[0, -len(c):].float(), -1)
                vals.append(-logp[torch.arange(len(c)), torch.as_tensor(c)].double().mean().item())
    finally:
        if handle is not None:
            handle.remove()
    return float(np.average(vals, weights=weights))


def hf_attribution(hf, seqs, conts, weights):
    """-sum_p a dL/da through transformers' own model, one sequence at a time (no padding)."""
    acts = []
    handles = [blk.mlp.act.register_forward_hook(lambda m, i, o: (o.retain_grad(), acts.append(o)) and None)
               for blk in hf.transformer.h]
    try:
        total = sum(w for w, c in zip(weights, conts) if len(c))
        per_layer = None
        for p, c, w in zip(seqs, conts, weights):
            if not len(c):
                continue
            acts.clear()
            ids = torch.tensor([list(p) + list(c[:-1])])
            logp = F.log_softmax(hf(ids).logits[0, -len(c):].float(), -1)
            loss = -logp[torch.arange(len(c)), torch.as_tensor(c)].mean() * (w / total)
            hf.zero_grad()
            loss.backward()
            contrib = np.concatenate([-(a * a.grad).sum(dim=(0, 1)).detach().double().numpy() for a in acts])
            per_layer = contrib if per_layer is None else per_layer + contrib
    finally:
        for h in handles:
            h.remove()
    return per_layer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped_path):
    d = tmp_path_factory.mktemp("attr")
    csv = write_prompts(d / "p.csv", PROMPTS)
    run("b_generate_activation_dataset.py", "--model_type", SHIPPED_NAME, "--input_csv", csv, "--export_dir", d / "b",
        "--device", "cpu", "--no_edge_list", "--no_activation_lists", OMP_NUM_THREADS="1")
    return d / "b"


def sequences(d, tokenizer):
    ds = pd.read_csv(layout.path(d, layout.DATASET, SHIPPED_NAME), keep_default_na=False)
    prompt_ids = [tokenizer(p)["input_ids"] for p, _, _ in PROMPTS]
    pidx = ds["input_text_ids"].map({str(v): i for i, v in enumerate(prompt_ids)}).to_numpy()
    return distinct_sequences(pidx, ds["prompt_sample_idx"].to_numpy(), ds["token_position"].to_numpy(),
                              ds["output_id"].to_numpy(), prompt_ids)


def test_attribution_equals_transformers_gradients(dataset, shipped, shipped_hf):
    seqs, conts, weights, prompt = sequences(dataset, shipped.tokenizer)
    assert sorted(weights.tolist()) == [1.0, 2.0, 3.0]  # greedy repeats collapse, weighted by their count
    freq = pd.read_csv(layout.path(dataset, layout.FREQUENCY, SHIPPED_NAME))
    ref = hf_attribution(shipped_hf.float(), seqs, conts, weights)
    got = freq["attribution"].to_numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)
    # each half of the prompt rows on its own: the attribution of that half's sequences alone
    half = prompt_halves(len(PROMPTS))
    for h, column in enumerate(layout.FREQUENCY_COLUMNS[-2:]):
        mine = [i for i in range(len(seqs)) if half[prompt[i]] == h]
        assert mine, "each half holds a prompt with a continuation"
        ref_h = hf_attribution(shipped_hf.float(), [seqs[i] for i in mine], [conts[i] for i in mine], weights[mine])
        np.testing.assert_allclose(freq[column].to_numpy(), ref_h, rtol=1e-4, atol=1e-7)
    # batched with left padding gives the same as one sequence at a time
    np.testing.assert_allclose(neuron_attribution(shipped.model, seqs, conts, weights, batch_size=1), got,
                               rtol=1e-4, atol=1e-7)


def test_attribution_ranks_like_brute_force_ablation(dataset, shipped, shipped_hf):
    """Spearman >= 0.9 against true single-neuron delta_nll over 160 neurons, half the top by attribution."""
    seqs, conts, weights, _ = sequences(dataset, shipped.tokenizer)
    attr = pd.read_csv(layout.path(dataset, layout.FREQUENCY, SHIPPED_NAME))["attribution"].to_numpy()
    top = np.argsort(-attr)[:80]
    rest = np.setdiff1d(np.arange(len(attr)), top)
    others = np.random.default_rng(0).choice(rest, 80, replace=False)
    neurons = np.concatenate([top, others])
    d = shipped.model.config.d_mlp
    base = hf_nll(shipped_hf, seqs, conts, weights)
    truth = np.array([hf_nll(shipped_hf, seqs, conts, weights, (int(j) // d, int(j) % d)) - base for j in neurons])
    rho = spearmanr(attr[neurons], truth).correlation
    assert rho >= 0.9, rho
    # the top of the attribution ranking holds real effects: far above the random neurons' effects
    assert np.median(truth[:80]) > 5 * np.abs(np.median(truth[80:]))


def test_no_attribution_leaves_the_column_empty(tmp_path, shipped_path):
    csv = write_prompts(tmp_path / "p.csv", PROMPTS[:1])
    run("b_generate_activation_dataset.py", "--model_type", SHIPPED_NAME, "--input_csv", csv, "--export_dir", tmp_path,
        "--device", "cpu", "--no_edge_list", "--no_activation_lists", "--no_attribution")
    freq = pd.read_csv(layout.path(tmp_path, layout.FREQUENCY, SHIPPED_NAME))
    assert list(freq.columns) == layout.FREQUENCY_COLUMNS and freq["attribution"].isna().all()
