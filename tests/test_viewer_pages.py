"""
The viewer pages (gelutrace.report.viewer) without a browser: the data embedded in {m}_trace_graph.html, pruned at
the graph file's thresholds by the pages' rule (re-implemented here), gives exactly the file's nodes and links; the
sliders' shares prune as circuit.prune.threshold does; a page references nothing outside itself; no text in the data
can end its script element; {m}_causal_graph.html holds the top N neurons by influence and the strongest direct
edges among them, both computed here with numpy from the dataset's {m}_direct_edges.npz; a dataset without direct
edges is one error line.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

from gelutrace.circuit.prune import ranked_shares, threshold
from gelutrace.files import layout
from gelutrace.report import viewer

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, run_python

M = SHIPPED_NAME
PROMPT = "KING HENRY. Now, lords, for France"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
HOSTILE = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(1)>", "<!--", "a\u2028b\u2029c & d"]
# the only URLs in d3's dist build: its header comment and the XML namespaces it creates elements in (no request)
D3_URLS = {"https://d3js.org", "http://www.w3.org/1999/xhtml", "http://www.w3.org/1999/xlink",
           "http://www.w3.org/2000/svg", "http://www.w3.org/2000/xmlns/", "http://www.w3.org/XML/1998/namespace"}


def script(name, *args):
    return run_python([sys.executable, str(REPO_ROOT / name), *map(str, args)], cwd=REPO_ROOT, env=ENV)


class Elements(HTMLParser):
    """Every start tag with its attributes, and each <script> element's text."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=False)
        self.tags, self.scripts, self._in = [], [], None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in = (dict(attrs), [])

    def handle_data(self, data):
        if self._in is not None:
            self._in[1].append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self._in is not None:
            self.scripts.append((self._in[0], "".join(self._in[1])))
            self._in = None


def embedded(page: str) -> dict:
    (data,) = [text for attrs, text in Elements(page).scripts if attrs.get("id") == "gelutrace-data"]
    return json.loads(data)


def drawn(data: dict, node_threshold: float, edge_threshold: float) -> tuple[set, set]:
    """The pages' rule: a node iff its share <= the node threshold; a link iff both ends are drawn and its share <=
    the edge threshold."""
    nodes, links = data["nodes"], data["links"]
    shown = [s <= node_threshold for s in nodes["share"]]
    ids = nodes["id"]
    kept = {(ids[s], ids[t]) for s, t, share in zip(links["source"], links["target"], links["share"])
            if shown[s] and shown[t] and share <= edge_threshold}
    return {i for i, keep in zip(ids, shown) if keep}, kept


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A prompt-mode dataset of the shipped model with direct edges, its graph store and count modules."""
    d = tmp_path_factory.mktemp("viewer")
    csv = d / "prompts.csv"
    pd.DataFrame([("KING HENRY. Now, lords, ", 12, 2), ("To be, or not to be", 12, 2), ("And God said, ", 12, 2)],
                 columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    ds = d / "ds"
    for r in (script("b_generate_activation_dataset.py", "--input_csv", csv, "--export_dir", ds, "--model_type", M,
                     "--device", "cpu", "--temperature", "0.8", "--direct_edges"),
              script("c_calculate_weighted_activation_graph.py", "--input_dir", ds),
              script("c_find_modules.py", "--input_path", layout.path(ds, layout.WEIGHTED_GRAPH, M), "--weight",
                     "count", "--null_graphs", "2", "--seeds", "2")):
        assert r.returncode == 0, r.stderr[-2000:]
    return ds


@pytest.fixture(scope="module")
def trace(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace")
    modules = dataset / layout.MODULES_DIR / layout.MODULES.format(m=M, weight="count")
    r = script("b_trace_gelu_activations.py", "--model_type", M, "--device", "cpu", "--input_text", PROMPT,
               "--output_dir", out, "--graph", "--max_nodes", "300", "--dataset_path", dataset, "--modules", modules,
               "--faithfulness_nodes", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def synthetic_data() -> dict:
    """A small page's data by hand: two nodes, one link, one supernode, one card."""
    return {"kind": "trace", "title": "t", "subtitle": "s", "hint": "h", "columns": ["a", "b"], "rows": ["r"],
            "thresholds": {"node": 0.8, "edge": 0.98},
            "nodes": {"id": ["0_1_0", "0_2_1"], "row": [0, 0], "col": [0, 1], "type": ["neuron", "neuron"],
                      "label": ["x", "y"], "size": [1.0, 0.5], "influence": [1.0, 0.5], "activation": [1.0, None],
                      "share": [0.0, 0.5], "card": [0, -1]},
            "links": {"source": [0], "target": [1], "weight": [-0.5], "share": [0.0]},
            "supernodes": [{"name": "M0", "members": [0, 1]}], "pinned": ["0_1_0"],
            "cards": [{"module": "M0", "figures": "", "examples": [{"tokens": ["a", "b"], "acts": [0.1, 1.0],
                                                                    "next": "c", "value": 1.0}],
                       "promoted": [["p", 1.0]], "suppressed": [["q", -1.0]]}]}


