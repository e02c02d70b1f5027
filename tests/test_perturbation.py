"""
Stage e (gelutrace.evaluate.ablation, e_generate_perturbed_results.py) against independent references: a copy of
the model with c_proj input columns zeroed (or folded into the bias), transformers' GPT2LMHeadModel with a
hook on `mlp.act`, plain greedy generation, and the metrics computed by hand.
"""

import copy
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from gelutrace import PipelineError
from gelutrace.evaluate import ablation as pt
from gelutrace.evaluate import metrics
from gelutrace.files import atomic, formats, layout
from gelutrace.model import hooks
from model import KVCache

from conftest import REPO_ROOT, SHIPPED_NAME, SHIPPED_PATH, load_hf, run_python

SCRIPT = REPO_ROOT / "e_generate_perturbed_results.py"
PROMPTS = ["ROMEO: what, ho! ", "In the beginning God created the heaven", "Friends, \"Romans\", countrymen "]
NEW = 8


def ids_of(pairs, d):
    return np.array([layer * d + dim for layer, dim in pairs], np.int64)


def write_prompt_csv(p, prompts=PROMPTS, new=NEW, samples=2):
    pd.DataFrame({"prompts": prompts, "number_of_new_tokens": new, "num_samples": samples}).to_csv(p, index=False)
    return p


def make_dataset(d, lm, subsets: dict, means=None):
    """A dataset directory as stage b leaves it (graph files, frequency CSV) plus perturbation subsets."""
    cfg = lm.model.config
    n = cfg.n_layer * cfg.d_mlp
    formats.write_graph_files(d, lm.name, cfg.n_layer, cfg.d_mlp, write_el=False)
    ids = np.arange(n)
    means = np.linspace(-0.1, 0.9, n) if means is None else means
    pd.DataFrame({"neuron_id": ids, "activation_count": 1, "activation_frequency": 0.5, "layer": ids // cfg.d_mlp,
                  "dimension": ids % cfg.d_mlp, "mean_activation": means},
                 columns=layout.FREQUENCY_COLUMNS).to_csv(layout.path(d, layout.FREQUENCY, lm.name), index=False)
    (d / layout.SUBSETS_DIR).mkdir(parents=True, exist_ok=True)
    for name, arr in subsets.items():
        np.save(d / layout.SUBSETS_DIR / name, arr)
    return d


def run_e(lm_path, dataset, csv, names, *extra):
    import e_generate_perturbed_results as e

    try:
        e.main(["--dataset_path", str(dataset), "--input_csv", str(csv), "--model_type", str(lm_path), "--device", "cpu",
                "--perturbation_subset_filenames", *names, *extra])
    finally:
        atomic.release_locks()  # as the script's run_main does when it ends
    return dataset / layout.RESULTS_DIR


@pytest.fixture(scope="session")
def subject(random_ckpt):
    """(checkpoint dir, LoadedModel): the shipped model when it has been trained, else the random checkpoint."""
    from gelutrace.model.loading import load_model

    if (SHIPPED_PATH / "model.safetensors").is_file():
        return SHIPPED_PATH, load_model(SHIPPED_NAME, device="cpu")
    return random_ckpt, load_model(str(random_ckpt), device="cpu")


