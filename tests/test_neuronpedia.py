"""
f_render_neuron_cards.py --neuronpedia: every record of every export against two JSON Schemas, the one of
docs/stage-f.md's "Neuronpedia export" (tests/data/neuronpedia.schema.json) and the one derived from Neuronpedia's
database schema, schema.prisma (tests/data/neuronpedia_records.schema.json), with creatorId Neuronpedia's bot
user; the examples against cards built independently and against transformers' GPT2LMHeadModel with hooks on
`mlp.act`, the figures against the dataset's files, the layout (DIR holds only the model's folder), the data
sha256 against hashlib, the re-export warning, the `neurons` source set, and determinism.
"""

import fcntl
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
import torch

from gelutrace.files import layout
from gelutrace.model import tokens
from gelutrace.report import cards
from gelutrace.report import neuronpedia as npx

from conftest import REPO_ROOT, SHIPPED_NAME, run_python

PROMPTS = [("KING HENRY. Now, lords, ", 6, 3), ("And God said, \"Let there be\", ", 5, 1),
           ("To be, or not to be", 7, 1)]
NEURONS = [2500, 5, 900, 517]  # layers 4, 0, 1, 1 of tinybard's 512-neuron layers
K = 4
SCHEMA = json.loads((REPO_ROOT / "tests" / "data" / "neuronpedia.schema.json").read_text())
PRISMA = json.loads((REPO_ROOT / "tests" / "data" / "neuronpedia_records.schema.json").read_text())
BOT = "clkht01d40000jv08hvalcvly"  # Neuronpedia's bot user (its seed; PUBLIC_ACTIVATIONS_USER_IDS by default)
KIND = {layout.NEURONPEDIA_RELEASE: "release", layout.NEURONPEDIA_MODEL: "model", layout.NEURONPEDIA_SOURCESET: "sourceset",
        layout.NEURONPEDIA_SOURCE_FILE: "source", layout.NEURONPEDIA_FEATURES: "feature",
        layout.NEURONPEDIA_ACTIVATIONS: "activation"}


