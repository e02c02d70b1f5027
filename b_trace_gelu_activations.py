"""
Stage b, one prompt: which GELU neurons fire (post-GELU output > 0) at the last position of --input_text,
the position that predicts the next token. For debugging and single-input analysis.

Writes into --output_dir: {m}_activations.pkl (flat 0/1 int8 numpy vector over all n_layer x d_mlp neurons,
neuron id order), {m}_active_neurons.txt (the active ids, one per line) and {m}_activations.png (one panel
per layer); prints the active count of every layer and the greedy continuation.

With --graph, also the prompt's neuron attribution graph (which neurons made the model predict its next token,
through which others): {m}_trace_graph.json in the attribution-graph format Neuronpedia's viewer reads, the same
graph as a self-contained page to explore with no network, {m}_trace_graph.html, and its summary
{m}_trace_summary.md/.csv/.json (the top neurons by influence, the graph's replacement and completeness scores,
how faithful it is to the real model).

    python b_trace_gelu_activations.py --model_type gpt2 --input_text "The quick brown fox" --output_dir activations
    python b_trace_gelu_activations.py --model_type tinybard --input_text "To be, or not to be" --graph \\
        --dataset_path parcellation_datasets/test_1_tinybard \\
        --modules parcellation_datasets/test_1_tinybard/modules/tinybard_modules_count.csv
"""

import pickle

import numpy as np
import torch

from gelutrace import PipelineError
from gelutrace.circuit.graph import TraceSettings
from gelutrace.cli import add_model_args, parser, run_main
from gelutrace.files.atomic import atomic_open, check_output_dir, lock_directory
from gelutrace.files.layout import TRACE_FILES, TRACE_SUMMARY_MANIFEST, path
from gelutrace.files.plots import plot_trace
from gelutrace.model.loading import load_model
from gelutrace.record.prompts import trace
from gelutrace.report import tracegraph

GRAPH_FLAGS = ("max_nodes", "node_threshold", "edge_threshold", "graph_batch_size", "faithfulness_nodes")


