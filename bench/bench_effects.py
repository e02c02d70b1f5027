"""
d_calculate_neuron_effects.py: the full run on the shipped model and an estimate for GPT-2 small on a GPU.

1. tinybard (6 layers x 512 = 3,072 neurons) on T1 (parcellation_datasets/test_1.csv: 10 prompts x 50 greedy
   tokens x 5 samples, so 10 distinct sequences): stage b makes the dataset, then every neuron is measured;
   the script runs as a subprocess, and its wall time, CPU time and peak RSS are printed.
2. GPT-2 small's shape (model.py's GPTConfig() defaults: 12 layers x 3,072 neurons, 768 wide, vocabulary
   50,257), random weights, 10 sequences of T1's shape (prompts of 5-24 tokens + 50 continuation tokens):
   a chunk of --gpt2_neurons neurons is timed on the CPU at the first and the last layer, the floating-point
   operations of the whole run are counted, and the time of the whole run is extrapolated, on this CPU and
   on a GPU at --gpu_tflops sustained float32 throughput.

    python bench/bench_effects.py [--gpu_tflops 25] [--gpt2_neurons 8] [--skip_full]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gelutrace.evaluate import effects as ef  # noqa: E402
from gelutrace.evaluate import metrics
from model import GPT, GPTConfig  # noqa: E402

T1 = ROOT / "parcellation_datasets" / "test_1.csv"
T1_PROMPT_TOKENS = [24, 9, 7, 13, 5, 11, 9, 8, 14, 11]  # T1's prompts in tinybard's tokens
NEW = 50

# run a command, then print the wall time, CPU time and peak RSS (KiB) of it and its children
MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
           "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
           "print('MEASURE', time.perf_counter() - t, u.ru_utime + u.ru_stime, u.ru_maxrss, file=sys.stderr); "
           "sys.exit(r.returncode)")


def measured(args: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS GiB) of a command."""
    r = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr)
    wall, cpu, rss = r.stderr.strip().splitlines()[-1].split()[1:]
    return float(wall), float(cpu), int(rss) / 2**20


def full_run(work: Path):
    py = sys.executable
    subprocess.run([py, str(ROOT / "b_generate_activation_dataset.py"), "--model_type", "tinybard", "--input_csv",
                    str(T1), "--export_dir", str(work), "--no_edge_list", "--no_activation_lists", "--device", "cpu"],
                   check=True, capture_output=True)
    wall, cpu, rss = measured([py, str(ROOT / "d_calculate_neuron_effects.py"), "--dataset_path", str(work),
                               "--input_csv", str(T1), "--model_type", "tinybard", "--device", "cpu"])
    print(f"tinybard x T1, all 3,072 neurons (10 distinct sequences): {wall:.1f} s wall, {cpu:.1f} s CPU, "
          f"peak RSS {rss:.2f} GiB")


def run_flops(cfg: GPTConfig, widths: list[int], n: int) -> tuple[float, float]:
    """Floating-point operations of measuring every neuron once: (blocks after each layer, unembedding)."""
    C, T = cfg.n_embd, max(widths)  # every row is padded to the group's width
    per_block = len(widths) * T * (2 * 12 * C * C + 2 * 2 * T * C)  # projections and MLP, attention
    blocks = cfg.d_mlp * sum(cfg.n_layer - 1 - layer for layer in range(cfg.n_layer)) * per_block
    unembed = cfg.d_mlp * cfg.n_layer * len(widths) * n * 2 * C * cfg.vocab_size
    return blocks, unembed


def chunk_flops(cfg: GPTConfig, layer: int, k: int, widths: list[int], n: int) -> float:
    C, T = cfg.n_embd, max(widths)
    blocks = (cfg.n_layer - 1 - layer) * k * len(widths) * T * (2 * 12 * C * C + 2 * 2 * T * C)
    return blocks + k * len(widths) * n * 2 * C * cfg.vocab_size


def gpt2_estimate(gpu_tflops: float, batch_size: int, max_values: int, neurons: int):
    torch.manual_seed(0)
    cfg = GPTConfig()
    model = GPT(cfg).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, t).tolist() for t in T1_PROMPT_TOKENS]
    conts = [rng.integers(0, cfg.vocab_size, NEW) for _ in prompts]
    widths = [len(p) + NEW - 1 for p in prompts]
    k = min(neurons, max(1, min(batch_size // len(prompts), max_values // (len(prompts) * max(widths) * cfg.d_mlp))))
    print(f"GPT-2 small shape ({cfg.n_layer} x {cfg.d_mlp} neurons, d_model {cfg.n_embd}, vocabulary "
          f"{cfg.vocab_size}), 10 sequences of T1's shape, chunks of {k} neurons (--batch_size {batch_size}, "
          f"--max_values {max_values}), CPU, {torch.get_num_threads()} threads:")
    rates = []
    for layer in (0, cfg.n_layer - 1):
        dims = np.arange(k)
        ef.group_effects(model, layer, dims[:1], prompts, conts, batch_size, max_values)  # warm-up
        t0 = time.perf_counter()
        ef.group_effects(model, layer, dims, prompts, conts, batch_size, max_values)
        dt = time.perf_counter() - t0
        flops = chunk_flops(cfg, layer, k, widths, NEW)
        rates.append(flops / dt)
        print(f"  layer {layer}: {dt:.2f} s for {k} neurons, {flops / 1e12:.3f} TFLOP -> "
              f"{flops / dt / 1e9:.0f} GFLOP/s")
    blocks, unembed = run_flops(cfg, widths, NEW)
    total = blocks + unembed
    cpu_rate = float(np.mean(rates))
    print(f"  whole run ({cfg.n_layer * cfg.d_mlp:,} neurons): {total / 1e15:.2f} PFLOP ({blocks / 1e15:.2f} in the "
          f"blocks after each layer, {unembed / 1e15:.2f} in the unembedding) -> {total / cpu_rate / 3600:.1f} h "
          f"on this CPU at {cpu_rate / 1e9:.0f} GFLOP/s")
    logits_bytes = cfg.n_layer * cfg.d_mlp * len(prompts) * NEW * cfg.vocab_size * 4
    memory_s = 6 * logits_bytes / 2.0e12
    print(f"  on a GPU at {gpu_tflops:.0f} TFLOP/s sustained float32 (an H100 SXM peaks at 67 without TF32): "
          f"{total / (gpu_tflops * 1e12):.0f} s of arithmetic + about {memory_s:.0f} s for ~6 passes over "
          f"{logits_bytes / 1e12:.1f} TB of logit changes at 2 TB/s = about "
          f"{(total / (gpu_tflops * 1e12) + memory_s) / 60:.1f} min")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu_tflops", type=float, default=25.0,
                    help="sustained float32 TFLOP/s assumed for the GPU estimate (default: %(default)s)")
    ap.add_argument("--batch_size", type=int, default=512, help="as the script's --batch_size (default: %(default)s)")
    ap.add_argument("--max_values", type=int, default=metrics.LOGIT_BUDGET,
                    help="as the script's --max_values (default: %(default)s)")
    ap.add_argument("--gpt2_neurons", type=int, default=8,
                    help="neurons in the timed GPT-2-shaped chunk (at most --batch_size / 10) (default: %(default)s)")
    ap.add_argument("--skip_full", action="store_true", help="only the GPT-2 estimate")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}")
    if not args.skip_full:
        with tempfile.TemporaryDirectory(prefix="bench_effects.") as tmp:
            full_run(Path(tmp))
    gpt2_estimate(args.gpu_tflops, args.batch_size, args.max_values, args.gpt2_neurons)


if __name__ == "__main__":
    main()
