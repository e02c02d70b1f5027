"""
The shipped model's viewer pages in headless Chromium: a per-prompt graph page ({m}_trace_graph.html) and the
causal graph page ({m}_causal_graph.html). For each: the file's size, the time from asking for the page to its
drawing done (document.body.dataset.ready = "1"; the best of three loads, polled every 10 ms), the nodes and links
drawn at its starting thresholds, and a screenshot with the most influential neuron's card open, in bench/out/.

The pages are the demo's where `make demo` has written them (parcellation_datasets/test_1_tinybard: traces/0/ and
neuron_cards/); otherwise built as the demo builds them, into bench/out/viewer_dataset/: a prompt-mode dataset of
test_1.csv with its direct edges, its co-activation graph and count modules, the first held-out prompt traced at
the default --max_nodes, and the causal page of the 50 most influential neurons (about 2 min on 2 cores).

    python bench/bench_viewer.py [--rebuild]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/browser.py: the browser, as the tests start it

import pandas as pd  # noqa: E402

from gelutrace.files import formats, layout  # noqa: E402

from browser import missing, start  # noqa: E402

M = "tinybard"
OUT = ROOT / "bench" / "out"
DEMO = ROOT / "parcellation_datasets" / "test_1_tinybard"
BUILT = OUT / "viewer_dataset"
CAUSAL_NEURONS = 50  # as the pipeline's cards stage


def pages(dataset: Path) -> tuple[Path, Path]:
    return (dataset / layout.TRACES_DIR / "0" / layout.TRACE_PAGE.format(m=M),
            dataset / layout.CARDS_DIR / layout.CAUSAL_PAGE.format(m=M))


def run(script: str, *args):
    start_s = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if r.returncode:
        sys.exit(f"{script} failed:\n{r.stderr[-3000:]}")
    print(f"  {script}: {time.perf_counter() - start_s:.1f} s")


def build(ds: Path):
    """The demo's prompt-mode dataset, its first trace and its causal page, as run_pipeline.sh writes them."""
    print(f"building the pages into {ds}")
    run("b_generate_activation_dataset.py", "--input_csv", ROOT / "parcellation_datasets" / "test_1.csv",
        "--export_dir", ds, "--model_type", M, "--device", "cpu", "--direct_edges")
    run("c_calculate_weighted_activation_graph.py", "--input_dir", ds)
    run("c_find_modules.py", "--input_path", layout.path(ds, layout.WEIGHTED_GRAPH, M), "--weight", "count")
    prompt = formats.read_prompts(ROOT / "parcellation_datasets" / f"heldout_{M}.csv")[0].text
    trace = ds / layout.TRACES_DIR / "0"
    run("b_trace_gelu_activations.py", "--model_type", M, "--device", "cpu", "--input_text", prompt, "--output_dir",
        trace, "--graph", "--dataset_path", ds, "--modules", ds / layout.MODULES_DIR / layout.MODULES.format(
            m=M, weight="count"))
    top = pd.read_csv(layout.path(trace, layout.TRACE_SUMMARY_CSV, M))
    d_mlp = 4 * json.loads((ROOT / "models" / M / "config.json").read_text())["n_embd"]
    neurons = list(dict.fromkeys((top["layer"] * d_mlp + top["dimension"]).tolist()))[:10]
    run("f_render_neuron_cards.py", "--dataset_path", ds, "--model_type", M, "--device", "cpu", "--neurons",
        ",".join(map(str, neurons)), "--output", ds / layout.CARDS_DIR, "--causal_graph", CAUSAL_NEURONS)


def top_neuron(page: Path) -> str:
    """The id of the page's neuron of least share (the most influential), from its embedded data."""
    text = page.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="gelutrace-data">(.*?)</script>', text,
                                re.S).group(1))
    nodes = data["nodes"]
    return min((s, i) for i, s, t in zip(nodes["id"], nodes["share"], nodes["type"]) if t == "neuron")[1]


def measure(browser, page: Path, shot: Path):
    seconds = min(browser.load(page) for _ in range(3))
    assert browser.console_errors() == [] and browser.outside_requests() == [], f"{page} is not clean"
    nodes = browser.script("return window.gelutraceViewer.drawnNodes().length")
    links = browser.script("return window.gelutraceViewer.drawnLinks().length")
    canvas = browser.script("return document.querySelectorAll('svg#graph path.link').length") == 0 and links > 0
    browser.script("window.gelutraceViewer.select(arguments[0])", top_neuron(page))
    browser.driver.save_screenshot(str(shot))
    print(f"{page.relative_to(ROOT)}: {page.stat().st_size / 1e6:.2f} MB, ready {1000 * seconds:.0f} ms after asking "
          f"for it, {nodes:,} nodes and {links:,} links drawn ({'canvas' if canvas else 'SVG'} links); "
          f"screenshot {shot.relative_to(ROOT)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rebuild", action="store_true", help=f"build the pages into {BUILT.relative_to(ROOT)} even "
                                                          "where the demo's exist")
    args = ap.parse_args()
    absent, fixes = missing()
    if absent:
        print(f"error: {' and '.join(absent)} not found ({'; '.join(fixes)})", file=sys.stderr)
        sys.exit(2)
    OUT.mkdir(parents=True, exist_ok=True)
    dataset = DEMO if all(p.is_file() for p in pages(DEMO)) and not args.rebuild else BUILT
    if dataset == BUILT and (args.rebuild or not all(p.is_file() for p in pages(BUILT))):
        build(BUILT)
    browser = start(1400, 900)
    try:
        for page, name in zip(pages(dataset), ("trace", "causal")):
            measure(browser, page, OUT / f"viewer_{name}.png")
    finally:
        browser.driver.quit()


if __name__ == "__main__":
    main()
