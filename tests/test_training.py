"""
tools/train_shipped_model.py reproduces itself: two runs with the same seed, in two interpreters with different hash
seeds, write the same bytes (weights, config, tokenizer) and the same validation loss and samples, for both families
(GPT-2 training its tokenizer, Llama copying tinybard's, as the shipped models were made). A tiny model and budget on
a small text given by --train_text, so nothing is fetched; the checkpoint it writes loads through the loader as its
family.
"""

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from gelutrace.model.loading import load_model

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_PATH

TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--intermediate_size", "48", "--block_size", "32",
        "--steps", "3", "--batch_size", "2", "--vocab_size", "300", "--holdout", "0.2"]
FAMILY_ARGS = {"gpt2": [], "llama": ["--tokenizer", str(SHIPPED_PATH)]}


@pytest.mark.slow  # two interpreters per family, each importing torch and transformers
@pytest.mark.parametrize("family", list(FAMILY_ARGS))
def test_training_reproduces_itself(family, tmp_path):
    text = HELDOUT_PATH.read_text(encoding="utf-8")
    docs = [tmp_path / "first.txt", tmp_path / "second.txt"]
    docs[0].write_text(text[:len(text) // 2], encoding="utf-8")
    docs[1].write_text(text[len(text) // 2:], encoding="utf-8")
    runs = {"a": "1", "b": "2"}  # output directory: PYTHONHASHSEED
    procs = {run: subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tools" / "train_shipped_model.py"), "--family", family, "--train_text",
         *map(str, docs), "--out", str(tmp_path / run), *TINY, *FAMILY_ARGS[family]],
        env=dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1"), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for run, seed in runs.items()}
    for p in procs.values():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    a, b = tmp_path / "a", tmp_path / "b"
    assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
    assert not (a / "NOTICE").exists()  # the registries' texts were not used
    for f in a.iterdir():
        if f.name != "training.json":
            assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    rec_a, rec_b = (json.loads((d / "training.json").read_text()) for d in (a, b))
    assert rec_a["args"].pop("out") == str(a) and rec_b["args"].pop("out") == str(b)
    assert rec_a == rec_b and rec_a["documents"] == 2 and rec_a["validation_loss"] > 0

    with safe_open(str(a / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    lm = load_model(str(a), device="cpu")
    assert lm.site["architecture"] == family and lm.model.config.n_layer == 2
    if family == "llama":
        assert lm.model.config.d_mlp == 48 and len(lm.tokenizer) == 4096
        assert not [n for n in names if n.endswith("bias")] and any(n.endswith("mlp.gate_proj.weight") for n in names)
        assert (a / "tokenizer.json").read_bytes() == (SHIPPED_PATH / "tokenizer.json").read_bytes()
    else:
        assert lm.model.config.d_mlp == 4 * 32 and len(lm.tokenizer) == 300
