"""
Neuron cards in Neuronpedia's export layout (f_render_neuron_cards.py --neuronpedia DIR), the layout its
importer reads and its own exports are written in:

    DIR/{model}/{source}/              {source}: {layer}-gelutrace-mlp, or {layer} with the source set `neurons`
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl   one record each
        features/batch-0.jsonl.gz      one record per neuron of the layer (a Neuronpedia "Neuron")
        activations/batch-0.jsonl.gz   one record per top example (a Neuronpedia "Activation")

one source folder per layer that has cards; the field names are those of Neuronpedia's database tables
(Neuron, Activation, Model, Source, SourceSet, SourceRelease), and every record that has a creatorId carries
one. DIR holds nothing else of ours once an export ends: the model's folder is staged in a directory beside
it that is renamed in (and the replaced folder removed), under an flock on DIR itself, not a lock file. Every
byte depends on the cards and the model only: no timestamps, no random ids, gzip without a time stamp or file
name, so the same inputs give the same files.
"""

import contextlib
import ctypes
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np

from gelutrace import PipelineError
from gelutrace.files import atomic, layout
from gelutrace.report.cards import Card, has_logit_effect, logit_effect

CREATOR = "gelutrace"  # creatorName of the release and source set; the model record's owner
HIST_BINS = 40  # equal-width bins of each histogram, from its smallest value to its largest
# The creatorId written by default: Neuronpedia's bot user, which its database seed creates and which
# PUBLIC_ACTIVATIONS_USER_IDS holds by default. Model, SourceRelease, SourceSet, Source and Activation require a
# creatorId, and a neuron page shows only activations whose creatorId is in that list; Neuronpedia's own export
# tools write this id on every record.
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
NEURONS_SET = "neurons"  # the source set of Neuronpedia's own MLP-neuron sources, whose ids are the layer numbers
SOURCE_SETS = (layout.NEURONPEDIA_SET, NEURONS_SET)  # --neuronpedia_source_set; the first is the default
_HASH = re.compile(r"data sha256 ([0-9a-f]{64})")  # in the source record's notes


def model_slug(m: str) -> str:
    """The model id Neuronpedia accepts (letters, digits, dashes, underscores; lower case) from the prefix {m}."""
    return re.sub(r"[^a-z0-9_-]+", "-", m.lower()).strip("-") or "model"


# the longest model id: its folder's staging name (.{id}.gelutrace-staging-{12 hex}) must fit a file name (255 bytes)
MODEL_ID_MAX = 200


