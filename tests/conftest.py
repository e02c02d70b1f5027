"""
Shared fixtures: small random GPT-2 checkpoints written with transformers' own `save_pretrained` (the
independent reference format), and the shipped model when it exists.
"""

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

# before transformers is imported (it reads this once): nothing in the tests may reach a model hub
os.environ["HF_HUB_OFFLINE"] = "1"
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:  # one thread per worker (and its subprocesses): the
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers share the cores; more threads only oversubscribe them

import pytest  # noqa: E402
import torch  # noqa: E402

from gelutrace.files import atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # this checkout's stage scripts, imported by name, whichever checkout is installed
    sys.path.insert(0, str(REPO_ROOT))

# The models under test are tiny: one thread runs them faster than several, which mostly wait on each
# other (and on anything else sharing the machine's few cores).
torch.set_num_threads(1)

SHIPPED_NAME = "tinybard"
SHIPPED_PATH = REPO_ROOT / "models" / SHIPPED_NAME
HELDOUT_PATH = REPO_ROOT / "tests" / "data" / "heldout.txt"

TOKENIZER_TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles. In the beginning God created "
    "the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of "
    "the deep. Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."
)


# `make test` hands each worker one file at a time (--dist loadfile, --no-loadscope-reorder), in collection order:
# the longest files first keep both workers busy to the end. A file's length is what its tests took in the last run
# that ran them (pytest's cache, DURATIONS); in a checkout that has run none (a fresh clone, CI), what they took when
# FILE_SECONDS was written (its per-file seconds, measured with `make test`); then the files with slow tests first.
DURATIONS = "gelutrace/durations"
FILE_SECONDS = Path(__file__).resolve().parent / "data" / "test_file_seconds.json"


def pytest_collection_modifyitems(config, items):
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    seconds = cache.get(DURATIONS, {}) if cache is not None else {}
    measured = {}
    for item in items:
        if item.nodeid in seconds:
            measured[item.path] = measured.get(item.path, 0.0) + seconds[item.nodeid]
    recorded = json.loads(FILE_SECONDS.read_text()) if FILE_SECONDS.is_file() else {}
    per_file, slow = {}, {}
    for item in items:
        per_file.setdefault(item.path, measured.get(item.path, recorded.get(item.path.name, 0.0)))
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-per_file[item.path], -slow[item.path]))  # stable: a file's tests keep their order


def pytest_runtest_logreport(report):
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration  # set-up, call and tear-down


def pytest_sessionfinish(session):
    cache = getattr(session.config, "cache", None)
    if _durations and cache is not None and not hasattr(session.config, "workerinput"):
        cache.set(DURATIONS, {**cache.get(DURATIONS, {}), **_durations})


_durations = {}


# environment variables a script run in this process may be given: the rest (HF_HOME, ...) are read once at
# import time by the libraries, so a script given another value runs as a subprocess (PYTEST_CURRENT_TEST:
# pytest's own, different in an environment a test module copied when it was imported)
IN_PROCESS_ENV = {"HF_HUB_OFFLINE", "OMP_NUM_THREADS", "MPLBACKEND", "PYTHON", "TOKENIZERS_PARALLELISM",
                  "PYTEST_CURRENT_TEST", "COLUMNS"}  # COLUMNS: argparse's width, read at each --help
SESSION_ENV = dict(os.environ)  # a variable not here and not given was set since by a library (torch's inductor)


# the shell scripts that only exec `$PYTHON -m gelutrace.pipeline COMMAND "$@"` (with this checkout on PYTHONPATH)
DRIVER_SCRIPTS = {REPO_ROOT / "run_pipeline.sh": "run", REPO_ROOT / "d_batch_perturbation_calculate.sh": "sweep"}


