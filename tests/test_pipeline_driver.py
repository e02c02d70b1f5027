"""
run_pipeline.sh before its first stage: every flag and the output directory checked (one error line, nothing
created), the output directory's lock taken and held by the driver for the whole run (a second driver is refused
before it changes anything; the driver's own stages share the lock), and the stamps' digests of symlinked texts
taken through the links. Also stage b's checks of its output directory before it reads a token.

The driver's stage table (gelutrace.pipeline) against the shell driver it replaced: the commands and stamps of the
demo's two runs, which stages a changed setting reruns, the stamps' shell quoting; and the stage-d sweep in one
process against one process per method, weight and threshold.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_corpus_formats import FAKE_PYTHON

from gelutrace import PipelineError, pipeline
from gelutrace.files import atomic, layout

from conftest import REPO_ROOT, SHIPPED_NAME, directory_digest, run_python
from graphdata import make_dataset, random_activations

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
# (the driver run in this process, as run_pipeline.sh runs it: conftest.run_python; the tests of one driver per
# directory below run the script itself)
@pytest.mark.parametrize("flags,words", [
    (["--weights", "bogus"], "--weights"), (["--methods", "bogus"], "--methods"),
    (["--thresholds", "2"], "--thresholds"), (["--ratios", "0"], "--ratios")])
def test_a_bad_sweep_flag_is_one_line_before_any_stage(tmp_path, flags, words):
    r = run_python([PIPELINE, *flags, "--device", "cpu", M, CSV, str(tmp_path / "run")], env=ENV)
    assert words in one_error_line(r) and "==" not in r.stdout
    assert not (tmp_path / "run").exists()  # no stage ran, nothing was created


@pytest.mark.parametrize("flags,words", [
    (["--ratios", "0.01 0.010"], "twice"), (["--thresholds", "0.5 nan"], "--thresholds"),
    (["--temperature", "-1"], "--temperature"), (["--seed", "x"], "--seed"), (["--eval_tokens", "0"], "--eval_tokens"),
    (["--weights", "direct_abs count", "--direct_edges", "0"], "--direct_edges 1"),
    (["--methods", "influence", "--direct_edges", "0"], "--direct_edges 1"),
    (["--methods", "degree ablation", "--effects", "0"], "--effects 1"),
    (["--exclude_layers", "x"], "--exclude_layers"), (["--exclude_layers", "-1"], "--exclude_layers"),
    (["--exclude_layers", "0 0"], "twice")])
def test_every_flag_and_combination_is_checked(tmp_path, capsys, monkeypatch, flags, words):
    """The driver's check of the resolved flags (in this process; the driver runs it before any stage: below)."""
    from gelutrace.cli import run_main

    good = {"--thresholds": "0.5", "--ratios": "0.01", "--methods": "degree", "--weights": "count",
            "--direct_edges": "1", "--effects": "1", "--temperature": "0", "--seed": "0", "--eval_tokens": "100"}
    given = dict(good, **dict(zip(flags[::2], flags[1::2])))
    for options, fails in ((good, False), (given, True)):
        argv = [*(w for kv in options.items() for w in kv), "--device", "cpu", M, CSV, str(tmp_path / "run")]
        with (pytest.raises(SystemExit) if fails else contextlib.nullcontext()) as e:
            run_main(lambda: pipeline.settings(argv))
        err = capsys.readouterr().err
        if fails:
            assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
        else:
            assert err == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,words", [
    (["--device", "bogus"], "--device"), (["--methods", "influence", "--direct_edges", "0"], "--direct_edges 1")])
def test_the_driver_checks_before_any_stage(tmp_path, flags, words):
    r = run_python([PIPELINE, *flags, M, CSV, str(tmp_path / "run")], env=ENV)
    assert words in one_error_line(r) and "==" not in r.stdout
    assert not (tmp_path / "run").exists()


