"""
Stages a, b and b_trace against independent references: transformers' own GPT-2 with forward hooks on
`transformer.h[i].mlp.act` for the activations and tokens, brute-force text for the edge list, and
numpy recomputation for every count, frequency and list derived from the matrix.
"""

import json
import os
import pickle
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from gelutrace.files import formats, layout

from conftest import REPO_ROOT, SHIPPED_NAME, load_hf, run_python

PROMPTS = [("KING HENRY. Now, lords, ", 7, 3), ("And God said, \"Let there be\", ", 5, 2), ("Ünïcode, ", 4, 1)]


def write_prompts(path, rows=PROMPTS, header="prompts,number_of_new_tokens,num_samples"):
    df = pd.DataFrame(rows, columns=header.split(","))
    df.to_csv(path, index=False)
    return path


def run(script, *args, check=True, **env):
    r = run_python([sys.executable, str(REPO_ROOT / script), *map(str, args)], capture_output=True, text=True,
                   cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", **env))
    if check and r.returncode != 0:
        raise AssertionError(f"{script} failed:\n{r.stderr}")
    return r


def hf_reference(hf, tokenizer, prompt, n_new):
    """Greedy generation by transformers with hooks on mlp.act: (new ids, [post-GELU at last position per call])."""
    calls = []
    current = {}

    def hook(layer):
        def f(module, inputs, output):
            current[layer] = output[0, -1].detach().clone()
            if layer == len(hf.transformer.h) - 1:
                calls.append(torch.cat([current[i] for i in range(len(hf.transformer.h))]))
        return f

    handles = [blk.mlp.act.register_forward_hook(hook(i)) for i, blk in enumerate(hf.transformer.h)]
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    try:
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    finally:
        for h in handles:
            h.remove()
    return out[0, ids.size(1):].tolist(), torch.stack(calls).numpy()


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory, shipped_path):
    d = tmp_path_factory.mktemp("b_greedy")
    csv = write_prompts(d / "prompts.csv")
    run("b_generate_activation_dataset.py", "--input_csv", csv, "--export_dir", d / "out", "--model_type",
        SHIPPED_NAME, "--device", "cpu", "--batch_size", "2")
    return d / "out", csv


def test_activations_and_tokens_equal_transformers(greedy_run, shipped_path, shipped):
    out, _ = greedy_run
    hf = load_hf(shipped_path)
    matrix, ids = formats.read_activation_matrix(layout.path(out, layout.MATRIX, SHIPPED_NAME))
    ds = pd.read_csv(layout.path(out, layout.DATASET, SHIPPED_NAME), keep_default_na=False)
    assert list(ds.columns) == layout.dataset_columns(shipped.model.config.n_layer)
    assert (ids == np.arange(matrix.shape[1])).all()
    value_sum = np.zeros(matrix.shape[1])
    row = 0
    for text, n_new, repeats in PROMPTS:
        ref_ids, ref_values = hf_reference(hf, shipped.tokenizer, text, n_new)
        for r in range(repeats):  # greedy repeats are identical rows
            block = ds.iloc[row:row + n_new]
            assert block["output_id"].tolist() == ref_ids
            assert block["prompt_sample_idx"].tolist() == [r] * n_new
            assert block["token_position"].tolist() == list(range(n_new))
            assert (matrix[row:row + n_new] == (ref_values > 0)).all()
            assert block["input_text"].iloc[-1] == text + shipped.tokenizer.decode(ref_ids[:-1])
            assert block["input_text_ids"].iloc[0] == str(shipped.tokenizer(text)["input_ids"])
            value_sum += ref_values.sum(axis=0)
            row += n_new
    assert row == len(ds) == matrix.shape[0]
    assert (ds["sample_id"] == np.arange(row)).all()
    freq = pd.read_csv(layout.path(out, layout.FREQUENCY, SHIPPED_NAME))
    np.testing.assert_allclose(freq["mean_activation"], value_sum / row, rtol=1e-5, atol=1e-6)


