"""
Stage c_analyze: normalised weights, histograms and the threshold sweep of a weighted co-activation graph.

Accepts stage c's compact store directory or a .gpickle. Zero-count edges are dropped; normalised weights are
count / max count (float64). Writes to --output_dir:
  {graph name}_analyzed.json     for a store: a small reference to the store plus the maxima (no edge data)
  {graph name}_analyzed.gpickle  for a .gpickle: the graph with activation_count_normalized and
                                 co_activation_count_normalized attributes
  node_activation_count_hist, edge_co_activation_count_hist, node_degree_hist (.png + .csv:
  bin_start, bin_end, density; edge counts over all non-zero edges, degrees over non-zero edges)
  threshold_analysis.csv (+ .png): edges with normalised weight <= t removed, t = 0.0, 0.1 ... 0.9

Edge weights (--weight), from an edge's count c, its ends' activation counts n_u, n_v and the samples N:
  count    c (the original's; the default)
  jaccard  c / (n_u + n_v - c), 0 when neither neuron fires
  phi      (N c - n_u n_v) / sqrt(n_u (N - n_u) n_v (N - n_v)), the correlation of the two neurons' 0/1
           activity; 0 when a neuron never or always fires
  pmi      log(c N / (n_u n_v)), -inf when c = 0
and, where stage b ran with --direct_edges, the causal weights (docs/methods.md, "Causal edge weights"):
  direct      u's mean first-order effect on v's value through the residual stream, norm scales held
              (negative: u's write lowers v)
  direct_abs  the mean of its absolute value per sample (an upper bound for gated units)
The normalised weight is weight / (its max over all edges) when that max is > 0; an edge is kept at threshold t
iff its normalised weight is > t, so edges with a weight <= 0 (phi, pmi: no more co-activation than chance;
direct: inhibition) are never kept. For a weight other than count the sweep and the analyzed graph are named with the weight
(threshold_analysis_phi.csv / .png, {graph name}_analyzed_phi.json); the analyzed graph records the weight
and its max (weight, max_weight), and an analyzed .gpickle's edges carry {weight} and {weight}_normalized.
The histograms do not depend on the weight.

    python c_analyze_weighted_activation_graph.py --input_path parcellation_datasets/test_1/gpt2_weighted_graph
"""

import sys
import time
from pathlib import Path

from gelutrace import PipelineError
from gelutrace.cli import check_at_least, parser, run_main
from gelutrace.files import atomic, layout, plots
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.selection import analysis as ga


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--input_path", required=True,
                    help="stage c's output: a compact graph store directory or a .gpickle")
    ap.add_argument("--output_dir", default=None,
                    help="where the analysis goes (default: <input graph's directory>/weighted_graph_analysis)")
    ap.add_argument("--hist_sample_size", type=int, default=None,
                    help="accepted for compatibility and ignored: histograms cover every edge, exactly")
    ap.add_argument("--bins", type=int, default=50, help="histogram bins (default: %(default)s)")
    ap.add_argument("--weight", default=gr.DEFAULT_WEIGHT,
                    help=f"edge weight of the threshold sweep: {', '.join(gr.WEIGHTS)} (definitions and threshold "
                         f"rule above; phi and pmi need the number of samples) (default: %(default)s)")
    args = ap.parse_args(argv)

    t0 = time.time()
    src = Path(args.input_path)
    check_at_least(args, 1, "bins")
    gr.check_weight(args.weight)
    if src.suffix == ".json":
        raise PipelineError(f"{src} is already an analysis; pass the graph store or .gpickle that stage c wrote")
    if src.suffix == ".gpickle" and src.is_file():
        nxg = gs.load_gpickle(src)
        graph = gs.graph_from_networkx(nxg, str(src))
    else:
        nxg, graph = None, gs.read_graph(src)
    out = atomic.check_output_dir(Path(args.output_dir) if args.output_dir else src.resolve().parent / layout.ANALYSIS_DIR,
                              "--output_dir")
    atomic.lock_directory(out, "stage c_analyze")
    if args.hist_sample_size is not None:
        print("note: --hist_sample_size is ignored; histograms use every edge", file=sys.stderr)

    weight = graph.weight(args.weight)
    sweep = ga.threshold_sweep(graph, weight=args.weight)
    hists = {
        layout.HIST_NODE_COUNT: (ga.histogram(graph.activation_count, args.bins),
                             "Neuron activation counts", "activation count (samples)"),
        layout.HIST_EDGE_COUNT: (ga.histogram(bins=args.bins, bincount=ga.edge_count_bincount(graph)),
                             "Edge co-activation counts (non-zero edges)", "co-activation count (samples)"),
        layout.HIST_DEGREE: (ga.histogram(graph.degrees(graph.cut(0.0)), args.bins),
                         "Neuron degrees (edges with co-activation > 0)", "degree"),
    }
    analyzed = out / gs.analyzed_name(src, args.weight)
    if nxg is not None:
        gs.write_gpickle(gs.analyzed_networkx(nxg, graph, args.weight), analyzed)
    else:
        gs.write_analyzed_reference(graph, analyzed, args.weight)
    for name, (df, title, xlabel) in hists.items():
        atomic.write_csv(df, out / f"{name}.csv")
        plots.plot_histogram(df, out / f"{name}.png", title, xlabel)
    atomic.write_csv(sweep, out / layout.weighted_name(layout.THRESHOLD_CSV, args.weight))
    plots.plot_threshold_sweep(sweep, out / layout.weighted_name(layout.THRESHOLD_PLOT, args.weight), weight=args.weight)
    print(sweep.to_string(index=False))
    print(f"{graph.num_nodes:,} nodes, max activation {graph.max_activation}, max co-activation "
          f"{graph.max_co_activation}, weight {args.weight} (max {weight.max:.6g}) -> {analyzed} "
          f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    run_main(main)
