"""
Merging the shards of a corpus-mode stage-b run (`--shard I/N`, one dataset directory each) into the dataset
directory the unsharded run would have written: integer counts are summed exactly, one layer pair at a time;
mean activations and attributions are recombined from each shard's mean and sample (or scored token) count
(float64).
"""

from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace import PipelineError
from gelutrace.files import atomic, formats, layout
from gelutrace.files.corpusfiles import record_field
from gelutrace.files.dataset import DatasetDir
from gelutrace.graph import store as gs
from gelutrace.graph.causal import CausalEdges
from gelutrace.graph.counts import merge_top
from gelutrace.record import corpus


def check_output_apart(out_dir, dirs: list[Path]):
    """Refuse an output directory that is, lies inside or holds one of the shards (links resolved): the merge would
    replace a shard's files while reading them."""
    out = Path(out_dir).resolve()
    for d in dirs:
        r = d.resolve()
        how = "is" if out == r else "lies inside" if r in out.parents else "holds" if out in r.parents else None
        if how is not None:
            via = "" if Path(out_dir).absolute() == r or how != "is" else f" (it resolves to {r})"
            raise PipelineError(f"--output_dir {out_dir} {how} the shard directory {d}{via}: write the merge into "
                                f"another directory")


def merge_shards(shard_dirs: list[str], out_dir) -> dict:
    """
    Sum complete shard directories of one corpus run into one dataset directory; returns its record. Every
    shard's files, its graph store's included, must be those its manifest lists (size and sha256), and its
    store's node counts those of its frequency file.
    """

    dirs = [Path(s) for s in shard_dirs]
    check_output_apart(out_dir, dirs)
    for d in dirs:
        if not d.is_dir():
            raise PipelineError(f"shard directory {d} does not exist")
        partial = list(d.glob(layout.CORPUS_PARTIAL_DIR.format(m="*")))
        if partial:
            raise PipelineError(f"{d} holds an unfinished run ({partial[0].name}); finish it with --resume first")
        if not list(d.glob(layout.CORPUS.format(m="*"))):
            raise PipelineError(f"{d} has no {layout.CORPUS.format(m='{m}')}: not a finished corpus-mode shard")
    recs = [(ds.m, ds.corpus_record()) for ds in (DatasetDir.find(d, layout.CORPUS) for d in dirs)]
    tops = (layout.TOP_EXAMPLES,) if recs[0][1].get("top_examples") else ()
    for d, (m, _) in zip(dirs, recs):
        store = layout.path(d, layout.WEIGHTED_GRAPH, m)
        if not store.is_dir():
            raise PipelineError(f"{d} has no graph store {store.name}; rerun that shard")
        atomic.verify_output_set(layout.path(d, layout.DATASET_MANIFEST, m),
                             [layout.path(d, f, m) for f in (layout.FREQUENCY, layout.CORPUS) + tops] + atomic.store_files(store),
                             f"the shard in {d}", required=True)
    m, first = recs[0]
    if first.get("shard") is None:
        raise PipelineError(f"{dirs[0]} is not a shard (it was run without --shard)")
    n = first["shard"]["count"]
    same = ("model", "n_layer", "d_mlp", "context", "max_tokens", "tokens", "windows", "top_examples")
    seen = {}
    for d, (mi, rec) in zip(dirs, recs):
        if rec.get("shard") is None:
            raise PipelineError(f"{d} is not a shard (it was run without --shard)")
        if not rec.get("weights"):
            raise PipelineError(f"{d}'s corpus record does not fingerprint the model's weights (written by an older "
                                f"version); rerun that shard")
        for key in same:
            if rec.get(key) != first.get(key):
                raise PipelineError(f"{d} and {dirs[0]} differ in {key} ({rec.get(key)!r} vs {first.get(key)!r}): "
                                    f"shards of different runs")
        origins = corpus.weights_origin(rec["weights"]), corpus.weights_origin(first["weights"])
        if origins[0] != origins[1]:
            raise PipelineError(f"{d} was recorded from {origins[0]} and {dirs[0]} from {origins[1]} of {m}: "
                                f"their weights cannot be shown to be the same, so they are not merged; record "
                                f"every shard from the same source")
        if rec["weights"] != first["weights"]:
            raise PipelineError(f"{d} and {dirs[0]} were made from different weights of {m} (their "
                                f"{'state dicts' if origins[0] == 'weights in memory' else 'safetensors files'}' "
                                f"sha256 differ): shards of different models")
        if [(f["sha256"], record_field(f)) for f in rec["files"]] != [(f["sha256"], record_field(f))
                                                                     for f in first["files"]]:
            raise PipelineError(f"{d} and {dirs[0]} read different text: shards of different corpora")
        if rec["shard"]["count"] != n:
            raise PipelineError(f"{d} is shard {rec['shard']['index']}/{rec['shard']['count']}, but {dirs[0]} is "
                                f"one of {n}: shards of different runs")
        i = rec["shard"]["index"]
        if i in seen:
            raise PipelineError(f"shard {i}/{n} is given twice ({seen[i]} and {d})")
        seen[i] = d
    with_attr = {rec.get("attribution_tokens") is not None for _, rec in recs}
    if len(with_attr) > 1:
        raise PipelineError("some shards were run with --attribution and some without: shards of different runs")
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise PipelineError(f"shard(s) {', '.join(f'{i}/{n}' for i in missing)} missing: the merge needs all {n}")

    n_layer, d_mlp = int(first["n_layer"]), int(first["d_mlp"])
    stores = [gs.read_store(layout.path(d, layout.WEIGHTED_GRAPH, m)) for d in dirs]
    for d, (_, rec), g in zip(dirs, recs, stores):
        if g.num_samples != rec["samples"] or g.header.get("kind") != "adjacent_dense":
            raise PipelineError(f"{d}: its graph store does not match its corpus record; rerun that shard")
    samples = sum(g.num_samples for g in stores)
    node = np.sum([g.activation_count for g in stores], axis=0)
    value_sum = np.zeros(n_layer * d_mlp)
    attribution = np.zeros(n_layer * d_mlp) if True in with_attr else None
    for d, g, (_, rec) in zip(dirs, stores, recs):
        f = layout.path(d, layout.FREQUENCY, m)
        freq = pd.read_csv(f, usecols=["neuron_id", "activation_count", "mean_activation", "attribution"])
        if not np.array_equal(freq["neuron_id"].to_numpy(), np.arange(n_layer * d_mlp)):
            raise PipelineError(f"{f} does not list every neuron in id order")
        if not np.array_equal(freq["activation_count"].to_numpy(), g.activation_count):
            raise PipelineError(f"{d}: the node counts of its graph store differ from {f.name}'s; rerun that shard")
        value_sum += freq["mean_activation"].to_numpy(np.float64) * g.num_samples
        if attribution is not None:  # each shard's mean over its scored tokens, back to its sum
            attribution += freq["attribution"].to_numpy(np.float64) * rec["attribution_tokens"]
    attr_tokens = sum(rec["attribution_tokens"] for _, rec in recs) if attribution is not None else None
    if attribution is not None:
        attribution /= max(attr_tokens, 1)

    def pair(i):
        total = np.zeros((d_mlp, d_mlp), dtype=np.int64)
        for g in stores:
            total += g.blocks[i].counts()
        return total

    with_direct = {g.causal is not None for g in stores}
    if len(with_direct) > 1:
        raise PipelineError("some shards were run with --direct_edges and some without: shards of different runs")
    causal = CausalEdges.merge([g.causal for g in stores]) if True in with_direct else None
    merged_top = merge_top_examples([layout.path(d, layout.TOP_EXAMPLES, m) for d in dirs], first["top_examples"],
                                    n_layer * d_mlp) if tops else None
    out = atomic.lock_directory(atomic.check_output_dir(out_dir, "--output_dir"), "the merge")
    meta = formats.read_graph_meta(dirs[0], m)
    site = {k: meta[k] for k in ("architecture", "neuron_site", "neuron_value") if k in meta} or None
    record = {**first, "shard": None, "samples": samples, "attribution_tokens": attr_tokens,
              "merged_shards": [str(seen[i].resolve()) for i in range(n)]}
    corpus.write_corpus_dataset(out, m, n_layer, d_mlp, samples, node, value_sum, pair, record, site=site,
                         top_examples=merged_top, what="the merge", attribution=attribution, causal=causal)
    return record


def merge_top_examples(files: list[Path], k: int, n_neurons: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """
    The shards' {m}_neuron_top_examples.csv merged, as formats.write_top_examples takes it: per neuron the k largest
    values, ties to the lower sample id (exact: the top k of a union is the top k of its parts' top ks; the
    values round-trip through the CSV), and every sample's texts.
    """
    parts, text = [], {}
    for f in files:
        t = formats.read_top_examples(f).sort_values(["neuron_id", "rank"], kind="stable")
        per = len(t) // n_neurons if n_neurons else 0
        if per * n_neurons != len(t) or not np.array_equal(t["neuron_id"].to_numpy(),
                                                           np.repeat(np.arange(n_neurons), per)):
            raise PipelineError(f"{f} does not hold the same number of examples for each of the {n_neurons} neurons")
        parts.append((t["value"].to_numpy().reshape(n_neurons, per).T, t["sample_id"].to_numpy().reshape(n_neurons, per).T))
        text.update(zip(t["sample_id"].tolist(), zip(t["context"].tolist(), t["token"].tolist())))
    values, ids = merge_top(parts, k)
    return values, ids, text
