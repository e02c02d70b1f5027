"""
run_pipeline.sh before its first stage: every flag and the output directory checked (one error line, nothing
created), the output directory's lock taken and held by the driver for the whole run (a second driver is refused
before it changes anything; the driver's own stages share the lock), and the stamps' digests of symlinked texts
taken through the links. Also stage b's checks of its output directory before it reads a token.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
from test_corpus_formats import FAKE_PYTHON

from gelutrace.files import atomic, layout

from conftest import REPO_ROOT, SHIPPED_NAME, directory_digest, run_python

M = SHIPPED_NAME
PIPELINE = str(REPO_ROOT / "run_pipeline.sh")
CSV = str(REPO_ROOT / "parcellation_datasets" / "test_1.csv")
B = "b_generate_activation_dataset.py"
ENV = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
ENV.pop(atomic.LOCK_FD_ENV, None)


def one_error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr[-2000:]
    return r.stderr


@contextlib.contextmanager
def held_lock(directory):
    """Another process holding the directory's writer lock as a running stage does (lock_directory), until the
    block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from gelutrace.files import atomic; atomic.lock_directory(sys.argv[1], "
                               "'a stage of another run'); print('held', flush=True); sys.stdin.read()",
         str(directory)], cwd=REPO_ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.stdin.close()
        holder.wait()


# --- 2.9: the flags and the output location before the first stage ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("flags,words", [
    (["--weights", "bogus"], "--weights"), (["--methods", "bogus"], "--methods"),
    (["--thresholds", "2"], "--thresholds"), (["--ratios", "0"], "--ratios")])
def test_a_bad_sweep_flag_is_one_line_before_any_stage(tmp_path, flags, words):
    start = time.monotonic()
    r = subprocess.run([PIPELINE, *flags, "--device", "cpu", M, CSV, str(tmp_path / "run")], capture_output=True,
                       text=True, env=ENV)
    elapsed = time.monotonic() - start
    assert words in one_error_line(r) and "==" not in r.stdout
    assert not (tmp_path / "run").exists()  # no stage ran, nothing was created
    assert elapsed < 5, elapsed  # a generous bound: no stage starts


@pytest.mark.parametrize("flags,words", [
    (["--ratios", "0.01 0.010"], "twice"), (["--thresholds", "0.5 nan"], "--thresholds"),
    (["--temperature", "-1"], "--temperature"), (["--seed", "x"], "--seed"), (["--eval_tokens", "0"], "--eval_tokens"),
    (["--weights", "direct_abs count", "--direct_edges", "0"], "--direct_edges 1"),
    (["--methods", "influence", "--direct_edges", "0"], "--direct_edges 1"),
    (["--methods", "degree ablation", "--effects", "0"], "--effects 1")])
def test_every_flag_and_combination_is_checked(tmp_path, capsys, monkeypatch, flags, words):
    """The driver's check of the resolved flags (in this process; the driver runs it before any stage: below)."""
    from gelutrace import driver
    from gelutrace.cli import run_main

    good = {"--thresholds": "0.5", "--ratios": "0.01", "--methods": "degree", "--weights": "count",
            "--direct_edges": "1", "--effects": "1", "--temperature": "0", "--seed": "0", "--eval_tokens": "100"}
    given = dict(good, **dict(zip(flags[::2], flags[1::2])))
    argv = ["check", f"--data={tmp_path / 'run'}", f"--csv={CSV}", f"--eval_csv={CSV}",
            *(f"{k}={v}" for k, v in given.items())]
    for args, fails in ((argv[:4] + [f"{k}={v}" for k, v in good.items()], False), (argv, True)):
        monkeypatch.setattr(sys, "argv", ["driver", *args])
        with (pytest.raises(SystemExit) if fails else contextlib.nullcontext()) as e:
            run_main(driver.main)
        err = capsys.readouterr().err
        if fails:
            assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
        else:
            assert err == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flags,words", [
    (["--device", "bogus"], "--device"), (["--methods", "influence", "--direct_edges", "0"], "--direct_edges 1")])
