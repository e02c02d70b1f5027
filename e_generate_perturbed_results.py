"""
Stage e: generate text for every prompt of a CSV with GELU neurons ablated, and measure the effect.

Each subset (a .npy of neuron ids under <dataset_path>/perturbation_subsets/, or the word `none` for the
unperturbed baseline) has its neurons' post-GELU outputs replaced at every position (0, or the neuron's
mean activation with --ablation mean) while the model generates, with the KV cache on.

The neurons were chosen on the dataset's prompts (--input_csv) or corpus; --eval_csv measures their effect on
other, held-out prompts, which is the honest test, and --eval_text on real held-out text: teacher-forced, at
every position of every window, the change in the loss of the real next token. With --eval_text the verdict is
the real text's, and the own-continuation comparison is the second table.

Writes into <dataset_path>/perturbation_results/:
  {subset stem}.csv     prompt, sample_index, generated_text, perturbation_subset (none.csv for `none`)
  summary.csv           one row per subset, on every evaluation prompt: k, per-layer counts, metrics with
                        bootstrap 95 % CIs over prompts (kl, delta_nll), and with --random_controls the null of
                        random neurons of the same layers: p_random (empirical, one-sided), z_random,
                        p_random_normal (its Gaussian approximation), the controls' mean, std, 5th/50th/95th
                        percentiles, the subset's percentile among them, and the ratio to their mean (only
                        where that mean is above 0 by its t-interval)
  summary.png           the metrics compared across subsets
  per_sample/{stem}.csv each sample's metrics
  evaluation.json       which prompts chose the neurons and which measured them, and the settings
  comparison.csv, method_verdict.csv, method_overlap.csv, method_agreement.csv, comparison.png,
  comparison.json       the selection methods side by side at each k (for subsets with stage d's sidecar):
                        each method's best variant chosen on the validation part of the evaluation units
                        (prompts; with --eval_text its documents, or windows for a single document), every
                        figure on the test part (comparison.json records the split), p_random_holm across the
                        best variants; a variant with more than half of its picks at score 0 is marked
                        (filler) and never a method's best
  dose_response.csv/.png each method's best variant at every k: the dose-response curves, the verdict's winner
                        at each k and the null band of its controls
  with --eval_text:
  text_breakdown.csv    per subset, real-text delta_nll (and the unablated nll) by the position in the window
                        (0-15, 16-127, 128+) and by the 20 most frequent next tokens
  continuation_comparison.csv, continuation_verdict.csv   the comparison on the own continuations
  summary.csv also gets text_tokens, text_nll (unablated), text_delta_nll, text_kl, their CIs over the units
  and, with controls, their null (text_delta_nll_p_random, ...)
  with module subsets (d_calculate_perturbation_subset.py --modules): each module gets --module_controls
  layer-matched and as many effect-weighted controls (summary.csv: {metric}_p_weighted, ...) and stays out of the
  method comparison:
  module_effects.csv    per module: its effect, both nulls (empirical p, Holm across modules), top tokens
  module_tokens.csv     with --eval_text: the 10 next tokens whose delta_nll rises most without it
  module_contexts.csv   with --eval_text: the 5 positions where its neurons' mean activation is largest

Metrics (each sample's value averaged over its continuation; the summary averages over samples):
  kl                  KL(baseline || perturbed) of the next-token distributions (softmax of the logits,
                      nats), teacher-forced along the baseline's continuation
  delta_nll           -log p_perturbed + log p_baseline of the baseline's tokens, same positions
  token_agreement     fraction of positions where the perturbed model's own generation (same seed) has
                      the baseline's token (subsets only: random controls are measured teacher-forced)
  first_diff_position index of the first token that differs from the baseline's; the continuation's
                      length when none differs

    python e_generate_perturbed_results.py --dataset_path parcellation_datasets/test_1 \\
        --input_csv parcellation_datasets/test_1.csv --model_type gpt2 \\
        --perturbation_subset_filenames gpt2_degree_t0.1_r0.05.npy none --random_controls 5
"""

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.cli import add_model_args, add_sampling_args, check_at_least, check_sampling_args, parser, run_main
from gelutrace.evaluate import ablation as pt
from gelutrace.evaluate import metrics, realtext
from gelutrace.evaluate import moduleeffects as me
from gelutrace.evaluate import statistics as stats
from gelutrace.files import atomic, formats, layout
from gelutrace.files.corpusfiles import DEFAULT_FIELD, add_text_field_arg
from gelutrace.files.dataset import DatasetDir
from gelutrace.model.generation import encode_prompts, plan_batches
from gelutrace.model.loading import load_model
from gelutrace.report import verdict
from gelutrace.report.plots import plot_dose_response, plot_method_comparison, plot_perturbation_summary


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--dataset_path", required=True,
                    help="stage b's dataset directory of this model: holds {m}_neuron_attributes.csv / "
                         "{m}_graph_meta.json and perturbation_subsets/; results go to its perturbation_results/")
    ap.add_argument("--input_csv", default=None,
                    help="the dataset's prompt CSV (columns prompts, number_of_new_tokens, optionally num_samples): "
                         "the prompts the neurons were chosen on; effects are measured on it unless --eval_csv. "
                         "Omit it for a corpus-mode dataset (the neurons were chosen on its text): --eval_csv then "
                         "gives the prompts")
    ap.add_argument("--eval_csv", default=None,
                    help="measure the effects on these prompts instead (same columns), e.g. a held-out set "
                         "disjoint from --input_csv (default: --input_csv)")
    ap.add_argument("--perturbation_subset_filenames", nargs="+", required=True, metavar="NAME",
                    help="one or more .npy files of neuron ids under <dataset_path>/perturbation_subsets/, "
                         "or 'none' for the unperturbed baseline")
    add_model_args(ap)
    add_sampling_args(ap, seed=1337, temperature=0.0, top_k=1)
    ap.add_argument("--ablation", choices=["zero", "mean"], default="zero",
                    help="replace the neurons' outputs by 0, or by each neuron's mean_activation from the "
                         "dataset's {m}_neuron_frequency.csv (default: %(default)s)")
    ap.add_argument("--random_controls", type=int, default=0, metavar="N",
                    help="for each subset, also measure N random subsets with the same number of neurons in "
                         "each layer (drawn with --seed), teacher-forced, several in one batch: the null every "
                         "claim against random uses. The empirical p-value (1 + #controls >= value) / (1 + N) "
                         "cannot go below 1/(N+1), so the verdict claims nothing against random with fewer "
                         f"than {stats.MIN_CONTROLS} (30 gives 0.032) (default: %(default)s)")
    ap.add_argument("--control_subsets", choices=["all", "best"], default="all",
                    help="which subsets get --random_controls: all of them, or best: at each k only the winner on "
                         "the validation part of the verdict's metric (its best variant with the largest ΔNLL there; "
                         "random left out), which is the null of the verdict and of the dose-response band at a "
                         "fraction of the cost (default: %(default)s)")
    ap.add_argument("--module_controls", type=int, default=None, metavar="N",
                    help="for each module (stage d --modules): N layer-matched random controls and N effect-weighted "
                         "ones (drawn in proportion to each neuron's single-neuron delta_nll, else its attribution) "
                         "(default: --random_controls)")
    ap.add_argument("--eval_text", nargs="+", default=None, metavar="PATH",
                    help="also measure every subset on real text: any corpus file or directory stage b's corpus "
                         "mode reads (.txt files are one document each; .jsonl, .json.gz, .parquet, .arrow one per "
                         "line or row, field --text_field), read as it reads them. Refused when it shares a file "
                         "or document with the corpus the neurons were chosen on. The verdict is then the real "
                         "text's")
    realtext.add_window_args(ap, "--eval_text", "the model's context")
    add_text_field_arg(ap, "--eval_text")
    ap.add_argument("--validation_share", type=float, default=0.5,
                    help="share of the evaluation prompts (seeded split, recorded in comparison.json) on which "
                         "each method's best variant is chosen; the verdict's figures come from the rest. Below "
                         f"{stats.MIN_SPLIT_PROMPTS} prompts there is no split (default: %(default)s)")
    args = ap.parse_args(argv)
    check_sampling_args(args)
    check_at_least(args, 0, "random_controls", "module_controls")
    if not 0 < args.validation_share < 1:
        raise PipelineError(f"--validation_share must be in (0, 1), got {args.validation_share}")
    if args.input_csv is None and args.eval_csv is None:
        raise PipelineError("give --input_csv (the dataset's prompts), --eval_csv (prompts to measure on), or both")
    selection_prompts = formats.read_prompts(args.input_csv) if args.input_csv else None
    eval_csv = args.eval_csv or args.input_csv
    prompts = formats.read_prompts(eval_csv) if args.eval_csv else selection_prompts

    run(load_model(args.model_type, args.device), args, selection_prompts, prompts, eval_csv)


