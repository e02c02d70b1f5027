"""
b_trace_gelu_activations.py --graph and gelutrace.trace end to end on the shipped model: the graph file validates
against Neuronpedia's graph schema, its supernodes are the kept neurons' corpus modules as c_find_modules' table
gives them (read here with pandas), its summary names nodes of the file, the script and the API write the same
graph, and bad input is one error line.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest

from gelutrace.files import layout

from conftest import REPO_ROOT, SHIPPED_NAME, run_python

SCHEMA = Path(__file__).resolve().parent / "data" / "neuronpedia_graph" / "graph-schema.json"
PROMPT = "KING HENRY. Now, lords, for France"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def script(name, *args):
    return run_python([sys.executable, str(REPO_ROOT / name), *map(str, args)], cwd=REPO_ROOT, env=ENV)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped_path):
    """A prompt-mode dataset of the shipped model with its graph store and count modules."""
    d = tmp_path_factory.mktemp("trace_graph")
    csv = d / "prompts.csv"
    pd.DataFrame([("KING HENRY. Now, lords, ", 12, 2), ("To be, or not to be", 12, 2), ("And God said, ", 12, 2)],
                 columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    ds = d / "ds"
    for r in (script("b_generate_activation_dataset.py", "--input_csv", csv, "--export_dir", ds, "--model_type",
                     SHIPPED_NAME, "--device", "cpu", "--temperature", "0.8"),
              script("c_calculate_weighted_activation_graph.py", "--input_dir", ds),
              script("c_find_modules.py", "--input_path", layout.path(ds, layout.WEIGHTED_GRAPH, SHIPPED_NAME),
                     "--weight", "count", "--null_graphs", "2", "--seeds", "2")):
        assert r.returncode == 0, r.stderr[-2000:]
    return ds


@pytest.mark.slow
def test_graph_file_supernodes_and_summary(dataset, tmp_path):
    modules = dataset / layout.MODULES_DIR / layout.MODULES.format(m=SHIPPED_NAME, weight="count")
    out = tmp_path / "trace"
    r = script("b_trace_gelu_activations.py", "--model_type", SHIPPED_NAME, "--device", "cpu", "--input_text",
               PROMPT, "--output_dir", out, "--graph", "--max_nodes", "400", "--dataset_path", dataset, "--modules",
               modules, "--faithfulness_nodes", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "faithfulness: the 10 most influential nodes" in r.stdout and "replacement score" in r.stdout
    doc = json.loads(layout.path(out, layout.TRACE_GRAPH, SHIPPED_NAME).read_text())
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(doc)
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids)) and doc["metadata"]["scan"] == SHIPPED_NAME
    assert doc["metadata"]["prompt"] == PROMPT
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    # supernodes: kept neurons grouped by the module c_find_modules gave them
    table = pd.read_csv(modules)
    module_of = dict(zip(zip(table["layer"], table["dimension"]), table["module"]))
    groups = doc["qParams"]["supernodes"]
    assert groups, "no module held two kept nodes"
    for label, *members in groups:
        assert set(members) <= set(ids) and set(members) <= set(doc["qParams"]["pinnedIds"])
        k = {module_of[tuple(int(x) for x in m.split("_")[:2])] for m in members}
        assert len(k) == 1 and label.startswith(f"M{k.pop()}")
    # labels from the dataset: every neuron node's starts with its layer and dimension
    neurons = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert neurons and all(n["clerp"].startswith(f"L{n['layer']}/N{n['node_id'].split('_')[1]} ") for n in neurons)
    summary = pd.read_csv(layout.path(out, layout.TRACE_SUMMARY_CSV, SHIPPED_NAME))
    assert np.all(np.diff(summary["influence"]) <= 0)
    top = summary.iloc[0]
    assert f"{top['layer']}_{top['dimension']}_{top['position']}" in ids  # the most influential neuron survives pruning
    # the activation files, the graph, its page and its summary are one output set: one manifest vouches for all eight
    manifest = json.loads(layout.path(out, layout.TRACE_SUMMARY_MANIFEST, SHIPPED_NAME).read_text())
    names = [n.format(m=SHIPPED_NAME) for n in (layout.TRACE_VECTOR, layout.TRACE_ACTIVE, layout.TRACE_PLOT,
                                                 layout.TRACE_GRAPH, layout.TRACE_PAGE, *layout.TRACE_SUMMARY_SET)]
    assert manifest["state"] == "complete" and sorted(manifest["files"]) == sorted(names)
    for name in names:
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == manifest["files"][name]["sha256"]
    record = json.loads(layout.path(out, layout.TRACE_SUMMARY_JSON, SHIPPED_NAME).read_text())
    assert 0 <= record["concentration"]["p_value"] <= 1 and record["faithfulness"]["nodes"] == 10


@pytest.mark.slow
def test_the_api_writes_the_scripts_graph(tmp_path, shipped):
    import gelutrace as gt

    r = script("b_trace_gelu_activations.py", "--model_type", SHIPPED_NAME, "--device", "cpu", "--input_text",
               PROMPT, "--output_dir", tmp_path / "script", "--graph", "--max_nodes", "300", "--faithfulness_nodes",
               "0")
    assert r.returncode == 0, r.stderr[-2000:]
    done = gt.trace(shipped, PROMPT, tmp_path / "api", max_nodes=300, faithfulness_nodes=0)
    a, b = (json.loads(layout.path(tmp_path / d, layout.TRACE_GRAPH, SHIPPED_NAME).read_text()) for d in ("script", "api"))
    assert a["nodes"] == b["nodes"] and a["links"] == b["links"]
    pages = [layout.path(tmp_path / d, layout.TRACE_PAGE, SHIPPED_NAME).read_bytes() for d in ("script", "api")]
    assert pages[0] == pages[1]  # the same page, written by the script and the API
    assert done.graph.n_kept == 300 and done.summary.faithfulness is None
    # a trace without --graph into the script's folder: the graph, page and summary of the other prompt go
    r = script("b_trace_gelu_activations.py", "--model_type", SHIPPED_NAME, "--device", "cpu", "--input_text",
               "To be", "--output_dir", tmp_path / "script")
    assert r.returncode == 0, r.stderr[-2000:]
    left = sorted(p.name for p in (tmp_path / "script").iterdir() if not p.name.startswith("."))
    names = [n.format(m=SHIPPED_NAME) for n in (*layout.TRACE_FILES, layout.TRACE_SUMMARY_MANIFEST)]
    assert left == sorted(names)
    manifest = json.loads(layout.path(tmp_path / "script", layout.TRACE_SUMMARY_MANIFEST, SHIPPED_NAME).read_text())
    assert manifest["state"] == "complete" and sorted(manifest["files"]) == sorted(names[:3])
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((tmp_path / "script" / name).read_bytes()).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("args, message", [
    (["--dataset_path", "x"], "give --graph"),
    (["--max_nodes", "20"], "--max_nodes sets how the graph is made: give --graph"),
    (["--faithfulness_nodes", "0", "--edge_threshold", "0.5"], "--edge_threshold, --faithfulness_nodes set how"),
    (["--graph", "--node_threshold", "1.5"], "--node_threshold and --edge_threshold"),
    (["--graph", "--max_nodes", "0"], "--max_nodes must be at least 1"),
    (["--graph", "--modules", "missing.csv"], "missing.csv does not exist"),
])
def test_bad_graph_input_is_one_error_line(tmp_path, args, message):
    r = script("b_trace_gelu_activations.py", "--model_type", SHIPPED_NAME, "--device", "cpu", "--input_text", PROMPT,
               "--output_dir", tmp_path / "out", *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_modules_table_of_another_model_is_refused_before_any_file(tmp_path):
    """A c_find_modules table of a model 360 neurons wide (tinyllama-bard's width) for the 512-wide shipped model."""
    table = tmp_path / "other_modules_count.csv"
    rows = [(layer * 360 + dim, layer, dim, 0) for layer in (0, 1) for dim in (3, 200)]
    pd.DataFrame(rows, columns=layout.MODULES_COLUMNS).to_csv(table, index=False)
    table.with_suffix(".json").write_text(json.dumps({"model": "other", "sizes": [len(rows)]}))
    out = tmp_path / "out"
    r = script("b_trace_gelu_activations.py", "--model_type", SHIPPED_NAME, "--device", "cpu", "--input_text", PROMPT,
               "--output_dir", out, "--graph", "--modules", table)
    assert r.returncode == 2 and "360 neurons per layer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
