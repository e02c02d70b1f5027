"""
Stage b --direct_edges end to end: the graph store's causal weights against a float64 numpy computation from
transformers' GPT2LMHeadModel on windows cut by hand (corpus mode) and on the generated sequences (prompt mode);
shards merged, torchrun x 2 and --resume against one uninterrupted process (counts bit for bit, weights to
1e-12 relative); stage c folding the prompt-mode file into its store; influence and direct_abs selections; the
flags' refusals.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_direct import reference

from gelutrace.files import layout
from gelutrace.graph import store as gs
from gelutrace.graph.causal import CausalEdges

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, interrupted_then_resumed, load_hf, run_python

M = SHIPPED_NAME
B = "b_generate_activation_dataset.py"
CONTEXT = 64
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run(*args, ok=True, **kw):
    r = run_python([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, env=ENV,
                   **kw)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def corpus_run(out, *extra):
    run(B, "--input_text", HELDOUT_PATH, "--export_dir", out, "--model_type", M, "--context", CONTEXT, "--device",
        "cpu", "--direct_edges", "--batch_size", 1, *extra)
    return gs.read_store(layout.path(out, layout.WEIGHTED_GRAPH, M))


@pytest.fixture(scope="module")
def whole(tmp_path_factory, shipped_path):
    return corpus_run(tmp_path_factory.mktemp("direct") / "whole")


def assert_same(got, want, rel=1e-12):
    """Counts bit for bit; every causal array to `rel` of its largest entry."""
    assert got.num_samples == want.num_samples
    np.testing.assert_array_equal(got.activation_count, want.activation_count)
    for a, b in zip(got.blocks, want.blocks):
        np.testing.assert_array_equal(a.counts(), b.counts())
    assert got.causal.pairs == want.causal.pairs and got.causal.samples == want.causal.samples
    assert got.causal.loss_tokens == want.causal.loss_tokens
    for (name, x), (name2, y) in zip(got.causal.arrays(), want.causal.arrays()):
        assert name == name2
        np.testing.assert_allclose(x, y, rtol=0, atol=rel * np.abs(y).max())


def test_corpus_store_equals_float64_reference(whole, shipped, shipped_path):
    tok = shipped.tokenizer
    ids = tok(HELDOUT_PATH.read_text(encoding="utf-8"))["input_ids"] + [tok.eos_token_id]
    hf = load_hf(shipped_path)
    pairs = whole.causal.pairs
    L = shipped.model.config.n_layer
    assert pairs == [(i, i + 1) for i in range(L - 1)]
    total = None
    samples = tokens = 0
    for lo in range(0, len(ids), CONTEXT):
        w = torch.tensor([ids[lo:lo + CONTEXT]])
        d, a, loss, loss_abs = reference(hf, "gpt2", w, pairs)
        n, nl = w.numel(), w.numel() - 1
        part = [n * x for x in d] + [n * x for x in a] + [nl * loss, nl * loss_abs]
        total = part if total is None else [t + p for t, p in zip(total, part)]
        samples, tokens = samples + n, tokens + nl
    c = whole.causal
    assert c.samples == samples == whole.num_samples and c.loss_tokens == tokens
    K = len(pairs)
    for k in range(K):
        for name, want in (("direct", total[k] / samples), ("direct_abs", total[K + k] / samples)):
            np.testing.assert_allclose(c.matrix(name, k), want, rtol=0, atol=1e-6 * np.abs(want).max())
    # direct_loss: float32 logits of a trained model's sharp softmax, then a signed mean that cancels: 2e-5 of its
    # largest (one neuron of 3,072 reaches 1.05e-5 with AVX2 kernels)
    for got, want, rel in ((c.loss, total[-2] / tokens, 2e-5), (c.loss_abs, total[-1] / tokens, 1e-6)):
        np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


def test_magnitude_against_the_weights_and_the_windows_mean_abs_value(whole, shipped, shipped_path):
    """magnitude = mean |a_u| ||w_out,u||: the norms of the checkpoint's c_proj rows (Conv1D: row u is what neuron
    u writes), read from its safetensors; mean |a_u| over transformers' GPT2LMHeadModel on the windows cut by hand,
    read at c_proj's input."""
    from safetensors.numpy import load_file

    from gelutrace.selection import methods as sel

    weights = load_file(str(shipped_path / "model.safetensors"))
    L = shipped.model.config.n_layer
    norms = np.concatenate([np.sqrt((weights[f"transformer.h.{i}.mlp.c_proj.weight"].astype(np.float64) ** 2)
                                    .sum(axis=1)) for i in range(L)])
    tok = shipped.tokenizer
    ids = tok(HELDOUT_PATH.read_text(encoding="utf-8"))["input_ids"] + [tok.eos_token_id]
    hf = load_hf(shipped_path)
    total = np.zeros(len(norms))
    d = len(norms) // L

    def keep(i):
        def hook(module, args):
            total[i * d:(i + 1) * d] += args[0].detach().double().abs().reshape(-1, d).sum(dim=0).numpy()
        return hook

    handles = [hf.transformer.h[i].mlp.c_proj.register_forward_pre_hook(keep(i)) for i in range(L)]
    with torch.no_grad():
        for lo in range(0, len(ids), CONTEXT):
            hf(torch.tensor([ids[lo:lo + CONTEXT]]))
    for h in handles:
        h.remove()
    want = total / whole.num_samples * norms
    got = sel.scores(whole, "magnitude", None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * want.max())
    np.testing.assert_allclose(whole.causal.write_norm, norms, rtol=1e-12)
    sub = sel.select(whole, None, 0.01, "magnitude", seed=3)
    assert sub.edges_kept is None and set(sub.ids.tolist()) <= set(np.argsort(-want)[:2 * sub.k].tolist())