def check_model_id(given: str) -> str:
    """A --neuronpedia_model_id (Neuronpedia's own id of the model, e.g. gpt2-small), refused unless it is one."""
    if not isinstance(given, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", given):
        raise PipelineError(f"--neuronpedia_model_id {given!r}: a Neuronpedia model id is lower-case letters, digits, "
                            f"'-' and '_', starting with a letter or digit")
    if len(given) > MODEL_ID_MAX:
        raise PipelineError(f"--neuronpedia_model_id {given[:20]}... has {len(given)} characters: at most "
                            f"{MODEL_ID_MAX} (it names the model's folder)")
    return given


def check_source_set(given: str) -> str:
    """A --neuronpedia_source_set: gelutrace-mlp (sources {layer}-gelutrace-mlp) or neurons (sources {layer})."""
    if given not in SOURCE_SETS:
        raise PipelineError(f"--neuronpedia_source_set {given!r}: one of {', '.join(SOURCE_SETS)}")
    return given


def source_id(layer: int, source_set: str = layout.NEURONPEDIA_SET) -> str:
    """The layer's source id: {layer}-gelutrace-mlp, or the plain layer number in the source set `neurons`."""
    return str(int(layer)) if source_set == NEURONS_SET else layout.NEURONPEDIA_SOURCE.format(layer=int(layer))


def release_name(model_id: str) -> str:
    return f"{CREATOR}-{model_id}"


def check_target(directory, model_id: str) -> Path:
    """Check up front that DIR can hold the export: a directory (or creatable), its model folder not a file."""
    if not str(directory).strip():
        raise PipelineError("--neuronpedia needs a directory, got an empty path")
    d = atomic.check_output_dir(directory, "--neuronpedia")
    if len(model_id) > MODEL_ID_MAX:  # a model's own name, made an id: too long to name its folder
        raise PipelineError(f"--neuronpedia: the model id {model_id[:20]}... has {len(model_id)} characters, at most "
                            f"{MODEL_ID_MAX}: give a shorter --neuronpedia_model_id")
    t = d / model_id
    # only an earlier export is replaced: a folder of source folders this tool wrote, or (an older layout) a link
    # to its version beside it, even one a crash left dangling
    if (t.exists() or t.is_symlink()) and atomic.own_version(t) is None and not is_export(t):
        what = "a link to elsewhere" if t.is_symlink() else "a directory" if t.is_dir() else "a file"
        raise PipelineError(f"--neuronpedia {d}: {t} is {what}, not an earlier export of this tool: it is left "
                            f"alone (remove it, or export into another directory or under another "
                            f"--neuronpedia_model_id)")
    return d


def is_export(folder: Path) -> bool:
    """Whether `folder` is a real directory that holds only source folders this tool wrote (each exactly the
    export's files, no link anywhere, its release by gelutrace), or nothing: what an export may replace."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    for src in folder.iterdir():
        if src.is_symlink() or not src.is_dir():
            return False
        entries = list(src.rglob("*"))
        if any(p.is_symlink() for p in entries):
            return False
        if sorted(p.relative_to(src).as_posix() for p in entries if p.is_file()) != sorted(layout.NEURONPEDIA_FILES):
            return False
        release = src / layout.NEURONPEDIA_RELEASE
        try:
            if release.stat().st_size > 1 << 20 or json.loads(release.read_bytes().splitlines()[0]).get(
                    "creatorName") != CREATOR:
                return False
        except (ValueError, IndexError, AttributeError, OSError):
            return False
    return True


def histogram(values, bins: int = HIST_BINS) -> tuple[list[int], list[float]]:
    """(bar heights, bar values): counts in `bins` equal-width bins over [min, max] and the bins' centres; when
    every value is the same, two bars, all of them at that value and none one step (a 40th of its size, or of 1)
    above it, since a viewer shades bars by their place between the first and the last; none for no values. The
    heights sum to the number of values."""
    v = np.asarray(values, np.float64).ravel()
    if not v.size:
        return [], []
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return [int(v.size), 0], [lo, lo + (abs(lo) or 1.0) / bins]
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return counts.astype(int).tolist(), ((edges[:-1] + edges[1:]) / 2).tolist()


def check_creator_id(given: str) -> str:
    """A --neuronpedia_creator_id: a non-empty string without spaces."""
    if not isinstance(given, str) or not re.fullmatch(r"\S+", given):
        raise PipelineError(f"--neuronpedia_creator_id {given!r}: the id of a Neuronpedia user, a non-empty string "
                            f"without spaces")
    return given


def _creator(creator_id: str | None) -> dict:
    return {"creatorId": DEFAULT_CREATOR_ID if creator_id is None else creator_id}


def activation_records(card: Card, model_id: str, creator_id: str | None = None,
                       source_set: str = layout.NEURONPEDIA_SET) -> list[dict]:
    """The card's top examples, rank 0 first: each context's tokens and the neuron's value at each of them."""
    src, index = source_id(card.layer, source_set), str(card.dimension)
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
                   creator_id: str | None = None, source_set: str = layout.NEURONPEDIA_SET) -> dict:
    """The neuron: its firing frequency, largest value, promoted and suppressed tokens and two histograms."""
    values = [v for a in activations for v in a["values"]]
    act_h, act_v = histogram(values)
    logit_h, logit_v = histogram(logits if logits is not None else [])
    return {"modelId": model_id, "layer": source_id(card.layer, source_set), "index": str(card.dimension),
            "sourceSetName": source_set,
            "maxActApprox": max((a["maxValue"] for a in activations), default=0.0),
            "frac_nonzero": float(card.frequency),
            "pos_str": [t.token for t in card.promoted], "pos_values": [float(t.value) for t in card.promoted],
            "neg_str": [t.token for t in card.suppressed], "neg_values": [float(t.value) for t in card.suppressed],
            "freq_hist_data_bar_heights": act_h, "freq_hist_data_bar_values": act_v,
            "logits_hist_data_bar_heights": logit_h, "logits_hist_data_bar_values": logit_v,
            **_creator(creator_id)}


