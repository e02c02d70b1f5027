"""
The offline pages in headless Chromium (tests/browser.py): the shipped model's per-prompt graph page
({m}_trace_graph.html), its corpus causal graph page ({m}_causal_graph.html) and the cards page neurons.html, built
once for this module from a small prompt-mode dataset whose every prompt carries markup (`<script>`, `<img
onerror=…>`, `<!--`). Each page logs no console error, asks for no URL but its own, and opens no dialog; what it
draws is checked against the graph file read here with json (the nodes and links at the file's thresholds, and at
lower ones by the pruning rule), its cards against the dataset's top-examples table read with pandas.
"""

import json
import os
import re
import sys

import pandas as pd
import pytest

from gelutrace.files import atomic, layout

from browser import chromium
from conftest import REPO_ROOT, SHIPPED_NAME, run_python

M = SHIPPED_NAME
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
MARKUP = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "<!--"]
# each markup prompt with its continuation at most 24 tokens (the cards' examples show 24): every top example
# drawn from one shows its markup whole
PROMPTS = [(f"KING HENRY. {MARKUP[0]}", 4, 1), (f"God said {MARKUP[1]}", 3, 1),
           (f"To be, or not {MARKUP[2]} to be, that is ", 8, 1), ("KING HENRY. Now, lords, ", 12, 1)]
TRACE_PROMPT = "KING HENRY. Now, lords, for France"
CAUSAL_NODES = 30
# the pages' tests share this module's dataset, trace and cards (about 15 s to build on 2 cores, more under load)
PAGES = pytest.mark.slow
D_MLP = 4 * json.loads((REPO_ROOT / "models" / M / "config.json").read_text())["n_embd"]  # GPT-2: n_inner unset