def test_counts_lists_and_matrix_agree(greedy_run, shipped):
    out, _ = greedy_run
    m = SHIPPED_NAME
    cfg = shipped.model.config
    matrix, _ = formats.read_activation_matrix(layout.path(out, layout.MATRIX, m))
    sparse, _ = formats.read_activation_matrix(layout.path(out, layout.MATRIX, m), sparse=True)
    assert (sparse.toarray() == matrix).all()
    with np.load(layout.path(out, layout.MATRIX, m), allow_pickle=False) as z:  # stored at 1 bit per entry
        assert z["matrix"].dtype == np.uint8 and z["matrix"].size == matrix.shape[0] * ((matrix.shape[1] + 7) // 8)
    ds = pd.read_csv(layout.path(out, layout.DATASET, m), keep_default_na=False)
    per_layer = matrix.reshape(len(matrix), cfg.n_layer, cfg.d_mlp).sum(axis=2)
    for i in range(cfg.n_layer):
        assert (ds[f"layer_{i}_num_active_neurons"] == per_layer[:, i]).all()
    assert (ds["number_of_active_neurons"] == matrix.sum(axis=1)).all()
    freq = pd.read_csv(layout.path(out, layout.FREQUENCY, m))
    assert list(freq.columns) == layout.FREQUENCY_COLUMNS
    assert (freq["neuron_id"] == np.arange(matrix.shape[1])).all()
    assert (freq["activation_count"] == matrix.sum(axis=0)).all()
    np.testing.assert_allclose(freq["activation_frequency"], matrix.sum(axis=0) / len(matrix))
    assert (freq["layer"] == freq["neuron_id"] // cfg.d_mlp).all() and (freq["dimension"] == freq["neuron_id"] % cfg.d_mlp).all()
    expected = {str(i): np.flatnonzero(r).tolist() for i, r in enumerate(matrix)}
    assert json.loads(layout.path(out, layout.ACTIVATIONS_JSON, m).read_text()) == expected
    with open(layout.path(out, layout.ACTIVATIONS_PICKLE, m), "rb") as f:
        assert pickle.load(f) == expected  # the test reads the user-facing pickle; the pipeline never does
    assert not (out / f".{m}_partial").exists()


def test_graph_files_and_stage_a(tmp_path, greedy_run, shipped):
    cfg = shipped.model.config
    run("a_generate_gelu_graph.py", "--model_type", SHIPPED_NAME, "--output_dir", tmp_path)
    m = SHIPPED_NAME
    attrs = pd.read_csv(layout.path(tmp_path, layout.ATTRIBUTES, m))
    n = cfg.n_layer * cfg.d_mlp
    assert list(attrs.columns) == layout.ATTRIBUTE_COLUMNS
    assert (attrs["node_id"] == np.arange(n)).all()
    assert (attrs["node_id"] == attrs["layer"] * cfg.d_mlp + attrs["dimension"]).all()
    el = layout.path(tmp_path, layout.EDGES, m).read_bytes()
    d = cfg.d_mlp
    ref = "".join(f"{s} {t}\n" for i in range(cfg.n_layer - 1) for s in range(i * d, (i + 1) * d)
                  for t in range((i + 1) * d, (i + 2) * d)).encode()
    assert el == ref
    meta = formats.read_graph_meta(tmp_path, m)
    assert meta["layer_sizes"] == [d] * cfg.n_layer and meta["num_edges"] == (cfg.n_layer - 1) * d * d
    assert formats.edges_are_canonical(tmp_path, m, meta)
    assert formats.canonical_edges_size(cfg.n_layer, d) == len(el)
    out, _ = greedy_run  # stage b wrote the same graph files
    assert layout.path(out, layout.EDGES, m).read_bytes() == el
    assert layout.path(out, layout.ATTRIBUTES, m).read_bytes() == layout.path(tmp_path, layout.ATTRIBUTES, m).read_bytes()


@pytest.mark.parametrize("n_layer,d", [(2, 1), (3, 7), (4, 40)])
def test_edge_writer_brute_force(tmp_path, n_layer, d):
    target = tmp_path / "e.el"
    formats.write_edges(target, n_layer, d, rows_per_write=3)
    ref = "".join(f"{s} {t}\n" for i in range(n_layer - 1) for s in range(i * d, (i + 1) * d)
                  for t in range((i + 1) * d, (i + 2) * d)).encode()
    assert target.read_bytes() == ref and formats.canonical_edges_size(n_layer, d) == len(ref)


def hf_sampled_reference(hf, tokenizer, prompt, prompt_index, repeat, n_new, seed, temperature, top_k):
    """One sampled (prompt, repeat) by transformers with hooks on mlp.act, drawing from the same per-row
    generator stage b gives that repeat: (new ids, active sets at the predicting position of each token)."""
    from gelutrace.model.generation import row_generator
    from model import GPT

    g = row_generator(seed, prompt_index, repeat, "cpu")
    ids = tokenizer(prompt)["input_ids"]
    acts, new = [], []
    cur = {}
    handles = [blk.mlp.act.register_forward_hook(lambda m, i, o, layer=layer: cur.__setitem__(layer, o[0, -1] > 0))
               for layer, blk in enumerate(hf.transformer.h)]
    try:
        with torch.no_grad():
            for _ in range(n_new):
                logits = hf(torch.tensor([ids + new])).logits[:, -1, :].float()
                acts.append(torch.cat([cur[i] for i in range(len(hf.transformer.h))]).numpy())
                new.append(int(GPT.pick(logits, temperature, top_k, [g])[0, 0]))
    finally:
        for h in handles:
            h.remove()
    return new, np.array(acts)


def test_sampling_is_seeded_batch_independent_and_equals_transformers(tmp_path, shipped, shipped_hf):
    """Batch sizes 64, 2 (the 3-repeat prompt split across batches) and 1 give the same samples, each equal to
    transformers driven with that repeat's generator; another seed gives other samples."""
    csv = write_prompts(tmp_path / "p.csv")
    outs = {}
    for name, seed, batch in (("a", 7, 64), ("b", 7, 2), ("c", 7, 1), ("d", 8, 64)):
        run("b_generate_activation_dataset.py", "--input_csv", csv, "--export_dir", tmp_path / name, "--model_type",
            SHIPPED_NAME, "--temperature", "0.9", "--top_k", "50", "--seed", seed, "--batch_size", batch,
            "--no_edge_list", "--no_activation_lists", "--no_attribution", OMP_NUM_THREADS="1")
        ds = pd.read_csv(layout.path(tmp_path / name, layout.DATASET, SHIPPED_NAME), keep_default_na=False)
        outs[name] = (ds, formats.read_activation_matrix(layout.path(tmp_path / name, layout.MATRIX, SHIPPED_NAME))[0])
    ds, active = outs["a"]
    for other in ("b", "c"):
        pd.testing.assert_frame_equal(outs[other][0].drop(columns=[c for c in ds.columns if "num_active" in c]),
                                      ds.drop(columns=[c for c in ds.columns if "num_active" in c]))
        assert (outs[other][1] != active).mean() < 1e-4  # batch size may move a value across 0 by rounding
    assert not outs["d"][0]["output_id"].equals(ds["output_id"])
    row = 0
    for p, (text, n_new, n_rep) in enumerate(PROMPTS):
        conts = set()
        for r in range(n_rep):
            ref_ids, ref_active = hf_sampled_reference(shipped_hf, shipped.tokenizer, text, p, r, n_new, 7, 0.9, 50)
            part = ds.iloc[row:row + n_new]
            assert part["prompt_sample_idx"].tolist() == [r] * n_new  # the (prompt, repeat) -> rows mapping
            assert part["output_id"].tolist() == ref_ids
            assert (active[row:row + n_new] != ref_active).mean() < 1e-4
            conts.add(tuple(ref_ids))
            row += n_new
        if n_rep > 1:
            assert len(conts) > 1  # sampled repeats differ


def test_resume_after_interrupt_gives_the_uninterrupted_result(tmp_path, shipped_path, monkeypatch):
    import runpy

    from gelutrace.record import prompts as recording

    csv = write_prompts(tmp_path / "p.csv")
    common = ["--input_csv", str(csv), "--model_type", SHIPPED_NAME, "--device", "cpu", "--batch_size", "1",
              "--no_edge_list"]
    one_thread = {"OMP_NUM_THREADS": "1"}  # as this process (conftest): float sums then match to the bit
    run("b_generate_activation_dataset.py", *common, "--export_dir", tmp_path / "full", **one_thread)

    real = recording.record_batch
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(recording, "record_batch", interrupted)
    script = str(REPO_ROOT / "b_generate_activation_dataset.py")
    monkeypatch.setattr(sys, "argv", [script, *common, "--export_dir", str(tmp_path / "part")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code == 130
    assert not layout.path(tmp_path / "part", layout.DATASET, SHIPPED_NAME).exists()  # no torn or partial outputs
    state = json.loads((tmp_path / "part" / f".{SHIPPED_NAME}_partial" / "state.json").read_text())
    assert state["samples_done"] == 3 + 2  # the first two prompts (3 and 2 repeats) of batches of one row

    monkeypatch.setattr(recording, "record_batch", real)
    run("b_generate_activation_dataset.py", *common, "--export_dir", tmp_path / "part", "--resume", **one_thread)
    for f in (layout.DATASET, layout.MATRIX, layout.FREQUENCY, layout.ACTIVATIONS_JSON, layout.ACTIVATIONS_PICKLE):
        assert layout.path(tmp_path / "part", f, SHIPPED_NAME).read_bytes() == layout.path(tmp_path / "full", f, SHIPPED_NAME).read_bytes()


@pytest.mark.parametrize("rows,header,extra,message", [
    (None, None, [], "does not exist"),
    ([("a", 3)], "prompts,tokens", [], "lacks column"),
    ([("a", "x", 1)], None, [], "non-negative integer"),
    ([("a", -1, 1)], None, [], "non-negative"),
    ([("a", 2, 0)], None, [], "positive"),
    ([("a", 2.5, 1)], None, [], "integer"),
    ([("   ", 2, 1)], None, [], "empty prompt"),
    ([("a", 100000, 1)], None, [], "context window"),
    ([("a", 2, 1)], None, ["--model_type", "no-such-model"], "unknown --model_type"),
    ([("a", 2, 1)], None, ["--temperature", "-1"], "--temperature"),
])
def test_bad_input_one_error_line_and_outputs_untouched(tmp_path, greedy_run, rows, header, extra, message):
    out, _ = greedy_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    csv = tmp_path / "bad.csv"
    if rows is not None:
        write_prompts(csv, rows, header or "prompts,number_of_new_tokens,num_samples")
    args = ["--input_csv", csv, "--export_dir", out, "--model_type", SHIPPED_NAME, *extra]
    r = run("b_generate_activation_dataset.py", *args, check=False)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_trace_equals_transformers(tmp_path, shipped_path, shipped):
    text = "ROMEO. But soft, what light"
    r = run("b_trace_gelu_activations.py", "--model_type", SHIPPED_NAME, "--input_text", text, "--output_dir", tmp_path,
            "--max_num_new_tokens", "3")
    hf = load_hf(shipped_path)
    _, ref_values = hf_reference(hf, shipped.tokenizer, text, 1)
    ref = np.flatnonzero(ref_values[0] > 0)
    active = [int(x) for x in layout.path(tmp_path, layout.TRACE_ACTIVE, SHIPPED_NAME).read_text().split()]
    assert active == ref.tolist()
    with open(layout.path(tmp_path, layout.TRACE_VECTOR, SHIPPED_NAME), "rb") as f:
        vec = pickle.load(f)
    assert vec.shape == (shipped.model.config.n_layer * shipped.model.config.d_mlp,)
    assert np.flatnonzero(vec).tolist() == active
    assert layout.path(tmp_path, layout.TRACE_PLOT, SHIPPED_NAME).stat().st_size > 1000
    d = shipped.model.config.d_mlp
    assert f"layer  0: {int((ref_values[0][:d] > 0).sum()):6d} / {d}" in r.stdout


def test_unreachable_hub_model_is_one_clear_error_line(tmp_path):
    r = run("b_trace_gelu_activations.py", "--model_type", "gpt2", "--input_text", "hello", "--output_dir", tmp_path,
            check=False, HF_HOME=str(tmp_path / "empty_hf_home"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "not in the Hugging Face cache" in lines[0] and "--model_type tinybard" in lines[0]
    assert not any(tmp_path.glob("gpt2_*"))