def test_the_driver_checks_before_any_stage(tmp_path, flags, words):
    r = subprocess.run([PIPELINE, *flags, M, CSV, str(tmp_path / "run")], capture_output=True, text=True, env=ENV)
    assert words in one_error_line(r) and "==" not in r.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_output_directory_that_is_a_file_is_refused_before_any_stage(tmp_path):
    (tmp_path / "run").write_text("a file")
    r = subprocess.run([PIPELINE, "--device", "cpu", M, CSV, str(tmp_path / "run" / "x")], capture_output=True,
                       text=True, env=ENV)
    assert "is not a directory" in one_error_line(r) and "==" not in r.stdout
    assert (tmp_path / "run").read_text() == "a file"


# --- 2.4: one driver per directory ---------------------------------------------------------------------------------
def earlier_run(data):
    """A directory as an earlier run left it: stamps, subsets, results."""
    (data / layout.PIPELINE_STAMPS).mkdir(parents=True)
    (data / layout.PIPELINE_STAMPS / "d.cmd").write_text("subsets_d 0.5 KS=3\\ 11 degree count 0 count\n")
    (data / layout.SUBSETS_DIR).mkdir()
    (data / layout.SUBSETS_DIR / f"{M}_degree_t0.5_k3.npy").write_bytes(b"subset")
    (data / layout.RESULTS_DIR).mkdir()
    (data / layout.RESULTS_DIR / layout.PERTURBATION_SUMMARY).write_text("subset\nnone\n")


# stands in for the interpreter: stage a waits (READY on stdout, then until stdin closes) and fails; all else runs
BLOCKING_PYTHON = """#!/bin/bash
case "$1" in *a_generate_gelu_graph.py) echo READY; cat > /dev/null; exit 1 ;; esac
exec {python} "$@"
"""