def env():
    """The scripts' environment, built at call time: pytest changes os.environ from test to test, and run_python
    runs a script in this process only when its environment differs in the variables it allows."""
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def render(*argv):
    return run_python([sys.executable, str(REPO_ROOT / "f_render_neuron_cards.py"), "--model_type", SHIPPED_NAME,
                       "--device", "cpu", *map(str, argv)], capture_output=True, text=True, cwd=REPO_ROOT, env=env())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped_path):
    d = tmp_path_factory.mktemp("np")
    csv = d / "prompts.csv"
    pd.DataFrame(PROMPTS, columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    r = run_python([sys.executable, str(REPO_ROOT / "b_generate_activation_dataset.py"), "--input_csv", str(csv),
                    "--export_dir", str(d / "ds"), "--model_type", SHIPPED_NAME, "--device", "cpu",
                    "--no_edge_list", "--no_activation_lists", "--no_attribution"], capture_output=True, text=True,
                   cwd=REPO_ROOT, env=env())
    assert r.returncode == 0, r.stderr
    return d / "ds"


@pytest.fixture(scope="module")
def export(dataset):
    out = dataset.parent / "np"
    r = render("--dataset_path", dataset, "--neurons", ",".join(map(str, NEURONS)), "--top_examples", K,
               "--output", dataset.parent / "cards", "--neuronpedia", out)
    assert r.returncode == 0, r.stderr
    return out


def files_of(root) -> dict:
    """relative path -> bytes of every file under root (links followed)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def records(folder, name) -> list[dict]:
    data = (folder / name).read_bytes()
    text = gzip.decompress(data) if name.endswith(".gz") else data
    return [json.loads(line) for line in text.decode("ascii").splitlines()]


def sources(export):
    model = export / npx.model_slug(SHIPPED_NAME)
    return {int(p.name.split("-")[0]): p for p in sorted(model.iterdir())}


def check_export(model_dir, creator=BOT) -> int:
    """Every record of every file of an exported model folder valid against both schemas, with creatorId `creator`;
    each source's notes name the sha256 of its features then activations, uncompressed (hashlib over the files).
    Returns the number of records."""
    n = 0
    folders = sorted(model_dir.iterdir())
    assert folders and not model_dir.is_symlink()
    for folder in folders:
        for name, kind in KIND.items():
            for schema in (SCHEMA, PRISMA):
                validator = jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{kind}"})
                for rec in records(folder, name):
                    validator.validate(rec)
                    assert rec["creatorId"] == creator
                    n += schema is SCHEMA
        data = b"".join(gzip.decompress((folder / f).read_bytes())
                        for f in (layout.NEURONPEDIA_FEATURES, layout.NEURONPEDIA_ACTIVATIONS))
        notes = records(folder, layout.NEURONPEDIA_SOURCE_FILE)[0]["notes"]
        assert f"data sha256 {hashlib.sha256(data).hexdigest()} " in notes
    return n


def only_the_model(directory, *models, files=()):
    """DIR holds the models' folders, real directories, and nothing else (no lock, no staging, no version) but the
    given files."""
    assert sorted(p.name for p in directory.iterdir()) == sorted([*models, *files])
    assert all((directory / m).is_dir() and not (directory / m).is_symlink() for m in models)


def test_layout_is_exactly_the_documented_files(export, shipped):
    d = shipped.model.config.d_mlp
    slug = npx.model_slug(SHIPPED_NAME)
    only_the_model(export, slug)
    layers = sorted({n // d for n in NEURONS})
    assert sorted(sources(export)) == layers
    for layer, folder in sources(export).items():
        assert folder.name == f"{layer}-gelutrace-mlp"
        assert sorted(files_of(folder)) == sorted(layout.NEURONPEDIA_FILES)
        for name in layout.NEURONPEDIA_FILES:
            data = (folder / name).read_bytes()
            if name.endswith(".gz"):
                assert data[:2] == b"\x1f\x8b" and data[4:8] == b"\0\0\0\0"  # gzip, no time stamp
                gzip.decompress(data)
            else:
                assert len(records(folder, name)) == 1


def test_every_record_matches_the_schema(export):
    """Both schemas; creatorId is Neuronpedia's bot user by default (schema.prisma requires one on Model,
    SourceRelease, SourceSet, Source and Activation, and the viewer shows only the bot's activations)."""
    n_features = n_activations = 0
    for folder in sources(export).values():
        n_features += len(records(folder, layout.NEURONPEDIA_FEATURES))
        n_activations += len(records(folder, layout.NEURONPEDIA_ACTIVATIONS))
    assert (n_features, n_activations) == (len(NEURONS), len(NEURONS) * K)
    assert check_export(export / npx.model_slug(SHIPPED_NAME)) == n_features + n_activations + 4 * len(sources(export))
    assert npx.DEFAULT_CREATOR_ID == BOT


def test_examples_equal_the_cards_and_transformers(export, dataset, shipped, shipped_hf):
    d = shipped.model.config.d_mlp
    built = {c.neuron_id: c for c in cards.build_cards(shipped.model, shipped.tokenizer, dataset, SHIPPED_NAME,
                                                       np.array(NEURONS), K)}
    folders = sources(export)
    for n, card in built.items():
        layer, dim = divmod(n, d)
        acts = [a for a in records(folders[layer], layout.NEURONPEDIA_ACTIVATIONS) if a["index"] == str(dim)]
        assert len(acts) == len(card.examples) == K
        for rank, (a, e) in enumerate(zip(acts, card.examples)):
            assert a["tokens"] == e.tokens and a["dataIndex"] == str(e.sample_id)
            np.testing.assert_allclose(a["values"], e.shades, rtol=0, atol=1e-6)
            assert a["values"][-1] == pytest.approx(e.value, abs=1e-5)  # the sample's position is the last token
            assert a["maxValue"] == max(a["values"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
            assert a["minValue"] == min(a["values"])
            assert a["id"] == f"tinybard-{layer}-gelutrace-mlp-{dim}-{rank}"
    # one example recomputed from scratch: transformers over the sample's prefix, hooked on mlp.act
    seqs = cards.dataset_sequences(dataset, SHIPPED_NAME)
    layer, dim = divmod(NEURONS[0], d)
    a = records(folders[layer], layout.NEURONPEDIA_ACTIVATIONS)[0]
    assert a["index"] == str(dim)
    prefix = seqs.prefix(int(a["dataIndex"]))
    got = []
    hook = shipped_hf.transformer.h[layer].mlp.act.register_forward_hook(lambda m, i, o: got.append(o[0, :, dim]))
    try:
        with torch.no_grad():
            shipped_hf(torch.tensor([prefix.tolist()]))
    finally:
        hook.remove()
    want = got[0].double().numpy()[-layout.CONTEXT_TOKENS:]
    np.testing.assert_allclose(a["values"], want, atol=1e-4)
    assert a["tokens"] == [tokens.token_text(shipped.tokenizer, t) for t in prefix[-layout.CONTEXT_TOKENS:]]


def test_figures_equal_the_dataset_and_the_weights(export, dataset, shipped):
    d = shipped.model.config.d_mlp
    freq = pd.read_csv(layout.path(dataset, layout.FREQUENCY, SHIPPED_NAME))
    samples = len(pd.read_csv(layout.path(dataset, layout.DATASET, SHIPPED_NAME)))
    vocab = shipped.model.lm_head.weight.shape[0]
    folders = sources(export)
    for n in NEURONS:
        layer, dim = divmod(n, d)
        feats = [f for f in records(folders[layer], layout.NEURONPEDIA_FEATURES) if f["index"] == str(dim)]
        assert len(feats) == 1
        f = feats[0]
        acts = [a for a in records(folders[layer], layout.NEURONPEDIA_ACTIVATIONS) if a["index"] == str(dim)]
        values = [v for a in acts for v in a["values"]]
        assert f["frac_nonzero"] == pytest.approx(freq["activation_count"][n] / samples, rel=1e-12)
        assert f["maxActApprox"] == max(values)
        assert [a["values"][-1] for a in acts] == sorted((a["values"][-1] for a in acts), reverse=True)
        for kind, count in (("freq", len(values)), ("logits", vocab)):
            heights, centres = f[f"{kind}_hist_data_bar_heights"], f[f"{kind}_hist_data_bar_values"]
            assert sum(heights) == count and len(heights) == len(centres) == npx.HIST_BINS
            assert centres == sorted(centres)
        assert min(values) < f["freq_hist_data_bar_values"][0] < f["freq_hist_data_bar_values"][-1] < max(values)
        promoted, suppressed = cards.direct_logit_effect(shipped.model, shipped.tokenizer, n)
        assert f["pos_str"] == [t.token for t in promoted] and f["neg_str"] == [t.token for t in suppressed]
        np.testing.assert_allclose(f["pos_values"], [t.value for t in promoted], rtol=1e-12)
        np.testing.assert_allclose(f["neg_values"], [t.value for t in suppressed], rtol=1e-12)
        w = shipped.model.transformer.h[layer].mlp.c_proj.weight[:, dim].double().detach().numpy()
        effect = shipped.model.lm_head.weight.double().detach().numpy() @ (
            w * shipped.model.transformer.ln_f.weight.double().detach().numpy())
        want, _ = np.histogram(effect, bins=npx.HIST_BINS)
        assert f["logits_hist_data_bar_heights"] == want.tolist()  # over the whole vocabulary
    model = records(next(iter(folders.values())), layout.NEURONPEDIA_MODEL)[0]
    assert (model["layers"], model["neuronsPerLayer"]) == (shipped.model.config.n_layer, d)


def test_same_inputs_give_the_same_bytes(export, dataset):
    slug = npx.model_slug(SHIPPED_NAME)
    first = files_of(export / slug)
    other = dataset.parent / "np2"
    r = render("--dataset_path", dataset, "--neurons", ",".join(map(str, NEURONS)), "--top_examples", K,
               "--output", dataset.parent / "cards2", "--neuronpedia", other)
    assert r.returncode == 0, r.stderr
    assert files_of(other / slug) == first
    check_export(other / slug)
    only_the_model(other, slug)
    old = (export / slug).stat().st_ino
    r = render("--dataset_path", dataset, "--neurons", ",".join(map(str, NEURONS)), "--top_examples", K,
               "--output", dataset.parent / "cards2", "--neuronpedia", export)  # replaces the model's folder
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr  # the same data: nothing to warn of
    assert files_of(export / slug) == first and (export / slug).stat().st_ino != old
    only_the_model(export, slug)  # the old folder is gone


def test_creator_id_is_written_into_every_record(dataset, shipped, tmp_path):
    built = cards.build_cards(shipped.model, shipped.tokenizer, dataset, SHIPPED_NAME, np.array(NEURONS[:2]), 2)
    folder = npx.write_export(tmp_path, built, SHIPPED_NAME, shipped.model, "ds", creator_id="clxyz0000")
    check_export(folder, "clxyz0000")
    only_the_model(tmp_path, folder.name)


def test_model_id_names_the_folder_and_every_record_and_the_api_writes_the_same(export, dataset, shipped, tmp_path):
    """--neuronpedia_model_id gpt2-small: the export of the default id with that id in its place, byte for byte once
    decompressed; gt.neuron_cards(...).to_neuronpedia gives the same files; a bad id is one error line, nothing
    written."""
    import gelutrace as gt
    from gelutrace.api import Dataset

    ids = ",".join(map(str, NEURONS))
    r = render("--dataset_path", dataset, "--neurons", ids, "--top_examples", K, "--output", tmp_path / "cards",
               "--neuronpedia", tmp_path / "np", "--neuronpedia_model_id", "gpt2-small")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "np").iterdir() if not p.name.startswith(".")) == ["gpt2-small"]
    got, want = files_of(tmp_path / "np" / "gpt2-small"), files_of(export / npx.model_slug(SHIPPED_NAME))
    assert sorted(got) == sorted(want)

    for name in want:
        old, new = (re.sub("sha256 [0-9a-f]{64}", "sha256 H", text.decode("ascii").replace("gpt2-small", "tinybard"))
                    for text in (gzip.decompress(x) if name.endswith(".gz") else x for x in (want[name], got[name])))
        assert "tinybard" in old and new == old, name  # gpt2-small where the id was (and the data sha256 of
        # records naming it), and nothing else changed
        assert all(json.loads(line).get("modelId", "gpt2-small") == "gpt2-small"
                   for line in (gzip.decompress(got[name]) if name.endswith(".gz") else got[name]).splitlines())
    for folder in (tmp_path / "np" / "gpt2-small").iterdir():
        assert records(folder, layout.NEURONPEDIA_MODEL)[0]["id"] == "gpt2-small"
        assert records(folder, layout.NEURONPEDIA_RELEASE)[0]["name"] == "gelutrace-gpt2-small"
        assert all(a["id"].startswith("gpt2-small-") for a in records(folder, layout.NEURONPEDIA_ACTIVATIONS))
    check_export(tmp_path / "np" / "gpt2-small")
    only_the_model(tmp_path / "np", "gpt2-small")
    built = gt.neuron_cards(shipped, Dataset(dataset, SHIPPED_NAME), NEURONS, k=K)
    api = built.to_neuronpedia(tmp_path / "api", "gpt2-small")
    assert files_of(api) == got
    only_the_model(tmp_path / "api", "gpt2-small")
    for bad in ("GPT2", "-x", "a b", ""):
        r = render("--dataset_path", dataset, "--neurons", ids, "--output", tmp_path / "c2", "--neuronpedia",
                   tmp_path / "np2", "--neuronpedia_model_id", bad)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, bad
        assert not (tmp_path / "np2").exists() and not (tmp_path / "c2").exists()
    r = render("--dataset_path", dataset, "--neurons", ids, "--neuronpedia_model_id", "gpt2-small")
    assert r.returncode == 2 and "--neuronpedia_model_id needs --neuronpedia" in r.stderr


def test_export_onto_a_file_is_refused(dataset, tmp_path):
    (tmp_path / "file").write_text("x")
    r = render("--dataset_path", dataset, "--neurons", "5", "--output", tmp_path / "cards",
               "--neuronpedia", tmp_path / "file")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "--neuronpedia" in r.stderr and not (tmp_path / "cards").exists()
    (tmp_path / "np").mkdir()
    (tmp_path / "np" / npx.model_slug(SHIPPED_NAME)).write_text("x")  # the model's folder a file
    r = render("--dataset_path", dataset, "--neurons", "5", "--output", tmp_path / "cards",
               "--neuronpedia", tmp_path / "np")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "np" / npx.model_slug(SHIPPED_NAME)).read_text() == "x"