def run_python(argv, cwd=None, env=None, check=False, capture_output=True, text=True, timeout=None):
    """
    subprocess.run for `[sys.executable, script.py, args...]` with a stage script of this repository, run in this
    process instead: the script's module imported and its main(args) called through run_main, in the given cwd
    and environment, its stdout and stderr captured, its exit status run_main's (1 with the traceback on stderr
    for any other exception): the same result without a new interpreter importing torch each time. So is
    `[run_pipeline.sh or d_batch_perturbation_calculate.sh, args...]` given a PYTHON: the command of
    gelutrace.pipeline that the script execs, with the PYTHONPATH it exports (for the stages the driver starts as
    subprocesses). Anything else (torchrun, `-c` code, another shell script, an environment the libraries read at
    import) runs as a subprocess.
    """
    argv = [str(a) for a in argv]
    env = dict(os.environ) if env is None else {k: str(v) for k, v in env.items()}
    script = Path(argv[1]) if len(argv) > 1 and argv[0] == sys.executable else None
    if script is not None and not script.is_absolute():
        script = Path(cwd or os.getcwd()) / script
    driver = DRIVER_SCRIPTS.get(Path(argv[0])) if env.get("PYTHON") else None
    changed = {k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)
               and (k in env or k in SESSION_ENV)}
    if (not driver and (script is None or script.suffix != ".py" or script.parent != REPO_ROOT
                        or not script.is_file()) or not changed <= IN_PROCESS_ENV):
        return subprocess.run(argv, cwd=cwd, env=env, check=check, capture_output=capture_output, text=text,
                              timeout=timeout)
    from gelutrace.cli import run_main

    if driver:  # the script's own lines
        module = importlib.import_module("gelutrace.pipeline")
        env["PYTHONPATH"] = str(REPO_ROOT) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        args = [driver, *argv[1:]]
    else:
        module = importlib.import_module(script.stem)
        assert Path(module.__file__).resolve() == script.resolve(), f"{script.stem} imported from {module.__file__}"
        args = argv[2:]
    out, err = io.StringIO(), io.StringIO()
    saved = os.getcwd(), dict(os.environ)
    try:
        os.chdir(cwd or os.getcwd())
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = run_main(module.main, args, exit=False)
            except BaseException:  # what an uncaught exception does to a process
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved[0])
        os.environ.clear()
        os.environ.update(saved[1])
    stdout, stderr = out.getvalue(), err.getvalue()
    if not text:
        stdout, stderr = stdout.encode(), stderr.encode()
    r = subprocess.CompletedProcess(argv, code, stdout, stderr)
    if check:
        r.check_returncode()
    return r


def make_tokenizer(out: Path, vocab_size: int = 320):
    """A tiny byte-level BPE tokenizer in the same format as the shipped model's, saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=128)
    fast.save_pretrained(str(out))
    return fast


def randomize(model: torch.nn.Module, seed: int):
    """
    Re-draw every parameter at a scale where activations are O(1): with GPT-2's 0.02 init nearly every
    pre-GELU value sits near 0, where tanh and exact GELU agree, and the comparisons would prove little.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:  # Conv1D weights are (in, out)
                p.copy_(1.5 / p.shape[0] ** 0.5 * torch.randn(p.shape, generator=g))


def make_checkpoint(out: Path, seed: int = 0, **overrides) -> Path:
    """A random small GPT-2 saved with save_pretrained (safetensors) plus a tokenizer, in `out`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    kwargs = dict(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=3, n_head=4,
                  activation_function="gelu_new", bos_token_id=0, eos_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**kwargs))
    randomize(hf, seed)
    hf.save_pretrained(str(out))
    assert (out / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory) -> Path:
    """A random 3-layer GPT-2 (tanh GELU, 'gelu_new') checkpoint directory named 'randgpt'."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "randgpt", seed=0)


@pytest.fixture(scope="session")
def random_loaded(random_ckpt):
    from gelutrace.model.loading import load_model

    return load_model(str(random_ckpt), device="cpu")


@pytest.fixture(scope="session")
def random_model(random_loaded):
    return random_loaded.model


