"""
Stage b's corpus mode: wall time, tokens/s and peak RSS.

    .venv/bin/python bench/bench_corpus.py                       # all three measurements below
    .venv/bin/python bench/bench_corpus.py --skip_rss --tokens 200000

1. The shipped model on --tokens tokens of text (default 10^6): the held-out text repeated as documents of a
   .jsonl, run as a user runs the script (a subprocess; peak RSS is its ru_maxrss).
2. A GPT-2-small-shaped model (transformers' GPT2Config() defaults, random weights, built locally): corpus
   mode's tokens/s against a plain teacher-forced forward pass (logits included, no hooks) of the same model
   on the same windows and batches, in the same process, interleaved (--repeats rounds, median ratio); and
   what keeping each neuron's top-10 examples adds to corpus mode's time.
3. The same model's peak RSS in corpus mode at --rss_tokens (default 2 x 10^4 and 10^5), each a subprocess.
4. The shipped model's peak RSS on --big_mb MB (default 200) of text in one document, as a single-line .txt and
   as a .jsonl of one line, and in a .jsonl of many documents, each read to --big_tokens tokens (default 2 x 10^4):
   a long document is tokenized in pieces and reading stops at --max_tokens, so memory does not grow with the file
   (the .jsonl of one line is held whole: JSON is parsed a line at a time).
5. --direct_edges (the causal edge weights): its cost against corpus mode without it, measured in the same run
   on the same text: the shipped model on --direct_tokens tokens (subprocesses, wall time and peak RSS), the
   GPT-2-small shape in process (interleaved rounds, median ratio, as in 2), and the GPT-2-small shape's peak
   RSS with it at the first --rss_tokens.

Data goes to bench/out/corpus (git-ignored) unless --out.
"""

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peak import run_measured  # noqa: E402

from gelutrace.files import layout
from gelutrace.graph.counts import CoactivationCounts, RunningTopK  # noqa: E402
from gelutrace.record import corpus  # noqa: E402
from gelutrace.record.direct import DirectEdges, anatomy  # noqa: E402

HELDOUT = ROOT / "tests" / "data" / "heldout.txt"
SHIPPED = ROOT / "models" / "tinybard"


def measure(label: str, args: list[str]) -> dict:
    wall, rss = run_measured(label, args)
    print(f"{label:<44} {wall:>8.1f} s  {rss:>6.2f} GiB", flush=True)
    return {"wall_s": wall, "peak_rss_GiB": rss}


