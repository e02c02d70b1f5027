"""
Stage e's real-text evaluation against independent references: transformers' own model classes with a hook
zeroing the neurons at the site, over windows cut here by hand; the units, the token cap and the breakdowns
recomputed with numpy; the leak check; and dose-response points equal to each subset measured alone.
"""

import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from gelutrace import PipelineError
from gelutrace.evaluate import realtext as rt
from gelutrace.files import atomic, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.model import generation
from gelutrace.report import verdict

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, run_python


def windows_by_hand(tokenizer, docs: list[str], context: int, n_tokens: int | None = None) -> list[np.ndarray]:
    """Every document's tokens and end-of-text, concatenated, cut into consecutive windows of `context`."""
    ids = []
    for d in docs:
        ids += tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]
    ids = np.array(ids[:n_tokens] if n_tokens else ids)
    return [ids[i:i + context] for i in range(0, len(ids), context)]


@torch.no_grad()
def reference(logits_fn, windows, ablate):
    """Mean over every scored token (all but each window's first) of the unablated nll, delta_nll and KL."""
    nll, dnll, kl, n = 0.0, 0.0, 0.0, 0
    for w in windows:
        if len(w) < 2:
            continue
        x = torch.tensor(w[None, :-1])
        tgt = torch.tensor(w[1:])
        base = F.log_softmax(logits_fn(x, False)[0].double(), -1)
        pert = F.log_softmax(logits_fn(x, ablate)[0].double(), -1)
        b, p = base[torch.arange(len(tgt)), tgt], pert[torch.arange(len(tgt)), tgt]
        nll += float(-b.sum())
        dnll += float((b - p).sum())
        kl += float((base.exp() * (base - pert)).sum())
        n += len(tgt)
    return nll / n, dnll / n, kl / n


def hooked(hf, modules, dims, output=False):
    """logits_fn(x, ablate) of a transformers model whose neurons `dims` (per module) are zeroed when ablate is
    true: in the input of the output projections `modules` (forward pre-hooks), or with output=True in the
    output of the activation modules `modules` (GPT-2's mlp.act)."""
    def fn(x, ablate):
        handles = []
        if ablate:
            for mod, cols in zip(modules, dims):
                def pre(module, args, cols=cols):
                    h = args[0].clone()
                    h[..., cols] = 0
                    return (h,) + args[1:]

                def post(module, args, out, cols=cols):
                    out = out.clone()
                    out[..., cols] = 0
                    return out
                handles.append(mod.register_forward_hook(post) if output else mod.register_forward_pre_hook(pre))
        try:
            return hf(x).logits
        finally:
            for h in handles:
                h.remove()
    return fn


def measured(lm, paths, context, eval_tokens, ids):
    text = rt.read_eval_text([str(p) for p in paths], lm.tokenizer, context, lm.model.config.vocab_size, eval_tokens)
    base, (m,) = rt.evaluate(lm.model, text, [np.asarray(ids)], None, batch_size=8)
    return text, base, m


