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
  with --mean_ablation_top N (and --eval_text): each k's N best methods (chosen on the validation part) again,
  mean-ablated, with their own controls: comparison_mean_ablation.csv, method_verdict_mean_ablation.csv,
  dose_response_mean_ablation.csv/.png, and mean_ablation_check.csv (per k: their order on the test part under
                        zero and under mean ablation, whether it holds, the margin of the first under mean)
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

from gelutrace import PipelineError
from gelutrace.cli import add_model_args, add_sampling_args, check_at_least, check_sampling_args, parser, run_main
from gelutrace.evaluate import ablation as pt
from gelutrace.evaluate import realtext
from gelutrace.evaluate import statistics as stats
from gelutrace.files import formats, layout
from gelutrace.files.corpusfiles import add_text_field_arg
from gelutrace.model.loading import load_model
from gelutrace.report import verdict


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
                         "random left out; the subsets stage d ranked with --exclude_layers, compared apart, get "
                         "none), which is the null of the verdict and of the dose-response band at a fraction of "
                         "the cost (default: %(default)s)")
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
    ap.add_argument("--mean_ablation_top", type=int, default=0, metavar="N",
                    help="with --eval_text: also measure each k's N best methods (by the validation part, under zero "
                         "ablation) with every neuron replaced by its mean over the selection data (the dataset's "
                         "mean_activation), each k's first of them with its own --random_controls layer-matched "
                         "controls, mean-ablated too: whether the winner and the order hold "
                         f"({layout.MEAN_CHECK}, {layout.MEAN_VERDICT}, ...; default: %(default)s, off)")
    ap.add_argument("--own_continuation", type=int, choices=[0, 1], default=1,
                    help="1: also measure kl and delta_nll teacher-forced along the unablated model's own greedy "
                         "continuations of the evaluation prompts, for every subset and control (the original "
                         f"metric; with --eval_text its comparison is {layout.CONTINUATION_COMPARISON}). 0, with "
                         "--eval_text only: skip it (the prompts are still generated, free-running, for the token "
                         "agreement and the result files); evaluation.json records what it would cost "
                         "(default: %(default)s)")
    ap.add_argument("--validation_share", type=float, default=0.5,
                    help="share of the evaluation prompts (seeded split, recorded in comparison.json) on which "
                         "each method's best variant is chosen; the verdict's figures come from the rest. Below "
                         f"{stats.MIN_SPLIT_PROMPTS} prompts there is no split (default: %(default)s)")
    ap.add_argument("--control_share", type=float, default=None,
                    help="with --eval_text: share of the test part's units (seeded, recorded in comparison.json) "
                         "on which the random and effect-weighted controls are scored; a subset is judged against "
                         "them on those same units, its effect and the comparisons between methods on the whole "
                         "test part. 1: every test unit (twice the controls' cost at 0.5); below "
                         f"{stats.MIN_CONTROL_UNITS} units the controls take the whole test part "
                         f"(default: {pt.EvalSettings.control_share})")
    args = ap.parse_args(argv)
    check_sampling_args(args)
    check_at_least(args, 0, "random_controls", "module_controls", "mean_ablation_top")
    if not 0 < args.validation_share < 1:
        raise PipelineError(f"--validation_share must be in (0, 1), got {args.validation_share}")
    if args.control_share is not None and not args.eval_text:
        raise PipelineError("--control_share applies to --eval_text (the real text's test part); give it or leave "
                            "--control_share out")
    if args.control_share is None:
        args.control_share = pt.EvalSettings.control_share
    if not 0 < args.control_share <= 1:
        raise PipelineError(f"--control_share must be in (0, 1], got {args.control_share}")
    if args.input_csv is None and args.eval_csv is None:
        raise PipelineError("give --input_csv (the dataset's prompts), --eval_csv (prompts to measure on), or both")
    selection_prompts = formats.read_prompts(args.input_csv) if args.input_csv else None
    eval_csv = args.eval_csv or args.input_csv
    request = pt.Evaluation(args.dataset_path, args.perturbation_subset_filenames,
                            formats.read_prompts(eval_csv) if args.eval_csv else selection_prompts, eval_csv,
                            selection_prompts, args.input_csv, args.eval_text, args.context, args.eval_tokens,
                            args.text_field)
    settings = pt.EvalSettings(args.temperature, args.top_k, args.seed, args.batch_size, args.random_controls,
                               args.ablation, args.validation_share, args.control_subsets, args.module_controls,
                               args.mean_ablation_top, bool(args.own_continuation), args.control_share)
    done = pt.run(load_model(args.model_type, args.device), request, settings)

    summary = done.results.summary
    cols = ["subset", "k"] + (["kl", "delta_nll", "delta_nll_ci_low", "delta_nll_ci_high"] if args.own_continuation
                              else []) + ["token_agreement"]
    cols += ["delta_nll_p_random", "delta_nll_z_random"] if args.random_controls and args.own_continuation else []
    cols += ["text_delta_nll", "text_delta_nll_ci_low", "text_delta_nll_ci_high", "text_kl"] if args.eval_text else []
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if layout.METHOD_VERDICT in done.tables:
        print("\n".join(verdict.verdict_lines(done.tables[layout.METHOD_VERDICT], done.n_neurons)))
    if done.check is not None:
        print("\n".join(verdict.mean_check_lines(done.check.tables[layout.MEAN_CHECK])))
    if layout.MODULE_EFFECTS in done.module_tables:
        eff = done.module_tables[layout.MODULE_EFFECTS]
        print(eff[["subset", "k", "delta_nll", "p_random_holm", "p_weighted_holm"]].to_string(
            index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"results for {len(done.subsets)} subset(s), measured on {done.where} ({eval_csv}), written to {done.out}")


if __name__ == "__main__":
    run_main(main)
