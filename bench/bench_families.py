"""
Recording cost on a non-GPT-2 family: a randomly initialised Pythia-160m-shaped GPT-NeoX (12 layers x 3072
MLP neurons, hidden 768, vocabulary 50304) is saved to a temporary directory with the shipped model's
tokenizer (its ids are valid in that vocabulary), and loaded the way every stage loads it.

Workload T1 with sampling (parcellation_datasets/test_1.csv, 10 prompts x 50 tokens x 5 samples, temperature
0.8, batches of up to 64 sequences). Measured in the same process, alternated over --repeats rounds (the best
round of each is reported):
- transformers' own generate() on the same left-padded batches (do_sample, same temperature), no hooks;
- stage b's recording (gelutrace.record.prompts.record_batch: the adapter's cached generation with a hook on every
  layer's neuron site, seeded per-row generators);
and the recording overhead relative to plain transformers, in wall time and in this process's CPU time (the
steadier figure on a machine shared with other work; with --threads 1 it is the work done).

    python bench/bench_families.py [--repeats 3] [--device cpu] [--threads N]
"""

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gelutrace.files.formats import read_prompts  # noqa: E402
from gelutrace.model.generation import encode_prompts, left_pad, plan_batches  # noqa: E402
from gelutrace.model.loading import load_model  # noqa: E402
from gelutrace.record.prompts import record_batch  # noqa: E402

T1 = ROOT / "parcellation_datasets" / "test_1.csv"
TEMPERATURE = 0.8


def make_pythia_160m(directory: Path) -> Path:
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    out = directory / "pythia-160m-random"
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=2048, hidden_act="gelu",
                        bos_token_id=0, eos_token_id=None, pad_token_id=0)
    GPTNeoXForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(ROOT / "models" / "tinybard")).save_pretrained(str(out))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="alternated rounds of each measurement (default: 3)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_families.") as work:
        ckpt = make_pythia_160m(Path(work))
        lm = load_model(str(ckpt), args.device)
        model, hf, device = lm.model, lm.model.hf, lm.device
        prompts = read_prompts(T1)
        ids = encode_prompts(lm.tokenizer, prompts, model.config.block_size)
        batches = plan_batches(prompts, ids, False, 64, model.config.block_size)
        gen_config = copy.deepcopy(hf.generation_config)
        gen_config.update(eos_token_id=None, do_sample=True, temperature=TEMPERATURE, top_k=None)

        def plain():
            for b in batches:
                idx, pad = left_pad([ids[p] for p in b.row_prompt], device)
                mask = (torch.arange(idx.size(1), device=device).view(1, -1) >= pad.view(-1, 1)).long()
                gen_config.update(max_new_tokens=b.new_tokens, min_new_tokens=b.new_tokens)
                hf.generate(idx, attention_mask=mask, generation_config=gen_config)

        def recorded():
            for b in batches:
                record_batch(model, b, prompts, ids, TEMPERATURE, None, 42)

        times = {"transformers generate": [], "recording": []}
        cpu = {name: [] for name in times}
        with torch.no_grad():
            plain(), recorded()  # warm-up
            for _ in range(args.repeats):
                for name, fn in (("transformers generate", plain), ("recording", recorded)):
                    sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    sync(device)
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        tokens = sum(len(b.row_prompt) * b.new_tokens for b in batches)
        print(f"device {device}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}; Pythia-160m shape, "
              f"T1 sampling (temperature {TEMPERATURE}): {tokens} generated tokens in {len(batches)} batch(es)")
        for name, ts in times.items():
            print(f"  {name}: best {min(ts):.2f} s wall ({tokens / min(ts):.0f} tokens/s), {min(cpu[name]):.2f} s CPU; "
                  f"rounds (wall/CPU) " + ", ".join(f"{t:.2f}/{c:.2f}" for t, c in zip(ts, cpu[name])))
        for label, table in (("wall", times), ("CPU", cpu)):
            best = {k: min(v) for k, v in table.items()}
            print(f"  recording overhead over transformers generate ({label}, best rounds): "
                  f"{100 * (best['recording'] / best['transformers generate'] - 1):+.1f} %")


if __name__ == "__main__":
    main()