def test_ranked_shares_prune_as_threshold_does():
    """A score is kept by threshold(scores, f) iff its share is < f, ties included, at fractions between the
    shares (where rounding cannot decide)."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 200):
        scores = torch.rand(n, generator=gen, dtype=torch.float64) ** 3
        scores[: n // 4] = scores[n // 4: 2 * (n // 4)]  # ties
        shares = ranked_shares(scores)
        cuts = np.unique(shares.numpy())
        for f in np.concatenate([(cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1e-6, 1.0]]):
            if f > 1:
                continue
            kept = scores >= threshold(scores, float(f))
            assert torch.equal(kept, shares < f), (n, f)


@pytest.mark.slow
def test_the_trace_page_draws_the_files_nodes_and_links(trace):
    doc = json.loads(layout.path(trace, layout.TRACE_GRAPH, M).read_text())
    page = layout.path(trace, layout.TRACE_PAGE, M).read_text(encoding="utf-8")
    data = embedded(page)
    ps = doc["metadata"]["pruning_settings"]
    nodes, links = drawn(data, ps["node_threshold"], ps["edge_threshold"])
    assert nodes == {n["node_id"] for n in doc["nodes"]}
    assert links == {(link["source"], link["target"]) for link in doc["links"]}
    assert len(links) == len(doc["links"]) and data["thresholds"] == {"node": ps["node_threshold"],
                                                                      "edge": ps["edge_threshold"]}
    # a lower threshold draws fewer: the most influential first (every kept node's share is its rank's)
    fewer, _ = drawn(data, 0.3, 0.5)
    assert fewer < nodes
    # the link weights are the file's, with their sign (to 3 significant digits: they set line widths)
    weight = {(link["source"], link["target"]): link["weight"] for link in doc["links"]}
    ids, L = data["nodes"]["id"], data["links"]
    for s, t, w in zip(L["source"], L["target"], L["weight"]):
        assert w == pytest.approx(weight[(ids[s], ids[t])], rel=5e-3, abs=1e-12)  # 3 significant digits
    # supernodes and pins as the file's, and a card for every neuron: its module and top examples from the dataset
    assert [[g["name"], *[ids[i] for i in g["members"]]] for g in data["supernodes"]] == doc["qParams"]["supernodes"]
    assert data["pinned"] == doc["qParams"]["pinnedIds"]
    neurons = [i for i, t in enumerate(data["nodes"]["type"]) if t == "neuron"]
    assert neurons and all(data["nodes"]["card"][i] >= 0 for i in neurons)
    cards = [data["cards"][data["nodes"]["card"][i]] for i in neurons]
    assert all(c["examples"] and len(c["examples"]) <= viewer.CARD_EXAMPLES for c in cards)
    assert all(len(e["tokens"]) == len(e["acts"]) <= viewer.CARD_TOKENS for c in cards for e in c["examples"])
    labels = {n["node_id"]: n["clerp"] for n in doc["nodes"]}
    assert all(data["nodes"]["label"][i] == labels[ids[i]] for i in neurons)


def check_offline(page: str):
    """No element refers to anything: no src, no href but the empty data: icon, no stylesheet link; no URL in the
    page but in d3's inlined build (its namespaces and header), and none in the viewer's script."""
    parsed = Elements(page)
    for tag, attrs in parsed.tags:
        assert "src" not in attrs and "srcset" not in attrs, (tag, attrs)
        if "href" in attrs:
            assert (tag, attrs) == ("link", {"rel": "icon", "href": "data:,"})
    scripts = [text for _, text in parsed.scripts]
    assert len(scripts) == 3 and len(parsed.tags) > 3
    outside = page
    for text in scripts[1:]:
        outside = outside.replace(text, "")
    assert not re.search(r"https?:|//|url\(|@import", outside, re.I)
    d3, js = scripts[1], scripts[2]
    assert d3 == (viewer.HERE / "vendor" / "d3.min.js").read_text(encoding="utf-8")
    assert set(re.findall(r"https?://[^\"' )]*", d3)) <= D3_URLS
    assert not re.search(r"https?:|fetch\(|XMLHttpRequest|import\(|innerHTML|\.html\(|WebSocket|src", js)


def test_a_page_refers_to_nothing_outside_itself():
    check_offline(viewer.page_html(synthetic_data()))
    record = json.loads((viewer.HERE / "vendor" / "d3.json").read_text())
    assert record["name"] == "d3" and record["version"] == viewer.d3_version()
    assert (viewer.HERE / "vendor" / "d3.LICENSE").read_text().startswith("Copyright")


@pytest.mark.slow
def test_the_trace_page_refers_to_nothing_outside_itself(trace):
    check_offline(layout.path(trace, layout.TRACE_PAGE, M).read_text(encoding="utf-8"))


def test_no_text_in_the_data_can_end_its_script_element():
    data = synthetic_data()
    data["title"] = data["subtitle"] = HOSTILE[0]
    data["nodes"]["label"] = HOSTILE[:2]
    data["supernodes"][0]["name"] = HOSTILE[2]
    data["cards"][0]["examples"][0]["tokens"] = HOSTILE[:2]
    data["cards"][0]["examples"][0]["next"] = HOSTILE[2]
    data["cards"][0]["module"] = HOSTILE[3]
    data["cards"][0]["promoted"] = [[h, 1.0] for h in HOSTILE]
    page = viewer.page_html(data)
    parsed = Elements(page)
    assert [attrs for attrs, _ in parsed.scripts] == [{"type": "application/json", "id": "gelutrace-data"}, {}, {}]
    assert embedded(page) == data
    assert [tag for tag, _ in parsed.tags].count("img") == 0 and "<!--" not in page
    for text in HOSTILE:
        assert text not in page.replace(f"<title>{HOSTILE[0]}</title>", "")


@pytest.mark.slow
def test_hostile_labels_and_examples_in_a_trace_page(trace):
    """The trace's own data with every label and example token made hostile, written again."""
    data = embedded(layout.path(trace, layout.TRACE_PAGE, M).read_text(encoding="utf-8"))
    data["nodes"]["label"] = [HOSTILE[i % len(HOSTILE)] for i in range(len(data["nodes"]["label"]))]
    for card in data["cards"]:
        for e in card["examples"]:
            e["tokens"] = [HOSTILE[i % len(HOSTILE)] for i in range(len(e["tokens"]))]
    page = viewer.page_html(data)
    assert [a.get("id") for a, _ in Elements(page).scripts].count("gelutrace-data") == 1
    assert embedded(page) == data


