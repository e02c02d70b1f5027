"""
Cost of a per-prompt neuron graph (gelutrace.circuit.attribute): wall time, each phase's seconds, peak memory,
and the backward passes' FLOP rate beside this machine's float32 GEMM rate measured in the same run.

- the shipped model (tinybard), a 32-token prompt, the default --max_nodes (5,000);
- with --gpt2: a GPT-2-small-shaped model.py GPT with random weights (12 layers x 3,072 neurons, hidden 768,
  vocabulary 50,257), 32 random tokens, --max_nodes 2,000.

The FLOPs of a backward pass depend on its highest target's layer; torch's FlopCounterMode counts them once per
layer on a separate frozen pass (the matrix products the pass executes, including the query and key parts of a
fused projection that the frozen attention does not need), and the timed run's passes are summed from that
table. The process's CPU time is printed beside the wall time: on a machine shared with other work the wall
time of multithreaded products varies several-fold. The GEMM rate is the best of three torch.mm products of 4,096 x 4,096 float32 matrices. The expected GPU
time assumes the same share of an H100's 67 TFLOP/s float32 (non-tensor-core) peak for the backward passes;
the ranking and assembly are memory-bound and counted at their CPU time, an upper bound.

    python bench/bench_trace.py [--gpt2] [--batch_size 64] [--threads N]
"""

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from gelutrace.circuit import linear  # noqa: E402
from gelutrace.circuit.attribute import attribute  # noqa: E402
from gelutrace.circuit.graph import TraceSettings  # noqa: E402
from gelutrace.model.loading import LoadedModel, load_model  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

GPU_FLOPS = 67e12  # H100 SXM, float32 without tensor cores
PROMPT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
          "arrows of outrageous fortune, or to take arms against a sea of troubles")


def gemm_rate(n: int = 4096) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(3))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flops_per_pass(lm, tokens: torch.Tensor, batch: int) -> list[float]:
    """FLOPs of one backward pass whose highest target is at each layer (the last entry: the logits)."""
    out = []
    with linear.frozen_pass(lm, tokens, batch) as fp:
        n_layers, T, d = fp.shape
        vectors = torch.zeros(1, fp.unembed_input.size(1))
        for top in range(n_layers + 1):
            layers = torch.full((batch,), top)
            with FlopCounterMode(display=False) as counter:
                fp.rows(layers, torch.full((batch,), T - 1), torch.zeros(batch, dtype=torch.long), vectors)
            out.append(counter.get_total_flops())
    return out


def bench(label: str, lm, tokens: list[int], settings: TraceSettings, gemm: float):
    stats = {}
    t, cpu = time.perf_counter(), time.process_time()
    graph = attribute(lm, tokens, settings, progress=False, stats=stats)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    table = flops_per_pass(lm, torch.tensor(tokens), settings.batch_size)
    flops = sum(table[top] for _, top in stats["passes"])
    rate = flops / stats["backward_s"]
    rest = wall - stats["backward_s"]
    gpu = flops / (GPU_FLOPS * rate / gemm)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"\n{label}: {len(tokens)} tokens, {graph.n_kept:,} neurons kept, {graph.n_logits} logits, "
          f"batch {settings.batch_size}")
    print(f"  wall {wall:.1f} s (CPU time {cpu:.1f} s on {torch.get_num_threads()} threads): forward {stats['forward_s']:.1f} s, backward {stats['backward_s']:.1f} s "
          f"({len(stats['passes'])} passes), ranking {stats['influence_s']:.1f} s, assembly "
          f"{stats['assemble_s']:.1f} s; peak RSS so far {peak:.2f} GiB")
    print(f"  backward {flops / 1e12:.2f} TFLOP at {rate / 1e9:.1f} GFLOP/s = {100 * rate / gemm:.0f} % of the "
          f"float32 GEMM rate ({gemm / 1e9:.1f} GFLOP/s)")
    print(f"  expected on a GPU at {GPU_FLOPS / 1e12:.0f} TFLOP/s x {100 * rate / gemm:.0f} %: backward "
          f"{gpu:.2f} s, whole trace under {gpu + rest:.1f} s (the rest at its CPU time)")
    return wall


def gpt2_small() -> LoadedModel:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)).eval()
    shipped = load_model("tinybard", device="cpu")  # its tokenizer decodes the random ids (all below 4,096)
    return LoadedModel(model, shipped.tokenizer, "gpt2-small-random", ROOT, torch.device("cpu"),
                       {"architecture": "gpt2"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt2", action="store_true", help="also the GPT-2-small shape, --max_nodes 2000")
    ap.add_argument("--batch_size", type=int, default=TraceSettings.batch_size)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gemm = gemm_rate()
    print(f"float32 GEMM: {gemm / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")

    lm = load_model("tinybard", device="cpu")
    tokens = lm.tokenizer(PROMPT)["input_ids"][:32]
    bench("tinybard", lm, tokens, TraceSettings(batch_size=args.batch_size), gemm)
    if args.gpt2:
        tokens = torch.randint(0, 4096, (32,), generator=torch.Generator().manual_seed(0)).tolist()
        bench("GPT-2-small shape (random weights)", gpt2_small(), tokens,
              TraceSettings(max_nodes=2000, batch_size=args.batch_size), gemm)


if __name__ == "__main__":
    main()
