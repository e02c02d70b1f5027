"""Hostile inputs: each must give one `error:` line and exit status 2, run no foreign code, and write nothing."""

import html
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from gelutrace import PipelineError
from gelutrace.files import atomic, formats, layout
from gelutrace.graph import coactivation as gr
from gelutrace.graph import store as gs
from gelutrace.model.loading import load_model

from conftest import REPO_ROOT, directory_digest, fill_disk_at, run_python


def script(name, *args, cwd=None):
    return run_python([sys.executable, str(REPO_ROOT / name), *map(str, args)], capture_output=True, text=True,
                      cwd=cwd or REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg"))


def one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]


class Pwn:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("argv", [
    ("c_analyze_weighted_activation_graph.py", "--input_path", "{evil}"),
    ("d_calculate_perturbation_subset.py", "--input_graph_path", "{evil}", "--threshold", "0.5", "--ratio", "0.1",
     "--output_path", "{out}"),
])
def test_malicious_gpickle_runs_no_code(tmp_path, argv):
    evil = tmp_path / "evil.gpickle"
    marker = tmp_path / "PWNED"
    evil.write_bytes(pickle.dumps(Pwn(marker)))
    with pytest.raises(PipelineError, match="refusing posix.system|refusing os.system"):
        gs.load_gpickle(evil)
    args = [a.format(evil=evil, out=tmp_path / "s.npy") for a in argv[1:]]
    one_error_line(script(argv[0], *args, cwd=tmp_path))
    assert not marker.exists()
    assert not (tmp_path / "s.npy").exists()


