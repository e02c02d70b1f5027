"""
Stage b's corpus mode, stage c on its saved matrix, shards and their merge, torchrun, resume: against
transformers' own GPT-2 with hooks on `mlp.act` over the same windows, with every count recomputed by numpy.
"""

import contextlib
import importlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from gelutrace.files import atomic, formats, layout

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, load_hf, run_python

M = SHIPPED_NAME
B = "b_generate_activation_dataset.py"
CONTEXT = 64
DOCS = ["KING HENRY. Now, lords, for France!", "And God said, \"Let there be light\": Ünïcode too."]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as this process (conftest), so float sums match to the bit


def run(script, *args, check=True, **env):
    r = run_python([sys.executable, str(REPO_ROOT / script), *map(str, args)], capture_output=True, text=True,
                   cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", **ONE_THREAD, **env))
    if check and r.returncode != 0:
        raise AssertionError(f"{script} failed:\n{r.stderr}")
    return r


def run_here(script, *args, check=True) -> tuple[int, str]:
    """A script's main run in this process (no interpreter start-up): its exit status and what it wrote to stderr."""
    from gelutrace.cli import run_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_main(importlib.import_module(script.removesuffix(".py")).main, [*map(str, args)], exit=False)
    if check and code != 0:
        raise AssertionError(f"{script} failed:\n{err.getvalue()}")
    return code, err.getvalue()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A directory with a .jsonl of two documents and the held-out text: read in name order."""
    d = tmp_path_factory.mktemp("corpus") / "text"
    d.mkdir()
    (d / "a_docs.jsonl").write_text("".join(json.dumps({"text": t, "id": k}) + "\n" for k, t in enumerate(DOCS)))
    shutil.copy(HELDOUT_PATH, d / "b_heldout.txt")
    (d / "notes.md").write_text("not part of the corpus")
    return d


@pytest.fixture(scope="module")
def streamed(corpus_dir, shipped_path):
    out = corpus_dir.parent / "streamed"
    run_here(B, "--input_text", corpus_dir, "--export_dir", out, "--model_type", M, "--context", CONTEXT,
        "--batch_size", 64, "--save_matrix")
    return out


def reference(shipped_path, tokenizer, texts):
    """Windows cut by hand; post-GELU values by transformers' GPT-2 with hooks on mlp.act (samples x neurons)."""
    ids = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    hf = load_hf(shipped_path)
    values = []
    for lo in range(0, len(ids), CONTEXT):
        layers = []
        hooks = [blk.mlp.act.register_forward_hook(lambda m, i, o: layers.append(o[0].detach().clone()))
                 for blk in hf.transformer.h]
        with torch.no_grad():
            hf(torch.tensor([ids[lo:lo + CONTEXT]]))
        for h in hooks:
            h.remove()
        values.append(torch.cat(layers, dim=1).numpy())
    return ids, np.concatenate(values)


@pytest.fixture(scope="module")
def corpus_reference(shipped, shipped_path):
    """The corpus of `streamed` (DOCS, then the held-out text): its texts, token ids and reference values."""
    texts = DOCS + [HELDOUT_PATH.read_text(encoding="utf-8")]
    return (texts, *reference(shipped_path, shipped.tokenizer, texts))


def pair_counts(active, d: int, i: int) -> np.ndarray:
    """Layer i's neurons against layer i + 1's: how many samples each pair is active in (active: samples x
    neurons, 0/1), as int64; a float64 product, exact for whole numbers this small and far faster than numpy's
    integer one."""
    a = active[:, i * d:(i + 1) * d].astype(np.float64)
    b = active[:, (i + 1) * d:(i + 2) * d].astype(np.float64)
    assert len(active) < 2 ** 53
    return (a.T @ b).astype(np.int64)


def store_arrays(store):
    return {p.name: np.load(p, allow_pickle=False) for p in sorted(store.glob("*.npy"))}


def header_without_ids(store):
    h = json.loads((store / layout.GRAPH_STORE_HEADER).read_text())
    return {k: v for k, v in h.items() if k not in ("uid", "source")}


def test_streamed_counts_equal_transformers_and_numpy(streamed, shipped, corpus_reference):
    texts, ids, values = corpus_reference
    active = values > 0
    cfg = shipped.model.config
    d = cfg.d_mlp
    rec = json.loads(layout.path(streamed, layout.CORPUS, M).read_text())
    assert rec["tokens"] == rec["samples"] == len(ids) == len(values)
    assert rec["documents"] == 3 and [f["documents"] for f in rec["files"]] == [2, 1]
    assert rec["windows"] == -(-len(ids) // CONTEXT) and len(ids) % CONTEXT  # a shorter last window is kept
    assert rec["context"] == CONTEXT and rec["model"] == M and rec["shard"] is None
    import hashlib
    assert rec["files"][1]["sha256"] == hashlib.sha256(HELDOUT_PATH.read_bytes()).hexdigest()

    store = layout.path(streamed, layout.WEIGHTED_GRAPH, M)
    arrays = store_arrays(store)
    np.testing.assert_array_equal(arrays[layout.GRAPH_STORE_NODES], active.sum(axis=0))
    for i in range(cfg.n_layer - 1):
        expect = pair_counts(active, d, i)
        got = arrays[layout.GRAPH_STORE_PAIR.format(src=i, tgt=i + 1)]
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, expect)
    h = json.loads((store / layout.GRAPH_STORE_HEADER).read_text())
    assert h["num_samples"] == len(values) and h["kind"] == "adjacent_dense"

    freq = pd.read_csv(layout.path(streamed, layout.FREQUENCY, M))
    assert list(freq.columns) == layout.FREQUENCY_COLUMNS and freq["attribution"].isna().all()
    np.testing.assert_array_equal(freq["activation_count"], active.sum(axis=0))
    np.testing.assert_allclose(freq["activation_frequency"], active.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(freq["mean_activation"], values.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)
    matrix, _ = formats.read_activation_matrix(layout.path(streamed, layout.MATRIX, M))
    np.testing.assert_array_equal(matrix, active)
    assert formats.read_graph_meta(streamed, M)["n_layer"] == cfg.n_layer
    assert not layout.path(streamed, layout.DATASET, M).exists() and not layout.path(streamed, layout.ACTIVATIONS_JSON, M).exists()


def test_streamed_top_examples_equal_transformers_and_a_brute_force_sort(streamed, shipped, corpus_reference):
    from gelutrace.record import corpus

    texts, ids, values = corpus_reference
    table = formats.read_top_examples(layout.path(streamed, layout.TOP_EXAMPLES, M))
    n = values.shape[1]
    assert len(table) == n * 10 and (table["rank"].to_numpy() == np.tile(np.arange(10), n)).all()
    for neuron in np.random.default_rng(4).choice(n, 64, replace=False):
        rows = table[table["neuron_id"] == neuron]
        order = sorted(range(len(ids)), key=lambda s: (-values[s, neuron], s))[:10]  # sample id = token position
        np.testing.assert_array_equal(rows["sample_id"], order)
        np.testing.assert_allclose(rows["value"], values[order, neuron], atol=1e-4)
    rec = json.loads(layout.path(streamed, layout.CORPUS, M).read_text())
    doc_ids = [shipped.tokenizer(t)["input_ids"] + [shipped.tokenizer.eos_token_id] for t in texts]
    for r in table.sample(300, random_state=0).itertuples():
        s = r.sample_id
        window_start = s // CONTEXT * CONTEXT
        assert r.context == shipped.tokenizer.decode(ids[max(window_start, s - layout.CONTEXT_TOKENS + 1):s + 1])
        assert r.token == shipped.tokenizer.decode([ids[s]])
        path, doc, offset = corpus.locate(rec, [s])[0]
        k = 0 if path.endswith("a_docs.jsonl") else 2
        assert doc_ids[k + doc][offset] == ids[s]
    windows = corpus.window_tokens(rec, shipped.tokenizer, [0, 3, rec["windows"] - 1])
    for w, got in windows.items():
        np.testing.assert_array_equal(got, ids[w * CONTEXT:(w + 1) * CONTEXT + 1])


def test_saved_matrix_through_stage_c_equals_the_streamed_store(streamed, tmp_path):
    run("c_calculate_weighted_activation_graph.py", "--input_dir", streamed, "--output_path", tmp_path / "c_store")
    a, b = store_arrays(layout.path(streamed, layout.WEIGHTED_GRAPH, M)), store_arrays(tmp_path / "c_store")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        assert (layout.path(streamed, layout.WEIGHTED_GRAPH, M) / k).read_bytes() == (tmp_path / "c_store" / k).read_bytes()
    assert header_without_ids(layout.path(streamed, layout.WEIGHTED_GRAPH, M)) == header_without_ids(tmp_path / "c_store")


def assert_same_statistics(a, b, mean_rtol=1e-12):
    """Counts bit for bit, mean activations to mean_rtol, top examples exactly (to 1e-6 where batches differ)."""
    ta, tb = formats.read_top_examples(layout.path(a, layout.TOP_EXAMPLES, M)), formats.read_top_examples(layout.path(b, layout.TOP_EXAMPLES, M))
    pd.testing.assert_frame_equal(ta.drop(columns="value"), tb.drop(columns="value"))
    np.testing.assert_allclose(ta["value"], tb["value"], rtol=0 if mean_rtol <= 1e-12 else 1e-6, atol=0)
    sa, sb = layout.path(a, layout.WEIGHTED_GRAPH, M), layout.path(b, layout.WEIGHTED_GRAPH, M)
    xa, xb = store_arrays(sa), store_arrays(sb)
    assert xa.keys() == xb.keys()
    for k in xa:
        assert xa[k].dtype == xb[k].dtype and np.array_equal(xa[k], xb[k]), k
    assert header_without_ids(sa) == header_without_ids(sb)
    fa, fb = pd.read_csv(layout.path(a, layout.FREQUENCY, M)), pd.read_csv(layout.path(b, layout.FREQUENCY, M))
    pd.testing.assert_frame_equal(fa.drop(columns="mean_activation"), fb.drop(columns="mean_activation"))
    np.testing.assert_allclose(fa["mean_activation"], fb["mean_activation"], rtol=mean_rtol, atol=1e-15)


@pytest.fixture(scope="module")
def one_by_one(corpus_dir, shipped_path):
    """Batch size 1: every window alone, the reference the other layouts are compared with."""
    out = corpus_dir.parent / "b1"
    run_here(B, "--input_text", corpus_dir, "--export_dir", out, "--model_type", M, "--context", CONTEXT,
        "--batch_size", 1)
    return out


def test_batch_size_1_equals_64(streamed, one_by_one):
    assert_same_statistics(streamed, one_by_one, mean_rtol=1e-9)


def test_three_shards_merged_equal_unsharded(corpus_dir, one_by_one, tmp_path):
    for i in range(3):
        run_here(B, "--input_text", corpus_dir, "--export_dir", tmp_path / f"s{i}", "--model_type", M,
                 "--context", CONTEXT, "--batch_size", 1, "--shard", f"{i}/3")
    recs = [json.loads(layout.path(tmp_path / f"s{i}", layout.CORPUS, M).read_text()) for i in range(3)]
    total = json.loads(layout.path(one_by_one, layout.CORPUS, M).read_text())
    assert [r["shard"]["index"] for r in recs] == [0, 1, 2]
    assert sum(r["samples"] for r in recs) == total["samples"] and all(r["samples"] < total["samples"] for r in recs)
    run("c_merge_activation_statistics.py", "--output_dir", tmp_path / "merged",
        *(tmp_path / f"s{i}" for i in (2, 0, 1)))
    assert_same_statistics(tmp_path / "merged", one_by_one)
    merged = json.loads(layout.path(tmp_path / "merged", layout.CORPUS, M).read_text())
    assert merged["samples"] == total["samples"] and merged["shard"] is None

    def edited(name, change):
        d = tmp_path / name
        shutil.copytree(tmp_path / "s1", d)
        rec = json.loads(layout.path(d, layout.CORPUS, M).read_text())
        change(rec)
        layout.path(d, layout.CORPUS, M).write_text(json.dumps(rec))
        return d

    s0, s1, s2 = (tmp_path / f"s{i}" for i in range(3))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(s2, unfinished)
    (unfinished / layout.CORPUS_PARTIAL_DIR.format(m=M)).mkdir()
    cases = {
        "model": [s0, edited("other_model", lambda r: r.update(model="gpt2")), s2],
        "context": [s0, edited("other_context", lambda r: r.update(context=32)), s2],
        "corpus": [s0, edited("other_text", lambda r: r["files"][0].update(sha256="0" * 64)), s2],
        "shard count": [s0, edited("other_count", lambda r: r["shard"].update(count=4)), s2],
        "missing": [s0, s2],
        "twice": [s0, s1, s1],
        "unfinished": [s0, s1, unfinished],
    }
    for name, dirs in cases.items():
        code, err = run_here("c_merge_activation_statistics.py", "--output_dir", tmp_path / "refused", *dirs,
                             check=False)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert not (tmp_path / "refused").exists(), name
        assert {"missing": "missing", "twice": "twice", "unfinished": "unfinished"}.get(name, "") in err


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_single_process(corpus_dir, one_by_one, tmp_path):
    out = tmp_path / "torchrun"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(REPO_ROOT / B), "--input_text", str(corpus_dir), "--export_dir", str(out), "--model_type",
                        M, "--context", str(CONTEXT), "--batch_size", "1", "--device", "cpu"],
                       cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ, **ONE_THREAD), timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same_statistics(out, one_by_one)
    rec = json.loads(layout.path(out, layout.CORPUS, M).read_text())
    single = json.loads(layout.path(one_by_one, layout.CORPUS, M).read_text())
    assert rec["shard"] is None and rec["samples"] == single["samples"]
    assert not layout.path(out, layout.CORPUS_PARTIAL_DIR, M).exists()


