"""
gelutrace.report.cards and f_render_neuron_cards.py against independent references: transformers' GPT2LMHeadModel
with hooks on `mlp.act` over the dataset's sequences and a brute-force sort (top examples), a numpy
computation from the weights (direct logit effect), and Python's html.parser (the page).
"""

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

from gelutrace.files import atomic, formats, layout
from gelutrace.graph.counts import RunningTopK, merge_top
from gelutrace.report import cards, markdown

from conftest import REPO_ROOT, SHIPPED_NAME, run_python

# greedy: the 3 repeats of the first prompt are one sequence, kept under the first repeat's sample ids
PROMPTS = [("KING HENRY. Now, lords, ", 6, 3), ("And God said, \"Let there be\", ", 5, 1),
           ("To be, or not to be", 7, 1), ("Amen", 0, 2)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped_path):
    d = tmp_path_factory.mktemp("cards")
    csv = d / "prompts.csv"
    pd.DataFrame(PROMPTS, columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    r = run_python([sys.executable, str(REPO_ROOT / "b_generate_activation_dataset.py"), "--input_csv", str(csv),
                        "--export_dir", str(d / "ds"), "--model_type", SHIPPED_NAME, "--device", "cpu",
                        "--no_edge_list", "--no_activation_lists"], capture_output=True, text=True, cwd=REPO_ROOT,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    return d / "ds"


def reference_values(hf, data):
    """(sample ids, values samples x neurons) from transformers, over each distinct sequence's first occurrence."""
    df = pd.read_csv(layout.path(data, layout.DATASET, SHIPPED_NAME), keep_default_na=False)
    starts = list(np.flatnonzero(df["token_position"].to_numpy() == 0)) + [len(df)]
    seen, sids, vals = set(), [], []
    for lo, hi in zip(starts[:-1], starts[1:]):
        prompt = json.loads(df["input_text_ids"].iloc[lo])
        cont = df["output_id"].iloc[lo:hi].tolist()
        if (tuple(prompt), tuple(cont)) in seen:
            continue
        seen.add((tuple(prompt), tuple(cont)))
        acts = []
        hooks = [b.mlp.act.register_forward_hook(lambda m, i, o: acts.append(o[0])) for b in hf.transformer.h]
        try:
            with torch.no_grad():
                hf(torch.tensor([prompt + cont[:-1]]))
        finally:
            for h in hooks:
                h.remove()
        full = torch.cat(acts, dim=1).double().numpy()  # positions x neurons
        vals.append(full[len(prompt) - 1:])
        sids.append(df["sample_id"].iloc[lo:hi].to_numpy())
    return np.concatenate(sids), np.concatenate(vals)


def test_top_examples_equal_transformers_and_a_brute_force_sort(dataset, shipped, shipped_hf):
    model, cfg = shipped.model, shipped.model.config
    sids, ref = reference_values(shipped_hf, dataset)
    assert len(sids) == 6 + 5 + 7  # the greedy repeats collapse into one sequence
    rng = np.random.default_rng(1)
    neurons = np.sort(rng.choice(cfg.n_layer * cfg.d_mlp, 48, replace=False))
    seqs = cards.dataset_sequences(dataset, SHIPPED_NAME)
    k = 5
    for batch_size in (1, 2, 64):  # the running top-k merged batch by batch equals one merge of everything
        values, ids = cards.top_examples(model, seqs, neurons, k, batch_size=batch_size)
        assert values.shape == ids.shape == (len(neurons), k)
        for row, n in enumerate(neurons):
            order = sorted(range(len(sids)), key=lambda s: (-ref[s, n], sids[s]))[:k]  # brute force
            np.testing.assert_array_equal(ids[row], sids[order])
            np.testing.assert_allclose(values[row], ref[order, n], atol=1e-4)
    values, ids = cards.top_examples(model, seqs, neurons[:3], 100)
    assert ids.shape == (3, len(sids))  # k larger than the samples: every sample, sorted


def run_b(export, csv, *extra):
    r = run_python([sys.executable, str(REPO_ROOT / "b_generate_activation_dataset.py"), "--input_csv", str(csv), "--export_dir", str(export), "--model_type", SHIPPED_NAME,
                        "--device", "cpu", "--no_edge_list", "--no_activation_lists", "--no_attribution", *extra],
                   capture_output=True, text=True, cwd=REPO_ROOT,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    return export


def test_stage_b_streams_the_top_examples(dataset, shipped, shipped_hf):
    """Stage b's {m}_neuron_top_examples.csv (default K 10) against transformers and a brute-force sort."""
    table = pd.read_csv(layout.path(dataset, layout.TOP_EXAMPLES, SHIPPED_NAME), keep_default_na=False)
    assert list(table.columns) == layout.TOP_EXAMPLES_COLUMNS
    cfg = shipped.model.config
    n = cfg.n_layer * cfg.d_mlp
    assert len(table) == n * 10
    np.testing.assert_array_equal(table["neuron_id"], np.repeat(np.arange(n), 10))
    np.testing.assert_array_equal(table["rank"], np.tile(np.arange(10), n))
    sids, ref = reference_values(shipped_hf, dataset)
    for neuron in np.random.default_rng(2).choice(n, 64, replace=False):
        rows = table[table["neuron_id"] == neuron]
        order = sorted(range(len(sids)), key=lambda s: (-ref[s, neuron], sids[s]))[:10]
        np.testing.assert_array_equal(rows["sample_id"], sids[order])
        np.testing.assert_allclose(rows["value"], ref[order, neuron], atol=1e-4)
    seqs = cards.dataset_sequences(dataset, SHIPPED_NAME)
    df = pd.read_csv(layout.path(dataset, layout.DATASET, SHIPPED_NAME), keep_default_na=False).set_index("sample_id")
    for r in table.sample(200, random_state=0).itertuples():
        assert r.token == df.loc[r.sample_id, "output"]
        assert r.context == shipped.tokenizer.decode(seqs.prefix(r.sample_id)[-layout.CONTEXT_TOKENS:].tolist())


def test_stage_b_top_examples_merge_across_batches_and_can_be_off(dataset, tmp_path):
    csv = dataset.parent / "prompts.csv"
    one = run_b(tmp_path / "one", csv, "--batch_size", "1", "--top_examples", "3")  # one chunk per prompt, merged
    full = pd.read_csv(layout.path(dataset, layout.TOP_EXAMPLES, SHIPPED_NAME), keep_default_na=False)
    got = pd.read_csv(layout.path(one, layout.TOP_EXAMPLES, SHIPPED_NAME), keep_default_na=False)
    want = full[full["rank"] < 3].reset_index(drop=True)
    np.testing.assert_array_equal(got["sample_id"], want["sample_id"])
    np.testing.assert_allclose(got["value"], want["value"], atol=1e-5)
    assert (got["context"] == want["context"]).all() and (got["token"] == want["token"]).all()
    run_b(one, csv, "--top_examples", "0")
    assert not layout.path(one, layout.TOP_EXAMPLES, SHIPPED_NAME).exists()
    manifest = json.loads(layout.path(one, layout.DATASET_MANIFEST, SHIPPED_NAME).read_text())
    assert layout.TOP_EXAMPLES.format(m=SHIPPED_NAME) not in manifest["files"]


@pytest.mark.parametrize("merge_rows", [64, 12, 5])  # calls buffered whole, pruned to candidates, or a mix
def test_running_top_k_equals_a_brute_force_sort(merge_rows):
    rng = np.random.default_rng(3)
    values = np.round(rng.normal(size=(300, 2, 7)), 1)  # many ties
    values[values == 0] = -0.0  # equal to +0.0
    values[::7] = np.abs(values[::7])
    ids = rng.permutation(300)
    kept = np.ones(300, bool)
    top = RunningTopK(2, 7, 5, "cpu", merge_rows=merge_rows)
    edges = np.r_[0, np.cumsum(rng.integers(1, 25, size=40))]
    edges = np.r_[edges[edges < 300], 300]
    for lo, hi in zip(edges[:-1], edges[1:]):
        batch_ids = torch.as_tensor(ids[lo:hi])
        batch_ids[::5] = -1  # ignored
        kept[lo:hi][::5] = False
        for layer in range(2):
            top.add(layer, torch.as_tensor(values[lo:hi, layer], dtype=torch.float32), batch_ids)
    got_v, got_i = top.result()
    flat = values.reshape(300, 14)
    for col in range(14):
        order = sorted(np.flatnonzero(kept), key=lambda r: (-flat[r, col], ids[r]))[:5]
        np.testing.assert_array_equal(got_i[:, col], ids[order])
        np.testing.assert_allclose(got_v[:, col], flat[order, col], atol=1e-6)


def test_ties_go_to_the_lower_sample_id():
    v = np.array([[1.0, 2.0], [3.0, 2.0], [3.0, 1.0]])
    i = np.array([[5, 0], [4, 1], [2, 2]])
    top_v, top_i = merge_top([(v[:1], i[:1]), (v[1:], i[1:])], 2)
    np.testing.assert_array_equal(top_i, [[2, 0], [4, 1]])
    np.testing.assert_array_equal(top_v, [[3.0, 2.0], [3.0, 2.0]])


def test_examples_table_context_and_token(dataset, shipped):
    seqs = cards.dataset_sequences(dataset, SHIPPED_NAME)
    values, ids = cards.top_examples(shipped.model, seqs, np.array([7, 900]), 3)
    table = cards.examples_table(shipped.tokenizer, seqs, np.array([7, 900]), values, ids)
    assert list(table.columns) == layout.TOP_EXAMPLES_COLUMNS
    df = pd.read_csv(layout.path(dataset, layout.DATASET, SHIPPED_NAME), keep_default_na=False).set_index("sample_id")
    for r in table.itertuples():
        assert r.token == df.loc[r.sample_id, "output"]  # the token the activation predicts
        assert df.loc[r.sample_id, "input_text"].endswith(r.context)  # the text before it


def test_context_activations_end_with_the_sample_value(dataset, shipped):
    seqs = cards.dataset_sequences(dataset, SHIPPED_NAME)
    neurons = np.array([3, 600, 2000])
    values, ids = cards.top_examples(shipped.model, seqs, neurons, 2)
    shades = cards.context_activations(shipped.model, seqs, neurons, ids, batch_size=1)
    for i, n in enumerate(neurons):
        for j, s in enumerate(ids[i]):
            prefix = seqs.prefix(int(s))
            assert len(shades[i][j]) == min(len(prefix), layout.CONTEXT_TOKENS)
            assert shades[i][j][-1] == pytest.approx(values[i, j], abs=1e-5)
            alone = cards._selected_values(shipped.model, [prefix.tolist()], np.array([n]))[0, -len(shades[i][j]):, 0]
            np.testing.assert_allclose(shades[i][j], alone, atol=1e-5)  # the prefix run on its own


def test_direct_logit_effect_equals_a_numpy_computation(shipped, shipped_hf):
    cfg = shipped.model.config
    w_u = shipped_hf.lm_head.weight.detach().double().numpy()
    gain = shipped_hf.transformer.ln_f.weight.detach().double().numpy()
    for neuron in (0, 777, cfg.n_layer * cfg.d_mlp - 1):
        layer, dim = divmod(neuron, cfg.d_mlp)
        w_out = shipped_hf.transformer.h[layer].mlp.c_proj.weight.detach().double().numpy()[dim]  # Conv1D: (in, out)
        effect = w_u @ (w_out * gain)
        up, down = np.argsort(-effect)[:10], np.argsort(effect)[:10]
        promoted, suppressed = cards.direct_logit_effect(shipped.model, shipped.tokenizer, neuron)
        assert [t.token_id for t in promoted] == up.tolist()
        assert [t.token_id for t in suppressed] == down.tolist()
        np.testing.assert_allclose([t.value for t in promoted], effect[up], rtol=1e-6)
        np.testing.assert_allclose([t.value for t in suppressed], effect[down], rtol=1e-6)
        assert promoted[0].token == shipped.tokenizer.decode([int(up[0])])


class PageChecker(HTMLParser):
    """Tag balance, external references and the visible text of a page."""
    VOID = {"meta", "br", "img", "link", "hr", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.text, self.refs = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.refs += [(name, value) for name, value in attrs if name in ("src", "href", "action", "data")]
        if tag in ("script", "link", "img", "iframe", "object", "embed"):
            self.errors.append(f"<{tag}>")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")

    def handle_data(self, data):
        if not self.stack or self.stack[-1] not in ("style", "title"):
            self.text.append(data)


def run_cards(*argv):
    import f_render_neuron_cards as f

    try:
        f.main([*map(str, argv), "--model_type", SHIPPED_NAME, "--device", "cpu"])
    finally:
        atomic.release_locks()


def test_script_writes_cards_markdown_and_a_self_contained_page(dataset, shipped, tmp_path):
    neurons = [2500, 5, 900]
    np.save(tmp_path / "n.npy", np.array(neurons, np.int64))
    pd.DataFrame({"neuron_id": [5, 2500], "delta_nll": [0.125, -0.5], "kl": [0.1, 0.2]}).to_csv(
        layout.path(dataset, layout.NEURON_EFFECTS, SHIPPED_NAME), index=False)
    try:
        run_cards("--dataset_path", dataset, "--neurons", tmp_path / "n.npy", "--output", tmp_path / "out",
                  "--top_examples", 4)
    finally:
        layout.path(dataset, layout.NEURON_EFFECTS, SHIPPED_NAME).unlink()
    md = (tmp_path / "out" / layout.CARDS_MD).read_text(encoding="utf-8")
    page = (tmp_path / "out" / layout.CARDS_HTML).read_text(encoding="utf-8")
    checker = PageChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack and not checker.refs
    assert "http" not in page and "url(" not in page and "@import" not in page
    for text in (md, page):  # control characters and line separators of byte-level tokens are shown escaped
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f\x85\u2028\u2029]", text)
    text = "".join(checker.text)
    cfg = shipped.model.config
    freq = pd.read_csv(layout.path(dataset, layout.FREQUENCY, SHIPPED_NAME))
    seqs = cards.dataset_sequences(dataset, SHIPPED_NAME)
    values, ids = cards.top_examples(shipped.model, seqs, np.array(neurons), 4)
    positions = [text.index(f"Neuron {n} (layer {n // cfg.d_mlp}, dimension {n % cfg.d_mlp})") for n in neurons]
    assert positions == sorted(positions)  # in the order given
    for row, n in enumerate(neurons):
        head = f"Neuron {n} (layer {n // cfg.d_mlp}, dimension {n % cfg.d_mlp})"
        card_md = md.split(head)[1].split("## Neuron")[0]
        card_text = text.split(head)[1].split("Neuron ")[0]
        for card in (card_md, card_text):
            assert f"activation frequency {freq['activation_frequency'][n]:.4g}" in card
            assert f"mean activation {freq['mean_activation'][n]:.4g}" in card
            for v, s in zip(values[row], ids[row]):
                assert f"{v:.4g}" in card and str(s) in card
            promoted, suppressed = cards.direct_logit_effect(shipped.model, shipped.tokenizer, n)
            shown = cards._md_text if card is card_md else markdown.visible
            assert all(shown(t.token).strip() in card for t in promoted + suppressed)
        if n == 900:
            assert "ΔNLL" not in card_md  # not measured for this neuron
        else:
            assert f"single-neuron ΔNLL {0.125 if n == 5 else -0.5:.4g}" in card_md
        context = shipped.tokenizer.decode(seqs.prefix(int(ids[row, 0]))[-layout.CONTEXT_TOKENS:].tolist())
        assert markdown.visible(context, "\n") in card_text  # the top context, tokens shaded one by one


def chromium() -> str | None:
    import shutil
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome",
                                           "chrome-headless-shell") if shutil.which(n)), None)