def test_direct_loss_ranks_by_the_stored_direct_loss_abs(whole, tmp_path):
    """The ranking is the store's direct_loss_abs.npy order, ties in the seeded order (stage d's --seed); a store
    of an older stage b, without the write norms, still ranks by direct_loss and refuses magnitude in one line."""
    import copy
    import dataclasses
    import shutil

    from gelutrace import PipelineError
    from gelutrace.selection import methods as sel

    store = Path(whole.source)
    s = np.load(store / layout.GRAPH_STORE_DIRECT_NODES[1])
    n, seed = len(s), 5

    def by_hand(score, k):
        tie = np.random.default_rng(np.random.SeedSequence([seed, 0x71E])).permutation(n)
        return sorted(range(n), key=lambda u: (-score[u], tie[u]))[:k]

    for k in (1, 30, 300):
        (sub,) = sel.select_sizes(whole, None, [k], "direct_loss", seed=seed)
        assert sub.ids.tolist() == by_hand(s, k) and sub.edges_kept is None
    tied = copy.copy(whole)
    rounded = np.round(s / s.max(), 1)  # a handful of values: most picks tie
    tied.causal = dataclasses.replace(whole.causal, loss_abs=rounded)
    (sub,) = sel.select_sizes(tied, None, [200], "direct_loss", seed=seed)
    assert sub.ids.tolist() == by_hand(rounded, 200) and sub.info["tied_picks"] > 1
    # an older store: no direct_write_norm.npy, no write_norm in its record
    old = tmp_path / "old"
    shutil.copytree(store, old)
    (old / layout.GRAPH_STORE_DIRECT_WRITE_NORM).unlink()
    h = json.loads((old / layout.GRAPH_STORE_HEADER).read_text())
    del h["direct"]["write_norm"]
    (old / layout.GRAPH_STORE_HEADER).write_text(json.dumps(h))
    g = gs.read_store(old)
    assert g.causal.write_norm is None
    assert sel.select_sizes(g, None, [30], "direct_loss", seed=seed)[0].ids.tolist() == by_hand(s, 30)
    with pytest.raises(PipelineError, match="^--method magnitude needs .*: rerun stage b"):
        sel.select_sizes(g, None, [30], "magnitude")