def subset_for(model):
    """Every 7th neuron of the first, middle and last layers, and the last neuron of the last: enough to
    change the generated text, with unequal counts per layer (and untouched layers when there are > 3)."""
    d, L = model.config.d_mlp, model.config.n_layer
    return np.unique(np.concatenate([layer * d + np.arange(0, d, 7) for layer in (0, L // 2, L - 1)] + [[L * d - 1]]))


# --- the hook against an independent reference --------------------------------------------------------------

def zeroed_copy(model, ids, means=None):
    """A copy whose c_proj ignores input j of the neurons' layers (and adds mean_j * column j to the bias)."""
    ref = copy.deepcopy(model)
    d = model.config.d_mlp
    with torch.no_grad():
        for i in ids:
            proj = ref.transformer.h[int(i) // d].mlp.c_proj
            col = proj.weight[:, int(i) % d].clone()
            if means is not None:
                proj.bias += col * float(means[i])
            proj.weight[:, int(i) % d] = 0
    return ref


def cached_logits(model, idx, prefill):
    """Logits of every position of idx, computed as a prefill of `prefill` positions then one per step."""
    cache = KVCache(model.config, idx.size(0), idx.size(1), idx.device, torch.float32)
    out = [model(idx[:, :prefill], cache=cache)[0]]
    for t in range(prefill, idx.size(1)):
        out.append(model(idx[:, t:t + 1], cache=cache)[0])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_hook_equals_model_with_c_proj_columns_removed(random_model, mode):
    model = random_model
    ids = subset_for(model)
    means = np.random.default_rng(0).normal(size=model.config.n_layer * model.config.d_mlp)
    values = None if mode == "zero" else means[ids]
    ref = zeroed_copy(model, ids, None if mode == "zero" else means)
    idx = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, _ = model(idx)
        expect, _ = ref(idx)
        with hooks.Ablation(model, ids, values):
            ablated, _ = model(idx)
            ablated_cached = cached_logits(model, idx, prefill=12)
        ref_cached = cached_logits(ref, idx, prefill=12)
    assert (plain - expect).abs().max() > 1e-2  # the ablation changes something
    assert (ablated - expect).abs().max() <= 1e-4
    assert (ablated_cached - expect).abs().max() <= 1e-4
    assert (ablated_cached - ref_cached).abs().max() <= 1e-4
    with torch.no_grad():  # the hooks are gone afterwards
        assert torch.equal(model(idx)[0], plain)


def test_empty_subset_registers_no_hook(random_model):
    with hooks.Ablation(random_model, np.zeros(0, np.int64)) as a:
        assert a.handles == []


# --- generated text against plain greedy generation and transformers ---------------------------------------

@pytest.fixture(scope="module")
def greedy_run(subject, tmp_path_factory):
    path, lm = subject
    d = tmp_path_factory.mktemp("e_greedy")
    ids = subset_for(lm.model)
    make_dataset(d / "ds", lm, {"sub.npy": ids})
    out = run_e(path, d / "ds", write_prompt_csv(d / "p.csv"), ["sub.npy", "none"], "--random_controls", "2")
    return path, lm, ids, out


def test_none_text_equals_plain_greedy_generation(greedy_run):
    _, lm, _, out = greedy_run
    df = pd.read_csv(out / "none.csv", keep_default_na=False)
    assert list(df.columns) == layout.RESULT_COLUMNS
    assert df["prompt"].tolist() == [p for p in PROMPTS for _ in range(2)]
    assert df["sample_index"].tolist() == [0, 1] * len(PROMPTS)
    assert set(df["perturbation_subset"]) == {"none"}
    for i, p in enumerate(PROMPTS):
        idx = torch.tensor([lm.tokenizer(p)["input_ids"]])
        with torch.no_grad():
            new = lm.model.generate(idx, NEW, temperature=0.0)[0, idx.size(1):].tolist()
        assert df["generated_text"].tolist()[2 * i:2 * i + 2] == [lm.tokenizer.decode(new)] * 2, p


def hf_ablated(hf, ids, d):
    """Forward hooks on transformers' mlp.act that zero neurons `ids`: the handles."""
    handles = []
    for layer in np.unique(ids // d):
        dims = torch.as_tensor(ids[ids // d == layer] % d)

        def hook(module, inputs, output, dims=dims):
            output = output.clone()
            output[..., dims] = 0
            return output
        handles.append(hf.transformer.h[int(layer)].mlp.act.register_forward_hook(hook))
    return handles


def test_subset_text_equals_transformers_with_act_hook(greedy_run):
    path, lm, ids, out = greedy_run
    hf = load_hf(path)
    handles = hf_ablated(hf, ids, lm.model.config.d_mlp)
    df = pd.read_csv(out / "sub.csv", keep_default_na=False)
    assert set(df["perturbation_subset"]) == {"sub.npy"}
    base = pd.read_csv(out / "none.csv", keep_default_na=False)
    try:
        for i, p in enumerate(PROMPTS):
            idx = torch.tensor([lm.tokenizer(p)["input_ids"]])
            ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, idx.size(1):].tolist()
            assert df["generated_text"][2 * i] == lm.tokenizer.decode(ref), p
    finally:
        for h in handles:
            h.remove()
    assert not df["generated_text"].equals(base["generated_text"])  # the ablation changed some text


def test_summary_and_per_sample_files(greedy_run):
    _, lm, ids, out = greedy_run
    cfg = lm.model.config
    s = pd.read_csv(out / layout.PERTURBATION_SUMMARY)
    assert s["subset"].tolist() == ["sub.npy", "none"]
    assert s["k"].tolist() == [len(ids), 0]
    counts = [s.loc[0, f"layer_{i}_count"] for i in range(cfg.n_layer)]
    assert counts == np.bincount(ids // cfg.d_mlp, minlength=cfg.n_layer).tolist()
    none = s.iloc[1]
    assert none["kl"] == 0 and none["delta_nll"] == 0 and none["token_agreement"] == 1
    assert none["first_diff_position"] == NEW  # no differing token counts as the continuation's length
    row = s.iloc[0]
    assert row["random_controls"] == 2 and row["kl_ci_low"] <= row["kl"] <= row["kl_ci_high"]
    per = pd.read_csv(out / layout.PER_SAMPLE_DIR / "sub.csv")
    assert len(per) == 2 * len(PROMPTS)
    # the summary's mean is over samples: both repeats of a greedy prompt carry the same values
    np.testing.assert_array_equal(per["kl"].to_numpy()[::2], per["kl"].to_numpy()[1::2])
    for m in pt.METRICS:
        assert math.isclose(per[m].to_numpy().sum() / len(per), row[m], rel_tol=1e-9, abs_tol=1e-12)


def test_summary_plot_draws_the_summary(greedy_run):
    from gelutrace.files.plots import plot_perturbation_summary

    _, _, _, out = greedy_run
    s = pd.read_csv(out / layout.PERTURBATION_SUMMARY)
    fig = plot_perturbation_summary(s, out / "check.png")
    kl_ax = fig.axes[0]
    bars = [b for b in kl_ax.patches]
    heights = [b.get_height() for b in bars]
    np.testing.assert_allclose(heights[:len(s)], s["kl"])  # the subsets' bars
    np.testing.assert_allclose(heights[len(s):2 * len(s)], s["kl_random_mean"])  # their controls
    assert "nats/token" in kl_ax.get_title() and "nats/token" in fig.axes[1].get_title()
    # the CI whiskers span the bootstrap CI of each subset
    segs = [c for c in kl_ax.collections if hasattr(c, "get_segments")][0].get_segments()
    np.testing.assert_allclose([seg[:, 1].tolist() for seg in segs],
                               np.c_[s["kl_ci_low"], s["kl_ci_high"]], atol=1e-12)


def test_summary_plot_of_many_subsets_runs_across_and_skips_metrics_not_measured(tmp_path):
    """Beyond MANY_SUBSETS subsets a row per subset (bar widths = the values); a metric that is NaN throughout
    (the own continuation, skipped with --own_continuation 0) gets no panel, the real text's come first."""
    from gelutrace.files.plots import MANY_SUBSETS, plot_perturbation_summary

    n = MANY_SUBSETS + 6
    rng = np.random.default_rng(0)
    s = pd.DataFrame({"subset": [f"s{i}.npy" for i in range(n)], "kl": np.nan, "delta_nll": np.nan,
                      "text_delta_nll": rng.random(n), "text_kl": rng.random(n), "token_agreement": rng.random(n),
                      "first_diff_position": rng.integers(0, 20, n).astype(float)})
    fig = plot_perturbation_summary(s, tmp_path / "many.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 4 and titles[0].startswith("Δ NLL on the real text") and "KL(baseline" not in " ".join(titles)
    np.testing.assert_allclose([b.get_width() for b in fig.axes[0].patches], s["text_delta_nll"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == s["subset"].tolist()


def hf_condition_metrics(hf, tokenizer, ids, d):
    """Per prompt, by hand through transformers: (kl, delta_nll, token agreement, first difference) of zeroing
    `ids`, teacher-forced along the unablated greedy continuation, and free-running for the tokens."""
    out = []
    for p in PROMPTS:
        idx = torch.tensor([tokenizer(p)["input_ids"]])
        kw = dict(attention_mask=torch.ones_like(idx), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            base = hf.generate(idx, **kw)[0, idx.size(1):]
            seq = torch.cat([idx[0], base[:-1]])[None]
            lp = torch.log_softmax(hf(seq).logits[0, -NEW:].double(), -1)
            handles = hf_ablated(hf, ids, d)
            try:
                pert = hf.generate(idx, **kw)[0, idx.size(1):]
                lq = torch.log_softmax(hf(seq).logits[0, -NEW:].double(), -1)
            finally:
                for h in handles:
                    h.remove()
        kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
        dnll = float((lp - lq)[torch.arange(NEW), base].mean())
        same = (base == pert).numpy()
        first = int(np.flatnonzero(~same)[0]) if (~same).any() else NEW
        out.append((kl, dnll, float(same.mean()), first))
    return np.array(out)


def test_metrics_and_random_controls_against_transformers(greedy_run):
    """Per-sample metrics of the subset, and the null of its random controls, recomputed by hand."""
    path, lm, ids, out = greedy_run
    hf = load_hf(path)
    cfg = lm.model.config
    per = pd.read_csv(out / layout.PER_SAMPLE_DIR / "sub.csv")
    ref = hf_condition_metrics(hf, lm.tokenizer, ids, cfg.d_mlp)
    got = per[["kl", "delta_nll", "token_agreement", "first_diff_position"]].to_numpy()[::2]  # repeat 0 of each
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-5)
    controls = [hf_condition_metrics(hf, lm.tokenizer, pt.random_control(ids, cfg.n_layer, cfg.d_mlp, 1337, j),
                                     cfg.d_mlp).mean(axis=0) for j in range(2)]
    row = pd.read_csv(out / layout.PERTURBATION_SUMMARY).iloc[0]
    for k, name in enumerate(("kl", "delta_nll")):
        vals = np.array([c[k] for c in controls])
        assert row[f"{name}_random_mean"] == pytest.approx(vals.mean(), rel=1e-3, abs=1e-6), name
        assert row[f"{name}_random_std"] == pytest.approx(vals.std(ddof=1), rel=1e-2, abs=1e-6), name
        assert row[f"{name}_p_random"] == (1 + (vals >= row[name]).sum()) / 3, name


# --- metrics by hand ----------------------------------------------------------------------------------------

def test_kl_and_delta_nll_equal_a_hand_computation():
    base_p = [[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]
    pert_p = [[0.25, 0.5, 0.25], [0.2, 0.2, 0.6]]
    tokens = [1, 2]
    kl = [sum(p * math.log(p / q) for p, q in zip(bp, qp)) for bp, qp in zip(base_p, pert_p)]
    dnll = [-math.log(qp[t]) + math.log(bp[t]) for bp, qp, t in zip(base_p, pert_p, tokens)]
    # two rows, right-aligned: row 0 has both positions, row 1 only the last (its first entry is padding)
    base = torch.tensor([base_p, [[1 / 3] * 3, base_p[1]]]).log()
    pert = torch.tensor([pert_p, [[0.9, 0.05, 0.05], pert_p[1]]]).log()
    got_kl, got_dnll = metrics.compare_logprobs(base, pert, [np.array(tokens), np.array([2])])
    assert got_kl[0] == pytest.approx(sum(kl) / 2, rel=1e-6)
    assert got_dnll[0] == pytest.approx(sum(dnll) / 2, rel=1e-6)
    assert got_kl[1] == pytest.approx(kl[1], rel=1e-6)
    assert got_dnll[1] == pytest.approx(dnll[1], rel=1e-6)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_batched_masks_equal_one_ablation_per_pass(random_model, mode):
    """Many ablations in one batch, a mask per block of rows, against one hooked pass per ablation."""
    model = random_model
    cfg = model.config
    prompts = [[5, 6, 7, 8], [9, 10], [3, 4, 5]]
    conts = [np.array([11, 12, 13]), np.array([14, 15, 16, 17, 18]), np.array([7])]
    rng = np.random.default_rng(0)
    n = cfg.n_layer * cfg.d_mlp
    values = rng.normal(size=n) if mode == "mean" else None
    groups = [np.sort(rng.choice(n, size, replace=False)) for size in (1, 5, 40, 12)]
    groups.append(np.arange(cfg.d_mlp, 2 * cfg.d_mlp))  # a whole layer
    with hooks.RowAblation(model, groups, len(prompts), values):
        batched = metrics.continuation_logprobs(model, prompts * len(groups), conts * len(groups))
    batched = batched.view(len(groups), len(prompts), *batched.shape[1:])
    base = metrics.continuation_logprobs(model, prompts, conts)
    for g, ids in enumerate(groups):
        with hooks.Ablation(model, ids, None if values is None else values[ids]):
            alone = metrics.continuation_logprobs(model, prompts, conts)
        want = metrics.compare_logprobs(base, alone, conts)
        got = metrics.compare_logprobs(base, batched[g], conts)
        for w, x in zip(want, got):
            np.testing.assert_allclose(x, w, rtol=1e-6, atol=1e-6)
        assert np.all(want[0] > 0)
    # teacher_forced packs the same conditions into as few passes as its batch size allows
    rows = metrics.Rows(np.arange(3), np.array([len(c) for c in conts]), [(0, i) for i in range(3)])
    conditions = [pt.Condition(ids, generate=False) for ids in groups] + [pt.Condition(np.zeros(0, np.int64))]
    passes = []
    pt.teacher_forced(model, rows, prompts, conts, conditions, values, batch_size=6,
                      progress=lambda kind, k: passes.append(k))
    assert passes == [2, 2, 1]  # 6 rows a pass: two ablations of 3 rows each
    for c, ids in zip(conditions, groups):
        with hooks.Ablation(model, ids, None if values is None else values[ids]):
            alone = metrics.continuation_logprobs(model, prompts, conts)
        np.testing.assert_allclose(c.kl, metrics.compare_logprobs(base, alone, conts)[0], rtol=1e-6, atol=1e-7)
    assert conditions[-1].kl.tolist() == [0.0] * 3


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_ablations_generated_together_equal_each_generated_alone(random_model, temperature, monkeypatch):
    """generate_groups (a block of a batch's rows per ablation, mean values included) gives each ablation the
    tokens generate_rows gives it under its own hook, greedy and sampled (a generator per row), across groups."""
    from gelutrace.model.generation import Prompt, encode_prompts, plan_batches

    model = random_model
    n = model.config.n_layer * model.config.d_mlp
    rng = np.random.default_rng(4)
    values = rng.normal(size=n)
    prompts = [Prompt(t, 6, 2) for t in ("a b c", "d e", "f g h i")]
    ids = [[5, 6, 7], [9, 10], [3, 4, 5, 6]]
    batches = plan_batches(prompts, ids, temperature == 0, 64, model.config.block_size)
    rows = metrics.plan_rows(batches, prompts)
    groups = [np.sort(rng.choice(n, size, replace=False)) for size in (1, 7, 30, 3, 12)]
    monkeypatch.setattr(metrics, "GENERATION_GROUP", 2)  # three groups of ablations: 2, 2 and 1
    together = metrics.generate_groups(model, batches, rows, ids, temperature, None, 11, groups, values)
    changed = 0
    for g, got in zip(groups, together):
        with hooks.Ablation(model, g, values[g]):
            alone = metrics.generate_rows(model, batches, rows, ids, temperature, None, 11)
        assert [a.tolist() for a in got] == [a.tolist() for a in alone]
        base = metrics.generate_rows(model, batches, rows, ids, temperature, None, 11)
        changed += sum(a.tolist() != b.tolist() for a, b in zip(alone, base))
    assert changed  # the ablations do change some continuations: the comparison can fail


def test_teacher_forced_logprobs_line_up_with_single_sequences(random_model):
    model = random_model
    prompts = [[5, 6, 7, 8], [9, 10]]
    conts = [np.array([11, 12, 13]), np.array([14, 15, 16, 17, 18])]
    lp = metrics.continuation_logprobs(model, prompts, conts)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        with torch.no_grad():
            logits, _ = model(torch.tensor([p + c.tolist()]))
        ref = torch.log_softmax(logits[0, len(p) - 1:len(p) - 1 + len(c)], -1)
        assert (lp[i, lp.size(1) - len(c):] - ref).abs().max() <= 1e-4


def test_agreement_and_first_difference():
    assert metrics.agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 3, 4])) == (1.0, 4)
    assert metrics.agreement(np.array([1, 2, 3, 4]), np.array([1, 9, 3, 9])) == (0.5, 1)


def test_random_controls_keep_the_layer_composition():
    ids = np.array([0, 1, 2, 300, 700, 701], np.int64)
    a = pt.random_control(ids, 3, 256, seed=1, index=0)
    assert np.array_equal(pt.layer_counts(a, 3, 256), pt.layer_counts(ids, 3, 256))
    assert len(np.unique(a)) == len(ids)
    assert np.array_equal(a, pt.random_control(ids, 3, 256, seed=1, index=0))
    assert not np.array_equal(a, pt.random_control(ids, 3, 256, seed=1, index=1))
    assert not np.array_equal(a, pt.random_control(ids, 3, 256, seed=2, index=0))


def test_controls_of_a_subset_without_layer_0_have_no_layer_0_neuron():
    """Stage d --exclude_layers 0 gives subsets without layer-0 neurons; their layer-matched controls then draw
    none there either (counted by hand per layer)."""
    ids = np.array([256, 300, 301, 600, 700, 767], np.int64)  # layers 1 and 2 of 3 x 256
    for index in range(50):
        c = pt.random_control(ids, 3, 256, seed=5, index=index)
        assert (c >= 256).all() and [int(((c >= 256 * a) & (c < 256 * (a + 1))).sum()) for a in range(3)] == [0, 3, 3]


def test_subsets_without_layers_are_compared_apart(random_loaded, random_ckpt, tmp_path):
    """Subsets with exclude_layers in their sidecar are left out of comparison.csv and form their own
    comparison_excluded.csv, method_verdict_excluded.csv and dose_response_excluded.csv (+ plot), their figures
    those of summary.csv; with --control_subsets best only the main comparison's winner gets controls, never a
    subset ranked without layers (which would otherwise take the full winner's place when it scores higher)."""
    import json

    lm = random_loaded
    d_mlp = lm.model.config.d_mlp
    full = {"g_influence_k6.npy": ids_of([(0, 1), (0, 5), (0, 9), (1, 2), (2, 3), (2, 8)], d_mlp),
            "g_activation_count_k6.npy": ids_of([(0, 2), (0, 3), (1, 4), (1, 6), (2, 1), (2, 9)], d_mlp)}
    without = {"g_influence_x0_k6.npy": ids_of([(1, 2), (1, 3), (1, 7), (2, 3), (2, 8), (2, 11)], d_mlp),
               "g_activation_count_x0_k6.npy": ids_of([(1, 4), (1, 6), (1, 9), (2, 1), (2, 9), (2, 12)], d_mlp)}
    d = make_dataset(tmp_path / "ds", lm, {**full, **without})
    for name in [*full, *without]:
        info = {"method": name[2:].split("_k")[0].replace("_x0", ""), "model": lm.name, "zero_score_picks": 0}
        atomic.write_json({**info, **({"exclude_layers": [0]} if "_x0" in name else {})},
                          d / layout.SUBSETS_DIR / name.replace(".npy", ".json"))
    out = run_e(random_ckpt, d, write_prompt_csv(tmp_path / "p.csv", samples=1), [*full, *without, "none"],
                "--random_controls", "3", "--control_subsets", "best")
    summary = pd.read_csv(out / layout.PERTURBATION_SUMMARY).set_index("subset")
    main, apart = pd.read_csv(out / layout.COMPARISON), pd.read_csv(out / layout.COMPARISON_EXCLUDED)
    assert sorted(main["subset"] + ".npy") == sorted(full) and sorted(apart["subset"] + ".npy") == sorted(without)
    for _, row in apart.iterrows():  # three prompts: no split, every prompt scores
        assert row["delta_nll"] == pytest.approx(summary.loc[row["subset"] + ".npy", "delta_nll"], rel=1e-5, abs=1e-7)
    verdict = pd.read_csv(out / layout.METHOD_VERDICT_EXCLUDED)
    first = max(without, key=lambda n: summary.loc[n, "delta_nll"])
    assert verdict["winner"].tolist() == [first[2:].split("_x0")[0]]
    assert summary.loc[max(full, key=lambda n: summary.loc[n, "delta_nll"]), "random_controls"] == 3
    assert (summary.loc[list(without), "random_controls"] == 0).all()
    assert (summary.loc[[n for n in full if n != max(full, key=lambda n: summary.loc[n, "delta_nll"])],
                        "random_controls"] == 0).all()
    dose = pd.read_csv(out / layout.DOSE_RESPONSE_EXCLUDED)
    assert sorted(dose["subset"] + ".npy") == sorted(without) and dose["winner"].sum() == 1
    assert (out / layout.DOSE_RESPONSE_EXCLUDED_PLOT).is_file()
    assert json.loads((out / layout.COMPARISON_RECORD).read_text())["exclude_layers"] == [0]
    assert sorted(pd.read_csv(out / layout.DOSE_RESPONSE)["subset"] + ".npy") == sorted(full)


# --- mean ablation, reproducibility, bad input ---------------------------------------------------------------

def test_mean_ablation_uses_mean_activation(subject, tmp_path):
    path, lm = subject
    cfg = lm.model.config
    n = cfg.n_layer * cfg.d_mlp
    ids = subset_for(lm.model)
    means = np.random.default_rng(3).normal(0, 2, n)
    make_dataset(tmp_path / "ds", lm, {"sub.npy": ids}, means=means)
    out = run_e(path, tmp_path / "ds", write_prompt_csv(tmp_path / "p.csv", samples=1), ["sub.npy"],
                "--ablation", "mean")
    df = pd.read_csv(out / "sub.csv", keep_default_na=False)
    ref = zeroed_copy(lm.model, ids, means)
    for i, p in enumerate(PROMPTS):
        idx = torch.tensor([lm.tokenizer(p)["input_ids"]])
        with torch.no_grad():
            new = ref.generate(idx, NEW, temperature=0.0)[0, idx.size(1):].tolist()
        assert df["generated_text"][i] == lm.tokenizer.decode(new), p
    assert pd.read_csv(out / layout.PERTURBATION_SUMMARY)["ablation"].tolist() == ["mean"]


def test_same_seed_gives_byte_identical_csvs(random_loaded, random_ckpt, tmp_path):
    ids = subset_for(random_loaded.model)
    csv = write_prompt_csv(tmp_path / "p.csv", samples=3)
    runs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        make_dataset(tmp_path / name, random_loaded, {"sub.npy": ids})
        runs.append(run_e(random_ckpt, tmp_path / name, csv, ["sub.npy", "none"], "--temperature", "1.0",
                          "--top_k", "50", "--seed", str(seed), "--random_controls", "2", "--batch_size", "4"))
    for f in ("sub.csv", "none.csv", layout.PERTURBATION_SUMMARY, "per_sample/sub.csv"):
        assert (runs[0] / f).read_bytes() == (runs[1] / f).read_bytes(), f
    texts = pd.read_csv(runs[0] / "none.csv", keep_default_na=False)["generated_text"]
    assert texts.nunique() > len(PROMPTS)  # sampled repeats differ
    assert (runs[0] / "none.csv").read_bytes() != (runs[2] / "none.csv").read_bytes()


@pytest.mark.parametrize("case", ["missing", "2d", "float", "out_of_range", "negative", "pickled", "npz",
                                  "bad_csv", "other_model_meta", "other_model_files", "duplicate_stem",
                                  "mean_without_column"])
def test_bad_input_raises_before_writing(random_loaded, random_ckpt, tmp_path, case):
    lm = random_loaded
    n = lm.model.config.n_layer * lm.model.config.d_mlp
    d = make_dataset(tmp_path / "ds", lm, {"ok.npy": np.array([1, 2])})
    sub = d / layout.SUBSETS_DIR
    csv = write_prompt_csv(tmp_path / "p.csv")
    names, extra = ["ok.npy", "bad.npy", "none"], []
    if case == "missing":
        names = ["ok.npy", "nothere.npy"]
    elif case == "2d":
        np.save(sub / "bad.npy", np.zeros((2, 2), np.int64))
    elif case == "float":
        np.save(sub / "bad.npy", np.array([1.0, 2.0]))
    elif case == "out_of_range":
        np.save(sub / "bad.npy", np.array([0, n]))
    elif case == "negative":
        np.save(sub / "bad.npy", np.array([-1]))
    elif case == "pickled":
        np.save(sub / "bad.npy", np.array([1, "x"], dtype=object), allow_pickle=True)
    elif case == "npz":
        np.savez(sub / "bad.npy", a=np.array([1]))
        (sub / "bad.npy.npz").rename(sub / "bad.npy")
    elif case == "bad_csv":
        names = ["ok.npy"]
        csv.write_text("prompt,new_tokens\nhello,3\n")
    elif case == "other_model_meta":
        meta = formats.read_graph_meta(d, lm.name)
        atomic.write_json(dict(meta, n_layer=meta["n_layer"] + 1), layout.path(d, layout.GRAPH_META, lm.name))
        names = ["none"]
    elif case == "other_model_files":
        for t in (layout.GRAPH_META, layout.ATTRIBUTES):
            layout.path(d, t, lm.name).rename(layout.path(d, t, "gpt2"))
        names = ["none"]
    elif case == "duplicate_stem":
        names = ["ok.npy", "ok.npy"]
    elif case == "mean_without_column":
        names, extra = ["ok.npy"], ["--ablation", "mean"]
        freq = layout.path(d, layout.FREQUENCY, lm.name)
        pd.read_csv(freq).drop(columns="mean_activation").to_csv(freq, index=False)
    with pytest.raises(PipelineError):
        run_e(random_ckpt, d, csv, names, *extra)
    assert not (d / layout.RESULTS_DIR).exists()


def test_script_end_to_end_and_exit_status(random_loaded, random_ckpt, tmp_path):
    """As a subprocess: a good run writes every file; a bad subset exits 2 with one error line and no CSV."""
    ids = subset_for(random_loaded.model)
    good = make_dataset(tmp_path / "good", random_loaded, {"sub.npy": ids})
    csv = write_prompt_csv(tmp_path / "p.csv", samples=1)
    cmd = [sys.executable, str(SCRIPT), "--input_csv", str(csv), "--model_type", str(random_ckpt), "--device", "cpu"]
    r = run_python(cmd + ["--dataset_path", str(good), "--perturbation_subset_filenames", "sub.npy", "none",
                              "--random_controls", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = good / layout.RESULTS_DIR
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "manifest.json", "none.csv", "per_sample",
                                                     "sub.csv", "summary.csv", "summary.png"]
    assert list(pd.read_csv(out / "sub.csv").columns) == layout.RESULT_COLUMNS

    bad = make_dataset(tmp_path / "bad", random_loaded, {"sub.npy": np.array([[1, 2]])})
    r = run_python(cmd + ["--dataset_path", str(bad), "--perturbation_subset_filenames", "sub.npy", "none"],
                   capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "1-D" in errors[0]
    assert not (bad / layout.RESULTS_DIR).exists()


def test_batch_script_runs_every_subset_plus_none(random_loaded, random_ckpt, tmp_path):
    d = make_dataset(tmp_path / "ds", random_loaded, {"a.npy": np.array([1]), "b c.npy": np.array([2, 300])})
    csv = write_prompt_csv(tmp_path / "p.csv", new=3, samples=1)
    r = subprocess.run(["bash", str(REPO_ROOT / "e_batch_generate_perturbed_results.sh"), str(d), str(csv),
                        str(random_ckpt), "--device", "cpu"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    s = pd.read_csv(d / layout.RESULTS_DIR / layout.PERTURBATION_SUMMARY)
    assert s["subset"].tolist() == ["a.npy", "b c.npy", "none"]


def test_nested_split_scores_on_the_test_prompts_alone(subject, tmp_path):
    """comparison.csv's figures are those of stage e run on the test prompts alone; the validation and test
    prompts are disjoint and make up the evaluation set."""
    import json

    path, lm = subject
    words = "thou art the king and I am the fool of this world upon my word".split()
    prompts = [" ".join(words[i:i + 4]) + " " for i in range(12)]
    ids = subset_for(lm.model)
    d = make_dataset(tmp_path / "ds", lm, {"g_degree_t0.5_r0.1.npy": ids[::2], "g_degree_t0.8_r0.1.npy": ids[1::2]})
    for name, t in (("g_degree_t0.5_r0.1", 0.5), ("g_degree_t0.8_r0.1", 0.8)):
        atomic.write_json({"method": "degree", "threshold": t, "model": lm.name, "zero_score_picks": 0},
                      d / layout.SUBSETS_DIR / f"{name}.json")
    every = write_prompt_csv(tmp_path / "every.csv", prompts, new=5, samples=1)
    out = run_e(path, d, every, ["g_degree_t0.5_r0.1.npy", "g_degree_t0.8_r0.1.npy", "none"], "--random_controls", "3")
    rec = json.loads((out / layout.COMPARISON_RECORD).read_text())
    val, test = rec["validation_prompts"], rec["test_prompts"]
    assert rec["nested"] and not set(val) & set(test) and sorted(val + test) == list(range(12))
    assert rec["test_prompt_texts"] == [prompts[i] for i in test]
    comparison = pd.read_csv(out / layout.COMPARISON).set_index("subset")
    per = {s: pd.read_csv(out / layout.PER_SAMPLE_DIR / f"{s}.csv") for s in comparison.index}
    for s, df in per.items():  # validation figure: the mean over the validation prompts' samples
        assert comparison.loc[s, "delta_nll_validation"] == pytest.approx(df.loc[df["prompt_index"].isin(val),
                                                                                 "delta_nll"].mean(), rel=1e-9)
    alone = write_prompt_csv(tmp_path / "test.csv", [prompts[i] for i in test], new=5, samples=1)
    d2 = make_dataset(tmp_path / "ds2", lm, {"g_degree_t0.5_r0.1.npy": ids[::2], "g_degree_t0.8_r0.1.npy": ids[1::2]})
    summary = pd.read_csv(run_e(path, d2, alone, ["g_degree_t0.5_r0.1.npy", "g_degree_t0.8_r0.1.npy", "none"],
                                "--random_controls", "3") / layout.PERTURBATION_SUMMARY).set_index("subset")
    for s in comparison.index:
        for m in ("delta_nll", "kl", "delta_nll_random_mean", "delta_nll_p_random"):
            assert comparison.loc[s, m] == pytest.approx(summary.loc[f"{s}.npy", m], rel=1e-5, abs=1e-7), (s, m)


# --- the mean-ablation check -------------------------------------------------------------------------------------
def test_the_mean_ablation_check_measures_each_ks_best_methods_as_ablation_mean_does(random_loaded, random_ckpt,
                                                                                    tmp_path):
    """--mean_ablation_top 1: each k's best method on the validation part, measured again with the dataset's
    mean_activation in place of 0, equals the same subset measured by the main path's --ablation mean (the same
    text, split and seed); the first at each k gets its own controls; the order table and the report section
    follow from the numbers."""
    from conftest import HELDOUT_PATH
    from gelutrace.report import verdict

    lm = random_loaded
    d_mlp, n = lm.model.config.d_mlp, lm.model.config.n_layer * lm.model.config.d_mlp
    names = {"g_influence_k4.npy": ids_of([(0, 1), (0, 5), (1, 2), (2, 3)], d_mlp),
             "g_activation_count_k4.npy": ids_of([(0, 2), (1, 4), (1, 6), (2, 9)], d_mlp),
             "g_influence_k8.npy": ids_of([(0, 1), (0, 5), (0, 9), (1, 2), (1, 3), (2, 3), (2, 8), (2, 11)], d_mlp),
             "g_activation_count_k8.npy": ids_of([(0, 2), (0, 3), (1, 4), (1, 6), (1, 9), (2, 1), (2, 9), (2, 12)],
                                                 d_mlp)}
    means = np.random.default_rng(5).normal(0, 1, n)
    text = ["--eval_text", str(HELDOUT_PATH), "--eval_tokens", "600", "--context", "64"]
    runs = {}
    for mode, extra in (("zero", ["--mean_ablation_top", "1", "--random_controls", "4"]),
                        ("mean", ["--ablation", "mean"])):
        d = make_dataset(tmp_path / mode, lm, names, means=means)
        for name in names:
            atomic.write_json({"method": name[2:].split("_k")[0], "model": lm.name, "zero_score_picks": 0},
                              d / layout.SUBSETS_DIR / name.replace(".npy", ".json"))
        runs[mode] = run_e(random_ckpt, d, write_prompt_csv(tmp_path / f"{mode}.csv", samples=1), [*names, "none"],
                           *text, *extra)
    zero, mean = (pd.read_csv(runs[m] / layout.COMPARISON).set_index("subset") for m in ("zero", "mean"))
    check = pd.read_csv(runs["zero"] / layout.MEAN_CHECK)
    again = pd.read_csv(runs["zero"] / layout.MEAN_COMPARISON).set_index("subset")
    assert list(check.columns) == layout.MEAN_CHECK_COLUMNS and check["k"].tolist() == [4, 8]
    assert (check["methods"] == 1).all() and check["order_holds"].all()  # one method: its order always holds
    for k in (4, 8):  # the chosen one: the larger ΔNLL of the two on the validation part, under zero ablation
        both = zero[zero["k"] == k]
        assert len(again[again["k"] == k]) == 1
        chosen = again[again["k"] == k].index[0]
        assert chosen in both.index
        np.testing.assert_allclose(again.loc[chosen, "delta_nll"], mean.loc[chosen, "delta_nll"], rtol=1e-6)
        assert again.loc[chosen, "delta_nll_random_n"] == 4  # its own controls, mean-ablated
        assert float(check.loc[check["k"] == k, "mean_delta_nll"].iloc[0]) == pytest.approx(
            mean.loc[chosen, "delta_nll"], rel=1e-3)
    lines = verdict.mean_check_lines(check)
    assert lines == ["- Under mean ablation (each neuron replaced by its mean over the selection data, not 0), the "
                     "order of each k's 1 best methods holds at every k (4, 8)."]


def test_the_mean_check_sentences_name_where_the_order_changes():
    from gelutrace.report import verdict

    check = pd.DataFrame([{"k": 3, "methods": 2, "zero_order": "influence > ablation",
                           "mean_order": "influence > ablation", "order_holds": True},
                          {"k": 42, "methods": 2, "zero_order": "influence > ablation",
                           "mean_order": "ablation > influence", "order_holds": False, "mean_margin": 0.05,
                           "mean_margin_ci_low": -0.01, "mean_margin_ci_high": 0.12}], columns=layout.MEAN_CHECK_COLUMNS)
    lines = verdict.mean_check_lines(check)
    assert lines[0].endswith("the order of each k's 2 best methods holds at k = 3.")
    assert lines[1] == ("- At k = 42 it changes: zero ablation ranks influence > ablation, mean ablation ablation > "
                        "influence, difference 0.05 [-0.01, 0.12], not separable.")


def test_the_mean_check_needs_real_text(random_loaded, random_ckpt, tmp_path):
    lm = random_loaded
    d = make_dataset(tmp_path / "ds", lm, {"s.npy": ids_of([(0, 1)], lm.model.config.d_mlp)})
    with pytest.raises(PipelineError, match="--eval_text"):
        run_e(random_ckpt, d, write_prompt_csv(tmp_path / "p.csv", samples=1), ["s.npy"], "--mean_ablation_top", "2")
