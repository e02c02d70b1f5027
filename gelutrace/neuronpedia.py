"""
Neuron cards in Neuronpedia's export layout (f_render_neuron_cards.py --neuronpedia DIR), the layout its
importer reads and its own exports are written in:

    DIR/{model}/{layer}-gelutrace-mlp/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl   one record each
        features/batch-0.jsonl.gz      one record per neuron of the layer (a Neuronpedia "Neuron")
        activations/batch-0.jsonl.gz   one record per top example (a Neuronpedia "Activation")

one source folder per layer that has cards; the field names are those of Neuronpedia's database tables
(Neuron, Activation, Model, Source, SourceSet, SourceRelease). The model's folder is written as one set
(stagefiles.atomic_dir) and every byte depends on the cards and the model only: no timestamps, no random ids,
gzip without a time stamp or file name, so the same inputs give the same files.
"""

import gzip
import json
import re
from pathlib import Path

import numpy as np

from gelutrace import PipelineError
from gelutrace import stagefiles as sf
from gelutrace.cards import Card, has_logit_effect, logit_effect

CREATOR = "gelutrace"  # creatorName of the release and source set; the model record's owner
HIST_BINS = 40  # equal-width bins of each histogram, from its smallest value to its largest


def model_slug(m: str) -> str:
    """The model id Neuronpedia accepts (letters, digits, dashes, underscores; lower case) from the prefix {m}."""
    return re.sub(r"[^a-z0-9_-]+", "-", m.lower()).strip("-") or "model"