def interrupt_at_batch(monkeypatch, n: int):
    """Make corpus mode's n-th forward pass raise KeyboardInterrupt; returns the real run_batch."""
    from gelutrace.record import corpus

    real, calls = corpus.run_batch, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(corpus, "run_batch", interrupted)
    return real


def test_resume_after_interrupt_equals_uninterrupted(corpus_dir, one_by_one, tmp_path, monkeypatch):
    from gelutrace.record import corpus

    common = ["--input_text", str(corpus_dir), "--model_type", M, "--context", str(CONTEXT), "--batch_size", "1",
              "--device", "cpu", "--save_matrix"]
    real = interrupt_at_batch(monkeypatch, 6)
    code, _ = run_here(B, *common, "--export_dir", tmp_path / "part", "--checkpoint_minutes", "0", check=False)
    assert code == 130
    assert not layout.path(tmp_path / "part", layout.CORPUS, M).exists()  # no outputs of an unfinished run
    partial = layout.path(tmp_path / "part", layout.CORPUS_PARTIAL_DIR, M)
    assert json.loads((partial / "state_0_1.json").read_text())["batches_done"] == 5

    monkeypatch.setattr(corpus, "run_batch", real)
    run_here(B, *common, "--export_dir", tmp_path / "part", "--resume")
    run_here(B, *common, "--export_dir", tmp_path / "full")
    assert_same_statistics(tmp_path / "part", tmp_path / "full", mean_rtol=0)
    for f in (layout.FREQUENCY, layout.MATRIX, layout.CORPUS):
        assert layout.path(tmp_path / "part", f, M).read_bytes() == layout.path(tmp_path / "full", f, M).read_bytes()
    assert not partial.exists()


