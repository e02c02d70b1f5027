"""
Neuron cards: for each neuron named, its layer and dimension, activation frequency and mean activation,
attribution and single-neuron ΔNLL where computed, its degree in a thresholded co-activation graph, its
top-activating samples and the tokens its direct logit effect promotes and suppresses.

The samples of a prompt-mode dataset are found by running the model teacher-forced over the dataset's distinct
sequences; those of a corpus-mode dataset are the ones stage b streamed into {m}_neuron_top_examples.csv, their
windows re-read from the corpus files {m}_corpus.json names (only the documents they overlap are tokenized).

Writes into --output: neuron_cards.md and neurons.html, a self-contained page (inline CSS, no script, no
external resource) in which each context's tokens are shaded by the neuron's activation. With --causal_graph N,
also {m}_causal_graph.html, the N most influential neurons' causal graph as a page that needs no network (d3
inlined). With --neuronpedia
DIR, also the same neurons in Neuronpedia's export layout, DIR/{model}/{layer}-gelutrace-mlp/ (or
DIR/{model}/{layer}/ with --neuronpedia_source_set neurons; docs/stage-f.md: "Neuronpedia export").

    python f_render_neuron_cards.py --dataset_path parcellation_datasets/test_1_tinybard --model_type tinybard \\
        --neurons 417,1033,2900
"""

import time
from pathlib import Path

import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.cli import add_model_args, check_at_least, parser, run_main
from gelutrace.files import atomic, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.graph.coactivation import WEIGHTS
from gelutrace.model.loading import load_model, model_name
from gelutrace.report import cards as cd
from gelutrace.report import causalpage
from gelutrace.report import neuronpedia as npx


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--dataset_path", required=True,
                    help="a stage-b dataset directory of this model, either mode (reads {m}_neuron_frequency.csv; "
                         "prompt mode {m}_activation_dataset.csv, corpus mode {m}_corpus.json and "
                         "{m}_neuron_top_examples.csv; and, when present, {m}_neuron_effects.csv)")
    add_model_args(ap)
    ap.add_argument("--neurons", required=True, metavar="FILE.npy|IDS|report",
                    help="the neurons to render, in this order: a .npy file of neuron ids (e.g. a stage-d subset), "
                         "ids separated by commas, or 'report': the first 20 of each selection method's best subset "
                         "at the smallest k stage e compared (random excluded), then the 10 with the largest "
                         "single-neuron delta_nll where {m}_neuron_effects.csv exists")
    ap.add_argument("--output", help="directory the cards are written into (default: DATASET_PATH/neuron_cards)")
    ap.add_argument("--top_examples", type=int, default=10,
                    help="top-activating samples shown per neuron (default: %(default)s; corpus mode: at most the "
                         "--top_examples stage b kept)")
    ap.add_argument("--batch_size", type=int, default=32,
                    help="sequences (corpus mode: windows) run through the model together (default: %(default)s)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="show each neuron's degree in the dataset's co-activation graph {m}_weighted_graph/ "
                         "thresholded at this normalised weight (default: the threshold, weight and graph of the "
                         "best graph-method subset stage e compared, if any; else no degree)")
    ap.add_argument("--weight", default=None, choices=WEIGHTS,
                    help="the edge weight --threshold applies to (default: count)")
    ap.add_argument("--causal_graph", type=int, default=0, metavar="N",
                    help="also write {m}_causal_graph.html into --output: the N neurons of largest influence through "
                         "the dataset's causal graph (stage b --direct_edges; stage d's influence) and the strongest "
                         "direct edges among them, one column per layer, modules as groups, each with its card "
                         "(default: 0, none)")
    ap.add_argument("--neuronpedia", metavar="DIR",
                    help="also write the neurons in Neuronpedia's export layout into DIR/{model}/ (replaced as one "
                         "set; other models' folders in DIR are left alone, and DIR holds no lock or staging "
                         "file afterwards). Neuronpedia's importer reads only its own S3 bucket: docs/stage-f.md, "
                         "\"Neuronpedia export\", says how such an export is imported and why importing it "
                         "again changes nothing")
    ap.add_argument("--neuronpedia_creator_id", metavar="ID",
                    help=f"the creatorId written on every record that has one (default: {npx.DEFAULT_CREATOR_ID}, "
                         f"Neuronpedia's bot user: the importer writes no creatorId of its own, its tables require "
                         f"one, and a neuron page shows only activations whose creatorId is in the instance's "
                         f"PUBLIC_ACTIVATIONS_USER_IDS, which holds this id by default; give another id for an "
                         f"instance configured otherwise)")
    ap.add_argument("--neuronpedia_source_set", choices=npx.SOURCE_SETS, default=None,
                    help=f"the source set: {npx.SOURCE_SETS[0]} (default), sources {{layer}}-{npx.SOURCE_SETS[0]} "
                         f"in a set of their own, for a model of your own; or {npx.NEURONS_SET}, sources named by "
                         f"the plain layer number as Neuronpedia's own MLP-neuron sources are, so that the "
                         f"examples appear on an existing model's neuron pages (e.g. gpt2-small)")
    ap.add_argument("--neuronpedia_model_id", metavar="ID",
                    help="the modelId of the records and the name of the model's folder: the id of the model on the "
                         "Neuronpedia instance the export is for, e.g. gpt2-small for GPT-2 small on neuronpedia.org "
                         "(lower-case letters, digits, - and _, at most 200; default: the model's name, lower case, "
                         "other characters than letters, digits, - and _ made -)")
    args = ap.parse_args(argv)
    check_at_least(args, 1, "top_examples", "batch_size")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise PipelineError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.weight is not None and args.threshold is None:
        raise PipelineError("--weight needs --threshold")
    out = atomic.check_output_dir(args.output or Path(args.dataset_path) / layout.CARDS_DIR, "--output")
    if args.causal_graph < 0:
        raise PipelineError(f"--causal_graph must be >= 0, got {args.causal_graph}")
    if args.causal_graph:  # before any work: the dataset has direct edges
        causalpage.causal_source(args.dataset_path, model_name(args.model_type))
    for flag in ("neuronpedia_creator_id", "neuronpedia_model_id", "neuronpedia_source_set"):
        if getattr(args, flag) is not None and args.neuronpedia is None:
            raise PipelineError(f"--{flag} needs --neuronpedia")
    if args.neuronpedia is not None:  # before any work: the id, and that DIR/{id} is free or an earlier export
        if args.neuronpedia_model_id is not None:
            npx.check_model_id(args.neuronpedia_model_id)
        if args.neuronpedia_creator_id is None:
            args.neuronpedia_creator_id = npx.DEFAULT_CREATOR_ID
        npx.check_creator_id(args.neuronpedia_creator_id)
        args.neuronpedia_source_set = args.neuronpedia_source_set or npx.SOURCE_SETS[0]
        model_id = args.neuronpedia_model_id or npx.model_slug(model_name(args.model_type))
        npx.check_target(args.neuronpedia, model_id)
    start = time.perf_counter()
    lm = load_model(args.model_type, args.device)
    cards = run(lm, args, out)
    print(f"{len(cards)} neuron cards in {time.perf_counter() - start:.1f} s: {out / layout.CARDS_MD}, {out / layout.CARDS_HTML}")
    if args.causal_graph:
        with tqdm(unit="window" if DatasetDir(args.dataset_path, lm.name).is_corpus else "seq",
                  desc="causal graph") as bar:
            page = causalpage.write_causal_page(lm.model, lm.tokenizer, args.dataset_path, lm.name, args.causal_graph,
                                                layout.path(out, layout.CAUSAL_PAGE, lm.name), args.batch_size,
                                                bar.update)
        n = lm.model.config.n_layer * lm.model.config.d_mlp
        shown = f"all {n:,}" if args.causal_graph >= n else f"the top {args.causal_graph:,}"
        print(f"causal graph of {shown} neurons: {page}")
    if args.neuronpedia is not None:
        # under an flock on DIR, DIR/{id} checked again, staged beside it and renamed in
        folder = npx.write_export(args.neuronpedia, cards, lm.name, lm.model, Path(args.dataset_path).resolve().name,
                                  args.neuronpedia_creator_id, model_id, args.neuronpedia_source_set)
        print(f"Neuronpedia export of {len(cards)} neurons: {folder}")


