"""
Corpus mode's attribution (stage b --attribution): against torch.autograd through transformers' GPT2LMHeadModel
on windows cut by hand, against brute-force single-neuron ablation on the same text (rank agreement), and
shards merged, torchrun and --resume against one uninterrupted process.
"""

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from torch.nn import functional as F

from gelutrace.files import layout

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, interrupted_then_resumed, load_hf, run_python

M = SHIPPED_NAME
B = "b_generate_activation_dataset.py"
CONTEXT = 64
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run(*args, **kw):
    r = run_python([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, env=ENV,
                   **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def attribution(d) -> np.ndarray:
    return pd.read_csv(layout.path(d, layout.FREQUENCY, M))["attribution"].to_numpy()


@pytest.fixture(scope="module")
def whole(tmp_path_factory, shipped_path):
    out = tmp_path_factory.mktemp("attr") / "whole"
    run(B, "--input_text", HELDOUT_PATH, "--export_dir", out, "--model_type", M, "--context", CONTEXT,
        "--device", "cpu", "--attribution", "--batch_size", 3)
    return out


def autograd_reference(hf, ids: list[int], d: int, L: int) -> tuple[np.ndarray, int]:
    """-sum a dNLL/da per neuron over the windows of `ids` (transformers' GPT-2, hooks on mlp.act), per token."""
    total, tokens = np.zeros(L * d), 0
    for lo in range(0, len(ids), CONTEXT):
        w = torch.tensor([ids[lo:lo + CONTEXT]])
        if w.size(1) < 2:
            continue
        acts = []

        def keep(module, args, out):  # returns None: the output stays
            out.retain_grad()
            acts.append(out)
        handles = [hf.transformer.h[i].mlp.act.register_forward_hook(keep) for i in range(L)]
        try:
            logits = hf(w).logits[0, :-1].double()
            F.cross_entropy(logits, w[0, 1:], reduction="sum").backward()
        finally:
            for h in handles:
                h.remove()
        for i, a in enumerate(acts):
            total[i * d:(i + 1) * d] -= (a.detach().double() * a.grad.double()).sum(dim=(0, 1)).numpy()
        tokens += w.size(1) - 1
        hf.zero_grad()
    return total / tokens, tokens


def test_equals_autograd_through_transformers(whole, shipped_path, shipped):
    from gelutrace.model.loading import load_model
    from gelutrace.record.attribution import CorpusAttribution

    tok = shipped.tokenizer
    ids = tok(HELDOUT_PATH.read_text(encoding="utf-8"))["input_ids"] + [tok.eos_token_id]
    d, L = shipped.model.config.d_mlp, shipped.model.config.n_layer
    # in float64, both: the same windows give the same figures to 1e-6 relative
    hf64 = load_hf(shipped_path).double()
    want64, tokens = autograd_reference(hf64, ids, d, L)
    mine = CorpusAttribution(L, d, "cpu")
    model64 = load_model(M, "cpu").model.double()
    for lo in range(0, len(ids), CONTEXT):
        mine.add(model64, torch.tensor([ids[lo:lo + CONTEXT]]))
    assert mine.tokens == tokens
    np.testing.assert_allclose(mine.mean(), want64, rtol=1e-6, atol=1e-9 * np.abs(want64).max())
    # the script, in float32: to float32's precision, relative to the largest neuron's
    want, _ = autograd_reference(load_hf(shipped_path), ids, d, L)
    rec = json.loads(layout.path(whole, layout.CORPUS, M).read_text())
    assert rec["attribution_tokens"] == tokens
    np.testing.assert_allclose(attribution(whole), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_ranks_like_brute_force_ablation(whole, shipped):
    """On the same text and windows, the neurons' attribution against their measured real-text delta_nll
    (one zero-ablation each, gelutrace.evaluate.realtext): the 60 largest attributions and 60 random neurons."""
    from gelutrace.evaluate import realtext as rt

    a = attribution(whole)
    text = rt.read_eval_text([str(HELDOUT_PATH)], shipped.tokenizer, CONTEXT, shipped.model.config.vocab_size,
                             10 ** 6)
    picked = np.unique(np.r_[np.argsort(-a)[:60], np.random.default_rng(0).choice(len(a), 60, replace=False)])
    base, measured = rt.evaluate(shipped.model, text, [np.array([j]) for j in picked], None, batch_size=64)
    effect = np.array([m.mean("delta_nll", base.tokens) for m in measured])
    rho = spearmanr(a[picked], effect).correlation
    assert rho >= 0.9, rho


@pytest.mark.slow
def test_shards_torchrun_and_resume_equal_one_run(whole, tmp_path, monkeypatch):
    for i in range(2):
        run(B, "--input_text", HELDOUT_PATH, "--export_dir", tmp_path / f"s{i}", "--model_type", M, "--context",
            CONTEXT, "--device", "cpu", "--attribution", "--batch_size", 3, "--shard", f"{i}/2")
    run("c_merge_activation_statistics.py", "--output_dir", tmp_path / "merged", tmp_path / "s1", tmp_path / "s0")
    one = attribution(whole)
    np.testing.assert_allclose(attribution(tmp_path / "merged"), one, rtol=1e-9, atol=1e-12)
    rec = json.loads(layout.path(tmp_path / "merged", layout.CORPUS, M).read_text())
    assert rec["attribution_tokens"] == json.loads(layout.path(whole, layout.CORPUS, M).read_text())["attribution_tokens"]
    out = tmp_path / "torchrun"
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", REPO_ROOT / B, "--input_text",
        HELDOUT_PATH, "--export_dir", out, "--model_type", M, "--context", CONTEXT, "--batch_size", 3, "--device",
        "cpu", "--attribution", timeout=300)
    np.testing.assert_allclose(attribution(out), one, rtol=1e-9, atol=1e-12)
    # a shard without attribution does not merge with one with it
    run(B, "--input_text", HELDOUT_PATH, "--export_dir", tmp_path / "plain1", "--model_type", M, "--context",
        CONTEXT, "--device", "cpu", "--batch_size", 3, "--shard", "1/2")
    r = run_python([sys.executable, "c_merge_activation_statistics.py", "--output_dir", str(tmp_path / "mixed"),
                        str(tmp_path / "s0"), str(tmp_path / "plain1")], capture_output=True, text=True,
                   cwd=REPO_ROOT, env=ENV)
    assert r.returncode == 2 and "--attribution" in r.stderr and not (tmp_path / "mixed").exists()


def test_resume_keeps_the_attribution(whole, tmp_path, monkeypatch):
    """Interrupted after its second pass with a checkpoint after every batch, then --resume: the same figures."""
    from gelutrace.record.attribution import CorpusAttribution

    args = ["b", "--input_text", str(HELDOUT_PATH), "--export_dir", str(tmp_path / "r"), "--model_type", M,
            "--context", str(CONTEXT), "--device", "cpu", "--attribution", "--batch_size", "3",
            "--checkpoint_minutes", "0"]
    interrupted_then_resumed(monkeypatch, CorpusAttribution, "add", args, 3)
    np.testing.assert_allclose(attribution(tmp_path / "r"), attribution(whole), rtol=1e-9, atol=1e-12)


def test_attribution_flags_belong_to_their_mode(tmp_path):
    csv = tmp_path / "p.csv"
    pd.DataFrame([("To be, ", 2, 1)], columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    for args in (["--input_csv", csv, "--attribution"], ["--input_text", HELDOUT_PATH, "--no_attribution"]):
        r = run_python([sys.executable, B, *map(str, args), "--export_dir", str(tmp_path / "x"), "--model_type",
                            M], capture_output=True, text=True, cwd=REPO_ROOT, env=ENV)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "attribution" in r.stderr


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_other_families_equal_autograd_through_transformers(family, tmp_path):
    """At every family's neuron site (the input of the MLP's output projection), in float64."""
    from test_families import FAMILIES, build, get
    from transformers import AutoModelForCausalLM

    from gelutrace.model.loading import load_model
    from gelutrace.record.attribution import CorpusAttribution

    path = build(family, tmp_path / family)
    lm = load_model(str(path), device="cpu")
    model = lm.model.double()
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()
    d, L = model.config.d_mlp, model.config.n_layer
    ids = lm.tokenizer("To be, or not to be, that is the question. In the beginning God created.")["input_ids"]
    windows = [ids[i:i + 16] for i in range(0, len(ids), 16)]
    mine = CorpusAttribution(L, d, "cpu")
    want, tokens = np.zeros(L * d), 0
    layers = get(hf, FAMILIES[family][2])
    for w in windows:
        mine.add(model, torch.tensor([w]))
        if len(w) < 2:
            continue
        acts = []

        def keep(module, args):  # the site: the output projection's input
            h = args[0]
            h.retain_grad()
            acts.append(h)
        handles = [get(layers[i], FAMILIES[family][5]).register_forward_pre_hook(keep) for i in range(L)]
        try:
            x = torch.tensor([w])
            F.cross_entropy(hf(x).logits[0, :-1], x[0, 1:], reduction="sum").backward()
        finally:
            for h in handles:
                h.remove()
        for i, a in enumerate(acts):
            want[i * d:(i + 1) * d] -= (a.detach() * a.grad).sum(dim=(0, 1)).numpy()
        tokens += len(w) - 1
        hf.zero_grad()
    assert mine.tokens == tokens
    np.testing.assert_allclose(mine.mean(), want / tokens, rtol=1e-6, atol=1e-9 * np.abs(want / tokens).max())
