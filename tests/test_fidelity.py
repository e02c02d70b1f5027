"""
Edge fidelity (gelutrace.evaluate.fidelity, c_measure_edge_fidelity.py): the stratified edge sample, the measured change
against single-neuron ablation done by hand (perturbation.Ablation, one source at a time), the prediction
against the float64 reference of test_direct, and the summary against scipy and a hand computation.
"""

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from test_corpus_direct import ENV, corpus_run
from test_direct import reference

from gelutrace.evaluate import fidelity as fd
from gelutrace.files import layout
from gelutrace.model.hooks import Ablation

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, load_hf, run_python

M = SHIPPED_NAME


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped_path):
    out = tmp_path_factory.mktemp("fidelity") / "c"
    return out, corpus_run(out, "--max_tokens", 1000)


def test_edges_are_stratified_nonzero_and_seeded(dataset):
    _, g = dataset
    d = int(g.dimension.max()) + 1
    e = fd.sample_edges(g.causal, d, 200, seed=3)
    assert len(e) == 200 and (e["direct"] != 0).all()
    assert (e["decile"].value_counts().sort_index() == 20).all() and e["decile"].nunique() == 10
    # each edge's weight is the store's, at its (src, tgt)
    for r in e.head(20).itertuples():
        assert g.causal.matrix("direct", r.pair)[r.src % d, r.tgt % d] == r.direct
        assert g.causal.pairs[r.pair] == (r.src // d, r.tgt // d)
    # deciles: larger |direct| never in a lower decile
    order = e.sort_values("decile")
    assert (order.groupby("decile")["direct"].apply(lambda x: x.abs().min()).diff().dropna() >= 0).all()
    pd.testing.assert_frame_equal(e, fd.sample_edges(g.causal, d, 200, seed=3))
    assert not fd.sample_edges(g.causal, d, 200, seed=4).equals(e)


def test_measured_equals_ablation_by_hand_and_predicted_equals_reference(dataset, shipped, shipped_path):
    out, g = dataset
    model = shipped.model
    d = model.config.d_mlp
    samples = fd.corpus_samples({"context": 64, "files": [{"path": str(HELDOUT_PATH)}]}, shipped.tokenizer, 256,
                                "cpu")
    assert samples.idx.shape == (4, 64)
    edges = fd.sample_edges(g.causal, d, 30, seed=0).head(12)
    table = fd.measure(model, samples, edges)
    values = {}

    def keep(j):
        def hook(m, a, o):
            values[j] = o.detach().double().reshape(-1, d).mean(dim=0).numpy()
        return hook
    sites = model.gelus()
    with torch.no_grad():
        handles = [s.register_forward_hook(keep(j)) for j, s in enumerate(sites)]
        model(samples.idx)
        clean = dict(values)
        for r in table.itertuples():
            with Ablation(model, [r.src]):
                model(samples.idx)
            want = values[r.tgt // d][r.tgt % d] - clean[r.tgt // d][r.tgt % d]
            assert r.measured == pytest.approx(want, rel=1e-4, abs=1e-7)
        for h in handles:
            h.remove()
    ref_d, _, _, _ = reference(load_hf(shipped_path), "gpt2", samples.idx, [(i, i + 1) for i in range(5)],
                               torch.ones(samples.idx.shape).numpy().reshape(-1))
    for r in table.itertuples():
        want = -ref_d[r.src // d][r.src % d, r.tgt % d]
        assert r.predicted == pytest.approx(want, rel=1e-5, abs=1e-6 * np.abs(ref_d[r.src // d]).max())
    assert (table["layer_gap"] == 1).all()


def test_summary_against_scipy_and_by_hand():
    t = pd.DataFrame({"layer_gap": [1, 1, 1, 1, 2, 2, 2], "predicted": [1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 2.0],
                      "measured": [1.0, 2.5, 2.0, 4.5, -2.0, 0.0, 1.0]})
    s = fd.summary(t).set_index("layer_gap")
    assert list(s.index) == ["1", "2", "all"]
    p, m = t["predicted"].to_numpy()[:4], t["measured"].to_numpy()[:4]
    beta = (1 + 5 + 6 + 18) / (1 + 4 + 9 + 16)  # sum pm / sum p^2 = 30 / 30
    assert s.loc["1", "beta"] == pytest.approx(beta)
    assert s.loc["1", "r2_through_0"] == pytest.approx(1 - ((m - beta * p) ** 2).sum() / (m ** 2).sum())
    assert s.loc["1", "spearman"] == pytest.approx(0.8)  # ranks 1 2 3 4 vs 1 3 2 4: 1 - 6*2/(4*15)
    assert s.loc["all", "spearman"] == pytest.approx(spearmanr(t["predicted"], t["measured"]).statistic)
    assert s.loc["all", "edges"] == 7


def test_script_writes_both_files_and_refuses_a_store_without_weights(dataset, tmp_path):
    out, _ = dataset
    cmd = [sys.executable, "c_measure_edge_fidelity.py", "--dataset_path", str(out), "--model_type", M, "--edges",
           "40", "--tokens", "128", "--device", "cpu"]
    r = run_python(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    table = pd.read_csv(layout.path(out, layout.EDGE_FIDELITY, M))
    assert list(table.columns) == layout.EDGE_FIDELITY_COLUMNS and len(table) == 40
    summary = pd.read_csv(layout.path(out, layout.EDGE_FIDELITY_SUMMARY, M))
    assert list(summary.columns) == layout.EDGE_FIDELITY_SUMMARY_COLUMNS
    assert "Spearman" in r.stdout
    plain = tmp_path / "plain"
    run_python([sys.executable, "b_generate_activation_dataset.py", "--input_text", str(HELDOUT_PATH),
                    "--export_dir", str(plain), "--model_type", M, "--max_tokens", "200"], cwd=REPO_ROOT, env=ENV,
               check=True, capture_output=True)
    r = run_python(cmd[:3] + [str(plain)] + cmd[4:], capture_output=True, text=True, cwd=REPO_ROOT, env=ENV)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "--direct_edges" in r.stderr
    assert not layout.path(plain, layout.EDGE_FIDELITY, M).exists()


def test_report_quotes_only_the_fidelity_of_the_current_store(dataset, tmp_path):
    """The report's section from the files c_measure_edge_fidelity wrote, and none (but a note) once the store was
    rebuilt: its uid is not the one the files measured."""
    import json as js
    import shutil

    from gelutrace.report.report import collect, fidelity_section

    out = tmp_path / "c"  # a copy: the fixture's store stays as it is
    shutil.copytree(dataset[0], out)
    run_python([sys.executable, "c_measure_edge_fidelity.py", "--dataset_path", str(out), "--model_type", M,
                    "--edges", "30", "--tokens", "64", "--device", "cpu"], cwd=REPO_ROOT, env=ENV, check=True,
               capture_output=True)
    info = collect(out)
    lines = "\n".join(fidelity_section(info, out))
    assert "Spearman" in lines and info["fidelity_stale"] is False
    header = layout.path(out, layout.WEIGHTED_GRAPH, M) / layout.GRAPH_STORE_HEADER
    h = js.loads(header.read_text())
    h["uid"] = "another"
    header.write_text(js.dumps(h))
    info = collect(out)
    lines = "\n".join(fidelity_section(info, out))
    assert info["fidelity"] is None and "measured another graph store" in lines and "Spearman" not in lines