def test_an_output_directory_that_is_a_file_is_refused_before_any_stage(tmp_path):
    (tmp_path / "run").write_text("a file")
    r = run_python([PIPELINE, "--device", "cpu", M, CSV, str(tmp_path / "run" / "x")], env=ENV)
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
        b = run_python([PIPELINE, "--ks", "5", "--device", "cpu", M, CSV, str(data)], env=ENV)  # B in this process
        err = one_error_line(b)
        assert f"another run is writing into {data}" in err and "==" not in b.stdout
        assert directory_digest(data) == before  # B changed nothing: every file's sha256, every entry
        assert (data / layout.SUBSETS_DIR / f"{M}_degree_t0.5_k3.npy").read_bytes() == b"subset"
    finally:
        a.communicate()  # closes A's stdin: its stage a ends
    assert a.returncode != 0  # the stand-in stage a failed: A stopped there


def test_a_driver_is_refused_while_a_stage_of_another_run_writes(tmp_path):
    """The issue's case: run A in stage e (its lock_directory), run B started on the same directory."""
    data = tmp_path / "run"
    earlier_run(data)
    before = directory_digest(data)
    with held_lock(data):
        b = run_python([PIPELINE, "--ks", "5", "--device", "cpu", M, CSV, str(data)], env=ENV)  # B in this process
        assert "another run is writing into" in one_error_line(b) and "==" not in b.stdout
    assert directory_digest(data) == before


# a stage the driver runs, or any other process: takes the directory's lock as the stages do
LOCK = "import sys; from gelutrace.files import atomic; atomic.lock_directory(sys.argv[1], 'a stage'); print('wrote')"


def test_the_stages_of_the_driver_share_its_lock_and_no_other_process_does(tmp_path):
    (tmp_path / "other").mkdir()
    env = dict(ENV, PYTHONPATH=str(REPO_ROOT))
    fd = pipeline.take_lock(str(tmp_path / "run"))
    try:
        with held_lock(tmp_path / "other"):
            with_fd = dict(env, **{atomic.LOCK_FD_ENV: str(fd)})
            results = [subprocess.run([sys.executable, "-c", LOCK, str(tmp_path / d)], capture_output=True, text=True,
                                      env=e, pass_fds=fds, cwd=REPO_ROOT)
                       for d, e, fds in (("run", with_fd, (fd,)),  # a stage the driver runs: inherits the descriptor
                                         ("run", with_fd, ()),  # the variable without the descriptor
                                         ("run", env, (fd,)),  # the descriptor without the variable
                                         ("other", with_fd, (fd,)))]  # another directory: its own lock
            # the driver's own stage, through the one place that starts them
            ran = pipeline.execute(pipeline.script("-c", LOCK, str(tmp_path / "run")), fd)
    finally:
        os.close(fd)
    assert ran == 0
    assert [r.stdout for r in results] == ["wrote\n", "", "", ""]
    assert all("PipelineError: another run is writing into" in r.stderr for r in results[1:])


# --- a stage runs in the driver's process, as its own interpreter would run it ------------------------------------
def test_a_stage_runs_in_the_drivers_process_only_with_the_drivers_interpreter(monkeypatch):
    import a_generate_gelu_graph
    from gelutrace.report import __main__ as report_main
    monkeypatch.delenv("PYTHON", raising=False)
    assert pipeline.stage_main(["a_generate_gelu_graph.py", "--help"]) is a_generate_gelu_graph.main
    assert pipeline.stage_main(["-m", "gelutrace.report", "x"]) is report_main.main
    assert pipeline.stage_main(["-m", "gelutrace.pipeline", "sweep"]).__module__ == "gelutrace.pipeline"
    assert pipeline.stage_main(["-c", "print(1)"]) is None
    assert pipeline.stage_main(["-m", "json.tool"]) is None
    assert pipeline.stage_main(["no_such_stage.py"]) is None
    monkeypatch.setenv("PYTHON", sys.executable)
    assert pipeline.stage_main(["a_generate_gelu_graph.py"]) is a_generate_gelu_graph.main
    monkeypatch.setenv("PYTHON", "/bin/false")  # another interpreter: a subprocess of it
    assert pipeline.stage_main(["a_generate_gelu_graph.py"]) is None


