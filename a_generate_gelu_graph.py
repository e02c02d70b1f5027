"""
Stage a: the base graph of a model's MLP neurons (the inputs to each layer's MLP output projection): every neuron a node, an edge from every
neuron of layer i to every neuron of layer i+1.

Writes into --output_dir: {m}_neuron_attributes.csv (node_id,layer,dimension), {m}_neuron_edges.el
('src tgt' per line; skip it with --no_edge_list) and {m}_graph_meta.json (layer sizes and connectivity,
so later stages never re-parse the canonical .el). Reads only the model's config, not its weights.

    python a_generate_gelu_graph.py --model_type gpt2 --output_dir gelu_graph
"""

from tqdm import tqdm

from gelutrace.cli import add_model_args, parser, run_main
from gelutrace.files.atomic import check_output_dir
from gelutrace.files.formats import write_graph_files
from gelutrace.model.loading import model_name, model_site


def main(argv=None):
    ap = parser(__doc__)
    add_model_args(ap, device=False)
    ap.add_argument("--output_dir", default="gelu_graph", help="directory for the graph files (default: %(default)s)")
    ap.add_argument("--no_edge_list", action="store_true",
                    help="write only the attributes and metadata, not the .el (gpt2: 1.2 GB, gpt2-xl: 23 GB)")
    args = ap.parse_args(argv)
    check_output_dir(args.output_dir, "--output_dir")
    n_layer, d_mlp, site = model_site(args.model_type)
    m = model_name(args.model_type)
    with tqdm(total=n_layer - 1, unit="layer pair", desc="edge list", disable=args.no_edge_list) as bar:
        write_graph_files(args.output_dir, m, n_layer, d_mlp, write_el=not args.no_edge_list, progress=bar,
                          site=site)
    print(f"{m} ({site['architecture']}): {n_layer} layers x {d_mlp} MLP neurons = {n_layer * d_mlp} nodes, "
          f"{(n_layer - 1) * d_mlp ** 2} edges, written to {args.output_dir}")


if __name__ == "__main__":
    run_main(main)
