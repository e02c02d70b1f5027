"""
Edited and damaged `--resume` state of stage b, in both modes: every edit of a checkpoint's fields (with its
manifest re-hashed to match, so that the field checks are tested apart from the sha256 check), a truncated or
incomplete state, a file named outside the checkpoint directory and a file changed behind its manifest must each
end in one `error:` line naming the checkpoint and exit status 2, writing no dataset; an unedited checkpoint
resumes to the uninterrupted run's files.
"""

import json
import os
import runpy
import shutil
import sys

import numpy as np
import pytest
from test_recording import write_prompts

from gelutrace.files import atomic, layout

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, run_python

M = SHIPPED_NAME
B = str(REPO_ROOT / "b_generate_activation_dataset.py")
CORPUS_ARGS = ["--input_text", str(HELDOUT_PATH), "--model_type", M, "--device", "cpu", "--context", "64",
               "--direct_edges", "--batch_size", "2", "--checkpoint_minutes", "0", "--save_matrix"]
PROMPT_ARGS = ["--model_type", M, "--device", "cpu", "--batch_size", "1", "--no_edge_list", "--no_attribution"]


def stage_b(*args):
    return run_python([sys.executable, B, *map(str, args)], cwd=REPO_ROOT)


def interrupted(owner, name: str, nth: int, args: list[str]):
    """Stage b with `args` in this process, interrupted (as by Ctrl-C) at the nth call of owner.name."""
    real, calls = getattr(owner, name), {"n": 0}

    def stop(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            raise KeyboardInterrupt
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner, name, stop)
        mp.setattr(sys, "argv", [B, *map(str, args)])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(B, run_name="__main__")
    assert e.value.code == 130