def test_a_stage_in_the_drivers_process_writes_what_its_own_process_writes(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("PYTHON", raising=False)
    env = dict(ENV, PYTHONPATH=str(REPO_ROOT))
    sub = subprocess.run([sys.executable, "a_generate_gelu_graph.py", "--model_type", M, "--output_dir",
                          str(tmp_path / "sub")], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr[-2000:]
    argv, grad = list(sys.argv), torch.is_grad_enabled()
    fd = pipeline.take_lock(str(tmp_path / "here"))  # the driver's lock: its stage writes under it
    try:
        command = pipeline.script("a_generate_gelu_graph.py", "--model_type", M, "--output_dir", str(tmp_path / "here"))
        assert pipeline.execute(command, fd) == 0
        bad = pipeline.script("a_generate_gelu_graph.py", "--model_type", str(tmp_path / "no_model"), "--output_dir",
                              str(tmp_path / "here"))
        capfd.readouterr()
        assert pipeline.execute(bad, fd) == 2  # one error line, as the script's own process exits
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
    finally:
        os.close(fd)
    assert sys.argv == argv and torch.is_grad_enabled() == grad and atomic.LOCK_FD_ENV not in os.environ
    meta = [json.loads((tmp_path / d / layout.GRAPH_META.format(m=M)).read_text()) for d in ("here", "sub")]
    for m in meta:
        m["edges_file"].pop("mtime_ns")
    assert meta[0] == meta[1]
    written = {d: sorted(p.name for p in (tmp_path / d).iterdir() if p.name != layout.LOCK_FILE) for d in ("here", "sub")}
    assert written["here"] == written["sub"]
    assert all((tmp_path / "here" / n).read_bytes() == (tmp_path / "sub" / n).read_bytes() for n in written["here"]
               if n != layout.GRAPH_META.format(m=M))


def test_an_exception_a_stage_does_not_handle_is_its_traceback_and_status_1(capfd):
    def main(argv):
        raise ValueError("broken stage")

    assert pipeline.execute_here(main, ["x.py"], -1) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and "ValueError: broken stage" in err


# --- 2.5: a symlinked text is hashed through its links -----------------------------------------------------------
# FAKE_PYTHON (test_corpus_formats) stands in for the interpreter: the driver runs, every stage only logs its command
OUTPUTS = (f"{M}_graph_meta.json", layout.CORPUS.format(m=M), f"{layout.RESULTS_DIR}/{layout.PERTURBATION_SUMMARY}",
           f"{layout.CARDS_DIR}/{layout.CARDS_HTML}")  # what the stand-in stages do not write (nor modules/ and d's)


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
        r = run_python([PIPELINE, "--text", str(text), "--eval_text", str(eval_text), "--ratios", "0.01",
                        "--effects", "0", "--direct_edges", "0", "--methods", "degree", "--modules_top", "0", M,
                        CSV, str(data)], env=dict(ENV, PYTHON=str(fake)))
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
    text_digest = pipeline.text_digest
    blobs, linked, copied = tmp_path / "blobs", tmp_path / "linked", tmp_path / "copied"
    for d in (blobs, linked, copied):
        d.mkdir()
    for name, body in (("a.txt", "first document"), ("b.jsonl", json.dumps({"text": "second"}) + "\n")):
        (blobs / name).write_text(body)
        (linked / name).symlink_to(blobs / name)
        (copied / name).write_text(body)
    (copied / "notes.md").write_text("not read by stage b")
    assert text_digest(str(linked), "--text") == text_digest(str(copied), "--text")
    (tmp_path / "a.txt").symlink_to(blobs / "a.txt")
    assert text_digest(str(tmp_path / "a.txt"), "--text") == text_digest(str(copied / "a.txt"), "--text")
    before = text_digest(str(linked), "--text"), text_digest(str(tmp_path / "a.txt"), "--text")
    (blobs / "a.txt").write_text("first document, edited")
    after = text_digest(str(linked), "--text"), text_digest(str(tmp_path / "a.txt"), "--text")
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


# --- the stage table against the shell driver's -------------------------------------------------------------------
# .pipeline/ of the demo's two runs (`make demo`, in a checkout at @ROOT@) by the shell driver the table replaced
RUNS = REPO_ROOT / "tests" / "data" / "pipeline_runs"
DEMO = {"prompt": ([], "test_1_tinybard"),
        "corpus": (["--text", str(REPO_ROOT / "parcellation_datasets" / "heldout_corpus_tinybard.txt")],
                   "heldout_corpus_tinybard_tinybard")}


class Stages:
    """Stands in for the stage scripts (pipeline.run's `start`): records each command, and writes only what the
    driver reads back, stage a's number of neurons and stage d's subsets (`subsets`, empty files)."""

    def __init__(self, data: Path, subsets=()):
        self.data, self.subsets, self.ran = data, subsets, []

    def __call__(self, command, lock_fd) -> int:
        self.ran.append(command.words)
        if command.argv[0] == "a_generate_gelu_graph.py":
            (self.data / f"{M}_graph_meta.json").write_text(json.dumps({"num_neurons": 3072}))  # tinybard's
        if command.argv[:3] == ["-m", "gelutrace.pipeline", "sweep"]:
            (self.data / layout.SUBSETS_DIR).mkdir()
            for name in self.subsets:
                (self.data / layout.SUBSETS_DIR / name).touch()
        return 0


def stage_lines(out: str) -> dict[str, bool]:
    """The driver's stages by its `== STAGE` lines: whether each was up to date."""
    return {ln.split()[1].rstrip(":"): ln.endswith(")") for ln in out.splitlines()
            if ln.startswith("== ") and "done in" not in ln}


def complete(argv):
    """Every stage's output, as a run leaves them (the stand-in stages write none)."""
    for stage in pipeline.stages(pipeline.settings(argv)):
        p = Path(stage.output or ".")
        if p.suffix:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        else:
            p.mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("mode", DEMO)
def test_the_stage_table_gives_the_shell_drivers_commands_and_stamps(tmp_path, capsys, mode):
    """The demo's runs planned by the driver, with stand-in stages: the same STAGE.run and STAGE.cmd files as the
    shell driver's, byte for byte (tests/data/pipeline_runs, but for stage d: in prompt mode it now also hands
    the sweep the prompt CSV, INPUT_CSV, whose halves it records; in both modes the default methods now include
    the graph-free baselines direct_loss and magnitude, and it also ranks without layer 0, EXCLUDE_LAYERS, so that
    stage e also measures those subsets, ..._x0_k{k}.npy; with real text, stage e now also runs the mean-ablation
    check, --mean_ablation_top 2, and leaves out the own-continuation metric, --own_continuation 0; and it traces
    the first 3 evaluation prompts after the cards, a stage the shell driver did not have, and the cards stage
    also writes the causal graph's page, --causal_graph 50); and a directory with these stamps is up to date."""
    flags, name = DEMO[mode]
    data = tmp_path / name
    assert pipeline.settings([*flags, M, CSV]).data == f"{REPO_ROOT}/parcellation_datasets/{name}"  # the demo's

    def here(text):  # the demo's paths as this run's: its dataset directory, then this checkout
        return text.replace(f"@ROOT@/parcellation_datasets/{name}", str(data)).replace("@ROOT@", str(REPO_ROOT))

    reference = {p.name: here(p.read_text()) for p in (RUNS / mode).iterdir()}
    stages = Stages(data, reference["e.run"].split(" none ")[1].split())
    argv = [*flags, M, CSV, str(data)]
    pipeline.run(argv, stages)
    stamps = data / layout.PIPELINE_STAMPS
    assert {p.name: p.read_text() for p in stamps.iterdir()} == reference
    assert stages.ran[-1][:4] == ["python", "-m", "gelutrace.report", str(data)]  # then the report, unlisted
    assert not any(stage_lines(capsys.readouterr().out).values())
    # the shell driver's stamps, and every output: nothing runs again but the report
    for p in stamps.iterdir():
        p.write_text(reference[p.name])
    complete(argv)
    stages.ran.clear()
    pipeline.run(argv, stages)
    up = stage_lines(capsys.readouterr().out)
    assert all(up.values()) and len(up) == len([p for p in reference if p.endswith(".cmd")])
    assert [w[2] for w in stages.ran] == ["gelutrace.report"]


STAGES = ["a", "b", "effects", "c", "fidelity", "c_analyze", "modules", "d", "e", "cards", "trace"]
# a change -> the stages that rerun: those whose stamp holds the setting (or an input's digest), and every later one
RERUNS = [([], []), (["--random_controls", "5"], STAGES[8:]), (["--control_subsets", "all"], STAGES[8:]),
          (["--eval_tokens", "100"], STAGES[8:]), (["--module_controls", "3"], STAGES[8:]),
          ("evaluation CSV", STAGES[8:]), (["--thresholds", "0.3"], STAGES[7:]), (["--ks", "3 5"], STAGES[7:]),
          (["--methods", "degree random"], STAGES[7:]), (["--modules_top", "2"], STAGES[7:]),
          (["--weights", "count"], STAGES[7:]), (["--exclude_layers", "none"], STAGES[7:]),
          (["--exclude_layers", "0 5"], STAGES[7:]), (["--fidelity_tokens", "100"], STAGES[4:]),
          (["--seed", "7"], STAGES[1:]), (["--temperature", "0.5"], STAGES[1:]), (["--device", "cpu"], STAGES[1:]),
          ("prompt CSV", STAGES[1:]), (["--force"], STAGES)]


def test_a_change_reruns_the_stages_that_depend_on_it_and_every_later_one(tmp_path, capsys):
    csv, held, data = tmp_path / "prompts.csv", tmp_path / "heldout.csv", tmp_path / "run"
    csv.write_text(Path(CSV).read_text())
    held.write_text((REPO_ROOT / "parcellation_datasets" / "heldout_tinybard.csv").read_text())
    base = ["--eval_csv", str(held), M, str(csv), str(data)]
    stages = Stages(data)
    for change, rerun in RERUNS:
        pipeline.run(base, stages)  # from the same settings each time
        complete(base)
        capsys.readouterr()
        stages.ran.clear()
        edited = csv if change == "prompt CSV" else held if change == "evaluation CSV" else None
        if edited:
            edited.write_text(edited.read_text() + "\n")  # a blank line at the end: the same prompts
        argv = base if edited else [*change, *base]
        pipeline.run(argv, stages)
        complete(argv)
        ran = [s for s, up in stage_lines(capsys.readouterr().out).items() if not up]
        assert ran == rerun, change
        assert stages.ran[-1][2] == "gelutrace.report"  # the report every time
        if edited:
            edited.write_text(edited.read_text()[:-1])


def test_the_demo_ranks_without_layer_0_and_a_layer_the_model_lacks_is_refused_before_any_stage(tmp_path, capsys):
    """The demo's stage d: the sweep is handed --exclude_layers 0 (and nothing of it with none); a layer the model
    does not have (tinybard: 0..5), or every layer, is one error before any stage, nothing created."""
    data = tmp_path / "run"
    stages = Stages(data)
    pipeline.run([M, CSV, str(data)], stages)
    sweep = next(w for w in stages.ran if "./d_batch_perturbation_calculate.sh" in w)
    assert "EXCLUDE_LAYERS=0" in sweep
    planned = next(s for s in pipeline.stages(pipeline.settings([M, CSV, str(data)])) if s.name == "d")
    assert planned.commands[0].argv[planned.commands[0].argv.index("--exclude_layers") + 1] == "0"
    off = next(s for s in pipeline.stages(pipeline.settings(["--exclude_layers", "none", M, CSV, str(data)]))
               if s.name == "d")
    assert "--exclude_layers" not in off.commands[0].argv and not any("EXCLUDE" in w for w in off.commands[0].words)
    for layers in ("6", "0 1 2 3 4 5"):
        stages = Stages(tmp_path / layers.replace(" ", ""))
        with pytest.raises(PipelineError, match="--exclude_layers .*layers 0..5"):
            pipeline.run(["--exclude_layers", layers, M, CSV, str(stages.data)], stages)
        assert not stages.ran and not stages.data.exists()


def test_the_stamps_quote_as_bash_printf_q():
    words = ["", "plain", "a b", "KS=3 11", "0.1%", "~x", "a=~b", "x:~", "a~", "#a", "a#b", "a,b", "a'b", 'a"b',
             "a\\b", "a$b!", "*?[]{}()|&;<>`^", "+-.:@_/", "a\tb", "a\nb", "é", "\x01", "\x1b\x7f'"]
    r = subprocess.run(["bash", "-c", 'for w; do printf "%q\\n" "$w"; done', "-", *words], capture_output=True,
                       text=True, env=dict(ENV, LC_ALL="C.UTF-8"), check=True)
    assert r.stdout.splitlines() == [pipeline.shell_quote(w) for w in words]


# --- the stage-d sweep: one process, the graph read once ------------------------------------------------------------
BATCH = str(REPO_ROOT / "d_batch_perturbation_calculate.sh")
D = str(REPO_ROOT / "d_calculate_perturbation_subset.py")


def files(d: Path) -> dict:
    """Every file under d (the subsets, and stage d's scores/ beside them) and its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_the_sweep_writes_the_subsets_of_one_process_per_method_byte_for_byte(tmp_path):
    d = make_dataset(tmp_path / "toy", random_activations(3, 10, 300, seed=11), 3, 10)
    for script, flag, path in (("c_calculate_weighted_activation_graph.py", "--input_dir", d),
                               ("c_analyze_weighted_activation_graph.py", "--input_path", d / "toy_weighted_graph")):
        assert run_python([sys.executable, str(REPO_ROOT / script), flag, str(path)], env=ENV).returncode == 0
    graph = str(d / layout.ANALYSIS_DIR / "toy_weighted_graph_analyzed.json")
    # the reference: the shell sweep's loop, one stage-d process per method, weight and threshold
    for method in ("degree", "pagerank", "random", "activation_count"):
        for weight in ("count", "jaccard"):
            for t in ("0.3", "0.5") if method in ("degree", "pagerank") else [None]:
                r = run_python([sys.executable, D, "--input_graph_path", graph, *(["--threshold", t] if t else []),
                                "--k", "3", "6", "--method", method, "--weight", weight, "--seed", "1337",
                                "--output_dir", str(tmp_path / "reference"), "--skip_existing"], env=ENV)
                assert r.returncode == 0, r.stderr
    r = run_python([BATCH, "--thresholds", "0.3 0.5", "--ks", "3 6", "--methods",
                    "degree pagerank random activation_count", "--weights", "count jaccard", graph,
                    str(tmp_path / "sweep")], env=ENV)
    assert r.returncode == 0, r.stderr
    written = files(tmp_path / "sweep")
    subsets = [name for name in written if "/" not in name]
    assert len(subsets) == 2 * (2 * 2 * 2 * 2 + 2 * 2) and written == files(tmp_path / "reference")
    summary = r.stdout[r.stdout.index("summary"):]
    assert summary.count(" written ") == len(subsets) // 2  # each subset listed once
    # a method that fails (no measured effects) is one line, the others written; exit status 1
    r = run_python([BATCH, "--thresholds", "0.5", "--ks", "3", "--methods", "degree ablation", graph,
                    str(tmp_path / "failing")], env=ENV)
    assert r.returncode == 1 and r.stderr == "error: 1 of 2 subsets failed\n", r.stderr
    assert "[ablation count t=-] error: " in r.stdout and "toy_degree_t0.5_k3.npy written" in r.stdout


def test_gelutrace_run_is_the_driver(capsys):
    from gelutrace import commands

    assert commands.main(["run", "--help"]) == 0 and capsys.readouterr().out == pipeline.RUN_HELP
    with pytest.raises(SystemExit) as e:
        commands.main(["run", "--ks", "3", "--ratios", "0.1"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: give --ks or --ratios, not both\n"
