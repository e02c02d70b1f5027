"""
What stage b's top-example tracking (--top_examples 10) costs, at GPT-2-small shape with no download (a random
GPT-2, transformers' GPT2Config() defaults, 12 x 3072 neurons, with the shipped model's tokenizer) and on the
shipped model, on workload T1 (parcellation_datasets/test_1.csv, 2,500 generated tokens).

For greedy decoding and temperature 0.8, the recording of every batch (generation with the hooks) is timed
with --top_examples 0 and 10, alternated over --repeats rounds (the fastest of each), plus the merge of the
batches' top-ks and the writing of {m}_neuron_top_examples.csv: the overhead is their sum over the recording
without it.

    python bench/bench_top_examples.py [--repeats 3] [--device cpu]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench_activations import T1, make_gpt2_small  # noqa: E402
from gelutrace.cards import merge_top  # noqa: E402
from gelutrace.generation import encode_prompts, plan_batches  # noqa: E402
from gelutrace.loading import load_model  # noqa: E402
from gelutrace.recording import concat_samples, record_batch, top_examples_table  # noqa: E402
from gelutrace.stagefiles import read_prompts, write_csv  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model_type: str, device: str, temperature: float, repeats: int, work: Path):
    lm = load_model(model_type, device)
    prompts = read_prompts(T1)
    ids = encode_prompts(lm.tokenizer, prompts, lm.model.config.block_size)
    batches = plan_batches(prompts, ids, temperature == 0, 64, lm.model.config.block_size)
    times = {0: [], 10: []}
    finish = []
    with torch.no_grad():
        for _ in range(repeats):
            for k in (0, 10):
                sync(lm.device)
                t0 = time.perf_counter()
                chunks, first = [], 0
                for b in batches:
                    chunks.append(record_batch(lm.model, b, prompts, ids, temperature, None, 42, k, first))
                    first += len(chunks[-1].position)
                sync(lm.device)
                times[k].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            top = merge_top([(c.top_values, c.top_ids) for c in chunks], 10)
            write_csv(top_examples_table(*top, concat_samples(chunks), lm.tokenizer, ids), work / "top.csv")
            finish.append(time.perf_counter() - t0)
    return min(times[0]), min(times[10]), min(finish), first


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_top_examples."))
    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}")
    for name, model_type in (("GPT-2-small shape", str(make_gpt2_small(work))), ("tinybard", "tinybard")):
        for temperature in (0.0, 0.8):
            plain, tracked, finish, samples = measure(model_type, args.device, temperature, args.repeats, work)
            print(f"{name}, T1, {'greedy' if temperature == 0 else 'temperature 0.8'} ({samples} samples): recording "
                  f"{plain:.2f} s, with top-10 tracking {tracked:.2f} s, merge + CSV {finish:.2f} s -> overhead "
                  f"{100 * ((tracked + finish) / plain - 1):+.1f} %")
    import shutil
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