def main(argv=None):
    ap = parser(__doc__)
    add_model_args(ap)
    ap.add_argument("--input_text", required=True, help="the text whose next-token activations are traced")
    ap.add_argument("--output_dir", default="activations", help="directory for the outputs (default: %(default)s)")
    ap.add_argument("--max_num_new_tokens", type=int, default=1,
                    help="greedy tokens to generate and print after the trace; the trace itself is always "
                         "the prediction of the first one (default: %(default)s)")
    g = ap.add_argument_group("the attribution graph (--graph)")
    g.add_argument("--graph", action="store_true",
                   help="also write the prompt's neuron attribution graph (frozen attention and norms: every edge exact "
                        "for that frozen model) and its summary")
    defaults = TraceSettings()
    g.add_argument("--max_nodes", type=int, default=defaults.max_nodes,
                   help="neurons kept at most, chosen by their influence on the logits (default: %(default)s)")
    g.add_argument("--node_threshold", type=float, default=defaults.node_threshold,
                   help="pruning: the nodes kept hold this share of the cumulative influence (default: %(default)s)")
    g.add_argument("--edge_threshold", type=float, default=defaults.edge_threshold,
                   help="pruning: the edges kept hold this share of the cumulative influence (default: %(default)s)")
    g.add_argument("--graph_batch_size", type=int, default=defaults.batch_size,
                   help="target rows per backward pass (default: %(default)s)")
    g.add_argument("--dataset_path", default=None,
                   help="a stage-b dataset of the same model: each neuron is labelled with its top contexts and "
                        "promoted tokens, and compared with the corpus influence ranking of its stage d")
    g.add_argument("--modules", default=None, metavar="CSV",
                   help="a c_find_modules table of the same model ({m}_modules_{weight}.csv): the kept neurons are "
                        "grouped into supernodes by module, with a permutation test of their concentration")
    g.add_argument("--faithfulness_nodes", type=int, default=tracegraph.fa.TOP_NODES,
                   help="the most influential nodes zero-ablated in the real model to check the graph's predicted "
                        "effects (0: none; default: %(default)s)")
    args = ap.parse_args(argv)
    check_output_dir(args.output_dir, "--output_dir")
    if not args.graph and any(getattr(args, f) is not None for f in ("dataset_path", "modules")):
        raise PipelineError("--dataset_path and --modules label and group the graph: give --graph")
    if not args.graph and (given := [f"--{f}" for f in GRAPH_FLAGS if getattr(args, f) != ap.get_default(f)]):
        raise PipelineError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} how the graph is made: give --graph")
    if not 0 <= args.node_threshold <= 1 or not 0 <= args.edge_threshold <= 1:
        raise PipelineError("--node_threshold and --edge_threshold must be in [0, 1]")
    for flag in ("max_nodes", "graph_batch_size"):
        if getattr(args, flag) < 1:
            raise PipelineError(f"--{flag} must be at least 1")
    if args.faithfulness_nodes < 0:
        raise PipelineError("--faithfulness_nodes must be >= 0")
    if not args.input_text.strip():
        raise PipelineError("--input_text is empty")
    try:
        args.input_text.encode("utf-8")
    except UnicodeEncodeError:
        raise PipelineError("--input_text is not valid UTF-8 text") from None
    if not args.output_dir.strip():
        raise PipelineError("--output_dir is empty")
    if args.max_num_new_tokens < 0:
        raise PipelineError("--max_num_new_tokens must be >= 0")
    lm = load_model(args.model_type, args.device)
    if args.graph:
        request = tracegraph.TraceRequest(args.input_text, args.output_dir, args.dataset_path, args.modules,
                                          args.faithfulness_nodes)
        tracegraph.check_inputs(lm, request)  # before any file is written
    lock_directory(args.output_dir, "b_trace_gelu_activations.py")  # a second run into it is refused
    active, continuation, write = run(lm, args)
    if not args.graph:
        if path(args.output_dir, TRACE_SUMMARY_MANIFEST, lm.name).exists():  # an earlier --graph run's files go
            tracegraph.write_without_graph(args.output_dir, lm.name, write)
        else:
            write(args.output_dir)
    cfg = lm.model.config
    for layer, row in enumerate(active.reshape(cfg.n_layer, cfg.d_mlp)):
        print(f"layer {layer:2d}: {int(row.sum()):6d} / {cfg.d_mlp} active ({100 * row.mean():.1f}%)")
    print(f"total: {int(active.sum())} / {active.size} active; next tokens: {lm.tokenizer.decode(continuation.tolist())!r}")
    if args.graph:
        settings = TraceSettings(args.max_nodes, args.node_threshold, args.edge_threshold,
                                 batch_size=args.graph_batch_size)
        extra = ([n.format(m=lm.name) for n in TRACE_FILES], write)
        done = tracegraph.run(lm, request, settings, extra=extra)
        print("\n".join(tracegraph.outcome_lines(done)))
    print(f"written to {args.output_dir}")


@torch.no_grad()
def run(lm, args):
    """The trace of --input_text with a loaded model; returns the 0/1 vector, the greedy continuation's ids and the
    writer of its files into a directory (--output_dir; with --graph, the trace's staging directory, so that the
    activation files and the graph are swapped in together)."""
    cfg = lm.model.config
    ids = lm.tokenizer(args.input_text)["input_ids"]
    if len(ids) + args.max_num_new_tokens > cfg.block_size:
        raise PipelineError(f"{len(ids)} tokens + {args.max_num_new_tokens} new tokens exceed the context window "
                            f"of {cfg.block_size}")
    active = (trace(lm.model, ids) > 0).astype(np.int8)
    continuation = lm.model.generate(torch.tensor([ids], device=lm.device), args.max_num_new_tokens)[0, len(ids):]

    def write(directory) -> list:
        files = [path(directory, name, lm.name) for name in TRACE_FILES]
        with atomic_open(files[0], "wb") as f:
            pickle.dump(active, f)
        with atomic_open(files[1], "w") as f:
            f.writelines(f"{i}\n" for i in np.flatnonzero(active))
        plot_trace(active.reshape(cfg.n_layer, cfg.d_mlp), files[2], f"{lm.name}: GELU neurons active after "
                   f"{args.input_text[:40]!r}")
        return files

    return active, continuation, write


if __name__ == "__main__":
    run_main(main)
