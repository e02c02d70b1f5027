"""
Stage e speed on the T1 workload (parcellation_datasets/test_1.csv: 10 prompts x 50 tokens x 5 samples),
greedy, on a GPT-2-small-shaped random model (transformers' GPT2Config() defaults, saved locally), with one
random subset of 1 % of the neurons plus `none`.

Then the cost of the null (random controls of the same layer composition, teacher-forced, several ablations
in one batch with a mask per block of rows): 30 controls of one 1 % subset on T1 at GPT-2-small shape
(target <= 5 min on CPU), and 30 controls for each of 12 subsets of the demo's sizes on the shipped model's
held-out prompts (target <= 60 s), each against one ablation per pass in the same run.

Then the real-text evaluation (stage e --eval_text): the cost of one evaluation (one subset or control) per
1,000 scored tokens, with several ablations per forward pass, on the shipped model (the demo's evaluation text)
and at GPT-2-small shape, the GPT-2-small estimate for 100 controls x 20 subsets on 10^5 tokens from that
per-token cost, and each demo run's whole stage e (its recorded command, rerun on a copy of the demo's
dataset; run `make demo` first, else it is skipped).

Prints: generated tokens/s of the unperturbed and the ablated generation (tokens computed: greedy computes
each prompt once; tokens delivered: all 5 samples of each prompt), the hook overhead (ablated vs unperturbed,
interleaved repeats in the same process, best of --repeats), the whole stage-e computation (generation of
both plus the teacher-forced metric passes) and the peak RSS.

Also, each against the former way in the same run: the logits and metrics of 8 ablations of one batch of the
evaluation text formed whole and a block of positions at a time (metrics.blocked_shift_metrics); and the real-text
evaluation with every pass from the embeddings and resumed at each subset's first ablated layer.

    .venv/bin/python bench/bench_perturbation.py [--device cpu] [--repeats 7] [--checkpoint DIR] [--controls 30] [--plan_only]
"""

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gelutrace.evaluate import ablation as pt  # noqa: E402
from gelutrace.evaluate import metrics
from gelutrace.files.formats import read_prompts  # noqa: E402
from gelutrace.model import hooks
from gelutrace.model.generation import encode_prompts, plan_batches  # noqa: E402
from gelutrace.model.loading import load_model  # noqa: E402

T1 = ROOT / "parcellation_datasets" / "test_1.csv"
HELDOUT = ROOT / "parcellation_datasets" / "heldout_tinybard.csv"
EVAL_TEXT = ROOT / "parcellation_datasets" / "heldout_eval_tinybard.txt"
DEMO_RUNS = [ROOT / "parcellation_datasets" / d for d in ("test_1_tinybard", "heldout_corpus_tinybard_tinybard")]


def build_checkpoint(out: Path) -> Path:
    """GPT2Config() defaults (GPT-2 small: 12 layers, 768 wide, vocab 50257), random weights, plus a tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    shipped = ROOT / "models" / "tinybard"
    if (shipped / "tokenizer.json").is_file():  # 4096 ids, all valid in a 50257-entry vocabulary
        tok = AutoTokenizer.from_pretrained(str(shipped))
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_tokenizer
        tok = make_tokenizer(out)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_cpu(fn):
    """(wall seconds, CPU seconds of this process): CPU time is less disturbed by other work on the machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def hook_cost(model, abl, batches, sync, n: int = 5000, repeats: int = 5):
    """
    Seconds one hooked GELU call costs more than an unhooked one (hook dispatch + the edit), on a
    decode-step-shaped input (best of interleaved repeats), and how many hooked calls one generation of the
    workload makes: a direct estimate of the hook overhead that machine load hardly disturbs.
    """
    device = next(model.parameters()).device
    gelu = model.gelus()[next(iter(abl.layers))]
    x = torch.randn(max(len(b.row_prompt) for b in batches), 1, model.config.d_mlp, device=device)

    def loop():
        for _ in range(n):
            gelu(x)
        sync()

    plain, hooked = [], []
    for _ in range(repeats):
        plain.append(timed(loop))
        with abl:
            hooked.append(timed(loop))
    calls = len(abl.layers) * sum(b.new_tokens for b in batches)  # prefill + one call per further token
    return max(min(hooked) - min(plain), 0.0) / n, calls


