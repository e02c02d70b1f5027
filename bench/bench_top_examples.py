"""
What stage b's top-example tracking (--top_examples 10) costs, at GPT-2-small shape with no download (a random
GPT-2, transformers' GPT2Config() defaults, 12 x 3072 neurons, with the shipped model's tokenizer) and on the
shipped model, on workload T1 (parcellation_datasets/test_1.csv, 2,500 generated tokens).

For greedy decoding and temperature 0.8:
1. stage b as a user runs it (the script in a child process, every default but --top_examples), with
   --top_examples 0 and 10, alternated over --repeats rounds (the fastest of each): the share of stage b's time
   that tracking and writing the top examples add;
2. the recording of every batch alone (generation with the hooks), timed the same way, plus the merge of the
   batches' top-ks and the writing of {m}_neuron_top_examples.csv: their sum over the recording without them,
   the stricter figure.

    python bench/bench_top_examples.py [--repeats 5] [--device cpu] [--skip_stage_b]
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
from peak import run_measured  # noqa: E402

from gelutrace.files.formats import read_prompts, write_top_examples  # noqa: E402
from gelutrace.graph.counts import merge_top  # noqa: E402
from gelutrace.model.generation import encode_prompts, plan_batches  # noqa: E402
from gelutrace.model.loading import load_model  # noqa: E402
from gelutrace.record.prompts import concat_samples, record_batch, top_examples_text  # noqa: E402


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
            write_top_examples(work / "top.csv", *top, top_examples_text(top[1], concat_samples(chunks), lm.tokenizer, ids))
            finish.append(time.perf_counter() - t0)
    return min(times[0]), min(times[10]), min(finish), first


def stage_b(model_type: str, device: str, temperature: float, repeats: int, work: Path) -> tuple[float, float]:
    """Fastest wall time of the whole stage b with --top_examples 0 and 10, alternated."""
    times = {0: [], 10: []}
    for _ in range(repeats):
        for k in (0, 10):
            times[k].append(run_measured("stage b", [
                "b_generate_activation_dataset.py", "--input_csv", str(T1), "--export_dir", str(work / f"b{k}"),
                "--model_type", model_type, "--device", device, "--temperature", str(temperature),
                "--top_examples", str(k)])[0])
    return min(times[0]), min(times[10])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="alternated rounds; the fastest of each counts (default: %(default)s)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip_stage_b", action="store_true", help="skip measurement 1")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_top_examples."))
    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}")
    for name, model_type in (("GPT-2-small shape", str(make_gpt2_small(work))), ("tinybard", "tinybard")):
        for temperature in (0.0, 0.8):
            mode = "greedy" if temperature == 0 else "temperature 0.8"
            if not args.skip_stage_b:
                off, on = stage_b(model_type, args.device, temperature, args.repeats, work)
                print(f"{name}, T1, {mode}: stage b {off:.2f} s, with --top_examples 10 {on:.2f} s -> "
                      f"{100 * (on / off - 1):+.1f} % of stage b's time", flush=True)
            plain, tracked, finish, samples = measure(model_type, args.device, temperature, args.repeats, work)
            print(f"{name}, T1, {mode} ({samples} samples): recording {plain:.2f} s, with top-10 tracking "
                  f"{tracked:.2f} s, merge + CSV {finish:.2f} s -> {100 * ((tracked + finish) / plain - 1):+.1f} % "
                  f"of the recording", flush=True)
    import shutil
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