def check_model_id(given: str) -> str:
    """A --neuronpedia_model_id (Neuronpedia's own id of the model, e.g. gpt2-small), refused unless it is one."""
    if not isinstance(given, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", given):
        raise PipelineError(f"--neuronpedia_model_id {given!r}: a Neuronpedia model id is lower-case letters, digits, "
                            f"'-' and '_', starting with a letter or digit")
    return given


def source_id(layer: int) -> str:
    return sf.NEURONPEDIA_SOURCE.format(layer=int(layer))


def release_name(model_id: str) -> str:
    return f"{CREATOR}-{model_id}"


def check_target(directory, model_id: str) -> Path:
    """Check up front that DIR can hold the export: a directory (or creatable), its model folder not a file."""
    if not str(directory).strip():
        raise PipelineError("--neuronpedia needs a directory, got an empty path")
    d = sf.check_output_dir(directory, "--neuronpedia")
    t = d / model_id
    # only an earlier export (a link to its version beside it, even one a crash left dangling) is replaced
    if (t.exists() or t.is_symlink()) and sf.own_version(t) is None:
        what = "a link to elsewhere" if t.is_symlink() else "a directory" if t.is_dir() else "a file"
        raise PipelineError(f"--neuronpedia {d}: {t} is {what}, not an earlier export of this tool: it is left "
                            f"alone (remove it, or export into another directory or under another "
                            f"--neuronpedia_model_id)")
    return d


def histogram(values, bins: int = HIST_BINS) -> tuple[list[int], list[float]]:
    """(bar heights, bar values): counts in `bins` equal-width bins over [min, max] and the bins' centres; one bar
    when every value is the same, none for no values. The heights sum to the number of values."""
    v = np.asarray(values, np.float64).ravel()
    if not v.size:
        return [], []
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return [int(v.size)], [lo]
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return counts.astype(int).tolist(), ((edges[:-1] + edges[1:]) / 2).tolist()


def check_creator_id(given: str) -> str:
    """A --neuronpedia_creator_id: a non-empty string without spaces."""
    if not isinstance(given, str) or not re.fullmatch(r"\S+", given):
        raise PipelineError(f"--neuronpedia_creator_id {given!r}: the id of a Neuronpedia user, a non-empty string "
                            f"without spaces")
    return given


def _creator(creator_id: str | None) -> dict:
    return {} if creator_id is None else {"creatorId": creator_id}


def activation_records(card: Card, model_id: str, creator_id: str | None = None) -> list[dict]:
    """The card's top examples, rank 0 first: each context's tokens and the neuron's value at each of them."""
    src, index = source_id(card.layer), str(card.dimension)
    out = []
    for rank, e in enumerate(card.examples):
        values = [float(v) for v in np.asarray(e.shades, np.float64)]
        if len(values) != len(e.tokens) or not values:
            raise PipelineError(f"neuron {card.neuron_id}'s example {rank} has {len(e.tokens)} tokens and "
                                f"{len(values)} values")
        top = int(np.argmax(values))
        out.append({"id": f"{model_id}-{src}-{index}-{rank}", "modelId": model_id, "layer": src, "index": index,
                    "tokens": list(e.tokens), "values": values, "maxValue": values[top], "maxValueTokenIndex": top,
                    "minValue": min(values), "dataIndex": str(e.sample_id), **_creator(creator_id)})
    return out


def feature_record(card: Card, model_id: str, activations: list[dict], logits: np.ndarray | None,
                   creator_id: str | None = None) -> dict:
    """The neuron: its firing frequency, largest value, promoted and suppressed tokens and two histograms."""
    values = [v for a in activations for v in a["values"]]
    act_h, act_v = histogram(values)
    logit_h, logit_v = histogram(logits if logits is not None else [])
    return {"modelId": model_id, "layer": source_id(card.layer), "index": str(card.dimension),
            "sourceSetName": sf.NEURONPEDIA_SET,
            "maxActApprox": max((a["maxValue"] for a in activations), default=0.0),
            "frac_nonzero": float(card.frequency),
            "pos_str": [t.token for t in card.promoted], "pos_values": [float(t.value) for t in card.promoted],
            "neg_str": [t.token for t in card.suppressed], "neg_values": [float(t.value) for t in card.suppressed],
            "freq_hist_data_bar_heights": act_h, "freq_hist_data_bar_values": act_v,
            "logits_hist_data_bar_heights": logit_h, "logits_hist_data_bar_values": logit_v,
            **_creator(creator_id)}


def metadata_records(m: str, model, layer: int, n_neurons: int, dataset: str, creator_id: str | None = None,
                     model_id: str | None = None) -> dict[str, dict]:
    """release.jsonl, model.jsonl, sourceset.jsonl and source.jsonl of one layer's source folder."""
    cfg = model.config
    model_id, src = model_id or model_slug(m), source_id(layer)
    who = _creator(creator_id)
    what = f"GELU MLP neurons of {m} (post-GELU values)"
    release = {"name": release_name(model_id), "description": f"{what}: top-activating samples, direct logit "
               f"effects and firing frequencies from a {CREATOR} dataset", "descriptionShort": what,
               "creatorName": CREATOR, "creatorNameShort": CREATOR, "urls": [], "visibility": "PUBLIC", **who}
    model_rec = {"id": model_id, "displayName": m, "displayNameShort": m, "layers": int(cfg.n_layer),
                 "neuronsPerLayer": int(cfg.d_mlp), "owner": CREATOR, "instruct": False,
                 "inferenceEnabled": False, "visibility": "PUBLIC", **who}
    if getattr(cfg, "n_embd", None) is not None:
        model_rec["dimension"] = int(cfg.n_embd)
    sourceset = {"modelId": model_id, "name": sf.NEURONPEDIA_SET, "description": "MLP neurons (post-GELU)",
                 "creatorName": CREATOR, "urls": [], "releaseName": release_name(model_id), "visibility": "PUBLIC",
                 "hasDashboards": True, **who}
    source = {"id": src, "modelId": model_id, "setName": sf.NEURONPEDIA_SET, "visibility": "PUBLIC",
              "hasDashboards": True, "inferenceEnabled": False, "dataset": dataset,
              "notes": f"{n_neurons} of the {int(cfg.d_mlp)} MLP neurons of layer {int(layer)}", **who}
    return {sf.NEURONPEDIA_RELEASE: release, sf.NEURONPEDIA_MODEL: model_rec,
            sf.NEURONPEDIA_SOURCESET: sourceset, sf.NEURONPEDIA_SOURCE_FILE: source}


def _jsonl(records: list[dict]) -> bytes:
    try:
        return "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode("ascii")
    except ValueError:
        raise PipelineError("a value to export is not finite (NaN or infinite): the model's activations or "
                            "weights are damaged") from None


def _write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)  # no time stamp, no file name: the same bytes
    path.write_bytes(data)


def write_export(directory, cards: list[Card], m: str, model, dataset: str, creator_id: str | None = None,
                 model_id: str | None = None) -> Path:
    """
    Write the cards into DIR/{model_id}/ (replaced as one set: a reader finds the old export or the new one) and
    return that folder. A layer's neurons are in dimension order, each neuron's examples rank 0 first.
    model_id: the records' modelId (default: the slug of m).
    """
    model_id = model_id or model_slug(m)
    layers: dict[int, list[Card]] = {}
    for c in cards:
        layers.setdefault(int(c.layer), []).append(c)
    target = Path(directory) / model_id
    with sf.atomic_dir(target) as version:
        for layer in sorted(layers):
            folder = version / source_id(layer)
            features, activations = [], []
            for c in sorted(layers[layer], key=lambda c: c.dimension):
                acts = activation_records(c, model_id, creator_id)
                logits = logit_effect(model, c.neuron_id) if has_logit_effect(model) else None
                features.append(feature_record(c, model_id, acts, logits, creator_id))
                activations += acts
            for name, rec in metadata_records(m, model, layer, len(layers[layer]), dataset, creator_id,
                                              model_id).items():
                _write(folder / name, _jsonl([rec]))
            _write(folder / sf.NEURONPEDIA_FEATURES, _jsonl(features))
            _write(folder / sf.NEURONPEDIA_ACTIVATIONS, _jsonl(activations))
    return target