def test_only_an_earlier_export_is_replaced_and_ids_are_checked_before_any_work(dataset, tmp_path):
    """DIR/{id} that is a plain directory (a model checkpoint, a run's modules/), a link to elsewhere or a file is
    left alone with one error line; so are an empty DIR and bad creator ids; a dangling link an interrupted export
    left is replaced."""
    slug = npx.model_slug(SHIPPED_NAME)
    plain = tmp_path / "plain"
    (plain / slug).mkdir(parents=True)
    (plain / slug / "config.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / slug).symlink_to(elsewhere)
    cases = [(["--neuronpedia", plain], "is a directory, not an earlier export"),
             (["--neuronpedia", linked], "is a link to elsewhere"),
             (["--neuronpedia", ""], "needs a directory"),
             (["--neuronpedia", tmp_path / "np", "--neuronpedia_creator_id", ""], "--neuronpedia_creator_id"),
             (["--neuronpedia", tmp_path / "np", "--neuronpedia_creator_id", "a b"], "--neuronpedia_creator_id")]
    for flags, why in cases:
        r = render("--dataset_path", dataset, "--neurons", "5", "--output", tmp_path / "cards", *flags)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert why in r.stderr, (flags, r.stderr)
        assert not (tmp_path / "cards").exists() and not (tmp_path / "np").exists()
    assert (plain / slug / "config.json").read_text() == "{}" and (elsewhere / "keep.txt").read_text() == "x"
    assert not (REPO_ROOT / slug).exists()  # the empty DIR wrote nothing into the working directory
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / slug).symlink_to(f".{slug}.v0gone")  # as an export cut short between its renames leaves it
    r = render("--dataset_path", dataset, "--neurons", "5", "--output", tmp_path / "cards", "--neuronpedia", dangling)
    assert r.returncode == 0, r.stderr
    assert (dangling / slug / "0-gelutrace-mlp").is_dir()  # neuron 5 is in layer 0
    check_export(dangling / slug)
    only_the_model(dangling, slug)