@pytest.mark.skipif(chromium() is None, reason="no Chromium browser is installed (Debian: apt-get install chromium), "
                                                "so neurons.html is not rendered headlessly")
def test_page_renders_every_card_in_headless_chromium(dataset, shipped, tmp_path):
    run_cards("--dataset_path", dataset, "--neurons", "5,900", "--output", tmp_path / "out", "--top_examples", 3)
    page = tmp_path / "out" / layout.CARDS_HTML
    r = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions",
                        f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rendered = PageChecker()
    rendered.feed(r.stdout)
    text = "".join(rendered.text)
    d = shipped.model.config.d_mlp
    freq = pd.read_csv(layout.path(dataset, layout.FREQUENCY, SHIPPED_NAME))
    for n in (5, 900):
        card = text.split(f"Neuron {n} (layer {n // d}, dimension {n % d})")[1].split("Neuron ")[0]
        assert f"activation frequency {freq['activation_frequency'][n]:.4g}" in card
        assert "Promoted:" in card and "Suppressed:" in card


@pytest.mark.parametrize("neurons, message", [("5,99999", "outside"), ("5,5", "more than once"), ("x", "expected")])
def test_bad_neurons_are_refused(dataset, tmp_path, neurons, message):
    from gelutrace import PipelineError

    with pytest.raises(PipelineError, match=message):
        run_cards("--dataset_path", dataset, "--neurons", neurons, "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_script_exit_status(dataset, tmp_path):
    r = run_python([sys.executable, str(REPO_ROOT / "f_render_neuron_cards.py"), "--dataset_path", str(tmp_path),
                        "--model_type", SHIPPED_NAME, "--device", "cpu", "--neurons", "1"],
                   capture_output=True, text=True, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_report_neurons_pick_best_subsets_at_the_smallest_k_and_top_effects(tmp_path):
    (tmp_path / layout.SUBSETS_DIR).mkdir()
    (tmp_path / layout.RESULTS_DIR).mkdir()
    subsets = {"deg_small": np.arange(100, 130), "deg_other": np.array([1, 2]), "att_small": np.array([105, 7, 3]),
               "rand_small": np.array([50, 51]), "deg_big": np.array([60, 61])}
    for stem, ids in subsets.items():
        np.save(tmp_path / layout.SUBSETS_DIR / f"{stem}.npy", ids.astype(np.int64))
    pd.DataFrame({"k": [30, 30, 3, 30, 60], "method": ["degree", "degree", "attribution", "random", "degree"],
                  "subset": ["deg_small", "deg_other", "att_small", "rand_small", "deg_big"],
                  "best": [True, False, True, True, True]}).to_csv(tmp_path / layout.RESULTS_DIR / layout.COMPARISON,
                                                                     index=False)
    # the smallest k compared is 3: only attribution's best subset there
    np.testing.assert_array_equal(cards.report_neurons(tmp_path, "m", 200), [105, 7, 3])
    c = pd.read_csv(tmp_path / layout.RESULTS_DIR / layout.COMPARISON)
    c.loc[c["subset"] == "att_small", "k"] = 30
    c.to_csv(tmp_path / layout.RESULTS_DIR / layout.COMPARISON, index=False)
    pd.DataFrame({"neuron_id": [7, 8, 9, 10], "delta_nll": [0.5, 0.9, -1.0, 0.7], "kl": 0.0}).to_csv(
        layout.path(tmp_path, layout.NEURON_EFFECTS, "m"), index=False)
    got = cards.report_neurons(tmp_path, "m", 200, per_subset=20, top_effects=3)
    want = [105, 7, 3] + list(range(100, 120)) + [8, 10]  # methods by name, 20 each, then effects (7 already in)
    np.testing.assert_array_equal(got, [n for i, n in enumerate(want) if n not in want[:i]])


def test_report_includes_the_cards(tmp_path):
    from gelutrace.report.report import cards_section

    assert cards_section(tmp_path) == []
    (tmp_path / layout.CARDS_DIR).mkdir()
    (tmp_path / layout.CARDS_DIR / layout.CARDS_MD).write_text("# Neuron cards of `m`\n\nintro\n\n## Neuron 5 (layer 0, "
                                                       "dimension 5)\n\n| a |\n")
    (tmp_path / layout.CARDS_DIR / layout.CARDS_HTML).write_text("<html></html>")
    text = "\n".join(cards_section(tmp_path))
    assert text.startswith("## Neuron cards") and "\n### Neuron 5 (layer 0, dimension 5)" in text
    assert f"]({layout.CARDS_DIR}/{layout.CARDS_HTML})" in text and "# Neuron cards of" not in text


def test_stage_b_refuses_a_negative_k_in_both_modes(tmp_path):
    for extra in (["--input_text", str(REPO_ROOT / "parcellation_datasets" / "heldout_corpus_tinybard.txt"),
                   "--top_examples", "-1"], ["--input_csv", str(REPO_ROOT / "parcellation_datasets" / "test_1.csv"),
                                            "--top_examples", "-1"]):
        r = run_python([sys.executable, str(REPO_ROOT / "b_generate_activation_dataset.py"), *extra,
                            "--export_dir", str(tmp_path / "out"), "--model_type", SHIPPED_NAME, "--device", "cpu"],
                       capture_output=True, text=True, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 2 and "--top_examples" in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()


def test_token_text_is_shown_with_control_characters_escaped():
    assert markdown.visible("a\nb") == "a⏎b" and markdown.visible("a\nb", "\n") == "a\nb"
    assert markdown.url("modules/my model_modules (1).png") == "modules/my%20model_modules%20%281%29.png"
    assert [markdown.token_cell(t) for t in (" ", "  ", " the", "the ", "a b", "\n", " \n")] == [
        "␣", "␣␣", "␣the", "the␣", "a b", "⏎", "␣⏎"]
    assert markdown.visible("\x00\x0b\u2028é") == "\\x00\\x0b\\x2028é"
    assert cards._md_text("a|b`c") == "a\\|b\\`c"


def test_running_top_k_takes_minus_zero_as_a_tie():
    top = RunningTopK(1, 1, 2, "cpu")
    top.add(0, torch.tensor([[-0.0], [0.0], [-0.0], [-1.0]]), torch.tensor([5, 3, 1, 0]))
    np.testing.assert_array_equal(top.result()[1][:, 0], [1, 3])


def test_top_examples_file_round_trips_awkward_text_and_exact_values(tmp_path):
    values = np.array([[1.5, 0.1 + 0.2, -0.0], [np.float32(0.3), -2.0, 1e-300]])
    ids = np.array([[3, 4, 5], [6, 3, 4]])
    text = {3: ("a\nb", "\n"), 4: ('x,"y', " "), 5: ("c\rd", "NA"), 6: ("", "null")}
    formats.write_top_examples(tmp_path / "t.csv", values, ids, text)
    got = formats.read_top_examples(tmp_path / "t.csv")
    assert got["neuron_id"].tolist() == [0, 0, 1, 1, 2, 2] and got["rank"].tolist() == [0, 1] * 3
    assert got["value"].tolist() == values.T.ravel().tolist()  # exactly, as float64
    assert got["sample_id"].tolist() == ids.T.ravel().tolist()
    assert list(zip(got["context"], got["token"])) == [text[s] for s in ids.T.ravel()]
    pd.testing.assert_frame_equal(got, pd.read_csv(tmp_path / "t.csv", keep_default_na=False,
                                                   dtype={"context": str, "token": str}))


def test_partial_utf8_tokens_show_their_bytes(shipped):
    """A byte-level piece that is part of a character shows as <0xNN>, never as the replacement character; a
    token that is whole text is shown as decoded. The bytes are checked against the piece's UTF-8 encoding."""
    from gelutrace.model.tokens import token_text

    tok = shipped.tokenizer
    partial = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    assert partial  # the shipped vocabulary has single-byte pieces of multi-byte characters
    for i in partial:
        shown = token_text(tok, i)
        assert "\ufffd" not in shown and shown.startswith("<0x"), (i, shown)
    ids = tok("é")["input_ids"]  # two single-byte pieces: 0xC3 0xA9
    assert len(ids) == 2 and tok.decode(ids) == "é"
    assert [token_text(tok, i) for i in ids] == [f"<0x{b:02X}>" for b in "é".encode()]
    for i in (tok("the")["input_ids"][0], tok(" King")["input_ids"][0]):
        assert token_text(tok, i) == tok.decode([i])
