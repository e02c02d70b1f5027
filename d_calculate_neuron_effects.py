"""
Exhaustive single-neuron ablation effects: zero-ablate every neuron alone and measure what it does.

Prompt mode (--input_csv), teacher-forced along the continuations of stage b's dataset: for each neuron, the
metrics stage e reports in summary.csv for a subset holding only that neuron (greedy, same prompt CSV), each
(prompt, repeat) sample's mean over its continuation, then the mean over samples:
  kl          KL(unablated || ablated) of the next-token distributions, in nats
  delta_nll   -log p_ablated + log p_unablated of the dataset's tokens
Corpus mode (--input_text): the same two on real text, at every position of every window (read as stage b's
corpus mode reads text, up to --eval_tokens scored tokens), the real next token's delta_nll, means over tokens;
stage e's --eval_text measures a subset the same way.

Every family runs through its neuron site (the input to the MLP's output projection).

Writes into --dataset_path: {m}_neuron_effects.csv (neuron_id, delta_nll, kl, and delta_nll over each half of
the selection data; one row per neuron measured, in id order) and {m}_neuron_effects.json (model, the data
measured on with its sha256, counts).

Scale-out: --neurons I/N measures blocks I, I+N, ... of the neurons into --output_dir (a shard of the effects
file), and --merge SHARD_DIR ... writes the N shards into --dataset_path, equal to one run bit for bit; under
torchrun every process takes its share of the blocks and the first writes the whole file.

    python d_calculate_neuron_effects.py --dataset_path parcellation_datasets/test_1 \\
        --input_csv parcellation_datasets/test_1.csv --model_type gpt2
"""

import json
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.cli import add_model_args, check_at_least, parser, run_main
from gelutrace.evaluate import effects as ef
from gelutrace.evaluate import metrics
from gelutrace.evaluate import realtext as rt
from gelutrace.files import atomic, formats, layout
from gelutrace.files.corpusfiles import DEFAULT_FIELD, add_text_field_arg, record_field
from gelutrace.files.dataset import DatasetDir
from gelutrace.model.generation import encode_prompts
from gelutrace.model.loading import load_model
from gelutrace.record import corpus as cp
from gelutrace.record.prompts import fingerprint


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--dataset_path", required=True,
                    help="stage b's dataset directory of this model (prompt mode reads {m}_activation_dataset.csv; "
                         "the results are written there)")
    ap.add_argument("--input_csv", default=None,
                    help="prompt mode: the prompt CSV the dataset was made from (columns prompts, "
                         "number_of_new_tokens and optionally num_samples)")
    ap.add_argument("--input_text", nargs="+", default=None, metavar="PATH",
                    help="corpus mode: measure on this text (any corpus file or directory stage b reads: .txt, "
                         ".jsonl, their .gz/.zst, .json.gz, .parquet, .arrow), e.g. the corpus the dataset was made "
                         "from")
    add_text_field_arg(ap, "--input_text (corpus mode)")
    rt.add_window_args(ap, "--input_text (corpus mode)", "the dataset's corpus context, else the model's")
    add_model_args(ap)
    ap.add_argument("--neurons", default="all", metavar="all|FILE.npy|I/N",
                    help="measure every neuron, only the ids in a .npy file of neuron ids, or shard I of N of all "
                         "neurons (blocks I, I+N, ... of 512 neurons of one layer; written to --output_dir, merged "
                         "with --merge) (default: %(default)s)")
    ap.add_argument("--output_dir", default=None,
                    help="with --neurons I/N: where this shard writes its part (default: "
                         "<dataset_path>/neuron_effects_shard_I_of_N)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="SHARD_DIR",
                    help="write the shards of a --neurons I/N run (all N of them) into --dataset_path's effects file")
    ap.add_argument("--batch_size", type=int, default=512,
                    help="most (neuron, sequence) rows run through the model together (default: %(default)s)")
    ap.add_argument("--max_values", type=int, default=metrics.LOGIT_BUDGET,
                    help="most float32 values one step holds: logits (rows x continuation positions x "
                         "vocabulary) and MLP activations (rows x positions x MLP width); working memory is "
                         "about 2-3 x 4 bytes per value; raise it on a GPU (default: %(default)s)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished blocks of neurons of an interrupted run with the same inputs")
    args = ap.parse_args(argv)
    check_at_least(args, 1, "batch_size", "max_values", "eval_tokens")
    if args.merge:
        return merge(args)
    if (args.input_csv is None) == (args.input_text is None):
        raise PipelineError("give exactly one of --input_csv (prompt mode) and --input_text (corpus mode)")
    if args.input_csv is not None and (args.context is not None or args.eval_tokens != rt.EVAL_TOKENS
                                       or args.text_field != DEFAULT_FIELD):
        raise PipelineError("--context, --eval_tokens and --text_field belong to corpus mode (--input_text)")
    shard = cp.parse_shard(args.neurons, "--neurons") if re.fullmatch(r"\d+/\d+", args.neurons) else None
    dist_ctx = cp.distributed()
    if args.output_dir is not None and shard is None:
        raise PipelineError("--output_dir is where a --neurons I/N shard writes; the whole run writes into "
                            "--dataset_path")
    if shard is not None and dist_ctx is not None:
        raise PipelineError("--neurons I/N cannot be combined with torchrun: each torchrun process already takes "
                            "its own share of the neurons")

    lm = load_model(args.model_type, args.device)
    result = run(lm, args, shard, dist_ctx)
    if result is not None:
        ids, dnll, what, written = result
        top = ids[np.argsort(-dnll, kind="stable")[:5]]
        print(f"{len(ids)} neurons measured ({what}); largest delta_nll: neurons {', '.join(map(str, top))}")
        print(f"written to {written}")