def test_a_model_id_too_long_for_a_folder_name_is_refused_before_any_work(dataset, small, tmp_path):
    """The model id names DIR/{id}/ and its staging folder beside it, which must fit the filesystem's 255-byte file
    names: an id past 200 characters is one error line before the cards are built (and a PipelineError from the
    API); one of 200 characters exports, and its staging name fits."""
    long_id = "a" * 230  # its folder's name fits, its staging folder's does not
    r = render("--dataset_path", dataset, "--neurons", "5", "--output", tmp_path / "cards", "--neuronpedia",
               tmp_path / "np", "--neuronpedia_model_id", long_id)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--neuronpedia_model_id" in r.stderr and "200" in r.stderr
    assert not (tmp_path / "cards").exists() and not (tmp_path / "np").exists()
    with pytest.raises(npx.PipelineError, match="200"):
        small[2].to_neuronpedia(tmp_path / "np", model_id="a" * 201)
    assert len(f".{'a' * 200}.gelutrace-staging-{'0' * 12}".encode()) <= os.pathconf(tmp_path, "PC_NAME_MAX")
    folder = small[2].to_neuronpedia(tmp_path / "np", model_id="a" * 200)
    check_export(folder)
    only_the_model(tmp_path / "np", "a" * 200)


def test_api_export_checks_its_arguments_and_takes_the_lock(dataset, shipped, tmp_path):
    from gelutrace import PipelineError
    from gelutrace.api import Cards

    built = Cards(cards.build_cards(shipped.model, shipped.tokenizer, dataset, SHIPPED_NAME, np.array([5]), 2),
                  SHIPPED_NAME, shipped.model, "ds")
    for kwargs in ({"model_id": 5}, {"model_id": b"x"}, {"creator_id": 5}, {"creator_id": ""}):
        with pytest.raises(PipelineError):
            built.to_neuronpedia(tmp_path / "np", **kwargs)
    with pytest.raises(PipelineError, match="needs a directory"):
        built.to_neuronpedia("")
    with pytest.raises(PipelineError, match="needs the model"):
        Cards(built.cards, SHIPPED_NAME).to_neuronpedia(tmp_path / "np")
    assert not (tmp_path / "np").exists()
    (tmp_path / "locked").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path / "locked")], stdout=subprocess.PIPE, text=True)
    try:  # another process's export holds the directory itself
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineError, match="another run is writing"):
            built.to_neuronpedia(tmp_path / "locked")
    finally:
        holder.kill()
        holder.wait()
    fd = os.open(tmp_path / "locked", os.O_RDONLY)
    try:  # and this process's, from another call (a thread): the lock is per call, not per process
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(PipelineError, match="another run is writing"):
            built.to_neuronpedia(tmp_path / "locked")
    finally:
        os.close(fd)
    assert list((tmp_path / "locked").iterdir()) == []
    folder = built.to_neuronpedia(tmp_path / "locked")  # and the lock is let go after each export
    assert (folder / "0-gelutrace-mlp").is_dir()
    built.to_neuronpedia(tmp_path / "locked")
    check_export(folder)
    only_the_model(tmp_path / "locked", folder.name)
    with pytest.raises(PipelineError, match="--neuronpedia_source_set"):
        built.to_neuronpedia(tmp_path / "np", source_set="layers")
    assert not (tmp_path / "np").exists()