def make_text(target: Path, tokens: int, tokenizer) -> int:
    """A .jsonl of held-out copies as documents, enough for `tokens` tokens (each document + end-of-text)."""
    text = HELDOUT.read_text(encoding="utf-8")
    per_doc = len(tokenizer(text, verbose=False)["input_ids"]) + 1
    copies = -(-tokens // per_doc)
    with open(target, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for _ in range(copies))
    return copies * per_doc


def make_big_texts(out: Path, mb: int) -> dict[str, Path]:
    """--big_mb MB of the held-out text as one single-line .txt, one single-line .jsonl document and a .jsonl of
    many documents, each written a piece at a time."""
    line = HELDOUT.read_text(encoding="utf-8").replace("\n", " ")
    copies = mb * 10**6 // len(line.encode()) + 1
    files = {"one document, single-line .txt": out / f"big_{mb}mb.txt",
             "one document, single-line .jsonl": out / f"big_{mb}mb_one.jsonl",
             "many documents, .jsonl": out / f"big_{mb}mb_many.jsonl"}
    paths = list(files.values())
    if not all(p.is_file() for p in paths):
        escaped = json.dumps(line)[1:-1]
        with open(paths[0], "w", encoding="utf-8") as txt, open(paths[1], "w", encoding="utf-8") as one, \
                open(paths[2], "w", encoding="utf-8") as many:
            one.write('{"text": "')
            for _ in range(copies):
                txt.write(line)
                one.write(escaped)
                many.write(json.dumps({"text": line}) + "\n")
            one.write('"}\n')
    return files


def gpt2_small(out: Path) -> Path:
    """A GPT-2-small-shaped checkpoint with random weights and the shipped tokenizer (ids stay below its vocab)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if not (out / "model.safetensors").is_file():
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(str(out))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(SHIPPED / f, out / f)
    return out


def throughput(ckpt: Path, text: Path, tokens: int, context: int, batch_size: int, repeats: int):
    from gelutrace.model.loading import load_model

    lm = load_model(str(ckpt), "cpu")
    ids = corpus.read_corpus([str(text)], lm.tokenizer, tokens).ids
    batches = corpus.plan(corpus.shard_windows(corpus.num_windows(len(ids), context), None), len(ids), context,
                          batch_size)
    x = torch.from_numpy(ids.astype("int64"))
    cfg = lm.model.config

    def plain():
        for w in batches:
            lm.model(torch.stack([x[int(k) * context:(int(k) + 1) * context] for k in w]))

    def counted(k: int, direct: bool = False):
        def run():
            counts = CoactivationCounts(cfg.n_layer, cfg.d_mlp)
            top = RunningTopK(cfg.n_layer, cfg.d_mlp, k, "cpu") if k else None
            ck = corpus.Checkpoints(ROOT / "bench" / "out" / "unused", lm.name, "", None, float("inf"))
            de = DirectEdges(cfg.n_layer, cfg.d_mlp, "adjacent", False) if direct else None
            corpus.stream(lm.model, ids, batches, context, counts, top, ck, 0, None, direct=de)
            if top is not None:
                top.result()
            if de is not None:
                de.result(anatomy(lm.model))
        return run

    rates = {"plain": [], "corpus": [], "top": [], "direct": []}
    with torch.no_grad():
        plain()  # warm-up
        for _ in range(repeats):
            for name, f in (("plain", plain), ("corpus", counted(0)), ("top", counted(10)),
                            ("direct", counted(0, True))):
                t0 = time.perf_counter()
                f()
                rates[name].append(len(ids) / (time.perf_counter() - t0))
    ratio = statistics.median(c / p for c, p in zip(rates["corpus"], rates["plain"]))
    cost = statistics.median(c / t - 1 for c, t in zip(rates["corpus"], rates["top"]))
    print(f"GPT-2-small shape, {len(ids):,} tokens, windows of {context} x batches of {batch_size}, "
          f"{torch.get_num_threads()} threads:")
    print(f"  plain teacher-forced forward  {statistics.median(rates['plain']):7.1f} tokens/s")
    print(f"  corpus mode (hooks + counts)  {statistics.median(rates['corpus']):7.1f} tokens/s  "
          f"= {100 * ratio:.0f} % of plain (median of {repeats} paired rounds)")
    print(f"  corpus mode + top-10 examples {statistics.median(rates['top']):7.1f} tokens/s  "
          f"= {100 * cost:+.1f} % time against corpus mode without them")
    slow = statistics.median(c / d for c, d in zip(rates["corpus"], rates["direct"]))
    print(f"  corpus mode + --direct_edges  {statistics.median(rates['direct']):7.1f} tokens/s  "
          f"= {slow:.2f}x corpus mode's time (median of {repeats} paired rounds; target <= 1.5x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10**6, help="tokens for the shipped model (default: %(default)s)")
    ap.add_argument("--speed_tokens", type=int, default=8192,
                    help="tokens per round of the GPT-2-small speed comparison (default: %(default)s)")
    ap.add_argument("--context", type=int, default=256, help="window of the speed comparison (default: %(default)s)")
    ap.add_argument("--batch_size", type=int, default=8, help="windows per batch there (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="paired rounds of the speed comparison (default: %(default)s)")
    ap.add_argument("--rss_tokens", type=int, nargs="+", default=[20000, 100000],
                    help="token counts of the GPT-2-small peak-RSS runs (default: %(default)s)")
    ap.add_argument("--big_mb", type=int, default=200, help="MB of text of measurement 4 (default: %(default)s)")
    ap.add_argument("--big_tokens", type=int, default=20000,
                    help="--max_tokens of measurement 4 (default: %(default)s)")
    ap.add_argument("--skip_shipped", action="store_true", help="skip measurement 1")
    ap.add_argument("--skip_speed", action="store_true", help="skip measurement 2")
    ap.add_argument("--skip_rss", action="store_true", help="skip measurement 3")
    ap.add_argument("--skip_big", action="store_true", help="skip measurement 4")
    ap.add_argument("--skip_direct", action="store_true", help="skip measurement 5's subprocess runs")
    ap.add_argument("--direct_tokens", type=int, default=200000,
                    help="tokens of measurement 5 on the shipped model (default: %(default)s)")
    ap.add_argument("--out", default=None, help="work directory (default: bench/out/corpus)")
    args = ap.parse_args()

    out = Path(args.out) if args.out else ROOT / "bench" / "out" / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHIPPED))
    need = max([args.tokens, args.speed_tokens, args.direct_tokens, *args.rss_tokens])
    text = out / "heldout_repeated.jsonl"
    have = make_text(text, need, tok)
    print(f"text: {text} ({have:,} tokens, the held-out text repeated)")
    b = str(ROOT / "b_generate_activation_dataset.py")
    if not args.skip_shipped:
        r = measure(f"shipped model, {args.tokens:,} tokens", [
            b, "--model_type", "tinybard", "--input_text", str(text), "--export_dir", str(out / "shipped"),
            "--max_tokens", str(args.tokens), "--device", "cpu"])
        rec = json.loads(layout.path(out / "shipped", layout.CORPUS, "tinybard").read_text())
        print(f"  {rec['samples'] / r['wall_s']:,.0f} tokens/s including start-up")
    if not args.skip_big:
        for label, path in make_big_texts(out, args.big_mb).items():
            measure(f"shipped model, {args.big_mb} MB, {label}", [
                b, "--model_type", "tinybard", "--input_text", str(path), "--export_dir", str(out / "big"),
                "--max_tokens", str(args.big_tokens), "--device", "cpu"])
    if not args.skip_direct:
        runs = {}
        for flag in ([], ["--direct_edges"]):
            label = f"shipped model, {args.direct_tokens:,} tokens{' --direct_edges' if flag else ''}"
            runs[bool(flag)] = measure(label, [
                b, "--model_type", "tinybard", "--input_text", str(text), "--export_dir", str(out / "direct"),
                "--max_tokens", str(args.direct_tokens), "--device", "cpu", "--top_examples", "0", *flag])
        print(f"  --direct_edges: {runs[True]['wall_s'] / runs[False]['wall_s']:.2f}x the time without it, start-up "
              f"included (target <= 1.5x)")
    ckpt = gpt2_small(out / "gpt2-small-random")
    if not args.skip_speed:
        throughput(ckpt, text, args.speed_tokens, args.context, args.batch_size, args.repeats)
    if not args.skip_direct:
        n = args.rss_tokens[0]
        measure(f"GPT-2-small shape, {n:,} tokens --direct_edges", [
            b, "--model_type", str(ckpt), "--input_text", str(text), "--export_dir", str(out / f"rss_direct_{n}"),
            "--max_tokens", str(n), "--context", str(args.context), "--batch_size", str(args.batch_size),
            "--device", "cpu", "--direct_edges"])
    if not args.skip_rss:
        for n in args.rss_tokens:
            measure(f"GPT-2-small shape, {n:,} tokens (peak RSS)", [
                b, "--model_type", str(ckpt), "--input_text", str(text), "--export_dir", str(out / f"rss_{n}"),
                "--max_tokens", str(n), "--context", str(args.context), "--batch_size", str(args.batch_size),
                "--device", "cpu"])


if __name__ == "__main__":
    main()