def controls_cost(lm, prompts, subsets: list[np.ndarray], n_controls: int, batch_size: int, seed: int = 1337):
    """
    Seconds to measure n_controls layer-matched random controls of each subset along the baseline's greedy
    continuations (the baseline generated first, not timed), with --batch_size packing several ablations into
    one pass and with one ablation per pass (batch size = the rows of one chunk); the number of controls.
    """
    model, cfg = lm.model, lm.model.config
    prompt_ids = encode_prompts(lm.tokenizer, prompts, cfg.block_size)
    batches = plan_batches(prompts, prompt_ids, True, batch_size, cfg.block_size)
    rows = metrics.plan_rows(batches, prompts)
    base = metrics.generate_rows(model, batches, rows, prompt_ids, 0.0, 1, seed)
    conditions = [pt.Condition(pt.random_control(ids, cfg.n_layer, cfg.d_mlp, seed, j), generate=False)
                  for ids in subsets for j in range(n_controls)]
    chunk_rows = max(len(c) for c in metrics.metric_chunks(rows, prompt_ids, cfg.vocab_size, batch_size))
    out = []
    for bs in (batch_size, chunk_rows):
        out.append(timed(lambda: pt.teacher_forced(model, rows, prompt_ids, base, conditions, None, bs)))
    return out[0], out[1], len(conditions), int(rows.length.sum())