def test_model_slug():
    assert npx.model_slug("tinybard") == "tinybard"
    assert npx.model_slug("GPT2-Medium") == "gpt2-medium"
    assert npx.model_slug("my model.v2") == "my-model-v2"
    assert npx.model_slug("...") == "model"


@pytest.fixture(scope="module")
def small(dataset, shipped):
    """Cards of neurons 5 and 600 (layers 0 and 1) with 2 and with 3 examples each: two exports of different data."""
    from gelutrace.api import Cards

    return {k: Cards(cards.build_cards(shipped.model, shipped.tokenizer, dataset, SHIPPED_NAME, np.array([5, 600]), k),
                     SHIPPED_NAME, shipped.model, "ds") for k in (2, 3)}


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def test_reexport_over_other_data_warns_once(dataset, tmp_path):
    """Neuronpedia skips what it has (ON CONFLICT DO NOTHING, the same activation ids): a re-export into the same
    model id whose data sha256 differs from the existing export's gives one warning line, exit 0, and is written;
    the same data again, or another model id, gives none."""
    def run(k, *flags):
        r = render("--dataset_path", dataset, "--neurons", "5,600", "--top_examples", k, "--output",
                   tmp_path / "cards", "--neuronpedia", tmp_path / "np", *flags)
        assert r.returncode == 0, r.stderr
        return r.stderr

    slug = npx.model_slug(SHIPPED_NAME)
    assert warnings_of(run(2)) == []
    notes = {p.name: records(p, layout.NEURONPEDIA_SOURCE_FILE)[0]["notes"] for p in (tmp_path / "np" / slug).iterdir()}
    warned = warnings_of(run(3))
    assert len(warned) == 1, warned
    assert "0-gelutrace-mlp, 1-gelutrace-mlp" in warned[0] and "delete the source" in warned[0]
    assert all(len(records(p, layout.NEURONPEDIA_ACTIVATIONS)) == 3 for p in (tmp_path / "np" / slug).iterdir())
    assert all(records(p, layout.NEURONPEDIA_SOURCE_FILE)[0]["notes"] != notes[p.name]
               for p in (tmp_path / "np" / slug).iterdir())
    check_export(tmp_path / "np" / slug)
    assert warnings_of(run(3)) == []  # the same data as the export there
    assert warnings_of(run(2, "--neuronpedia_model_id", "other")) == []  # a new model id
    only_the_model(tmp_path / "np", slug, "other")


