"""
Stage b, one prompt: which GELU neurons fire (post-GELU output > 0) at the last position of --input_text,
the position that predicts the next token. For debugging and single-input analysis.

Writes into --output_dir: {m}_activations.pkl (flat 0/1 int8 numpy vector over all n_layer x d_mlp neurons,
neuron id order), {m}_active_neurons.txt (the active ids, one per line) and {m}_activations.png (one panel
per layer); prints the active count of every layer and the greedy continuation.

    python b_trace_gelu_activations.py --model_type gpt2 --input_text "The quick brown fox" --output_dir activations
"""

import pickle

import numpy as np
import torch

from gelutrace import PipelineError
from gelutrace.cli import add_model_args, parser, run_main
from gelutrace.files.atomic import atomic_open, check_output_dir
from gelutrace.files.layout import TRACE_ACTIVE, TRACE_PLOT, TRACE_VECTOR, path
from gelutrace.files.plots import plot_trace
from gelutrace.model.loading import load_model
from gelutrace.record.prompts import trace


def main(argv=None):
    ap = parser(__doc__)
    add_model_args(ap)
    ap.add_argument("--input_text", required=True, help="the text whose next-token activations are traced")
    ap.add_argument("--output_dir", default="activations", help="directory for the outputs (default: %(default)s)")
    ap.add_argument("--max_num_new_tokens", type=int, default=1,
                    help="greedy tokens to generate and print after the trace; the trace itself is always "
                         "the prediction of the first one (default: %(default)s)")
    args = ap.parse_args(argv)
    check_output_dir(args.output_dir, "--output_dir")
    if not args.input_text.strip():
        raise PipelineError("--input_text is empty")
    if args.max_num_new_tokens < 0:
        raise PipelineError("--max_num_new_tokens must be >= 0")
    lm = load_model(args.model_type, args.device)
    active, continuation = run(lm, args)
    cfg = lm.model.config
    for layer, row in enumerate(active.reshape(cfg.n_layer, cfg.d_mlp)):
        print(f"layer {layer:2d}: {int(row.sum()):6d} / {cfg.d_mlp} active ({100 * row.mean():.1f}%)")
    print(f"total: {int(active.sum())} / {active.size} active; next tokens: {lm.tokenizer.decode(continuation.tolist())!r}")
    print(f"written to {args.output_dir}")


@torch.no_grad()
def run(lm, args):
    """The trace of --input_text with a loaded model, written to --output_dir; returns the 0/1 vector and the greedy
    continuation's ids."""
    cfg = lm.model.config
    ids = lm.tokenizer(args.input_text)["input_ids"]
    if len(ids) + args.max_num_new_tokens > cfg.block_size:
        raise PipelineError(f"{len(ids)} tokens + {args.max_num_new_tokens} new tokens exceed the context window "
                            f"of {cfg.block_size}")
    active = (trace(lm.model, ids) > 0).astype(np.int8)
    continuation = lm.model.generate(torch.tensor([ids], device=lm.device), args.max_num_new_tokens)[0, len(ids):]

    with atomic_open(path(args.output_dir, TRACE_VECTOR, lm.name), "wb") as f:
        pickle.dump(active, f)
    with atomic_open(path(args.output_dir, TRACE_ACTIVE, lm.name), "w") as f:
        f.writelines(f"{i}\n" for i in np.flatnonzero(active))
    per_layer = active.reshape(cfg.n_layer, cfg.d_mlp)
    plot_trace(per_layer, path(args.output_dir, TRACE_PLOT, lm.name), f"{lm.name}: GELU neurons active after "
               f"{args.input_text[:40]!r}")
    return active, continuation


if __name__ == "__main__":
    run_main(main)