def influence_numpy(z, n_layer: int, d: int) -> np.ndarray:
    """I = s + |E~| I, E~_uv = |E_uv| / mean |a_v|, by back-substitution from the last layer (docs/methods.md)."""
    header = json.loads(str(z["header"]))
    inf = z["direct_loss_abs"].astype(np.float64).copy()
    value = z["direct_value_abs"]
    scale = np.where(value > 0, 1.0 / np.where(value > 0, value, 1.0), 0.0)
    for i in reversed(range(n_layer)):
        for a, b in header["pairs"]:
            if a == i:
                w = np.abs(z[f"direct_{a:03d}_{b:03d}"])
                inf[a * d:(a + 1) * d] += w @ (inf[b * d:(b + 1) * d] * scale[b * d:(b + 1) * d])
    return inf


@pytest.mark.slow
def test_the_causal_page_holds_the_top_neurons_and_their_strongest_edges(dataset, tmp_path):
    n = 12
    out = tmp_path / "cards"
    r = script("f_render_neuron_cards.py", "--dataset_path", dataset, "--model_type", M, "--device", "cpu",
               "--neurons", "1,2", "--output", out, "--causal_graph", n)
    assert r.returncode == 0, r.stderr[-2000:]
    page = layout.path(out, layout.CAUSAL_PAGE, M).read_text(encoding="utf-8")
    check_offline(page)
    data = embedded(page)
    meta = json.loads(layout.path(dataset, layout.GRAPH_META, M).read_text())
    n_layer, d = meta["n_layer"], meta["d_mlp"]
    with np.load(layout.path(dataset, layout.DIRECT_EDGES, M)) as z:
        inf = influence_numpy(z, n_layer, d)
        top = np.argsort(-inf, kind="stable")[:n]
        assert set(data["nodes"]["id"]) == {f"{t // d}_{t % d}" for t in top}
        assert data["nodes"]["col"] == [int(i.split("_")[0]) for i in data["nodes"]["id"]]
        edges = []
        for a, b in json.loads(str(z["header"]))["pairs"]:
            w = z[f"direct_{a:03d}_{b:03d}"]
            edges += [(s, t, w[s % d, t % d]) for s in top if s // d == a for t in top if t // d == b
                      if w[s % d, t % d] != 0]
    strength = sorted((abs(w) for _, _, w in edges), reverse=True)
    want = 4 * n
    cut = strength[min(want, len(strength)) - 1]
    ids, L = data["nodes"]["id"], data["links"]
    got = {(ids[s], ids[t]): w for s, t, w in zip(L["source"], L["target"], L["weight"])}
    assert len(got) == min(want, len(edges))
    strong = {(f"{s // d}_{s % d}", f"{t // d}_{t % d}"): w for s, t, w in edges if abs(w) > cut}
    assert set(strong) <= set(got)  # every edge stronger than the weakest kept one is kept
    for key, w in strong.items():
        assert got[key] == pytest.approx(w, rel=5e-3)
    # every node and link drawn at the starting thresholds; modules with two or more of the neurons as supernodes
    assert drawn(data, data["thresholds"]["node"], data["thresholds"]["edge"]) == (set(ids), set(got))
    table = pd.read_csv(dataset / layout.MODULES_DIR / layout.MODULES.format(m=M, weight="count"))
    module_of = dict(zip(table["node_id"], table["module"]))
    modules = [module_of.get(int(t), -1) for t in top]
    want_groups = {k for k in modules if k >= 0 and modules.count(k) >= 2}
    assert {g["name"] for g in data["supernodes"]} == {f"M{k}" for k in want_groups}
    for g in data["supernodes"]:
        k = int(g["name"][1:])
        members = {ids[i] for i in g["members"]}
        assert members == {f"{t // d}_{t % d}" for t, mk in zip(top, modules) if mk == k}
    assert all(c["examples"] and c["promoted"] for c in data["cards"])