def test_a_failed_export_leaves_the_earlier_one_and_dir_only_the_model(small, tmp_path, monkeypatch):
    """An error while writing, or in the rename that switches the folders, leaves the earlier export byte for byte
    and DIR with nothing but the model's folder."""
    d = tmp_path / "np"
    folder = small[2].to_neuronpedia(d)
    only_the_model(d, folder.name)
    before = files_of(folder)

    def broken(*args, **kwargs):
        raise RuntimeError("cut")

    with monkeypatch.context() as mp:
        mp.setattr(npx, "feature_record", broken)
        with pytest.raises(RuntimeError, match="cut"):
            small[3].to_neuronpedia(d)
    assert files_of(folder) == before
    only_the_model(d, folder.name)
    with monkeypatch.context() as mp:  # the switch itself fails, where no one-step exchange is available
        mp.setattr(npx, "_exchange", lambda a, b: False)
        mp.setattr(npx.os, "rename", broken)
        with pytest.raises(RuntimeError, match="cut"):
            small[3].to_neuronpedia(d)
    assert files_of(folder) == before
    only_the_model(d, folder.name)
    with monkeypatch.context() as mp:  # and succeeds the same way with two renames
        mp.setattr(npx, "_exchange", lambda a, b: False)
        small[3].to_neuronpedia(d)
    assert files_of(folder) != before
    check_export(folder)
    only_the_model(d, folder.name)


