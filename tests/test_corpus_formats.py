"""
Corpus formats: the same documents as .jsonl (or .txt), gzip, zstandard, Parquet, Arrow (IPC stream and file,
a datasets.save_to_disk directory) give the same tokens, records, shards, locate() and stage-b statistics; bad
files are one error line.
"""

import gzip
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gelutrace import PipelineError
from gelutrace.files import corpusfiles as cf
from gelutrace.files import layout
from gelutrace.record import corpus as cp

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_NAME, run_python

M = SHIPPED_NAME
B = "b_generate_activation_dataset.py"
CONTEXT = 64
DOCS = [p.strip() for p in HELDOUT_PATH.read_text().split("\n\n") if p.strip()] + [
    "KING HENRY. Now, lords, for France!", "And God said, \"Let there be light\": Ünïcode too, 日本語 and 😀."]


def jsonl_bytes(field="text", docs=DOCS) -> bytes:
    return "".join(json.dumps({"id": k, field: t}) + "\n" for k, t in enumerate(docs)).encode()


def zstd_frames(data: bytes, parts: int = 3) -> bytes:
    """Several zstandard frames one after another, as zstd writes concatenated files."""
    cut = np.linspace(0, len(data), parts + 1).astype(int)
    return b"".join(zstandard.ZstdCompressor().compress(data[a:b]) for a, b in zip(cut[:-1], cut[1:]))


def write_stream(path, table: pa.Table, rows: int = 4):
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        for batch in table.to_batches(max_chunksize=rows):
            w.write_batch(batch)


