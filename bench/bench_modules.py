"""
c_find_modules.py: wall time and peak RSS, the 20 rewired null graphs and 10 seeds included (the defaults).

    .venv/bin/python bench/bench_modules.py

1. The shipped model: the demo's corpus-mode store (parcellation_datasets/heldout_corpus_tinybard_tinybard,
   made by `make demo`), weights count and direct_abs; target <= 10 s each.
2. GPT-2-small shape (12 x 3072 = 36,864 neurons, K = 32): a store of 2,500 synthetic samples, each neuron firing
   in a random 10-50 % of them (bench_graph's dataset, counted by stage c); target <= 60 s.

Each run is the script as a user runs it (a subprocess). Data goes to bench/out/modules (git-ignored).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_graph import make_dataset  # noqa: E402
from peak import run_measured  # noqa: E402

from gelutrace.files import layout

DEMO = ROOT / "parcellation_datasets" / "heldout_corpus_tinybard_tinybard"


def measure(label: str, args: list[str]):
    wall, rss = run_measured(label, args)
    print(f"{label:<52} {wall:>7.1f} s  {rss:>5.2f} GiB", flush=True)


def main():
    out = ROOT / "bench" / "out" / "modules"
    out.mkdir(parents=True, exist_ok=True)
    script = str(ROOT / "c_find_modules.py")
    store = layout.path(DEMO, layout.WEIGHTED_GRAPH, "tinybard")
    if store.is_dir():
        for w in ("count", "direct_abs"):
            measure(f"shipped model, corpus store, {w}", [script, "--input_path", str(store), "--weight", w,
                                                          "--output_dir", str(out / "shipped")])
    else:
        print(f"(no {store}: run make demo for measurement 1)")
    d = out / "gpt2_small"
    if not layout.path(d, layout.WEIGHTED_GRAPH, "gpt2").is_dir():
        make_dataset(d, "gpt2", 12, 3072, 2500, seed=0)
        run_measured("stage c", [str(ROOT / "c_calculate_weighted_activation_graph.py"), "--input_dir", str(d)])
    measure("GPT-2-small shape, 2,500 samples, count, K = 32", [
        script, "--input_path", str(layout.path(d, layout.WEIGHTED_GRAPH, "gpt2")), "--output_dir", str(out / "gpt2")])


if __name__ == "__main__":
    main()