def script(name, *args):
    r = run_python([sys.executable, str(REPO_ROOT / name), *map(str, args)], cwd=REPO_ROOT, env=ENV)
    atomic.release_locks()
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped_path):
    """A prompt-mode dataset of the shipped model with its causal edges, its graph store and count modules."""
    d = tmp_path_factory.mktemp("viewer")
    csv = d / "prompts.csv"
    pd.DataFrame(PROMPTS, columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    ds = d / "ds"
    script("b_generate_activation_dataset.py", "--input_csv", csv, "--export_dir", ds, "--model_type", M, "--device",
           "cpu", "--direct_edges", "--no_activation_lists")
    script("c_calculate_weighted_activation_graph.py", "--input_dir", ds)
    script("c_find_modules.py", "--input_path", layout.path(ds, layout.WEIGHTED_GRAPH, M), "--weight", "count",
           "--null_graphs", "2", "--seeds", "2")
    return ds


@pytest.fixture(scope="module")
def top_examples(dataset):
    """Each neuron's rank-0 example, (context, token), from the dataset's table."""
    table = pd.read_csv(layout.path(dataset, layout.TOP_EXAMPLES, M), keep_default_na=False)
    first = table[table["rank"] == 0]
    return {int(n): (c, t) for n, c, t in zip(first["neuron_id"], first["context"], first["token"])}


@pytest.fixture(scope="module")
def trace(dataset):
    """(the trace page, its graph file read with json)."""
    out = dataset.parent / "trace"
    modules = dataset / layout.MODULES_DIR / layout.MODULES.format(m=M, weight="count")
    script("b_trace_gelu_activations.py", "--model_type", M, "--device", "cpu", "--input_text", TRACE_PROMPT,
           "--output_dir", out, "--graph", "--max_nodes", "150", "--dataset_path", dataset, "--modules", modules,
           "--faithfulness_nodes", "0")
    doc = json.loads((out / f"{M}_trace_graph.json").read_text(encoding="utf-8"))
    return out / f"{M}_trace_graph.html", doc


@pytest.fixture(scope="module")
def big_trace(dataset):
    """(the page, its graph file) of a trace with more links than the page draws as SVG: links on a canvas."""
    out = dataset.parent / "big_trace"
    script("b_trace_gelu_activations.py", "--model_type", M, "--device", "cpu", "--input_text", TRACE_PROMPT,
           "--output_dir", out, "--graph", "--max_nodes", "600", "--faithfulness_nodes", "0")
    return out / f"{M}_trace_graph.html", json.loads((out / f"{M}_trace_graph.json").read_text(encoding="utf-8"))


def marked(top_examples) -> list[int]:
    """For each markup string, the first neuron whose top example holds it."""
    return [next(n for n, (c, t) in sorted(top_examples.items()) if m in c + t) for m in MARKUP]


@pytest.fixture(scope="module")
def causal(dataset, top_examples):
    """The cards' directory: neurons.html of the neurons marked(), and the causal page."""
    out = dataset.parent / "cards"
    script("f_render_neuron_cards.py", "--dataset_path", dataset, "--model_type", M, "--device", "cpu", "--neurons",
           ",".join(map(str, marked(top_examples))), "--output", out, "--causal_graph", CAUSAL_NODES,
           "--top_examples", "3")
    return out


# ---------------------------------------------------------------------------------------------------------------
# reading a page


def embedded(page) -> dict:
    """The data a page embeds (script#gelutrace-data), read from its file with a regular expression and json."""
    m = re.search(r'<script type="application/json" id="gelutrace-data">(.*?)</script>', page.read_text("utf-8"), re.S)
    return json.loads(m.group(1))


def drawn_nodes(browser) -> list[str]:
    """The ids of the g.node elements shown, checked against the page's own list."""
    dom = browser.script("return [...document.querySelectorAll('svg#graph g.node')]"
                         ".filter(g => getComputedStyle(g).display !== 'none').map(g => g.dataset.id)")
    assert sorted(dom) == sorted(browser.script("return window.gelutraceViewer.drawnNodes()"))
    return dom


def drawn_links(browser) -> list[tuple[str, str]]:
    """The links drawn: the path.link elements shown, or where the page draws links on a canvas (no path.link),
    the pairs it says it drew."""
    dom = browser.script("return [...document.querySelectorAll('svg#graph path.link')]"
                         ".filter(p => getComputedStyle(p).display !== 'none')"
                         ".map(p => [p.dataset.source, p.dataset.target])")
    api = [tuple(pair) for pair in browser.script("return window.gelutraceViewer.drawnLinks()")]
    if dom:
        assert sorted(map(tuple, dom)) == sorted(api), "the links drawn differ from drawnLinks()"
    return api


def assert_offline_and_clean(browser):
    assert browser.console_errors() == []
    assert browser.outside_requests() == []
    assert browser.dialogs() == []


def node_element(browser, node_id):
    from selenium.webdriver.common.by import By

    return browser.driver.find_element(By.CSS_SELECTOR, f'svg#graph g.node[data-id="{node_id}"]')


def click(browser, node_id, shift=False):
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    element = node_element(browser, node_id)
    try:
        if shift:
            ActionChains(browser.driver).key_down(Keys.SHIFT).click(element).key_up(Keys.SHIFT).perform()
        else:
            element.click()
    except ElementClickInterceptedException as e:  # the node's own area, where a user clicks it, is covered
        raise AssertionError(f"a click on g.node[data-id={node_id}] at its centre reaches another element: "
                             f"{e.msg.splitlines()[0]}") from None


def card(browser) -> dict:
    """#card's parts, as text."""
    return browser.script("""
        const card = document.querySelector('#card');
        const text = sel => [...card.querySelectorAll(sel)].map(e => e.textContent);
        return {label: text('.card-label'), examples: text('.card-example'), module: text('.card-module'),
                promoted: text('.card-promoted'), suppressed: text('.card-suppressed'),
                tokens: card.querySelectorAll('.card-example span.tok').length,
                shaded: [...card.querySelectorAll('.card-example span.tok')].filter(s => s.style.background).length,
                imgs: card.querySelectorAll('img').length, scripts: card.querySelectorAll('script').length,
                text: card.textContent}""")


def squeeze(s: str) -> str:
    """Text without whitespace and the marks a page may show newlines as: what a card's tokens and the table's
    context and token have in common however the page spaces them."""
    return re.sub(r"[\s⏎↵]", "", s)


# ---------------------------------------------------------------------------------------------------------------
# the harness itself: a page that breaks every rule is caught


BAD_PAGE = """<!doctype html><html><head><link rel="icon" href="data:,"></head><body><svg id="graph"></svg>
<script src="beside.js"></script>
<script>
console.error("an error");
fetch("http://198.51.100.1/x").catch(() => {}).finally(() => { alert("a dialog"); document.body.dataset.ready = "1"; });
</script></body></html>"""


def test_the_harness_sees_console_errors_requests_and_dialogs(browser, tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(BAD_PAGE, encoding="utf-8")
    browser.load(page)
    errors, requests, outside, dialogs = (browser.console_errors(), browser.requests(), browser.outside_requests(),
                                          browser.dialogs())
    assert any("an error" in e for e in errors), errors
    assert "http://198.51.100.1/x" in outside, outside
    assert (tmp_path / "beside.js").as_uri() in outside, outside  # another file is outside the page too
    assert page.as_uri() in requests and page.as_uri() not in outside, requests
    assert "a dialog" in dialogs, dialogs
    good = tmp_path / "good.html"
    good.write_text('<!doctype html><html><head><link rel="icon" href="data:,"></head><body>'
                    '<script>document.body.dataset.ready = "1"</script></body></html>', encoding="utf-8")
    browser.load(good)  # the last page's logs are gone
    assert_offline_and_clean(browser)


@PAGES
def test_the_cards_page_is_offline_and_clean(browser, causal, top_examples):
    browser.load(causal / layout.CARDS_HTML, ready=False)  # no script: nothing to wait for
    assert browser.script("return document.readyState") == "complete"
    assert_offline_and_clean(browser)
    text = browser.script("return document.body.textContent")
    assert browser.script("return document.querySelectorAll('img, script').length") == 0
    for n, m in zip(marked(top_examples), MARKUP):  # each card's top example, its markup shown as text
        assert f"Neuron {n} (layer {n // D_MLP}, dimension {n % D_MLP})" in text
        context, token = top_examples[n]
        assert m in text and squeeze(context + token) in squeeze(text)


# ---------------------------------------------------------------------------------------------------------------
# the trace page



def neuron_of(node: dict) -> int:
    layer, dim, _ = node["node_id"].split("_")
    return int(layer) * D_MLP + int(dim)


def neuron_nodes(doc) -> list[dict]:
    """The file's neuron nodes, the most influential (lowest cumulative score) first."""
    return sorted((n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"),
                  key=lambda n: n["influence"])


def expected_at(data: dict, node_threshold: float, edge_threshold: float):
    """The contract's rule on the page's data: a node is shown iff its cumulative score (share) is at most the node
    threshold, a link iff both its ends are shown and its share is at most the edge threshold."""
    ids, nodes, links = data["nodes"]["id"], data["nodes"], data["links"]
    shown = [s <= node_threshold for s in nodes["share"]]
    return ({ids[i] for i, keep in enumerate(shown) if keep},
            {(ids[s], ids[t]) for s, t, share in zip(links["source"], links["target"], links["share"])
             if shown[s] and shown[t] and share <= edge_threshold})


@PAGES
def test_the_trace_page_is_offline_and_draws_the_files_graph(browser, trace):
    page, doc = trace
    browser.load(page)
    assert_offline_and_clean(browser)
    # nothing in the page points outside it
    assert browser.script("return [...document.querySelectorAll('[src], [href]')]"
                          ".map(e => e.getAttribute('src') || e.getAttribute('href'))"
                          ".filter(u => !u.startsWith('data:') && !u.startsWith('#'))") == []
    ids = [n["node_id"] for n in doc["nodes"]]
    links = [(link["source"], link["target"]) for link in doc["links"]]
    nodes, drawn = drawn_nodes(browser), drawn_links(browser)
    assert len(nodes) == len(ids) and sorted(nodes) == sorted(ids)
    assert len(drawn) == len(links) and sorted(drawn) == sorted(links)
    assert len(browser.script("return [...document.querySelectorAll('svg#graph path.link')]")) == len(links)
    ps = doc["metadata"]["pruning_settings"]
    assert float(browser.script("return document.querySelector('input#node-threshold').value")) == ps["node_threshold"]
    assert float(browser.script("return document.querySelector('input#edge-threshold').value")) == ps["edge_threshold"]
    assert browser.script("return document.querySelector('input#node-threshold').type") == "range"


@PAGES
def test_the_trace_layout_tokens_along_x_layers_up_y_sizes_by_influence_and_weight(browser, trace):
    page, doc = trace
    browser.load(page)
    at = browser.script("""
        return Object.fromEntries([...document.querySelectorAll('svg#graph g.node')].map(g => {
            const b = g.querySelector('circle, rect').getBoundingClientRect();
            return [g.dataset.id, [(b.left + b.right) / 2, (b.top + b.bottom) / 2, b.width]]; }))""")
    # layers up y: embeddings at the bottom, then layer 0 ... the last layer, the logits at the top
    row = {n["node_id"]: -1 if n["feature_type"] == "embedding" else int(n["layer"]) for n in doc["nodes"]}
    assert max(row.values()) == max(row[n["node_id"]] for n in doc["nodes"] if n["feature_type"] == "logit")
    ys = {r: [at[i][1] for i in row if row[i] == r] for r in set(row.values())}
    rows = sorted(ys)
    assert all(min(ys[lower]) > max(ys[upper]) for lower, upper in zip(rows, rows[1:]))  # screen y grows downwards
    # prompt positions along x: every node of a position left of every node of a later one
    xs = {}
    for n in doc["nodes"]:
        xs.setdefault(n["ctx_idx"], []).append(at[n["node_id"]][0])
    cols = sorted(xs)
    assert all(max(xs[a]) < min(xs[b]) for a, b in zip(cols, cols[1:]))
    # the prompt's tokens label the positions, under the lowest node
    bottom = max(y for _, y, _ in at.values())
    under = browser.script("return [...document.querySelectorAll('svg#graph text')].filter(t => "
                           "t.getBoundingClientRect().top > arguments[0]).map(t => t.textContent)", bottom)
    tokens = doc["metadata"]["prompt_tokens"]
    assert all(under.count(t) >= tokens.count(t) for t in tokens)
    # neurons sized by influence: the lower their cumulative score (the more influential), the larger
    neurons = neuron_nodes(doc)
    sizes = [at[n["node_id"]][2] for n in neurons]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    # links: colour by sign, width by |weight|
    weight = {(link["source"], link["target"]): link["weight"] for link in doc["links"]}
    drawn = browser.script("return [...document.querySelectorAll('svg#graph path.link')].map(p => [p.dataset.source, "
                           "p.dataset.target, getComputedStyle(p).stroke, "
                           "parseFloat(getComputedStyle(p).strokeWidth)])")
    colour = {}
    for source, target, stroke, _ in drawn:
        colour.setdefault(weight[(source, target)] >= 0, set()).add(stroke)
    assert len(colour[True]) == len(colour[False]) == 1 and colour[True] != colour[False]
    widths = [w for *_, w in sorted(drawn, key=lambda d: abs(weight[(d[0], d[1])]))]
    assert widths == sorted(widths) and widths[0] < widths[-1]


@PAGES
def test_a_large_graph_draws_its_links_on_a_canvas(browser, big_trace):
    page, doc = big_trace
    browser.load(page)
    assert_offline_and_clean(browser)
    links = {(link["source"], link["target"]) for link in doc["links"]}
    assert browser.script("return document.querySelectorAll('svg#graph path.link').length") == 0, "links as SVG"
    assert set(drawn_nodes(browser)) == {n["node_id"] for n in doc["nodes"]} and set(drawn_links(browser)) == links
    painted = """return [...document.querySelectorAll('canvas')].reduce((sum, c) => {
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let k = 3; k < px.length; k += 4) n += px[k] > 0; return sum + n; }, 0)"""
    everything = browser.script(painted)
    browser.script("window.gelutraceViewer.setThresholds(arguments[0], arguments[1])", 0.3, 0.3)
    fewer = browser.script(painted)
    browser.script("window.gelutraceViewer.setThresholds(0, 0)")
    assert everything > fewer > browser.script(painted)  # the canvas shows the links drawn, fewer as they are pruned


@PAGES
def test_lower_thresholds_draw_the_subset_the_pruning_rule_gives(browser, trace):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page, doc = trace
    data = embedded(page)
    # the page's data is the file's graph; its shares (the influence of the nodes above) ordered as the file's
    # cumulative scores, and at most them
    assert sorted(data["nodes"]["id"]) == sorted(n["node_id"] for n in doc["nodes"])
    ids = data["nodes"]["id"]
    assert sorted((ids[s], ids[t]) for s, t in zip(data["links"]["source"], data["links"]["target"])) == sorted(
        (link["source"], link["target"]) for link in doc["links"])
    share = dict(zip(ids, data["nodes"]["share"]))
    ranked = sorted((n for n in doc["nodes"] if n["feature_type"] in ("cross layer transcoder",
                                                                      "mlp reconstruction error")),
                    key=lambda n: n["influence"])
    assert all(share[n["node_id"]] <= n["influence"] + 1e-9 for n in ranked)
    assert [share[n["node_id"]] for n in ranked] == sorted(share[n["node_id"]] for n in ranked)
    browser.load(page)
    ps = doc["metadata"]["pruning_settings"]
    file_nodes, file_links = set(ids), {(link["source"], link["target"]) for link in doc["links"]}
    for node_t, edge_t in ((0.5, ps["edge_threshold"]), (ps["node_threshold"], 0.6), (0.3, 0.5), (0.0, 0.0)):
        browser.script("window.gelutraceViewer.setThresholds(arguments[0], arguments[1])", node_t, edge_t)
        nodes, links = expected_at(data, node_t, edge_t)
        assert set(drawn_nodes(browser)) == nodes and set(drawn_links(browser)) == links
        assert nodes <= file_nodes and links <= file_links and (nodes, links) != (file_nodes, file_links)
        assert (len(drawn_nodes(browser)), len(drawn_links(browser))) == (len(nodes), len(links))
    # the node slider moved with the mouse: a click at a third of its width
    browser.script("window.gelutraceViewer.setThresholds(arguments[0], arguments[1])", ps["node_threshold"],
                   ps["edge_threshold"])
    slider = browser.driver.find_element(By.CSS_SELECTOR, "input#node-threshold")
    ActionChains(browser.driver).move_to_element_with_offset(slider, -slider.size["width"] // 6, 0).click().perform()
    value = float(slider.get_attribute("value"))
    assert 0.1 < value < 0.6
    nodes, links = expected_at(data, value, ps["edge_threshold"])
    assert set(drawn_nodes(browser)) == nodes and set(drawn_links(browser)) == links and nodes < file_nodes
    browser.script("window.gelutraceViewer.setThresholds(arguments[0], arguments[1])", ps["node_threshold"],
                   ps["edge_threshold"])
    assert set(drawn_nodes(browser)) == file_nodes and set(drawn_links(browser)) == file_links
    assert_offline_and_clean(browser)


@PAGES
def test_clicking_a_node_shows_its_card_and_shift_click_pins_it(browser, trace, top_examples):
    from selenium.webdriver.common.by import By

    page, doc = trace
    browser.load(page)
    module_of = {m: name for name, *members in doc["qParams"]["supernodes"] for m in members}
    for node in neuron_nodes(doc)[:3]:
        click(browser, node["node_id"])
        shown = card(browser)
        assert shown["label"] == [node["clerp"]]
        context, token = top_examples[neuron_of(node)]
        assert shown["examples"] and squeeze(shown["examples"][0]) == squeeze(context + token)
        assert shown["tokens"] > 0 and shown["shaded"] == shown["tokens"]
        assert shown["promoted"] and shown["suppressed"]
        if node["node_id"] in module_of:
            assert shown["module"] and shown["module"][0] in module_of[node["node_id"]]
    pinned = set(doc["qParams"]["pinnedIds"])
    assert set(browser.script("return window.gelutraceViewer.pinned()")) == pinned
    assert set(browser.script("return [...document.querySelectorAll('g.node.pinned')].map(g => g.dataset.id)")
               ) == pinned
    for node in (neuron_nodes(doc)[-1]["node_id"], doc["nodes"][-1]["node_id"]):  # shift-click toggles the pin
        was = node in pinned
        label = card(browser)["label"]
        for _ in range(2):
            click(browser, node, shift=True)
            now = set(browser.script("return window.gelutraceViewer.pinned()"))
            assert now == pinned ^ {node}
            assert ("pinned" in node_element(browser, node).get_attribute("class").split()) == (node in now)
            assert card(browser)["label"] == label  # pinning is not selecting
            pinned = now
        assert (node in pinned) == was
    node = neuron_nodes(doc)[0]["node_id"]  # the card's pin button toggles the pin of the node it shows
    click(browser, node)
    for _ in range(2):
        browser.driver.find_element(By.CSS_SELECTOR, "#card button#pin").click()
        now = set(browser.script("return window.gelutraceViewer.pinned()"))
        assert now == pinned ^ {node}
        assert ("pinned" in node_element(browser, node).get_attribute("class").split()) == (node in now)
        pinned = now
    assert_offline_and_clean(browser)


@PAGES
def test_supernodes_are_drawn_as_groups_behind_their_members(browser, trace):
    page, doc = trace
    browser.load(page)
    groups = doc["qParams"]["supernodes"]
    assert groups, "no module held two kept nodes: the test's dataset is too small"
    drawn = browser.script("return [...document.querySelectorAll('svg#graph g.supernode')].map(g => g.dataset.name)")
    assert sorted(drawn) == sorted(name for name, *_ in groups)
    for name, *members in groups:
        box, centres, behind = browser.script("""
            const g = [...document.querySelectorAll('svg#graph g.supernode')]
              .find(g => g.dataset.name === arguments[0]);
            const r = g.getBoundingClientRect(), box = [r.left, r.top, r.right, r.bottom];
            const nodes = arguments[1].map(id => document.querySelector(`svg#graph g.node[data-id="${id}"]`));
            const centres = nodes.map(n => { const b = n.getBoundingClientRect();
                                             return [(b.left + b.right) / 2, (b.top + b.bottom) / 2]; });
            return [box, centres, nodes.every(n => g.compareDocumentPosition(n) & Node.DOCUMENT_POSITION_FOLLOWING)];
            """, name, members)
        assert behind  # drawn before (under) its members
        assert all(box[0] - 1 <= x <= box[2] + 1 and box[1] - 1 <= y <= box[3] + 1 for x, y in centres)


@PAGES
def test_markup_in_the_corpus_is_shown_as_text(browser, trace, causal, top_examples):
    """Every prompt of the dataset carries <script>, <img onerror=…> or <!--: the cards and labels show them as
    text, no element is made of them, no dialog opens; the page files hold none of them raw."""
    page, doc = trace
    labels = []
    for html in (page, causal / f"{M}_causal_graph.html"):
        raw = html.read_text(encoding="utf-8")
        assert not any(m in raw for m in MARKUP), f"{html.name} holds markup unescaped"
    for html, ids in ((page, [n["node_id"] for n in neuron_nodes(doc)]),
                      (causal / f"{M}_causal_graph.html", embedded(causal / f"{M}_causal_graph.html")["nodes"]["id"])):
        browser.load(html)
        seen = set()
        for node in ids:
            layer, dim = map(int, node.split("_")[:2])
            context, token = top_examples[layer * D_MLP + dim]
            found = {m for m in MARKUP if m in context + token} - seen
            if not found:
                continue
            click(browser, node)
            shown = card(browser)
            assert all(m in shown["examples"][0] for m in found) and all(m in shown["text"] for m in found)
            assert shown["imgs"] == 0 and shown["scripts"] == 0
            seen |= found
        assert seen == set(MARKUP), f"{html.name}: no drawn neuron's top example holds {set(MARKUP) - seen}"
        # the labels quote the examples (markup among them): each node's tooltip is its label, as text
        titles = browser.script("return Object.fromEntries([...document.querySelectorAll('svg#graph g.node')]"
                                ".map(g => [g.dataset.id, g.querySelector('title').textContent]))")
        data = embedded(html)["nodes"]
        assert titles == dict(zip(data["id"], data["label"]))
        labels += data["label"]
        assert browser.script("return document.querySelectorAll('img, iframe, object').length") == 0
        assert browser.script("return document.querySelectorAll('script').length") == 3  # data, d3, the viewer
        assert_offline_and_clean(browser)
    assert any("<" in label for label in labels)


# ---------------------------------------------------------------------------------------------------------------
# the causal page


@PAGES
def test_the_causal_page_draws_its_neurons_modules_and_cards(browser, dataset, causal, top_examples):
    page = causal / f"{M}_causal_graph.html"
    browser.load(page)
    assert_offline_and_clean(browser)
    nodes, links = drawn_nodes(browser), drawn_links(browser)
    assert len(nodes) == len(set(nodes)) == CAUSAL_NODES
    assert links and all(s in nodes and t in nodes for s, t in links)
    data = embedded(page)
    assert sorted(links) == sorted((data["nodes"]["id"][s], data["nodes"]["id"][t])
                                   for s, t in zip(data["links"]["source"], data["links"]["target"]))
    # modules as groups: those of c_find_modules' count table (read with pandas) holding two or more drawn neurons
    table = pd.read_csv(dataset / layout.MODULES_DIR / layout.MODULES.format(m=M, weight="count"))
    module_of = dict(zip(zip(table["layer"], table["dimension"]), table["module"]))
    members = {}
    for node in nodes:
        layer, dim = map(int, node.split("_"))
        members.setdefault(module_of[(layer, dim)], []).append(node)
    groups = {k: ids for k, ids in members.items() if len(ids) >= 2}
    assert groups
    names = browser.script("return [...document.querySelectorAll('svg#graph g.supernode')].map(g => g.dataset.name)")
    assert len(names) == len(groups)
    assert all(any(re.search(rf"(?<!\d){k}(?!\d)", name) for name in names) for k in groups)
    # a click shows the neuron's card: its top example as the dataset's table has it, its module
    for node in nodes[:3]:
        click(browser, node)
        shown = card(browser)
        layer, dim = map(int, node.split("_"))
        context, token = top_examples[layer * D_MLP + dim]
        assert shown["label"] and shown["label"][0].startswith(f"L{layer}/N{dim}")
        assert squeeze(shown["examples"][0]) == squeeze(context + token)
        assert re.search(rf"(?<!\d){module_of[(layer, dim)]}(?!\d)", shown["module"][0])
        assert shown["promoted"] and shown["suppressed"]
    assert_offline_and_clean(browser)