@pytest.mark.parametrize("case", ["empty", "zero tokens", "not utf-8", "no text field", "context", "both modes",
                                  "wrong suffix"])
def test_bad_input_one_error_line_nothing_written(case, tmp_path, shipped_path):
    extra, message = [], {
        "empty": "is empty", "zero tokens": "has no tokens", "not utf-8": "byte 9", "no text field": "no field 'text'",
        "context": "--context", "both modes": "exactly one of", "wrong suffix": ".txt or .jsonl"}[case]
    good = tmp_path / "good.txt"
    good.write_text("To be, or not to be")
    f = good
    if case == "empty":
        f = tmp_path / "empty.txt"
        f.write_bytes(b"")
    elif case == "zero tokens":
        f = tmp_path / "docs.jsonl"
        f.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": ""}) + "\n")
    elif case == "not utf-8":
        f = tmp_path / "latin1.txt"
        f.write_bytes("Hello caf\u00e9".encode("latin-1"))
    elif case == "no text field":
        f = tmp_path / "docs.jsonl"
        f.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    elif case == "context":
        extra = ["--context", "100000"]
    elif case == "both modes":
        extra = ["--input_csv", str(REPO_ROOT / "parcellation_datasets" / "test_1.csv")]
    elif case == "wrong suffix":
        f = tmp_path / "text.md"
        f.write_text("hello")
    out = tmp_path / "out"
    code, err = run_here(B, "--input_text", good, f, "--export_dir", out, "--model_type", M, *extra, check=False)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not out.exists()


