"""
Stage a and b figures at GPT-2-small shape, with no download: a randomly initialised GPT-2 (transformers'
GPT2Config() defaults, 12 x 3072 GELU neurons) is saved to a temporary directory with the shipped model's
tokenizer (its ids are valid in GPT-2's vocabulary of 50257).

Workload T1: parcellation_datasets/test_1.csv, 10 prompts x 50 tokens x 5 samples = 2,500 generated tokens.
Prints, for greedy decoding and for temperature 0.8:
- the full stage-b run (a subprocess): wall time, generated tokens/s, peak RSS;
- plain cached generation of the same batches without recording, and the same with recording, in this
  process, alternated over --repeats rounds: the recording overhead;
for temperature 0.8, the cost of each default (attribution, top examples, activation lists): the same run with
that one turned off, and with all three off; and stage a for gpt2 (a subprocess): wall time and peak RSS. The original pipeline, on this 2-core machine,
took 217 s and 10.8 GiB for stage b on T1 and 29 s and 10.3 GiB for stage a.

    python bench/bench_activations.py [--repeats 3] [--keep DIR]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gelutrace.files.formats import read_prompts  # noqa: E402
from gelutrace.model.generation import encode_prompts, generate_batch, plan_batches  # noqa: E402
from gelutrace.model.loading import load_model  # noqa: E402
from gelutrace.record.prompts import record_batch  # noqa: E402

T1 = ROOT / "parcellation_datasets" / "test_1.csv"


def make_gpt2_small(directory: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = directory / "gpt2-random"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(ROOT / "models" / "tinybard")).save_pretrained(str(out))
    return out


def timed_subprocess(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a command, measured by GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tf.name, *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        return wall, int(tf.read().split()[-1]) / 2**20


def generation_overhead(ckpt: Path, temperature: float, repeats: int):
    lm = load_model(str(ckpt), "cpu")
    prompts = read_prompts(T1)
    ids = encode_prompts(lm.tokenizer, prompts, lm.model.config.block_size)
    batches = plan_batches(prompts, ids, temperature == 0, 64, lm.model.config.block_size)
    plain, recorded = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches:
                generate_batch(lm.model, b, ids, temperature, None, 42)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for b in batches:
                record_batch(lm.model, b, prompts, ids, temperature, None, 42)
            recorded.append(time.perf_counter() - t0)
    computed = sum(len(b.row_prompt) * b.new_tokens for b in batches)
    return min(plain), min(recorded), computed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the in-process overhead measurement")
    ap.add_argument("--keep", help="write the model and datasets here instead of a temporary directory")
    args = ap.parse_args()
    if not T1.is_file():
        sys.exit(f"{T1} is missing")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_activations."))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_gpt2_small(work)
    py = sys.executable
    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}")

    wall, rss = timed_subprocess([py, str(ROOT / "a_generate_gelu_graph.py"), "--model_type", "gpt2",
                                  "--output_dir", str(work / "a")])
    print(f"stage a, gpt2 (103,809,024 edges): {wall:.1f} s, peak RSS {rss:.2f} GiB  (original: 29 s, 10.3 GiB)")

    def stage_b(temperature: float, *flags: str) -> tuple[float, float]:
        out = work / f"b_{temperature}_{'_'.join(f.strip('-') for f in flags)}"
        return timed_subprocess([py, str(ROOT / "b_generate_activation_dataset.py"), "--input_csv", str(T1),
                                 "--export_dir", str(out), "--model_type", str(ckpt), "--device", "cpu",
                                 "--temperature", str(temperature), *flags])

    for temperature in (0.0, 0.8):
        label = "greedy" if temperature == 0 else f"temperature {temperature}"
        wall, rss = stage_b(temperature)
        plain, recorded, computed = generation_overhead(ckpt, temperature, args.repeats)
        print(f"stage b, T1, {label}, every default: {wall:.1f} s wall, {2500 / wall:.1f} generated tokens/s, peak RSS "
              f"{rss:.2f} GiB (original: 217 s, 10.8 GiB)")
        print(f"  generation of the {computed} distinct tokens: plain {plain:.2f} s, with recording {recorded:.2f} s "
              f"-> recording overhead {100 * (recorded / plain - 1):+.1f} %")
        if temperature == 0:
            continue
        defaults = {"attribution": ["--no_attribution"], "top examples": ["--top_examples", "0"],
                    "activation lists": ["--no_activation_lists"]}
        for name, flags in defaults.items():
            w, r = stage_b(temperature, *flags)
            print(f"  without {name} ({' '.join(flags)}): {w:.1f} s, {r:.2f} GiB -> {name} costs {wall - w:+.1f} s, "
                  f"{rss - r:+.2f} GiB of peak RSS")
        w, r = stage_b(temperature, *(f for flags in defaults.values() for f in flags))
        print(f"  without all three: {w:.1f} s, {r:.2f} GiB -> the defaults cost {wall - w:+.1f} s, {rss - r:+.2f} GiB")
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