def test_malicious_gpickle_in_batch_script(tmp_path):
    evil = tmp_path / "evil.gpickle"
    marker = tmp_path / "PWNED"
    evil.write_bytes(pickle.dumps(Pwn(marker)))
    r = subprocess.run([str(REPO_ROOT / "d_batch_perturbation_calculate.sh"), "--thresholds", "0.5", "--ratios", "0.1",
                        str(evil), str(tmp_path / "out")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode != 0 and not marker.exists()


@pytest.mark.parametrize("flags", [["--ratios", ""], ["--methods"], ["--thresholds", "", "g.json"]])
def test_batch_script_flag_without_a_value_is_one_error_line(tmp_path, flags):
    r = run_python([str(REPO_ROOT / "d_batch_perturbation_calculate.sh"), *flags], cwd=tmp_path,
                   env=dict(os.environ, PYTHON=sys.executable))  # its command in this process (above: the script's)
    assert r.returncode == 2 and r.stderr == f"error: {flags[0]} needs a value (see --help)\n"
    assert not list(tmp_path.iterdir())


def test_damaged_and_foreign_gpickles(tmp_path):
    g = nx.Graph(model="toy", num_samples=3)
    g.add_node(0, layer=0, dimension=0, activation_count=np.int64(2))
    g.add_node(1, layer=1, dimension=0, activation_count=1)
    g.add_edge(0, 1, co_activation_count=np.int64(1))
    _ = g.nodes, g.edges, g.adj, g.degree  # views networkx caches inside the graph, and pickles with it
    for proto in (0, 2, pickle.HIGHEST_PROTOCOL):  # a graph as the original or stage c wrote it still loads
        (tmp_path / f"ok{proto}.gpickle").write_bytes(pickle.dumps(g, protocol=proto))
        back = gs.load_gpickle(tmp_path / f"ok{proto}.gpickle")
        assert back.nodes[0]["activation_count"] == 2 and back.edges[0, 1]["co_activation_count"] == 1
    good = pickle.dumps(g)
    (tmp_path / "cut.gpickle").write_bytes(good[: len(good) // 2])
    (tmp_path / "set.gpickle").write_bytes(pickle.dumps({1, 2}))
    (tmp_path / "other.gpickle").write_bytes(pickle.dumps(nx.DiGraph()))
    for name in ("cut", "set", "other"):
        with pytest.raises(PipelineError):
            gs.load_gpickle(tmp_path / f"{name}.gpickle")


def test_prompt_row_with_extra_fields_is_refused(tmp_path):
    from gelutrace.files import formats
    p = tmp_path / "p.csv"
    p.write_text('prompts,number_of_new_tokens\n"The king said ",5,2\n')
    with pytest.raises(PipelineError, match="line 2: 3 fields, but the header has 2"):
        formats.read_prompts(p)
    p.write_text('prompts,number_of_new_tokens,num_samples\n"a, b",3,1\n"multi\nline",2\nc,1,1\n')
    with pytest.raises(PipelineError, match="line 4: 2 fields"):  # the quoted newline spans lines 3-4
        formats.read_prompts(p)
    p.write_text('prompts,number_of_new_tokens,num_samples\n"a, b",3,1\n\n"multi\nline",2,1\n')
    assert [(q.text, q.new_tokens) for q in formats.read_prompts(p)] == [("a, b", 3), ("multi\nline", 2)]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory, shipped_path):
    """A stage b run of the shipped model on two prompts, with one subset."""
    from test_recording import run, write_prompts
    d = tmp_path_factory.mktemp("hard")
    csv = write_prompts(d / "p.csv", [("ROMEO. ", 3, 1), ("And God said, ", 2, 1)])
    run("b_generate_activation_dataset.py", "--model_type", "tinybard", "--input_csv", csv, "--export_dir", d / "b",
        "--device", "cpu", "--no_edge_list", "--no_activation_lists", "--no_attribution")
    (d / "b" / "perturbation_subsets").mkdir()
    np.save(d / "b" / "perturbation_subsets" / "s.npy", np.array([1, 2, 3]))
    return d, csv


@pytest.mark.parametrize("case", ["temperature_nan", "seed_negative", "zero_tokens", "huge_samples", "export_is_file"])
def test_stage_b_bad_values(tiny_dataset, tmp_path, case):
    d, csv = tiny_dataset
    args = ["--model_type", "tinybard", "--input_csv", csv, "--export_dir", tmp_path / "out", "--device", "cpu"]
    if case == "temperature_nan":
        args += ["--temperature", "nan"]
    elif case == "seed_negative":
        args += ["--seed", "-1", "--temperature", "0.8"]
    elif case in ("zero_tokens", "huge_samples"):
        bad = tmp_path / "bad.csv"
        bad.write_text("prompts,number_of_new_tokens,num_samples\n" +
                       ("a ,0,1\nb ,0,2\n" if case == "zero_tokens" else "a ,2,1000000000\n"))
        args[3] = bad
    else:
        (tmp_path / "out").write_text("a file")
    one_error_line(script("b_generate_activation_dataset.py", *args))


def test_output_locations_checked_before_work(tiny_dataset, tmp_path):
    d, csv = tiny_dataset
    b = d / "b"
    (tmp_path / "file").write_text("x")
    # e: the results directory is a file; nothing is generated
    results = b / "perturbation_results"
    results.write_text("in the way")
    try:
        one_error_line(script("e_generate_perturbed_results.py", "--dataset_path", b, "--input_csv", csv,
                              "--model_type", "tinybard", "--device", "cpu", "--perturbation_subset_filenames", "s.npy"))
    finally:
        results.unlink()
    one_error_line(script("c_calculate_weighted_activation_graph.py", "--input_dir", b, "--output_path",
                          tmp_path / "file" / "store"))
    one_error_line(script("c_calculate_weighted_activation_graph.py", "--input_dir", b, "--memory_limit_gb", "nan"))
    one_error_line(script("a_generate_gelu_graph.py", "--model_type", "tinybard", "--output_dir", tmp_path / "file"))
    one_error_line(script("b_trace_gelu_activations.py", "--model_type", "tinybard", "--input_text", "To be",
                          "--output_dir", tmp_path / "file"))


# --- resume state and the writer lock -------------------------------------------------------------------

@pytest.mark.parametrize("point,temperature", [("chunk", "0"), ("state", "0.8")])
def test_kill_during_a_staging_write_then_resume(tmp_path, shipped_path, monkeypatch, point, temperature):
    """A kill inside the chunk write or the state.json write (a torn temporary left behind): --resume still gives
    the uninterrupted run's files, greedy and sampling."""
    import json
    import runpy

    from test_recording import run, write_prompts

    from gelutrace.record import prompts as recording

    csv = write_prompts(tmp_path / "p.csv")
    common = ["--input_csv", str(csv), "--model_type", "tinybard", "--device", "cpu", "--batch_size", "1",
              "--no_edge_list", "--temperature", temperature, "--no_attribution"]
    run("b_generate_activation_dataset.py", *common, "--export_dir", tmp_path / "full", OMP_NUM_THREADS="1")

    name = "write_npz" if point == "chunk" else "write_json"
    real = getattr(recording, name)
    calls = {"n": 0}

    def killed(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # a torn temporary beside the target, as kill -9 inside atomic_path leaves
            target = next(x for x in a if isinstance(x, os.PathLike))
            (target.parent / f".{target.name}.x1y2.tmp").write_bytes(b"PK\x03\x04 torn")
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(recording, name, killed)
    script = str(REPO_ROOT / "b_generate_activation_dataset.py")
    monkeypatch.setattr(sys, "argv", [script, *common, "--export_dir", str(tmp_path / "part")])
    with pytest.raises(SystemExit):
        runpy.run_path(script, run_name="__main__")
    staged = tmp_path / "part" / ".tinybard_partial"
    assert json.loads((staged / "state.json").read_text())["chunks"]  # some work was kept
    monkeypatch.setattr(recording, name, real)
    run("b_generate_activation_dataset.py", *common, "--export_dir", tmp_path / "part", "--resume", OMP_NUM_THREADS="1")
    for f in (layout.DATASET, layout.MATRIX, layout.FREQUENCY, layout.TOP_EXAMPLES):
        assert layout.path(tmp_path / "part", f, "tinybard").read_bytes() == layout.path(tmp_path / "full", f, "tinybard").read_bytes()


def test_resume_refuses_chunks_of_another_run_and_damaged_state(tmp_path):
    from gelutrace.record import prompts as recording

    chunk = recording.Chunk(*(np.zeros(2, np.int64) for _ in range(4)), np.zeros((2, 1), np.uint8), np.zeros(8),
                            np.zeros((0, 8)), np.zeros((0, 8), np.int64))
    a = recording.Staging(tmp_path, "m", "run-a")
    a.start(resume=False)
    a.add(chunk, 0, 1)
    b = recording.Staging(tmp_path, "m", "run-b")  # the other run's chunk written under run a's state
    b.dir, b.hashes = a.dir, dict(a.hashes)
    b.add(chunk, 1, 2)
    state = a.dir / "state.json"
    import json

    def write_state(chunks, done):  # with a manifest that vouches for the files as they are
        state.write_text(json.dumps({"fingerprint": "run-a", "chunks": chunks, "samples_done": done,
                                     "files": {c: atomic.file_sha256(a.dir / c) for c in chunks}}))
    write_state(["chunk_00000.npz", "chunk_00001.npz"], 2)
    with pytest.raises(PipelineError, match="belongs to another run"):
        recording.Staging(tmp_path, "m", "run-a").start(resume=True)
    state.write_text('{"fingerprint": "run-a", "chunks": ')
    with pytest.raises(PipelineError, match="damaged"):
        recording.Staging(tmp_path, "m", "run-a").start(resume=True)
    (a.dir / "chunk_00000.npz").write_bytes(b"not a zip")
    write_state(["chunk_00000.npz"], 1)
    with pytest.raises(PipelineError, match="damaged"):
        recording.Staging(tmp_path, "m", "run-a").start(resume=True)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tiny_dataset, tmp_path):
    import fcntl

    d, csv = tiny_dataset
    out = tmp_path / "out"
    out.mkdir()
    with open(out / layout.LOCK_FILE, "a") as held:  # another process writing into `out`
        fcntl.flock(held, fcntl.LOCK_EX)
        r = script("b_generate_activation_dataset.py", "--model_type", "tinybard", "--input_csv", csv,
                   "--export_dir", out, "--device", "cpu")
        one_error_line(r)
        assert "another run is writing into" in r.stderr
        assert sorted(p.name for p in out.iterdir()) == [layout.LOCK_FILE]
        with open(d / "b" / layout.LOCK_FILE, "a") as held_b:
            fcntl.flock(held_b, fcntl.LOCK_EX)
            one_error_line(script("e_generate_perturbed_results.py", "--dataset_path", d / "b", "--input_csv", csv,
                                  "--model_type", "tinybard", "--device", "cpu",
                                  "--perturbation_subset_filenames", "s.npy"))
            one_error_line(script("c_calculate_weighted_activation_graph.py", "--input_dir", d / "b"))
    # released: the same run now goes through (a crashed holder's lock goes with its process)
    r = script("b_generate_activation_dataset.py", "--model_type", "tinybard", "--input_csv", csv, "--export_dir", out,
               "--device", "cpu", "--no_edge_list", "--no_activation_lists", "--no_attribution")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("damage", ["broken_json", "no_vocab_size", "string_layers", "truncated_weights"])
def test_damaged_checkpoint_is_one_error_line(tmp_path, random_ckpt, damage):
    import json
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(random_ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    if damage == "broken_json":
        (ck / "config.json").write_text(json.dumps(cfg)[:-10])
    elif damage == "no_vocab_size":
        del cfg["vocab_size"]
        (ck / "config.json").write_text(json.dumps(cfg))
    elif damage == "string_layers":
        cfg["n_layer"] = "3"
        (ck / "config.json").write_text(json.dumps(cfg))
    else:
        w = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(w[: len(w) // 2])
    r = script("b_trace_gelu_activations.py", "--model_type", ck, "--input_text", "To be", "--output_dir",
               tmp_path / "out", "--device", "cpu")
    one_error_line(r)
    if damage != "truncated_weights":  # stage a reads only the config
        one_error_line(script("a_generate_gelu_graph.py", "--model_type", ck, "--output_dir", tmp_path / "a"))


@pytest.mark.parametrize("name,content,message", [
    ("../s.npy", None, "without a directory"),
    ("/etc/passwd", None, "without a directory"),
    ("empty.npy", np.zeros(0, np.int64), "holds no neurons"),
    ("dup.npy", np.array([5, 7, 5]), "more than once"),
    ("other.npy", np.array([1, 2]), "made for model 'gpt2'"),
])
def test_stage_e_subset_rules(tiny_dataset, name, content, message):
    import json
    d, csv = tiny_dataset
    subsets = d / "b" / "perturbation_subsets"
    if content is not None:
        np.save(subsets / name, content)
    if name == "other.npy":
        (subsets / "other.json").write_text(json.dumps({"model": "gpt2", "method": "degree"}))
    if name == "../s.npy":
        np.save(d / "b" / "s.npy", np.array([1]))
    r = script("e_generate_perturbed_results.py", "--dataset_path", d / "b", "--input_csv", csv, "--model_type",
               "tinybard", "--device", "cpu", "--perturbation_subset_filenames", name)
    one_error_line(r)
    assert message in r.stderr


@pytest.mark.parametrize("side,extra,message", [
    ({"method": "degree", "zero_score_picks": "many"}, (), "zero_score_picks is 'many'"),
    ({"method": ["degree"]}, (), "method is ['degree']"),
    ({"method": "degree", "tied_picks": -3}, (), "tied_picks is -3"),
    (None, ("--validation_share", "1.5"), "--validation_share must be in (0, 1)"),
    (None, ("--validation_share", "nan"), "--validation_share must be in (0, 1)"),
])
def test_stage_e_refuses_tampered_sidecars_and_bad_split(tiny_dataset, side, extra, message):
    import json
    d, csv = tiny_dataset
    subsets = d / "b" / "perturbation_subsets"
    np.save(subsets / "t.npy", np.array([1, 2]))
    if side is not None:
        (subsets / "t.json").write_text(json.dumps(side))
    r = script("e_generate_perturbed_results.py", "--dataset_path", d / "b", "--input_csv", csv, "--model_type",
               "tinybard", "--device", "cpu", "--perturbation_subset_filenames", "t.npy", *extra)
    one_error_line(r)
    assert message in r.stderr
    assert not (d / "b" / "perturbation_results" / "summary.csv").exists()


def test_match_layers_refuses_duplicates_too(tmp_path):
    from gelutrace.files import formats
    np.save(tmp_path / "dup.npy", np.array([3, 3]))
    with pytest.raises(PipelineError, match="more than once"):
        formats.read_subset(tmp_path / "dup.npy")


@pytest.mark.parametrize("greedy", [True, False])
def test_batch_size_bounds_every_batch(greedy):
    """200 repeats with --batch_size 8: no batch holds more than 8 rows; the samples come in CSV order."""
    from gelutrace.model.generation import Prompt, plan_batches, repeat_rows
    prompts = [Prompt("a", 3, 200), Prompt("b", 0, 2), Prompt("c", 2, 5), Prompt("d", 4, 1)]
    ids = [[1, 2], [3], [4, 5, 6], [7]]
    batches = plan_batches(prompts, ids, greedy, 8, 64)
    assert all(len(b.row_prompt) <= 8 for b in batches)
    samples = [(p, r) for b in batches for p, r, _ in repeat_rows(b, prompts, greedy)]
    assert samples == [(p, r) for p, q in enumerate(prompts) for r in range(q.num_samples)]
    rows = [x for b in batches for _, _, x in repeat_rows(b, prompts, greedy)]
    assert all(x == -1 for (p, _), x in zip(samples, rows) if p == 1)  # 0 new tokens: no row
    if greedy:  # one row per prompt, standing for all its repeats
        assert sum(len(b.row_prompt) for b in batches) == 3
    else:
        assert sum(len(b.row_prompt) for b in batches) == 206
        # resuming after the first 100 samples plans exactly the rest
        rest = [(p, r) for b in plan_batches(prompts, ids, greedy, 8, 64, start=100) for p, r in b.samples]
        assert rest == samples[100:]


# --- output sets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nth", [1, 4, 8, 10])
def test_full_disk_while_writing_keeps_the_earlier_set(tiny_dataset, tmp_path, monkeypatch, nth):
    """Stage b runs out of disk at its nth file write (the dataset CSV, the matrix, the lists, the graph files, the
    manifest itself): one error line that says so, every file of the earlier run byte-identical, and stage c
    still accepts the directory."""
    import runpy
    import shutil

    d, csv = tiny_dataset
    data = tmp_path / "b"
    shutil.copytree(d / "b", data)
    before = directory_digest(data)
    other = tmp_path / "other.csv"
    other.write_text("prompts,number_of_new_tokens,num_samples\nKING. ,4,1\n")
    calls = fill_disk_at(monkeypatch, nth)
    script_path = str(REPO_ROOT / "b_generate_activation_dataset.py")
    monkeypatch.setattr(sys, "argv", [script_path, "--model_type", "tinybard", "--input_csv", str(other),
                                      "--export_dir", str(data), "--device", "cpu", "--no_edge_list", "--no_attribution"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script_path, run_name="__main__")
    assert e.value.code == 2 and calls["n"] >= nth
    monkeypatch.undo()
    after = {k: v for k, v in directory_digest(data).items() if not k.startswith(".tinybard_partial")}  # for --resume
    assert after == before
    r = script("c_calculate_weighted_activation_graph.py", "--input_dir", data)
    assert r.returncode == 0, r.stderr


def test_full_disk_error_names_the_directory(tiny_dataset, tmp_path, monkeypatch, capsys):
    import runpy
    import shutil

    d, csv = tiny_dataset
    data = tmp_path / "b"
    shutil.copytree(d / "b", data)
    fill_disk_at(monkeypatch, 2)
    script_path = str(REPO_ROOT / "b_generate_activation_dataset.py")
    monkeypatch.setattr(sys, "argv", [script_path, "--model_type", "tinybard", "--input_csv", str(csv),
                                      "--export_dir", str(data), "--device", "cpu", "--no_edge_list", "--no_attribution"])
    with pytest.raises(SystemExit):
        runpy.run_path(script_path, run_name="__main__")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and f"no space left on {data} (disk full)" in lines[0], lines


def test_a_file_replaced_after_a_complete_run_is_refused(tiny_dataset, tmp_path):
    import shutil
    d, csv = tiny_dataset
    data = tmp_path / "b"
    shutil.copytree(d / "b", data)
    freq = data / "tinybard_neuron_frequency.csv"
    freq.write_text(freq.read_text() + "\n")
    r = script("c_calculate_weighted_activation_graph.py", "--input_dir", data)
    one_error_line(r)
    assert "changed or replaced" in r.stderr


def test_a_crash_among_the_renames_leaves_a_set_that_readers_refuse(tiny_dataset, tmp_path, monkeypatch):
    """Killed between the first and the last rename of the swap: the manifest says `writing` and stage c refuses;
    the next run cleans up and writes a complete set."""
    import runpy
    import shutil

    d, csv = tiny_dataset
    data = tmp_path / "b"
    shutil.copytree(d / "b", data)
    real, calls = os.replace, {"n": 0}

    def killed(a, b):
        calls["n"] += 1
        if calls["n"] == 3:  # the mark, one file, then kill -9
            raise KeyboardInterrupt
        return real(a, b)

    script_path = str(REPO_ROOT / "b_generate_activation_dataset.py")
    argv = [script_path, "--model_type", "tinybard", "--input_csv", str(csv), "--export_dir", str(data), "--device",
            "cpu", "--no_edge_list", "--no_attribution"]
    monkeypatch.setattr(sys, "argv", argv)
    real_swap = atomic.OutputSet._swap

    def swap(self):
        monkeypatch.setattr(os, "replace", killed)
        real_swap(self)

    monkeypatch.setattr(atomic.OutputSet, "_swap", swap)
    with pytest.raises(SystemExit):
        runpy.run_path(script_path, run_name="__main__")
    monkeypatch.undo()
    r = script("c_calculate_weighted_activation_graph.py", "--input_dir", data)
    one_error_line(r)
    assert "stopped while writing" in r.stderr
    r = script("b_generate_activation_dataset.py", *argv[1:])
    assert r.returncode == 0, r.stderr
    assert not [p for p in data.iterdir() if ".staging" in p.name]
    r = script("c_calculate_weighted_activation_graph.py", "--input_dir", data)
    assert r.returncode == 0, r.stderr


def test_report_refuses_results_of_an_interrupted_stage_e(tiny_dataset, tmp_path):
    import json
    import shutil

    d, csv = tiny_dataset
    data = tmp_path / "b"
    shutil.copytree(d / "b", data)
    r = script("e_generate_perturbed_results.py", "--dataset_path", data, "--input_csv", csv, "--model_type", "tinybard",
               "--device", "cpu", "--perturbation_subset_filenames", "s.npy", "none")
    assert r.returncode == 0, r.stderr
    manifest = data / layout.RESULTS_DIR / layout.RESULTS_MANIFEST
    rec = json.loads(manifest.read_text())
    assert rec["state"] == "complete" and {"summary.csv", "s.csv", "none.csv", "summary.png"} <= set(rec["files"])
    from gelutrace.report import report
    report.collect(data)  # a complete set reads
    manifest.write_text(json.dumps({"state": "writing", "run": "x"}))  # as a crash in the write phase leaves it
    with pytest.raises(PipelineError, match="stopped while writing"):
        report.collect(data)



def test_report_of_a_file_or_nothing_is_one_error_line(tmp_path, capsys):
    from gelutrace.cli import run_main
    from gelutrace.report import __main__ as report_main

    (tmp_path / "f").write_text("x")
    r = subprocess.run([sys.executable, "-m", "gelutrace.report", str(tmp_path / "f")], capture_output=True, text=True,
                       cwd=REPO_ROOT)  # the module's own process
    assert r.returncode == 2 and r.stderr == f"error: dataset directory {tmp_path / 'f'} is not a directory\n"
    capsys.readouterr()
    assert run_main(report_main.main, [str(tmp_path / "none")], exit=False) == 2  # its main in this process
    assert capsys.readouterr().err == f"error: dataset directory {tmp_path / 'none'} does not exist\n"


@pytest.mark.parametrize("nth", [1, 3, 6])
def test_full_disk_in_stage_e_keeps_the_earlier_results(tiny_dataset, tmp_path, monkeypatch, nth):
    """Stage e runs out of disk at its nth file write (a per-sample CSV, a result CSV, the summary, a plot): one
    error line that says so, the earlier results byte-identical, and the report still accepts them."""
    import runpy
    import shutil

    from gelutrace.report import report
    d, csv = tiny_dataset
    data = tmp_path / "b"
    shutil.copytree(d / "b", data)
    argv = ["--dataset_path", str(data), "--input_csv", str(csv), "--model_type", "tinybard", "--device", "cpu",
            "--perturbation_subset_filenames", "s.npy", "none"]
    r = script("e_generate_perturbed_results.py", *argv)
    assert r.returncode == 0, r.stderr
    results = data / layout.RESULTS_DIR
    before = directory_digest(results)
    calls = fill_disk_at(monkeypatch, nth)
    script_path = str(REPO_ROOT / "e_generate_perturbed_results.py")
    monkeypatch.setattr(sys, "argv", [script_path, *argv, "--seed", "7"])  # other results, were they written
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script_path, run_name="__main__")
    assert e.value.code == 2 and calls["n"] >= nth
    monkeypatch.undo()
    atomic.release_locks()
    assert directory_digest(results) == before
    report.collect(data)


# --- boundaries a small fixture never crosses ------------------------------------------------------------

def test_activation_lists_with_neuron_ids_past_65535(tmp_path):
    """gpt2-medium and larger have ids >= 65,536: the pickle's 4-byte BININT path, against json and numpy."""
    import json

    from gelutrace.files import formats
    n = 70_000
    rng = np.random.default_rng(0)
    active = np.zeros((5, n), bool)
    for row in active:
        row[rng.choice(n, 40, replace=False)] = True
    active[0, [0, 255, 256, 65535, 65536, n - 1]] = True  # each opcode's edges
    formats.write_activation_lists(tmp_path, "big", np.packbits(active, axis=1), n, block=2)
    with open(layout.path(tmp_path, layout.ACTIVATIONS_PICKLE, "big"), "rb") as f:
        lists = pickle.load(f)  # a file this test just wrote
    ref = {str(i): np.flatnonzero(r).tolist() for i, r in enumerate(active)}
    assert lists == ref
    assert json.loads(layout.path(tmp_path, layout.ACTIVATIONS_JSON, "big").read_text()) == ref


# --- the graph store -------------------------------------------------------------------------------------

@pytest.fixture()
def store_dir(tmp_path):
    from graphdata import make_dataset, random_activations
    d = tmp_path / "ds"
    make_dataset(d, random_activations(3, 6, 300, seed=2), 3, 6)
    r = script("c_calculate_weighted_activation_graph.py", "--input_dir", d)
    assert r.returncode == 0, r.stderr
    return d, d / "toy_weighted_graph"


def test_a_versioned_output_replaces_a_link_to_elsewhere_and_leaves_what_it_points_to(tmp_path):
    elsewhere = tmp_path / "important"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    target = tmp_path / "out" / "set"
    target.parent.mkdir()
    target.symlink_to(elsewhere)
    with atomic.atomic_dir(target) as d:
        (d / "new.txt").write_text("y")
    assert (elsewhere / "keep.txt").read_text() == "x"  # not removed as if it were an earlier version
    assert (target / "new.txt").read_text() == "y" and atomic.own_version(target) is not None
    with atomic.atomic_dir(target) as d:  # its own earlier version is removed
        (d / "newer.txt").write_text("z")
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".set.v")] == [os.readlink(target)]
    atomic.remove_dir(target)
    assert not target.exists() and not target.is_symlink() and (elsewhere / "keep.txt").is_file()


def test_store_switch_is_atomic_and_leftovers_are_cleaned(store_dir, monkeypatch):
    """A crash at any point of the switch leaves a complete store under its name; the next run cleans up."""
    d, store = store_dir
    umask = os.umask(0)
    os.umask(umask)
    assert store.is_symlink() and (store.resolve().stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700
    before = gs.read_graph(store).header["uid"]
    real = os.replace

    def crashing(a, b):  # the switch is one rename of the link: kill -9 at it
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", crashing)
    data = gr.load_activation_data(d)
    with pytest.raises(KeyboardInterrupt):
        gs.write_store(store, data)
    monkeypatch.setattr(atomic.os, "replace", real)
    assert gs.read_graph(store).header["uid"] == before  # the old store, whole
    # a plain directory (an older version's store) cut between its two renames comes back on the next read
    plain = store.resolve()
    store.unlink()
    real(plain, d / ".toy_weighted_graph.legacy0")
    assert gs.read_graph(store).header["uid"] == before
    assert store.is_dir() and not store.is_symlink()
    r = script("c_calculate_weighted_activation_graph.py", "--input_dir", d)
    assert r.returncode == 0, r.stderr
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(".toy_weighted_graph")]
    assert leftovers == [store.resolve().name]  # only the current version


@pytest.mark.parametrize("damage", ["max_raised", "blocks_cut", "float_pair", "negative_pair", "above_max",
                                    "string_value", "missing_key", "node_counts_float"])
def test_tampered_store_is_refused(store_dir, damage):
    import json
    d, store = store_dir
    header_path = store / "graph.json"
    h = json.loads(header_path.read_text())
    pair = store / "pair_000_001.npy"
    if damage == "max_raised":
        h["max_co_activation_count"] = 1000
    elif damage == "blocks_cut":
        h["blocks"] = h["blocks"][:1]
    elif damage == "float_pair":
        np.save(pair, np.load(pair).astype(np.float32))
    elif damage == "negative_pair":
        np.save(pair, np.load(pair).astype(np.int16) * -1)
    elif damage == "above_max":
        a = np.load(pair)
        a[0, 0] = h["max_co_activation_count"] + 1
        np.save(pair, a)
    elif damage == "string_value":
        h["num_samples"] = "300"
    elif damage == "missing_key":
        del h["d_mlp"]
    else:
        np.save(store / "node_activation_count.npy", np.load(store / "node_activation_count.npy").astype(float))
    header_path.write_text(json.dumps(h))
    with pytest.raises(PipelineError, match="damaged"):
        gs.read_graph(store)
    one_error_line(script("c_analyze_weighted_activation_graph.py", "--input_path", store))


@pytest.mark.parametrize("n_samples,dtype", [(300, "uint16"), (70_000, "uint32")])
def test_counts_past_255_and_65535_against_brute_force(tmp_path, n_samples, dtype):
    """Counts no uint8 (or uint16) counter could hold, through stage c, against numpy in int64."""
    from graphdata import make_dataset
    rng = np.random.default_rng(n_samples)
    active = rng.random((n_samples, 8)) < 0.6
    active[:, [0, 4]] = True  # always on: their pair count is n_samples
    d = make_dataset(tmp_path / "ds", active, 2, 4)
    r = script("c_calculate_weighted_activation_graph.py", "--input_dir", d)
    assert r.returncode == 0, r.stderr
    g = gs.read_graph(d / "toy_weighted_graph")
    pair = np.load(d / "toy_weighted_graph" / "pair_000_001.npy")
    assert pair.dtype == dtype and g.header["count_dtype"] == dtype
    a = active.astype(np.int64)
    np.testing.assert_array_equal(pair, a[:, :4].T @ a[:, 4:])
    np.testing.assert_array_equal(g.activation_count, a.sum(axis=0))
    assert pair[0, 0] == n_samples == g.max_co_activation


def test_d_and_c_analyze_output_locations(store_dir, tmp_path):
    d, store = store_dir
    (tmp_path / "file").write_text("x")
    (tmp_path / "adir.npy").mkdir()
    one_error_line(script("c_analyze_weighted_activation_graph.py", "--input_path", store, "--output_dir",
                          tmp_path / "file"))
    one_error_line(script("d_calculate_perturbation_subset.py", "--input_graph_path", store, "--threshold", "0.5",
                          "--ratio", "0.1", "--output_path", tmp_path / "adir.npy"))
    one_error_line(script("d_calculate_perturbation_subset.py", "--input_graph_path", store, "--threshold", "0.5",
                          "--ratio", "0.1", "--output_dir", tmp_path / "file"))


# --- issue 17: configs that do not match their weights, Markdown from corpus text, tracebacks, smaller items ---
def only_error_line(r):
    """Exit status 2 and stderr exactly one line, `error: ...`."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr[-2000:]
    return r.stderr


def ends_in_one_error_line(r):
    """Exit status 2, no traceback, and one `error: ...` line, the last (transformers may report before it)."""
    one_error_line(r)
    assert sum(ln.startswith("error: ") for ln in r.stderr.splitlines()) == 1, r.stderr[-2000:]
    return r.stderr.splitlines()[-1]


def tensor_names(message):
    return re.findall(r"[\w.]+\.(?:weight|bias)\b", message)


def stored_shapes(directory):
    """The tensors of a checkpoint's safetensors files and their shapes, from the files' headers."""
    from safetensors import safe_open
    shapes = {}
    for f in Path(directory).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return shapes


def edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    for k, v in changes.items():
        if v is DELETE:
            del cfg[k]
        else:
            cfg[k] = v
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


DELETE = object()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from test_families import build
    return build("llama", tmp_path_factory.mktemp("llama") / "tiny_llama")


@pytest.mark.parametrize("change,kind", [
    (dict(num_hidden_layers=DELETE), "missing"),  # transformers' default: 32 layers, 30 of them random
    (dict(num_hidden_layers=1), "unexpected"),  # layer 1 of the weights dropped
    (dict(intermediate_size=40), "mismatched"),
])
def test_llama_config_that_does_not_match_its_weights_is_refused(tiny_llama, tmp_path, change, kind):
    ck = edit_config(Path(shutil.copytree(tiny_llama, tmp_path / "ck")), **change)
    stored = stored_shapes(ck)
    with pytest.raises(PipelineError) as e:
        load_model(str(ck), device="cpu")
    names = tensor_names(str(e.value))
    assert names and "\n" not in str(e.value)
    if kind == "missing":
        assert not any(n in stored for n in names)
    elif kind == "unexpected":
        assert all(n in stored and n.startswith("model.layers.1.") for n in names)
    else:
        name = names[0]
        assert name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
        assert f"{name} has shape {stored[name]}" in str(e.value)
    if kind == "missing":  # through a script: transformers' load report, then the one error line
        line = ends_in_one_error_line(script("b_trace_gelu_activations.py", "--model_type", ck, "--input_text",
                                             "To be", "--output_dir", tmp_path / "out", "--device", "cpu"))
        assert tensor_names(line) and not (tmp_path / "out").exists()


def test_gpt2_config_with_fewer_layers_than_its_weights_is_refused(shipped_path, tmp_path):
    ck = edit_config(Path(shutil.copytree(shipped_path, tmp_path / "tb4")), n_layer=4)
    stored = stored_shapes(ck)
    line = only_error_line(script("b_trace_gelu_activations.py", "--model_type", ck, "--input_text", "To be",
                                  "--output_dir", tmp_path / "out", "--device", "cpu"))
    names = tensor_names(line)
    assert names and all(n in stored for n in names) and all(".h.4." in n or ".h.5." in n for n in names)


@pytest.mark.parametrize("change,kind", [(dict(n_layer=4), "missing"), (dict(n_inner=128), "mismatched"),
                                         (dict(n_layer=2), "unexpected")])
def test_gpt2_config_that_does_not_match_its_weights_is_refused(random_ckpt, tmp_path, change, kind):
    ck = edit_config(Path(shutil.copytree(random_ckpt, tmp_path / "ck")), **change)
    stored = {k.removeprefix("transformer."): v for k, v in stored_shapes(ck).items()}
    with pytest.raises(PipelineError) as e:
        load_model(str(ck), device="cpu")
    names = [n.removeprefix("transformer.") for n in tensor_names(str(e.value))]
    assert names
    if kind == "missing":
        assert all(n.startswith("h.3.") and n not in stored for n in names)
    elif kind == "unexpected":
        assert all(n.startswith("h.2.") and n in stored for n in names)
    else:
        assert names[0] in stored and f"has shape {stored[names[0]]}" in str(e.value)


def add_tensors(directory, extra):
    from safetensors.torch import load_file, save_file
    f = next(Path(directory).glob("*.safetensors"))
    sd = load_file(str(f))
    sd.update(extra(sd))
    save_file(sd, str(f), metadata={"format": "pt"})


def test_checkpoints_with_saved_buffers_and_tied_heads_still_load(random_ckpt, random_model, tiny_llama, tmp_path):
    import torch
    from test_families import build
    idx = torch.tensor([[1, 5, 9, 2]])
    # GPT-2 as the original checkpoints are: the causal-mask buffers saved, and the tied head saved too
    ck = Path(shutil.copytree(random_ckpt, tmp_path / "gpt2"))
    add_tensors(ck, lambda sd: {**{f"h.{i}.attn.bias": torch.ones(1, 1, 128, 128) for i in range(3)},
                                **{f"h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(3)},
                                "lm_head.weight": sd["transformer.wte.weight"].clone()})
    assert torch.equal(load_model(str(ck), device="cpu").model(idx)[0], random_model(idx)[0])
    add_tensors(ck, lambda sd: {"lm_head.weight": sd["lm_head.weight"] + 1})  # an untied head would be dropped
    with pytest.raises(PipelineError, match="lm_head.weight"):
        load_model(str(ck), device="cpu")
    # a Llama with the rotary frequencies saved per layer, a GPT-Neo with its attention masks saved
    llama = Path(shutil.copytree(tiny_llama, tmp_path / "llama"))
    add_tensors(llama, lambda sd: {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(2)})
    want = load_model(str(tiny_llama), device="cpu").model(idx)[0]
    assert torch.equal(load_model(str(llama), device="cpu").model(idx)[0], want)
    neo = build("gpt_neo", tmp_path / "neo")
    mask = torch.ones(1, 1, 128, 128, dtype=torch.bool)
    add_tensors(neo, lambda sd: {**{f"transformer.h.{i}.attn.attention.bias": mask.clone() for i in range(2)},
                                 **{f"transformer.h.{i}.attn.attention.masked_bias": torch.tensor(-1e9)
                                    for i in range(2)}})
    load_model(str(neo), device="cpu")


# Markdown from corpus text: nothing can open a tag, a comment, a cell or emphasis of its own
PAYLOADS = ["</td></tr></table><script>alert(4)</script>", "<img src=x onerror=alert(1)>", "<!--",
            "a|b *c* _d_ `e` [f](g) \\h #i &amp; ~j~ **k**"]
DANGEROUS = ("<script", "<img", "<!--", "</td>")


def md_unescape(s):
    """Markdown text back to its characters, without gelutrace: HTML entities, then backslash escapes."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", html.unescape(s))


def payload_cards():
    from gelutrace.report import cards
    examples = [cards.Example(1.5, 7 + i, [p, " and ", p[::-1]], np.zeros(3), p) for i, p in enumerate(PAYLOADS)]
    tokens = [cards.TokenEffect(i, p, 0.5) for i, p in enumerate(PAYLOADS)]
    return [cards.Card(5, 0, 5, 0.25, 0.1, np.nan, np.nan, examples, tokens, tokens[::-1])]


def test_markdown_escape_round_trips_and_opens_nothing():
    from gelutrace.report import markdown
    for p in PAYLOADS + ["\\", "\\|", "&lt;", "x" * 3 + "\\\\`"]:
        e = markdown.escape(p)
        assert not any(d in e for d in DANGEROUS) and md_unescape(e) == p


def test_cards_markdown_and_the_report_hold_no_raw_html(tmp_path):
    from gelutrace.report import cards, report
    name = "<img src=x onerror=alert(1)>"
    md = cards.cards_markdown(payload_cards(), name)
    assert not any(d in md for d in DANGEROUS)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| rank")]
    assert len(rows) == len(PAYLOADS)
    for row, p in zip(rows, PAYLOADS):
        cell = row.split(" | ", 3)[3].removesuffix(" |")  # an escaped | is never " | "
        assert md_unescape(cell.replace("**", "")) == p + " and " + p[::-1] + p
    promoted = next(ln for ln in md.splitlines() if ln.startswith("Promoted: "))
    assert md_unescape(promoted) == "Promoted: " + ", ".join(f'"{p}" (+0.5)' for p in PAYLOADS)
    (tmp_path / layout.CARDS_DIR).mkdir()
    cards.write_cards(tmp_path / layout.CARDS_DIR, payload_cards(), name)
    included = "\n".join(report.cards_section(tmp_path))
    assert "### Neuron 5" in included and not any(d in included for d in DANGEROUS)
    table = report.md_table(pd.DataFrame({"subset": PAYLOADS, "k": range(len(PAYLOADS))}))
    assert not any(d in table for d in DANGEROUS)
    cells = [ln.split(" | ")[0].removeprefix("| ") for ln in table.splitlines()[2:]]
    assert [md_unescape(c) for c in cells] == PAYLOADS
    sentence = report.evaluation_sentence({"eval_csv": f"/d/{name}.csv", "selection_csv": "/d/<!--.csv",
                                           "held_out": True, "selection_prompts": 2, "eval_prompts": 3})
    assert not any(d in sentence for d in DANGEROUS) and f"{name}.csv" in md_unescape(sentence)


def test_cards_markdown_renders_as_the_text_itself():
    """Rendered by an independent Markdown implementation (CommonMark with tables), then read back by html.parser."""
    markdown_it = pytest.importorskip("markdown_it")
    from html.parser import HTMLParser

    from gelutrace.report import cards

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.comments, self.cells, self.paragraphs, self.where = set(), [], [], [], None

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            if tag in ("td", "p"):
                self.where = [tag, ""]

        def handle_endtag(self, tag):
            if self.where and tag == self.where[0]:
                (self.cells if tag == "td" else self.paragraphs).append(self.where[1])
                self.where = None

        def handle_data(self, data):
            if self.where:
                self.where[1] += data

        def handle_comment(self, data):
            self.comments.append(data)

    page = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(
        cards.cards_markdown(payload_cards(), "m<script>"))
    cells = Cells()
    cells.feed(page)
    assert cells.tags <= {"h1", "h2", "p", "strong", "table", "thead", "tbody", "tr", "th", "td"}, cells.tags
    assert not cells.comments
    contexts = cells.cells[3::4]
    assert contexts == [p + " and " + p[::-1] + p for p in PAYLOADS]
    assert "Promoted: " + ", ".join(f'"{p}" (+0.5)' for p in PAYLOADS) in cells.paragraphs
    assert "Neuron cards of m<script>" in page.replace("&lt;", "<").replace("&gt;", ">")


# tracebacks that became one error line
@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory):
    from test_families import build
    return build("bloom", tmp_path_factory.mktemp("bloom") / "tiny_bloom")


@pytest.mark.parametrize("case", ["lone_surrogate", "huge_neuron_id", "empty_npy_cards", "empty_npy_effects",
                                  "negative_layers", "string_tp"])
def test_former_tracebacks_are_one_error_line(tiny_dataset, tiny_llama, tiny_bloom, tmp_path, case):
    d, csv = tiny_dataset
    ds = d / "b"
    np.save(tmp_path / "empty.npy", np.array([], np.int64))
    if case == "lone_surrogate":
        (tmp_path / "t.jsonl").write_text('{"text": "ROMEO."}\n{"text": "a\\ud800b"}\n')
        r = script("b_generate_activation_dataset.py", "--model_type", "tinybard", "--input_text", tmp_path / "t.jsonl",
                   "--export_dir", tmp_path / "out", "--device", "cpu")
        assert "line 2" in r.stderr
    elif case == "huge_neuron_id":
        r = script("f_render_neuron_cards.py", "--dataset_path", ds, "--model_type", "tinybard", "--neurons",
                   "99999999999999999999999", "--output", tmp_path / "out", "--device", "cpu")
    elif case == "empty_npy_cards":
        r = script("f_render_neuron_cards.py", "--dataset_path", ds, "--model_type", "tinybard", "--neurons",
                   tmp_path / "empty.npy", "--output", tmp_path / "out", "--device", "cpu")
    elif case == "empty_npy_effects":
        r = script("d_calculate_neuron_effects.py", "--dataset_path", ds, "--input_csv", csv, "--model_type",
                   "tinybard", "--neurons", tmp_path / "empty.npy", "--device", "cpu")
        assert not layout.path(ds, layout.NEURON_EFFECTS, "tinybard").exists()
    else:
        base, change = ((tiny_llama, dict(num_hidden_layers=-1)) if case == "negative_layers"
                        else (tiny_bloom, dict(pretraining_tp="2")))
        ck = edit_config(Path(shutil.copytree(base, tmp_path / "ck")), **change)
        key = next(iter(change))
        assert key in only_error_line(script("a_generate_gelu_graph.py", "--model_type", ck, "--output_dir",
                                             tmp_path / "a"))
        r = script("b_trace_gelu_activations.py", "--model_type", ck, "--input_text", "To be", "--output_dir",
                   tmp_path / "out", "--device", "cpu")
        assert key in r.stderr
    only_error_line(r)
    assert not (tmp_path / "out").exists()


# smaller items
@pytest.mark.parametrize("extra", [["--checkpoint_minutes", "nan"], ["--checkpoint_minutes", "inf"],
                                   ["--checkpoint_minutes", "-1"], ["--temperature", "0.8"], ["--temperature", "0"],
                                   ["--seed", "42"], ["--top_k", "5"]])
def test_corpus_mode_refuses_flags_it_would_ignore(tmp_path, extra):
    (tmp_path / "t.txt").write_text("ROMEO. And God said")
    err = only_error_line(script("b_generate_activation_dataset.py", "--model_type", "tinybard", "--input_text",
                                 tmp_path / "t.txt", "--export_dir", tmp_path / "out", "--device", "cpu", *extra))
    assert extra[0] in err and not (tmp_path / "out").exists()


def test_a_byte_order_mark_is_not_text(tmp_path, shipped):
    text = "ROMEO. And God said, let there be light"
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": text}).encode() + b"\n")
    for name in ("a.txt", "b.jsonl"):
        r = script("b_generate_activation_dataset.py", "--model_type", "tinybard", "--input_text", tmp_path / name,
                   "--export_dir", tmp_path / name.replace(".", "_"), "--device", "cpu", "--top_examples", "0")
        assert r.returncode == 0, r.stderr[-2000:]
        record = json.loads(layout.path(tmp_path / name.replace(".", "_"), layout.CORPUS, "tinybard").read_text())
        assert record["tokens"] == len(shipped.tokenizer(text)["input_ids"]) + 1  # the text and end-of-text


def test_a_symlink_loop_is_called_one(tmp_path):
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    loop = tmp_path / "loop_a"
    for argv in (["b_generate_activation_dataset.py", "--model_type", "tinybard", "--input_text", loop,
                  "--export_dir", tmp_path / "out"],
                 ["b_generate_activation_dataset.py", "--model_type", loop, "--input_csv", loop, "--export_dir",
                  tmp_path / "out"],
                 ["c_merge_activation_statistics.py", "--output_dir", tmp_path / "out", loop]):
        err = only_error_line(script(*argv))
        assert "symlink loop" in err and str(loop) in err and "does not exist" not in err


def test_errors_name_the_right_thing(tmp_path, random_ckpt, tiny_llama, tiny_dataset):
    from gelutrace.files.dataset import DatasetDir
    from gelutrace.model.sites import site_info
    ck = edit_config(Path(shutil.copytree(random_ckpt, tmp_path / "ck")), n_positions=DELETE, n_ctx=-5)
    with pytest.raises(PipelineError, match="n_ctx must be a positive integer, got -5"):
        load_model(str(ck), device="cpu")
    llama = Path(shutil.copytree(tiny_llama, tmp_path / "llama"))  # a checkpoint named after its architecture
    d, csv = tiny_dataset
    r = script("d_calculate_neuron_effects.py", "--dataset_path", d / "b", "--input_csv", csv, "--model_type", llama,
               "--device", "cpu")
    err = ends_in_one_error_line(r)
    # every family's effects run now: the refusal is the dataset's (another model's), named as such
    assert "llama is llama" not in err and "not a dataset of model 'llama'" in err
    formats.write_graph_files(tmp_path / "ds", "llama", 2, 48, write_el=False, site=site_info("gpt_neox"))
    with pytest.raises(PipelineError) as e:
        DatasetDir(tmp_path / "ds", "llama").check(2, 48, site_info("llama"))
    assert "'llama' is llama" not in str(e.value) and "architecture gpt_neox" in str(e.value)
