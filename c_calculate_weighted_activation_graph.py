"""
Stage c: the weighted co-activation graph of stage b's activation dataset.

Node weight = activation count (samples in which the neuron is active); edge weight = co_activation_count
(samples in which both ends are active), exact: for each adjacent-layer pair, an int8 matrix product per
block of rows of the bit-packed matrix, added into int64 totals (the matrix is never unpacked whole). If the
input directory's .el was edited by the user, only its edges are kept.

A corpus-mode stage b writes the store itself; stage c rebuilds the same store from its --save_matrix.
With stage b's --direct_edges, the store also holds its causal weights ({m}_direct_edges.npz; the .gpickle
keeps the counts only).

--output_path ending in .gpickle writes the original's pickled networkx.Graph (refused up front when it would
not fit in memory); any other path writes the compact graph store, a directory of exact integer count
matrices (one per layer pair, np.load(..., mmap_mode='r')) plus graph.json.

    python c_calculate_weighted_activation_graph.py --input_dir parcellation_datasets/test_1
    python c_calculate_weighted_activation_graph.py --input_dir parcellation_datasets/test_1 \\
        --output_path parcellation_datasets/test_1/gpt2_weighted_graph.gpickle
"""

import time
from pathlib import Path

from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.cli import memory_limit, parser, run_main
from gelutrace.files import atomic, formats, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.graph.causal import CausalEdges


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--input_dir", required=True,
                    help="stage b's export directory ({m}_activation_matrix.npz, {m}_graph_meta.json, ...)")
    ap.add_argument("--output_path", default=None,
                    help="where to write the graph: a path ending in .gpickle writes a pickled networkx.Graph "
                         "(only where it fits in memory); anything else is the compact store directory "
                         "(default: <input_dir>/{m}_weighted_graph)")
    ap.add_argument("--memory_limit_gb", type=float, default=None,
                    help="RAM the .gpickle path may use, for its up-front estimate (default: what the system "
                         "reports available)")
    args = ap.parse_args(argv)

    t0 = time.time()
    m = layout.model_prefix(args.input_dir) if Path(args.input_dir).is_dir() else None
    out = Path(args.output_path) if args.output_path else layout.path(args.input_dir, layout.WEIGHTED_GRAPH, m or "graph")
    limit = memory_limit(args.memory_limit_gb)
    atomic.check_output_dir(out.parent, "--output_path")
    atomic.lock_directory(out.parent, "stage c")
    if out.suffix == ".gpickle" and out.is_dir():
        raise PipelineError(f"--output_path {out} is a directory")

    def check_fits(n_nodes, n_edges):
        gs.check_nx_fits(n_nodes, n_edges, limit, "a NetworkX .gpickle",
                         f"write the compact graph store instead (an --output_path not ending in .gpickle, "
                         f"e.g. {out.with_suffix('')})")

    if out.suffix == ".gpickle" and m is not None:  # full connectivity: refuse before loading anything heavy
        meta = formats.read_graph_meta(args.input_dir, m)
        if formats.edges_are_canonical(args.input_dir, m, meta):
            n_layer, d_mlp = int(meta.get("n_layer", 0)), int(meta.get("d_mlp", 0))
            check_fits(n_layer * d_mlp, (n_layer - 1) * d_mlp ** 2)
    direct = None
    if m is not None:
        manifest = layout.path(args.input_dir, layout.DATASET_MANIFEST, m)
        direct = layout.path(args.input_dir, layout.DIRECT_EDGES, m)
        # a file the manifest lists must be there: a deleted one is damage, not a run without the weights
        direct = direct if direct.is_file() or atomic.manifest_lists(manifest, direct.name) else None
        atomic.verify_output_set(manifest, [layout.path(args.input_dir, f, m) for f in (layout.MATRIX, layout.FREQUENCY, layout.GRAPH_META)]
                             + ([direct] if direct else []), "stage b")
    data = gr.load_activation_data(args.input_dir)
    causal = CausalEdges.read_npz(direct, data.num_neurons, data.d_mlp) if direct else None
    if causal is None and m is not None:
        causal = corpus_causal(args.input_dir, m, data)
    n_edges = len(data.edges) if data.edges is not None else (data.n_layer - 1) * data.d_mlp ** 2
    if out.suffix == ".gpickle":
        check_fits(data.num_neurons, n_edges)  # an edited edge list: its size is known once parsed
        gs.write_gpickle(gs.build_networkx(data), out)
    else:
        with tqdm(total=data.n_layer if data.edges is None else 0, unit="pass", desc="counting") as bar:
            gs.write_store(out, data, progress=bar, causal=causal)
    print(f"{data.model}: {data.num_neurons:,} neurons, {n_edges:,} edges, {data.num_samples:,} samples "
          f"-> {out} ({time.time() - t0:.1f} s)")


def corpus_causal(input_dir, m: str, data):
    """A corpus-mode dataset's causal weights: stage b wrote them into its store only, so a rebuild from the
    saved matrix carries them over from there (the same samples), or refuses."""
    record = DatasetDir(input_dir, m).corpus_record()
    if record is None or not record.get("direct_edges"):
        return None
    store = layout.path(input_dir, layout.WEIGHTED_GRAPH, m)
    old = gs.read_store(store) if gs.is_store(store) else None
    if old is None or old.causal is None or old.num_samples != data.num_samples:
        raise PipelineError(f"{input_dir} was read with --direct_edges, whose weights only stage b's store {store} "
                            f"holds, and that store is gone or does not match; rerun stage b")
    return old.causal


if __name__ == "__main__":
    run_main(main)