def test_gpt2_real_text_equals_transformers(shipped, shipped_hf, tmp_path):
    d = shipped.model.config.d_mlp
    ids = np.array([3, 70, d + 5, 2 * d + 100, 5 * d + 511])
    doc = HELDOUT_PATH.read_text(encoding="utf-8")
    text, base, m = measured(shipped, [HELDOUT_PATH], 64, 500, ids)
    assert text.scored == 500 and text.units == "windows"
    by_hand = windows_by_hand(shipped.tokenizer, [doc], 64, rt.tokens_needed(500, 64))
    assert sum(len(w) - 1 for w in by_hand) == 500
    blocks = shipped_hf.transformer.h
    layers = sorted(set(ids // d))
    fn = hooked(shipped_hf, [blocks[i].mlp.act for i in layers], [ids[ids // d == i] % d for i in layers], True)
    nll, dnll, kl = reference(fn, by_hand, True)
    assert base.mean_nll == pytest.approx(nll, rel=1e-5)
    assert m.mean("delta_nll", base.tokens) == pytest.approx(dnll, rel=1e-4, abs=1e-6)
    assert m.mean("kl", base.tokens) == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert kl > 1e-4  # the ablation did something


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_other_families_real_text_equal_transformers(family, tmp_path):
    from test_families import FAMILIES, build, get
    from transformers import AutoModelForCausalLM

    from gelutrace.model.loading import load_model

    path = build(family, tmp_path / family)
    lm = load_model(str(path), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    d = lm.model.config.d_mlp
    ids = np.array([1, 7, d + 3, d + d - 1])
    docs = ["To be, or not to be, that is the question. " * 3, "In the beginning God created the heaven. " * 3]
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    text, base, m = measured(lm, [src], 16, 10_000, ids)
    assert text.units == "documents" and text.n_units == 2
    by_hand = windows_by_hand(lm.tokenizer, docs, 16)
    layers = get(hf, FAMILIES[family][2])
    fn = hooked(hf, [get(layers[i], FAMILIES[family][5]) for i in (0, 1)], [ids[ids // d == i] % d for i in (0, 1)])
    nll, dnll, kl = reference(fn, by_hand, True)
    assert base.mean_nll == pytest.approx(nll, rel=1e-5)
    assert m.mean("delta_nll", base.tokens) == pytest.approx(dnll, rel=1e-4, abs=1e-6)
    assert m.mean("kl", base.tokens) == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert kl > 1e-4


def test_units_buckets_and_cap(shipped, tmp_path):
    """Each scored token's document, position bucket and next-token bucket, recomputed from the windows."""
    docs = ["KING HENRY. Now, lords, for France; the enterprise whereof shall be to you, as us, like glorious.",
            "And God said, Let there be light: and there was light.", "O Romeo, Romeo! wherefore art thou Romeo?"]
    src = tmp_path / "three.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = shipped.tokenizer
    lengths = [len(tok(t)["input_ids"]) + 1 for t in docs]
    ctx = 20
    text = rt.read_eval_text([str(src)], tok, ctx, shipped.model.config.vocab_size, 10_000)
    assert text.units == "documents" and text.n_units == 3 and len(text.ids) == sum(lengths)
    doc_of = np.repeat(np.arange(3), lengths)
    pos = np.arange(len(text.ids))
    scored = pos % ctx != 0
    assert np.array_equal(text.unit, np.where(scored, doc_of, -1))
    t = (pos - 1) % ctx
    want = np.where(t < 16, 0, np.where(t < 128, 1, 2))
    assert np.array_equal(text.bucket[scored], want[scored])
    counts = pd.Series(text.ids[scored]).value_counts()
    top = sorted(counts.index, key=lambda x: (-counts[x], x))[:rt.TOP_TOKENS]
    assert text.top_tokens.tolist() == top
    base, (m,) = rt.evaluate(shipped.model, text, [np.array([5, 600, 1500])], None, batch_size=4)
    assert base.tokens.tolist() == np.bincount(doc_of[scored], minlength=3).tolist()
    assert base.bucket_tokens[:3].sum() == scored.sum()  # every scored token in one position bucket
    assert m.bucket_delta_nll[:3].sum() == pytest.approx(m.delta_nll.sum(), rel=1e-9)
    # the cap: exactly eval_tokens scored when the text has them
    for n in (1, 19, 20, 57):
        capped = rt.read_eval_text([str(src)], tok, ctx, shipped.model.config.vocab_size, n)
        assert capped.scored == min(n, int(scored.sum()))


def test_subsets_alone_equal_subsets_together(shipped):
    """A dose-response point (one subset among many in one pass) equals that subset measured alone."""
    text = rt.read_eval_text([str(HELDOUT_PATH)], shipped.tokenizer, 128, shipped.model.config.vocab_size, 600)
    order = np.random.default_rng(1).permutation(3072)
    groups = [np.sort(order[:k]) for k in (3, 30, 300)]
    _, together = rt.evaluate(shipped.model, text, groups, None, batch_size=64)
    for g, m in zip(groups, together):
        _, (alone,) = rt.evaluate(shipped.model, text, [g], None, batch_size=64)
        # float32 forwards of a different number of rows round differently (BLAS blocking): float32's precision
        np.testing.assert_allclose(m.delta_nll, alone.delta_nll, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(m.kl, alone.kl, rtol=1e-5, atol=1e-9)


@torch.no_grad()
def test_a_group_scored_on_some_units_equals_transformers_there(shipped, shipped_hf, tmp_path):
    """Scored on documents 0 and 2 only (windows span documents): per document, delta_nll and KL equal
    transformers' hooked model summed by hand over those documents' tokens, NaN on document 1; the group beside
    it scored on every unit is unchanged."""
    docs = ["KING HENRY. Now, lords, for France; the enterprise whereof shall be to you, as us, like glorious.",
            "And God said, Let there be light: and there was light.", "O Romeo, Romeo! wherefore art thou Romeo?"]
    src = tmp_path / "three.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    text = rt.read_eval_text([str(src)], shipped.tokenizer, 20, shipped.model.config.vocab_size, 10_000)
    d = shipped.model.config.d_mlp
    ids = np.array([3, 70, d + 5, 2 * d + 100])
    _, (part, whole) = rt.evaluate(shipped.model, text, [ids, ids], None, batch_size=64,
                                   units=[np.array([0, 2]), None])
    layers = sorted(set(ids // d))
    fn = hooked(shipped_hf, [shipped_hf.transformer.h[i].mlp.act for i in layers],
                [ids[ids // d == i] % d for i in layers], True)
    dnll, kl = np.zeros(3), np.zeros(3)
    for lo in range(0, len(text.ids), 20):
        w = text.ids[lo:lo + 20]
        x = torch.tensor(w[None, :-1])
        base = F.log_softmax(fn(x, False)[0].double(), -1)
        pert = F.log_softmax(fn(x, True)[0].double(), -1)
        tgt = torch.tensor(w[1:])
        unit = text.unit[lo + 1:lo + len(w)]
        np.add.at(dnll, unit, (base - pert)[torch.arange(len(tgt)), tgt].numpy())
        np.add.at(kl, unit, (base.exp() * (base - pert)).sum(-1).numpy())
    np.testing.assert_allclose(part.delta_nll[[0, 2]], dnll[[0, 2]], rtol=1e-4, atol=5e-5)  # sums of ~50 float32 terms
    np.testing.assert_allclose(part.kl[[0, 2]], kl[[0, 2]], rtol=1e-4, atol=5e-5)
    assert np.isnan(part.delta_nll[1]) and np.isnan(part.kl[1]) and part.scored.tolist() == [True, False, True]
    np.testing.assert_allclose(whole.delta_nll, dnll, rtol=1e-4, atol=5e-5)
    tokens = np.bincount(text.unit[text.unit >= 0], minlength=3)
    assert part.mean("delta_nll", tokens) == pytest.approx(dnll[[0, 2]].sum() / tokens[[0, 2]].sum(), rel=1e-4)


def test_controls_are_scored_on_the_control_part_only(shipped):
    """add_controls scores every control (random and effect-weighted) on the split's control part: per unit what
    the same ablation measured on the whole text gives there, NaN on every other unit; the subsets stay on all."""
    from gelutrace.evaluate import statistics as stats

    text = rt.read_eval_text([str(HELDOUT_PATH)], shipped.tokenizer, 32, shipped.model.config.vocab_size, 1300)
    sub = type("Sub", (), {"ids": np.array([5, 600, 1100]), "is_module": False})()
    res = rt.measure_subsets(shipped.model, text, [sub], None, seed=3, validation_share=0.5, batch_size=16,
                             control_share=0.5)
    split = stats.split_prompts(text.n_units, 3, 0.5, 0.5)
    assert text.n_units >= 30 and res.split.control.tolist() == split.control.tolist()
    assert len(split.control) == round(len(split.test) / 2) and res.mains[0].scored.all()
    controls, weighted = [np.array([7, 610, 1200]), np.array([9, 700, 1500])], [np.array([1, 2, 3])]
    rt.add_controls(res, shipped.model, [controls], None, 16, weighted=[weighted])
    _, whole = rt.evaluate(shipped.model, text, controls + weighted, None, batch_size=16)
    on = np.isin(np.arange(text.n_units), split.control)
    for got, ref in zip(res.controls[0] + res.weighted[0], whole):
        assert got.scored.tolist() == on.tolist()
        np.testing.assert_allclose(got.delta_nll[on], ref.delta_nll[on], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.kl[on], ref.kl[on], rtol=1e-5, atol=1e-7)
    e = rt.entry(res, 0, "s", "influence", "", {})
    assert e.control_part(split.test).tolist() == split.control.tolist()


def test_leak_check_refuses_the_selection_corpus(shipped, tmp_path):
    sel_file = tmp_path / "corpus.txt"
    sel_file.write_text("Friends, Romans, countrymen, lend me your ears.\n")
    other = tmp_path / "other.txt"
    other.write_text("Now is the winter of our discontent.\n")
    record = {"files": [{"path": str(sel_file), "sha256": atomic.file_sha256(sel_file)}]}
    V = shipped.model.config.vocab_size

    def text(p):
        return rt.read_eval_text([str(p)], shipped.tokenizer, 16, V, 100)

    with pytest.raises(PipelineError, match="selection corpus"):
        rt.leak_check(text(sel_file), record)
    same_doc = tmp_path / "same.jsonl"  # another file, the same document
    same_doc.write_text(json.dumps({"text": sel_file.read_text()}) + "\n")
    with pytest.raises(PipelineError, match="shares 1 document"):
        rt.leak_check(text(same_doc), record)
    ok = rt.leak_check(text(other), record)
    assert ok["passed"] and ok["documents_checked"] and ok["shared_files"] == 0


def test_stage_e_refuses_eval_text_that_is_its_corpus(tmp_path):
    """Through the script, on a corpus-mode dataset: one error line, exit 2."""
    data = tmp_path / "ds"
    run = lambda *a: run_python([sys.executable, *a], capture_output=True, text=True, cwd=REPO_ROOT)  # noqa: E731
    r = run("b_generate_activation_dataset.py", "--input_text", str(HELDOUT_PATH), "--export_dir", str(data),
            "--model_type", SHIPPED_NAME, "--max_tokens", "300", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    prompts = tmp_path / "p.csv"
    pd.DataFrame([("To be, or not ", 3, 1)], columns=layout.PROMPT_COLUMNS).to_csv(prompts, index=False)
    r = run("e_generate_perturbed_results.py", "--dataset_path", str(data), "--eval_csv", str(prompts),
            "--model_type", SHIPPED_NAME, "--device", "cpu", "--perturbation_subset_filenames", "none",
            "--eval_text", str(HELDOUT_PATH), "--eval_tokens", "100")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")
    assert "selection corpus" in r.stderr


def test_leak_check_sees_copies_with_other_whitespace_and_parts(shipped, tmp_path):
    corpus = HELDOUT_PATH.read_text(encoding="utf-8")
    sel_file = tmp_path / "corpus.txt"
    sel_file.write_text(corpus)
    record = {"files": [{"path": str(sel_file), "sha256": atomic.file_sha256(sel_file)}]}
    V = shipped.model.config.vocab_size
    words = corpus.split()
    cases = {"newline": corpus + "\n", "crlf": corpus.replace("\n", "\r\n"),
             "second half": " ".join(words[len(words) // 2:])}
    for name, body in cases.items():
        p = tmp_path / f"{name.replace(' ', '_')}.txt"
        p.write_bytes(body.encode("utf-8"))
        with pytest.raises(PipelineError, match="selection corpus"):
            rt.leak_check(rt.read_eval_text([str(p)], shipped.tokenizer, 32, V, 200), record)
    other = tmp_path / "other.txt"  # held-out text of other documents: passes, its passages counted
    other.write_text((REPO_ROOT / "parcellation_datasets" / "heldout_eval_tinybard.txt").read_text(encoding="utf-8"))
    ok = rt.leak_check(rt.read_eval_text([str(other)], shipped.tokenizer, 32, V, 200), record)
    assert ok["passages_checked"] == rt.LEAK_PASSAGES and ok["passages_found"] <= rt.LEAK_SHARE * rt.LEAK_PASSAGES


WHITESPACE = [" ", "  ", "\n", "\r\n", "\t", "\u00a0", "\u2003", "\x1c", " \n\n "]


def test_text_normalised_a_piece_at_a_time_equals_the_whole_text_normalised():
    """Any text cut anywhere (inside words and whitespace runs, at either end): the pieces normalised one after the
    other join to the whole text normalised by str.split."""
    rng = np.random.default_rng(0)
    words = ["a", "be", "Ünï", "co-de", "’x’", "42"]
    for _ in range(500):
        parts = [str(rng.choice(WHITESPACE if k % 2 else words)) for k in range(int(rng.integers(0, 12)))]
        text = "".join(parts if rng.random() < 0.5 else [str(rng.choice(WHITESPACE))] + parts)
        cuts = sorted(rng.integers(0, len(text) + 1, int(rng.integers(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert "".join(rt._normalised_pieces(pieces)) == " ".join(text.split()), pieces


def former_leak_check(eval_docs: list[str], sel_docs: list[str], prompts=(), limit: int | None = None) -> dict:
    """The leak check as its former code made it, every text held whole, on each side's first `limit` bytes of
    documents (a document the limit cuts is not compared whole)."""
    import hashlib

    def first(docs):
        out, left = [], limit
        for d in docs:
            b = d.encode("utf-8")
            if left is not None and len(b) > left:
                if left > 0:
                    out.append((b[:left].decode("utf-8", "ignore"), False))
                break
            out.append((d, True))
            left = None if left is None else left - len(b)
        return out

    def norm(d):
        return " ".join(d.split())

    ours, theirs = [(norm(d), w) for d, w in first(eval_docs)], [(norm(d), w) for d, w in first(sel_docs)]
    digest = lambda d: hashlib.sha256(d.encode("utf-8")).hexdigest()  # noqa: E731
    common = {digest(d) for d, w in ours if w} & {digest(d) for d, w in theirs if w}
    runs = [d.split(" ") for d, _ in ours]
    starts = [(i, j) for i, r in enumerate(runs) for j in range(max(len(r) - rt.LEAK_PASSAGE_WORDS + 1, 0))]
    sample = []
    if starts:
        picks = np.unique(np.linspace(0, len(starts) - 1, min(rt.LEAK_PASSAGES, len(starts))).astype(np.int64))
        sample = [" ".join(runs[i][j:j + rt.LEAK_PASSAGE_WORDS]) for i, j in (starts[k] for k in picks)]
    joined, joined_ours = "\n".join(d for d, _ in theirs), "\n".join(d for d, _ in ours)
    return {"shared_documents": len(common), "passages_checked": len(sample),
            "passages_found": sum(x in joined for x in sample),
            "selection_prompts_in_text": sum(norm(x) in joined_ours for x in prompts if x.strip())}


@pytest.mark.parametrize("limit", [None, 12_000])
def test_streamed_leak_check_equals_the_texts_compared_whole(shipped, tmp_path, monkeypatch, limit):
    """Documents, passages and prompts compared a piece at a time (files read 7 bytes at a time, the text searched
    100 characters at a time) find what comparing the texts held whole finds (the former code, in the test),
    also where only each text's first `limit` bytes are compared."""
    import gzip

    from gelutrace.files import corpusfiles as cf

    monkeypatch.setattr(cf, "READ_BYTES", 7)
    monkeypatch.setattr(rt, "LEAK_BLOCK_CHARS", 100)
    monkeypatch.setattr(rt, "LEAK_SHARE", 1.0)  # counted, not refused
    if limit:
        monkeypatch.setattr(rt, "LEAK_CHECK_BYTES", limit)
    rng = np.random.default_rng(1)

    def rewhite(t):  # the same words, other whitespace
        return "".join(w + str(rng.choice(WHITESPACE)) for w in t.split())

    paragraphs = [p for p in (REPO_ROOT / "parcellation_datasets" / "heldout_corpus_tinybard.txt").read_text(
        encoding="utf-8").split("\n\n") if len(p.split()) > 30]
    others = [p for p in (REPO_ROOT / "parcellation_datasets" / "heldout_eval_tinybard.txt").read_text(
        encoding="utf-8").split("\n\n") if len(p.split()) > 30]
    sel_txt, sel_docs = "Ünïcode " + " ".join(paragraphs[:12]), paragraphs[12:80]
    with gzip.open(tmp_path / "sel.txt.gz", "wt", encoding="utf-8") as f:
        f.write(sel_txt)
    (tmp_path / "sel.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sel_docs), encoding="utf-8")
    files = [tmp_path / "sel.txt.gz", tmp_path / "sel.jsonl"]
    record = {"files": [{"path": str(p), "sha256": atomic.file_sha256(p), "format": cf.file_format(p)} for p in files]}
    sel_all = [sel_txt] + sel_docs
    sentences = [s for p in paragraphs[5:30] for s in p.split(". ")]
    cases = {
        "other.jsonl": others[:20],  # another text
        "mixed.txt": [" ".join(rewhite(s) if k % 4 == 0 else o for k, (s, o) in enumerate(zip(sentences, others)))],
        "shared.jsonl": others[:3] + [rewhite(sel_docs[4])] + others[3:6],
        "prefix.jsonl": [rewhite(sel_docs[0]) + " and more", others[7]],
        "late.jsonl": others[:3] + [rewhite(sel_docs[60])],  # a document past the limit
    }
    prompts = [generation.Prompt(t, 1, 1) for t in ("", "   ", others[0][:80], rewhite(others[2][10:200]), "not there at all",
                                            sel_docs[3][:50])]
    V = shipped.model.config.vocab_size
    seen = {}
    for name, docs in cases.items():
        p = tmp_path / name
        if name.endswith(".txt"):
            p.write_text(docs[0], encoding="utf-8")
        else:
            p.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
        text = rt.read_eval_text([str(p)], shipped.tokenizer, 32, V, 100_000)
        want = seen[name] = former_leak_check(docs, sel_all, [pr.text for pr in prompts], limit)
        try:
            got = rt.leak_check(text, record)
        except PipelineError as e:
            assert f"shares {want['shared_documents']} document(s)" in str(e), (name, str(e))
            assert want["shared_documents"], name
        else:
            assert {k: got[k] for k in ("shared_documents", "passages_checked", "passages_found")} == {
                k: want[k] for k in ("shared_documents", "passages_checked", "passages_found")}, name
            assert got["selection_bytes_checked"] == min(sum(len(d.encode()) for d in sel_all), limit or 2**62)
            assert (rt.leak_note(got) is None) == (not limit), name
        got = rt.leak_check(text, None, prompts)
        assert got["selection_prompts_in_text"] == want["selection_prompts_in_text"], name
    assert seen["mixed.txt"]["passages_found"] and seen["shared.jsonl"]["shared_documents"]
    assert seen["late.jsonl"]["shared_documents"] == (0 if limit else 1)


@pytest.mark.slow
def test_leak_check_of_a_gzip_bomb_holds_memory_bounded(tmp_path):
    """A 1 MiB .txt.gz that holds 300 MiB of text as the selection corpus: the check, run in a child process,
    compares its first LEAK_CHECK_BYTES in less than 1 GB of peak RSS (reading it whole took 4 GiB), and says
    that it compared only part of it."""
    import gzip
    import runpy
    import subprocess

    from gelutrace.files import corpusfiles as cf

    block = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit,\nsed do eiusmod tempor.  " * 13_000  # ~1 MiB
    member = gzip.compress(block, compresslevel=9, mtime=0)  # one gzip member; the file repeats it
    bomb = tmp_path / "bomb.txt.gz"
    with open(bomb, "wb") as f:
        for _ in range(300 * 2**20 // len(block) + 1):
            f.write(member)
    record = {"files": [{"path": str(bomb), "sha256": atomic.file_sha256(bomb), "format": "txt.gz"}]}
    heldout = REPO_ROOT / "parcellation_datasets" / "heldout_eval_tinybard.txt"
    text = {"files": [{"path": str(heldout), **cf.file_record(heldout, "text"), "documents": 1}]}
    for name, what in (("record.json", record), ("text.json", text)):
        (tmp_path / name).write_text(json.dumps(what))
    code = (f"import json, resource, sys, types; sys.path.insert(0, {str(REPO_ROOT)!r})\n"
            f"from gelutrace.evaluate import realtext as rt\n"
            f"text = types.SimpleNamespace(**json.load(open({str(tmp_path / 'text.json')!r})))\n"
            f"record = json.load(open({str(tmp_path / 'record.json')!r}))\n"
            f"before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"out = rt.leak_check(text, record)\n"
            f"print(json.dumps({{**out, 'before_kib': before, "
            f"'peak_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}), flush=True)\n"
            f"print(rt.leak_note(out))\n")
    # started by bench/peak.py's small intermediate process: a child's ru_maxrss starts from the peak of the
    # process it was forked from, and this one's is the test run's
    measure = runpy.run_path(str(REPO_ROOT / "bench" / "peak.py"))["MEASURE"]
    r = subprocess.run([sys.executable, "-c", measure, sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.stdout, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[0])
    assert out["peak_kib"] * 1024 < 1e9, f"peak RSS {out['peak_kib'] / 2**20:.2f} GiB"
    assert r.returncode == 0, r.stderr[-3000:]
    note = r.stdout.splitlines()[1]
    assert out["passed"] and out["documents_checked"] and out["passages_checked"] == rt.LEAK_PASSAGES
    assert out["selection_bytes_checked"] == rt.LEAK_CHECK_BYTES and out["selection_checked_whole"] is False
    assert out["eval_checked_whole"] and "64 MiB of the selection corpus's documents" in note
    assert bomb.stat().st_size < 2 * 2**20
    from gelutrace.report import report

    ev = {"eval_text": {"files": text["files"], "tokens_scored": 100, "documents": 1, "context": 32,
                        "leak_check": out}}
    assert "no file and no document in the first 64 MiB of each text's documents" in report.text_sentence(ev)


def test_bad_eval_text_is_one_error_naming_the_flag(shipped, tmp_path):
    V = shipped.model.config.vocab_size
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\t\n  ")
    with pytest.raises(PipelineError, match="--eval_text .* no text but whitespace"):
        rt.read_eval_text([str(blank)], shipped.tokenizer, 32, V, 100)
    with pytest.raises(PipelineError, match="^--eval_text .*nope.txt does not exist"):
        rt.read_eval_text([str(tmp_path / "nope.txt")], shipped.tokenizer, 32, V, 100)
    with pytest.raises(PipelineError, match="twice"):
        rt.read_eval_text([str(HELDOUT_PATH), str(HELDOUT_PATH)], shipped.tokenizer, 32, V, 100)


@pytest.mark.parametrize("flags, words", [(["--control_share", "0.3"], "--control_share applies to --eval_text"),
                                          (["--eval_text", str(HELDOUT_PATH), "--control_share", "0"],
                                           r"--control_share must be in \(0, 1\], got 0.0"),
                                          (["--eval_text", str(HELDOUT_PATH), "--control_share", "1.5"],
                                           r"--control_share must be in \(0, 1\], got 1.5")])
def test_a_bad_control_share_is_one_error_line(tmp_path, flags, words):
    import e_generate_perturbed_results as e

    with pytest.raises(PipelineError, match=words):
        e.main(["--dataset_path", str(tmp_path / "d"), "--input_csv", str(REPO_ROOT / "parcellation_datasets" /
                "test_1.csv"), "--model_type", SHIPPED_NAME, "--perturbation_subset_filenames", "none", *flags])


def test_no_claim_of_influence_when_the_loss_does_not_rise():

    v = pd.DataFrame([{"k": 3, "winner": "degree (t=0.5)", "winner_delta_nll": -0.0016, "winner_ci_low": -0.0035,
                       "winner_ci_high": -0.0001, "ranking": "degree"},
                      {"k": 30, "winner": "ablation", "winner_delta_nll": 0.2, "winner_ci_low": 0.15,
                       "winner_ci_high": 0.25, "ranking": "ablation"}])
    lines = verdict.verdict_lines(v, 3072)
    assert "found the most influential" not in lines[0] and "no method's neurons raise the loss" in lines[0]
    assert "**ablation** found the most influential neurons" in lines[1]
    assert "3: none (no CI above 0), 30: ablation" in verdict.dose_lines(v)[0]


def test_leak_check_never_reads_a_selection_file_changed_since_stage_b(shipped, tmp_path):
    """A selection file rewritten since stage b is not the text the neurons were chosen on: its documents are not
    compared (the record and a note say why), so an evaluation text cut from the original is never reported as
    checked against documents it was not checked against."""
    V = shipped.model.config.vocab_size
    original = HELDOUT_PATH.read_text(encoding="utf-8")
    sel_file = tmp_path / "corpus.txt"
    sel_file.write_text(original)
    record = {"files": [{"path": str(sel_file), "sha256": atomic.file_sha256(sel_file)}]}
    part = tmp_path / "part.txt"
    part.write_text(" ".join(original.split()[:400]))
    text = rt.read_eval_text([str(part)], shipped.tokenizer, 32, V, 200)
    with pytest.raises(PipelineError, match="selection corpus"):
        rt.leak_check(text, record)
    sel_file.write_text(" ".join(f"other{i}" for i in range(3000)))  # other text, where nothing would be found
    out = rt.leak_check(text, record)
    assert not out["documents_checked"] and "changed since stage b" in out["documents_unchecked"]
    assert "sha256 only" in rt.leak_note(out)
    sel_file.unlink()
    out = rt.leak_check(text, record)
    assert not out["documents_checked"] and "missing" in out["documents_unchecked"] and rt.leak_note(out)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_prompts_in_both_looks_in_the_documents_of_a_compressed_corpus(tmp_path, suffix):
    """prompts_in_both of a corpus-mode dataset counts the evaluation prompts found in the corpus's documents as
    stage b read them (Python's `in` on the documents' text, whitespace normalised, is the reference), whatever
    the file's compression; a prompt split by a line break in the corpus is found too."""
    import gzip

    import zstandard

    from gelutrace.evaluate import ablation as pt

    docs = [p for p in HELDOUT_PATH.read_text(encoding="utf-8").split("\n\n") if p.strip()][:6]
    corpus = tmp_path / f"corpus{suffix}"
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8")
    if suffix == ".jsonl.gz":
        corpus.write_bytes(gzip.compress(lines))
    elif suffix == ".jsonl.zst":
        corpus.write_bytes(zstandard.ZstdCompressor().compress(lines))
    else:
        pd.DataFrame({"text": docs}).to_parquet(corpus)
    data = tmp_path / "ds"
    r = run_python([sys.executable, "b_generate_activation_dataset.py", "--input_text", str(corpus), "--export_dir",
                    str(data), "--model_type", SHIPPED_NAME, "--device", "cpu", "--context", "64"],
                   capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    record = DatasetDir(data, SHIPPED_NAME).corpus_record()
    words = docs[1].split()
    prompts = [" ".join(words[3:9]), " ".join(words[-7:]), "no such words in that corpus at all, surely"]
    normalised = [" ".join(d.split()) for d in docs]
    want = sum(any(" ".join(p.split()) in d for d in normalised) for p in prompts)
    assert want == 2 and any("\n" in d for d in docs[1:2])
    eval_prompts = [generation.Prompt(p, 3, 1) for p in prompts]
    settings = pt.EvalSettings(temperature=0.0, top_k=None, seed=0)
    ev = pt.evaluation_record(None, None, HELDOUT_PATH, eval_prompts, settings, record)
    assert ev["prompts_in_both"] == want and not ev["held_out"]
