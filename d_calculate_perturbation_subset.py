"""
Stage d: a perturbation subset of influential neurons from an analyzed co-activation graph.

Keeps the edges with normalised weight > --threshold (all nodes stay), takes k = max(1, int(N * --ratio))
nodes (at most N; or k = --k) ranked by --method, ties in a random order seeded by --seed (never by node id),
and writes their ids (int64, rank order) as .npy plus a sidecar .json (parameters, k, per-layer counts, each
neuron's score, and how the cut sits on ties: tied_picks, tie_pool, zero_score_picks). Several --ratio or --k
values write one subset each from one ranking: the subsets of a method at growing k are prefixes of each other
(random draws each k afresh from --seed).

What stage e reads instead of ranking again: every neuron's score under the method variant (float64, in neuron
id order), once for its subsets at every k, in scores/{m}_{method}[_{weight}][_t{threshold}].npy beside the
subsets (the sidecar's score_file, with its score_sha256; null for random), and the subset chosen again on each
half of the selection data (the sidecar's halves: available, how, half_a, half_b; docs/stage-d.md). The
halves of a corpus-mode dataset are its shards; a prompt-mode dataset's are its prompt CSV's rows, so they need
--input_csv (without it the sidecar says why there are none).

Methods on the thresholded graph: degree (the original's), weighted_degree, pagerank. Through the causal graph
(stage b --direct_edges), with no threshold: influence, each neuron's effect on the next token's loss directly
and through every later neuron it drives (I = s + |E~| I, docs/methods.md "Influence"). Methods that need
no graph (--threshold is ignored and recorded as null; files are named {m}_{method}_r{ratio}.npy):
activation_count, attribution (stage b's first-order estimate of each neuron's single-ablation delta_nll,
from {m}_neuron_frequency.csv), direct_loss (mean |direct_loss| of stage b --direct_edges: influence's seed
term s, without the graph), magnitude (mean |a_u| times ||w_out,u||, the size of what the neuron writes into the
stream; stage b --direct_edges records both), ablation (measured single-neuron delta_nll, from {m}_neuron_effects.csv of
d_calculate_neuron_effects.py), random (seeded; with --match_layers, the per-layer composition of another
subset).

Edge weight (--weight): count (the original's, the default), jaccard, phi or pmi, or the causal direct and
direct_abs (stage b --direct_edges), as defined in c_analyze_weighted_activation_graph.py --help. The normalised weight is weight / (its max over all edges) when
that max is > 0, and an edge is kept iff its normalised weight is > --threshold: edges with a weight <= 0 are
never kept. weighted_degree sums the kept edges' normalised weights; pagerank weights edges by count for count,
by the normalised weight otherwise. The weight applies to degree, weighted_degree and pagerank; for
the other methods it does not (the sidecar's weight is null). --output_dir names a weighted subset
{m}_{method}_{weight}_t{threshold}_r{ratio}.npy (count keeps {m}_{method}_t{threshold}_r{ratio}.npy); the sidecar
records weight and max_weight (the max used to normalise).

Layers left out (--exclude_layers L ...): every method ranks, and random draws, only the neurons of the other
layers (each neuron keeps its score from the whole graph; ties in the full ranking's seeded order, so the subset is
the full ranking with those layers' neurons taken out); k counts neurons of the remaining layers, and --ratio is
still a fraction of all neurons (the same k as without the flag). The files are named with x{layers}_ before the
size ({m}_influence_x0_k42.npy, scores/{m}_influence_x0.npy: the excluded neurons' scores NaN), the sidecar
records exclude_layers, and the halves' subsets leave out the same layers.

Modules (c_find_modules.py) as subsets: --modules FILE with --module M (several allowed) or --modules_top N
(the N largest) writes {m}_module{M}_{weight}.npy each into --output_dir, with a sidecar of method "module":
stage e ablates each module as a unit, against its own controls, outside the method comparison.

    python d_calculate_perturbation_subset.py \\
        --input_graph_path parcellation_datasets/test_1/weighted_graph_analysis/gpt2_weighted_graph_analyzed.json \\
        --threshold 0.8 --ratio 0.01 --method degree \\
        --output_path parcellation_datasets/test_1/perturbation_subsets/gpt2_degree_t0.8_r0.01.npy
"""

from pathlib import Path