def metadata_records(m: str, model, layer: int, n_neurons: int, dataset: str, creator_id: str | None = None,
                     model_id: str | None = None, source_set: str = layout.NEURONPEDIA_SET,
                     data_hash: str = "") -> dict[str, dict]:
    """release.jsonl, model.jsonl, sourceset.jsonl and source.jsonl of one layer's source folder; data_hash (the
    sha256 of its features and activations records) goes into the source's notes."""
    cfg = model.config
    model_id, src = model_id or model_slug(m), source_id(layer, source_set)
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
    sourceset = {"modelId": model_id, "name": source_set, "description": "MLP neurons (post-GELU)",
                 "creatorName": CREATOR, "urls": [], "releaseName": release_name(model_id), "visibility": "PUBLIC",
                 "hasDashboards": True, **who}
    source = {"id": src, "modelId": model_id, "setName": source_set, "visibility": "PUBLIC",
              "hasDashboards": True, "inferenceEnabled": False, "dataset": dataset,
              "notes": f"{n_neurons} of the {int(cfg.d_mlp)} MLP neurons of layer {int(layer)}, by {CREATOR}; "
                       f"data sha256 {data_hash} (of features/ then activations/, uncompressed)", **who}
    return {layout.NEURONPEDIA_RELEASE: release, layout.NEURONPEDIA_MODEL: model_rec,
            layout.NEURONPEDIA_SOURCESET: sourceset, layout.NEURONPEDIA_SOURCE_FILE: source}


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
    atomic.write_bytes(data, path)  # through os.write: a full disk keeps its errno


def data_hash(features: bytes, activations: bytes) -> str:
    """The sha256 of a source's features and activations records as written, uncompressed, one after the other
    (`zcat features/batch-0.jsonl.gz activations/batch-0.jsonl.gz | sha256sum`): what the source's notes record,
    so that the export an instance holds can be told from another."""
    return hashlib.sha256(features + activations).hexdigest()


def recorded_hash(source_folder: Path) -> str | None:
    """The data sha256 an exported source records in its notes; None if it has none (or cannot be read)."""
    try:
        notes = json.loads((Path(source_folder) / layout.NEURONPEDIA_SOURCE_FILE).read_bytes().splitlines()[0])["notes"]
        return _HASH.search(notes).group(1)
    except (ValueError, IndexError, KeyError, TypeError, AttributeError, OSError):
        return None


@contextlib.contextmanager
def exclusive(directory, what: str = "Neuronpedia export"):
    """An exclusive flock on the directory itself (an O_RDONLY descriptor of it), for the block: one export at a
    time into DIR, across processes and threads alike (each call opens its own descriptor), with no lock file
    left in DIR. The kernel drops it when the process ends, also on a crash or kill -9."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"another run is writing into {d} ({what}); wait for it to end or export "
                                f"elsewhere") from None
        yield d
    finally:
        os.close(fd)


def _remove(p: Path):
    """Remove a directory of ours, or only the link if `p` is one (rmtree never follows a link inside); what
    cannot be removed now is left for the next export's _clean."""
    if p.is_symlink() or not p.is_dir():
        with contextlib.suppress(OSError):
            p.unlink()
    else:
        shutil.rmtree(p, ignore_errors=True)


def _staged(d: Path, model_id: str, kind: str) -> list[Path]:
    return sorted(d.glob(f".{model_id}.gelutrace-{kind}-*"))