def test_leftovers_are_removed_and_foreign_links_never_followed(small, tmp_path):
    """What an export cut short leaves (a staging folder; the replaced folder, put back when the cut came between
    the two renames) and what the older layout left (the link, its versions) are removed by the next export; a
    link among them is removed, never what it points to; another model's folder is left alone; an older lock file
    is left (removing a lock file another run may have just opened would break its exclusion)."""
    slug = npx.model_slug(SHIPPED_NAME)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    d = tmp_path / "np"
    (d / f".{slug}.v0old" / "0-gelutrace-mlp").mkdir(parents=True)
    (d / slug).symlink_to(f".{slug}.v0old")  # the older layout: a link to its version
    (d / f".{slug}.v0stale").mkdir()
    (d / layout.LOCK_FILE).write_text("")
    (d / f".{slug}.gelutrace-staging-dead" / "0").mkdir(parents=True)
    (d / f".{slug}.gelutrace-staging-link").symlink_to(outside)
    (d / f".{slug}.gelutrace-old-link").symlink_to(outside)
    (d / "othermodel").mkdir()
    (d / "othermodel" / "x.txt").write_text("y")
    folder = small[2].to_neuronpedia(d)
    only_the_model(d, slug, "othermodel", files=[layout.LOCK_FILE])
    assert (outside / "keep.txt").read_text() == "x" and (d / "othermodel" / "x.txt").read_text() == "y"
    check_export(folder)
    # cut between the renames: no DIR/{model}, the earlier export under its staged name; it is put back (and, its
    # data differing, warned of) before the new one replaces it
    os.replace(folder, d / f".{slug}.gelutrace-old-0123")
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        small[3].to_neuronpedia(d)
    assert len(warnings_of(err.getvalue())) == 1
    only_the_model(d, slug, "othermodel", files=[layout.LOCK_FILE])
    check_export(folder)


