"""
Exhaustive single-neuron ablation effects: zero-ablate every GELU neuron alone and measure what it does,
teacher-forced along the continuations of stage b's dataset.

For each neuron, the metrics are those stage e reports in summary.csv for a subset holding only that
neuron (greedy, same prompt CSV): each (prompt, repeat) sample's mean over its continuation, then the mean
over samples:
  kl          KL(unablated || ablated) of the next-token distributions, in nats
  delta_nll   -log p_ablated + log p_unablated of the dataset's tokens

Writes into --dataset_path: {m}_neuron_effects.csv (neuron_id, delta_nll, kl; one row per neuron measured,
in id order) and {m}_neuron_effects.json (model, dataset and prompt CSV with their sha256, sample counts).

    python d_calculate_neuron_effects.py --dataset_path parcellation_datasets/test_1 \\
        --input_csv parcellation_datasets/test_1.csv --model_type gpt2
"""

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace import effects as ef
from gelutrace import perturbation as pt
from gelutrace import stagefiles as sf
from gelutrace.cli import add_model_args, check_at_least, parser, run_main
from gelutrace.generation import encode_prompts
from gelutrace.loading import load_model
from gelutrace.recording import fingerprint


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--dataset_path", required=True,
                    help="stage b's dataset directory of this model (reads {m}_activation_dataset.csv and the "
                         "graph files; the results are written there)")
    ap.add_argument("--input_csv", required=True,
                    help="the prompt CSV the dataset was made from (columns prompts, number_of_new_tokens and "
                         "optionally num_samples)")
    add_model_args(ap)
    ap.add_argument("--neurons", default="all", metavar="all|FILE.npy",
                    help="measure every neuron, or only the ids in a .npy file of neuron ids "
                         "(default: %(default)s)")
    ap.add_argument("--batch_size", type=int, default=512,
                    help="most (neuron, sequence) rows run through the model together (default: %(default)s)")
    ap.add_argument("--max_values", type=int, default=pt.LOGIT_BUDGET,
                    help="most float32 values one step holds: logits (rows x continuation positions x "
                         "vocabulary) and MLP activations (rows x positions x MLP width); working memory is "
                         "about 2-3 x 4 bytes per value; raise it on a GPU (default: %(default)s)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished blocks of neurons of an interrupted run with the same inputs")
    args = ap.parse_args(argv)
    check_at_least(args, 1, "batch_size", "max_values")
    prompts = sf.read_prompts(args.input_csv)

    lm = load_model(args.model_type, args.device)
    model, cfg = lm.model, lm.model.config
    n_neurons = cfg.n_layer * cfg.d_mlp
    pt.check_dataset(args.dataset_path, lm.name, cfg.n_layer, cfg.d_mlp, lm.site)
    sf.verify_output_set(sf.path(args.dataset_path, sf.DATASET_MANIFEST, lm.name),
                         [sf.path(args.dataset_path, sf.DATASET, lm.name)], "stage b")
    sf.lock_directory(args.dataset_path, "single-neuron effects")
    ids = (np.arange(n_neurons, dtype=np.int64) if args.neurons == "all"
           else np.unique(sf.read_subset(args.neurons, n_neurons)))
    if not len(ids):
        raise PipelineError(f"--neurons {args.neurons} holds no neuron ids: there is nothing to measure")
    prompt_ids = encode_prompts(lm.tokenizer, prompts, cfg.block_size)
    seqs = ef.dataset_sequences(args.dataset_path, lm.name, prompts, prompt_ids, Path(args.input_csv).name)
    if not seqs.conts:
        raise PipelineError(f"{args.input_csv} asks for no new tokens: there is nothing to measure")

    dataset_file = sf.path(args.dataset_path, sf.DATASET, lm.name)
    meta = {"model": lm.name, "model_path": str(lm.path.resolve()), "ablation": "zero",
            "dataset": dataset_file.name, "dataset_sha256": sf.file_sha256(dataset_file),
            "input_csv": Path(args.input_csv).name, "input_csv_sha256": sf.file_sha256(args.input_csv),
            "num_samples": int((seqs.sample_rows >= 0).sum()), "num_sequences": len(seqs.conts),
            "num_tokens": int(sum(len(seqs.conts[r]) for r in seqs.sample_rows if r >= 0)),
            "neurons": args.neurons if args.neurons == "all" else Path(args.neurons).name,
            "num_neurons": len(ids)}
    staging = ef.Staging(args.dataset_path, lm.name, fingerprint(
        meta, vars(cfg), ids.tobytes(), args.batch_size, args.max_values, lm.device.type, "halves"))
    done = staging.start(args.resume)
    todo = ef.blocks(ids, cfg.d_mlp)
    if done:
        print(f"resuming: {len(done)} of {len(todo)} blocks of neurons already measured")
    groups = ef.sequence_groups(seqs, cfg.vocab_size, cfg.d_mlp, args.batch_size, args.max_values)
    results = dict(done)
    with tqdm(total=len(ids), unit="neuron", desc="single-neuron ablations",
              initial=sum(len(todo[i]) for i in done)) as bar:
        for i, block in enumerate(todo):
            if i in results:
                continue
            results[i] = ef.block_effects(model, block, seqs, groups, args.batch_size, args.max_values,
                                          on_chunk=bar.update)
            staging.add(i, *results[i])

    kl = np.concatenate([results[i][0] for i in range(len(todo))])
    dnll = np.concatenate([results[i][1] for i in range(len(todo))])
    halves = np.concatenate([results[i][2] for i in range(len(todo))], axis=1)
    ef.write_effects(args.dataset_path, lm.name, ids, kl, dnll, meta, halves)
    staging.finish()
    top = ids[np.argsort(-dnll, kind="stable")[:5]]
    print(f"{len(ids)} neurons measured over {meta['num_samples']} samples ({len(seqs.conts)} distinct sequences); "
          f"largest delta_nll: neurons {', '.join(map(str, top))}")
    print(f"written to {sf.path(args.dataset_path, sf.NEURON_EFFECTS, lm.name)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_main(main)
