"""
How faithful the causal edge weights are: for a sample of edges of the graph store (stage b --direct_edges),
the first-order prediction -direct against the change of the target neuron's mean value measured when the
source neuron is zero-ablated outright (through attention, the MLPs in between and the norm scales, which the
weight ignores). The edges: --edges of them with a nonzero weight, stratified by decile of |direct|, seeded.
The samples: prompt mode, stage b's generated continuations (teacher-forced, each distinct one once, weighted
by its samples); corpus mode, the first --tokens tokens of the dataset's text in windows of its context.

Writes into --dataset_path: {m}_edge_fidelity.csv (src, tgt, pair, decile, direct, layer_gap, predicted,
measured), {m}_edge_fidelity_summary.csv (per layer gap, and "all" when there are several: edges,
Spearman(predicted, measured), beta and R^2 of the line through 0) and {m}_edge_fidelity.png.

    python c_measure_edge_fidelity.py --dataset_path parcellation_datasets/test_1_tinybard --model_type tinybard
"""

import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.cli import add_model_args, check_at_least, parser, run_main
from gelutrace.evaluate import fidelity as fd
from gelutrace.files import atomic, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.files.plots import plot_edge_fidelity
from gelutrace.graph import store as gs
from gelutrace.model.loading import load_model, model_name


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--dataset_path", required=True, help="stage b's directory (with its graph store)")
    add_model_args(ap)
    ap.add_argument("--edges", type=int, default=fd.EDGES, help="edges sampled (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=2048,
                    help="scored positions the effects are measured on (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the edge sample (default: %(default)s)")
    args = ap.parse_args(argv)
    check_at_least(args, 1, "edges")
    check_at_least(args, 1, "tokens")
    check_at_least(args, 0, "seed")
    m = model_name(args.model_type)
    atomic.lock_directory(atomic.check_output_dir(args.dataset_path, "--dataset_path"), "c_measure_edge_fidelity")
    store = layout.path(args.dataset_path, layout.WEIGHTED_GRAPH, m)
    if not gs.is_store(store):
        raise PipelineError(f"{store} is not a graph store of model {m} (stage c writes it; corpus mode, stage b)")
    graph = gs.read_store(store)
    if graph.causal is None:
        raise PipelineError(f"{args.dataset_path}: its graph store has no direct-effect weights; run stage b with "
                            f"--direct_edges")
    lm = load_model(args.model_type, args.device)
    summary = run(lm, args, graph, m)
    for r in summary.to_dict("records"):
        print(f"layer gap {r['layer_gap']}: {r['edges']} edges, Spearman {r['spearman']:.3f}, "
              f"R^2 through 0 {r['r2_through_0']:.3f} (slope {r['beta']:.3f})")


@torch.no_grad()
def run(lm, args, graph, m: str):
    """The sampled causal edges of the graph store measured with a loaded model, written into --dataset_path;
    returns the summary per layer gap."""
    cfg = lm.model.config
    ds = DatasetDir(args.dataset_path, lm.name)
    ds.check(cfg.n_layer, cfg.d_mlp, lm.site)
    edges = fd.sample_edges(graph.causal, cfg.d_mlp, args.edges, args.seed)
    record = ds.corpus_record()
    if record is not None:
        samples = fd.corpus_samples(record, lm.tokenizer, args.tokens, lm.device)
    else:
        samples = fd.prompt_samples(args.dataset_path, m, args.tokens, lm.device)
    scored = int((samples.weights > 0).sum())
    if len(edges) < args.edges or scored < args.tokens:
        print(f"note: {len(edges)} edges (of {args.edges} asked; the sample is drawn from {fd.POOL:,} edges) on "
              f"{scored:,} positions (of {args.tokens:,} asked: what the dataset holds, in whole windows)")
    with tqdm(total=edges["src"].nunique(), unit="neuron", desc="ablating sources") as bar:
        table = fd.measure(lm.model, samples, edges, bar.update)
    summary = fd.summary(table)
    summary["store_uid"] = graph.header["uid"]  # which store it measured: the report refuses another's
    files = (layout.EDGE_FIDELITY, layout.EDGE_FIDELITY_SUMMARY, layout.EDGE_FIDELITY_PLOT)
    with atomic.OutputSet(args.dataset_path, layout.path(args.dataset_path, layout.EDGE_FIDELITY_MANIFEST, m),
                      [f.format(m=m) for f in files], "c_measure_edge_fidelity") as out:
        atomic.write_csv(table[layout.EDGE_FIDELITY_COLUMNS], layout.path(out.dir, layout.EDGE_FIDELITY, m))
        atomic.write_csv(summary[layout.EDGE_FIDELITY_SUMMARY_COLUMNS], layout.path(out.dir, layout.EDGE_FIDELITY_SUMMARY, m))
        plot_edge_fidelity(table, layout.path(out.dir, layout.EDGE_FIDELITY_PLOT, m),
                           f"{m}: {len(table)} causal edges, first-order prediction vs zero-ablation")
        out.vouch(layout.path(out.dir, f, m) for f in files)
    return summary


if __name__ == "__main__":
    run_main(main)
