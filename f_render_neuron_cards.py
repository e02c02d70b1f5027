"""
Neuron cards: for each neuron named, its layer and dimension, activation frequency and mean activation,
attribution and single-neuron ΔNLL where computed, its top-activating samples of a prompt-mode stage-b
dataset (found by running the model teacher-forced over the dataset's distinct sequences) and the tokens its
direct logit effect promotes and suppresses.

Writes into --output: neuron_cards.md and neurons.html, a self-contained page (inline CSS, no script, no
external resource) in which each context's tokens are shaded by the neuron's activation.

    python f_render_neuron_cards.py --dataset_path parcellation_datasets/test_1_tinybard --model_type tinybard \\
        --neurons 417,1033,2900
"""

import time
from pathlib import Path

import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace import cards as cd
from gelutrace import perturbation as pt
from gelutrace import stagefiles as sf
from gelutrace.cli import add_model_args, parser, run_main
from gelutrace.loading import load_model


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--dataset_path", required=True,
                    help="a prompt-mode stage-b dataset directory of this model (reads {m}_activation_dataset.csv, "
                         "{m}_neuron_frequency.csv and, when present, {m}_neuron_effects.csv)")
    add_model_args(ap)
    ap.add_argument("--neurons", required=True, metavar="FILE.npy|IDS|report",
                    help="the neurons to render, in this order: a .npy file of neuron ids (e.g. a stage-d subset), "
                         "ids separated by commas, or 'report': the first 20 of each selection method's best subset "
                         "at the smallest k stage e compared (random excluded), then the 10 with the largest "
                         "single-neuron delta_nll where {m}_neuron_effects.csv exists")
    ap.add_argument("--output", help="directory the cards are written into (default: DATASET_PATH/neuron_cards)")
    ap.add_argument("--top_examples", type=int, default=10,
                    help="top-activating samples shown per neuron (default: %(default)s)")
    ap.add_argument("--batch_size", type=int, default=32,
                    help="sequences run through the model together (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.top_examples < 1:
        raise PipelineError(f"--top_examples must be >= 1, got {args.top_examples}")
    if args.batch_size < 1:
        raise PipelineError(f"--batch_size must be >= 1, got {args.batch_size}")
    out = sf.check_output_dir(args.output or Path(args.dataset_path) / sf.CARDS_DIR, "--output")
    start = time.perf_counter()
    lm = load_model(args.model_type, args.device)
    cfg = lm.model.config
    pt.check_dataset(args.dataset_path, lm.name, cfg.n_layer, cfg.d_mlp)
    sf.verify_output_set(sf.path(args.dataset_path, sf.DATASET_MANIFEST, lm.name),
                         [sf.path(args.dataset_path, f, lm.name) for f in (sf.DATASET, sf.FREQUENCY)], "stage b")
    ids = cd.parse_neurons(args.neurons, cfg.n_layer * cfg.d_mlp, args.dataset_path, lm.name)
    with tqdm(unit="seq", desc="top examples") as bar:
        cards = cd.build_cards(lm.model, lm.tokenizer, args.dataset_path, lm.name, ids, args.top_examples,
                               args.batch_size, progress=bar.update)
    sf.lock_directory(out, "neuron cards")
    cd.write_cards(out, cards, lm.name)
    print(f"{len(cards)} neuron cards in {time.perf_counter() - start:.1f} s: {out / sf.CARDS_MD}, {out / sf.CARDS_HTML}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_main(main)