@pytest.mark.slow
def test_shards_torchrun_and_resume_equal_one_run(whole, tmp_path, monkeypatch):
    for i in range(3):
        corpus_run(tmp_path / f"s{i}", "--shard", f"{i}/3")
    run("c_merge_activation_statistics.py", "--output_dir", tmp_path / "merged", *(tmp_path / f"s{i}" for i in (2, 0, 1)))
    assert_same(gs.read_store(layout.path(tmp_path / "merged", layout.WEIGHTED_GRAPH, M)), whole)
    out = tmp_path / "torchrun"
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", REPO_ROOT / B, "--input_text",
        HELDOUT_PATH, "--export_dir", out, "--model_type", M, "--context", CONTEXT, "--batch_size", 1, "--device",
        "cpu", "--direct_edges", timeout=300)
    assert_same(gs.read_store(layout.path(out, layout.WEIGHTED_GRAPH, M)), whole)
    # a shard without the weights does not merge with ones that have them
    run(B, "--input_text", HELDOUT_PATH, "--export_dir", tmp_path / "plain", "--model_type", M, "--context",
        CONTEXT, "--device", "cpu", "--batch_size", 1, "--shard", "1/3")
    r = run("c_merge_activation_statistics.py", "--output_dir", tmp_path / "mixed", tmp_path / "s0", tmp_path / "plain",
            tmp_path / "s2", ok=False)
    assert r.returncode == 2 and "--direct_edges" in r.stderr and not (tmp_path / "mixed").exists()

    # interrupted in its fourth batch with a checkpoint after every batch, then --resume
    from gelutrace.record import corpus

    args = ["b", "--input_text", str(HELDOUT_PATH), "--export_dir", str(tmp_path / "r"), "--model_type", M,
            "--context", str(CONTEXT), "--device", "cpu", "--direct_edges", "--batch_size", "1",
            "--checkpoint_minutes", "0"]
    interrupted_then_resumed(monkeypatch, corpus, "run_batch", args, 4)
    assert_same(gs.read_store(layout.path(tmp_path / "r", layout.WEIGHTED_GRAPH, M)), whole)


