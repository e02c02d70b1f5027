"""
run_pipeline.sh's helpers, each a subcommand of `python -m gelutrace.driver` (the driver runs main() with -c):

  names MODEL DEVICE [FLAGS]
                         the file prefix {m} and whether MODEL is a shipped model ("1 tinybard"), after checking
                         DEVICE and the form of each flag given (an empty one is a default, not resolved yet)
  check [FLAGS]          every flag of the run, resolved, together, and the output directory, before anything runs
                         or is created; prints the digests of the inputs the stamps hold: the prompt CSV's or the
                         corpus's, then the evaluation CSV's and text's
  lock FD DIRECTORY      take DIRECTORY's writer lock on the open descriptor FD of its LOCK_FILE that the driver
                         holds (and its stages inherit) until it ends

Each refuses a bad value with one line `error: ...` and exit status 2.
"""

import hashlib
import math
import re
import sys

from gelutrace import PipelineError
from gelutrace.cli import parser, run_main
from gelutrace.files import atomic


def names(args):
    check_flags(args)
    from gelutrace.model.loading import (  # lazy: `--help` and the checks start without torch
        model_name,
        resolve_device,
        shipped_models,
    )

    resolve_device(args.device)
    print(int(args.model in shipped_models()), model_name(args.model))


def numbers(flag: str, value: str) -> list[float]:
    values = []
    for v in value.split():
        try:
            values.append(float(v))
        except ValueError:
            raise PipelineError(f"{flag} {v!r}: expected a number") from None
    if not values:
        raise PipelineError(f"{flag} is empty")
    return values


def words(flag: str, value: str, allowed: tuple, what: str) -> list[str]:
    values = value.split()
    if not values:
        raise PipelineError(f"{flag} is empty")
    for v in values:
        if v not in allowed:
            raise PipelineError(f"{flag}: unknown {what} {v!r}; choose from {', '.join(allowed)}")
    return values


def whole(flag: str, value: str, least: int) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) < least:
        raise PipelineError(f"{flag} must be a whole number >= {least}, got {value!r}")
    return int(value)


def text_digest(path: str, flag: str) -> str:
    """The sha256 of the names and sha256 of the files a corpus path is read from (gelutrace.files.corpusfiles), each
    read through its symlinks: a linked file that changes changes the digest."""
    from gelutrace.files.corpusfiles import corpus_files  # lazy: `--help` and the checks start without torch

    h = hashlib.sha256()
    for p in corpus_files([path], flag):
        h.update(f"{atomic.file_sha256(p)}  {p.name}\n".encode())
    return h.hexdigest()


def check_flags(args):
    """Each flag's form; an empty value is left to its default."""
    from gelutrace.graph import coactivation as gr  # lazy: `--help` and the checks start without torch
    from gelutrace.selection import methods as sel  # lazy: `--help` and the checks start without torch

    for t in numbers("--thresholds", args.thresholds):
        if not 0 <= t <= 1:
            raise PipelineError(f"--thresholds {t:g}: a threshold must be in [0, 1]")
    if args.ratios:
        ratios = numbers("--ratios", args.ratios)
        for r in ratios:
            if not 0 < r <= 1:
                raise PipelineError(f"--ratios {r:g}: a ratio must be in (0, 1]")
        if len(set(ratios)) != len(ratios):
            raise PipelineError("--ratios lists a value twice")
    elif args.ks:
        sel.k_values(None, args.ks.split())
    if args.methods:
        words("--methods", args.methods, sel.METHODS, "method")
    if args.weights:
        words("--weights", args.weights, gr.WEIGHTS, "weight")
    try:
        temperature = float(args.temperature)
    except ValueError:
        temperature = math.nan
    if not math.isfinite(temperature) or temperature < 0:
        raise PipelineError(f"--temperature must be a finite number >= 0, got {args.temperature!r}")
    whole("--seed", args.seed, 0)
    if args.eval_tokens:
        whole("--eval_tokens", args.eval_tokens, 1)


def check(args):
    from gelutrace.graph import coactivation as gr  # lazy: `--help` and the checks start without torch
    from gelutrace.selection import methods as sel  # lazy: `--help` and the checks start without torch

    check_flags(args)
    methods = words("--methods", args.methods, sel.METHODS, "method")
    weights = words("--weights", args.weights, gr.WEIGHTS, "weight")
    if args.direct_edges != "1":
        for w in weights:
            if w in gr.DIRECT_WEIGHTS:
                raise PipelineError(f"--weights {w} needs --direct_edges 1 (stage b measures the causal weights)")
        if "influence" in methods:
            raise PipelineError("--methods influence needs --direct_edges 1 (it ranks through the causal weights)")
    if "ablation" in methods and args.effects != "1":
        raise PipelineError("--methods ablation needs --effects 1 (it ranks by the measured single-neuron effects)")
    whole("--eval_tokens", args.eval_tokens, 1)
    outputs = [args.data] + ([f"{args.data}_shards"] if args.text else [])
    for d in outputs:
        atomic.check_output_dir(d, "DATASET_DIR")
    source = text_digest(args.text, "--text") if args.text else atomic.file_sha256(args.csv)
    evaluation = atomic.file_sha256(args.eval_csv)
    if args.eval_text != "none":
        evaluation += " " + text_digest(args.eval_text, "--eval_text")
    print(source)
    print(evaluation)


def lock(args):

    atomic.lock_on_descriptor(int(args.fd), args.directory, "run_pipeline.sh")


def main():
    ap = parser(__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    names_parser = sub.add_parser("names")
    names_parser.add_argument("model")
    names_parser.add_argument("device")
    p = sub.add_parser("check")
    for flag in ("--data", "--csv", "--eval_csv"):
        p.add_argument(flag, required=True)
    for q in (names_parser, p):
        for flag in ("--thresholds", "--ratios", "--ks", "--methods", "--weights", "--direct_edges", "--effects",
                     "--temperature", "--seed", "--eval_tokens", "--text"):
            q.add_argument(flag, default="")
    p.add_argument("--eval_text", default="none")
    p = sub.add_parser("lock")
    p.add_argument("fd")
    p.add_argument("directory")
    args = ap.parse_args(sys.argv[1:])
    {"names": names, "check": check, "lock": lock}[args.command](args)


if __name__ == "__main__":
    run_main(main)
