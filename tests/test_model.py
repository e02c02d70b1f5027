"""
model.py and gelutrace.model.loading against transformers' own GPT-2 as the independent reference: logits,
cached and left-padded decoding, greedy and sampled generation, the context window, the shipped model
and the message for a hub model that cannot be had.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import GPT, KVCache

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, load_hf, make_checkpoint

ATOL = 1e-4


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def random_ids(model: GPT, shape, seed=0):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def offline_env(hf_home) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(hf_home),
               PYTHONPATH=str(REPO_ROOT))
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


# --- logits equal transformers' ---------------------------------------------------------------------------

def test_local_directory_logits_match_transformers(random_loaded, random_hf, random_ckpt):
    assert random_loaded.name == "randgpt"  # the file prefix {m} is the directory's name
    assert random_loaded.path == random_ckpt
    model = random_loaded.model
    assert len(random_loaded.tokenizer) == model.config.vocab_size
    assert [g.approximate for g in model.gelus()] == ["tanh"] * model.config.n_layer
    idx = random_ids(model, (3, 100))
    with torch.no_grad():
        ours, _ = model(idx)
        ref = random_hf(idx).logits
    assert ref.abs().max() > 1.0  # logits of a realistic scale, not all near zero
    assert max_diff(ours, ref) <= ATOL


@pytest.mark.parametrize("overrides", [
    dict(activation_function="gelu"),  # exact GELU: ours must follow the config, not always use tanh
    dict(activation_function="gelu_pytorch_tanh", n_inner=96, layer_norm_epsilon=1e-3, n_head=2),
], ids=["gelu-exact", "n_inner-eps"])
def test_config_variants_match_transformers(tmp_path, overrides):
    from gelutrace.model.loading import load_model

    path = make_checkpoint(tmp_path / "variant", seed=1, **overrides)
    model = load_model(str(path), device="cpu").model
    idx = random_ids(model, (2, 64), seed=1)
    with torch.no_grad():
        ours, _ = model(idx)
        ref = load_hf(path)(idx).logits
        assert max_diff(ours, ref) <= ATOL
        if overrides["activation_function"] == "gelu":
            # the comparison can tell the two GELUs apart, so passing it means the right one was used
            for g in model.gelus():
                g.approximate = "tanh"
            assert max_diff(model(idx)[0], ref) > 10 * ATOL


def test_shipped_model_logits_match_transformers(shipped, shipped_hf):
    model = shipped.model
    text = HELDOUT_PATH.read_text(encoding="utf-8")[:4000]
    ids = shipped.tokenizer(text)["input_ids"][: model.config.block_size]
    idx = torch.tensor([ids])
    with torch.no_grad():
        ours, _ = model(idx)
        ref = shipped_hf(idx).logits
    assert max_diff(ours, ref) <= ATOL


# --- the key/value cache and left padding -----------------------------------------------------------------

def test_cached_decoding_matches_full_recomputation(random_model):
    model = random_model
    idx = random_ids(model, (2, 40), seed=2)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 2, 40, idx.device, torch.float32)
        parts = [model(idx[:, :12], cache=cache)[0]]  # prefill
        parts.append(model(idx[:, 12:17], cache=cache)[0])  # a chunk after a filled cache
        for t in range(17, 40):  # then one position per step
            parts.append(model(idx[:, t:t + 1], cache=cache)[0])
    assert cache.length == 40
    assert max_diff(torch.cat(parts, dim=1), full) <= ATOL


def left_pad(seqs: list[torch.Tensor], filler: int):
    """Left-pad 1-D id tensors into (B, T) with `filler` and return it with the pad counts."""
    T = max(len(s) for s in seqs)
    pad = torch.tensor([T - len(s) for s in seqs])
    idx = torch.full((len(seqs), T), filler, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, T - len(s):] = s
    return idx, pad


def test_left_padded_batch_matches_each_sequence_alone(random_model):
    model = random_model
    lengths = [20, 13, 4, 20]
    seqs = [random_ids(model, (n,), seed=10 + i) for i, n in enumerate(lengths)]
    idx, pad = left_pad(seqs, filler=7)
    idx[1, :3] = torch.tensor([1, 2, 3])  # padding content must not matter
    steps = random_ids(model, (len(seqs), 6), seed=3)  # each row's continuation, fed one token at a time
    with torch.no_grad():
        full, _ = model(idx, pad=pad)
        cache = KVCache(model.config, len(seqs), idx.size(1) + steps.size(1), idx.device, torch.float32)
        prefill, _ = model(idx, cache=cache, pad=pad)
        stepped = torch.cat([model(steps[:, t:t + 1], cache=cache, pad=pad)[0] for t in range(steps.size(1))], 1)
        for i, s in enumerate(seqs):
            alone, _ = model(torch.cat([s, steps[i]]).unsqueeze(0))
            n = len(s)
            assert max_diff(full[i, -n:], alone[0, :n]) <= ATOL, f"row {i}, uncached"
            assert max_diff(prefill[i, -n:], alone[0, :n]) <= ATOL, f"row {i}, prefill"
            assert max_diff(stepped[i], alone[0, n:]) <= ATOL, f"row {i}, cached steps"
            assert torch.isfinite(full[i]).all()  # padding positions stay finite too


def test_batched_generation_matches_each_prompt_alone(random_model):
    model = random_model
    seqs = [random_ids(model, (n,), seed=20 + n) for n in (9, 3, 15)]
    idx, pad = left_pad(seqs, filler=0)
    batched = model.generate(idx, 12, temperature=0.0, pad=pad)
    for i, s in enumerate(seqs):
        alone = model.generate(s.unsqueeze(0), 12, temperature=0.0)
        assert torch.equal(batched[i, -12:], alone[0, -12:]), f"row {i}"


# --- greedy generation equals transformers' generate ------------------------------------------------------

PROMPTS = ["ROMEO:", "In the beginning God created the heaven", "Now is the winter of our discontent\nMade",
           "KING HENRY. What say you, my lord? Shall we"]
NEW = 24


def hf_greedy(hf, idx, attention_mask, pad_id):
    out = hf.generate(idx, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False,
                      pad_token_id=pad_id, eos_token_id=None)  # never stop early at end-of-text
    assert out.shape == (idx.size(0), idx.size(1) + NEW)
    return out[:, -NEW:]


def test_greedy_generation_matches_transformers_single(shipped, shipped_hf):
    tok = shipped.tokenizer
    for prompt in PROMPTS:
        idx = torch.tensor([tok(prompt)["input_ids"]])
        ours = shipped.model.generate(idx, NEW, temperature=0.0)
        assert torch.equal(ours[:, :idx.size(1)], idx)
        ref = hf_greedy(shipped_hf, idx, torch.ones_like(idx), tok.eos_token_id)
        assert ours[0, -NEW:].tolist() == ref[0].tolist(), prompt


def test_greedy_generation_matches_transformers_batched(shipped, shipped_hf):
    tok = shipped.tokenizer
    pad_id = tok.eos_token_id
    seqs = [torch.tensor(tok(p)["input_ids"]) for p in PROMPTS]
    assert len({len(s) for s in seqs}) > 1  # prompts of different lengths, so rows really are padded
    idx, pad = left_pad(seqs, filler=pad_id)
    mask = (torch.arange(idx.size(1)).unsqueeze(0) >= pad.unsqueeze(1)).long()
    ours = shipped.model.generate(idx, NEW, temperature=0.0, pad=pad)
    ref_batched = hf_greedy(shipped_hf, idx, mask, pad_id)
    for i, s in enumerate(seqs):
        ref_alone = hf_greedy(shipped_hf, s.unsqueeze(0), torch.ones(1, len(s), dtype=torch.long), pad_id)
        assert ours[i, -NEW:].tolist() == ref_alone[0].tolist(), PROMPTS[i]
        assert ours[i, -NEW:].tolist() == ref_batched[i].tolist(), PROMPTS[i]


# --- sampling ---------------------------------------------------------------------------------------------

def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_sampling_is_reproducible_per_row(random_model):
    model = random_model
    idx = random_ids(model, (3, 5), seed=4)
    a = model.generate(idx, 20, temperature=1.5, generators=gens(1, 2, 3))
    b = model.generate(idx, 20, temperature=1.5, generators=gens(1, 2, 3))
    c = model.generate(idx, 20, temperature=1.5, generators=gens(4, 5, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 5:], c[:, 5:])
    # a row's tokens depend on its own seed only, not on the rest of the batch
    alone = model.generate(idx[1:2], 20, temperature=1.5, generators=gens(2))
    assert torch.equal(alone[0], a[1])


def test_top_k_1_is_greedy(random_model):
    model = random_model
    idx = random_ids(model, (2, 6), seed=5)
    greedy = model.generate(idx, 15, temperature=0.0)
    assert torch.equal(model.generate(idx, 15, temperature=2.0, top_k=1, generators=gens(7, 8)), greedy)


def test_top_k_samples_only_among_the_k_most_likely(random_model):
    model = random_model
    idx = random_ids(model, (2, 6), seed=6)
    out = model.generate(idx, 25, temperature=3.0, top_k=3, generators=gens(9, 10))
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    for row in range(2):
        for t in range(5, out.size(1) - 1):  # logits at t predict token t + 1
            allowed = torch.topk(logits[row, t], 3).indices.tolist()
            assert out[row, t + 1].item() in allowed
    assert not torch.equal(out, model.generate(idx, 25, temperature=0.0))  # it did sample


def test_pick_frequencies_follow_tempered_top_k_softmax():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0])
    n = 4000
    torch.manual_seed(0)
    picks = GPT.pick(logits.repeat(n, 1), temperature=0.5, top_k=2).view(-1)
    counts = torch.bincount(picks, minlength=5)
    assert set(picks.tolist()) == {1, 3}
    p1 = 1 / (1 + math.exp((2.5 - 3.0) / 0.5))  # softmax over the two survivors at temperature 0.5
    assert abs(counts[1].item() / n - p1) < 0.03
    assert GPT.pick(logits.unsqueeze(0), temperature=0.0).item() == 1  # temperature 0: argmax, no division


# --- the context window -----------------------------------------------------------------------------------

def test_context_window(random_model):
    model = random_model
    bs = model.config.block_size
    idx = random_ids(model, (1, 100), seed=7)
    # the last new token is never fed back in, so prompt + new may reach block_size + 1
    assert model.generate(idx, bs + 1 - 100).size(1) == bs + 1
    with pytest.raises(ValueError, match="context window"):
        model.generate(idx, bs + 2 - 100)
    with pytest.raises(ValueError, match="context window"):
        model.generate(random_ids(model, (1, bs + 1)), 1)
    with pytest.raises(ValueError, match="context window"):
        model(random_ids(model, (1, bs + 1)))


# --- the shipped model, offline ---------------------------------------------------------------------------

def test_shipped_model_loads_offline(shipped_path, tmp_path):
    code = ("from gelutrace.model.loading import load_model\n"
            f"lm = load_model({SHIPPED_NAME!r}, device='cpu')\n"
            "print(lm.name, lm.model.config.n_layer, len(lm.tokenizer), lm.model.config.vocab_size)\n")
    r = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path / "hf_home"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    name, n_layer, n_tok, vocab = r.stdout.split()
    assert name == SHIPPED_NAME and int(n_layer) >= 1 and int(n_tok) == int(vocab)


def test_shipped_model_heldout_loss(shipped):
    model, tok = shipped.model, shipped.tokenizer
    text = HELDOUT_PATH.read_text(encoding="utf-8")
    ids = torch.tensor(tok(text)["input_ids"])
    assert len(ids) > 500, "the held-out text should be a few KB"
    bs = model.config.block_size
    T = min(bs, len(ids) - 1)
    windows = min(8, (len(ids) - 1) // T)  # at most 8 whole windows keeps this fast
    x = ids[:windows * T].view(windows, T)
    y = ids[1:windows * T + 1].view(windows, T)
    with torch.no_grad():
        _, loss = model(x, targets=y)
    assert loss.item() < 5.5, f"held-out loss {loss.item():.3f} nats is not far below ln(4096) = 8.3"


# --- failing clearly ----------------------------------------------------------------------------------------

def test_unreachable_hub_model_fails_with_clear_message(tmp_path):
    code = ("from gelutrace import PipelineError\n"
            "from gelutrace.model.loading import load_model\n"
            "try:\n"
            "    load_model('gpt2', device='cpu')\n"
            "except PipelineError as e:\n"
            "    print(e)\n"
            "    raise SystemExit(3)\n")
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    r = subprocess.run([sys.executable, "-c", code], env=offline_env(hf_home), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, f"expected PipelineError, got rc {r.returncode}: {r.stdout}{r.stderr}"
    msg = r.stdout.strip()
    assert "\n" not in msg  # one line
    assert "'gpt2'" in msg and "cache" in msg.lower()
    assert f"--model_type {SHIPPED_NAME}" in msg  # names the alternatives
    assert "local checkpoint directory" in msg
    assert "HF_HOME" in msg


def test_unknown_model_type_and_bad_directory(tmp_path):
    from gelutrace import PipelineError
    from gelutrace.model.loading import load_model

    with pytest.raises(PipelineError, match="unknown --model_type"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(PipelineError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_per_row_sampling_follows_the_softmax():
    """Draws with one generator per row: frequencies against softmax(logits / T) by a chi-square test, never a
    token of probability 0 (top_k), and each row's draw independent of the other rows."""
    from scipy.stats import chisquare

    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 1e-30]))
    n = 4000
    draws = GPT.pick(logits.expand(n, -1), 1.0, None, gens(*range(n))).view(-1).numpy()
    probs = torch.softmax(logits, -1).double().numpy()
    observed = np.bincount(draws, minlength=6)
    assert chisquare(observed[:5], probs[:5] * n).pvalue > 1e-3
    top = GPT.pick(logits.expand(n, -1), 1.0, 2, gens(*range(n))).view(-1).numpy()
    assert set(np.unique(top)) == {0, 1}
    assert abs((top == 0).mean() - 2 / 3) < 0.03
    # a row's draw is its generator's alone
    single = GPT.pick(logits.view(1, -1), 1.0, None, gens(17)).item()
    assert single == draws[17]
