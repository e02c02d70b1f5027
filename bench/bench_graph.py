"""
Wall time and peak RSS of stages c, c_analyze and d on a synthetic activation matrix of GPT-2 shape.

    .venv/bin/python bench/bench_graph.py          # GPT-2 small: 12 layers x 3072, 2,500 samples
    .venv/bin/python bench/bench_graph.py --xl     # gpt2-xl: 48 layers x 6400 (1.93 B edges), 2,500 samples
    .venv/bin/python bench/bench_graph.py --samples 200000 --c_only   # stage c at scale, beside BLAS rates

Each neuron fires in a random 10-50 % of the samples. Every stage runs as its own subprocess (the scripts a
user runs); peak RSS is that subprocess's ru_maxrss. Data goes to bench/out/ (git-ignored) unless --out.
Stage c's rate is given in GFLOPS (2 x samples x d_mlp^2 per layer pair, as a dense product counts them),
beside the rates numpy's float32 GEMM and torch's int8 GEMM reach on the same machine in the same run, on
one layer pair's product of 8,192 samples.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peak import run_measured  # noqa: E402

from gelutrace.files import (
    atomic,
    formats,  # noqa: E402
    layout,
)


def make_dataset(d: Path, m: str, n_layer: int, d_mlp: int, n_samples: int, seed: int):
    rng = np.random.default_rng(seed)
    n = n_layer * d_mlp
    packed = np.zeros((n_samples, (n + 7) // 8), dtype=np.uint8)
    counts = np.zeros(n, dtype=np.int64)
    for i in range(n_layer):  # a layer at a time keeps generation memory small
        p = rng.uniform(0.10, 0.50, size=d_mlp).astype(np.float32)
        a = rng.random((n_samples, d_mlp), dtype=np.float32) < p
        counts[i * d_mlp:(i + 1) * d_mlp] = a.sum(axis=0)
        assert d_mlp % 8 == 0
        packed[:, i * d_mlp // 8:(i + 1) * d_mlp // 8] = np.packbits(a, axis=1)
    atomic.write_npz(layout.path(d, layout.MATRIX, m), matrix=packed, matrix_shape=np.array([n_samples, n]),
                 neuron_ids=np.arange(n, dtype=np.int64), packing=np.array("packbits_axis1"))
    formats.write_graph_files(d, m, n_layer, d_mlp, write_el=False)
    ids = np.arange(n)
    atomic.write_csv(pd.DataFrame({"neuron_id": ids, "activation_count": counts,
                               "activation_frequency": counts / n_samples, "layer": ids // d_mlp,
                               "dimension": ids % d_mlp, "mean_activation": 0.0}), layout.path(d, layout.FREQUENCY, m))


def measure(label: str, args: list[str]) -> dict:
    wall, rss = run_measured(label, args)
    row = {"stage": label, "wall_s": round(wall, 1), "peak_rss_GiB": round(rss, 2)}
    print(f"{label:<28} {row['wall_s']:>8.1f} s  {row['peak_rss_GiB']:>7.2f} GiB", flush=True)
    return row


def blas_rates(d_mlp: int, rows: int = 8192, repeats: int = 3) -> dict:
    """GFLOPS of numpy's sgemm and torch's int8 GEMM on a rows x d_mlp 0/1 pair product, best of `repeats`."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    a, b = (rng.random((rows, d_mlp), dtype=np.float32) < 0.3 for _ in range(2))
    flops = 2 * rows * d_mlp ** 2
    rates = {}
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    ta, tb = torch.from_numpy(a).T.to(torch.int8).contiguous(), torch.from_numpy(b).to(torch.int8)
    for name, f in (("numpy sgemm (float32)", lambda: fa.T @ fb),
                    ("torch int8 GEMM (_int_mm)", lambda: torch._int_mm(ta, tb))):
        f()
        best = min(_timed(f) for _ in range(repeats))
        rates[name] = flops / best / 1e9
    return rates


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xl", action="store_true", help="gpt2-xl shape (48 x 6400) instead of GPT-2 small (12 x 3072)")
    ap.add_argument("--samples", type=int, default=2500, help="samples (generated tokens) (default: %(default)s)")
    ap.add_argument("--out", default=None, help="work directory (default: bench/out/<shape>)")
    ap.add_argument("--methods", default="degree",
                    help="stage d methods to time, space-separated (default: %(default)s)")
    ap.add_argument("--weights", default="count",
                    help="edge weights to time c_analyze and d with, space-separated (default: %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    ap.add_argument("--c_only", action="store_true", help="time stage c alone (skip c_analyze and d)")
    args = ap.parse_args()

    m, n_layer, d_mlp = ("gpt2-xl", 48, 6400) if args.xl else ("gpt2", 12, 3072)
    d = Path(args.out) if args.out else ROOT / "bench" / "out" / m
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t0 = time.time()
    make_dataset(d, m, n_layer, d_mlp, args.samples, seed=0)
    print(f"{m} shape: {n_layer} x {d_mlp} = {n_layer * d_mlp:,} neurons, {(n_layer - 1) * d_mlp ** 2:,} edges, "
          f"{args.samples:,} samples (synthetic, made in {time.time() - t0:.1f} s)")
    store = d / layout.WEIGHTED_GRAPH.format(m=m)
    analyzed = d / layout.ANALYSIS_DIR / (layout.ANALYZED.format(name=store.name) + ".json")
    rows = [measure("c (compact store)", ["c_calculate_weighted_activation_graph.py", "--input_dir", str(d)])]
    flops = 2 * args.samples * d_mlp ** 2 * (n_layer - 1)
    print(f"stage c: {flops / rows[0]['wall_s'] / 1e9:.0f} GFLOPS over its {n_layer - 1} pair products (wall)")
    for name, rate in blas_rates(d_mlp).items():
        print(f"  same machine, same run: {name}: {rate:.0f} GFLOPS")
    if args.c_only:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
        return
    for weight in args.weights.split():
        label = "" if weight == layout.DEFAULT_WEIGHT else f", {weight}"
        rows.append(measure(f"c_analyze (full sweep{label})", ["c_analyze_weighted_activation_graph.py",
                                                               "--input_path", str(store), "--weight", weight]))
        for method in args.methods.split():
            rows.append(measure(f"d ({method}{label}, t=0.5, r=0.01)",
                                ["d_calculate_perturbation_subset.py", "--input_graph_path", str(analyzed),
                                 "--threshold", "0.5", "--ratio", "0.01", "--method", method, "--weight", weight,
                                 "--output_dir", str(d / layout.SUBSETS_DIR)]))
    header = json.loads((store / layout.GRAPH_STORE_HEADER).read_text())
    size = sum(f.stat().st_size for f in store.iterdir())
    print(f"store: {size / 2**30:.2f} GiB on disk, count dtype {header['count_dtype']}, "
          f"max co-activation {header['max_co_activation_count']}")
    print(pd.read_csv(d / layout.ANALYSIS_DIR / layout.THRESHOLD_CSV).to_string(index=False))
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
