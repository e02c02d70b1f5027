"""What every stage script shares: the error convention and the model/device flags."""

import argparse
import contextvars
import errno
import math
import os
import sys

from gelutrace import PipelineError
from gelutrace.files.atomic import disk_full_directory, release_locks


def run_main(main, argv=None, exit: bool = True) -> int:
    """
    Run a script's main(argv): a PipelineError becomes one 'error: ...' line on stderr and exit status 2. A script
    ends in `run_main(main)`, which exits with any status but 0; with exit=False (a call in this process, a test's)
    the status is returned instead, that of a SystemExit (a bad flag, --help) included. Given argv, the usage
    names the script, as `python script.py` does.
    """
    token = _prog.set(os.path.basename(main.__globals__.get("__file__", "")) or None) if argv is not None else None
    try:
        status = _status(main, argv)
    finally:
        if token is not None:
            _prog.reset(token)
    if exit and status:
        sys.exit(status)
    return status


def _status(main, argv) -> int:
    try:
        main() if argv is None else main(list(argv))
        return 0
    except SystemExit as e:  # argparse's --help and bad flags, as the interpreter reads the status
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a vanished directory, a permission: still one line, never a traceback
        full = disk_full_directory(e)
        where = f": {e.filename}" if e.filename else ""
        if full is not None:  # the directory written into, never a temporary name that is gone
            print(f"error: no space left on {full} (disk full)", file=sys.stderr)
        else:
            print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        release_locks()


_prog = contextvars.ContextVar("prog", default=None)  # the script's name for argparse, in a call given argv


class Parser(argparse.ArgumentParser):
    """argparse, with one error line (and exit status 2) for a bad flag or value, and for a value that names a
    symlink loop (which os.path calls missing). --help shows the usage."""

    def error(self, message):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for action in self._actions:
            values = getattr(parsed, action.dest, None)
            for v in values if isinstance(values, list) else [values]:
                if isinstance(v, (str, os.PathLike)) and _is_loop(v):
                    name = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
                    raise PipelineError(f"{name} {v} is a symlink loop")
        return parsed


def _is_loop(path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    except ValueError:  # a NUL byte: no path at all
        return False
    return False


def parser(doc: str) -> argparse.ArgumentParser:
    return Parser(prog=_prog.get(), description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_args(ap: argparse.ArgumentParser, default: str = "gpt2", device: bool = True):
    from gelutrace.model.loading import HUB_MODELS, SHIPPED_MODEL  # imports torch: only for scripts that run a model
    from gelutrace.model.sites import supported  # lazy: imports torch; only scripts that run a model need it

    ap.add_argument("--model_type", default=default,
                    help=f"hub name ({', '.join(HUB_MODELS)}, or owner/name such as EleutherAI/pythia-160m), "
                         f"the shipped model ({SHIPPED_MODEL}) or a local Hugging Face checkpoint directory; "
                         f"architectures (config.json model_type): {supported()} (default: %(default)s)")
    if device:
        ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where the model runs; auto picks cuda, then mps, then cpu (default: %(default)s)")


def add_sampling_args(ap: argparse.ArgumentParser, seed: int, temperature: float, top_k: int | None,
                      batch_size: int | None = 64, batch_help: str | None = None, only_in: str | None = None) -> dict:
    """
    --seed, --temperature, --top_k and --batch_size; returns the sampling flags' defaults. With `only_in` (the mode
    they belong to, e.g. "prompt mode") the sampling flags default to None, so a script can tell whether they were
    given, and fills in the returned defaults itself.
    """
    defaults = {"seed": seed, "temperature": temperature, "top_k": top_k}
    unset = only_in is not None
    where = f"{only_in}; " if only_in else ""
    ap.add_argument("--seed", type=int, default=None if unset else seed,
                    help=f"random seed for sampling ({where}default: {seed})")
    ap.add_argument("--temperature", type=float, default=None if unset else temperature,
                    help=f"sampling temperature; 0 means greedy decoding (argmax) ({where}default: {temperature})")
    ap.add_argument("--top_k", type=int, default=None if unset else top_k,
                    help=f"sample only among the k most likely tokens; ignored when greedy ({where}default: {top_k})")
    ap.add_argument("--batch_size", type=int, default=batch_size,
                    help=batch_help or "most sequences generated together (prompts are left-padded into batches; "
                                       "greedy runs compute one sequence per prompt) (default: %(default)s)")
    return defaults


def check_at_least(args, minimum: int, *flags: str):
    """One error line for the first of the named integer flags (argparse dests) below minimum; None passes."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise PipelineError(f"--{flag} must be >= {minimum}, got {value}")


def check_sampling_args(args):
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise PipelineError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    check_at_least(args, 0, "seed")
    check_at_least(args, 1, "top_k", "batch_size")


def memory_limit(gb: float | None) -> int | None:
    """--memory_limit_gb in bytes (None: what is available), checked."""
    if gb is None:
        return None
    if not math.isfinite(gb) or gb <= 0:
        raise PipelineError(f"--memory_limit_gb must be a positive number, got {gb}")
    return int(gb * 2 ** 30)