@torch.no_grad()
def run(lm, args, shard: tuple[int, int] | None, dist_ctx):
    """The single-neuron ablations of --neurons (of this shard, or this torchrun process's share) with a loaded
    model, written; returns the measured ids, their delta_nll, what they were measured on and the file written
    (None on the torchrun ranks that do not write)."""
    cfg = lm.model.config
    n_neurons = cfg.n_layer * cfg.d_mlp
    DatasetDir(args.dataset_path, lm.name).check(cfg.n_layer, cfg.d_mlp, lm.site)
    rank = dist_ctx[0] if dist_ctx is not None else 0
    out = (Path(args.output_dir or Path(args.dataset_path) / f"neuron_effects_shard_{shard[0]}_of_{shard[1]}")
           if shard is not None else Path(args.dataset_path))
    if rank == 0:
        atomic.lock_directory(atomic.check_output_dir(out, "--output_dir"), "single-neuron effects")
    ids = (np.arange(n_neurons, dtype=np.int64) if args.neurons == "all" or shard is not None
           else np.unique(formats.read_subset(args.neurons, n_neurons)))
    if not len(ids):
        raise PipelineError(f"--neurons {args.neurons} holds no neuron ids: there is nothing to measure")

    if args.input_csv is not None:
        measure, meta = prompt_mode(args, lm)
    else:
        measure, meta = corpus_mode(args, lm)
    meta.update(neurons="all" if args.neurons == "all" or shard is not None else Path(args.neurons).name,
                num_neurons=len(ids))
    todo = ef.blocks(ids, cfg.d_mlp)
    mine = ef.shard_blocks(len(todo), args.neurons if shard is not None else None, dist_ctx)
    if not len(mine):
        raise PipelineError(f"--neurons {args.neurons if shard is not None else 'all'}: the model's {len(todo)} blocks "
                            f"of up to {ef.BLOCK} neurons leave this {'shard' if shard else 'process'} none; use at "
                            f"most {len(todo)} shards")
    meta["dataset_frequency_sha256"] = atomic.file_sha256(layout.path(args.dataset_path, layout.FREQUENCY, lm.name))
    if dist_ctx is not None:
        cp.init_distributed(lm.device)
    staging = ef.Staging(out, lm.name, fingerprint(meta, vars(cfg), ids.tobytes(), args.batch_size, args.max_values,
                                                   lm.device.type, "halves", mine.tolist()),
                         tag=f"_rank{rank}" if dist_ctx is not None else "")
    done = staging.start(args.resume)
    if done:
        print(f"resuming: {len(done)} of {len(mine)} blocks of neurons already measured")
    results = dict(done)
    with tqdm(total=sum(len(todo[i]) for i in mine), unit="neuron", desc="single-neuron ablations",
              initial=sum(len(todo[i]) for i in done), disable=rank != 0) as bar:
        for i in mine:
            if int(i) in results:
                continue
            results[int(i)] = measure(todo[i], bar.update)
            staging.add(int(i), *results[int(i)])
    if dist_ctx is not None:
        import torch.distributed as dist

        parts = [None] * dist_ctx[1]
        dist.all_gather_object(parts, results)
        results = {k: v for part in parts for k, v in part.items()}
        dist.barrier()
    mine_ids = np.concatenate([todo[i] for i in sorted(results)])
    kl, dnll, halves = (np.concatenate([results[i][j] for i in sorted(results)], axis=-1) for j in range(3))
    if shard is not None:
        meta["neuron_shard"] = {"index": shard[0], "count": shard[1], "blocks": len(todo)}
    if rank == 0:
        ef.write_effects(out, lm.name, mine_ids, kl, dnll, meta, halves)
    staging.finish()
    if dist_ctx is not None:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return None
    return mine_ids, dnll, meta["what"], layout.path(out, layout.NEURON_EFFECTS, lm.name)