def load_hf(path: Path):
    """transformers' own GPT-2 from a checkpoint directory: the reference everything is compared with."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def random_hf(random_ckpt):
    return load_hf(random_ckpt)


@pytest.fixture(scope="session")
def shipped_path() -> Path:
    if not (SHIPPED_PATH / "config.json").is_file() or not (SHIPPED_PATH / "model.safetensors").is_file():
        pytest.skip(f"the shipped model {SHIPPED_PATH} does not exist yet: train it with `make model`")
    return SHIPPED_PATH


@pytest.fixture(scope="session")
def shipped(shipped_path):
    from gelutrace.model.loading import load_model

    return load_model(SHIPPED_NAME, device="cpu")


@pytest.fixture(scope="session")
def shipped_hf(shipped_path):
    return load_hf(shipped_path)


def assert_sum_close(got, terms, axis=0, rel=1e-5, atol_per_term=0.0):
    """
    A float32 sum checked against the float64 sum of its terms, with a tolerance that scales with the
    magnitude of the terms (sum of |term|), not with the sum: a sum whose terms cancel is near 0 while each
    term's rounding error is not. atol_per_term adds an absolute error per term, for terms computed along
    another path (their rounding, about float32's epsilon times the pre-activations', does not shrink with
    the term).
    """
    import numpy as np

    terms = np.asarray(terms, np.float64)
    want, scale = terms.sum(axis=axis), np.abs(terms).sum(axis=axis)
    err = np.abs(np.asarray(got, np.float64) - want)
    bad = err > rel * scale + atol_per_term * terms.shape[axis] + 1e-12
    assert not bad.any(), (f"{int(bad.sum())} of {bad.size} sums off: worst {err[bad].max():.3g} against a "
                           f"scale of {scale[bad][err[bad].argmax()]:.3g}")


def assert_top_k(ids, scores: dict, k: int):
    """`ids` is a top k of `scores` (node -> score): k distinct nodes, none scoring below a node left out,
    in non-increasing score order; which of the nodes tied at the cut were taken is the tie-break's choice."""
    ids = list(ids)
    assert len(ids) == len(set(ids)) == k
    picked = [scores[u] for u in ids]
    assert picked == sorted(picked, reverse=True)
    rest = [s for u, s in scores.items() if u not in set(ids)]
    assert not rest or min(picked) >= max(rest)
    assert sorted(picked) == sorted(scores.values())[len(scores) - k:]


def directory_digest(d) -> dict:
    """Every entry under a directory (hidden ones and links included; the writer lock left out) and each file's
    sha256: equal before and after means byte-identical."""
    import hashlib
    import os
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, d)
            if name == ".gelutrace.lock":
                continue
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def fill_disk_at(monkeypatch, nth: int) -> dict:
    """Make the nth file write of an output set (an atomic stage-file write or an np.save, once atomic.OutputSet is
    entered) fail as a full disk does; returns the call counter."""
    import contextlib
    import errno

    import numpy as np

    calls = {"n": 0, "armed": False}
    real_path, real_save, real_enter = atomic.atomic_path, np.save, atomic.OutputSet.__enter__

    def count(target):
        calls["n"] += calls["armed"]
        if calls["n"] == nth and calls["armed"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(target))

    def enter(self):
        calls["armed"] = True
        return real_enter(self)

    @contextlib.contextmanager
    def atomic_path(target):
        count(target)
        with real_path(target) as tmp:
            yield tmp

    def save(file, *a, **k):
        count(file)
        return real_save(file, *a, **k)

    monkeypatch.setattr(atomic, "atomic_path", atomic_path)
    monkeypatch.setattr(np, "save", save)
    monkeypatch.setattr(atomic.OutputSet, "__enter__", enter)
    return calls


def interrupted_then_resumed(monkeypatch, owner, name: str, args: list[str], nth: int):
    """Stage b's main with the flags of `args` (an argv: the program's name, then the flags), interrupted
    (KeyboardInterrupt) at the nth call of owner.name, then rerun with --resume to the end."""

    import b_generate_activation_dataset as b

    real, calls = getattr(owner, name), {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(owner, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        b.main(args[1:])
    atomic.release_locks()
    monkeypatch.setattr(owner, name, real)
    try:
        b.main(args[1:] + ["--resume"])
    finally:
        atomic.release_locks()