from gelutrace import PipelineError
from gelutrace.cli import check_at_least, memory_limit, parser, run_main
from gelutrace.files import atomic
from gelutrace.graph import coactivation as gr
from gelutrace.selection import communities as md
from gelutrace.selection import methods as sel
from gelutrace.selection import subsets


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--input_graph_path",
                    help="c_analyze's *_analyzed.json or *_analyzed.gpickle (a store directory or stage c's "
                         ".gpickle also work); needed unless --modules")
    ap.add_argument("--threshold", type=float, default=None,
                    help="keep edges with normalised co-activation > this, in [0, 1]; needed by the graph methods "
                         f"({', '.join(sel.GRAPH_METHODS)}), ignored by the others")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=float, nargs="+", metavar="R",
                      help="fraction of all nodes to select, in (0, 1]; several values write one subset each")
    size.add_argument("--k", type=int, nargs="+", metavar="K",
                      help="number of nodes to select instead (files named ..._k{k}.npy); several values write one "
                           "subset each")
    ap.add_argument("--method", default=None,  # None: not given (--modules refuses it); degree
                    help=f"ranking: {', '.join(sel.METHODS)} (default: degree)")
    ap.add_argument("--weight", default=None,  # None: not given; count
                    help=f"edge weight that --threshold applies to and {', '.join(sel.GRAPH_METHODS)} rank by: "
                         f"{', '.join(gr.WEIGHTS)} (phi and pmi need the number of samples, which a .gpickle "
                         f"records as the graph attribute num_samples) (default: {gr.DEFAULT_WEIGHT})")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--output_path", help="the subset .npy to write (its sidecar .json goes beside it: "
                                           "parameters, k, per-layer counts, scores, tied_picks, tie_pool, "
                                           "zero_score_picks)")
    out.add_argument("--output_dir",
                     help="write {m}_{method}_t{threshold}_r{ratio}.npy (with --weight other than count, "
                          "{m}_{method}_{weight}_t{threshold}_r{ratio}.npy; {m}_{method}_r{ratio}.npy for the "
                          "methods that use no graph; _k{k} instead of _r{ratio} with --k) in this directory "
                          "instead")
    ap.add_argument("--dataset_path", default=None,
                    help="stage b's directory, read by --method attribution and ablation (default: the directory "
                         "the graph store was built from)")
    ap.add_argument("--input_csv", default=None,
                    help="prompt mode: the prompt CSV stage b read, whose two halves of rows each subset is chosen "
                         "again on (the sidecar's halves; corpus mode finds its halves from its shards) (default: "
                         "none, no halves)")
    ap.add_argument("--skip_existing", action="store_true",
                    help="do nothing if the output .npy already exists (used by d_batch)")
    ap.add_argument("--seed", type=int, default=None,  # None: not given; 1337
                    help="seed of --method random and of the random order that breaks ties in the other methods' "
                         "ranking, >= 0 (default: 1337)")
    ap.add_argument("--match_layers", default=None,
                    help="with --method random: draw as many neurons per layer as this other subset .npy has")
    ap.add_argument("--exclude_layers", type=int, nargs="+", metavar="L", default=None,
                    help="rank only the neurons of the other layers (e.g. 0: layer 0's neurons are never picked, "
                         "by any method, random included); files named ..._x{L}_k{k}.npy (default: every layer)")
    ap.add_argument("--export_graph", default=None,
                    help="also write the thresholded graph as .graphml (Gephi/Cytoscape) or .gpickle, "
                         "when it fits in memory")
    ap.add_argument("--memory_limit_gb", type=float, default=None,
                    help="RAM --export_graph may use, for its up-front estimate (default: what is available)")
    mods = ap.add_argument_group("modules (instead of a ranking)")
    mods.add_argument("--modules", metavar="FILE",
                      help="c_find_modules' {m}_modules_{weight}.csv (its .json beside it): write modules as subsets")
    which = mods.add_mutually_exclusive_group()
    which.add_argument("--module", type=int, nargs="+", metavar="M", help="with --modules: these modules")
    which.add_argument("--modules_top", type=int, metavar="N", help="with --modules: the N largest modules")
    args = ap.parse_args(argv)

    if args.modules:
        return write_modules(args)
    check_at_least(args, 0, "seed")
    if args.module is not None or args.modules_top is not None:
        raise PipelineError("--module and --modules_top need --modules")
    request = subsets.Request(
        args.input_graph_path, args.threshold, args.ratio, args.k, "degree" if args.method is None else args.method,
        gr.DEFAULT_WEIGHT if args.weight is None else args.weight, args.output_path, args.output_dir,
        args.dataset_path, args.input_csv, args.skip_existing, 1337 if args.seed is None else args.seed,
        args.match_layers, args.export_graph, memory_limit(args.memory_limit_gb) if args.export_graph else None,
        args.exclude_layers)
    subsets.write_ranked(request)


def write_modules(args):
    ranking = {"--output_path": args.output_path, "--ratio": args.ratio, "--k": args.k,
               "--input_graph_path": args.input_graph_path, "--threshold": args.threshold,
               "--method": args.method, "--weight": args.weight, "--seed": args.seed,
               "--match_layers": args.match_layers, "--export_graph": args.export_graph,
               "--input_csv": args.input_csv, "--exclude_layers": args.exclude_layers}
    given = [k for k, v in ranking.items() if v is not None]  # given at all, even at a default's value
    if given:
        raise PipelineError(f"--modules writes each module as it is: give --output_dir and --module or --modules_top, "
                            f"without {', '.join(given)}")
    if (args.module is None) == (args.modules_top is None):
        raise PipelineError("--modules needs --module M ... or --modules_top N")
    if args.modules_top is not None and args.modules_top < 1:
        raise PipelineError(f"--modules_top must be >= 1, got {args.modules_top}")
    if args.module and len(set(args.module)) != len(args.module):
        raise PipelineError("--module lists a module twice")
    mf = md.read_modules(args.modules)
    out = atomic.check_output_dir(Path(args.output_dir), "--output_dir")
    m = mf.record["model"]
    data = Path(args.dataset_path) if args.dataset_path else out.parent  # the dataset the subsets are for
    others = sorted(q.name[:-len("_graph_meta.json")] for q in data.glob("*_graph_meta.json"))
    if (args.dataset_path or others) and m not in others:
        raise PipelineError(f"{args.modules} holds modules of model {m!r}, but {data} is a dataset of "
                            f"{', '.join(map(repr, others)) or 'no model'}")
    chosen = args.module or list(range(min(args.modules_top, mf.num_modules)))
    if args.modules_top is not None and args.modules_top > mf.num_modules:
        print(f"note: {args.modules} has {mf.num_modules} modules, fewer than --modules_top {args.modules_top}: "
              f"writing them all")
    for k in chosen:
        if not 0 <= k < mf.num_modules:
            raise PipelineError(f"--module {k}: {args.modules} has modules 0..{mf.num_modules - 1}")
    for k in chosen:
        target = sel.write_module_subset(mf, k, out)
        print(f"wrote {target} (module {k}, {len(mf.ids(k))} neurons)")


if __name__ == "__main__":
    run_main(main)
