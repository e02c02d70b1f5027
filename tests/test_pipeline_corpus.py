"""run_pipeline.sh end to end in corpus mode on the shipped model (a file of its own: it shares no fixture with
test_pipeline.py, and runs beside it)."""

import json
import os
import sys

import pandas as pd
import pytest

from gelutrace.files import layout

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, run_python

pytestmark = pytest.mark.slow
M = SHIPPED_NAME


def test_corpus_mode_pipeline(tmp_path, shipped_path):
    """--text: stages b-d read a text teacher-forced, stage e measures on prompts, the report says so."""
    held = tmp_path / "prompts.csv"
    pd.DataFrame([("KING HENRY. Now, lords, ", 5, 1), ("And God said, ", 5, 1)],
                 columns=layout.PROMPT_COLUMNS).to_csv(held, index=False)
    data = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    # the driver in this process (test_pipeline.py runs run_pipeline.sh's own); one prompt traced
    r = run_python([str(REPO_ROOT / "run_pipeline.sh"), "--text", str(HELDOUT_PATH), "--thresholds", "0.8",
                    "--ks", "3 1%", "--random_controls", "2", "--device", "cpu", "--eval_csv", str(held),
                    "--eval_tokens", "600", "--fidelity_tokens", "64", "--module_controls", "2", "--trace", "1", M,
                    str(held), str(data)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # the real-text verdict (the shipped model's default evaluation text) over the k grid, controls for winners
    results = data / layout.RESULTS_DIR
    ev = json.loads((results / layout.EVALUATION).read_text())
    assert ev["eval_text"]["tokens_scored"] == 600 and ev["eval_text"]["leak_check"]["documents_checked"]
    assert ev["eval_text"]["files"][0]["path"].endswith("heldout_eval_tinybard.txt")
    rec = json.loads((results / layout.COMPARISON_RECORD).read_text())
    assert rec["metric"] == "real_text" and rec["control_subsets"] == "best"
    dose = pd.read_csv(results / layout.DOSE_RESPONSE)
    assert sorted(dose["k"].unique()) == [3, 30]
    verdict = pd.read_csv(results / layout.METHOD_VERDICT)
    winners = dose[dose["winner"].astype(bool)]
    assert sorted(winners["k"]) == [3, 30] and (winners["random_n"] == 2).all()
    apart = pd.read_csv(results / layout.DOSE_RESPONSE_EXCLUDED)  # ranked without layer 0: no controls with "best"
    apart_winners = apart[apart["winner"].astype(bool)]
    assert sorted(apart_winners["k"]) == [3, 30] and (apart["random_n"].fillna(0) == 0).all()
    assert rec["subsets_with_controls"] == sorted(winners["subset"])
    assert rec["exclude_layers"] == [0] and set(apart["method"]) == {"influence", "activation_count", "attribution"}
    summary = pd.read_csv(results / layout.PERTURBATION_SUMMARY).set_index("subset")
    for w in winners.itertuples():
        assert verdict.set_index("k").loc[w.k, "winner_delta_nll"] == pytest.approx(w.delta_nll, rel=1e-12)
        assert summary.loc[w.subset + ".npy", "text_delta_nll_random_n"] == 2
    assert (results / layout.DOSE_RESPONSE_PLOT).is_file()
    # with real text the driver leaves out the own-continuation metric and runs the mean-ablation check
    assert not (results / layout.CONTINUATION_VERDICT).is_file() and not ev["own_continuation"]
    assert ev["own_continuation_token_forwards"] > 0 and ev["mean_ablation_top"] == 2
    check = pd.read_csv(results / layout.MEAN_CHECK)
    assert sorted(check["k"]) == [3, 30] and (check["methods"] == 2).all()
    report = (data / "report.md").read_text()
    assert report.index(f"]({layout.RESULTS_DIR}/{layout.DOSE_RESPONSE_PLOT})") < report.index("k = 3 (0.1 % of neurons)")
    assert r"measured on real held-out text: 600 tokens of heldout\_eval\_tinybard.txt" in report
    assert "## Own-continuation comparison" in report and "Not measured: stage e ran with `--own_continuation 0`" in report
    assert "## Under mean ablation" in report and "Winner at each k: 3: " in report
    # corpus mode leaves the single-neuron effects off: the report says so, with the flag and its cost
    assert ("**No single-neuron ablation is compared here**" in report and "`run_pipeline.sh --effects 1`" in report
            and "(3,072 × 2,000 = 6.14 M here)" in report)
    # influence against its graph-free seed at every k, also where influence wins
    assert verdict["seed_margin"].notna().all() and report.count(r"its graph-free seed (direct\_loss)") >= 2
    assert "== c\n" not in r.stdout  # stage b wrote the store
    commands = report[report.index("Commands, in order"):report.index("## Dataset")]
    assert "corpus_b" not in commands and commands.count("--shard") == 2
    assert "c_merge_activation_statistics.py" in commands
    assert (data / ".pipeline" / "fidelity.cmd").read_text().rstrip().endswith("--tokens 64")
    assert layout.path(data, layout.EDGE_FIDELITY_SUMMARY, M).is_file()
    ev = json.loads((data / layout.RESULTS_DIR / layout.EVALUATION).read_text())
    assert ev["selection_corpus"] == [str(HELDOUT_PATH)] and ev["held_out"] and ev["prompts_in_both"] == 0
    record = json.loads(layout.path(data, layout.CORPUS, M).read_text())
    header = json.loads((data / layout.WEIGHTED_GRAPH.format(m=M) / layout.GRAPH_STORE_HEADER).read_text())
    assert header["num_samples"] == record["samples"] == record["tokens"]
    methods = {json.loads(p.read_text())["method"] for p in (data / layout.SUBSETS_DIR).glob("*.json")}
    assert methods == {"degree", "influence", "activation_count", "attribution", "direct_loss", "magnitude", "random",
                       "module"}  # b --attribution
    report = (data / "report.md").read_text()
    assert "chosen on a corpus (heldout.txt" in report and "none of which occurs in the corpus" in report
    # the modules on the real text: their effects against both nulls, top tokens and contexts, in the report
    eff = pd.read_csv(results / layout.MODULE_EFFECTS)
    assert len(eff) == 2 and (eff["metric"] == "real_text").all() and (eff["control_weights"] == "attribution").all()
    tokens = pd.read_csv(results / layout.MODULE_TOKENS, keep_default_na=False)
    contexts = pd.read_csv(results / layout.MODULE_CONTEXTS, keep_default_na=False)
    assert set(tokens["subset"]) == set(contexts["subset"]) == set(eff["subset"])
    section = report[report.index("## Modules"):]
    assert "Next tokens whose loss rises most without it" in section and "fire together most" in section
    assert "no module structure" in section or "rewired graphs (p = " in section