def test_neurons_source_set_names_sources_by_layer(export, dataset, shipped, tmp_path):
    """--neuronpedia_source_set neurons: sources named by the plain layer number in the source set `neurons`, as
    Neuronpedia's own MLP-neuron sources; otherwise the default export, record for record; the API writes the same
    files; a bad set or one without --neuronpedia is one error line."""
    import gelutrace as gt
    from gelutrace.api import Dataset

    ids = ",".join(map(str, NEURONS))
    r = render("--dataset_path", dataset, "--neurons", ids, "--top_examples", K, "--output", tmp_path / "cards",
               "--neuronpedia", tmp_path / "np", "--neuronpedia_source_set", "neurons")
    assert r.returncode == 0, r.stderr
    slug = npx.model_slug(SHIPPED_NAME)
    only_the_model(tmp_path / "np", slug)
    check_export(tmp_path / "np" / slug)
    d = shipped.model.config.d_mlp
    layers = sorted({n // d for n in NEURONS})
    assert sorted(p.name for p in (tmp_path / "np" / slug).iterdir()) == sorted(map(str, layers))
    for layer in layers:
        new, old = tmp_path / "np" / slug / str(layer), export / slug / f"{layer}-gelutrace-mlp"
        for name in layout.NEURONPEDIA_FILES:
            for a, b in zip(records(new, name), records(old, name), strict=True):
                for rec in (a, b):
                    if "notes" in rec:  # the data sha256, of other records
                        rec["notes"] = re.sub("[0-9a-f]{64}", "H", rec["notes"])
                want = json.loads(json.dumps(b).replace(f"{layer}-gelutrace-mlp", str(layer))
                                  .replace('"gelutrace-mlp"', '"neurons"'))
                assert a == want, name
        assert {a["layer"] for a in records(new, layout.NEURONPEDIA_ACTIVATIONS)} == {str(layer)}
        assert records(new, layout.NEURONPEDIA_SOURCE_FILE)[0]["setName"] == "neurons"
        assert records(new, layout.NEURONPEDIA_SOURCESET)[0]["name"] == "neurons"
        assert all(a["id"].startswith(f"{slug}-{layer}-") for a in records(new, layout.NEURONPEDIA_ACTIVATIONS))
    built = gt.neuron_cards(shipped, Dataset(dataset, SHIPPED_NAME), NEURONS, k=K)
    assert files_of(built.to_neuronpedia(tmp_path / "api", source_set="neurons")) == files_of(tmp_path / "np" / slug)
    for flags, why in ((["--neuronpedia", tmp_path / "np2", "--neuronpedia_source_set", "layers"], "invalid choice"),
                       (["--neuronpedia_source_set", "neurons"], "--neuronpedia_source_set needs --neuronpedia")):
        r = render("--dataset_path", dataset, "--neurons", ids, "--output", tmp_path / "c2", *flags)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert why in r.stderr and not (tmp_path / "np2").exists() and not (tmp_path / "c2").exists()


def test_histogram_of_equal_values_has_two_bars():
    """A viewer shades each bar by its place between the first bar's value and the last's: one bar gives 0/0."""
    for v in (2.5, 0.0, -1.0):
        heights, values = npx.histogram([v] * 3)
        assert len(heights) == len(values) >= 2 and sum(heights) == 3
        assert values[0] == v and heights[0] == 3 and len(set(values)) == len(values)
    assert npx.histogram([]) == ([], [])
    heights, values = npx.histogram([0.0, 1.0])
    assert len(heights) == npx.HIST_BINS and sum(heights) == 2


def prisma_schema(text: str) -> dict:
    """The $defs of tests/data/neuronpedia_records.schema.json from a schema.prisma: per table, its scalar and
    enum columns with their JSON types, required those with neither ?, [], @default nor @updatedAt."""
    tables = {"release": "SourceRelease", "model": "Model", "sourceset": "SourceSet", "source": "Source",
              "feature": "Neuron", "activation": "Activation"}
    scalars = {"String": {"type": "string"}, "Int": {"type": "integer"}, "Float": {"type": "number"},
               "Boolean": {"type": "boolean"}, "DateTime": {"type": "string"}, "Json": {}}
    enums = {m.group(1): re.findall(r"^\s*(\w+)\s*$", m.group(2), re.M)
             for m in re.finditer(r"^enum (\w+) \{(.*?)^\}", text, re.M | re.S)}
    defs = {}
    for kind, table in tables.items():
        body = re.search(rf"^model {table} \{{(.*?)^\}}", text, re.M | re.S).group(1)
        props, required = {}, []
        for line in body.splitlines():
            line = line.split("//")[0].strip()
            m = re.match(r"(\w+)\s+(\w+)(\[\]|\?)?\s*(.*)", line)
            if not m or not (m.group(2) in scalars or m.group(2) in enums):
                continue  # a comment, an @@ line or a relation
            name, typ, mod, attrs = m.groups()
            t = dict(scalars[typ]) if typ in scalars else {"enum": enums[typ]}
            props[name] = {"type": "array", "items": t} if mod == "[]" else {"anyOf": [t, {"type": "null"}]} \
                if mod == "?" else t
            if mod is None and "@default" not in attrs and "@updatedAt" not in attrs:
                required.append(name)
        defs[kind] = {"type": "object", "required": required, "additionalProperties": False, "properties": props}
    return defs


# Neuronpedia's schema.prisma: NEURONPEDIA_SCHEMA_PRISMA, or the reference copy in ../shared beside the checkout
SCHEMA_PRISMA = Path(os.environ.get("NEURONPEDIA_SCHEMA_PRISMA") or
                     REPO_ROOT.parent / "shared" / "reference" / "neuronpedia" / "schema.prisma")


@pytest.mark.skipif(not SCHEMA_PRISMA.is_file(),
                    reason="no schema.prisma: set NEURONPEDIA_SCHEMA_PRISMA to Neuronpedia's apps/webapp/prisma/schema.prisma")
def test_records_schema_is_derived_from_schema_prisma():
    text = SCHEMA_PRISMA.read_text(encoding="utf-8")
    assert prisma_schema(text) == PRISMA["$defs"]
    for kind in ("release", "model", "sourceset", "source", "activation"):
        assert "creatorId" in PRISMA["$defs"][kind]["required"]  # what the importer failed on without the flag