@torch.no_grad()
def run(lm, args, selection_prompts, prompts, eval_csv: str):
    """Stage e with a loaded model: every subset ablated on the prompts (and --eval_text), the results written
    into the dataset's perturbation_results/ and summed up on stdout."""
    cfg = lm.model.config
    n_neurons = cfg.n_layer * cfg.d_mlp
    ds = DatasetDir(args.dataset_path, lm.name)
    ds.check(cfg.n_layer, cfg.d_mlp, lm.site)
    corpus_record = ds.corpus_record()
    if selection_prompts is None and corpus_record is None:
        raise PipelineError(f"{args.dataset_path} is a prompt-mode dataset: give its --input_csv")
    atomic.check_output_dir(Path(args.dataset_path) / layout.RESULTS_DIR / layout.PER_SAMPLE_DIR, "--dataset_path")
    atomic.lock_directory(args.dataset_path, "stage e")
    subsets = pt.resolve_subsets(args.dataset_path, args.perturbation_subset_filenames, n_neurons, lm.name)
    if old := pt.unrecorded(subsets):
        print(f"warning: {len(old)} subset(s) ({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}) come from an "
              f"older stage d, whose sidecars record neither the scores nor the halves: their Spearman "
              f"(method_agreement.csv) and selection_jaccard stay empty; rerun stage d to fill them", file=sys.stderr)
    mean_values = ds.mean_activations(n_neurons) if args.ablation == "mean" else None
    prompt_ids = encode_prompts(lm.tokenizer, prompts, cfg.block_size)
    text = leak = None
    if args.eval_text:
        context = realtext.check_context(cfg.block_size if args.context is None else args.context, cfg.block_size)
        text = realtext.read_eval_text(args.eval_text, lm.tokenizer, context, cfg.vocab_size, args.eval_tokens,
                                       text_field=args.text_field)
        leak = realtext.leak_check(text, corpus_record, selection_prompts)
        if note := realtext.leak_note(leak):
            print(f"note: {note}", file=sys.stderr)
    elif args.context is not None or args.eval_tokens != realtext.EVAL_TOKENS or args.text_field != DEFAULT_FIELD:
        raise PipelineError("--context, --eval_tokens and --text_field apply to --eval_text; give it or leave them "
                            "out")

    greedy = args.temperature == 0
    batches = plan_batches(prompts, prompt_ids, greedy, args.batch_size, cfg.block_size)
    n_generated = 1 + sum(1 for s in subsets if len(s.ids))
    tokens = n_generated * sum(len(b.row_prompt) * b.new_tokens for b in batches)
    chunks = metrics.metric_chunks(metrics.plan_rows(batches, prompts), prompt_ids, cfg.vocab_size, args.batch_size)
    ablated = [s for s in subsets if len(s.ids)]
    modules = [s for s in ablated if s.is_module]
    weights, weights_source = pt.control_weights(args.dataset_path, lm.name, n_neurons) if modules else (None, None)
    if modules and weights is None:
        print(f"note: {args.dataset_path} has neither single-neuron effects nor attribution: the modules get no "
              f"effect-weighted controls (run d_calculate_neuron_effects.py, or stage b with attribution)",
              file=sys.stderr)
    compared = [s for s in ablated if not s.is_module]
    with_controls = (len({len(s.ids) for s in compared if s.compared}) if args.control_subsets == "best"
                     else len(compared))  # at most
    settings = pt.EvalSettings(args.temperature, args.top_k, args.seed, args.batch_size, args.random_controls,
                               args.ablation, args.validation_share, args.control_subsets, args.module_controls)
    conditions = (len(ablated) + args.random_controls * with_controls
                  + settings.per_module * len(modules) * (2 if weights is not None else 1))
    with tqdm(total=tokens, unit="tok", desc=f"generating ({'greedy' if greedy else 'sampling'})") as gen_bar, \
            tqdm(total=len(chunks) * conditions, unit="ablation", desc="teacher-forced metrics") as metric_bar, \
            tqdm(total=text.scored * conditions if text else 0, unit="tok", unit_scale=True, desc="real text",
                 disable=text is None) as text_bar:
        bars = {"tokens": gen_bar, "passes": metric_bar, "text": text_bar}
        results = pt.run(lm.model, lm.tokenizer, prompts, prompt_ids, batches, subsets, mean_values, settings,
                         progress=lambda kind, n: bars[kind].update(n), text=text, weights=weights)
    module_tables = {}
    if modules:
        tokens = None
        if text is not None:
            tokens = me.tokens_table(results.text, subsets, lm.tokenizer)
            module_tables[layout.MODULE_TOKENS] = tokens
            module_tables[layout.MODULE_CONTEXTS] = me.contexts_table(lm.model, text, subsets, lm.tokenizer, cfg.d_mlp)
        module_tables[layout.MODULE_EFFECTS] = me.effects_table(subsets, results.summary, text is not None,
                                                            weights_source, tokens)

    pt.add_selection_overlap(results, subsets)
    evaluation = pt.evaluation_record(args.input_csv, selection_prompts, eval_csv, prompts, args, corpus_record)
    if text is not None:
        evaluation["eval_text"] = {**text.record(args.eval_tokens), "leak_check": leak}
    out = Path(args.dataset_path) / layout.RESULTS_DIR
    where = ("held-out prompts" if evaluation["held_out"] else "prompts not looked up in the corpus"
             if evaluation["prompts_in_both"] is None else "the prompts they were chosen on")
    # the whole set is written beside the earlier one and swapped in: a failure leaves the earlier results
    with atomic.OutputSet(out, out / layout.RESULTS_MANIFEST, pt.RESULT_SET, "stage e") as staged:
        written = pt.write_results(staged.dir, results, evaluation, lm.tokenizer)
        for name, df in module_tables.items():
            atomic.write_csv(df, staged.dir / name)
            written.append(staged.dir / name)
        plot_perturbation_summary(results.summary, staged.dir / layout.PERTURBATION_PLOT,
                                  title=f"{lm.name}: effect of {args.ablation}-ablating each subset, on {where}")
        tables = pt.write_comparison(args.dataset_path, staged.dir, lm.name, results, subsets, n_neurons, prompts,
                                     args.control_subsets)
        written += [staged.dir / layout.PERTURBATION_PLOT] + [staged.dir / name for name in tables]
        if tables:
            on = f"{text.scored:,} tokens of held-out text" if text is not None else where
            written.append(staged.dir / layout.COMPARISON_RECORD)
            plot_method_comparison(tables[layout.COMPARISON], staged.dir / layout.COMPARISON_PLOT,
                                   title=f"{lm.name}: neurons chosen by each method, {args.ablation}-ablated, on {on}")
            ylabel = ("Δ NLL of the real next token (nats/token), 95 % CI over " + text.units if text is not None
                      else "Δ NLL of the baseline's tokens (nats/token), 95 % CI over prompts")
            plot_dose_response(tables[layout.DOSE_RESPONSE], staged.dir / layout.DOSE_RESPONSE_PLOT, ylabel=ylabel,
                               title=f"{lm.name}: dose-response, {args.ablation}-ablating each method's top k, on {on}")
            written += [staged.dir / layout.COMPARISON_PLOT, staged.dir / layout.DOSE_RESPONSE_PLOT]
        staged.vouch(written)
    cols = ["subset", "k", "kl", "delta_nll", "delta_nll_ci_low", "delta_nll_ci_high", "token_agreement"]
    cols += ["delta_nll_p_random", "delta_nll_z_random"] if args.random_controls else []
    cols += ["text_delta_nll", "text_delta_nll_ci_low", "text_delta_nll_ci_high", "text_kl"] if text else []
    print(results.summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if tables:
        print("\n".join(verdict.verdict_lines(tables[layout.METHOD_VERDICT], n_neurons)))
    if modules:
        eff = module_tables[layout.MODULE_EFFECTS]
        print(eff[["subset", "k", "delta_nll", "p_random_holm", "p_weighted_holm"]].to_string(
            index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"results for {len(subsets)} subset(s), measured on {where} ({eval_csv}), written to {out}")


if __name__ == "__main__":
    run_main(main)