def test_cards_of_a_corpus_dataset_shade_contexts_as_transformers_does(streamed, shipped, corpus_reference,
                                                                       tmp_path):
    from gelutrace.report import cards

    texts, ids, values = corpus_reference
    cfg = shipped.model.config
    d, n = cfg.d_mlp, cfg.n_layer * cfg.d_mlp
    neurons = np.array([7, d + 100, n - 1])
    degrees = cards.graph_degrees(streamed, M, n, 0.3, "count")
    got = cards.build_cards(shipped.model, shipped.tokenizer, streamed, M, neurons, k=4, batch_size=2,
                            degrees=degrees)
    table = formats.read_top_examples(layout.path(streamed, layout.TOP_EXAMPLES, M))
    pairs = [pair_counts(values > 0, d, i) for i in range(cfg.n_layer - 1)]
    top = max(p.max() for p in pairs)
    degree = np.zeros(n, np.int64)  # brute force: kept iff count / max count > 0.3
    for i, p in enumerate(pairs):
        kept = p / top > 0.3
        degree[i * d:(i + 1) * d] += kept.sum(axis=1)
        degree[(i + 1) * d:(i + 2) * d] += kept.sum(axis=0)
    for card, neuron in zip(got, neurons):
        assert card.degree == degree[neuron] and "t=0.3, count" in card.degree_graph
        rows = table[(table["neuron_id"] == neuron) & (table["rank"] < 4)]
        assert [e.sample_id for e in card.examples] == rows["sample_id"].tolist()
        for e in card.examples:
            s = e.sample_id
            first = max(s - layout.CONTEXT_TOKENS + 1, s // CONTEXT * CONTEXT)
            np.testing.assert_allclose(e.shades, values[first:s + 1, neuron], atol=1e-4)
            assert len(e.tokens) == s + 1 - first and e.shades[-1] == pytest.approx(e.value, abs=1e-4)
            assert e.token == (shipped.tokenizer.decode([ids[s + 1]]) if s + 1 < len(ids) else "")
    # without --threshold: the graph, threshold and weight of the best graph-method subset stage e compared
    (tmp_path / layout.RESULTS_DIR).mkdir()
    pd.DataFrame({"k": [3, 3, 3], "method": ["degree", "pagerank", "degree"], "subset": ["a", "b", "c"],
                  "delta_nll": [0.1, 0.2, 0.3], "best": [True, False, False]}).to_csv(
        tmp_path / layout.RESULTS_DIR / layout.COMPARISON, index=False)
    (tmp_path / layout.SUBSETS_DIR).mkdir()
    (tmp_path / layout.SUBSETS_DIR / "a.json").write_text(json.dumps(
        {"threshold": 0.3, "weight": "count", "graph": str(layout.path(streamed, layout.WEIGHTED_GRAPH, M))}))
    default, note = cards.graph_degrees(tmp_path, M, n)
    np.testing.assert_array_equal(default, degree)
    assert note == "t=0.3, count"
    assert cards.graph_degrees(streamed, M, n) is None  # no comparison, no threshold: no degree
    code, err = run_here("f_render_neuron_cards.py", "--dataset_path", streamed, "--model_type", M, "--neurons",
                         "7,612", "--output", tmp_path / "cards", "--threshold", "0.3")
    assert code == 0, err
    md = (tmp_path / "cards" / layout.CARDS_MD).read_text()
    assert "## Neuron 612 (layer 1, dimension 100)" in md and f"degree {degree[612]} in the co-activation graph" in md


def test_cards_of_a_corpus_dataset_without_top_examples_are_refused(corpus_dir, tmp_path):
    run_here(B, "--input_text", corpus_dir / "a_docs.jsonl", "--export_dir", tmp_path / "ds", "--model_type", M,
             "--top_examples", 0)
    assert not layout.path(tmp_path / "ds", layout.TOP_EXAMPLES, M).exists()
    assert json.loads(layout.path(tmp_path / "ds", layout.CORPUS, M).read_text())["top_examples"] == 0
    code, err = run_here("f_render_neuron_cards.py", "--dataset_path", tmp_path / "ds", "--model_type", M,
                         "--neurons", "7", check=False)
    assert code == 2 and "--top_examples" in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "ds" / layout.CARDS_DIR).exists()


