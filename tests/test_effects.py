"""
d_calculate_neuron_effects.py (gelutrace.evaluate.effects) against independent references: stage e run on one-neuron
subsets, and transformers' GPT2LMHeadModel with a forward hook on `mlp.act` zeroing the neuron, its KL and
delta NLL computed by hand in float64; plus --neurons, --resume and bad input.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from gelutrace import PipelineError
from gelutrace.evaluate import metrics
from gelutrace.files import atomic, formats, layout
from gelutrace.record.prompts import prompt_halves

from conftest import REPO_ROOT, SHIPPED_NAME, load_hf, run_python

SCRIPT = REPO_ROOT / "d_calculate_neuron_effects.py"
# greedy: the 3 repeats of the first prompt are one sequence that counts 3 times; the last prompt has no tokens
PROMPTS = [("KING HENRY. Now, lords, ", 6, 3), ("And God said, \"Let there be\", ", 5, 1), ("Amen", 0, 2)]
TOL = 1e-5


def write_prompts(p, rows=PROMPTS):
    pd.DataFrame(rows, columns=layout.PROMPT_COLUMNS).to_csv(p, index=False)
    return p


def run_d(dataset, csv, *extra):
    import d_calculate_neuron_effects as d

    try:
        d.main(["--dataset_path", str(dataset), "--input_csv", str(csv), "--model_type", SHIPPED_NAME, "--device",
                "cpu", *map(str, extra)])
    finally:
        atomic.release_locks()  # as the script's run_main does when it ends
    return pd.read_csv(layout.path(dataset, layout.NEURON_EFFECTS, SHIPPED_NAME))


def save_ids(p, ids):
    np.save(p, np.asarray(ids, np.int64))
    return p


def stage_b(d, rows=PROMPTS):
    """(dataset directory, prompt CSV) made by stage b in d, greedy."""
    csv = write_prompts(d / "prompts.csv", rows)
    r = run_python([sys.executable, str(REPO_ROOT / "b_generate_activation_dataset.py"), "--input_csv", str(csv),
                        "--export_dir", str(d / "ds"), "--model_type", SHIPPED_NAME, "--device", "cpu",
                        "--no_edge_list", "--no_activation_lists"], capture_output=True, text=True, cwd=REPO_ROOT,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    return d / "ds", csv


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped_path):
    return stage_b(tmp_path_factory.mktemp("effects"))


@pytest.fixture(scope="module")
def sample_run(dataset, shipped):
    """Effects of 16 neurons of every layer (some at random, some with large outputs), in one run."""
    ds, csv = dataset
    cfg = shipped.model.config
    rng = np.random.default_rng(0)
    ids = np.unique(np.concatenate([layer * cfg.d_mlp + rng.choice(cfg.d_mlp, 16, replace=False)
                                    for layer in range(cfg.n_layer)]))
    effects = run_d(ds, csv, "--neurons", save_ids(ds.parent / "sample.npy", ids))
    return ids, effects


def test_output_file_and_sidecar(dataset, sample_run):
    ds, csv = dataset
    ids, effects = sample_run
    assert list(effects.columns) == layout.NEURON_EFFECTS_COLUMNS
    assert effects["neuron_id"].tolist() == sorted(ids.tolist())
    assert np.isfinite(effects[["kl", "delta_nll"]].to_numpy()).all()
    assert (effects["kl"] > -1e-7).all() and effects["kl"].max() > 1e-3
    meta = json.loads(layout.path(ds, layout.NEURON_EFFECTS_META, SHIPPED_NAME).read_text())
    assert meta["model"] == SHIPPED_NAME and meta["num_neurons"] == len(ids)
    assert meta["num_samples"] == 3 + 1 and meta["num_sequences"] == 2 and meta["num_tokens"] == 3 * 6 + 5
    import hashlib
    assert meta["input_csv_sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert not layout.path(ds, layout.NEURON_EFFECTS_PARTIAL, SHIPPED_NAME).exists()


def test_equals_stage_e_on_one_neuron_subsets(dataset, sample_run, shipped):
    import e_generate_perturbed_results as e

    ds, csv = dataset
    ids, effects = sample_run
    d = shipped.model.config.d_mlp
    by_effect = effects.sort_values("delta_nll", ascending=False)["neuron_id"].to_numpy()
    chosen = list(by_effect[:2]) + [int(by_effect[-1])]  # the two largest effects and the most negative
    for i in ids[::-1]:  # and neurons of two more layers
        if len(chosen) < 5 and i // d not in {c // d for c in chosen}:
            chosen.append(int(i))
    assert len({c // d for c in chosen}) >= 3
    names = []
    (ds / layout.SUBSETS_DIR).mkdir(exist_ok=True)
    for i in chosen:
        names.append(f"n{i}.npy")
        save_ids(ds / layout.SUBSETS_DIR / names[-1], [i])
    try:
        e.main(["--dataset_path", str(ds), "--input_csv", str(csv), "--model_type", SHIPPED_NAME, "--device", "cpu",
                "--perturbation_subset_filenames", *names])
    finally:
        atomic.release_locks()
    summary = pd.read_csv(ds / layout.RESULTS_DIR / layout.PERTURBATION_SUMMARY).set_index("subset")
    mine = effects.set_index("neuron_id")
    for i, name in zip(chosen, names):
        for metric in ("kl", "delta_nll"):
            assert abs(mine.loc[i, metric] - summary.loc[name, metric]) <= TOL, (i, metric)
    assert summary["delta_nll"].abs().max() > 1e-2  # a neuron with a real effect is among them


def reference_effect(hf, tokenizer, neuron: int, d_mlp: int, rows=None):
    """kl and delta_nll of zeroing one neuron in transformers' GPT-2, greedy continuations, all in float64 (over
    the prompt rows `rows`, default all)."""
    layer, dim = divmod(neuron, d_mlp)

    def zero(module, inputs, output):
        output = output.clone()
        output[..., dim] = 0
        return output

    kls, dnlls = [], []
    for row, (text, n_new, repeats) in enumerate(PROMPTS):
        if n_new == 0 or (rows is not None and row not in rows):
            continue
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
            cont = seq[0, ids.size(1):]
            inp = seq[:, :-1]
            base = torch.log_softmax(hf(inp).logits[0, -n_new:].double(), -1)
            handle = hf.transformer.h[layer].mlp.act.register_forward_hook(zero)
            try:
                pert = torch.log_softmax(hf(inp).logits[0, -n_new:].double(), -1)
            finally:
                handle.remove()
        kl = (base.exp() * (base - pert)).sum(-1).mean().item()
        dnll = (base[torch.arange(n_new), cont] - pert[torch.arange(n_new), cont]).mean().item()
        kls += [kl] * repeats  # every (prompt, repeat) sample counts once
        dnlls += [dnll] * repeats
    return float(np.mean(kls)), float(np.mean(dnlls))


def test_equals_transformers_with_act_hook(shipped_path, shipped, sample_run):
    ids, effects = sample_run
    hf = load_hf(shipped_path)
    d = shipped.model.config.d_mlp
    top = effects.sort_values("kl", ascending=False)["neuron_id"].to_numpy()
    chosen = [int(top[0]), int(top[1]), int(top[len(top) // 2]), int(ids[0]), int(ids[-1])]
    mine = effects.set_index("neuron_id")
    half = prompt_halves(len(PROMPTS))
    assert all(any(PROMPTS[r][1] for r in np.flatnonzero(half == h)) for h in (0, 1)), "each half has tokens"
    for i in chosen:
        kl, dnll = reference_effect(hf, shipped.tokenizer, i, d)
        assert abs(mine.loc[i, "kl"] - kl) <= TOL, i
        assert abs(mine.loc[i, "delta_nll"] - dnll) <= TOL, i
        for h, column in enumerate(layout.NEURON_EFFECTS_COLUMNS[-2:]):  # each half of the prompt rows alone
            rows = set(np.flatnonzero(half == h).tolist())
            assert abs(mine.loc[i, column] - reference_effect(hf, shipped.tokenizer, i, d, rows)[1]) <= TOL, (i, h)
    assert reference_effect(hf, shipped.tokenizer, int(top[0]), d)[0] > 1e-3


def test_neurons_file_restricts_and_agrees(dataset, sample_run, tmp_path):
    ds, csv = dataset
    ids, effects = sample_run
    with pytest.raises(PipelineError, match="more than once"):  # a subset is a set, here as everywhere
        run_d(ds, csv, "--neurons", save_ids(tmp_path / "dup.npy", [int(ids[3]), int(ids[3])]))
    pick = [int(ids[40]), int(ids[3]), int(ids[90])]  # unsorted
    got = run_d(ds, csv, "--neurons", save_ids(tmp_path / "few.npy", pick), "--batch_size", "1")  # 1 sequence per group
    assert got["neuron_id"].tolist() == sorted(pick)
    ref = effects.set_index("neuron_id").loc[got["neuron_id"]]
    # one sequence per group rounds the float32 logits otherwise than two: ~1e-7 nats, whatever the effect
    np.testing.assert_allclose(got["kl"], ref["kl"], atol=1e-6)
    np.testing.assert_allclose(got["delta_nll"], ref["delta_nll"], atol=1e-6)


def test_resume_after_interrupt_equals_uninterrupted_run(dataset, tmp_path, monkeypatch, shipped):
    from gelutrace.evaluate import effects as ef

    ds, csv = dataset
    d = shipped.model.config.d_mlp
    sub = save_ids(tmp_path / "sub.npy", [3, d + 7, 2 * d + 1, 2 * d + 9, 4 * d + 100, 5 * d + 511])
    full = run_d(ds, csv, "--neurons", sub)
    full_bytes = layout.path(ds, layout.NEURON_EFFECTS, SHIPPED_NAME).read_bytes()
    layout.path(ds, layout.NEURON_EFFECTS, SHIPPED_NAME).unlink()

    real, calls = ef.block_effects, []

    def interrupted(model, ids, *a, **k):
        calls.append(int(ids[0]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, ids, *a, **k)

    monkeypatch.setattr(ef, "block_effects", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_d(ds, csv, "--neurons", sub)
    assert not layout.path(ds, layout.NEURON_EFFECTS, SHIPPED_NAME).exists()
    partial = layout.path(ds, layout.NEURON_EFFECTS_PARTIAL, SHIPPED_NAME)
    assert len(list(partial.glob("*.npz"))) == 2
    with pytest.raises(PipelineError, match="other inputs"):  # other neurons: not the same run
        run_d(ds, csv, "--neurons", save_ids(tmp_path / "other.npy", [3]), "--resume")

    def counted(model, ids, *a, **k):
        calls.append(int(ids[0]))
        return real(model, ids, *a, **k)

    calls.clear()
    monkeypatch.setattr(ef, "block_effects", counted)
    run_d(ds, csv, "--neurons", sub)  # rerun of the interrupted run, without --resume: starts over
    assert len(calls) == 5  # one block per layer that holds some of the neurons
    layout.path(ds, layout.NEURON_EFFECTS, SHIPPED_NAME).unlink()

    monkeypatch.setattr(ef, "block_effects", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_d(ds, csv, "--neurons", sub)
    monkeypatch.setattr(ef, "block_effects", counted)
    calls.clear()
    resumed = run_d(ds, csv, "--neurons", sub, "--resume")
    assert calls == [2 * d + 1, 4 * d + 100, 5 * d + 511]  # only the blocks not finished before
    assert layout.path(ds, layout.NEURON_EFFECTS, SHIPPED_NAME).read_bytes() == full_bytes
    pd.testing.assert_frame_equal(resumed, full)
    assert not partial.exists()


@pytest.mark.parametrize("case", ["missing_dataset", "other_model", "other_prompt", "other_tokens", "other_samples",
                                  "extra_prompt", "bad_batch", "bad_neurons", "neuron_out_of_range"])
def test_bad_input_raises_before_writing(dataset, tmp_path, case):
    import shutil

    ds, csv = dataset
    d = tmp_path / "ds"
    shutil.copytree(ds, d, ignore=shutil.ignore_patterns(layout.RESULTS_DIR, layout.SUBSETS_DIR, "*_neuron_effects*"))
    rows, extra = list(PROMPTS), []
    if case == "missing_dataset":
        layout.path(d, layout.DATASET, SHIPPED_NAME).unlink()
    elif case == "other_model":
        meta = formats.read_graph_meta(d, SHIPPED_NAME)
        atomic.write_json(dict(meta, d_mlp=meta["d_mlp"] * 2), layout.path(d, layout.GRAPH_META, SHIPPED_NAME))
    elif case == "other_prompt":
        rows[1] = ("And God said, \"Let there be light\", ", 5, 1)
    elif case == "other_tokens":
        rows[0] = (rows[0][0], 7, 3)
    elif case == "other_samples":
        rows[1] = (rows[1][0], 5, 2)
    elif case == "extra_prompt":
        rows.append(("More", 2, 1))
    elif case == "bad_batch":
        extra = ["--batch_size", "0"]
    elif case == "bad_neurons":
        extra = ["--neurons", save_ids(tmp_path / "bad.npy", [[1, 2]])]
    elif case == "neuron_out_of_range":
        extra = ["--neurons", save_ids(tmp_path / "bad.npy", [1, 6 * 512])]
    with pytest.raises(PipelineError):
        run_d(d, write_prompts(tmp_path / "p.csv", rows), *extra)
    assert not layout.path(d, layout.NEURON_EFFECTS, SHIPPED_NAME).exists()


def test_script_exit_status(dataset, tmp_path):
    """As a subprocess: a mismatched prompt CSV exits 2 with one error line; a good run writes the CSV."""
    ds, csv = dataset
    bad = write_prompts(tmp_path / "p.csv", [(PROMPTS[0][0], 6, 2)] + PROMPTS[1:])
    cmd = [sys.executable, str(SCRIPT), "--dataset_path", str(ds), "--model_type", SHIPPED_NAME, "--device", "cpu",
           "--neurons", str(save_ids(tmp_path / "one.npy", [700]))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = run_python(cmd + ["--input_csv", str(bad)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "another prompt CSV" in errors[0], r.stderr
    r = run_python(cmd + ["--input_csv", str(csv)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(layout.path(ds, layout.NEURON_EFFECTS, SHIPPED_NAME))["neuron_id"].tolist() == [700]


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0])
def test_logit_shift_metrics_equal_a_float64_computation(scale):
    """compare_logit_shifts in float32 against the definitions in float64, for tiny to large changes."""

    g = torch.Generator().manual_seed(1)
    k, rows, n, V = 3, 2, 4, 50
    base_logits = 3 * torch.randn(rows, n, V, generator=g, dtype=torch.float64)
    shift = scale * torch.randn(k, rows, n, V, generator=g, dtype=torch.float64)
    conts = [np.array([1, 7, 3, 9]), np.array([4, 2])]  # row 1 has a 2-token continuation (right-aligned)
    base = torch.log_softmax(base_logits, -1)
    pert = torch.log_softmax(base_logits + shift, -1)
    p = metrics.base_probabilities(base.float())
    kl, dnll = metrics.compare_logit_shifts(p, shift.float(), conts)
    for j in range(k):
        for r, c in enumerate(conts):
            pos = torch.arange(n - len(c), n)
            b, q = base[r, pos], pert[j, r, pos]
            ref_kl = (b.exp() * (b - q)).sum(-1).mean().item()
            ref_dnll = (b[torch.arange(len(c)), c] - q[torch.arange(len(c)), c]).mean().item()
            assert abs(kl[j, r] - ref_kl) <= 1e-3 * ref_kl + 1e-11, (scale, j, r)  # float32 differencing: ~1e-7
            assert abs(dnll[j, r] - ref_dnll) <= 1e-6 * abs(ref_dnll) + 1e-6 * scale, (scale, j, r)
    one_kl, one_dnll = metrics.compare_logit_shifts(p, shift[0].float(), conts)  # without the k axis
    np.testing.assert_allclose(one_kl, kl[0], rtol=1e-6)
    np.testing.assert_allclose(one_dnll, dnll[0], rtol=1e-6, atol=1e-9)
    # a few positions at a time, any block size: the per-position metrics against the float64 definitions
    flat_p, flat_shift = p.reshape(rows * n, V), shift.float().reshape(k, rows * n, V)
    tokens = torch.randint(0, V, (rows * n,), generator=g)
    q = pert.reshape(k, rows * n, V)
    b = base.reshape(rows * n, V)
    ref_kl = (b.exp() * (b - q)).sum(-1)
    ref_dnll = b[torch.arange(rows * n), tokens] - q[:, torch.arange(rows * n), tokens]
    for size in (1, 3, rows * n):
        bkl, bdnll = metrics.blocked_shift_metrics(rows * n, lambda sl: (flat_p[sl], flat_shift[:, sl].clone()), tokens,
                                                   size)
        assert bkl.shape == bdnll.shape == (k, rows * n)
        assert torch.all((bkl - ref_kl).abs() <= 1e-3 * ref_kl + 1e-11), (scale, size)
        assert torch.all((bdnll - ref_dnll).abs() <= 1e-6 * ref_dnll.abs() + 1e-6 * scale), (scale, size)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_other_families_equal_transformers_one_neuron_at_a_time(family, tmp_path):
    """Every family's single-neuron effects (whole forward passes, rows ablating one neuron each) against one
    forward of transformers' own model class per neuron, the neuron zeroed at the input of its output projection."""
    from test_families import FAMILIES, build, get
    from transformers import AutoModelForCausalLM

    from gelutrace.evaluate import effects as ef
    from gelutrace.model.loading import load_model

    path = build(family, tmp_path / family)
    lm = load_model(str(path), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    d = lm.model.config.d_mlp
    prompts = [lm.tokenizer(t)["input_ids"] for t in ("To be, or not to be", "In the beginning")]
    conts = [np.array(lm.tokenizer(t)["input_ids"]) for t in (" that is the question", " God created")]
    dims = np.array([0, 3, 17, d - 1])
    for layer in (0, 1):
        kl, dnll = ef.group_effects_forward(lm.model, layer, dims, prompts, conts, max_rows=3, max_values=1 << 20)
        proj = get(get(hf, FAMILIES[family][2])[layer], FAMILIES[family][5])
        for a, j in enumerate(dims):
            for s, (p, c) in enumerate(zip(prompts, conts)):
                x = torch.tensor([list(p) + c[:-1].tolist()])

                def zero(module, args, j=j):
                    h = args[0].clone()
                    h[..., j] = 0
                    return (h,) + args[1:]
                with torch.no_grad():
                    base = torch.log_softmax(hf(x).logits[0, -len(c):].double(), -1)
                    handle = proj.register_forward_pre_hook(zero)
                    try:
                        pert = torch.log_softmax(hf(x).logits[0, -len(c):].double(), -1)
                    finally:
                        handle.remove()
                want_kl = (base.exp() * (base - pert)).sum(-1).mean().item()
                want_dnll = (base[torch.arange(len(c)), c] - pert[torch.arange(len(c)), c]).mean().item()
                assert kl[a, s] == pytest.approx(want_kl, rel=1e-3, abs=TOL), (layer, j, s)
                assert dnll[a, s] == pytest.approx(want_dnll, rel=1e-3, abs=TOL), (layer, j, s)
    assert np.abs(kl).max() > 1e-3  # the ablations did something


@pytest.mark.slow
def test_neuron_shards_and_torchrun_equal_one_run_bit_for_bit(dataset, tmp_path):
    """--neurons 0/3, 1/3, 2/3 merged, and two torchrun processes, against one run of every neuron."""
    import shutil

    ds, csv = dataset
    whole = tmp_path / "whole"
    shutil.copytree(ds, whole)
    one = run_d(whole, csv).set_index("neuron_id")
    assert len(one) == 3072
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    base = [str(SCRIPT), "--dataset_path", str(whole), "--input_csv", str(csv), "--model_type", SHIPPED_NAME,
            "--device", "cpu"]
    for i in range(3):
        r = run_python([sys.executable, *base, "--neurons", f"{i}/3", "--output_dir", str(tmp_path / f"s{i}")],
                       capture_output=True, text=True, cwd=REPO_ROOT, env=env)
        assert r.returncode == 0, r.stderr
    merged = tmp_path / "merged"
    shutil.copytree(ds, merged)
    r = run_python([sys.executable, str(SCRIPT), "--dataset_path", str(merged), "--merge",
                        *(str(tmp_path / f"s{i}") for i in (2, 0, 1)), "--model_type", SHIPPED_NAME],
                   capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(layout.path(merged, layout.NEURON_EFFECTS, SHIPPED_NAME)).set_index("neuron_id")
    pd.testing.assert_frame_equal(got, one, check_exact=True)
    r = run_python([sys.executable, str(SCRIPT), "--dataset_path", str(merged), "--merge", str(tmp_path / "s0"),
                        str(tmp_path / "s2"), "--model_type", SHIPPED_NAME], capture_output=True, text=True,
                   cwd=REPO_ROOT, env=env)
    assert r.returncode == 2 and "1/3 missing" in r.stderr
    tr = tmp_path / "torchrun"
    shutil.copytree(ds, tr)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *base[:2], str(tr), *base[3:]], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = pd.read_csv(layout.path(tr, layout.NEURON_EFFECTS, SHIPPED_NAME)).set_index("neuron_id")
    pd.testing.assert_frame_equal(got, one, check_exact=True)


def test_corpus_mode_equals_transformers_per_neuron(shipped_path, shipped, tmp_path):
    """--input_text: each neuron's real-text delta_nll and kl against transformers' GPT-2 with mlp.act hooked,
    over windows cut by hand; on the dataset's own corpus of two shards, the halves are the shards' windows."""
    from test_realtext import hooked, reference, windows_by_hand

    from conftest import HELDOUT_PATH

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    b = [sys.executable, str(REPO_ROOT / "b_generate_activation_dataset.py"), "--input_text", str(HELDOUT_PATH),
         "--model_type", SHIPPED_NAME, "--device", "cpu", "--context", "64"]
    for i in range(2):
        r = run_python(b + ["--export_dir", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"], capture_output=True,
                       text=True, cwd=REPO_ROOT, env=env)
        assert r.returncode == 0, r.stderr
    run_python([sys.executable, str(REPO_ROOT / "c_merge_activation_statistics.py"), "--output_dir",
                    str(tmp_path / "ds"), str(tmp_path / "s0"), str(tmp_path / "s1")], check=True, cwd=REPO_ROOT,
               env=env, capture_output=True)
    d = shipped.model.config.d_mlp
    ids = np.array([5, d + 77, 4 * d + 300])
    r = run_python([sys.executable, str(SCRIPT), "--dataset_path", str(tmp_path / "ds"), "--input_text",
                        str(HELDOUT_PATH), "--eval_tokens", "400", "--model_type", SHIPPED_NAME, "--device", "cpu",
                        "--neurons", str(save_ids(tmp_path / "n.npy", ids))], capture_output=True, text=True,
                   cwd=REPO_ROOT, env=env)
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(layout.path(tmp_path / "ds", layout.NEURON_EFFECTS, SHIPPED_NAME)).set_index("neuron_id")
    meta = json.loads(layout.path(tmp_path / "ds", layout.NEURON_EFFECTS_META, SHIPPED_NAME).read_text())
    assert meta["objective"] == "real_text" and meta["num_tokens"] == 400 and meta["context"] == 64
    windows = windows_by_hand(shipped.tokenizer, [HELDOUT_PATH.read_text(encoding="utf-8")], 64, 1 + 400 + 399 // 63)
    hf = load_hf(shipped_path)
    for j in ids:
        fn = hooked(hf, [hf.transformer.h[j // d].mlp.act], [[j % d]], output=True)
        _, dnll, kl = reference(fn, windows, True)
        assert got.loc[j, "delta_nll"] == pytest.approx(dnll, rel=1e-4, abs=TOL)
        assert got.loc[j, "kl"] == pytest.approx(kl, rel=1e-4, abs=TOL)
        for h, column in enumerate(layout.NEURON_EFFECTS_COLUMNS[-2:]):  # windows 0, 2, 4, ... and 1, 3, 5, ...
            _, dnll_h, _ = reference(fn, windows[h::2], True)
            assert got.loc[j, column] == pytest.approx(dnll_h, rel=1e-4, abs=TOL), (j, h)


def test_empty_neuron_shard_and_merge_into_another_dataset_are_refused(shipped_path, tmp_path):
    import shutil

    ds, csv = stage_b(tmp_path, PROMPTS[:1])  # one sequence: the two shards measure every neuron on it
    with pytest.raises(PipelineError, match="leave this shard none"):
        run_d(ds, csv, "--neurons", "50/100", "--output_dir", tmp_path / "s50")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    import d_calculate_neuron_effects as d

    for i in range(2):
        try:
            d.main(["--dataset_path", str(ds), "--input_csv", str(csv), "--model_type", SHIPPED_NAME, "--device",
                    "cpu", "--neurons", f"{i}/2", "--output_dir", str(tmp_path / f"s{i}")])
        finally:
            atomic.release_locks()
    meta = json.loads(layout.path(tmp_path / "s0", layout.NEURON_EFFECTS_META, SHIPPED_NAME).read_text())
    assert meta["what"] and meta["neuron_shard"] == {"index": 0, "count": 2, "blocks": 6}
    other = tmp_path / "other"
    shutil.copytree(ds, other)
    freq = layout.path(other, layout.FREQUENCY, SHIPPED_NAME)
    freq.write_text(freq.read_text() + "\n")  # another dataset's frequency file
    r = run_python([sys.executable, str(SCRIPT), "--dataset_path", str(other), "--merge", str(tmp_path / "s0"),
                        str(tmp_path / "s1"), "--model_type", SHIPPED_NAME], capture_output=True, text=True,
                   cwd=REPO_ROOT, env=env)
    assert r.returncode == 2 and "another dataset" in r.stderr