def _clean(d: Path, model_id: str):
    """What an export cut short left in DIR, removed (under the lock): a staging folder, and a replaced folder
    (put back first if the cut came between the two renames); and what older versions of this export left: the
    versions beside a link. An older version's DIR/.gelutrace.lock is left: removing a lock file that another
    stage may have just opened would let two runs hold "the" lock at once."""
    target = d / model_id
    old = _staged(d, model_id, "old")
    if not target.exists() and not target.is_symlink():
        for p in old:
            if is_export(p):  # a real folder of ours, never a link
                os.replace(p, target)
                break
    for p in _staged(d, model_id, "staging") + _staged(d, model_id, "old"):
        _remove(p)
    atomic._clean_versions(target)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    except (AttributeError, OSError):
        return False


def _swap_in(staging: Path, target: Path):
    """Make the staged folder `target`, and remove the export it replaces."""
    if target.is_dir() and not target.is_symlink() and _exchange(staging, target):
        _remove(staging)  # now the replaced export
        return
    legacy = atomic.own_version(target)  # an older export's version beside its link
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / staging.name.replace(".gelutrace-staging-", ".gelutrace-old-")
        os.replace(target, old)  # a crash before the next rename is undone by the next export (_clean)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        _remove(old)
    if legacy is not None:
        _remove(legacy)


def write_export(directory, cards: list[Card], m: str, model, dataset: str, creator_id: str | None = None,
                 model_id: str | None = None, source_set: str = layout.NEURONPEDIA_SET) -> Path:
    """
    Write the cards into DIR/{model_id}/ and return that folder. The folder is staged beside it
    (DIR/.{model_id}.gelutrace-staging-*) and renamed in as one step, under an exclusive flock on DIR, so that a
    failure leaves the earlier export as it was and DIR holds nothing else of ours afterwards. A layer's neurons
    are in dimension order, each neuron's examples rank 0 first. An earlier export whose data sha256 differs
    for a source written again gives one `warning:` line on stderr: an instance that imported it keeps it.
    model_id: the records' modelId (default: the slug of m); creator_id: default DEFAULT_CREATOR_ID;
    source_set: gelutrace-mlp or neurons (SOURCE_SETS).
    """
    model_id = model_id or model_slug(m)
    check_source_set(source_set)
    layers: dict[int, list[Card]] = {}
    for c in cards:
        layers.setdefault(int(c.layer), []).append(c)
    with exclusive(directory) as d:
        check_target(d, model_id)  # again, now that no other export can change it
        target = d / model_id
        _clean(d, model_id)
        staging = d / f".{model_id}.gelutrace-staging-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()  # the usual umask-based mode
            changed = []
            for layer in sorted(layers):
                src = source_id(layer, source_set)
                folder = staging / src
                features, activations = [], []
                for c in sorted(layers[layer], key=lambda c: c.dimension):
                    acts = activation_records(c, model_id, creator_id, source_set)
                    logits = logit_effect(model, c.neuron_id) if has_logit_effect(model) else None
                    features.append(feature_record(c, model_id, acts, logits, creator_id, source_set))
                    activations += acts
                features, activations = _jsonl(features), _jsonl(activations)
                digest = data_hash(features, activations)
                if (target / src).is_dir() and recorded_hash(target / src) != digest:
                    changed.append(src)
                for name, rec in metadata_records(m, model, layer, len(layers[layer]), dataset, creator_id,
                                                  model_id, source_set, digest).items():
                    _write(folder / name, _jsonl([rec]))
                _write(folder / layout.NEURONPEDIA_FEATURES, features)
                _write(folder / layout.NEURONPEDIA_ACTIVATIONS, activations)
            _swap_in(staging, target)
        except BaseException as e:
            if staging.is_dir() and not staging.is_symlink():
                shutil.rmtree(staging, ignore_errors=True)
            if atomic.disk_full(e, d):
                raise PipelineError(f"no space left on {d} (disk full) while writing the Neuronpedia export; the "
                                    f"earlier export there is unchanged") from None
            raise
    if changed:
        print(f"warning: {target} held an earlier export of other data (its data sha256 differs) for source "
              f"{', '.join(changed)}: an instance that imported it keeps the old records (it skips a model, "
              f"source set and source it has, and rows whose ids it has), so delete the source there before "
              f"importing this export", file=sys.stderr)
    return target