@pytest.mark.slow
def test_a_causal_graph_of_a_dataset_without_direct_edges_is_one_error_line(dataset, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(dataset, plain)
    layout.path(plain, layout.DIRECT_EDGES, M).unlink()
    shutil.rmtree(layout.path(plain, layout.WEIGHTED_GRAPH, M))
    r = script("f_render_neuron_cards.py", "--dataset_path", plain, "--model_type", M, "--device", "cpu",
               "--neurons", "1,2", "--output", tmp_path / "out", "--causal_graph", "5")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "direct edges" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    # a dataset of another model: said so, not that it lacks direct edges
    r = script("f_render_neuron_cards.py", "--dataset_path", dataset, "--model_type", "tinyllama-bard", "--device",
               "cpu", "--neurons", "1,2", "--output", tmp_path / "out", "--causal_graph", "5")
    assert r.returncode == 2 and f"not a dataset of model 'tinyllama-bard'; it holds files of model(s) {M}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_gelutrace_serve_serves_a_folder_on_localhost(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "page.html").write_text(viewer.page_html(synthetic_data()), encoding="utf-8")
    (tmp_path / "secret.txt").write_text("not to be served")
    (served / "outside").symlink_to(tmp_path / "secret.txt")
    (served / ".lock").write_text("")
    proc = subprocess.Popen([sys.executable, "-m", "gelutrace.commands", "serve", str(served), "--port", "0"],
                            cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        with urllib.request.urlopen(url + "page.html", timeout=30) as r:
            assert r.read() == (served / "page.html").read_bytes()
        # nothing outside the folder through a link, no hidden file, no request naming another host
        for path, headers, status in (("outside", {}, 404), (".lock", {}, 404),
                                      ("page.html", {"Host": "evil.example"}, 403)):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=30)
            assert e.value.code == status, path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    r = run_python([sys.executable, "-m", "gelutrace.commands", "serve", str(tmp_path / "missing")], cwd=REPO_ROOT,
                   env=ENV)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def corpus_dataset(tmp_path_factory):
    ds = tmp_path_factory.mktemp("viewer_corpus") / "ds"
    r = script("b_generate_activation_dataset.py", "--input_text", HELDOUT_PATH, "--export_dir", ds, "--model_type", M,
               "--device", "cpu", "--max_tokens", "1500")
    assert r.returncode == 0, r.stderr[-2000:]
    return ds


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["prompt", "corpus"])
def test_shading_only_the_shown_examples_gives_the_same_shades(mode, request, shipped):
    """The cards' shading (checked against transformers in tests/test_cards.py and tests/test_corpus.py) limited to
    each neuron's first examples, as the trace page's cards ask: the same examples, the first shaded alike, the
    rest unshaded."""
    from gelutrace.report import cards

    data = request.getfixturevalue("dataset" if mode == "prompt" else "corpus_dataset")
    ids = np.array([3, 517, 1100, 2900])
    full = cards.neuron_examples(shipped.model, shipped.tokenizer, data, M, ids, 5)
    some = cards.neuron_examples(shipped.model, shipped.tokenizer, data, M, ids, 5, shade_top=2)
    for a, b in zip(full, some):
        assert [(e.value, e.sample_id, e.tokens, e.token) for e in a] == [(e.value, e.sample_id, e.tokens, e.token)
                                                                          for e in b]
        for rank, (x, y) in enumerate(zip(a, b)):
            # alike to float rounding: a window is run to another length, in another batch
            assert np.allclose(x.shades, y.shades, rtol=1e-5, atol=1e-5) if rank < 2 else len(y.shades) == 0
