"""
Stage b: record which GELU neurons fire (post-GELU output > 0), in one of two modes.

Prompt mode (--input_csv): generate text for every prompt of a CSV and record, for every generated token,
the neurons behind it. Writes into --export_dir: {m}_activation_dataset.csv, {m}_neuron_frequency.csv,
{m}_activation_matrix.npz (bit-packed; read it with gelutrace.files.formats.read_activation_matrix),
{m}_neuron_activations.json and .pickle (unless --no_activation_lists), {m}_neuron_top_examples.csv (each
neuron's --top_examples samples with the largest post-GELU value; 0 skips it; both modes), and stage a's graph files
({m}_neuron_attributes.csv, {m}_graph_meta.json, {m}_neuron_edges.el unless --no_edge_list), and with
--direct_edges {m}_direct_edges.npz.

Corpus mode (--input_text): read any amount of text, teacher-forced in windows of --context tokens; every
position is one sample. Exact counts are streamed, so memory does not grow with the text. Writes
{m}_neuron_attributes.csv, {m}_graph_meta.json, {m}_neuron_frequency.csv, the compact graph store
{m}_weighted_graph/ (as stage c would write it), {m}_corpus.json, {m}_neuron_top_examples.csv (sample ids
are global token positions) and with --save_matrix the activation matrix. Under torchrun every process streams its share and process 0 writes the summed result.

After generating, one teacher-forced forward and backward pass over each distinct prompt + continuation gives
every neuron's `attribution` (frequency file): -sum_p a(p) dL/da(p), a first-order estimate of the
delta_nll that zero-ablating that neuron alone causes in stage e (--no_attribution skips it).

    python b_generate_activation_dataset.py --model_type gpt2 --input_csv parcellation_datasets/test_1.csv
        --export_dir parcellation_datasets/test_1
    python b_generate_activation_dataset.py --model_type gpt2 --input_text corpus/ --export_dir corpus_gpt2
    torchrun --standalone --nproc_per_node 4 b_generate_activation_dataset.py --model_type gpt2
        --input_text corpus/ --export_dir corpus_gpt2
"""

import math

