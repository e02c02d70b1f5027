"""
Functional modules of the neuron graph: Leiden community detection (igraph) on a thinned graph, its modularity
Q against degree-preserving rewired graphs, and how stable the partition is under seeds and between the halves
of the selection data.

Thinning: --threshold T keeps the edges whose normalised weight is > T; otherwise each node keeps its
--top_edges_per_node strongest edges (an edge stays when it is among the K strongest of either end; ties by a
seeded order, never by neuron id). Edges of weight <= 0 never count; --negative abs takes the absolute value of
negative weights (phi, pmi, direct) instead of dropping them. Detection optimises modularity, or with
--resolution R the constant Potts model at R. The null: the same detection on --null_graphs rewired graphs
(each layer pair's edges swapped in pairs, every node keeping its degree and each edge its weight); "no module
structure" unless Q exceeds every rewired graph's (empirical p <= 0.05, 19 graphs or more).

Writes into --output_dir (default <dataset dir>/modules): {m}_modules_{weight}.csv (node_id, layer, dimension,
module; modules numbered by decreasing size) and {m}_modules_{weight}.json (the graph, weight, thinning,
resolution, edges kept, number of modules, sizes, each module's layer composition, Q, the null's Q values, mean,
sd, z and p, the adjusted Rand index over --seeds seeds and between the two halves of the selection data).

    python c_find_modules.py --input_path parcellation_datasets/test_1_tinybard/tinybard_weighted_graph \\
        --weight phi --input_csv parcellation_datasets/test_1.csv
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.cli import parser, run_main
from gelutrace.files import atomic, formats, layout, plots
from gelutrace.files.dataset import DatasetDir
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.selection import communities as md
from gelutrace.selection import methods as sel
from gelutrace.selection import stability


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--input_path", required=True,
                    help="stage c's graph store (or its _analyzed.json reference, or a .gpickle with every edge)")
    ap.add_argument("--weight", default=gr.DEFAULT_WEIGHT, choices=gr.WEIGHTS,
                    help="edge weight (c_analyze's definitions; direct, direct_abs need stage b's --direct_edges) "
                         "(default: %(default)s)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="thin by the normalised weight: keep the edges > T (instead of --top_edges_per_node)")
    ap.add_argument("--top_edges_per_node", type=int, default=32, metavar="K",
                    help="thin to each node's K strongest edges (default: %(default)s)")
    ap.add_argument("--resolution", type=float, default=None,
                    help="optimise the constant Potts model at this resolution (a finite number > 0) instead of "
                         "modularity")
    ap.add_argument("--negative", choices=md.NEGATIVE, default="drop",
                    help="negative weights (phi, pmi, direct): drop them or take their absolute values "
                         "(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the detection and the tie-break (default: %(default)s)")
    ap.add_argument("--null_graphs", type=int, default=20, help="rewired graphs of the null (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=10,
                    help="runs under seeds seed, seed+1, ... for the adjusted Rand index (default: %(default)s)")
    ap.add_argument("--input_csv", default=None,
                    help="prompt mode: the prompt CSV stage b read, for the halves of the selection data (corpus "
                         "mode finds them from its shards)")
    ap.add_argument("--dataset_path", default=None,
                    help="stage b's directory (default: the one the graph sits in, else the one its store records)")
    ap.add_argument("--output_dir", default=None, help="where to write (default: <dataset dir>/modules)")
    args = ap.parse_args(argv)
    s = md.ModuleSettings(args.weight, args.threshold, args.top_edges_per_node, args.resolution, args.negative,
                          args.seed, args.null_graphs, args.seeds)
    s.check()
    graph = gs.read_graph(args.input_path)
    m = graph.model or "graph"
    try:
        data = sel.dataset_dir(graph, args.dataset_path)
    except PipelineError:
        if args.output_dir is None:
            raise
        data = None
    out = atomic.check_output_dir(Path(args.output_dir) if args.output_dir else data / layout.MODULES_DIR, "--output_dir")
    if args.output_dir is None and args.dataset_path is None and sel.graph_dataset(graph) is None:
        print(f"note: writing into {out}: the graph sits outside its dataset, {data}, which its store records "
              f"(--output_dir writes elsewhere)", file=sys.stderr)
    with tqdm(total=s.null_graphs, unit="graph", desc="rewired null") as bar:
        mods = md.find_modules(graph, s, bar.update)
    halves = None
    if data is not None:
        record = DatasetDir(data, m).corpus_record()
        prompts = formats.read_prompts(args.input_csv) if args.input_csv else None
        if record is not None or prompts is not None:
            halves = stability.halves_of(data, m, prompts, record)
    rec = md.describe(mods, graph, halves)
    table = pd.DataFrame({"node_id": graph.node_ids, "layer": graph.layer, "dimension": graph.dimension,
                          "module": mods.membership})
    between = md.module_edges(mods)
    names = [f.format(m=m, weight=s.weight) for f in (layout.MODULES, layout.MODULES_RECORD, layout.MODULES_LAYER_PLOT,
                                                       layout.MODULES_GRAPH_PLOT)]
    composition = np.zeros((rec["num_modules"], int(graph.layer.max()) + 1), np.int64)
    np.add.at(composition, (mods.membership, graph.layer), 1)
    atomic.lock_directory(out, "c_find_modules")
    with atomic.OutputSet(out, out / layout.MODULES_MANIFEST.format(m=m, weight=s.weight), names, "c_find_modules") as o:
        atomic.write_csv(table[layout.MODULES_COLUMNS], o.dir / names[0])
        atomic.write_json(rec, o.dir / names[1], indent=1)
        plots.plot_module_layers(composition, o.dir / names[2], f"{m}: neurons of each module ({s.weight} graph)")
        plots.plot_module_graph(np.bincount(mods.membership), between, o.dir / names[3],
                                f"{m}: modules of the {s.weight} graph, edges = summed weight between them")
        o.vouch([o.dir / n for n in names])
    print(md.verdict(rec))
    if rec["seed_ari"]["mean"] is not None:
        print(f"adjusted Rand index over {s.seeds} seeds: mean {rec['seed_ari']['mean']:.3f}, min "
              f"{rec['seed_ari']['min']:.3f}")
    if rec["halves"] is not None:
        ari = rec["halves"]["ari"]
        print(f"between the halves of the selection data ({rec['halves']['how']}): "
              + (f"adjusted Rand index {ari:.3f}" if ari is not None else "not available"))
    print(f"-> {out / names[0]}")


if __name__ == "__main__":
    run_main(main)
