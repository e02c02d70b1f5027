"""
DatasetDir, the one reader of a stage-b dataset directory: a prompt-mode directory has no corpus record; a corpus
record is read back as stage b wrote it, and refused with one line when it is damaged, stale (not the one the
dataset manifest vouches for) or of another model.
"""

import json
import shutil

import numpy as np
import pytest

import gelutrace as gt
from gelutrace import PipelineError
from gelutrace.files import layout
from gelutrace.files.dataset import DatasetDir

from conftest import HELDOUT_PATH, SHIPPED_NAME
from graphdata import make_dataset, random_activations

M = SHIPPED_NAME
TOKENS, CONTEXT = 64, 32


@pytest.fixture(scope="module")
def corpus_dataset(shipped, tmp_path_factory):
    """Stage b in corpus mode over the first TOKENS tokens of the held-out text, in windows of CONTEXT."""
    out = tmp_path_factory.mktemp("dataset_dir") / "corpus"
    return gt.record_corpus(shipped, [str(HELDOUT_PATH)], out_dir=out, max_tokens=TOKENS, context=CONTEXT,
                            top_examples=2).path


@pytest.fixture
def copied(corpus_dataset, tmp_path):
    """The corpus dataset copied, to be damaged."""
    return shutil.copytree(corpus_dataset, tmp_path / "ds")


def refusal(ds: DatasetDir) -> str:
    with pytest.raises(PipelineError) as e:
        ds.corpus_record()
    message = str(e.value)
    assert "\n" not in message and str(ds.file(layout.CORPUS)) in message
    return message


def test_prompt_mode_directory(tmp_path):
    active = random_activations(n_layer=2, d_mlp=4, n_samples=20)
    make_dataset(tmp_path, active, 2, 4, m="toy")
    ds = DatasetDir.find(tmp_path)
    assert ds.m == "toy" and not ds.is_corpus and ds.corpus_record() is None
    assert np.array_equal(ds.frequencies()["activation_count"].to_numpy(), active.sum(axis=0))
    assert np.array_equal(ds.mean_activations(8), np.zeros(8))  # as make_dataset writes it
    ds.check(2, 4)
    with pytest.raises(PipelineError, match="another model"):
        ds.check(3, 4)


def test_corpus_record_read_back(corpus_dataset):
    ds = DatasetDir.find(corpus_dataset, layout.CORPUS)
    assert ds.m == M and ds.is_corpus
    rec = ds.corpus_record()
    assert rec == json.loads(layout.path(corpus_dataset, layout.CORPUS, M).read_text())  # as written, nothing added
    assert (rec["model"], rec["tokens"], rec["context"]) == (M, TOKENS, CONTEXT)
    assert [f["path"] for f in rec["files"]] == [str(HELDOUT_PATH.resolve())]


def edit(change):
    def write(p):
        rec = json.loads(p.read_text())
        change(rec)
        p.write_text(json.dumps(rec))
    return write


DAMAGE = {
    "not JSON": (lambda p: p.write_text('{"format": "gelutrace-corpus", '), "not valid JSON"),
    "not UTF-8": (lambda p: p.write_bytes(b'{"format": "\xff"}'), "not valid JSON"),
    "a list": (lambda p: p.write_text("[]"), "not a corpus record"),
    "another format": (edit(lambda r: r.update(format="gelutrace-modules")), "not a corpus record"),
    "no samples": (edit(lambda r: r.pop("samples")), "no 'samples'"),
    "tokens as text": (edit(lambda r: r.update(tokens=str(r["tokens"]))), "no 'tokens'"),
    "a file without its path": (edit(lambda r: r["files"][0].pop("path")), "without its path"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_record_refused(copied, case):
    damage, why = DAMAGE[case]
    ds = DatasetDir(copied, M)
    damage(ds.file(layout.CORPUS))
    message = refusal(ds)
    assert "is damaged" in message and why in message and "rerun stage b" in message


def test_stale_record_refused(copied):
    """A record edited or replaced after the run that wrote the files beside it (a well-formed one)."""
    ds = DatasetDir(copied, M)
    edit(lambda r: r.update(samples=r["samples"] + 1))(ds.file(layout.CORPUS))
    message = refusal(ds)
    assert "changed or replaced after the run" in message and "rerun stage b" in message


def test_record_of_another_model_refused(copied):
    """The files renamed to another model's prefix: the record still names the model that read the text."""
    for p in copied.glob(f"{M}_*"):
        p.rename(p.with_name("gpt2" + p.name[len(M):]))
    message = refusal(DatasetDir(copied, "gpt2"))
    assert f"model {M!r}, not 'gpt2'" in message and "another model" in message