@pytest.mark.slow
def test_a_second_driver_is_refused_before_it_changes_anything(tmp_path):
    data = tmp_path / "run"
    earlier_run(data)
    fake = tmp_path / "python"
    fake.write_text(BLOCKING_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    # driver A, held in its first stage (the lock is taken before it)
    a = subprocess.Popen([PIPELINE, "--ks", "3 11", "--device", "cpu", "--force", M, CSV, str(data)],
                         env=dict(ENV, PYTHON=str(fake)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in a.stdout:  # until A's stage a runs (or A ends: then the assertion below fails)
            lines.append(line)
            if line == "READY\n":
                break
        assert lines[-1:] == ["READY\n"], (lines, a.stderr.read() if a.poll() is not None else "")
        before = directory_digest(data)
        b = subprocess.run([PIPELINE, "--ks", "5", "--device", "cpu", M, CSV, str(data)], capture_output=True,
                           text=True, env=ENV)
        err = one_error_line(b)
        assert f"another run is writing into {data}" in err and "==" not in b.stdout
        assert directory_digest(data) == before  # B changed nothing: every file's sha256, every entry
        assert (data / layout.SUBSETS_DIR / f"{M}_degree_t0.5_k3.npy").read_bytes() == b"subset"
    finally:
        a.communicate()  # closes A's stdin: its stage a ends
    assert a.returncode != 0  # the stand-in stage a failed: A stopped there


@pytest.mark.slow
def test_a_driver_is_refused_while_a_stage_of_another_run_writes(tmp_path):
    """The issue's case: run A in stage e (its lock_directory), run B started on the same directory."""
    data = tmp_path / "run"
    earlier_run(data)
    before = directory_digest(data)
    with held_lock(data):
        b = subprocess.run([PIPELINE, "--ks", "5", "--device", "cpu", M, CSV, str(data)], capture_output=True,
                           text=True, env=ENV)
        assert "another run is writing into" in one_error_line(b) and "==" not in b.stdout
    assert directory_digest(data) == before


SHARED_LOCK = """
set -e
mkdir -p "$1"
exec 9>>"$1/.gelutrace.lock"
"$PYTHON" -c 'from gelutrace.cli import run_main; from gelutrace.driver import main; run_main(main)' lock 9 "$1"
lock='import sys; from gelutrace.files import atomic; atomic.lock_directory(sys.argv[1], "a stage"); print("wrote")'
GELUTRACE_LOCK_FD=9 "$PYTHON" -c "$lock" "$1"      # a stage the driver runs: it inherits descriptor 9
GELUTRACE_LOCK_FD=9 "$PYTHON" -c "$lock" "$1" 9>&- || echo "refused without the descriptor"
"$PYTHON" -c "$lock" "$1" || echo "refused without the variable"
GELUTRACE_LOCK_FD=9 "$PYTHON" -c "$lock" "$2" || echo "another directory: its own lock"
"""


def test_the_stages_of_the_driver_share_its_lock_and_no_other_process_does(tmp_path):
    (tmp_path / "other").mkdir()
    with held_lock(tmp_path / "other"):
        r = subprocess.run(["bash", "-c", SHARED_LOCK, "-", str(tmp_path / "run"), str(tmp_path / "other")],
                           capture_output=True, text=True, env=dict(ENV, PYTHONPATH=str(REPO_ROOT)), cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["wrote", "refused without the descriptor", "refused without the variable",
                                     "another directory: its own lock"]
    assert r.stderr.count("PipelineError: another run is writing into") == 3


# --- 2.5: a symlinked text is hashed through its links -----------------------------------------------------------
# FAKE_PYTHON (test_corpus_formats) stands in for the interpreter: the driver's helpers run, every stage only logs
# its command
OUTPUTS = (f"{M}_graph_meta.json", layout.CORPUS.format(m=M), f"{layout.RESULTS_DIR}/{layout.PERTURBATION_SUMMARY}",
           f"{layout.CARDS_DIR}/{layout.CARDS_HTML}")  # what the stand-in stages do not write (nor modules/ and d's)


@pytest.mark.slow
def test_a_symlinked_text_that_changes_reruns_the_stages_that_read_it(tmp_path):
    """A directory of links, as the Hugging Face cache keeps its files (a single linked file: the digest's test
    below)."""
    log = tmp_path / "log"
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=log))
    fake.chmod(0o755)
    blobs = tmp_path / "blobs"  # as the Hugging Face cache keeps them: the files elsewhere, linked by name
    blobs.mkdir()
    (blobs / "1").write_text("In the beginning God created the heaven and the earth.")
    (blobs / "2").write_text("To be, or not to be, that is the question.")
    text, eval_text = tmp_path / "corpus", tmp_path / "eval"
    for d, blob in ((text, "1"), (eval_text, "2")):
        d.mkdir()
        (d / "part.txt").symlink_to(blobs / blob)
    data = tmp_path / "run"

    def pipeline():
        r = subprocess.run([PIPELINE, "--text", str(text), "--eval_text", str(eval_text), "--ratios", "0.01",
                            "--effects", "0", "--direct_edges", "0", "--methods", "degree", "--modules_top", "0", M,
                            CSV, str(data)], capture_output=True, text=True, env=dict(ENV, PYTHON=str(fake)))
        assert r.returncode == 0, r.stderr[-3000:]
        for name in OUTPUTS:
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            (data / name).touch()
        for d in (layout.MODULES_DIR, layout.SUBSETS_DIR):
            (data / d).mkdir(exist_ok=True)
        return {ln[3:].split(":")[0]: ln.endswith(")") and "up to date" in ln
                for ln in r.stdout.splitlines() if ln.startswith("== ") and "done in" not in ln}

    first = pipeline()
    assert first and not any(first.values())
    (blobs / "2").write_text("Friends, Romans, countrymen, lend me your ears.")  # the evaluation text, through the link
    up = pipeline()  # what does not read the evaluation text is up to date
    assert up["a"] and up["b"] and up["d"] and not up["e"] and not up["cards"]
    (blobs / "1").write_text("And the earth was without form, and void.")  # the corpus, through the link
    up = pipeline()
    assert up["a"] and not up["b"] and not up["e"]


def test_the_digest_of_a_text_is_that_of_the_files_it_is_read_from(tmp_path):
    """Independent of the links: the digest of a directory of links equals that of a copy of the linked files, and
    a linked file's that of the file; both change with the linked file's content."""
    from gelutrace import driver

    blobs, linked, copied = tmp_path / "blobs", tmp_path / "linked", tmp_path / "copied"
    for d in (blobs, linked, copied):
        d.mkdir()
    for name, body in (("a.txt", "first document"), ("b.jsonl", json.dumps({"text": "second"}) + "\n")):
        (blobs / name).write_text(body)
        (linked / name).symlink_to(blobs / name)
        (copied / name).write_text(body)
    (copied / "notes.md").write_text("not read by stage b")
    assert driver.text_digest(str(linked), "--text") == driver.text_digest(str(copied), "--text")
    (tmp_path / "a.txt").symlink_to(blobs / "a.txt")
    assert driver.text_digest(str(tmp_path / "a.txt"), "--text") == driver.text_digest(str(copied / "a.txt"), "--text")
    before = driver.text_digest(str(linked), "--text"), driver.text_digest(str(tmp_path / "a.txt"), "--text")
    (blobs / "a.txt").write_text("first document, edited")
    after = driver.text_digest(str(linked), "--text"), driver.text_digest(str(tmp_path / "a.txt"), "--text")
    assert after[0] != before[0] and after[1] != before[1]


# --- 2.9: stage b checks its output directory before it reads a token ---------------------------------------------
@pytest.fixture
def unreadable_corpus(tmp_path):
    """A corpus that fails once it is read (its second line is not JSON): a refusal that names the output
    directory, not the line, came before any token."""
    p = tmp_path / "corpus.jsonl"
    p.write_text(json.dumps({"text": "In the beginning"}) + "\n{not json\n")
    return p


def run_b(*args):
    return run_python([sys.executable, str(REPO_ROOT / B), *map(str, args)], cwd=REPO_ROOT,
                      env=dict(ENV, MPLBACKEND="Agg"))


def test_the_corpus_is_refused_when_read_and_leaves_no_directory(unreadable_corpus, tmp_path):
    """(The reference for the two tests below: read, this corpus fails on its line 2.)"""
    r = run_b("--input_text", unreadable_corpus, "--export_dir", tmp_path / "out", "--model_type", M,
              "--device", "cpu")
    assert "line 2" in one_error_line(r)
    assert not (tmp_path / "out").exists()  # the lock's directory removed again


@pytest.mark.parametrize("mode", ["corpus", "prompt"])
def test_stage_b_refuses_an_export_dir_that_is_a_file_before_reading(unreadable_corpus, tmp_path, mode):
    (tmp_path / "out").write_text("a file")
    source = ["--input_text", unreadable_corpus] if mode == "corpus" else ["--input_csv", CSV]
    # prompt mode: a model that does not exist, which loading would refuse first
    model = M if mode == "corpus" else str(tmp_path / "no_such_model")
    r = run_b(*source, "--export_dir", tmp_path / "out", "--model_type", model, "--device", "cpu")
    err = one_error_line(r)
    assert "--export_dir" in err and "not a directory" in err
    assert (tmp_path / "out").read_text() == "a file"


@pytest.mark.parametrize("mode", ["corpus", "prompt"])
def test_stage_b_refuses_a_locked_directory_before_reading(unreadable_corpus, tmp_path, mode):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.csv").write_text("kept\n")
    before = directory_digest(out)
    source = ["--input_text", unreadable_corpus] if mode == "corpus" else ["--input_csv", CSV]
    model = M if mode == "corpus" else str(tmp_path / "no_such_model")
    with held_lock(out):
        r = run_b(*source, "--export_dir", out, "--model_type", model, "--device", "cpu")
    assert f"another run is writing into {out}" in one_error_line(r)
    assert directory_digest(out) == before