def one_checkpoint_error(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("reading", "generating"))]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    # the message itself names the checkpoint (the temporary paths hold the word too)
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint damaged ("), r.stderr[-3000:]
    return lines[0]


# --- corpus mode ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory, shipped_path):
    """An uninterrupted run, and a run interrupted in its fourth batch (a checkpoint after each of the three
    before): the copy each test edits."""
    from gelutrace.record import corpus

    root = tmp_path_factory.mktemp("ckpt_corpus")
    r = stage_b(*CORPUS_ARGS, "--export_dir", root / "full")
    assert r.returncode == 0, r.stderr[-3000:]
    interrupted(corpus, "run_batch", 4, CORPUS_ARGS + ["--export_dir", str(root / "part")])
    state = json.loads((layout.path(root / "part", layout.CORPUS_PARTIAL_DIR, M) / "state_0_1.json").read_text())
    assert state["batches_done"] == 3 and len(state["packed"]) == 3
    return root


@pytest.fixture
def corpus_part(corpus_runs, tmp_path):
    shutil.copytree(corpus_runs / "part", tmp_path / "part")
    return tmp_path / "part"


def rehash(partial, state):
    """The manifest made to vouch for the files as they now are (what an editor who also edits it writes)."""
    if "files" in state:  # (a state without a manifest stays without one)
        state["files"] = {f: atomic.file_sha256(partial / f) for f in state["files"] if (partial / f).is_file()}
    return state


def counts_file(state) -> str:
    return state.get("counts", "counts_0_1.npz")  # (the name before the state named it)


def edit_counts(partial, state, change, rehashed=True):
    p = partial / counts_file(state)
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(p, "wb") as f:
        np.savez(f, **arrays)
    return rehash(partial, state) if rehashed else state


def times_ten(a):
    a["direct_samples"] = a["direct_samples"] * 10


def signed_nan(a):
    a["direct_signed"] = a["direct_signed"].copy()
    a["direct_signed"].flat[7] = np.nan


def one_more_pair(a):
    a["pairs"] = a["pairs"].copy()
    d = a["pairs"].shape[1]
    a["pairs"][0][0, 0] = min(a["node"][0], a["node"][d]) + 1  # above the count of one of its two neurons


def top_id_outside(a):
    a["top_ids"] = a["top_ids"].copy()
    a["top_ids"][0, 5] = 10 ** 6


def renamed_counts(partial, state):
    """batches_done 2 with the counts file renamed to match and the manifest re-hashed: only the counts say no."""
    new = "counts_0_1_00002.npz"
    os.replace(partial / counts_file(state), partial / new)
    state.update(batches_done=2, counts=new, files={new: None, **{f: None for f in state["packed"]}})
    return rehash(partial, state)


def symlinked_packed(partial, state):
    outside = partial.parent / "outside.npy"
    os.replace(partial / state["packed"][0], outside)
    (partial / state["packed"][0]).symlink_to(outside)
    return rehash(partial, state)


CORPUS_EDITS = {
    "batches_done 0": lambda p, s: {**s, "batches_done": 0},
    "batches_done 100": lambda p, s: {**s, "batches_done": 100},
    "batches_done -1": lambda p, s: {**s, "batches_done": -1},
    "batches_done x": lambda p, s: {**s, "batches_done": "x"},
    "batches_done 2, files renamed to match": renamed_counts,
    "no packed key": lambda p, s: {k: v for k, v in s.items() if k != "packed"},
    "packed outside": lambda p, s: {**s, "packed": ["../../../etc/passwd"] + s["packed"][1:]},
    "packed name with a NUL": lambda p, s: {**s, "packed": [s["packed"][0] + "\0"] + s["packed"][1:]},
    "packed symlinked outside": symlinked_packed,
    "direct_samples x10, manifest re-hashed": lambda p, s: edit_counts(p, s, times_ten),
    "direct_samples x10": lambda p, s: edit_counts(p, s, times_ten, rehashed=False),
    "direct_signed NaN, manifest re-hashed": lambda p, s: edit_counts(p, s, signed_nan),
    "pair count raised, manifest re-hashed": lambda p, s: edit_counts(p, s, one_more_pair),
    "top id outside, manifest re-hashed": lambda p, s: edit_counts(p, s, top_id_outside),
}


@pytest.mark.parametrize("edit", list(CORPUS_EDITS))
def test_corpus_checkpoint_edit_is_refused(corpus_part, edit):
    partial = layout.path(corpus_part, layout.CORPUS_PARTIAL_DIR, M)
    state_file = partial / "state_0_1.json"
    state = CORPUS_EDITS[edit](partial, json.loads(state_file.read_text()))
    state_file.write_text(json.dumps(state))
    line = one_checkpoint_error(stage_b(*CORPUS_ARGS, "--export_dir", corpus_part, "--resume"))
    assert "rerun without --resume" in line
    assert not layout.path(corpus_part, layout.CORPUS, M).exists() and not layout.path(corpus_part, layout.WEIGHTED_GRAPH, M).exists()


def test_truncated_corpus_state_is_refused(corpus_part):
    state_file = layout.path(corpus_part, layout.CORPUS_PARTIAL_DIR, M) / "state_0_1.json"
    state_file.write_bytes(state_file.read_bytes()[:40])
    assert "damaged" in one_checkpoint_error(stage_b(*CORPUS_ARGS, "--export_dir", corpus_part, "--resume"))
    assert not layout.path(corpus_part, layout.CORPUS, M).exists()


def test_unedited_corpus_checkpoint_resumes_to_the_uninterrupted_run(corpus_runs, corpus_part):
    r = stage_b(*CORPUS_ARGS, "--export_dir", corpus_part, "--resume")
    assert r.returncode == 0 and "resuming after batch 3" in r.stdout, r.stderr[-3000:]
    full = corpus_runs / "full"
    for f in (layout.FREQUENCY, layout.MATRIX, layout.TOP_EXAMPLES, layout.CORPUS):
        assert layout.path(corpus_part, f, M).read_bytes() == layout.path(full, f, M).read_bytes(), f
    got, want = (atomic.store_files(layout.path(d, layout.WEIGHTED_GRAPH, M)) for d in (corpus_part, full))
    assert [p.name for p in got] == [p.name for p in want]
    for a, b in zip(got, want):
        if a.suffix == ".npy":
            assert a.read_bytes() == b.read_bytes(), a.name
    assert not layout.path(corpus_part, layout.CORPUS_PARTIAL_DIR, M).exists()


# --- prompt mode ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt_runs(tmp_path_factory, shipped_path):
    """An uninterrupted greedy run and one interrupted in its third batch (the first two prompts done: 3 + 2
    samples)."""
    from gelutrace.record import prompts as recording

    root = tmp_path_factory.mktemp("ckpt_prompt")
    csv = write_prompts(root / "p.csv")
    args = ["--input_csv", csv, *PROMPT_ARGS]
    r = stage_b(*args, "--export_dir", root / "full")
    assert r.returncode == 0, r.stderr[-3000:]
    interrupted(recording, "record_batch", 3, [*args, "--export_dir", root / "part"])
    state = json.loads((layout.path(root / "part", layout.PARTIAL_DIR, M) / "state.json").read_text())
    assert state["samples_done"] == 5 and len(state["chunks"]) == 2
    return root


@pytest.fixture
def prompt_part(prompt_runs, tmp_path):
    shutil.copytree(prompt_runs / "part", tmp_path / "part")
    return tmp_path / "part"


def edit_chunk(partial, state, c, change, rehashed=True):
    p = partial / state["chunks"][c]
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    change(arrays)
    with open(p, "wb") as f:
        np.savez(f, **arrays)
    return rehash(partial, state) if rehashed else state


def second_repeat_token(a):
    a["output_id"][7] = (a["output_id"][7] + 1) % 100  # the second repeat of the first prompt (7 new tokens)


def value_sum_nan(a):
    a["value_sum"][3] = np.nan


def top_value_raised(a):
    a["top_values"][-1] = a["top_values"][0] + 1  # the last rank above the first


PROMPT_EDITS = {
    "samples_done 45": lambda p, s: {**s, "samples_done": 45},
    "samples_done 3": lambda p, s: {**s, "samples_done": 3},
    "samples_done 0": lambda p, s: {**s, "samples_done": 0},
    "samples_done -1": lambda p, s: {**s, "samples_done": -1},
    "samples_done x": lambda p, s: {**s, "samples_done": "x"},
    "no chunks key": lambda p, s: {k: v for k, v in s.items() if k != "chunks"},
    "chunk outside": lambda p, s: {**s, "chunks": ["../../../etc/passwd"] + s["chunks"][1:]},
    "chunk name with a NUL": lambda p, s: {**s, "chunks": [s["chunks"][0] + "\0"] + s["chunks"][1:]},
    "chunk dropped, manifest re-hashed": lambda p, s: rehash(p, {**s, "chunks": s["chunks"][:1],
                                                                 "files": {s["chunks"][0]: None}}),
    "greedy repeat changed, manifest re-hashed": lambda p, s: edit_chunk(p, s, 0, second_repeat_token),
    "greedy repeat changed": lambda p, s: edit_chunk(p, s, 0, second_repeat_token, rehashed=False),
    "value_sum NaN, manifest re-hashed": lambda p, s: edit_chunk(p, s, 1, value_sum_nan),
    "top values out of order, manifest re-hashed": lambda p, s: edit_chunk(p, s, 1, top_value_raised),
}


@pytest.mark.parametrize("edit", list(PROMPT_EDITS))
def test_prompt_checkpoint_edit_is_refused(prompt_runs, prompt_part, edit):
    partial = layout.path(prompt_part, layout.PARTIAL_DIR, M)
    state_file = partial / "state.json"
    state = PROMPT_EDITS[edit](partial, json.loads(state_file.read_text()))
    state_file.write_text(json.dumps(state))
    r = stage_b("--input_csv", prompt_runs / "p.csv", *PROMPT_ARGS, "--export_dir", prompt_part, "--resume")
    assert "rerun without --resume" in one_checkpoint_error(r)
    assert not layout.path(prompt_part, layout.DATASET, M).exists()


def test_truncated_prompt_state_is_refused(prompt_runs, prompt_part):
    state_file = layout.path(prompt_part, layout.PARTIAL_DIR, M) / "state.json"
    state_file.write_bytes(state_file.read_bytes()[:40])
    r = stage_b("--input_csv", prompt_runs / "p.csv", *PROMPT_ARGS, "--export_dir", prompt_part, "--resume")
    assert "damaged" in one_checkpoint_error(r)
    assert not layout.path(prompt_part, layout.DATASET, M).exists()


def test_unedited_prompt_checkpoint_resumes_to_the_uninterrupted_run(prompt_runs, prompt_part):
    r = stage_b("--input_csv", prompt_runs / "p.csv", *PROMPT_ARGS, "--export_dir", prompt_part, "--resume")
    assert r.returncode == 0 and "resuming after 5 of 6" in r.stdout, r.stderr[-3000:]
    for f in (layout.DATASET, layout.MATRIX, layout.FREQUENCY, layout.TOP_EXAMPLES, layout.ACTIVATIONS_JSON):
        assert layout.path(prompt_part, f, M).read_bytes() == layout.path(prompt_runs / "full", f, M).read_bytes(), f
    assert not layout.path(prompt_part, layout.PARTIAL_DIR, M).exists()


# --- a checkpoint in an odd place -------------------------------------------------------------------------------
def state_a_directory(partial, state_file, elsewhere):
    state_file.unlink()
    state_file.mkdir()


def state_a_link(partial, state_file, elsewhere):
    os.replace(state_file, elsewhere)
    state_file.symlink_to(elsewhere)


def directory_a_link(partial, state_file, elsewhere):
    shutil.move(partial, elsewhere)
    partial.symlink_to(elsewhere)


PLACES = {"state file a directory": state_a_directory, "state file a link": state_a_link,
          "checkpoint directory a link": directory_a_link}


@pytest.mark.parametrize("mode", ["corpus", "prompt"])
@pytest.mark.parametrize("place", list(PLACES))
def test_checkpoint_in_an_odd_place_is_refused(request, tmp_path, mode, place):
    """A state file that is a directory or a link, or a checkpoint directory that is a link to elsewhere, is not
    the run's: --resume refuses it in one line (never starting over silently, never reading or removing files
    through the link), and the files it points at are left as they were."""
    if mode == "corpus":
        part, partial_dir, state = request.getfixturevalue("corpus_part"), layout.CORPUS_PARTIAL_DIR, "state_0_1.json"
        args = CORPUS_ARGS
    else:
        part, partial_dir, state = request.getfixturevalue("prompt_part"), layout.PARTIAL_DIR, "state.json"
        args = ["--input_csv", request.getfixturevalue("prompt_runs") / "p.csv", *PROMPT_ARGS]
    partial = layout.path(part, partial_dir, M)
    PLACES[place](partial, partial / state, tmp_path / "elsewhere")
    before = sorted((p.relative_to(tmp_path).as_posix(), p.is_file() and p.read_bytes())
                    for p in tmp_path.rglob("*"))
    line = one_checkpoint_error(stage_b(*args, "--export_dir", part, "--resume"))
    assert "rerun without --resume" in line
    assert sorted((p.relative_to(tmp_path).as_posix(), p.is_file() and p.read_bytes())
                  for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("mode", ["corpus", "prompt"])
def test_a_fresh_run_replaces_a_linked_checkpoint_directory_not_what_it_points_to(request, tmp_path, mode):
    """Without --resume, a checkpoint directory that is a link (to files named as the run names its own) is
    removed as a link: the run writes the uninterrupted run's files, and the files the link pointed to stay."""
    if mode == "corpus":
        runs, partial_dir, args, files = (request.getfixturevalue("corpus_runs"), layout.CORPUS_PARTIAL_DIR, CORPUS_ARGS,
                                          (layout.FREQUENCY, layout.TOP_EXAMPLES, layout.CORPUS))
    else:
        runs, partial_dir, files = request.getfixturevalue("prompt_runs"), layout.PARTIAL_DIR, (layout.DATASET, layout.FREQUENCY)
        args = ["--input_csv", runs / "p.csv", *PROMPT_ARGS]
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(layout.path(runs / "part", partial_dir, M), elsewhere)  # a checkpoint's own file names
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    out = tmp_path / "out"
    out.mkdir()
    layout.path(out, partial_dir, M).symlink_to(elsewhere)
    r = stage_b(*args, "--export_dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in files:
        assert layout.path(out, f, M).read_bytes() == layout.path(runs / "full", f, M).read_bytes(), f
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before
    p = layout.path(out, partial_dir, M)
    assert not p.exists() and not p.is_symlink()