def prompt_mode(args, lm):
    """The measurement of one block of neurons along the dataset's continuations, and the run's record."""
    cfg = lm.model.config
    prompts = formats.read_prompts(args.input_csv)
    atomic.verify_output_set(layout.path(args.dataset_path, layout.DATASET_MANIFEST, lm.name),
                         [layout.path(args.dataset_path, layout.DATASET, lm.name)], "stage b")
    prompt_ids = encode_prompts(lm.tokenizer, prompts, cfg.block_size)
    seqs = ef.dataset_sequences(args.dataset_path, lm.name, prompts, prompt_ids, Path(args.input_csv).name)
    if not seqs.conts:
        raise PipelineError(f"{args.input_csv} asks for no new tokens: there is nothing to measure")
    dataset_file = layout.path(args.dataset_path, layout.DATASET, lm.name)
    n_samples = int((seqs.sample_rows >= 0).sum())
    meta = {"model": lm.name, "model_path": str(lm.path.resolve()), "ablation": "zero", "objective": "continuations",
            "dataset": dataset_file.name, "dataset_sha256": atomic.file_sha256(dataset_file),
            "input_csv": Path(args.input_csv).name, "input_csv_sha256": atomic.file_sha256(args.input_csv),
            "num_samples": n_samples, "num_sequences": len(seqs.conts),
            "num_tokens": int(sum(len(seqs.conts[r]) for r in seqs.sample_rows if r >= 0)),
            "what": f"over {n_samples} samples, {len(seqs.conts)} distinct sequences"}
    groups = ef.sequence_groups(seqs, cfg.vocab_size, cfg.d_mlp, args.batch_size, args.max_values)
    return (lambda block, tick: ef.block_effects(lm.model, block, seqs, groups, args.batch_size, args.max_values,
                                                 on_chunk=tick)), meta


