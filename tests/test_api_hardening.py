"""
The API's directory lock (released when a call returns, exclusive between calls of one process), a copied dataset
(read and written in place of the original), a full disk in the middle of a write (the disk-full line naming the
directory), negative seeds, the ranking flags of d --modules, c_find_modules' non-finite figures and a stage-c
.gpickle, dir(gelutrace), and the API's argument types.
"""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading

import igraph as ig
import networkx as nx
import numpy as np
import pandas as pd
import pytest

from gelutrace import PipelineError
from gelutrace.files import atomic, layout

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, assert_top_k, directory_digest, run_python

M = SHIPPED_NAME
B = "b_generate_activation_dataset.py"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
SMALL = ["--model_type", M, "--device", "cpu", "--context", 64, "--max_tokens", 1000]


def run(*args, ok=True):
    r = run_python([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, env=ENV)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def one_error_line(r, *words):
    """Exit status 2, no traceback, and the last stderr line an error naming every word."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(str(w) in last for w in words), last
    return last


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped_path):
    """A corpus-mode dataset with attribution and top examples, and c_find_modules' modules of it."""
    d = tmp_path_factory.mktemp("api") / "single"
    run(B, "--input_text", HELDOUT_PATH, "--export_dir", d, "--attribution", "--top_examples", 3, *SMALL)
    run("c_find_modules.py", "--input_path", layout.path(d, layout.WEIGHTED_GRAPH, M), "--null_graphs", 0, "--seeds", 1)
    return d


def lockable_by_another_process(directory) -> bool:
    code = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    r = subprocess.run([sys.executable, "-c", code, str(directory / layout.LOCK_FILE)], capture_output=True)
    return r.returncode == 0


# --- the API's lock ------------------------------------------------------------------------------------------
def test_record_corpus_releases_its_lock_and_refuses_a_call_holding_it(shipped, tmp_path, monkeypatch):
    import gelutrace as gt
    from gelutrace.record import corpus as cp

    d = tmp_path / "d"
    ds = gt.record_corpus(shipped, HELDOUT_PATH, out_dir=d, max_tokens=300, context=64, top_examples=2)
    assert layout.path(ds.path, layout.FREQUENCY, M).is_file()
    assert lockable_by_another_process(d)  # released when the call returned
    # another call of this process (a thread) in the middle of writing into d: this one is refused, cleanly
    writing, go = threading.Event(), threading.Event()
    real = cp.write_corpus_dataset

    def held(*a, **k):
        writing.set()
        assert go.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(cp, "write_corpus_dataset", held)
    results = {}

    def first():
        try:
            results["a"] = gt.record_corpus(shipped, HELDOUT_PATH, out_dir=d, max_tokens=200, context=64,
                                            top_examples=2)
        except BaseException as e:  # noqa: BLE001  (reported below)
            results["a"] = e

    t = threading.Thread(target=first)
    t.start()
    try:
        assert writing.wait(60)
        assert not lockable_by_another_process(d)
        with pytest.raises(PipelineError, match="another run is writing into") as e:
            gt.record_corpus(shipped, HELDOUT_PATH, out_dir=d, max_tokens=100, context=64, top_examples=2)
        assert "\n" not in str(e.value)
    finally:
        go.set()
        t.join(120)
    assert isinstance(results["a"], gt.Dataset), results["a"]
    assert strict_json(layout.path(d, layout.CORPUS, M).read_text())["tokens"] == 200  # the first call's corpus
    assert lockable_by_another_process(d)


def test_a_call_is_refused_while_another_thread_holds_the_lock(shipped, tmp_path):
    import gelutrace as gt

    d = tmp_path / "d"
    d.mkdir()
    entered, leave = threading.Event(), threading.Event()

    def hold():
        with atomic.locked(d, "a test"):
            entered.set()
            leave.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert entered.wait(60)
        with pytest.raises(PipelineError, match="another run is writing into"):
            gt.record_corpus(shipped, HELDOUT_PATH, out_dir=d, max_tokens=100, context=64, top_examples=2)
        assert sorted(os.listdir(d)) == [layout.LOCK_FILE]  # nothing written
    finally:
        leave.set()
        t.join(60)
    assert lockable_by_another_process(d)


def test_a_script_may_take_its_own_lock_again(tmp_path):
    d = tmp_path / "d"
    try:
        atomic.lock_directory(d, "a script")
        atomic.lock_directory(d, "the same script")  # re-entrant within the script
        with atomic.locked(d, "a library call the script makes"):
            pass
        assert not lockable_by_another_process(d)  # still the script's
    finally:
        atomic.release_locks()
    assert lockable_by_another_process(d)


# --- a copied dataset ------------------------------------------------------------------------------------------
def test_a_copied_dataset_reads_and_writes_itself(dataset, tmp_path):
    copy = tmp_path / "single_copy"
    shutil.copytree(dataset, copy, symlinks=True)  # cp -a
    before = directory_digest(dataset)
    r = run("c_find_modules.py", "--input_path", copy / f"{M}_weighted_graph", "--null_graphs", 0, "--seeds", 1)
    assert "note:" not in r.stderr
    assert directory_digest(dataset) == before  # the original untouched
    table = copy / layout.MODULES_DIR / layout.MODULES.format(m=M, weight="count")
    assert table.is_file()
    assert strict_json(table.with_suffix(".json").read_text())["graph"] == str(copy / f"{M}_weighted_graph")
    moved = tmp_path / "moved_away"
    os.rename(dataset, moved)  # the original gone
    try:
        out = tmp_path / "subsets"
        run("d_calculate_perturbation_subset.py", "--input_graph_path", copy / f"{M}_weighted_graph", "--method",
            "attribution", "--k", 7, "--output_dir", out)
        ids = np.load(out / f"{M}_attribution_k7.npy")
        freq = pd.read_csv(layout.path(copy, layout.FREQUENCY, M))
        assert_top_k(ids.tolist(), dict(zip(freq["neuron_id"], freq["attribution"])), 7)
    finally:
        os.rename(moved, dataset)


def test_a_store_outside_its_dataset_says_where_it_writes(dataset, tmp_path):
    elsewhere = tmp_path / "graphs"
    elsewhere.mkdir()
    store = layout.path(dataset, layout.WEIGHTED_GRAPH, M)
    shutil.copytree(store, elsewhere / store.name)  # the store alone: its dataset is the one it records
    r = run("c_find_modules.py", "--input_path", elsewhere / store.name, "--null_graphs", 0, "--seeds", 1,
            "--weight", "jaccard")
    assert f"note: writing into {dataset / layout.MODULES_DIR}" in r.stderr
    assert (dataset / layout.MODULES_DIR / layout.MODULES.format(m=M, weight="jaccard")).is_file()


# --- a full disk ---------------------------------------------------------------------------------------------
def disk_fills_after(monkeypatch, limit: int, under=None):
    """os.write into files (not stdin/out/err; with `under`, only files under that directory) fails with ENOSPC
    once `limit` bytes went into them."""
    real, written = os.write, {"n": 0}
    root = None if under is None else str(under) + os.sep

    def write(fd, data):
        if fd > 2 and (root is None or os.readlink(f"/proc/self/fd/{fd}").startswith(root)):
            if written["n"] + len(data) > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written["n"] += len(data)
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_full_disk_mid_write_names_the_directory(dataset, tmp_path, monkeypatch):
    d = tmp_path / "d"
    shutil.copytree(dataset, d, symlinks=True)
    before = directory_digest(d)
    with monkeypatch.context() as mp:
        disk_fills_after(mp, 300_000)  # inside the graph store's first 512 x 512 pair counts
        r = run(B, "--input_text", HELDOUT_PATH, "--export_dir", d, "--top_examples", 2, *SMALL[:-1], 900, ok=False)
    one_error_line(r, f"no space left on {d} (disk full)", "stage b")
    partial = layout.CORPUS_PARTIAL_DIR.format(m=M)  # the checkpoint a rerun with --resume takes up
    assert {k: v for k, v in directory_digest(d).items() if not k.startswith(partial)} == before
    cards = tmp_path / "cards"
    with monkeypatch.context() as mp:
        disk_fills_after(mp, 1000)
        r = run("f_render_neuron_cards.py", "--dataset_path", d, "--neurons", "1,2", "--output", cards,
                "--model_type", M, "--device", "cpu", "--top_examples", 2, ok=False)
    one_error_line(r, f"no space left on {cards} (disk full)", "neuron cards")
    r = run("f_render_neuron_cards.py", "--dataset_path", d, "--neurons", "1,2", "--output", cards,
            "--model_type", M, "--device", "cpu", "--top_examples", 2)
    assert 'id="neuron-2"' in (cards / layout.CARDS_HTML).read_text()


def test_full_disk_keeps_the_earlier_cards_and_neuronpedia_export(dataset, tmp_path, monkeypatch):
    """A disk that fills while the cards or the Neuronpedia export are written: one disk-full line naming the
    directory, and the earlier cards (both files: never a new page beside an old one) and the earlier export byte
    for byte as they were, DIR holding only the model's folder."""
    from gelutrace.report import neuronpedia as npx

    root = tmp_path / "run"
    cards, export = root / "cards", root / "np"
    render = ["f_render_neuron_cards.py", "--dataset_path", dataset, "--model_type", M, "--device", "cpu",
              "--top_examples", 2, "--output", cards, "--neuronpedia", export]
    run(*render, "--neurons", "1,2")
    before = directory_digest(root)
    fresh = tmp_path / "fresh"  # what the second run writes, on a disk with room
    run(*render[:-4], "--output", fresh, "--neurons", "1,2,3,600")
    md = (fresh / layout.CARDS_MD).stat().st_size
    assert md < (fresh / layout.CARDS_HTML).stat().st_size
    with monkeypatch.context() as mp:
        disk_fills_after(mp, md + 10, under=cards)  # room for the new Markdown, not for the page
        r = run(*render, "--neurons", "1,2,3,600", ok=False)
    one_error_line(r, f"no space left on {cards} (disk full)", "neuron cards")
    assert directory_digest(root) == before
    with monkeypatch.context() as mp:
        disk_fills_after(mp, 600, under=export)  # inside the export's first source folder
        r = run(*render, "--neurons", "1,2,3,600", ok=False)
    one_error_line(r, f"no space left on {export} (disk full)", "Neuronpedia export")
    assert {k: v for k, v in directory_digest(root).items() if not k.startswith("cards")} == \
        {k: v for k, v in before.items() if not k.startswith("cards")}
    assert sorted(os.listdir(export)) == [npx.model_slug(M)]


def test_full_disk_in_stages_c_and_d_names_the_directory(shipped_path, tmp_path, monkeypatch):
    """Stage c's store and stage d's subset on a disk that fills mid-write: the line names the directory written
    into (not a temporary file that is gone), and what was there is unchanged."""
    from test_recording import write_prompts

    d = tmp_path / "ds"
    run(B, "--input_csv", write_prompts(tmp_path / "p.csv"), "--export_dir", d, "--model_type", M, "--device",
        "cpu", "--no_activation_lists")
    before = directory_digest(d)
    with monkeypatch.context() as mp:
        disk_fills_after(mp, 1_000_000, under=d)  # inside the store's second pair of layers
        r = run("c_calculate_weighted_activation_graph.py", "--input_dir", d, ok=False)
    one_error_line(r, f"no space left on {d} (disk full)")
    assert directory_digest(d) == before
    run("c_calculate_weighted_activation_graph.py", "--input_dir", d)
    subsets = d / "subsets"
    with monkeypatch.context() as mp:
        disk_fills_after(mp, 0, under=subsets)
        r = run("d_calculate_perturbation_subset.py", "--input_graph_path", layout.path(d, layout.WEIGHTED_GRAPH, M),
                "--method", "degree", "--threshold", 1, "--k", 5, "--output_dir", subsets, ok=False)
    # stage d writes each method's scores first, into the output directory's scores/ (layout.SCORES_DIR)
    one_error_line(r, f"no space left on {subsets / layout.SCORES_DIR} (disk full)")
    assert [p for p in subsets.rglob("*") if not p.is_dir()] == []


def tmpfs_or_skip(mnt):
    """Skip where a tmpfs cannot be mounted at `mnt` in a mount namespace of its own (the tests mount theirs so)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"],
                           capture_output=True)
    if probe.returncode:
        pytest.skip("cannot mount a tmpfs in a mount namespace here")


def run_on_filled_tmpfs(tmp_path, size: str, first: str, digest: str, leave_kib: int, second: str):
    """In a tmpfs of `size` (a mount namespace of its own): `first`, the `digest` of what it wrote, the disk filled
    but `leave_kib`, then `second`; the two digests and the second's stderr as a CompletedProcess of its status."""
    mnt = tmp_path / "mnt"
    script = (f"mount -t tmpfs -o size={size} tmpfs {mnt} && {first} >/dev/null && {digest} && echo ---- && "
              f"dd if=/dev/zero of={mnt}/fill bs=1k count=$(( $(df -k --output=avail {mnt} | tail -1) - {leave_kib} ))"
              f" 2>/dev/null; {second} 2>{tmp_path / 'err'}; echo rc=$?; echo ----; {digest}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                       env=ENV, timeout=300)
    assert r.stdout.count("----\n") == 2, r.stdout + r.stderr
    before, rc, after = r.stdout.split("----\n")
    code = int(rc.strip().removeprefix("rc="))
    return before, after, subprocess.CompletedProcess([], code, "", (tmp_path / "err").read_text())


@pytest.mark.slow
def test_full_tmpfs_in_prompt_mode(shipped_path, tmp_path):
    """A real full disk under prompt-mode stage b (its --resume chunks are the first files written): the line
    names the export directory, and the earlier dataset there is byte for byte as it was."""
    from test_recording import write_prompts

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tmpfs_or_skip(mnt)
    b = " ".join(map(str, [sys.executable, B, "--model_type", M, "--device", "cpu", "--no_activation_lists",
                           "--no_edge_list", "--export_dir", mnt / "d", "--input_csv"]))
    digest = f"(cd {mnt}/d && find . -type f ! -name .gelutrace.lock ! -path './.*_partial/*' | sort | xargs sha256sum)"
    first, second, err = run_on_filled_tmpfs(
        tmp_path, "8m", f"{b} {write_prompts(tmp_path / 'a.csv')}", digest, 8,
        f"{b} {write_prompts(tmp_path / 'b.csv', [('Once upon a time', 9, 40)])}")
    assert first.strip() and first == second, first + second
    one_error_line(err, f"no space left on {mnt / 'd'} (disk full)")


@pytest.mark.slow  # fills a real filesystem
def test_full_tmpfs_while_writing_a_subset_keeps_the_earlier_pair(dataset, tmp_path):
    """A real full disk under stage d with room for the new .npy but not its sidecar: one line naming the
    directory, and the earlier .npy and sidecar byte for byte as they were (never a new .npy beside an old
    sidecar)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tmpfs_or_skip(mnt)
    d = " ".join(map(str, [sys.executable, "d_calculate_perturbation_subset.py", "--input_graph_path",
                           layout.path(dataset, layout.WEIGHTED_GRAPH, M), "--method", "random", "--k", 5, "--output_dir",
                           mnt / "s", "--seed"]))
    digest = f"(cd {mnt}/s && ls -A && sha256sum *)"
    first, second, err = run_on_filled_tmpfs(tmp_path, "1m", f"{d} 1", digest, 4, f"{d} 2")
    assert f"{M}_random_k5.npy" in first and f"{M}_random_k5.json" in first and first == second, first + second
    one_error_line(err, f"no space left on {mnt / 's'} (disk full)")


def test_npy_writes_equal_numpys(tmp_path):
    for a in (np.arange(12, dtype=np.uint16).reshape(3, 4), np.zeros((0, 5)), np.asfortranarray(np.eye(3)),
              np.arange(10 ** 6, dtype=np.int64)):
        atomic.write_npy(a, tmp_path / "a.npy")
        np.save(tmp_path / "b.npy", a)
        assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


@pytest.mark.slow
def test_full_tmpfs_in_corpus_mode(shipped_path, tmp_path):
    """A real full disk: a 5000 KiB tmpfs (in a mount namespace of its own) runs out inside the graph store."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tmpfs_or_skip(mnt)
    b = " ".join(map(str, [sys.executable, B, "--input_text", HELDOUT_PATH, "--export_dir", mnt / "d", *SMALL]))
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=5000k tmpfs {mnt} && {b}"],
                       capture_output=True, text=True, cwd=REPO_ROOT, env=ENV, timeout=300)
    one_error_line(r, f"no space left on {mnt / 'd'} (disk full)")


# --- negative seeds ------------------------------------------------------------------------------------------
def test_negative_seeds_are_refused(dataset, shipped, tmp_path):
    import gelutrace as gt

    store = layout.path(dataset, layout.WEIGHTED_GRAPH, M)
    one_error_line(run("c_find_modules.py", "--input_path", store, "--seed", -1, "--output_dir", tmp_path / "m",
                       ok=False), "--seed")
    for method in ("random", "attribution"):
        one_error_line(run("d_calculate_perturbation_subset.py", "--input_graph_path", store, "--method", method,
                           "--k", 3, "--seed", -5, "--output_dir", tmp_path / "s", ok=False), "--seed")
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()
    g = gt.Dataset(dataset, M).graph()
    for call in (lambda: gt.select(g, method="random", k=3, seed=-1),
                 lambda: gt.find_modules(g, null_graphs=0, seeds=1, seed=-1),
                 lambda: gt.ablate(shipped, [1, 2], eval_text=HELDOUT_PATH, seed=-1)):
        with pytest.raises(PipelineError, match="seed"):
            call()


# --- smaller items -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", [["--method", "degree"], ["--weight", "count"], ["--seed", "1337"],
                                  ["--method", "pagerank"]])