def text_cost(lm, n_conditions: int, eval_tokens: int, context: int, batch_size: int, seed: int = 0):
    """Seconds per condition per 1,000 scored tokens of the demo's evaluation text: n_conditions random 1 %
    subsets measured together (the unablated pass included), and the tokens scored."""
    from gelutrace.evaluate import realtext as rt

    cfg = lm.model.config
    text = rt.read_eval_text([str(EVAL_TEXT)], lm.tokenizer, context, cfg.vocab_size, eval_tokens)
    rng = np.random.default_rng(seed)
    n = cfg.n_layer * cfg.d_mlp
    groups = [np.sort(rng.choice(n, size=n // 100, replace=False)) for _ in range(n_conditions)]
    t = timed(lambda: rt.evaluate(lm.model, text, groups, None, batch_size))
    return t / n_conditions / text.scored * 1000, text.scored


# the demo's stage e in prompt mode (run_pipeline.sh's defaults): the subsets scored on every unit; those ranked
# without layer 0, every control (30 for each k's winner, 20 + 20 per module) and the mean-ablation check (2 methods
# + 30 controls per k) on the test part only. Before, every condition on every unit and along the prompts' own
# continuations, and no mean-ablation check
DEMO_PLAN = {"subsets": 91, "subsets without layer 0": 32, "module controls": 80, "method controls": 240,
             "mean-ablation check subsets": 16, "mean-ablation controls": 240}
CONTROLS = ("module controls", "method controls", "mean-ablation controls")  # scored on the control part


def plan_cost(lm, n_conditions: int, eval_tokens: int, batch_size: int, seed: int = 0) -> dict:
    """Seconds per condition of the demo's real-text evaluation scored on every unit, on the test part only and on
    the control part (n_conditions random 1 % subsets together, the unablated pass included), and of the own-continuation
    metric on the held-out prompts (teacher-forced along the baseline's greedy continuations); the tokens each
    scores."""
    from gelutrace.evaluate import realtext as rt
    from gelutrace.evaluate import statistics as stats

    cfg = lm.model.config
    text = rt.read_eval_text([str(EVAL_TEXT)], lm.tokenizer, cfg.block_size, cfg.vocab_size, eval_tokens)
    rng = np.random.default_rng(seed)
    n = cfg.n_layer * cfg.d_mlp
    groups = [np.sort(rng.choice(n, size=n // 100, replace=False)) for _ in range(n_conditions)]
    split = stats.split_prompts(text.n_units, 1337, 0.5, 0.5)  # the demo's: stage e's defaults
    test, control = split.test, split.control_units
    every = timed(lambda: rt.evaluate(lm.model, text, groups, None, batch_size))
    part = timed(lambda: rt.evaluate(lm.model, text, groups, None, batch_size, units=[test] * len(groups)))
    controls = timed(lambda: rt.evaluate(lm.model, text, groups, None, batch_size, units=[control] * len(groups)))
    prompts = read_prompts(HELDOUT)
    prompt_ids = encode_prompts(lm.tokenizer, prompts, cfg.block_size)
    batches = plan_batches(prompts, prompt_ids, True, batch_size, cfg.block_size)
    rows = metrics.plan_rows(batches, prompts)
    base = metrics.generate_rows(lm.model, batches, rows, prompt_ids, 0.0, 1, seed)
    conditions = [pt.Condition(g, generate=False) for g in groups]
    forced = timed(lambda: pt.teacher_forced(lm.model, rows, prompt_ids, base, conditions, None, batch_size))
    forced_tokens = int(sum(len(prompt_ids[p]) + len(b) for p, b in zip(rows.prompt, base) if len(b)))
    return {"every": every / n_conditions, "test": part / n_conditions, "control": controls / n_conditions,
            "forced": forced / n_conditions, "tokens": text.scored, "test_tokens": int(np.isin(text.unit, test).sum()),
            "control_tokens": int(np.isin(text.unit, control).sum()), "forced_tokens": forced_tokens}


def metric_cost(lm, groups: int = 8, repeats: int = 3) -> dict:
    """The logits and metrics of `groups` ablations of one batch of windows of the demo's evaluation text, formed
    whole (all of them at once, as stage e did before) and a block of positions at a time
    (metrics.blocked_shift_metrics), on the same final-norm outputs: seconds (best of `repeats`) and positions."""
    from gelutrace.evaluate import realtext as rt
    from gelutrace.model.sites import split_head

    cfg = lm.model.config
    text = rt.read_eval_text([str(EVAL_TEXT)], lm.tokenizer, cfg.block_size, cfg.vocab_size, 8000)
    w = text.batches[0]
    x = torch.from_numpy(text.ids[(w[:, None] * text.context + np.arange(text.context)).reshape(-1)]).view(len(w), -1)
    inp, tgt = x[:, :-1], x[:, 1:].reshape(-1)
    body, head = split_head(lm.model)
    rng = np.random.default_rng(0)
    n = cfg.n_layer * cfg.d_mlp
    ablated = [np.sort(rng.choice(n, size=n // 100, replace=False)) for _ in range(groups)]
    h = body(inp).reshape(-1, cfg.n_embd)
    with hooks.RowAblation(lm.model, ablated, len(w)):
        h_g = body(inp.repeat(groups, 1)).view(groups, -1, cfg.n_embd)

    def whole():
        base = head(h).float()
        metrics.shift_metrics(metrics.base_probabilities(base, base.dtype)[None], head(h_g).float().sub_(base)[:, None],
                              tgt[None])

    def blocked():
        def logits(sl):
            base = head(h[sl]).float()
            return metrics.base_probabilities(base, base.dtype), head(h_g[:, sl]).float().sub_(base)
        metrics.blocked_shift_metrics(len(tgt), logits, tgt, metrics.metric_block("cpu", groups, cfg.vocab_size))

    times = {"whole": [], "blocked": []}
    for _ in range(repeats):  # interleaved
        times["whole"].append(timed(whole))
        times["blocked"].append(timed(blocked))
    return {k: min(v) for k, v in times.items()} | {"positions": len(tgt), "groups": groups}


def resume_cost(lm, n_groups: int = 16, repeats: int = 2) -> dict:
    """Seconds (best of `repeats`, interleaved) of realtext.evaluate on the demo's evaluation text for n_groups random
    1 % subsets, each pass resumed at the group's first ablated layer and each run from the embeddings."""
    from gelutrace.evaluate import realtext as rt

    cfg = lm.model.config
    text = rt.read_eval_text([str(EVAL_TEXT)], lm.tokenizer, cfg.block_size, cfg.vocab_size, 8000)
    rng = np.random.default_rng(2)
    n = cfg.n_layer * cfg.d_mlp
    groups = [np.sort(rng.choice(n, size=n // 100, replace=False)) for _ in range(n_groups)]
    times = {True: [], False: []}
    for _ in range(repeats):
        for resume in (False, True):
            times[resume].append(timed(lambda: rt.evaluate(lm.model, text, groups, None, 64, resume=resume)))
    return {"whole": min(times[False]), "resumed": min(times[True]), "tokens": text.scored * n_groups}


def print_resume_cost(cost: dict):
    print(f"real text, 16 random 1 % subsets x 8,000 tokens, shipped model: passes from the embeddings "
          f"{cost['whole']:.2f} s ({cost['tokens'] / cost['whole']:,.0f} token-forwards/s), resumed at each subset's "
          f"first ablated layer {cost['resumed']:.2f} s ({cost['tokens'] / cost['resumed']:,.0f} token-forwards/s, "
          f"{cost['whole'] / cost['resumed']:.2f}x)")


def print_metric_cost(cost: dict):
    per = {k: cost["groups"] * cost["positions"] / cost[k] for k in ("whole", "blocked")}
    print(f"logits and metrics of {cost['groups']} ablations x {cost['positions']:,} positions of the evaluation text, "
          f"shipped model: formed whole {cost['whole']:.3f} s ({per['whole']:,.0f} token-forwards/s), a block of "
          f"positions at a time {cost['blocked']:.3f} s ({per['blocked']:,.0f} token-forwards/s, "
          f"{cost['whole'] / cost['blocked']:.2f}x)")


def print_plan(plan: dict):
    """The demo's stage e plan (DEMO_PLAN) three ways, from the per-condition costs of plan_cost."""
    print(f"the demo's stage e plan, shipped model (prompt mode: {', '.join(f'{n} {k}' for k, n in DEMO_PLAN.items())}), "
          f"per condition: real text on every unit {plan['every']:.3f} s ({plan['tokens']:,} tokens, "
          f"{plan['tokens'] / plan['every']:,.0f} token-forwards/s), on the test part {plan['test']:.3f} s "
          f"({plan['test_tokens']:,} tokens, {plan['test_tokens'] / plan['test']:,.0f} token-forwards/s), on the "
          f"control part {plan['control']:.3f} s ({plan['control_tokens']:,} tokens, "
          f"{plan['control_tokens'] / plan['control']:,.0f} token-forwards/s), own continuations {plan['forced']:.3f} s "
          f"({plan['forced_tokens']:,} tokens, {plan['forced_tokens'] / plan['forced']:,.0f} token-forwards/s)")
    n = sum(DEMO_PLAN.values())
    everything = n * (plan["every"] + plan["forced"])
    controls = sum(DEMO_PLAN[k] for k in CONTROLS)
    on_test = DEMO_PLAN["subsets"] * plan["every"] + (n - DEMO_PLAN["subsets"]) * plan["test"]
    now = (DEMO_PLAN["subsets"] * plan["every"] + (n - DEMO_PLAN["subsets"] - controls) * plan["test"]
           + controls * plan["control"])
    print(f"  every condition on every unit and on the own continuations: {everything:.0f} s; controls and the check "
          f"on the test part, no own continuations: {on_test:.0f} s; the {controls} controls on the control part "
          f"(--control_share 0.5), as now: {now:.0f} s ({on_test / now:.2f}x less than on the test part, "
          f"{everything / now:.2f}x less than everything everywhere)")



def demo_stage_e(dataset: Path) -> float | None:
    """Seconds of the demo run's stage e (its recorded command) rerun on a copy of its dataset; None without one."""
    import shlex
    import shutil
    import subprocess

    stamp = dataset / ".pipeline" / "e.cmd"
    if not stamp.is_file():
        return None
    cmd = shlex.split(stamp.read_text().split("# csv ")[0])
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / dataset.name
        shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("perturbation_results", "neuron_cards"))
        cmd[cmd.index("--dataset_path") + 1] = str(copy)
        cmd[0] = sys.executable
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats (default: %(default)s)")
    ap.add_argument("--batch_size", type=int, default=64, help="generation batch size (default: %(default)s)")
    ap.add_argument("--controls", type=int, default=30, help="random controls per subset (default: %(default)s)")
    ap.add_argument("--checkpoint", help="checkpoint directory to use, built there first if it has no config.json "
                                         "(default: built in a temporary directory)")
    ap.add_argument("--plan_only", action="store_true",
                    help="only the demo's stage e plan, before and after, on the shipped model (about a minute)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.plan_only:
        shipped = load_model("tinybard", args.device)
        print_metric_cost(metric_cost(shipped))
        print_resume_cost(resume_cost(shipped))
        print_plan(plan_cost(shipped, 16, 8000, args.batch_size))
        return

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "gpt2small-random"
        if not (ckpt / "config.json").is_file():
            build_checkpoint(ckpt)
        lm = load_model(str(ckpt), args.device)
        model, cfg = lm.model, lm.model.config
        prompts = read_prompts(T1)
        prompt_ids = encode_prompts(lm.tokenizer, prompts, cfg.block_size)
        batches = plan_batches(prompts, prompt_ids, True, args.batch_size, cfg.block_size)
        rows = metrics.plan_rows(batches, prompts)
        n = cfg.n_layer * cfg.d_mlp
        ids = np.sort(np.random.default_rng(0).choice(n, size=n // 100, replace=False))
        computed = int(rows.length.sum())
        delivered = sum(p.new_tokens * p.num_samples for p in prompts)
        sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

        def gen(ablation):
            metrics.generate_rows(model, batches, rows, prompt_ids, 0.0, 1, 1337, ablation)
            sync()

        abl = hooks.Ablation(model, ids)
        gen(None)  # warm-up
        gen(abl)
        base_t, abl_t = [], []
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
            base_t.append(timed_cpu(lambda: gen(None)))
            abl_t.append(timed_cpu(lambda: gen(abl)))
        b, a = min(t for t, _ in base_t), min(t for t, _ in abl_t)
        bc, ac = min(c for _, c in base_t), min(c for _, c in abl_t)
        pair = float(np.median([ta / tb for (tb, _), (ta, _) in zip(base_t, abl_t)]))
        per_call, calls = hook_cost(model, abl, batches, sync)

        subsets = [pt.Subset("random_1pct.npy", ids), pt.Subset("none", np.zeros(0, np.int64))]
        settings = pt.EvalSettings(batch_size=args.batch_size)
        full = timed(lambda: pt.measure_subsets(model, lm.tokenizer, prompts, prompt_ids, batches, subsets, None, settings))
        gpt2_null = controls_cost(lm, prompts, [ids], args.controls, args.batch_size)
        gpt2_text = text_cost(lm, 4, 2048, cfg.block_size, args.batch_size)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shipped = load_model("tinybard", args.device)
    n_s = shipped.model.config.n_layer * shipped.model.config.d_mlp
    rng = np.random.default_rng(1)
    demo = [np.sort(rng.choice(n_s, size=k, replace=False)) for k in (int(0.01 * n_s), int(0.05 * n_s)) for _ in range(6)]
    demo_null = controls_cost(shipped, read_prompts(HELDOUT), demo, args.controls, args.batch_size)
    demo_text = text_cost(shipped, 16, 8000, shipped.model.config.block_size, args.batch_size)
    plan = plan_cost(shipped, 16, 8000, args.batch_size)
    metric = metric_cost(shipped)
    resumed = resume_cost(shipped)
    demo_e = [(d.name, demo_stage_e(d)) for d in DEMO_RUNS]

    print(f"device {lm.device}, torch threads {torch.get_num_threads()}, model {cfg.n_layer} layers x {cfg.d_mlp} "
          f"neurons (d_model {cfg.n_embd}, vocab {cfg.vocab_size}), subset {len(ids)} neurons (1 %)")
    print(f"T1 greedy: {computed} tokens computed per condition ({delivered} delivered, 5 samples per prompt)")
    print(f"unperturbed generation: {b:.2f} s = {computed / b:.1f} tokens/s computed, {delivered / b:.1f} delivered")
    print(f"ablated generation:     {a:.2f} s = {computed / a:.1f} tokens/s computed, {delivered / a:.1f} delivered")
    print(f"hook overhead: {100 * (a / b - 1):+.1f} % wall, {100 * (ac / bc - 1):+.1f} % CPU time (best of "
          f"{args.repeats}; wall s: base {', '.join(f'{t:.2f}' for t, _ in base_t)}, ablated "
          f"{', '.join(f'{t:.2f}' for t, _ in abl_t)}; CPU s: base {', '.join(f'{c:.2f}' for _, c in base_t)}, "
          f"ablated {', '.join(f'{c:.2f}' for _, c in abl_t)}); median of paired ratios {100 * (pair - 1):+.1f} %")
    print(f"hook cost measured directly: {1e6 * per_call:.2f} us per hooked GELU call x {calls} calls per "
          f"generation = {calls * per_call:.3f} s = {100 * calls * per_call / b:.1f} % of the unperturbed generation")
    print(f"whole stage e (none + subset: 2 generations + teacher-forced metrics): {full:.2f} s = "
          f"{2 * delivered / full:.1f} delivered tokens/s")
    for what, (batched, single, n_ctl, tokens) in (
            (f"GPT-2-small shape, T1, {args.controls} controls of one 1 % subset (target <= 300 s)", gpt2_null),
            (f"shipped model, {HELDOUT.name}, {args.controls} controls x 12 subsets of the demo's k (target <= 60 s)",
             demo_null)):
        print(f"null: {what}: {batched:.1f} s batched = {batched / n_ctl:.3f} s per control "
              f"over {tokens} scored tokens ({1e6 * batched / n_ctl / tokens:.0f} us per control per token); "
              f"one ablation per pass {single:.1f} s "
              f"({single / batched:.2f}x the batched time)")
    print(f"real text, shipped model: {demo_text[0]:.3f} s per subset or control per 1,000 scored tokens "
          f"(16 together over {demo_text[1]} tokens of {EVAL_TEXT.name}, the unablated pass included)")
    print_metric_cost(metric)
    print_resume_cost(resumed)
    print_plan(plan)
    per_token = gpt2_text[0] / 1000
    d, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    flops = 2 * (12 * L * d * d + d * V) + 2 * L * T * d  # per token: weights, unembedding, attention (mean)
    total = 2020 * 1e5
    print(f"real text, GPT-2-small shape: {gpt2_text[0]:.2f} s per subset or control per 1,000 tokens "
          f"(4 together over {gpt2_text[1]} tokens, windows of {T}) = {flops * 1e-9 / per_token:.0f} GFLOP/s; "
          f"100 controls x 20 subsets (2,020 evaluations) on 10^5 tokens: {total * per_token / 3600:.0f} h here; "
          f"{flops / 1e9:.2f} GFLOP per token, so {total * flops / 100e12 / 60:.0f} min on a GPU sustaining "
          f"100 TFLOP/s (an assumption, not measured here)")
    neurons = L * cfg.d_mlp
    print(f"single-neuron effects on real text, GPT-2-small shape, every one of its {neurons:,} neurons on 10^4 "
          f"tokens (d_calculate_neuron_effects.py --input_text, one evaluation per neuron): "
          f"{neurons * 1e4 * per_token / 3600:.0f} h here; {neurons * 1e4 * flops / 100e12 / 60:.0f} min at 100 TFLOP/s")
    for name, t in demo_e:
        print(f"demo stage e, {name}: " + (f"{t:.1f} s (target <= 150 s)" if t is not None
                                           else "skipped (run `make demo` first)"))
    print(f"peak RSS: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
