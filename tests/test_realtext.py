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

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, run_python
from gelutrace import PipelineError
from gelutrace import realtext as rt
from gelutrace import stagefiles as sf


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

    from gelutrace.loading import load_model

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


def test_leak_check_refuses_the_selection_corpus(shipped, tmp_path):
    sel_file = tmp_path / "corpus.txt"
    sel_file.write_text("Friends, Romans, countrymen, lend me your ears.\n")
    other = tmp_path / "other.txt"
    other.write_text("Now is the winter of our discontent.\n")
    record = {"files": [{"path": str(sel_file), "sha256": sf.file_sha256(sel_file)}]}
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
    pd.DataFrame([("To be, or not ", 3, 1)], columns=sf.PROMPT_COLUMNS).to_csv(prompts, index=False)
    r = run("e_generate_perturbed_results.py", "--dataset_path", str(data), "--eval_csv", str(prompts),
            "--model_type", SHIPPED_NAME, "--device", "cpu", "--perturbation_subset_filenames", "none",
            "--eval_text", str(HELDOUT_PATH), "--eval_tokens", "100")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")
    assert "selection corpus" in r.stderr


def test_leak_check_sees_copies_with_other_whitespace_and_parts(shipped, tmp_path):
    corpus = HELDOUT_PATH.read_text(encoding="utf-8")
    sel_file = tmp_path / "corpus.txt"
    sel_file.write_text(corpus)
    record = {"files": [{"path": str(sel_file), "sha256": sf.file_sha256(sel_file)}]}
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


def test_no_claim_of_influence_when_the_loss_does_not_rise():
    from gelutrace import comparison as cmp

    v = pd.DataFrame([{"k": 3, "winner": "degree (t=0.5)", "winner_delta_nll": -0.0016, "winner_ci_low": -0.0035,
                       "winner_ci_high": -0.0001, "ranking": "degree"},
                      {"k": 30, "winner": "ablation", "winner_delta_nll": 0.2, "winner_ci_low": 0.15,
                       "winner_ci_high": 0.25, "ranking": "ablation"}])
    lines = cmp.verdict_lines(v, 3072)
    assert "found the most influential" not in lines[0] and "no method's neurons raise the loss" in lines[0]
    assert "**ablation** found the most influential neurons" in lines[1]
    assert "3: none (no CI above 0), 30: ablation" in cmp.dose_lines(v)[0]