from gelutrace import PipelineError
from gelutrace.cli import add_model_args, add_sampling_args, check_at_least, check_sampling_args, parser, run_main
from gelutrace.files.atomic import check_output_dir, lock_directory, removed_if_unused
from gelutrace.files.corpusfiles import DEFAULT_FIELD, add_text_field_arg
from gelutrace.files.formats import read_prompts
from gelutrace.model.generation import encode_prompts
from gelutrace.model.loading import load_model
from gelutrace.record import corpus
from gelutrace.record import prompts as recording


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--input_csv",
                    help="prompt mode: prompt CSV with columns prompts, number_of_new_tokens and optionally "
                         "num_samples")
    ap.add_argument("--input_text", nargs="+", metavar="PATH",
                    help="corpus mode: .txt/.txt.gz/.txt.zst files (one document each), .jsonl/.jsonl.gz/.json.gz/"
                         ".jsonl.zst files (one document per line, field --text_field), .parquet/.arrow files (one "
                         "document per row, column --text_field), directories of them (sorted by name) or a "
                         "directory written by datasets' save_to_disk (its .arrow files in its order)")
    add_text_field_arg(ap, "--input_text (corpus mode)")
    ap.add_argument("--export_dir", required=True, help="directory for the dataset files (created if missing)")
    add_model_args(ap)
    sampling = add_sampling_args(ap, seed=42, temperature=0.0, top_k=None, batch_size=None, only_in="prompt mode",
                                 batch_help="prompt mode: most sequences generated together (default 64); corpus "
                                            f"mode: windows per forward pass (default: about "
                                            f"{corpus.TOKENS_PER_BATCH} tokens' worth)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run with the same inputs and settings (prompt mode: from its "
                         "last completed batch; corpus mode: from its last checkpoint)")
    ap.add_argument("--no_activation_lists", action="store_true",
                    help="prompt mode: skip the {m}_neuron_activations .json/.pickle lists (large for big runs; "
                         "nothing downstream needs them)")
    ap.add_argument("--no_attribution", action="store_true",
                    help="prompt mode: skip the attribution pass (one teacher-forced forward and backward pass per "
                         "distinct continuation); the frequency file's attribution column is then empty")
    ap.add_argument("--attribution", action="store_true",
                    help="corpus mode: also every neuron's attribution, -sum a(t) dNLL/da(t) with the real next "
                         "token's NLL the objective, per scored token (every window position but the last): a "
                         "backward pass per batch, about 2-3x the forward's time; streamed, checkpointed and "
                         "merged like the counts (prompt mode computes it by default)")
    ap.add_argument("--direct_edges", action="store_true",
                    help="both modes: also the causal edge weights direct and direct_abs (each neuron's direct "
                         "effect on a later neuron through the residual stream, norm scales held; see docs/methods.md) "
                         "and each neuron's direct_loss, in the graph store (prompt mode: {m}_direct_edges.npz, "
                         "which stage c folds in); prompt mode: one teacher-forced pass per distinct continuation; "
                         "corpus mode: streamed, checkpointed and merged with the counts")
    ap.add_argument("--edges", choices=("adjacent", "all"), default=None,
                    help="with --direct_edges: the layer pairs, adjacent (the graph's, the default) or all i < j "
                         "(the influence ranking uses them; memory grows with n_layer^2, printed before the run)")
    ap.add_argument("--top_examples", type=int, default=10, metavar="K",
                    help="keep each neuron's K samples with the largest post-GELU value (ties to the lower sample "
                         "id) in {m}_neuron_top_examples.csv, streamed in O(neurons x K) memory; 0 turns it off "
                         "(default: %(default)s)")
    ap.add_argument("--no_edge_list", action="store_true",
                    help="prompt mode: skip writing {m}_neuron_edges.el (1.2 GB for gpt2, 23 GB for gpt2-xl); "
                         "later stages use the full adjacent-layer connectivity recorded in {m}_graph_meta.json "
                         "(corpus mode never writes it)")
    ap.add_argument("--context", type=int, default=None,
                    help="corpus mode: tokens per window (default: the model's context)")
    ap.add_argument("--max_tokens", type=int, default=None,
                    help="corpus mode: read only the first N tokens of the corpus (default: all)")
    ap.add_argument("--save_matrix", action="store_true",
                    help="corpus mode: also write the bit-packed {m}_activation_matrix.npz (1 bit per sample and "
                         "neuron, held in memory until written), from which stage c rebuilds the same store")
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="corpus mode: process only windows I, I+N, I+2N, ... and write a dataset of partial "
                         "counts; c_merge_activation_statistics.py sums the N shards")
    ap.add_argument("--checkpoint_minutes", type=float, default=5.0,
                    help="corpus mode: save the running counts for --resume at most this often; 0 saves after "
                         "every batch (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.edges is not None and not args.direct_edges:
        raise PipelineError("--edges applies to --direct_edges only")
    args.edges = args.edges or "adjacent"
    if (args.input_csv is None) == (args.input_text is None):
        raise PipelineError("give exactly one of --input_csv (prompt mode) and --input_text (corpus mode)")
    if args.input_text is not None:
        given = [f"--{k}" for k in sampling if getattr(args, k) is not None]
        if given:
            raise PipelineError(f"{given[0]} belongs to prompt mode: corpus mode reads the text teacher-forced and "
                                f"samples nothing")
        if args.no_attribution:
            raise PipelineError("--no_attribution belongs to prompt mode: corpus mode computes attribution only "
                                "with --attribution")
        return corpus_mode(args)
    if args.attribution:
        raise PipelineError("--attribution belongs to corpus mode: prompt mode computes it by default "
                            "(--no_attribution skips it)")
    if args.text_field != DEFAULT_FIELD:
        raise PipelineError("--text_field belongs to corpus mode (--input_text)")
    for k, v in sampling.items():  # prompt mode's defaults
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.batch_size = args.batch_size or 64
    check_sampling_args(args)
    check_at_least(args, 0, "top_examples")
    prompts = read_prompts(args.input_csv)
    export = check_output_dir(args.export_dir, "--export_dir")  # before the model is loaded and a prompt encoded
    with removed_if_unused(export):  # the lock first; an input refused after it leaves no directory
        lock_directory(export, "stage b")
        lm = load_model(args.model_type, args.device)
        prompt_ids = encode_prompts(lm.tokenizer, prompts, lm.model.config.block_size)
    settings = recording.PromptSettings(
        args.input_csv, args.seed, args.temperature, args.top_k, args.batch_size, args.top_examples, args.resume,
        not args.no_attribution, args.direct_edges, args.edges, not args.no_activation_lists, not args.no_edge_list)
    summary = recording.run(lm, export, prompts, prompt_ids, settings)
    per_layer = ", ".join(f"{100 * f:.0f}%" for f in summary["active_fraction_per_layer"])
    print(f"{summary['samples']} samples from {len(prompts)} prompts written to {export}; "
          f"active neurons per layer: {per_layer}")


def corpus_mode(args):
    if not math.isfinite(args.checkpoint_minutes) or args.checkpoint_minutes < 0:
        raise PipelineError(f"--checkpoint_minutes must be a finite number >= 0 (0: after every batch), got "
                            f"{args.checkpoint_minutes}")
    settings = corpus.CorpusSettings(args.context, args.max_tokens, args.batch_size, args.save_matrix, args.shard,
                                     args.top_examples, args.resume, 60 * args.checkpoint_minutes, args.attribution,
                                     args.edges if args.direct_edges else None, args.text_field)
    corpus.check_settings(settings, corpus.distributed())  # before the model is loaded
    export = check_output_dir(args.export_dir, "--export_dir")
    with removed_if_unused(export):  # the lock first; an input refused after it leaves no directory
        corpus.lock(export)
        lm = corpus.load(args.model_type, args.device)
        job = corpus.prepare(lm, args.input_text, settings)
    record = corpus.run_job(lm, job, export, settings)
    if record is not None:
        shard = f" (shard {record['shard']['index']}/{record['shard']['count']})" if record["shard"] else ""
        print(f"{record['samples']:,} samples from {record['documents']:,} documents, {record['windows']:,} windows "
              f"of {record['context']} tokens{shard} written to {args.export_dir}")


if __name__ == "__main__":
    run_main(main)