def test_module_subsets_refuse_ranking_flags_given_at_all(dataset, tmp_path, flag):
    modules = dataset / layout.MODULES_DIR / layout.MODULES.format(m=M, weight="count")
    out = tmp_path / "s"
    one_error_line(run("d_calculate_perturbation_subset.py", "--modules", modules, "--module", 0, *flag,
                       "--output_dir", out, ok=False), f"without {flag[0]}")
    assert not out.exists()
    run("d_calculate_perturbation_subset.py", "--modules", modules, "--module", 0, "--output_dir", out)
    assert (out / layout.SUBSET_FILE_MODULE.format(m=M, module=0, weight="count")).is_file()


def test_find_modules_refuses_non_finite_resolution_and_writes_strict_json(dataset, tmp_path):
    store = layout.path(dataset, layout.WEIGHTED_GRAPH, M)
    for value in ("inf", "nan", "-inf"):
        one_error_line(run("c_find_modules.py", "--input_path", store, "--resolution", value, "--output_dir",
                           tmp_path / "x", ok=False), "--resolution")
    assert not (tmp_path / "x").exists()
    for i, settings in enumerate((["--seeds", 1, "--null_graphs", 0], ["--seeds", 0, "--null_graphs", 1])):
        out = tmp_path / f"m{i}"
        run("c_find_modules.py", "--input_path", store, *settings, "--output_dir", out)
        rec = strict_json((out / layout.MODULES_RECORD.format(m=M, weight="count")).read_text())
        assert rec["null"]["std"] is None and rec["null"]["z"] is None and rec["seed_ari"]["mean"] is None
        assert (rec["null"]["mean"] is None) == (i == 0) and (rec["null"]["p"] is None) == (i == 0)