def corpus_mode(args, lm):
    """The measurement of one block of neurons on the text's windows, and the run's record. Where the text is the
    dataset's own corpus in the same windows, the halves are those of its shards (gelutrace.selection.stability)."""
    cfg = lm.model.config
    record = DatasetDir(args.dataset_path, lm.name).corpus_record()
    context = rt.check_context(args.context or (record or {}).get("context") or cfg.block_size, cfg.block_size)
    text = rt.read_eval_text(args.input_text, lm.tokenizer, context, cfg.vocab_size, args.eval_tokens, units="windows",
                             flag="--input_text", text_field=args.text_field)
    window_half = None
    shards = len((record or {}).get("merged_shards") or [])
    if (record is not None and shards >= 2 and record.get("context") == context
            and [(f["sha256"], f["field"]) for f in text.files]
            == [(f["sha256"], record_field(f)) for f in record["files"][:len(text.files)]]):
        window_half = (np.arange(text.n_units) % shards >= shards // 2).astype(np.int64)  # as the shards split them
    meta = {"model": lm.name, "model_path": str(lm.path.resolve()), "ablation": "zero", "objective": "real_text",
            "input_text": [{k: f[k] for k in ("path", "format", "field", "sha256")} for f in text.files],
            "context": context, "eval_tokens": args.eval_tokens, "num_tokens": text.scored, "num_windows": text.n_units,
            "halves": "the dataset's shards" if window_half is not None else None,
            "what": f"over {text.scored:,} tokens of real text"}
    return (lambda block, tick: ef.text_block_effects(lm.model, block, text, window_half, args.batch_size,
                                                      on_chunk=tick)), meta


def merge(args):
    """--merge: the shards of one --neurons I/N run, checked (same run, every shard once), into --dataset_path."""
    import pandas as pd

    dirs = [Path(d) for d in args.merge]
    metas, frames = [], []
    for d in dirs:
        m = layout.model_prefix(d, layout.NEURON_EFFECTS_META)
        try:
            metas.append(json.loads(layout.path(d, layout.NEURON_EFFECTS_META, m).read_text()))
        except (OSError, ValueError) as e:
            raise PipelineError(f"{d}: cannot read its {layout.NEURON_EFFECTS_META.format(m=m)} ({e})") from None
        if "neuron_shard" not in metas[-1]:
            raise PipelineError(f"{d} is not a --neurons I/N shard")
        frames.append(pd.read_csv(layout.path(d, layout.NEURON_EFFECTS, m)))
    first = {k: v for k, v in metas[0].items() if k not in ("neuron_shard", "num_neurons")}
    n = metas[0]["neuron_shard"]["count"]
    seen = {}
    for d, meta in zip(dirs, metas):
        rest = {k: v for k, v in meta.items() if k not in ("neuron_shard", "num_neurons")}
        if rest != first or meta["neuron_shard"]["count"] != n:
            raise PipelineError(f"{d} and {dirs[0]} are shards of different runs (their records differ)")
        i = meta["neuron_shard"]["index"]
        if i in seen:
            raise PipelineError(f"shard {i}/{n} is given twice ({seen[i]} and {d})")
        seen[i] = d
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise PipelineError(f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing: the merge needs all {n}")
    df = pd.concat(frames).sort_values("neuron_id", kind="stable")
    if df["neuron_id"].duplicated().any():
        raise PipelineError("the shards measured some neurons twice")
    freq = layout.path(args.dataset_path, layout.FREQUENCY, metas[0]["model"])
    if not freq.is_file() or atomic.file_sha256(freq) != first.get("dataset_frequency_sha256"):
        raise PipelineError(f"the shards were measured for another dataset than {args.dataset_path} (its "
                            f"{freq.name} is not the one they record): give the dataset they were run on")
    out = atomic.lock_directory(atomic.check_output_dir(args.dataset_path, "--dataset_path"), "the merge of the effects")
    meta = {**first, "num_neurons": len(df), "merged_shards": [str(seen[i].resolve()) for i in range(n)]}
    ef.write_effects(out, metas[0]["model"], df["neuron_id"].to_numpy(), df["kl"].to_numpy(),
                     df["delta_nll"].to_numpy(), meta, df[[f"delta_nll_{h}" for h in layout.HALVES]].to_numpy().T)
    print(f"{len(df)} neurons of {n} shards written to {layout.path(out, layout.NEURON_EFFECTS, metas[0]['model'])}")


if __name__ == "__main__":
    run_main(main)
