"""
Merging the shards of a corpus-mode stage-b run (`--shard I/N`, one dataset directory each) into the dataset
directory the unsharded run would have written: integer counts are summed exactly, one layer pair at a time;
mean activations are recombined from each shard's mean and sample count (float64).
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace import PipelineError
from gelutrace import coactivation as co
from gelutrace import stagefiles as sf
from gelutrace.statistics import merge_top

CORPUS_FORMAT = "gelutrace-corpus"
CORPUS_VERSION = 1


def read_corpus_record(d: Path) -> tuple[str, dict]:
    if not d.is_dir():
        raise PipelineError(f"shard directory {d} does not exist")
    m = sf.model_prefix(d, sf.CORPUS)
    rec_path = sf.path(d, sf.CORPUS, m)
    try:
        rec = json.loads(rec_path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{rec_path} is not valid JSON: {e}") from None
    if rec.get("format") != CORPUS_FORMAT:
        raise PipelineError(f"{rec_path} is not a corpus record")
    return m, rec


def merge_shards(shard_dirs: list[str], out_dir) -> dict:
    """Sum complete shard directories of one corpus run into one dataset directory; returns its record."""
    dirs = [Path(s) for s in shard_dirs]
    for d in dirs:
        if not d.is_dir():
            raise PipelineError(f"shard directory {d} does not exist")
        partial = list(d.glob(sf.CORPUS_PARTIAL_DIR.format(m="*")))
        if partial:
            raise PipelineError(f"{d} holds an unfinished run ({partial[0].name}); finish it with --resume first")
        if not list(d.glob(sf.CORPUS.format(m="*"))):
            raise PipelineError(f"{d} has no {sf.CORPUS.format(m='{m}')}: not a finished corpus-mode shard")
    recs = [read_corpus_record(d) for d in dirs]
    tops = (sf.TOP_EXAMPLES,) if recs[0][1].get("top_examples") else ()
    for d, (m, _) in zip(dirs, recs):
        sf.verify_output_set(sf.path(d, sf.DATASET_MANIFEST, m),
                             [sf.path(d, f, m) for f in (sf.FREQUENCY, sf.CORPUS) + tops], f"the shard in {d}")
    m, first = recs[0]
    if first.get("shard") is None:
        raise PipelineError(f"{dirs[0]} is not a shard (it was run without --shard)")
    n = first["shard"]["count"]
    same = ("model", "n_layer", "d_mlp", "context", "max_tokens", "tokens", "windows", "top_examples")
    seen = {}
    for d, (mi, rec) in zip(dirs, recs):
        if rec.get("shard") is None:
            raise PipelineError(f"{d} is not a shard (it was run without --shard)")
        for key in same:
            if rec.get(key) != first.get(key):
                raise PipelineError(f"{d} and {dirs[0]} differ in {key} ({rec.get(key)!r} vs {first.get(key)!r}): "
                                    f"shards of different runs")
        if [(f["sha256"]) for f in rec["files"]] != [(f["sha256"]) for f in first["files"]]:
            raise PipelineError(f"{d} and {dirs[0]} read different text: shards of different corpora")
        if rec["shard"]["count"] != n:
            raise PipelineError(f"{d} is shard {rec['shard']['index']}/{rec['shard']['count']}, but {dirs[0]} is "
                                f"one of {n}: shards of different runs")
        i = rec["shard"]["index"]
        if i in seen:
            raise PipelineError(f"shard {i}/{n} is given twice ({seen[i]} and {d})")
        seen[i] = d
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise PipelineError(f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing: the merge needs all {n}")

    n_layer, d_mlp = int(first["n_layer"]), int(first["d_mlp"])
    stores = [co.read_store(sf.path(d, sf.WEIGHTED_GRAPH, m)) for d in dirs]
    for d, (_, rec), g in zip(dirs, recs, stores):
        if g.num_samples != rec["samples"] or g.header.get("kind") != "adjacent_dense":
            raise PipelineError(f"{d}: its graph store does not match its corpus record; rerun that shard")
    samples = sum(g.num_samples for g in stores)
    node = np.sum([g.activation_count for g in stores], axis=0)
    value_sum = np.zeros(n_layer * d_mlp)
    for d, g in zip(dirs, stores):
        freq = pd.read_csv(sf.path(d, sf.FREQUENCY, m), usecols=["neuron_id", "mean_activation"])
        if not np.array_equal(freq["neuron_id"].to_numpy(), np.arange(n_layer * d_mlp)):
            raise PipelineError(f"{sf.path(d, sf.FREQUENCY, m)} does not list every neuron in id order")
        value_sum += freq["mean_activation"].to_numpy(np.float64) * g.num_samples

    def pair(i):
        total = np.zeros((d_mlp, d_mlp), dtype=np.int64)
        for g in stores:
            total += g.blocks[i].counts()
        return total

    merged_top = merge_top_examples([sf.path(d, sf.TOP_EXAMPLES, m) for d in dirs], first["top_examples"],
                                    n_layer * d_mlp) if tops else None
    out = sf.lock_directory(sf.check_output_dir(out_dir, "--output_dir"), "the merge")
    manifest = sf.path(out, sf.DATASET_MANIFEST, m)
    run = sf.begin_output_set(manifest)
    sf.path(out, sf.CORPUS, m).unlink(missing_ok=True)
    meta = sf.read_graph_meta(dirs[0], m)
    site = {k: meta[k] for k in ("architecture", "neuron_site", "neuron_value") if k in meta} or None
    sf.write_graph_files_if_stale(out, m, n_layer, d_mlp, write_el=False, site=site)
    sf.write_csv(sf.frequency_table(node, value_sum, samples, d_mlp), sf.path(out, sf.FREQUENCY, m))
    source = {"input_dir": str(out.resolve()), "corpus": sf.CORPUS.format(m=m),
              "merged_from": [str(d.resolve()) for d in dirs]}
    co.write_count_store(sf.path(out, sf.WEIGHTED_GRAPH, m), m, n_layer, d_mlp, samples, node, source, pair_counts=pair)
    if tops:
        sf.write_top_examples(sf.path(out, sf.TOP_EXAMPLES, m), *merged_top)
    else:
        sf.path(out, sf.TOP_EXAMPLES, m).unlink(missing_ok=True)
    record = {**first, "shard": None, "samples": samples,
              "merged_shards": [str(seen[i].resolve()) for i in range(n)]}
    sf.write_json(record, sf.path(out, sf.CORPUS, m), indent=2)
    sf.commit_output_set(manifest, run, [sf.path(out, f, m) for f in (sf.FREQUENCY, sf.ATTRIBUTES, sf.GRAPH_META,
                                                                       sf.CORPUS) + tops])
    return record


def merge_top_examples(files: list[Path], k: int, n_neurons: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """
    The shards' {m}_neuron_top_examples.csv merged, as sf.write_top_examples takes it: per neuron the k largest
    values, ties to the lower sample id (exact: the top k of a union is the top k of its parts' top ks; the
    values round-trip through the CSV), and every sample's texts.
    """
    parts, text = [], {}
    for f in files:
        t = sf.read_top_examples(f).sort_values(["neuron_id", "rank"], kind="stable")
        per = len(t) // n_neurons if n_neurons else 0
        if per * n_neurons != len(t) or not np.array_equal(t["neuron_id"].to_numpy(),
                                                           np.repeat(np.arange(n_neurons), per)):
            raise PipelineError(f"{f} does not hold the same number of examples for each of the {n_neurons} neurons")
        parts.append((t["value"].to_numpy().reshape(n_neurons, per).T, t["sample_id"].to_numpy().reshape(n_neurons, per).T))
        text.update(zip(t["sample_id"].tolist(), zip(t["context"].tolist(), t["token"].tolist())))
    values, ids = merge_top(parts, k)
    return values, ids, text