def test_prompt_mode_equals_float64_reference_and_stage_c_keeps_it(tmp_path, shipped, shipped_path):
    csv = tmp_path / "p.csv"
    prompts = [("To be, or not to be", 6, 2), ("The king", 4, 1), ("Friends, Romans", 5, 1)]
    pd.DataFrame(prompts, columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    out = tmp_path / "p"
    run(B, "--input_csv", csv, "--export_dir", out, "--model_type", M, "--device", "cpu", "--direct_edges")
    d, L = shipped.model.config.d_mlp, shipped.model.config.n_layer
    c = CausalEdges.read_npz(layout.path(out, layout.DIRECT_EDGES, M), L * d, d)
    # every sample's sequence from the dataset: its prompt and each position's output
    data = pd.read_csv(layout.path(out, layout.DATASET, M))
    hf = load_hf(shipped_path)
    total, samples = None, 0
    for _, rows in data.groupby((data["token_position"] == 0).cumsum()):  # a sample's tokens, in dataset order
        cont = rows["output_id"].tolist()
        seq = torch.tensor([json.loads(rows["input_text_ids"].iloc[0]) + cont[:-1]])  # the prompt, then the tokens
        w = np.zeros(seq.size(1))
        w[-len(cont):] = 1
        targets = np.full(seq.size(1), -1)
        targets[-len(cont):] = cont
        dd, a, loss, loss_abs = reference(hf, "gpt2", seq, c.pairs, w, targets)
        n = len(cont)
        part = [n * x for x in dd] + [n * x for x in a] + [n * loss, n * loss_abs]
        total = part if total is None else [t + q for t, q in zip(total, part)]
        samples += n
    assert c.samples == samples == sum(n * r for _, n, r in prompts)
    K = len(c.pairs)
    for k in range(K):
        for name, want in (("direct", total[k] / samples), ("direct_abs", total[K + k] / samples)):
            np.testing.assert_allclose(c.matrix(name, k), want, rtol=0, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(c.loss_abs, total[-1] / samples, rtol=0, atol=1e-6 * np.abs(total[-1]).max() / samples)
    # the halves of the prompt rows merge into the whole
    halves = [CausalEdges.read_npz(layout.path(out, layout.DIRECT_EDGES, M), L * d, d, half=h) for h in (0, 1)]
    merged = CausalEdges.merge(halves)
    for (_, x), (_, y) in zip(merged.arrays(), c.arrays()):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12 * np.abs(y).max())
    # stage c folds the file into the store; stage d ranks by influence and by direct_abs
    run("c_calculate_weighted_activation_graph.py", "--input_dir", out)
    g = gs.read_store(layout.path(out, layout.WEIGHTED_GRAPH, M))
    for (_, x), (_, y) in zip(g.causal.arrays(), c.arrays()):
        np.testing.assert_array_equal(x, y)
    store = layout.path(out, layout.WEIGHTED_GRAPH, M)
    run("d_calculate_perturbation_subset.py", "--input_graph_path", store, "--method", "influence", "--k", 5,
        "--output_dir", tmp_path / "subs")
    run("d_calculate_perturbation_subset.py", "--input_graph_path", store, "--method", "degree", "--weight",
        "direct_abs", "--threshold", 0.1, "--k", 5, "--output_dir", tmp_path / "subs")
    # the write norms go from stage b's file (and each half's) into the store, and rank magnitude there
    assert g.causal.write_norm is not None and all(h.write_norm is not None for h in halves)
    run("d_calculate_perturbation_subset.py", "--input_graph_path", store, "--method", "magnitude", "--k", 5,
        "--output_dir", tmp_path / "subs")
    side = {f.name: json.loads(f.read_text()) for f in (tmp_path / "subs").glob("*.json")}
    mag = next(v for k, v in side.items() if "magnitude" in k)
    assert sorted(mag["neurons"]) == sorted(np.argsort(-(c.value_abs * c.write_norm))[:5].tolist())
    inf = next(v for k, v in side.items() if "influence" in k)
    want = np.argsort(-c.influence(), kind="stable")[:5]
    assert sorted(inf["neurons"]) == sorted(want.tolist())
    deg = next(v for k, v in side.items() if "direct_abs" in k)
    assert deg["weight"] == "direct_abs" and deg["edges_kept"] > 0


def test_flags_and_refusals(tmp_path, whole):
    r = run(B, "--input_text", HELDOUT_PATH, "--export_dir", tmp_path / "x", "--model_type", M, "--edges", "all",
            ok=False)
    assert r.returncode == 2 and "--edges applies to --direct_edges" in r.stderr
    # a graph without the weights: one error line for the weight and for influence
    plain = tmp_path / "plain"
    run(B, "--input_text", HELDOUT_PATH, "--export_dir", plain, "--model_type", M, "--context", CONTEXT,
        "--max_tokens", 200)
    store = layout.path(plain, layout.WEIGHTED_GRAPH, M)
    for args in (["--method", "influence"], ["--method", "direct_loss"], ["--method", "magnitude"],
                 ["--method", "degree", "--weight", "direct_abs", "--threshold", 0.5]):
        r = run("d_calculate_perturbation_subset.py", "--input_graph_path", store, *args, "--k", 3, "--output_dir",
                tmp_path / "subs", ok=False)
        assert r.returncode == 2 and "--direct_edges" in r.stderr.strip().splitlines()[-1]


def test_all_layer_pairs_keep_the_adjacent_weights_and_feed_influence(tmp_path, shipped_path):
    """--edges all: every i < j in the store, its adjacent pairs those of --edges adjacent on the same batches,
    the graph methods on the adjacent blocks, influence over every pair, fidelity per layer gap."""
    adj = corpus_run(tmp_path / "adj", "--max_tokens", 300)
    every = corpus_run(tmp_path / "all", "--max_tokens", 300, "--edges", "all")
    L = 6
    assert every.causal.pairs == [(i, j) for i in range(L) for j in range(i + 1, L)] and every.causal.edges == "all"
    for k, (i, j) in enumerate(adj.causal.pairs):
        kk = every.causal.pair_index(i, j)
        np.testing.assert_array_equal(every.causal.matrix("direct", kk), adj.causal.matrix("direct", k))
    np.testing.assert_array_equal(every.causal.loss_abs, adj.causal.loss_abs)
    assert len(every.blocks) == L - 1  # the graph's blocks stay the adjacent layers
    assert not np.array_equal(every.causal.influence(), adj.causal.influence())
    r = run("c_measure_edge_fidelity.py", "--dataset_path", tmp_path / "all", "--model_type", M, "--edges", 60,
            "--tokens", 128, "--device", "cpu")
    summary = pd.read_csv(layout.path(tmp_path / "all", layout.EDGE_FIDELITY_SUMMARY, M))
    assert "all" in set(summary["layer_gap"].astype(str)) and len(summary) > 2, r.stdout


def test_weights_are_never_dropped_or_taken_from_damage(tmp_path, shipped_path):
    """Stage c rebuilding a corpus dataset from its matrix keeps the store's weights; a prompt dataset whose
    listed weights file is gone is refused; damaged arrays and records are refused; a stage b rerun removes the
    edge fidelity of the store it replaces."""
    import shutil

    d = tmp_path / "c"
    g = corpus_run(d, "--max_tokens", 500, "--save_matrix")
    run("c_calculate_weighted_activation_graph.py", "--input_dir", d)
    rebuilt = gs.read_store(layout.path(d, layout.WEIGHTED_GRAPH, M))
    assert_same(rebuilt, g, rel=0)
    # prompt mode: the file the manifest lists is gone
    csv = tmp_path / "p.csv"
    pd.DataFrame([("To be, or not to be", 4, 1), ("The king", 3, 1)], columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    p = tmp_path / "p"
    run(B, "--input_csv", csv, "--export_dir", p, "--model_type", M, "--device", "cpu", "--direct_edges")
    run("c_calculate_weighted_activation_graph.py", "--input_dir", p)
    before = sorted(x.name for x in layout.path(p, layout.WEIGHTED_GRAPH, M).iterdir())
    layout.path(p, layout.DIRECT_EDGES, M).unlink()
    r = run("c_calculate_weighted_activation_graph.py", "--input_dir", p, ok=False)
    assert r.returncode == 2 and r.stderr.startswith("error:") and layout.DIRECT_EDGES.format(m=M) in r.stderr
    assert sorted(x.name for x in layout.path(p, layout.WEIGHTED_GRAPH, M).iterdir()) == before
    # damaged arrays or record in a store
    for damage in ("nan", "negative", "pairs"):
        bad = tmp_path / f"bad_{damage}"
        shutil.copytree(layout.path(d, layout.WEIGHTED_GRAPH, M), bad)
        if damage == "pairs":
            h = json.loads((bad / layout.GRAPH_STORE_HEADER).read_text())
            h["direct"]["pairs"] = h["direct"]["pairs"][:1] * 2 + h["direct"]["pairs"][2:]
            (bad / layout.GRAPH_STORE_HEADER).write_text(json.dumps(h))
        else:
            f = bad / layout.GRAPH_STORE_DIRECT_ABS.format(src=1, tgt=2)
            a = np.load(f)
            a[3, 4] = np.nan if damage == "nan" else -1.0
            np.save(f, a)
        r = run("d_calculate_perturbation_subset.py", "--input_graph_path", bad, "--method", "influence", "--k", 3,
                "--output_dir", tmp_path / "subs", ok=False)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, damage
    # the edge fidelity goes with the store it measured
    run("c_measure_edge_fidelity.py", "--dataset_path", d, "--model_type", M, "--edges", 20, "--tokens", 64,
        "--device", "cpu")
    assert layout.path(d, layout.EDGE_FIDELITY, M).is_file()
    r = run("c_measure_edge_fidelity.py", "--dataset_path", d, "--model_type", M, "--seed", -1, ok=False)
    assert r.returncode == 2 and r.stderr.startswith("error:")
    run(B, "--input_text", HELDOUT_PATH, "--export_dir", d, "--model_type", M, "--context", CONTEXT, "--device",
        "cpu", "--max_tokens", 300)
    assert not layout.path(d, layout.EDGE_FIDELITY, M).exists() and not layout.path(d, layout.EDGE_FIDELITY_SUMMARY, M).exists()