@torch.no_grad()
def run(lm, args, out: Path) -> list:
    """The cards of --neurons with a loaded model, written into out; returns them."""
    cfg = lm.model.config
    ds = DatasetDir(args.dataset_path, lm.name)
    ds.check(cfg.n_layer, cfg.d_mlp)
    corpus_mode = ds.is_corpus  # build_cards reads the record
    if corpus_mode and not layout.path(args.dataset_path, layout.TOP_EXAMPLES, lm.name).is_file():
        raise PipelineError(f"{args.dataset_path} is a corpus-mode dataset without "
                            f"{layout.TOP_EXAMPLES.format(m=lm.name)} (stage b ran with --top_examples 0, or an older "
                            f"version): rerun stage b with --top_examples K")
    inputs = (layout.CORPUS, layout.FREQUENCY, layout.TOP_EXAMPLES) if corpus_mode else (layout.DATASET, layout.FREQUENCY)
    atomic.verify_output_set(layout.path(args.dataset_path, layout.DATASET_MANIFEST, lm.name),
                         [layout.path(args.dataset_path, f, lm.name) for f in inputs], "stage b")
    n = cfg.n_layer * cfg.d_mlp
    ids = cd.parse_neurons(args.neurons, n, args.dataset_path, lm.name)
    degrees = cd.graph_degrees(args.dataset_path, lm.name, n, args.threshold, args.weight)
    with tqdm(unit="window" if corpus_mode else "seq", desc="top examples") as bar:
        cards = cd.build_cards(lm.model, lm.tokenizer, args.dataset_path, lm.name, ids, args.top_examples,
                               args.batch_size, progress=bar.update, degrees=degrees,
                               modules=cd.dataset_modules(args.dataset_path, lm.name, n))
    atomic.lock_directory(out, "neuron cards")
    cd.write_cards(out, cards, lm.name)
    return cards


if __name__ == "__main__":
    run_main(main)
