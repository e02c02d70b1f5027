"""
Stage e's leak check (realtext.leak_check) on a selection corpus of --gib GiB of decompressed text: peak RSS and
wall time, each run in a child process (its ru_maxrss), with references measured in the same run.

    .venv/bin/python bench/bench_leak.py              # 1.5 GiB, as a .txt.gz and as a .jsonl.gz
    .venv/bin/python bench/bench_leak.py --gib 0.25 --reference_mib 64

1. The check, the selection corpus one document in a .txt.gz (a few MiB stored) and documents of 2 KB in a
   .jsonl.gz, each --gib GiB decompressed; the evaluation text is parcellation_datasets/heldout_eval_tinybard.txt.
   Target: peak RSS <= 1 GB. The check reads each text's first realtext.LEAK_CHECK_BYTES and says so.
2. References: the same child process without the check (its imports and the records read: the floor), and the
   former check, which held both texts whole (documents, joined text, passages), on --reference_mib MiB of the
   same .txt.gz text (its memory grows with the text: it is not run on --gib GiB).

Data goes to bench/out/leak (git-ignored) unless --out.
"""

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peak import run_measured  # noqa: E402

from gelutrace.evaluate import realtext as rt  # noqa: E402
from gelutrace.files import corpusfiles as cf  # noqa: E402

EVAL_TEXT = ROOT / "parcellation_datasets" / "heldout_eval_tinybard.txt"
SENTENCE = "Lorem ipsum dolor sit amet, consectetur adipiscing elit,\nsed do eiusmod tempor incididunt.  "

CHILD = """
import json, sys, time, types
sys.path.insert(0, {root!r})
from gelutrace.evaluate import realtext as rt
text = types.SimpleNamespace(**json.load(open({text!r})))
record = json.load(open({record!r}))
t0 = time.perf_counter()
out = {{}}
if {mode!r} == "check":
    out = rt.leak_check(text, record)
elif {mode!r} == "former":
    import hashlib
    def digest(d):
        return hashlib.sha256(d.encode("utf-8", "surrogatepass")).hexdigest()
    theirs = [rt._normalised("".join(doc)) for f in record["files"] for doc in rt.cf.record_documents(f)]
    ours = [rt._normalised("".join(doc)) for f in text.files for doc in rt.cf.record_documents(f)]
    common = {{digest(d) for d in ours}} & {{digest(d) for d in theirs}}
    joined = "\\n".join(theirs)
    runs = [d.split(" ") for d in ours]
    starts = [(i, j) for i, r in enumerate(runs) for j in range(max(len(r) - 11, 0))]
    import numpy as np
    picks = np.unique(np.linspace(0, len(starts) - 1, min(100, len(starts))).astype(np.int64))
    out = {{"shared_documents": len(common), "passages_found": sum(" ".join(runs[i][j:j + 12]) in joined
                                                                     for i, j in (starts[k] for k in picks))}}
out["seconds"] = time.perf_counter() - t0
open({result!r}, "w").write(json.dumps(out))
"""


def gzip_of(path: Path, block: bytes, size: int):
    """A gzip file of `size` bytes of text: one gzip member of `block`, repeated (written a member at a time)."""
    if path.is_file():
        return
    member = gzip.compress(block, compresslevel=9, mtime=0)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        for _ in range(-(-size // len(block))):
            f.write(member)
    part.rename(path)


def measure(label: str, out: Path, mode: str, record: dict) -> dict:
    text = {"files": [{"path": str(EVAL_TEXT), **cf.file_record(EVAL_TEXT, "text"), "documents": 1}]}
    (out / "text.json").write_text(json.dumps(text))
    (out / "record.json").write_text(json.dumps(record))
    result = out / "result.json"
    result.unlink(missing_ok=True)
    code = CHILD.format(root=str(ROOT), text=str(out / "text.json"), record=str(out / "record.json"), mode=mode,
                        result=str(result))
    p = out / "child.py"
    p.write_text(code)
    wall, rss = run_measured(label, [str(p)])
    got = json.loads(result.read_text())
    read = (f", {got['selection_bytes_checked'] / 2**20:g} MiB of it compared"
            f"{'' if got['selection_checked_whole'] else ' (a note says so)'}" if "selection_bytes_checked" in got
            else "")
    print(f"{label:<66} {rss:>5.2f} GiB peak RSS, {got['seconds']:6.1f} s ({wall:.1f} s with start-up){read}",
          flush=True)
    return {"wall_s": wall, "peak_rss_GiB": rss, **got}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.5, help="GiB of decompressed selection text (default: %(default)s)")
    ap.add_argument("--reference_mib", type=int, default=128,
                    help="MiB of text the former check is measured on (default: %(default)s)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "leak"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = int(args.gib * 2**30)
    block = (SENTENCE * (2**20 // len(SENTENCE))).encode()
    line = json.dumps({"text": SENTENCE * 22}) + "\n"  # about 2 KB of text
    lines = (line * (2**20 // len(line))).encode()
    corpora = {"one document, .txt.gz": out / f"one_{args.gib:g}gib.txt.gz",
               "documents of 2 KB, .jsonl.gz": out / f"many_{args.gib:g}gib.jsonl.gz",
               "reference": out / f"one_{args.reference_mib}mib.txt.gz"}
    gzip_of(corpora["one document, .txt.gz"], block, size)
    gzip_of(corpora["documents of 2 KB, .jsonl.gz"], lines, size)
    gzip_of(corpora["reference"], block, args.reference_mib * 2**20)

    def record(p: Path) -> dict:
        return {"files": [{"path": str(p), **cf.file_record(p, "text")}]}

    print(f"leak check, evaluation text {EVAL_TEXT.name}; each text compared up to its first "
          f"{rt.LEAK_CHECK_BYTES / 2**20:g} MiB (realtext.LEAK_CHECK_BYTES); target <= 1 GB peak RSS")
    results = {"floor (imports, no check)": measure("floor: the child's imports and records, no check", out,
                                                     "none", record(corpora["reference"]))}
    for label in ("one document, .txt.gz", "documents of 2 KB, .jsonl.gz"):
        p = corpora[label]
        stored = p.stat().st_size / 2**20
        results[label] = measure(f"check, {args.gib:g} GiB as {label} ({stored:.1f} MiB stored)", out, "check",
                                 record(p))
    results["former"] = measure(f"former check (texts held whole), {args.reference_mib} MiB as .txt.gz", out,
                                "former", record(corpora["reference"]))
    worst = max(results[k]["peak_rss_GiB"] for k in ("one document, .txt.gz", "documents of 2 KB, .jsonl.gz"))
    print(f"check's peak RSS at {args.gib:g} GiB: {worst * 2**30 / 1e9:.2f} GB (target <= 1 GB: "
          f"{'met' if worst * 2**30 <= 1e9 else 'NOT met'})")


if __name__ == "__main__":
    main()