def test_resume_from_a_damaged_checkpoint_is_one_error_line(corpus_dir, streamed, tmp_path, monkeypatch):
    from gelutrace.record import corpus

    common = ["--input_text", str(corpus_dir / "a_docs.jsonl"), str(HELDOUT_PATH), "--model_type", M, "--context",
              str(CONTEXT), "--batch_size", "1", "--device", "cpu", "--export_dir", tmp_path / "part"]
    real = interrupt_at_batch(monkeypatch, 4)
    code, _ = run_here(B, *common, "--checkpoint_minutes", "0", check=False)
    assert code == 130
    monkeypatch.setattr(corpus, "run_batch", real)
    partial = layout.path(tmp_path / "part", layout.CORPUS_PARTIAL_DIR, M)
    counts = partial / json.loads((partial / "state_0_1.json").read_text())["counts"]
    counts.write_bytes(counts.read_bytes()[:5000])
    code, err = run_here(B, *common, "--resume", check=False)
    lines = [line for line in err.strip().splitlines() if not line.startswith("reading")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: checkpoint damaged"), err
    assert json.loads(layout.path(streamed, layout.CORPUS, M).read_text())["files"][0]["path"] == str(
        corpus_dir.resolve() / "a_docs.jsonl")  # paths recorded absolute: cards work from any directory


def test_top_examples_reader_refuses_ids_that_are_not_whole_numbers(tmp_path):
    good = "neuron_id,rank,value,sample_id,context,token\n0,0,1.5,16,a,b\n"
    (tmp_path / "good.csv").write_text(good)
    assert formats.read_top_examples(tmp_path / "good.csv")["sample_id"].tolist() == [16]
    for bad in ("16.5", "-5", "x"):
        (tmp_path / "bad.csv").write_text(good.replace(",16,", f",{bad},"))
        with pytest.raises(formats.PipelineError, match="sample_id|cannot read"):
            formats.read_top_examples(tmp_path / "bad.csv")


# --- long documents: tokenized in pieces, read only up to --max_tokens ---------------------------------------

def awkward_text(n_parts: int, seed: int) -> str:
    """Words of the held-out text between runs of spaces, newlines, tabs, CRLF, non-breaking and ideographic
    spaces, accented, Greek and CJK letters, emoji, and stretches of punctuation and digits with no whitespace
    longer than a piece."""
    import random
    rng = random.Random(seed)
    words = HELDOUT_PATH.read_text(encoding="utf-8").split()
    out = []
    for _ in range(n_parts):
        r = rng.random()
        if r < 0.5:
            out.append(rng.choice(words) + " ")
        elif r < 0.6:
            out.append(" " * rng.randint(2, 6))
        elif r < 0.7:
            out.append("\n" * rng.randint(1, 4))
        elif r < 0.76:
            out.append(rng.choice(["\t", "\r\n", " \n ", "\u00a0", "\u3000", "\n\t  "]))
        elif r < 0.86:
            out.append(rng.choice(["Ünïcödé ", "日本語のテキスト", "🙂👍🏽", "naïve—café", "ΑΒΓ δέκα", "x̧͂y"]))
        elif r < 0.9:
            out.append("".join(rng.choice("abc,.;:!?-'0123") for _ in range(rng.randint(100, 1200))))
        else:
            out.append(" ")
    return "".join(out)


class RecordingTokenizer:
    """The tokenizer, keeping every text it is given (to see what is read and how much at a time)."""

    def __init__(self, tok):
        self.tok, self.texts = tok, []

    def __call__(self, texts, **kwargs):
        self.texts += texts if isinstance(texts, list) else [texts]
        return self.tok(texts, **kwargs)

    def __len__(self):
        return len(self.tok)

    @property
    def eos_token_id(self):
        return self.tok.eos_token_id


@pytest.mark.parametrize("piece", [64, 97, 256, 1000])
def test_a_document_tokenized_in_pieces_equals_its_whole_tokenization(shipped, piece):
    from gelutrace.record import corpus

    text = awkward_text(1500, seed=piece)
    want = shipped.tokenizer(text, verbose=False)["input_ids"]
    tok = RecordingTokenizer(shipped.tokenizer)
    enc = corpus.DocumentTokenizer(tok, piece)
    got, whole = enc.document(text[i:i + 999] for i in range(0, len(text), 999))
    assert whole and enc.unchecked_cuts == 0
    assert got.tolist() == want
    assert max(map(len, tok.texts)) <= max(piece + corpus.CUT_CHECK_CHARS, 2 * corpus.CUT_CHECK_CHARS)
    assert len(tok.texts) > len(text) // piece, "not cut into pieces"  # each cut is checked, each piece tokenized


@pytest.mark.parametrize("stretch", ["periodic", "random"])
def test_a_stretch_without_word_boundaries_is_still_cut(shipped, stretch):
    """20,000 letters in a row: pieces stay bounded; the tokens equal the whole text's where every cut was checked,
    and decode to the text in any case."""
    import random

    from gelutrace.record import corpus

    rng = random.Random(0)
    letters = "abcdefghij" * 2000 if stretch == "periodic" else "".join(rng.choice("abcdefghij") for _ in range(20000))
    text = "To be, or not " + letters + " to be"
    tok = RecordingTokenizer(shipped.tokenizer)
    enc = corpus.DocumentTokenizer(tok, 256)
    got, whole = enc.document([text])
    assert whole and max(map(len, tok.texts)) <= max(256, corpus.CUT_CHECK_CHARS) + corpus.CUT_CHECK_CHARS
    assert len(tok.texts) > len(text) // 256
    assert shipped.tokenizer.decode(got.tolist()) == text  # byte-level BPE: nothing is lost at any cut
    if enc.unchecked_cuts == 0:
        assert got.tolist() == shipped.tokenizer(text, verbose=False)["input_ids"]
    print(stretch, enc.unchecked_cuts, "unchecked cuts")


@pytest.fixture()
def long_corpus(tmp_path, monkeypatch):
    """Pieces of 300 characters (so every long document is cut many times): a long .txt, a .jsonl of short and
    long documents, and a .txt after them; the reference is each document tokenized whole, then end-of-text."""
    from gelutrace.record import corpus
    monkeypatch.setattr(corpus, "PIECE_CHARS", 300)
    d = tmp_path / "long"
    d.mkdir()
    texts = [awkward_text(1200, 1), "short one", awkward_text(800, 2), "another", awkward_text(300, 3)]
    (d / "a_long.txt").write_text(texts[0], encoding="utf-8")
    (d / "b_docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[1:4]), encoding="utf-8")
    (d / "c_after.txt").write_text(texts[4], encoding="utf-8")
    return d, texts


def test_long_documents_read_in_pieces_equal_whole_tokenization(long_corpus, shipped):
    from gelutrace.record import corpus

    d, texts = long_corpus
    tok = shipped.tokenizer
    docs = [tok(t, verbose=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    ids = np.concatenate(docs)
    got = corpus.read_corpus([str(d)], tok)
    np.testing.assert_array_equal(got.ids, ids)
    assert got.unchecked_cuts == 0
    starts = np.cumsum([0] + [len(x) for x in docs])[:-1]
    assert [f["documents"] for f in got.files] == [1, 3, 1] and got.documents == 5
    record = {**got.record(), "tokens": len(ids), "context": CONTEXT}
    np.testing.assert_array_equal(corpus.document_starts(record)[0], starts)
    where = [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0)]
    for s in np.random.default_rng(0).choice(len(ids), 200, replace=False):
        k = int(np.searchsorted(starts, s, side="right")) - 1
        path, doc, offset = corpus.locate(record, [s])[0]
        assert (path, doc, offset) == (got.files[where[k][0]]["path"], where[k][1], s - starts[k])
    windows = [0, 7, len(ids) // CONTEXT // 2, len(ids) // CONTEXT]
    for w, tokens in corpus.window_tokens(record, tok, windows).items():
        np.testing.assert_array_equal(tokens, ids[w * CONTEXT:(w + 1) * CONTEXT + 1])


def test_reading_stops_at_max_tokens(long_corpus, shipped):
    """--max_tokens inside the long first document: the tokens are the whole tokenization's first ones, and only
    about one batch of pieces of the file is tokenized; the files after are not read."""
    from gelutrace.record import corpus

    d, texts = long_corpus
    ids = shipped.tokenizer(texts[0], verbose=False)["input_ids"]
    tok = RecordingTokenizer(shipped.tokenizer)
    got = corpus.read_corpus([str(d)], tok, max_tokens=500)
    np.testing.assert_array_equal(got.ids, ids[:500])
    assert [f["path"] for f in got.files] == [str((d / "a_long.txt").resolve())] and got.files[0]["tokens"] == 500
    # all that was tokenized (one call's pieces, and the text around their cuts) lies in the file's first quarter
    first_quarter = texts[0][:len(texts[0]) // 4]
    assert all(t in first_quarter for t in tok.texts if t != "a")  # "a": the probe for special tokens
    record = {**got.record(), "tokens": 500, "context": CONTEXT}
    w = 500 // CONTEXT
    np.testing.assert_array_equal(corpus.window_tokens(record, shipped.tokenizer, [w])[w], ids[w * CONTEXT:500])


@pytest.mark.parametrize("broken_after", ["last document used", "all 20 documents", None])
def test_documents_past_max_tokens_are_not_read_nor_recorded(shipped, tmp_path, broken_after):
    """A .jsonl of 20 short documents, with a line that is not JSON after the document that reaches --max_tokens,
    after all 20 or nowhere: stage b runs, and its record lists only the documents in the corpus and where they
    start (each document tokenized alone is the reference); its sha256 is the whole file's, as stored."""
    import hashlib

    from gelutrace.record import corpus

    tok, limit = shipped.tokenizer, 300
    words = HELDOUT_PATH.read_text(encoding="utf-8").split()
    texts = [" ".join(words[20 * k:20 * k + 20]) for k in range(20)]
    lengths = [len(tok(t, verbose=False)["input_ids"]) + 1 for t in texts]
    starts = np.cumsum([0] + lengths)[:-1]
    used = int((starts < limit).sum())
    assert 2 <= used < 20
    lines = [json.dumps({"text": t}) + "\n" for t in texts]
    if broken_after:
        lines.insert(used if broken_after == "last document used" else 20, "{not json\n")
    p = tmp_path / "x.jsonl"
    p.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "out"
    run_here(B, "--input_text", p, "--export_dir", out, "--model_type", M, "--context", CONTEXT,
             "--max_tokens", limit)
    rec = json.loads(layout.path(out, layout.CORPUS, M).read_text())
    (f,) = rec["files"]
    assert rec["documents"] == f["documents"] == used and f["document_starts"] == starts[:used].tolist()
    assert rec["tokens"] == f["tokens"] == limit and f["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    ids = np.concatenate([tok(t, verbose=False)["input_ids"] + [tok.eos_token_id] for t in texts])[:limit]
    assert [x[1:] for x in corpus.locate(rec, [0, limit - 1])] == [
        (0, 0), (used - 1, limit - 1 - int(starts[used - 1]))]
    w = (limit - 1) // CONTEXT
    got = corpus.window_tokens(rec, tok, [0, w])
    np.testing.assert_array_equal(got[0], ids[:CONTEXT + 1])
    np.testing.assert_array_equal(got[w], ids[w * CONTEXT:])
    # stage e's leak check compares the documents in the corpus, and reads none after them
    from gelutrace import PipelineError
    from gelutrace.evaluate import realtext as rt

    for k in (used - 1, used):
        e = tmp_path / f"eval_{k}.jsonl"
        e.write_text(json.dumps({"text": texts[k]}) + "\n" + json.dumps({"text": DOCS[0]}) + "\n", encoding="utf-8")
        text = rt.read_eval_text([str(e)], tok, 32, shipped.model.config.vocab_size, 100)
        if k < used:
            with pytest.raises(PipelineError, match="shares 1 document"):
                rt.leak_check(text, rec)
        else:
            assert rt.leak_check(text, rec)["shared_documents"] == 0


@pytest.mark.slow
def test_tokenizing_a_20_mb_line_holds_memory_bounded(tmp_path, shipped_path):
    """A 20 MB single-line .txt, read whole in a child process: reading it raises the peak RSS by far less than
    the ~3 GB that tokenizing the line at once takes (about 0.1 GB, to about 0.4 GB in all)."""
    line = HELDOUT_PATH.read_text(encoding="utf-8").replace("\n", " ")
    with open(tmp_path / "line.txt", "w", encoding="utf-8") as f:
        for _ in range(20_000_000 // len(line) + 1):
            f.write(line)
    code = (f"import resource, sys; sys.path.insert(0, {str(REPO_ROOT)!r})\n"
            f"from transformers import AutoTokenizer\nfrom gelutrace.record.corpus import read_corpus\n"
            f"tok = AutoTokenizer.from_pretrained({str(shipped_path)!r})\n"
            f"loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"c = read_corpus([{str(tmp_path / 'line.txt')!r}], tok)\n"
            f"print(len(c.ids), c.documents, loaded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    # started by bench/peak.py's small intermediate process: a child's ru_maxrss starts from the peak of the
    # process it was forked from, and this one's is the test run's
    measure = runpy.run_path(str(REPO_ROOT / "bench" / "peak.py"))["MEASURE"]
    r = subprocess.run([sys.executable, "-c", measure, sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, TOKENIZERS_PARALLELISM="true"))
    assert r.returncode == 0, r.stderr
    tokens, documents, loaded_kib, peak_kib = map(int, r.stdout.split())
    assert documents == 1 and tokens > 4_000_000
    assert peak_kib < 600 * 1024 and peak_kib - loaded_kib < 300 * 1024, \
        f"peak RSS {peak_kib / 1024:.0f} MB, {loaded_kib / 1024:.0f} MB before reading"


# --- output sets: a run in one mode after the other, a full disk ------------------------------------------------

def dataset_snapshot(d) -> dict:
    """A dataset directory's entries and contents as a fresh run would write them: the run's own ids (the manifest's
    run, the store's uid and source, its version directory's name) left out."""
    import hashlib
    out = {}
    for p in sorted(d.iterdir()):
        if p.name == layout.LOCK_FILE or p.name.startswith(f".{M}_weighted_graph.v"):
            continue
        if p.name == layout.DATASET_MANIFEST.format(m=M):
            rec = json.loads(p.read_text())
            files = {k: v for k, v in rec["files"].items() if not k.endswith(layout.GRAPH_STORE_HEADER)}
            out[p.name] = (rec["state"], files, sorted(rec["files"]))
        elif p.is_dir():
            out[p.name] = ({k: hashlib.sha256((p / k).read_bytes()).hexdigest() for k in sorted(os.listdir(p))
                            if k != layout.GRAPH_STORE_HEADER}, header_without_ids(p))
        else:
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("first", ["corpus", "prompt"])
def test_a_run_in_the_other_mode_leaves_only_its_own_files(corpus_dir, tmp_path, first):
    csv = tmp_path / "p.csv"
    csv.write_text("prompts,number_of_new_tokens,num_samples\nKING. ,4,1\n\"And God said, \",3,2\n")
    prompt = ["--input_csv", csv, "--model_type", M, "--device", "cpu", "--no_edge_list", "--no_attribution"]
    text = ["--input_text", corpus_dir, "--model_type", M, "--context", CONTEXT, "--device", "cpu"]
    earlier, later = (text, prompt) if first == "corpus" else (prompt, text)
    run_here(B, *earlier, "--export_dir", tmp_path / "both")
    if first == "prompt":  # and stage c's store of it
        run_here("c_calculate_weighted_activation_graph.py", "--input_dir", tmp_path / "both")
    before = set(os.listdir(tmp_path / "both"))
    run_here(B, *later, "--export_dir", tmp_path / "both")
    run_here(B, *later, "--export_dir", tmp_path / "fresh")
    assert dataset_snapshot(tmp_path / "both") == dataset_snapshot(tmp_path / "fresh")
    stale = before - set(os.listdir(tmp_path / "both"))
    expect = ({layout.CORPUS, layout.WEIGHTED_GRAPH} if first == "corpus" else
              {layout.DATASET, layout.MATRIX, layout.ACTIVATIONS_JSON, layout.ACTIVATIONS_PICKLE})
    assert {f.format(m=M) for f in expect} <= stale
    if first == "corpus":  # stage c and c_analyze now see the prompt run's samples
        run_here("c_calculate_weighted_activation_graph.py", "--input_dir", tmp_path / "both")
        assert json.loads((layout.path(tmp_path / "both", layout.WEIGHTED_GRAPH, M) / layout.GRAPH_STORE_HEADER).read_text()
                          )["num_samples"] == 4 + 2 * 3


@pytest.mark.parametrize("nth", [1, 5, 9, 12])
def test_full_disk_while_rewriting_a_corpus_dataset_keeps_the_earlier_one(streamed, corpus_dir, tmp_path, monkeypatch,
                                                                          nth):
    """Out of disk at the nth file write of a corpus run (the graph files, the frequency file, the top examples, the
    store's arrays, the record, the manifest): every earlier file byte-identical, and stage c accepts the earlier
    dataset and rebuilds its store from its matrix."""
    from conftest import directory_digest, fill_disk_at

    data = tmp_path / "streamed"
    shutil.copytree(streamed, data, symlinks=True)
    before = directory_digest(data)
    calls = fill_disk_at(monkeypatch, nth)
    code, err = run_here(B, "--input_text", corpus_dir / "a_docs.jsonl", "--export_dir", data, "--model_type", M,
                         "--context", CONTEXT, "--save_matrix", check=False)
    monkeypatch.undo()
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert code == 2 and calls["n"] >= nth and len(lines) == 1 and f"no space left on {data} (disk full)" in lines[0]
    after = {k: v for k, v in directory_digest(data).items() if not k.startswith(layout.CORPUS_PARTIAL_DIR.format(m=M))}
    assert after == before
    run("c_calculate_weighted_activation_graph.py", "--input_dir", data, "--output_path", tmp_path / "c_store")
    assert store_arrays(tmp_path / "c_store").keys() == store_arrays(layout.path(streamed, layout.WEIGHTED_GRAPH, M)).keys()


# --- the merge: what it refuses, and shards of no window --------------------------------------------------------

@pytest.fixture(scope="module")
def shards(corpus_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    for i in range(3):
        run_here(B, "--input_text", corpus_dir, "--export_dir", d / f"s{i}", "--model_type", M, "--context", CONTEXT,
                 "--batch_size", 1, "--shard", f"{i}/3")
    return [d / f"s{i}" for i in range(3)]


def merge_refused(out, dirs, message: str):
    code, err = run_here("c_merge_activation_statistics.py", "--output_dir", out, *dirs, check=False)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_merge_refuses_an_output_directory_that_is_or_holds_a_shard(shards, tmp_path):
    from conftest import directory_digest

    s0, s1, s2 = shards
    before = [directory_digest(s) for s in shards]
    (tmp_path / "link").symlink_to(s0)
    for out, how in [(s0, "is the shard directory"), (tmp_path / "link", "(it resolves to"),
                     (tmp_path / "link" / "sub", "lies inside"), (s0.parent, "holds")]:
        merge_refused(out, [s0, s1, s2], how)
    assert [directory_digest(s) for s in shards] == before


@pytest.mark.parametrize("damage", ["pair", "nodes", "nodes and manifest", "no manifest", "weights"])
def test_merge_refuses_a_shard_whose_store_or_weights_differ(corpus_dir, shards, shipped_path, tmp_path, damage):
    """A count raised in a pair file or lowered in the node counts (within the header's maxima, so the store
    itself reads), the same with the manifest edited to match (the node counts then differ from the frequency
    file's), a shard without a manifest, and a shard made from other weights in a directory of the same name."""
    s0, s1, s2 = shards
    bad = tmp_path / "s1"
    store = layout.path(bad, layout.WEIGHTED_GRAPH, M)
    nodes = store / layout.GRAPH_STORE_NODES
    if damage == "weights":
        from safetensors.numpy import load_file, save_file
        ckpt = tmp_path / "elsewhere" / M
        shutil.copytree(shipped_path, ckpt)
        w = load_file(ckpt / "model.safetensors")
        key = next(k for k in w if k.endswith("mlp.c_fc.weight"))
        w[key] = w[key] * np.float32(1.01)
        save_file(w, ckpt / "model.safetensors", metadata={"format": "pt"})
        run_here(B, "--input_text", corpus_dir, "--export_dir", bad, "--model_type", ckpt, "--context", CONTEXT,
                 "--batch_size", 1, "--shard", "1/3")
        return merge_refused(tmp_path / "out", [s0, bad, s2], "different weights")
    shutil.copytree(s1, bad, symlinks=True)
    if damage == "pair":
        name = layout.GRAPH_STORE_PAIR.format(src=2, tgt=3)
        a = np.load(store / name)
        a.ravel()[np.flatnonzero(a.ravel() == 0)[0]] += 1
        np.save(store / name, a)
    elif damage.startswith("nodes"):
        c = np.load(nodes)
        c[np.flatnonzero((c > 0) & (c < c.max()))[0]] -= 1
        np.save(nodes, c)
        if damage == "nodes and manifest":
            manifest = layout.path(bad, layout.DATASET_MANIFEST, M)
            rec = json.loads(manifest.read_text())
            rec["files"][f"{layout.WEIGHTED_GRAPH.format(m=M)}/{layout.GRAPH_STORE_NODES}"] = {
                "size": nodes.stat().st_size, "sha256": atomic.file_sha256(nodes)}
            manifest.write_text(json.dumps(rec))
    else:
        layout.path(bad, layout.DATASET_MANIFEST, M).unlink()
    message = {"pair": "changed or replaced", "nodes": "changed or replaced", "no manifest": "has no",
               "nodes and manifest": "node counts of its graph store differ"}[damage]
    merge_refused(tmp_path / "out", [s0, bad, s2], message)
    assert not (tmp_path / "out").exists()


def test_shards_given_no_window_merge_into_the_unsharded_run(corpus_dir, tmp_path):
    """--max_tokens 300 in windows of 256 tokens: shards 2/4 and 3/4 get no window; all four merge into what the
    unsharded run writes."""
    common = ["--input_text", corpus_dir, "--model_type", M, "--max_tokens", 300, "--batch_size", 1]
    for i in range(4):
        run_here(B, *common, "--export_dir", tmp_path / f"s{i}", "--shard", f"{i}/4")
    recs = [json.loads(layout.path(tmp_path / f"s{i}", layout.CORPUS, M).read_text()) for i in range(4)]
    assert [r["samples"] for r in recs] == [256, 44, 0, 0] and [r["shard"]["windows"] for r in recs] == [1, 1, 0, 0]
    run_here(B, *common, "--export_dir", tmp_path / "whole")
    run_here("c_merge_activation_statistics.py", "--output_dir", tmp_path / "merged", *(tmp_path / f"s{i}"
                                                                                         for i in range(4)))
    assert_same_statistics(tmp_path / "merged", tmp_path / "whole")