def saved_dataset(d, tables: list[pa.Table], listed: list[int] | None = None):
    """A directory as datasets.save_to_disk writes it: data-0000K-of-0000N.arrow (IPC streams), state.json
    listing them (in the order `listed`), dataset_info.json."""
    d.mkdir()
    names = [f"data-{k:05d}-of-{len(tables):05d}.arrow" for k in range(len(tables))]
    for name, t in zip(names, tables):
        write_stream(d / name, t)
    order = listed if listed is not None else range(len(tables))
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": names[k]} for k in order],
                                              "_fingerprint": "0" * 16, "_format_columns": None,
                                              "_format_kwargs": {}, "_format_type": None,
                                              "_output_all_columns": False, "_split": None}))
    (d / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string", "_type": "Value"}}}))
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    out = {"jsonl": d / "docs.jsonl", "jsonl.gz": d / "docs.jsonl.gz", "json.gz": d / "c4-train.00000-of-01024.json.gz",
           "jsonl.zst": d / "docs.jsonl.zst", "parquet": d / "docs.parquet", "arrow": d / "docs.arrow",
           "arrow file": d / "file_format.arrow", "txt": d / "heldout.txt", "txt.gz": d / "heldout.txt.gz",
           "txt.zst": d / "heldout.txt.zst"}
    out["jsonl"].write_bytes(jsonl_bytes())
    out["jsonl.gz"].write_bytes(gzip.compress(jsonl_bytes()))
    out["json.gz"].write_bytes(gzip.compress(jsonl_bytes()))
    out["jsonl.zst"].write_bytes(zstd_frames(jsonl_bytes()))
    pq.write_table(table, out["parquet"], row_group_size=3)
    write_stream(out["arrow"], table)
    with pa.OSFile(str(out["arrow file"]), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=5)
    shutil.copy(HELDOUT_PATH, out["txt"])
    out["txt.gz"].write_bytes(gzip.compress(HELDOUT_PATH.read_bytes()))
    out["txt.zst"].write_bytes(zstd_frames(HELDOUT_PATH.read_bytes()))
    out["dataset"] = saved_dataset(d / "saved", [table])
    return out


def ids_of(inputs, tokenizer, **kw):
    return cp.read_corpus([str(p) for p in inputs], tokenizer, **kw)


@pytest.mark.parametrize("fmt", ["jsonl.gz", "json.gz", "jsonl.zst", "parquet", "arrow", "arrow file", "dataset"])
def test_every_format_gives_the_jsonl_tokens_and_records_format_field_sha256(files, shipped, fmt):
    ref = ids_of([files["jsonl"]], shipped.tokenizer)
    got = ids_of([files[fmt]], shipped.tokenizer)
    assert got.ids.dtype == ref.ids.dtype and np.array_equal(got.ids, ref.ids)
    assert got.documents == ref.documents == len(DOCS)
    (f,), (r,) = got.files, ref.files
    p = files[fmt] if fmt != "dataset" else files[fmt] / "data-00000-of-00001.arrow"
    assert f["path"] == str(p.resolve())
    assert f["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()  # the bytes as stored
    assert f["format"] == {"arrow file": "arrow", "dataset": "arrow"}.get(fmt, fmt) and f["field"] == "text"
    assert r["format"] == "jsonl" and r["field"] == "text"
    for k in ("documents", "tokens", "first_token", "document_starts"):
        assert f[k] == r[k], k


@pytest.mark.parametrize("fmt", ["txt.gz", "txt.zst"])
def test_a_compressed_txt_is_one_document_as_the_txt(files, shipped, fmt):
    ref, got = ids_of([files["txt"]], shipped.tokenizer), ids_of([files[fmt]], shipped.tokenizer)
    assert np.array_equal(got.ids, ref.ids) and got.documents == 1
    assert got.files[0]["format"] == fmt and got.files[0]["field"] is None and ref.files[0]["format"] == "txt"
    assert got.files[0]["sha256"] == hashlib.sha256(files[fmt].read_bytes()).hexdigest()


def test_compressed_text_is_read_in_blocks_across_character_cuts(tmp_path, monkeypatch):
    text = "é日😀 word " * 5000
    for name, blob in (("t.txt.gz", gzip.compress(text.encode())), ("t.txt.zst", zstd_frames(text.encode(), 7))):
        (tmp_path / name).write_bytes(blob)
        monkeypatch.setattr(cf, "READ_BYTES", 1001)
        monkeypatch.setattr(cf, "ZSTD_READ_BYTES", 257)
        (doc,) = cf.file_documents(tmp_path / name)
        pieces = list(doc)
        assert len(pieces) > 10 and "".join(pieces) == text, name


def test_a_directory_is_sorted_by_name_and_a_saved_dataset_follows_its_state(files, shipped, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    for k, fmt in enumerate(["parquet", "txt.zst", "jsonl.gz"]):
        shutil.copy(files[fmt], d / f"{2 - k}_{files[fmt].name}")
    (d / "notes.md").write_text("not part of the corpus")
    got = ids_of([d], shipped.tokenizer)
    ref = ids_of([files["jsonl"], files["txt"], files["parquet"]], shipped.tokenizer)  # 0_, 1_, 2_
    assert np.array_equal(got.ids, ref.ids)
    assert [f["format"] for f in got.files] == ["jsonl.gz", "txt.zst", "parquet"]

    half = len(DOCS) // 2
    a, b = pa.table({"text": DOCS[:half]}), pa.table({"text": DOCS[half:]})
    (tmp_path / "first.jsonl").write_bytes(jsonl_bytes(docs=DOCS[:half]))
    (tmp_path / "second.jsonl").write_bytes(jsonl_bytes(docs=DOCS[half:]))
    both = saved_dataset(tmp_path / "two", [a, b])
    ref = ids_of([tmp_path / "first.jsonl", tmp_path / "second.jsonl"], shipped.tokenizer)
    got = ids_of([both], shipped.tokenizer)
    assert np.array_equal(got.ids, ref.ids) and [f["documents"] for f in got.files] == [half, len(DOCS) - half]
    listed_backwards = saved_dataset(tmp_path / "backwards", [b, a], listed=[1, 0])  # state.json's order, not names'
    assert np.array_equal(ids_of([listed_backwards], shipped.tokenizer).ids, ref.ids)
    (listed_backwards / "state.json").unlink()  # then dataset_info.json marks it, and the names order it
    got = ids_of([listed_backwards], shipped.tokenizer)
    assert [f["path"].rsplit("/", 1)[1] for f in got.files] == [f"data-0000{k}-of-00002.arrow" for k in (0, 1)]


def test_text_field_names_the_column_of_parquet_arrow_and_jsonl(files, shipped, tmp_path):
    (tmp_path / "body.jsonl").write_bytes(jsonl_bytes("body"))
    pq.write_table(pa.table({"text": ["not this"] * len(DOCS), "body": DOCS}), tmp_path / "body.parquet",
                   row_group_size=5)
    write_stream(tmp_path / "body.arrow", pa.table({"body": pa.array(DOCS, pa.large_string())}))
    ref = ids_of([files["jsonl"]], shipped.tokenizer)
    for name in ("body.jsonl", "body.parquet", "body.arrow"):
        got = ids_of([tmp_path / name], shipped.tokenizer, text_field="body")
        assert np.array_equal(got.ids, ref.ids) and got.files[0]["field"] == "body", name
    with pytest.raises(PipelineError, match="body.jsonl line 1: no field 'text'"):
        ids_of([tmp_path / "body.jsonl"], shipped.tokenizer)
    txt = ids_of([files["txt"]], shipped.tokenizer, text_field="body")  # a text file has no field
    assert txt.files[0]["field"] is None


def test_parquet_is_read_a_batch_at_a_time(files, monkeypatch, tmp_path):
    pq.write_table(pa.table({"text": DOCS * 20}), tmp_path / "many.parquet", row_group_size=7)
    assert pq.ParquetFile(tmp_path / "many.parquet").metadata.num_row_groups == -(-len(DOCS) * 20 // 7)
    monkeypatch.setattr(cf, "BATCH_ROWS", 10)
    sizes, real = [], pq.ParquetFile.iter_batches

    def counted(self, *args, **kw):
        for batch in real(self, *args, **kw):
            sizes.append(batch.num_rows)
            yield batch

    def whole(*args, **kw):
        raise AssertionError("the whole file was read")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    docs = cf.file_documents(tmp_path / "many.parquet")
    assert "".join(next(docs)) == DOCS[0] and sizes == [10]  # one batch read for the first document
    assert ["".join(d) for d in docs] == (DOCS * 20)[1:]
    assert max(sizes) <= 10 and sum(sizes) == len(DOCS) * 20 and len(sizes) == -(-len(DOCS) * 20 // 10)


def test_shards_locate_window_tokens_and_eval_text_on_parquet_equal_jsonl(files, shipped, tmp_path):
    from gelutrace.evaluate import fidelity
    from gelutrace.evaluate import realtext as rt

    pq.write_table(pa.table({"content": DOCS}), tmp_path / "docs.parquet", row_group_size=4)
    tok = shipped.tokenizer
    par = ids_of([tmp_path / "docs.parquet"], tok, text_field="content")
    ref = ids_of([files["jsonl"]], tok)
    n = len(ref.ids)
    rec = {"files": par.files, "tokens": n, "context": CONTEXT}
    rec_ref = {"files": ref.files, "tokens": n, "context": CONTEXT}
    for shard in ((0, 3), (2, 3)):
        w = cp.shard_windows(cp.num_windows(n, CONTEXT), shard)
        got, want = cp.window_tokens(rec, tok, w), cp.window_tokens(rec_ref, tok, w)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
        assert all(np.array_equal(got[int(k)][:CONTEXT], par.ids[k * CONTEXT:(k + 1) * CONTEXT]) for k in w)
    samples = np.arange(0, n, 37)
    assert [x[1:] for x in cp.locate(rec, samples)] == [x[1:] for x in cp.locate(rec_ref, samples)]
    assert {x[0] for x in cp.locate(rec, samples)} == {str((tmp_path / "docs.parquet").resolve())}
    old = {"files": [{k: v for k, v in f.items() if k not in ("format", "field")} for f in ref.files],
           "tokens": n, "context": CONTEXT}  # a record of an older version: the format from the suffix
    assert cf.record_format(old["files"][0]) == "jsonl" and cf.record_field(old["files"][0]) == "text"
    assert np.array_equal(cp.window_tokens(old, tok, [1])[1], cp.window_tokens(rec_ref, tok, [1])[1])

    a = fidelity.corpus_samples(rec, tok, 200, "cpu").idx
    assert np.array_equal(a.numpy(), fidelity.corpus_samples(rec_ref, tok, 200, "cpu").idx.numpy())
    text = rt.read_eval_text([str(tmp_path / "docs.parquet")], tok, 32, shipped.model.config.vocab_size, 300,
                             text_field="content")
    assert np.array_equal(text.ids, rt.read_eval_text([str(files["jsonl"])], tok, 32, shipped.model.config.vocab_size,
                                                      300).ids)
    assert text.units == "documents" and text.record(300)["files"][0]["field"] == "content"
    with pytest.raises(PipelineError, match="shares .* document"):  # the selection corpus read with its field
        rt.leak_check(rt.read_eval_text([str(files["json.gz"])], tok, 32, shipped.model.config.vocab_size, 300), rec)


def run_b(*args):
    return run_python([sys.executable, str(REPO_ROOT / B), *map(str, args)], capture_output=True, text=True,
                      cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))


def assert_same_dataset(a, b):
    """Counts, frequencies, top examples and the store bit for bit."""
    for f in (layout.FREQUENCY, layout.TOP_EXAMPLES):
        assert layout.path(a, f, M).read_bytes() == layout.path(b, f, M).read_bytes(), f
    sa, sb = layout.path(a, layout.WEIGHTED_GRAPH, M), layout.path(b, layout.WEIGHTED_GRAPH, M)
    names = sorted(p.name for p in sa.glob("*.npy"))
    assert names and names == sorted(p.name for p in sb.glob("*.npy"))
    for name in names:
        assert (sa / name).read_bytes() == (sb / name).read_bytes(), name


def test_stage_b_on_parquet_and_a_saved_dataset_equals_jsonl(files, shipped_path, tmp_path):
    pq.write_table(pa.table({"content": DOCS}), tmp_path / "docs.parquet", row_group_size=4)
    common = ["--model_type", M, "--context", CONTEXT, "--max_tokens", 700, "--top_examples", 3]
    runs = {"jsonl": ["--input_text", files["jsonl"]],
            "parquet": ["--input_text", tmp_path / "docs.parquet", "--text_field", "content"],
            "dataset": ["--input_text", files["dataset"]],
            "jsonl 1/2": ["--input_text", files["jsonl"], "--shard", "1/2"],
            "parquet 1/2": ["--input_text", tmp_path / "docs.parquet", "--text_field", "content", "--shard", "1/2"]}
    for name, args in runs.items():
        r = run_b(*args, *common, "--export_dir", tmp_path / name)
        assert r.returncode == 0, r.stderr
    for a, b in (("parquet", "jsonl"), ("dataset", "jsonl"), ("parquet 1/2", "jsonl 1/2")):
        assert_same_dataset(tmp_path / a, tmp_path / b)
    rec = json.loads(layout.path(tmp_path / "parquet", layout.CORPUS, M).read_text())
    (f,) = rec["files"]
    assert (f["format"], f["field"]) == ("parquet", "content")
    assert f["sha256"] == hashlib.sha256((tmp_path / "docs.parquet").read_bytes()).hexdigest()
    ref = json.loads(layout.path(tmp_path / "jsonl", layout.CORPUS, M).read_text())
    assert rec["tokens"] == ref["tokens"] == 700 and rec["documents"] == ref["documents"]
    shard = json.loads(layout.path(tmp_path / "parquet 1/2", layout.CORPUS, M).read_text())
    assert shard["shard"] == json.loads(layout.path(tmp_path / "jsonl 1/2", layout.CORPUS, M).read_text())["shard"]

    # stage e reads --eval_text with --text_field, and the selection corpus with the field its record names
    pq.write_table(pa.table({"content": DOCS[::-1]}), tmp_path / "eval.parquet", row_group_size=4)
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompts,number_of_new_tokens,num_samples\nTo be,2,1\n")
    for extra, message in (([], "eval.parquet has no column 'text'"), (["--text_field", "content"], "shares")):
        r = run_python([sys.executable, str(REPO_ROOT / "e_generate_perturbed_results.py"), "--dataset_path",
                        str(tmp_path / "parquet"), "--eval_csv", str(prompts), "--model_type", M, "--device", "cpu",
                        "--perturbation_subset_filenames", "none", "--eval_text", str(tmp_path / "eval.parquet"),
                        "--eval_tokens", "100", *extra], capture_output=True, text=True, cwd=REPO_ROOT)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    r = run_b("--input_csv", prompts, "--text_field", "content", "--export_dir", tmp_path / "prompt", "--model_type", M)
    assert r.returncode == 2 and "--text_field belongs to corpus mode" in r.stderr


def bad_files(d, files) -> dict:
    """name -> (file, words its error line names)"""
    gz, zst = files["jsonl.gz"].read_bytes(), files["jsonl.zst"].read_bytes()
    first_frame = zstandard.ZstdCompressor().compress(jsonl_bytes())
    out = {}

    def put(name, data, *words):
        (d / name).write_bytes(data)
        out[name] = (d / name, words)

    put("cut.jsonl.gz", gz[:len(gz) // 2], "truncated")
    put("cut_trailer.txt.gz", gzip.compress(HELDOUT_PATH.read_bytes())[:-3], "truncated")
    put("cut.jsonl.zst", zst[:len(zst) - 10], "truncated")
    put("cut_one_frame.txt.zst", first_frame[:len(first_frame) // 2], "truncated")
    put("garbage.jsonl.zst", b"this is no zstandard data at all", "not valid zstandard")
    put("latin1.txt.gz", gzip.compress("Hello caf\u00e9".encode("latin-1")), "byte 9 of its decompressed text")
    put("latin1.txt.zst", zstd_frames(("x" * 100 + "caf\u00e9").encode("latin-1")), "byte 103 of its decompressed")
    put("latin1.jsonl.gz", gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), "byte 28 of its decompressed")
    for name, table, words in (("nofield.parquet", pa.table({"body": DOCS}), ("no column 'text'", "body")),
                               ("ints.parquet", pa.table({"text": list(range(len(DOCS)))}), ("'text' holds int64",)),
                               ("null.parquet", pa.table({"text": DOCS[:5] + [None] + DOCS[5:]}), ("row 6", "null"))):
        pq.write_table(table, d / name, row_group_size=2)
        out[name] = (d / name, words)
    par = files["parquet"].read_bytes()
    put("cut.parquet", par[:len(par) // 2], "not a readable Parquet file")
    put("garbage.parquet", b"PAR1" + bytes(range(256)), "not a readable Parquet file")
    arrow = files["arrow"].read_bytes()
    put("cut.arrow", arrow[:len(arrow) // 2], "not a readable Arrow file", "after row")
    put("no_end.arrow", arrow[:-len(cf.ARROW_EOS)], "cut short", f"row {len(DOCS)}")
    put("garbage.arrow", bytes(range(256)), "not a readable Arrow file")
    write_stream(d / "nofield.arrow", pa.table({"body": DOCS}))
    out["nofield.arrow"] = (d / "nofield.arrow", ("no column 'text'",))
    return out


def test_bad_files_are_one_error_line_naming_the_file(files, shipped_path, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for name, (p, words) in bad_files(d, files).items():
        out = tmp_path / f"out_{name}"
        r = run_b("--input_text", files["txt"], p, "--export_dir", out, "--model_type", M)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (name, r.stderr)
        assert str(p) in lines[0] and all(w in lines[0] for w in words), (name, lines[0])
        assert not out.exists(), name


def test_a_datasetdict_directory_and_a_bad_state_json_are_refused(files, tmp_path):
    dd = tmp_path / "dd"
    dd.mkdir()
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    shutil.copytree(files["dataset"], dd / "train")
    with pytest.raises(PipelineError, match="give one split's directory"):
        cf.corpus_files([str(dd)])
    assert cf.corpus_files([str(dd / "train")]) == [dd / "train" / "data-00000-of-00001.arrow"]
    (dd / "train" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00009-of-00010.arrow"}]}))
    with pytest.raises(PipelineError, match="state.json lists data-00009-of-00010.arrow, which is not in"):
        cf.corpus_files([str(dd / "train")])
    (dd / "train" / "state.json").write_text("{not json")
    with pytest.raises(PipelineError, match="cannot read .*state.json"):
        cf.corpus_files([str(dd / "train")])


# --- run_pipeline.sh hands the fields to every stage that reads the texts ------------------------------------------

FAKE_PYTHON = """#!/bin/bash
# the driver runs; every stage (and the stage-d sweep) only logs its command (stage c_analyze leaves the file that
# stage d checks for)
case "$1 $2 $3" in "-m gelutrace.pipeline run") exec {python} "$@";; esac
echo "$*" >> {log}
case "$1" in *c_analyze_weighted_activation_graph.py)
  out="$(dirname "$3")/weighted_graph_analysis"; mkdir -p "$out"; : > "$out/$(basename "$3")_analyzed.json" ;;
esac
"""


def test_pipeline_passes_the_fields_to_the_stages_that_read_the_texts(tmp_path):
    log = tmp_path / "log"
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=log))
    fake.chmod(0o755)
    text = tmp_path / "docs.jsonl"
    text.write_bytes(jsonl_bytes("body"))
    env = dict(os.environ, PYTHON=str(fake), HF_HUB_OFFLINE="1")

    def pipeline(*flags):
        log.unlink(missing_ok=True)
        r = run_python([str(REPO_ROOT / "run_pipeline.sh"), "--text", str(text), "--eval_text", str(text),
                        "--ratios", "0.01", "--effects", "1", *flags, M, str(REPO_ROOT / "parcellation_datasets" /
                        "test_1.csv"), str(tmp_path / "run")], env=env)  # the driver in this process
        commands = {}
        for line in log.read_text().splitlines() if log.exists() else []:
            commands.setdefault(line.split()[0], []).append(line.split())
        return r, commands

    r, cmds = pipeline("--text_field", "body", "--eval_text_field", "q", "--force")
    assert r.returncode == 0, r.stderr
    b = cmds[B]
    assert len(b) == 2 and all(c[c.index("--text_field") + 1] == "body" for c in b)  # the two shards
    (effects,) = cmds["d_calculate_neuron_effects.py"]
    assert effects[effects.index("--text_field") + 1] == "body"
    (e,) = cmds["e_generate_perturbed_results.py"]
    assert e[e.index("--eval_text") + 1] == str(text) and e[e.index("--text_field") + 1] == "q"
    assert "--text_field" not in cmds["c_measure_edge_fidelity.py"][0]  # it reads stage b's record
    # the stamps that decide a rerun hold every setting a stage uses, those of the shell-function stages too
    stamps = tmp_path / "run" / ".pipeline"
    assert "--direct_edges --text_field body" in (stamps / "b.cmd").read_text()
    assert (stamps / "d.cmd").read_text().startswith("subsets_d 0.5\\ 0.8 RATIOS=0.01 degree\\ influence")
    r, cmds = pipeline("--force")  # the default field: the commands as before the flags existed
    assert r.returncode == 0, r.stderr
    assert not any("--text_field" in c for cs in cmds.values() for c in cs)
    for flags in (["--text_field", "body"], ["--eval_text_field", "q"]):
        cut = [str(REPO_ROOT / "run_pipeline.sh"), *flags, "--eval_text", "none", "--ratios", "0.01", M,
               str(REPO_ROOT / "parcellation_datasets" / "test_1.csv"), str(tmp_path / "other")]
        r = run_python(cut, env=env)
        assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "other").exists()
