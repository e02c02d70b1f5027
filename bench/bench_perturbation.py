"""
Stage e speed on the T1 workload (parcellation_datasets/test_1.csv: 10 prompts x 50 tokens x 5 samples),
greedy, on a GPT-2-small-shaped random model (transformers' GPT2Config() defaults, saved locally), with one
random subset of 1 % of the neurons plus `none`.

Prints: generated tokens/s of the unperturbed and the ablated generation (tokens computed: greedy computes
each prompt once; tokens delivered: all 5 samples of each prompt), the hook overhead (ablated vs unperturbed,
interleaved repeats in the same process, best of --repeats), the whole stage-e computation (generation of
both plus the teacher-forced metric passes) and the peak RSS.

    .venv/bin/python bench/bench_perturbation.py [--device cpu] [--repeats 7] [--checkpoint DIR]
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

from gelutrace import perturbation as pt  # noqa: E402
from gelutrace.generation import encode_prompts, plan_batches  # noqa: E402
from gelutrace.loading import load_model  # noqa: E402
from gelutrace.stagefiles import read_prompts  # noqa: E402

T1 = ROOT / "parcellation_datasets" / "test_1.csv"


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats (default: %(default)s)")
    ap.add_argument("--batch_size", type=int, default=64, help="generation batch size (default: %(default)s)")
    ap.add_argument("--checkpoint", help="checkpoint directory to use, built there first if it has no config.json "
                                         "(default: built in a temporary directory)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "gpt2small-random"
        if not (ckpt / "config.json").is_file():
            build_checkpoint(ckpt)
        lm = load_model(str(ckpt), args.device)
        model, cfg = lm.model, lm.model.config
        prompts = read_prompts(T1)
        prompt_ids = encode_prompts(lm.tokenizer, prompts, cfg.block_size)
        batches = plan_batches(prompts, prompt_ids, True, args.batch_size, cfg.block_size)
        rows = pt.plan_rows(batches, prompts)
        n = cfg.n_layer * cfg.d_mlp
        ids = np.sort(np.random.default_rng(0).choice(n, size=n // 100, replace=False))
        computed = int(rows.length.sum())
        delivered = sum(p.new_tokens * p.num_samples for p in prompts)
        sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

        def gen(ablation):
            pt.generate_rows(model, batches, rows, prompt_ids, 0.0, 1, 1337, ablation)
            sync()

        abl = pt.Ablation(model, ids)
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
        full = timed(lambda: pt.run(model, lm.tokenizer, prompts, prompt_ids, batches, subsets, None, 0.0, 1,
                                    1337, args.batch_size, 0, "zero"))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

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
    print(f"peak RSS: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