def layered_gpickle(path, d=6, L=3, modules=2, seed=0):
    """Stage c's .gpickle layout (every pair of neurons of adjacent layers one edge, zero counts included) with
    planted modules: dims i // (d / modules) fire together across the layers. Returns the planted labels."""
    rng = np.random.default_rng(seed)
    truth = np.tile(np.arange(L * d) % d // (d // modules), 1)
    g = nx.Graph(model="toy", num_samples=500)
    g.add_nodes_from((i, {"layer": i // d, "dimension": i % d, "activation_count": 100}) for i in range(L * d))
    for layer in range(L - 1):
        for a in range(d):
            for b in range(d):
                u, v = layer * d + a, (layer + 1) * d + b
                same = truth[u] == truth[v]
                g.add_edge(u, v, co_activation_count=int(rng.integers(40, 60) if same else rng.integers(0, 3)))
    path.write_bytes(pickle.dumps(g, protocol=pickle.HIGHEST_PROTOCOL))
    return truth, g


def test_stage_c_gpickle_is_read_as_the_full_layers(tmp_path):
    gp = tmp_path / "toy_weighted_graph.gpickle"
    truth, g = layered_gpickle(gp)
    out = tmp_path / "m"
    run("c_find_modules.py", "--input_path", gp, "--null_graphs", 0, "--seeds", 2, "--output_dir", out)
    table = pd.read_csv(out / layout.MODULES.format(m="toy", weight="count"))
    assert table["node_id"].tolist() == list(range(len(truth)))
    assert ig.compare_communities(table["module"].tolist(), truth.tolist(), method="adjusted_rand") == 1.0
    rec = strict_json((out / layout.MODULES_RECORD.format(m="toy", weight="count")).read_text())
    assert rec["num_modules"] == 2 and rec["edges_kept"] == sum(c > 0 for *_, c in g.edges(data="co_activation_count"))
    # an edited edge list (one adjacent-layer pair missing, or an edge skipping a layer) is still refused
    for edit in ("remove", "skip"):
        h = g.copy()
        h.remove_edge(0, 6) if edit == "remove" else h.add_edge(0, 12, co_activation_count=5)
        bad = tmp_path / f"{edit}_weighted_graph.gpickle"
        bad.write_bytes(pickle.dumps(h))
        one_error_line(run("c_find_modules.py", "--input_path", bad, "--null_graphs", 0, "--seeds", 1, "--output_dir",
                           tmp_path / edit, ok=False), "full adjacent layers")


def test_dir_lists_the_api_without_importing_torch():
    code = ("import sys, gelutrace; names = dir(gelutrace); "
            "assert set(gelutrace.__all__) <= set(names), names; "
            "assert 'torch' not in sys.modules and 'gelutrace.api' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_api_argument_types_are_pipeline_errors(dataset, shipped):
    import gelutrace as gt

    g = gt.Dataset(dataset, M).graph()
    calls = {"k float": lambda: gt.select(g, method="activation_count", k=2.0),
             "k bool": lambda: gt.select(g, method="activation_count", k=True),
             "k zero": lambda: gt.select(g, method="activation_count", k=0),
             "controls -1": lambda: gt.ablate(shipped, [1], eval_text=HELDOUT_PATH, random_controls=-1),
             "controls float": lambda: gt.ablate(shipped, [1], eval_text=HELDOUT_PATH, random_controls=2.0),
             "eval_text []": lambda: gt.ablate(shipped, [1], eval_text=[]),
             "eval_text None": lambda: gt.ablate(shipped, [1], eval_text=None),
             "text None": lambda: gt.record_corpus(shipped, None),
             "text [None]": lambda: gt.record_corpus(shipped, [None]),
             "seeds bool": lambda: gt.find_modules(g, seeds=True),
             "max_tokens float": lambda: gt.record_corpus(shipped, HELDOUT_PATH, max_tokens=100.5),
             "eval_tokens 0": lambda: gt.ablate(shipped, [1], eval_text=HELDOUT_PATH, eval_tokens=0)}
    for name, call in calls.items():
        with pytest.raises(PipelineError) as e:
            call()
        assert "\n" not in str(e.value) and str(e.value).count(". ") == 0, (name, str(e.value))
    assert gt.select(g, method="activation_count", k=np.int64(3)).k == 3  # numpy integers are whole numbers


def test_api_takes_numpy_numbers_and_refuses_other_types_in_one_sentence(dataset, shipped, tmp_path):
    """numpy integers are whole numbers everywhere (record_corpus records its settings as JSON: the run equals the
    one given ints); a string, a bool or None where a number, a flag, a path, a model, a graph or a dataset
    belongs is a PipelineError of one sentence, never a TypeError or AttributeError from inside."""
    import gelutrace as gt

    a = gt.record_corpus(shipped, HELDOUT_PATH, out_dir=tmp_path / "a", max_tokens=200, context=32, top_examples=2)
    b = gt.record_corpus(shipped, HELDOUT_PATH, out_dir=tmp_path / "b", max_tokens=np.int64(200),
                         context=np.int32(32), top_examples=np.int16(2))
    assert {k: v for k, v in a.record.items() if k != "settings"} == {k: v for k, v in b.record.items()
                                                                      if k != "settings"}
    assert a.frequencies.equals(b.frequencies)
    g = gt.Dataset(dataset, M).graph()
    cards = gt.neuron_cards(shipped, gt.Dataset(dataset, M), [1, 2], k=np.int64(2))
    calls = {"attribution 'no'": lambda: gt.record_corpus(shipped, HELDOUT_PATH, attribution="no"),
             "direct_edges 1": lambda: gt.record_corpus(shipped, HELDOUT_PATH, direct_edges=1),
             "out_dir 5": lambda: gt.record_corpus(shipped, HELDOUT_PATH, out_dir=5),
             "lm None": lambda: gt.record_corpus(None, HELDOUT_PATH),
             "threshold '0.5'": lambda: gt.select(g, method="degree", threshold="0.5", k=3),
             "threshold True": lambda: gt.select(g, method="degree", threshold=True, k=3),
             "dataset a str": lambda: gt.select(g, method="attribution", k=3, dataset=str(dataset)),
             "resolution 'x'": lambda: gt.find_modules(g, null_graphs=0, seeds=1, resolution="x"),
             "module threshold 'x'": lambda: gt.find_modules(g, null_graphs=0, seeds=1, threshold="x"),
             "graph None": lambda: gt.find_modules(None),
             "ablate lm None": lambda: gt.ablate(None, [1], eval_text=HELDOUT_PATH),
             "cards of a str": lambda: gt.neuron_cards(shipped, str(dataset), [1, 2]),
             "export into None": lambda: cards.to_neuronpedia(None),
             "export into 5": lambda: cards.to_neuronpedia(5),
             "html to None": lambda: cards.to_html(None),
             "frequencies of no dataset": lambda: gt.Dataset(tmp_path / "none", M).frequencies}
    for name, call in calls.items():
        with pytest.raises(PipelineError) as e:
            call()
        assert "\n" not in str(e.value) and str(e.value).count(". ") == 0, (name, str(e.value))
    assert not (tmp_path / "none").exists()


def test_a_copied_dataset_renders_its_cards_from_its_own_graph(dataset, tmp_path):
    """The cards' graph degree comes from the graph stage d's best graph-method subset was chosen on, which its
    sidecar records by the original's path: a copy (cp -a, the original then moved away) reads its own store, and
    the degrees equal the count store's thresholded degrees computed here with numpy."""
    from gelutrace.report import cards as cd

    orig, copy = tmp_path / "orig", tmp_path / "copy"
    shutil.copytree(dataset, orig, symlinks=True)
    run("d_calculate_perturbation_subset.py", "--input_graph_path", layout.path(orig, layout.WEIGHTED_GRAPH, M), "--method",
        "degree", "--threshold", 0.5, "--k", 5, "--output_dir", orig / layout.SUBSETS_DIR)
    (orig / layout.RESULTS_DIR).mkdir()
    pd.DataFrame({"k": [5], "method": ["degree"], "subset": [f"{M}_degree_t0.5_k5"], "delta_nll": [0.1],
                  "best": [True]}).to_csv(orig / layout.RESULTS_DIR / layout.COMPARISON, index=False)
    shutil.copytree(orig, copy, symlinks=True)
    os.rename(orig, tmp_path / "moved_away")
    store = layout.path(copy, layout.WEIGHTED_GRAPH, M)
    header = json.loads((store / layout.GRAPH_STORE_HEADER).read_text())
    L, d = header["n_layer"], header["d_mlp"]
    pairs = [np.load(store / b["file"]).astype(np.int64) for b in header["blocks"]]
    top = max(int(p.max()) for p in pairs)
    want = np.zeros(L * d)
    for i, p in enumerate(pairs):
        kept = p / top > 0.5
        want[i * d:(i + 1) * d] += kept.sum(axis=1)
        want[(i + 1) * d:(i + 2) * d] += kept.sum(axis=0)
    deg, note = cd.graph_degrees(copy, M, L * d)
    np.testing.assert_array_equal(deg, want)
    assert note == "t=0.5, count"
    r = run("f_render_neuron_cards.py", "--dataset_path", copy, "--model_type", M, "--device", "cpu", "--neurons",
            "1,2", "--top_examples", 2)
    assert "t=0.5, count" in (copy / layout.CARDS_DIR / layout.CARDS_MD).read_text() and not r.stderr.count("error")
