"""
Stage e: ablate GELU neurons during generation and measure what it does.

- Subsets are `.npy` files of neuron ids (`node_id = layer * d_mlp + dimension`), read without pickle and
  validated; random controls have the same per-layer composition.
- Each subset is ablated with gelutrace.model.hooks and measured with gelutrace.evaluate.metrics against the
  unperturbed baseline, on the evaluation prompts and (gelutrace.evaluate.realtext) on held-out text; the
  comparison's statistics are gelutrace.evaluate.statistics'.
- Subsets stage d ranked with layers excluded (d --exclude_layers) form a comparison of their own, the same
  tables over them alone (comparison_excluded.csv, ...): in the main one they would compete with their own full
  versions.
"""

import hashlib
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.evaluate import moduleeffects as me
from gelutrace.evaluate import realtext
from gelutrace.evaluate import statistics as stats
from gelutrace.evaluate.metrics import (
    LOGIT_BUDGET,
    Rows,
    agreement,
    compare_logprobs,
    continuation_logprobs,
    generate_groups,
    generate_rows,
    metric_chunks,
    plan_rows,
)
from gelutrace.evaluate.statistics import weighted_null
from gelutrace.files import atomic, formats, layout
from gelutrace.files.corpusfiles import DEFAULT_FIELD
from gelutrace.files.dataset import DatasetDir
from gelutrace.files.plots import plot_dose_response, plot_method_comparison, plot_perturbation_summary
from gelutrace.model.generation import Batch, encode_prompts, plan_batches, repeat_rows
from gelutrace.model.hooks import RowAblation
from gelutrace.record.corpus import check_recorded_weights
from gelutrace.selection import stability

NONE = "none"  # the subset name that means: no ablation (the baseline)
MODULE = "module"  # the sidecar method of a module of c_find_modules (stage d --modules): outside the comparison
METRICS = ["kl", "delta_nll", "token_agreement", "first_diff_position"]


# --- subsets ----------------------------------------------------------------------------------------------
@dataclass
class Subset:
    name: str  # as given on the command line ('none' or a file name under perturbation_subsets/)
    ids: np.ndarray  # sorted unique neuron ids (int64)
    controls: list[np.ndarray] = field(default_factory=list)  # random subsets of the same layer composition
    info: dict = field(default_factory=dict)  # stage d's sidecar JSON (method, threshold, ratio, ...), if any
    weighted: list[np.ndarray] = field(default_factory=list)  # a module's effect-weighted controls

    @property
    def is_module(self) -> bool:
        return self.info.get("method") == MODULE

    @property
    def compared(self) -> bool:
        """Whether the method comparison ranks it: a selection method made it (a module is not a method)."""
        return bool(self.info.get("method")) and not self.is_module and len(self.ids) > 0

    @property
    def stem(self) -> str:
        return NONE if self.name == NONE else Path(self.name).stem


def excluded_layers(info: dict) -> list[int]:
    """The layers stage d left out of a subset's ranking, from its sidecar `info` ([]: none)."""
    return info.get("exclude_layers") or []


def by_exclusion(entries: list) -> tuple[list, list]:
    """Comparison entries (or anything with a sidecar `info`): those of the main comparison, and those ranked with
    layers excluded, compared apart."""
    return ([e for e in entries if not excluded_layers(e.info)], [e for e in entries if excluded_layers(e.info)])


def load_subset(p: Path, n_neurons: int) -> np.ndarray:
    """The sorted unique neuron ids of a subset `.npy`: a 1-D integer array of ids in [0, n_neurons)."""
    return np.unique(formats.read_subset(p, n_neurons))


def read_sidecar(npy: Path, model: str) -> dict:
    """Stage d's sidecar JSON of a subset ({} when there is none); a subset made for another model is refused."""
    side = npy.parent / layout.SUBSET_SIDECAR.format(stem=npy.stem)
    if not side.is_file():
        return {}
    try:
        info = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{side} is not valid JSON: {e}") from None
    if not isinstance(info, dict):
        raise PipelineError(f"{side}: expected a JSON object")
    kinds = {"method": str, "weight": str, "threshold": (int, float), "ratio": (int, float), "seed": int,
             "tied_picks": int, "tie_pool": int, "zero_score_picks": int, "module": int, "score_file": str,
             "score_sha256": str, "halves": dict, "exclude_layers": list}
    for key, kind in kinds.items():
        v = info.get(key)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0)):
            raise PipelineError(f"{side}: {key} is {v!r}, not what stage d writes; rerun stage d")
    if info.get("score_file") is not None and (Path(info["score_file"]).is_absolute()
                                               or ".." in Path(info["score_file"]).parts):
        raise PipelineError(f"{side}: score_file {info['score_file']!r} is not beside the subsets; rerun stage d")
    if info.get("method") == MODULE and not isinstance(info.get("module"), int):
        raise PipelineError(f"{side}: a module's sidecar without its module number; rerun stage d --modules")
    if info.get("model") not in (None, model):
        raise PipelineError(f"subset {npy.name} was made for model {info['model']!r}, not {model!r} ({side})")
    return info


def resolve_subsets(dataset_path, names: list[str], n_neurons: int, model: str | None = None) -> list[Subset]:
    subsets, stems = [], {}
    reserved = {Path(f).stem for f in RESULT_SET}
    for name in names:
        info = {}
        if name == NONE:
            ids = np.zeros(0, np.int64)
        else:
            if Path(name).name != name or name in (".", ".."):
                raise PipelineError(f"subset {name!r}: name a file in {Path(dataset_path) / layout.SUBSETS_DIR}, "
                                    f"without a directory")
            npy = Path(dataset_path) / layout.SUBSETS_DIR / name
            ids = load_subset(npy, n_neurons)
            if not len(ids):
                raise PipelineError(f"subset {npy} holds no neurons (use 'none' for the baseline)")
            info = read_sidecar(npy, model) if model is not None else {}
        s = Subset(name, ids, info=info)
        if s.stem in stems:
            raise PipelineError(f"subsets {stems[s.stem]!r} and {name!r} would both write {s.stem}.csv")
        if s.stem in reserved:
            raise PipelineError(f"subset {name!r} would overwrite one of stage e's summary files: rename it")
        stems[s.stem] = name
        subsets.append(s)
    return subsets


def layer_counts(ids: np.ndarray, n_layer: int, d_mlp: int) -> np.ndarray:
    return np.bincount(np.asarray(ids, np.int64) // d_mlp, minlength=n_layer)


def random_control(ids: np.ndarray, n_layer: int, d_mlp: int, seed: int, index: int) -> np.ndarray:
    """
    Random control `index` for a subset: in every layer as many neurons as the subset has there, drawn
    uniformly without replacement from all of that layer's neurons. Depends on the seed, the subset's ids
    and the index only.
    """
    key = zlib.crc32(np.asarray(ids, "<i8").tobytes())
    rng = np.random.default_rng(np.random.SeedSequence([seed, key, index]))
    counts = layer_counts(ids, n_layer, d_mlp)
    parts = [layer * d_mlp + rng.choice(d_mlp, size=int(c), replace=False) for layer, c in enumerate(counts) if c]
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def weighted_control(ids: np.ndarray, weights: np.ndarray, n_layer: int, d_mlp: int, seed: int, index: int
                     ) -> np.ndarray:
    """
    Effect-weighted control `index` for a subset: in every layer as many neurons as the subset has there, drawn
    one after another without replacement with probability proportional to max(weight, 0) among the layer's
    neurons not yet drawn (numpy's weighted choice without replacement); when the layer has fewer neurons of
    positive weight than needed, all of them and the rest uniformly from the others. The null of "are these
    neurons' effect more than their individual strengths give?". Depends on the seed, ids, weights and index only.
    """
    key = zlib.crc32(np.asarray(ids, "<i8").tobytes())
    rng = np.random.default_rng(np.random.SeedSequence([seed, key, index, 1]))
    w = np.nan_to_num(np.asarray(weights, np.float64), nan=0.0, posinf=0.0, neginf=0.0).reshape(n_layer, d_mlp)
    w = np.maximum(w, 0.0)
    parts = []
    for layer, c in enumerate(layer_counts(ids, n_layer, d_mlp)):
        if not c:
            continue
        wl = w[layer]
        pos = np.flatnonzero(wl > 0)
        if len(pos) >= c:
            pick = rng.choice(d_mlp, size=int(c), replace=False, p=wl / wl.sum())
        else:
            rest = np.flatnonzero(wl <= 0)
            pick = np.concatenate([pos, rng.choice(rest, size=int(c) - len(pos), replace=False)])
        parts.append(layer * d_mlp + pick)
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def control_weights(dataset_path, m: str, n_neurons: int) -> tuple[np.ndarray | None, str | None]:
    """Each neuron's individual strength for effect-weighted controls: its measured single-ablation delta_nll
    ({m}_neuron_effects.csv) where measured, else stage b's attribution; (None, None) without either."""
    effects = layout.path(dataset_path, layout.NEURON_EFFECTS, m)
    if effects.is_file():
        w = formats.read_neuron_column(effects, "delta_nll", n_neurons, "d_calculate_neuron_effects.py", missing_ok=True)
        if np.isfinite(w).any():
            return w, "neuron_effects.delta_nll"
    freq = layout.path(dataset_path, layout.FREQUENCY, m)
    if freq.is_file():
        w = formats.read_neuron_column(freq, "attribution", n_neurons, "stage b", optional=True)
        if w is not None and np.isfinite(w).any():
            return w, "attribution"
    return None, None


@dataclass
class Condition:
    """One ablation to measure: a subset (generated free-running too) or one of its random controls."""
    ids: np.ndarray
    generate: bool = True  # False for a control: measured teacher-forced only (kl, delta_nll)
    conts: list[np.ndarray] = field(default_factory=list)  # per row: the generated continuation
    kl: np.ndarray | None = None  # per row
    delta_nll: np.ndarray | None = None
    agree: np.ndarray | None = None
    first_diff: np.ndarray | None = None


def group_size(rows: int, width: int, vocab_size: int, batch_size: int) -> int:
    """How many ablations one teacher-forced pass over `rows` sequences of `width` tokens computes together:
    within --batch_size sequences and LOGIT_BUDGET logits."""
    return max(1, min(batch_size // rows, LOGIT_BUDGET // max(1, rows * width * vocab_size)))


def teacher_forced(model, rows: Rows, prompt_ids, base: list[np.ndarray], conditions: list[Condition],
                   mean_values: np.ndarray | None, batch_size: int, progress=None):
    """Every condition's per-row kl and delta_nll along the baseline's continuations; conditions share each
    forward pass, a block of batch rows each (RowAblation)."""
    for c in conditions:
        c.kl, c.delta_nll = np.full(len(base), np.nan), np.full(len(base), np.nan)
    ablating = [c for c in conditions if len(c.ids)]
    for c in conditions:
        if not len(c.ids):
            c.kl[rows.length > 0] = c.delta_nll[rows.length > 0] = 0.0
    V = model.config.vocab_size
    for chunk in metric_chunks(rows, prompt_ids, V, batch_size):
        pids = [prompt_ids[rows.prompt[r]] for r in chunk]
        conts = [base[r] for r in chunk]
        width = max(len(p) + len(c) for p, c in zip(pids, conts))
        base_lp = continuation_logprobs(model, pids, conts)
        g = group_size(len(chunk), width, V, batch_size)
        for start in range(0, len(ablating), g):
            group = ablating[start:start + g]
            with RowAblation(model, [c.ids for c in group], len(chunk), mean_values):
                pert = continuation_logprobs(model, pids * len(group), conts * len(group))
            kl, dnll = compare_logprobs(base_lp, pert.view(len(group), *base_lp.shape), conts)
            for i, c in enumerate(group):
                c.kl[chunk], c.delta_nll[chunk] = kl[i], dnll[i]
            if progress is not None:
                progress("passes", len(group))


def measure(model, batches: list[Batch], rows: Rows, prompt_ids, conditions: list[Condition],
            mean_values: np.ndarray | None, temperature: float, top_k, seed: int, batch_size: int,
            progress=None, forced: bool = True) -> list[np.ndarray]:
    """
    Generate the baseline and the continuations of every condition with `generate`, then (with `forced`) fill
    in each condition's per-row teacher-forced metrics. Returns the baseline's continuations.
    `progress(kind, amount)` is called as work completes ("tokens" generated, teacher-forced "passes" of one
    condition over one chunk).
    """
    def tick(batch):
        if progress is not None:
            progress("tokens", len(batch.row_prompt) * batch.new_tokens)

    base = generate_rows(model, batches, rows, prompt_ids, temperature, top_k, seed, None, tick)
    ablating = [c for c in conditions if c.generate and len(c.ids)]
    conts = generate_groups(model, batches, rows, prompt_ids, temperature, top_k, seed, [c.ids for c in ablating],
                            mean_values, tick)
    for c, cont in zip(ablating, conts):
        c.conts = cont
    for c in conditions:
        if not c.generate:
            continue
        if not len(c.ids):
            c.conts = base
        pairs = [agreement(b, p) if len(b) else (np.nan, np.nan) for b, p in zip(base, c.conts)]
        c.agree = np.array([a for a, _ in pairs], np.float64)
        c.first_diff = np.array([f for _, f in pairs], np.float64)
    if forced:
        teacher_forced(model, rows, prompt_ids, base, conditions, mean_values, batch_size, progress)
    else:
        for c in conditions:
            c.kl, c.delta_nll = np.full(len(base), np.nan), np.full(len(base), np.nan)
    return base


# --- putting a run together -------------------------------------------------------------------------------
@dataclass
class EvalSettings:
    """How stage e generates, ablates and judges."""
    temperature: float = 0.0
    top_k: int | None = 1
    seed: int = 1337
    batch_size: int = 64
    random_controls: int = 0
    ablation: str = "zero"  # or "mean"
    validation_share: float = 0.5
    control_subsets: str = "all"  # or "best": controls only for each k's winner on the validation part
    module_controls: int | None = None  # controls of each kind per module (None: random_controls)
    mean_ablation_top: int = 0  # each k's N best methods also measured under mean ablation (mean_check)
    own_continuation: bool = True  # the teacher-forced metrics along the baseline's continuations of the prompts
    control_share: float = 0.5  # the share of the real text's test part the controls are scored on (stats.Split)

    @property
    def per_module(self) -> int:
        return self.random_controls if self.module_controls is None else self.module_controls


def expand_samples(batches: list[Batch], prompts, greedy: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, sample_index, row) of every output sample in CSV order: prompt by prompt, repeat by repeat."""
    out, offset = [], 0
    for batch in batches:
        out += [(p, r, offset + x if x >= 0 else -1) for p, r, x in repeat_rows(batch, prompts, greedy)]
        offset += len(batch.row_prompt)
    arr = np.array(out, np.int64).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def sample_mean(per_row: np.ndarray | None, sample_rows: np.ndarray) -> float:
    """
    The mean over samples of per-row values: `sample_rows` gives each sample's row (-1: no continuation, left
    out), so a row standing for several identical samples counts once per sample; NaN values are left out.
    """
    if per_row is None:
        return np.nan
    vals = per_row[sample_rows[sample_rows >= 0]]
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if len(vals) else np.nan


def condition_metrics(c: Condition, sample_rows: np.ndarray) -> dict:
    """Summary metrics of a condition: the mean over samples (rows without a continuation left out)."""
    return {name: sample_mean(per_row, sample_rows)
            for name, per_row in zip(METRICS, (c.kl, c.delta_nll, c.agree, c.first_diff))}


def result_table(subset: Subset, c: Condition, prompts, tokenizer, samples) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The contract's CSV of one subset, and its per-sample metrics."""
    sp, si, sr = samples
    texts = [tokenizer.decode([int(t) for t in c.conts[r]]) if r >= 0 else "" for r in sr]
    result = pd.DataFrame({"prompt": [prompts[p].text for p in sp], "sample_index": si, "generated_text": texts,
                           "perturbation_subset": subset.name}, columns=layout.RESULT_COLUMNS)

    lengths = np.array([prompts[p].new_tokens for p in sp], np.int64)
    metrics = pd.DataFrame({"prompt_index": sp, "prompt": result["prompt"], "sample_index": si, "num_tokens": lengths,
                            "kl": per_sample(c.kl, sr), "delta_nll": per_sample(c.delta_nll, sr),
                            "token_agreement": per_sample(c.agree, sr),
                            "first_diff_position": per_sample(c.first_diff, sr)})
    return result, metrics


def per_sample(per_row: np.ndarray, sample_rows: np.ndarray) -> np.ndarray:
    """Per-row values spread over the samples (NaN where a sample has no continuation)."""
    return np.where(sample_rows >= 0, per_row[np.maximum(sample_rows, 0)], np.nan) if len(sample_rows) else np.zeros(0)


def condition_sums(c: Condition, samples, n_prompts: int, names=stats.METRICS) -> tuple[dict, np.ndarray]:
    """Per prompt: each metric's sum over samples, and the number of samples."""
    sample_prompt, _, sample_rows = samples
    sums, counts = {}, np.zeros(n_prompts)
    for name in names:
        sums[name], counts = stats.prompt_sums(per_sample(getattr(c, name), sample_rows), sample_prompt, n_prompts)
    return sums, counts


def summary_row(subset: Subset, main: Condition, controls: list[Condition], samples, n_prompts: int, boot: np.ndarray,
                n_layer, d_mlp, settings: EvalSettings, weighted: list[Condition] = ()) -> dict:
    """The subset on every evaluation prompt: metrics with bootstrap CIs and the null of its controls (and, for a
    module, of its effect-weighted controls)."""
    sample_rows = samples[2]
    row = {"subset": subset.name, "ablation": settings.ablation, "k": len(subset.ids)}
    row.update({f"layer_{i}_count": int(c) for i, c in enumerate(layer_counts(subset.ids, n_layer, d_mlp))})
    row["num_samples"] = int((sample_rows >= 0).sum())
    row.update(condition_metrics(main, sample_rows))
    sums, counts = condition_sums(main, samples, n_prompts)
    for name in stats.METRICS:
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = stats.bootstrap_ci(boot, sums[name], counts)
    if settings.random_controls or controls:
        row["random_controls"] = len(controls)
        for name in stats.METRICS:
            vals = np.array([sample_mean(getattr(c, name), sample_rows) for c in controls], np.float64)
            row.update({f"{name}_{k}": v for k, v in stats.null_test(row[name], vals).items() if k != "random_n"})
            row[f"{name}_percentile"] = stats.percentile(row[name], vals)
            row[f"{name}_vs_random"] = stats.t_ratio(row[name], vals)
    if weighted:
        for name in ("kl", "delta_nll"):
            vals = [sample_mean(getattr(c, name), sample_rows) for c in weighted]
            row.update({f"{name}_{k}": v for k, v in weighted_null(row[name], vals).items()})
    return row


def entry_variant(subset: Subset) -> str:
    """The comparison's variant label of a method's subset: its threshold (and weight) for a graph method."""
    method, t = subset.info.get("method"), subset.info.get("threshold")
    variant = f"t={t}" if t is not None and method in stats.GRAPH_METHODS else ""
    if subset.info.get("weight") not in (None, "count", *stats.CAUSAL_WEIGHTS) and variant:
        variant += f", {subset.info['weight']}"
    return variant


def comparison_entry(subset: Subset, main: Condition, controls: list[Condition], samples, n_prompts: int):
    """The subset as the method comparison sees it, or None when no selection method made it."""
    if not subset.compared:
        return None
    sums, counts = condition_sums(main, samples, n_prompts, stats.METRICS + ("agree",))
    sums["token_agreement"] = sums.pop("agree")
    ctl = [condition_sums(c, samples, n_prompts) for c in controls]
    control_sums = {name: np.array([s[name] for s, _ in ctl]).reshape(len(ctl), n_prompts) for name in stats.METRICS}
    control_counts = np.array([n for _, n in ctl]).reshape(len(ctl), n_prompts)
    return stats.Entry(subset.stem, stats.comparison_method(subset.info), entry_variant(subset), len(subset.ids), subset.ids, sums, counts, control_sums,
                     control_counts, subset.info)


@dataclass
class Results:
    tables: dict  # stem -> (result DataFrame, per-sample metrics DataFrame)
    summary: pd.DataFrame
    entries: list  # comparison.Entry of every subset a selection method made
    boot: np.ndarray  # the bootstrap draws over prompts, shared by every subset
    split: stats.Split  # the evaluation prompts' validation and test parts
    seed: int
    halves: dict = field(default_factory=dict)  # the selection data's halves (gelutrace.selection.stability), described
    text: object = None  # realtext.TextResults, with --eval_text
    text_entries: list = field(default_factory=list)  # the comparison's entries on the real text

    @property
    def primary(self) -> tuple[list, stats.Split]:
        """The entries and split the verdict speaks of: the real text's when measured, else the continuations'."""
        return (self.text_entries, self.text.split) if self.text is not None else (self.entries, self.split)


def text_entries(res, subsets: list[Subset]) -> list:

    return [realtext.entry(res, i, sub.stem, stats.comparison_method(sub.info), entry_variant(sub), sub.info)
            for i, sub in enumerate(subsets) if sub.compared]


def control_plan(subsets: list[Subset], settings: EvalSettings, entries: list, split: stats.Split) -> list[int]:
    """Which subsets get random controls: every one, or ("best") each k's winner on the validation part of the
    main comparison; a module always (its test is against its controls). With "best" the comparison without some
    layers gets none: it asks whether the winner is the same, and its controls would cost as much again."""
    chosen = [i for i, sub in enumerate(subsets) if len(sub.ids)]
    if settings.control_subsets == "best":
        stems = stats.validation_winners(by_exclusion(entries)[0], split)
        chosen = [i for i in chosen if subsets[i].stem in stems or subsets[i].is_module]
    return chosen


def measure_text(model, text, subsets: list[Subset], mean_values, settings: EvalSettings, progress=None,
                 test_only: bool = False, per_position: bool = False):
    """Every subset ablated on real text (realtext.EvalText): stage e's --eval_text, and the API's ablate. The
    subsets ranked without some layers are scored on the test part only when their comparison has nothing to
    choose on the validation part (one variant per method and k; it gives no controls); with `test_only` every
    subset is; with `per_position` also token by token (realtext.evaluate)."""
    s = settings
    apart = [sub for sub in subsets if sub.compared and excluded_layers(sub.info)]
    single = len({(len(sub.ids), stats.comparison_method(sub.info)) for sub in apart}) == len(apart)
    return realtext.measure_subsets(model, text, subsets, mean_values, s.seed, s.validation_share, s.batch_size,
                                    progress and (lambda n: progress("text", n)),
                                    [test_only or (single and sub in apart) for sub in subsets], per_position,
                                    s.control_share)


def measure_text_controls(res, model, subsets: list[Subset], mean_values, settings: EvalSettings, progress=None):
    """The subsets' random (and effect-weighted) controls on the same text, into `res` (measure_text's), on the
    split's control part (--control_share of the test part), where the subsets are judged against them."""
    realtext.add_controls(res, model, [sub.controls for sub in subsets], mean_values, settings.batch_size,
                          progress and (lambda n: progress("text", n)), [sub.weighted for sub in subsets])


def measure_subsets(model, tokenizer, prompts, prompt_ids, batches, subsets: list[Subset], mean_values,
                    settings: EvalSettings, progress=None, text=None, weights: np.ndarray | None = None) -> Results:
    """
    Every subset on the prompts (generated free-running and teacher-forced along the baseline's continuations)
    and, given `text` (realtext.EvalText), on real text; then the random controls of the subsets control_plan
    picks, measured the same ways, and for a module as many effect-weighted controls drawn by `weights`
    (control_weights), where given.
    """

    cfg = model.config
    s = settings
    rows = plan_rows(batches, prompts)
    samples = expand_samples(batches, prompts, s.temperature == 0)
    boot = stats.bootstrap_weights(len(prompts), s.seed)
    split = stats.split_prompts(len(prompts), s.seed, s.validation_share)
    mains = [Condition(sub.ids) for sub in subsets]
    base = measure(model, batches, rows, prompt_ids, mains, mean_values, s.temperature, s.top_k, s.seed,
                   s.batch_size, progress, s.own_continuation)
    tres = None
    if text is not None:
        tres = measure_text(model, text, subsets, mean_values, s, progress)
        primary = text_entries(tres, subsets), tres.split
    else:
        primary = [e for e in (comparison_entry(sub, c, [], samples, len(prompts)) for sub, c in zip(subsets, mains))
                   if e is not None], split
    chosen = set(control_plan(subsets, s, *primary)) if s.random_controls or s.per_module else set()
    for i, sub in enumerate(subsets):
        n = (s.per_module if sub.is_module else s.random_controls) if i in chosen else 0
        sub.controls = [random_control(sub.ids, cfg.n_layer, cfg.d_mlp, s.seed, j) for j in range(n)]
        sub.weighted = ([weighted_control(sub.ids, weights, cfg.n_layer, cfg.d_mlp, s.seed, j) for j in range(n)]
                        if sub.is_module and weights is not None else [])
    controls = [[Condition(ids, generate=False) for ids in sub.controls] for sub in subsets]
    weighted = [[Condition(ids, generate=False) for ids in sub.weighted] for sub in subsets]
    flat = [c for cs in controls + weighted for c in cs]
    if flat and s.own_continuation:
        teacher_forced(model, rows, prompt_ids, base, flat, mean_values, s.batch_size, progress)
    if tres is not None:
        measure_text_controls(tres, model, subsets, mean_values, s, progress)
    tables, summary, entries = {}, [], []
    for i, (sub, main, ctl) in enumerate(zip(subsets, mains, controls)):
        tables[sub.stem] = result_table(sub, main, prompts, tokenizer, samples)
        row = summary_row(sub, main, ctl, samples, len(prompts), boot, cfg.n_layer, cfg.d_mlp, s, weighted[i])
        if tres is not None:
            row.update(realtext.summary_columns(tres, i))
        summary.append(row)
        entry = comparison_entry(sub, main, ctl, samples, len(prompts)) if s.own_continuation else None
        if entry is not None:
            entries.append(entry)
    res = Results(tables, pd.DataFrame(summary), entries, boot, split, s.seed, text=tres)
    if tres is not None:
        res.text_entries = text_entries(tres, subsets)
    return res


def mean_check_subsets(results: Results, subsets: list[Subset], top: int) -> list[Subset]:
    """Each k's `top` best methods on the validation part of the primary comparison (each method's best variant
    there, the random reference left out), as fresh subsets without controls: what the mean-ablation check
    measures again. Chosen on the validation part only, so that the test part judges both ablations."""
    entries, split = results.primary
    entries = by_exclusion(entries)[0]  # the main comparison's
    ranked = {}
    for (k, method), e in stats.best_variants(entries, split.validation).items():
        if method != stats.REFERENCE:
            ranked.setdefault(k, []).append(e)
    stems = set()
    for k, es in ranked.items():
        es.sort(key=lambda e: (-np.nan_to_num(e.mean("delta_nll", split.validation), nan=-np.inf), e.stem))
        stems |= {e.stem for e in es[:top]}
    return [Subset(sub.name, sub.ids, info=sub.info) for sub in subsets if sub.stem in stems]


@dataclass
class MeanCheck:
    subsets: list[Subset]
    text: object  # realtext.TextResults under mean ablation
    tables: dict  # file name -> table (layout.MEAN_*)


def mean_check(model, results: Results, subsets: list[Subset], mean_values: np.ndarray, settings: EvalSettings,
               top: int, progress=None) -> MeanCheck:
    """
    The mean-ablation check on the real text: each k's `top` best methods (mean_check_subsets) measured again
    with every neuron replaced by its mean over the selection data (`mean_values`), each k's first of them (on the
    validation part, under zero ablation) with its own settings.random_controls layer-matched controls, mean-
    ablated too; their comparison, verdict and dose-response tables on the same test part, and per k whether
    the methods keep their order (layout.MEAN_CHECK_COLUMNS).
    """
    if results.text is None:
        raise PipelineError("the mean-ablation check (--mean_ablation_top) measures on the real text: give --eval_text")
    cfg = model.config
    chosen = mean_check_subsets(results, subsets, top)
    res = measure_text(model, results.text.text, chosen, mean_values, settings, progress, test_only=True)
    entries, split = results.primary
    entries = by_exclusion(entries)[0]
    first = stats.validation_winners([e for e in entries if e.stem in {s.stem for s in chosen}], split)
    for sub in chosen:
        n = settings.random_controls if sub.stem in first else 0
        sub.controls = [random_control(sub.ids, cfg.n_layer, cfg.d_mlp, settings.seed, j) for j in range(n)]
    measure_text_controls(res, model, chosen, mean_values, settings, progress)
    mean_entries = text_entries(res, chosen)
    table = stats.comparison_table(mean_entries, res.split, settings.seed)
    verdict = stats.verdict_table(mean_entries, res.split, settings.seed, table=table)
    tables = {layout.MEAN_COMPARISON: table, layout.MEAN_VERDICT: verdict,
              layout.MEAN_DOSE_RESPONSE: stats.dose_response_table(table, verdict),
              layout.MEAN_CHECK: check_table(entries, mean_entries, split, res.split, settings.seed)}
    return MeanCheck(chosen, res, tables)


def check_table(zero: list, mean: list, split: stats.Split, mean_split: stats.Split, seed: int) -> pd.DataFrame:
    """Per k, the mean-ablated methods in their order on the test part under zero and under mean ablation, whether
    it holds, and the mean-ablation margin of the first over the second with its paired bootstrap CI."""
    test = split.test
    assert np.array_equal(test, mean_split.test)  # one text, one seed: one split
    weights = stats.bootstrap_weights(len(test), seed)
    zero_by = {e.stem: e for e in zero}
    rows = []
    for k in sorted({e.k for e in mean}):
        es = [e for e in mean if e.k == k]

        def order(get):
            return sorted(es, key=lambda e: (-np.nan_to_num(get(e).mean("delta_nll", test), nan=-np.inf), e.stem))

        by_zero, by_mean = order(lambda e: zero_by[e.stem]), order(lambda e: e)
        row = {"k": k, "methods": len(es), "zero_order": " > ".join(e.label for e in by_zero),
               "mean_order": " > ".join(e.label for e in by_mean),
               "order_holds": [e.stem for e in by_zero] == [e.stem for e in by_mean],
               "zero_delta_nll": " ".join(f"{zero_by[e.stem].mean('delta_nll', test):.4g}" for e in by_zero),
               "mean_delta_nll": " ".join(f"{e.mean('delta_nll', test):.4g}" for e in by_zero)}
        if len(by_mean) > 1:
            row["mean_margin"], row["mean_margin_ci_low"], row["mean_margin_ci_high"] = stats.paired_difference(
                weights, by_mean[0], by_mean[1], test)
        on = by_mean[0].control_part(test)
        null = stats.null_test(by_mean[0].mean("delta_nll", on), by_mean[0].control_means("delta_nll", on))
        row["mean_first_p_random"] = null.get("p_random", np.nan)
        row["mean_first_random_n"] = len(by_mean[0].control_counts)
        rows.append(row)
    return pd.DataFrame(rows, columns=layout.MEAN_CHECK_COLUMNS)


def unrecorded(subsets: list[Subset]) -> list[str]:
    """The method subsets whose sidecar (an older stage d's) records neither their scores nor their halves."""
    return [s.stem for s in subsets if s.compared and "halves" not in s.info]


def add_selection_overlap(results: Results, subsets: list[Subset]):
    """Each method subset's Jaccard overlap between its selection on the two halves of the selection data, as
    stage d recorded them (gelutrace.selection.stability), into its comparison entry; the halves' description goes
    to comparison.json."""
    for e in results.entries:
        e.info["selection_jaccard"] = stability.recorded_overlap(e.info)
    results.halves = stability.recorded_halves([s.info for s in subsets if s.compared])


def evaluation_record(selection_csv, selection_prompts, eval_csv, eval_prompts, settings: EvalSettings,
                      corpus: dict | None = None) -> dict:
    """
    Which data chose the neurons (the dataset's prompts, or its corpus), which prompts measured them, whether
    they overlap (for a corpus: evaluation prompts found, whitespace normalised, in its documents as stage b read
    them, up to realtext.LEAK_CHECK_BYTES of them; None for a file missing or changed since), and the run's
    settings.
    """

    def sha(p):
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()

    texts = {p.text for p in eval_prompts}
    if selection_prompts is not None:
        shared = len({p.text for p in selection_prompts} & texts)
        selection = {"selection_csv": str(selection_csv), "selection_csv_sha256": sha(selection_csv),
                     "selection_prompts": len(selection_prompts)}
    else:

        paths = [Path(f["path"]) for f in corpus["files"]]
        # the documents the corpus holds, decompressed and parsed as stage b read them (whitespace normalised),
        # never the stored bytes of a compressed or columnar file; None for a file missing or changed since
        shared = realtext.texts_in_corpus(corpus["files"], texts)
        selection = {"selection_corpus": [str(p) for p in paths], "selection_tokens": corpus.get("tokens"),
                     "selection_samples": corpus.get("samples")}
    return {**selection, "eval_csv": str(eval_csv), "eval_csv_sha256": sha(eval_csv),
            "eval_prompts": len(eval_prompts), "prompts_in_both": shared, "held_out": shared == 0,
            "ablation": settings.ablation, "seed": settings.seed, "temperature": settings.temperature,
            "top_k": settings.top_k, "random_controls": settings.random_controls,
            "validation_share": settings.validation_share, "control_share": settings.control_share,
            "mean_ablation_top": settings.mean_ablation_top,
            "own_continuation": settings.own_continuation,
            "bootstrap_replicates": stats.N_BOOT,
            "confidence_level": stats.LEVEL}


def write_results(out, results: Results, evaluation: dict, tokenizer=None) -> list[Path]:
    """Every result table into `out` (the results directory, or its staging directory); returns the files."""
    out = Path(out)
    (out / layout.PER_SAMPLE_DIR).mkdir(exist_ok=True)
    written = []
    for stem, (result, metrics) in results.tables.items():
        written += [out / layout.PER_SAMPLE_DIR / layout.RESULT_FILE.format(stem=stem), out / layout.RESULT_FILE.format(stem=stem)]
        atomic.write_csv(metrics, written[-2])
        atomic.write_csv(result, written[-1])
    atomic.write_csv(results.summary, out / layout.PERTURBATION_SUMMARY)
    atomic.write_json(evaluation, out / layout.EVALUATION, indent=2)
    written += [out / layout.PERTURBATION_SUMMARY, out / layout.EVALUATION]
    if results.text is not None and tokenizer is not None:

        atomic.write_csv(realtext.breakdown_table(results.text, list(results.tables), tokenizer), out / layout.TEXT_BREAKDOWN)
        written.append(out / layout.TEXT_BREAKDOWN)
    return written


RESULT_SET = (layout.PERTURBATION_SUMMARY, layout.EVALUATION, layout.PERTURBATION_PLOT, layout.COMPARISON, layout.METHOD_VERDICT,
              layout.METHOD_OVERLAP, layout.METHOD_AGREEMENT, layout.COMPARISON_RECORD, layout.COMPARISON_PLOT,
              layout.CONTINUATION_COMPARISON, layout.CONTINUATION_VERDICT, layout.TEXT_BREAKDOWN, layout.DOSE_RESPONSE,
              layout.DOSE_RESPONSE_PLOT, layout.MODULE_EFFECTS, layout.MODULE_TOKENS,
              layout.MODULE_CONTEXTS, layout.COMPARISON_EXCLUDED, layout.METHOD_VERDICT_EXCLUDED,
              layout.DOSE_RESPONSE_EXCLUDED, layout.DOSE_RESPONSE_EXCLUDED_PLOT, layout.MEAN_COMPARISON,
              layout.MEAN_VERDICT, layout.MEAN_DOSE_RESPONSE, layout.MEAN_DOSE_RESPONSE_PLOT,
              layout.MEAN_CHECK)  # the files of stage e's output set; one a run does not write is removed


def write_comparison(dataset_path, out, m: str, results: Results, subsets: list[Subset], n_neurons: int,
                     prompts=None, control_subsets: str = "all") -> dict:
    """The method comparison files into `out` (when some subsets were made by a selection method), and those of the
    subsets ranked with layers excluded, compared apart; returns their tables."""
    out = Path(out)
    every, split = results.primary
    if not every:
        return {}
    entries, excluded = by_exclusion(every)
    seed = results.seed
    tables = {}
    if entries:
        table = stats.comparison_table(entries, split, seed)
        verdict = stats.verdict_table(entries, split, seed, table=table)
        tables = {layout.COMPARISON: table, layout.METHOD_VERDICT: verdict,
                  layout.METHOD_OVERLAP: stats.overlap_table(entries, split),
                  layout.DOSE_RESPONSE: stats.dose_response_table(table, verdict)}
    if excluded:
        table = stats.comparison_table(excluded, split, seed)
        verdict = stats.verdict_table(excluded, split, seed, table=table)
        tables.update({layout.COMPARISON_EXCLUDED: table, layout.METHOD_VERDICT_EXCLUDED: verdict,
                       layout.DOSE_RESPONSE_EXCLUDED: stats.dose_response_table(table, verdict)})
    continuation = by_exclusion(results.entries)[0]
    if results.text is not None and continuation:
        cont = stats.comparison_table(continuation, results.split, seed)
        tables[layout.CONTINUATION_COMPARISON] = cont
        tables[layout.CONTINUATION_VERDICT] = stats.verdict_table(continuation, results.split, seed, table=cont)
    effects_file = layout.path(dataset_path, layout.NEURON_EFFECTS, m)
    if effects_file.is_file() and entries:
        effects = formats.read_neuron_column(effects_file, "delta_nll", n_neurons, "d_calculate_neuron_effects.py",
                                        missing_ok=True)
        scores = stats.recorded_scores(entries, Path(dataset_path) / layout.SUBSETS_DIR)
        tables[layout.METHOD_AGREEMENT] = stats.agreement_table(entries, effects, scores)
    for name, df in tables.items():
        atomic.write_csv(df, out / name)
    n_controls = max((len(s.controls) for s in subsets if s.compared), default=0)
    if results.text is not None:
        record = {"metric": "real_text", **split.record(unit=results.text.text.units),
                  "continuation_split": results.split.record(prompts)}
    else:
        record = {"metric": "continuation", **split.record(prompts)}
    atomic.write_json({**record, "bootstrap_replicates": stats.N_BOOT, "confidence_level": stats.LEVEL,
                   "alpha": stats.ALPHA, "random_controls": n_controls, "control_subsets": control_subsets,
                   "subsets_with_controls": sorted(s.stem for s in subsets if s.controls and s.compared),
                   "smallest_p_random": 1 / (n_controls + 1) if n_controls else None,
                   "controls_enough_for_claims": n_controls >= stats.MIN_CONTROLS,
                   "selection_halves": results.halves,
                   "exclude_layers": excluded_layers(excluded[0].info) if excluded else None},
                  out / layout.COMPARISON_RECORD, indent=2)
    return tables


# --- stage e's runner -------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """What stage e measures: a dataset's subsets (names under perturbation_subsets/, or NONE), on which prompts,
    and on which real text."""
    dataset_path: str
    subset_names: list[str]
    prompts: list  # the evaluation prompts (formats.read_prompts)
    eval_csv: str  # their file
    selection_prompts: list | None = None  # the prompts the neurons were chosen on (prompt mode)
    input_csv: str | None = None  # their file
    eval_text: list[str] | None = None  # real held-out text: corpus files or directories
    context: int | None = None  # its window (None: the model's context)
    eval_tokens: int = realtext.EVAL_TOKENS
    text_field: str = DEFAULT_FIELD


@dataclass
class Outcome:
    """What a stage e run measured and wrote."""
    subsets: list[Subset]
    results: Results
    tables: dict  # the method comparison's tables by file name ({} without method subsets)
    module_tables: dict  # the modules' tables by file name
    out: Path  # the results directory
    where: str  # on which prompts, in words
    n_neurons: int
    check: MeanCheck | None = None  # the mean-ablation check (--mean_ablation_top)


@torch.no_grad()
def run(lm, request: Evaluation, settings: EvalSettings) -> Outcome:
    """Stage e with a loaded model (gelutrace.model.loading): every subset ablated on the prompts (and the real
    text), the results written as one set into the dataset's perturbation_results/."""
    cfg = lm.model.config
    n_neurons = cfg.n_layer * cfg.d_mlp
    r, s = request, settings
    ds = DatasetDir(r.dataset_path, lm.name)
    ds.check(cfg.n_layer, cfg.d_mlp, lm.site)
    corpus_record = ds.corpus_record()
    check_recorded_weights(corpus_record, lm, r.dataset_path)
    if r.selection_prompts is None and corpus_record is None:
        raise PipelineError(f"{r.dataset_path} is a prompt-mode dataset: give its --input_csv")
    atomic.check_output_dir(Path(r.dataset_path) / layout.RESULTS_DIR / layout.PER_SAMPLE_DIR, "--dataset_path")
    atomic.lock_directory(r.dataset_path, "stage e")
    subsets = resolve_subsets(r.dataset_path, r.subset_names, n_neurons, lm.name)
    layer_sets = {tuple(sorted(excluded_layers(sub.info))) for sub in subsets if sub.compared} - {()}
    if len(layer_sets) > 1:
        raise PipelineError(f"the subsets leave out different layers ({'; '.join(map(str, sorted(layer_sets)))}): "
                            f"one comparison without layers at a time")
    if old := unrecorded(subsets):
        print(f"warning: {len(old)} subset(s) ({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}) come from an "
              f"older stage d, whose sidecars record neither the scores nor the halves: their Spearman "
              f"(method_agreement.csv) and selection_jaccard stay empty; rerun stage d to fill them", file=sys.stderr)
    if s.mean_ablation_top and (not r.eval_text or s.ablation != "zero"):
        raise PipelineError("--mean_ablation_top checks a zero-ablation verdict on the real text: give --eval_text "
                            "and leave --ablation zero")
    mean_values = ds.mean_activations(n_neurons) if s.ablation == "mean" else None
    check_values = ds.mean_activations(n_neurons) if s.mean_ablation_top else None
    prompts = r.prompts
    prompt_ids = encode_prompts(lm.tokenizer, prompts, cfg.block_size)
    text = leak = None
    if r.eval_text:
        context = realtext.check_context(cfg.block_size if r.context is None else r.context, cfg.block_size)
        text = realtext.read_eval_text(r.eval_text, lm.tokenizer, context, cfg.vocab_size, r.eval_tokens,
                                       text_field=r.text_field)
        leak = realtext.leak_check(text, corpus_record, r.selection_prompts)
        if note := realtext.leak_note(leak):
            print(f"note: {note}", file=sys.stderr)
    elif r.context is not None or r.eval_tokens != realtext.EVAL_TOKENS or r.text_field != DEFAULT_FIELD:
        raise PipelineError("--context, --eval_tokens and --text_field apply to --eval_text; give it or leave them "
                            "out")

    greedy = s.temperature == 0
    batches = plan_batches(prompts, prompt_ids, greedy, s.batch_size, cfg.block_size)
    n_generated = 1 + sum(1 for sub in subsets if len(sub.ids))
    tokens = n_generated * sum(len(b.row_prompt) * b.new_tokens for b in batches)
    chunks = metric_chunks(plan_rows(batches, prompts), prompt_ids, cfg.vocab_size, s.batch_size)
    ablated = [sub for sub in subsets if len(sub.ids)]
    modules = [sub for sub in ablated if sub.is_module]
    weights, weights_source = control_weights(r.dataset_path, lm.name, n_neurons) if modules else (None, None)
    if modules and weights is None:
        print(f"note: {r.dataset_path} has neither single-neuron effects nor attribution: the modules get no "
              f"effect-weighted controls (run d_calculate_neuron_effects.py, or stage b with attribution)",
              file=sys.stderr)
    compared = [sub for sub in ablated if not sub.is_module]
    with_controls = (len({len(sub.ids) for sub in compared if sub.compared and not excluded_layers(sub.info)})
                     if s.control_subsets == "best" else len(compared))  # at most
    conditions = (len(ablated) + s.random_controls * with_controls
                  + s.per_module * len(modules) * (2 if weights is not None else 1))
    n_k = len({len(sub.ids) for sub in compared if sub.compared})
    checked = (s.mean_ablation_top + s.random_controls) * n_k if s.mean_ablation_top else 0  # at most
    rows = plan_rows(batches, prompts)
    forced_tokens = conditions * int(sum(len(prompt_ids[p]) + n for p, n in zip(rows.prompt, rows.length) if n))
    if not s.own_continuation and text is None:
        raise PipelineError("--own_continuation 0 leaves the prompts without a metric: give --eval_text")
    text_total = 0
    if text is not None:  # every control on the control part; the mean check's subsets on the test part
        split = stats.split_prompts(text.n_units, s.seed, s.validation_share, s.control_share)
        test_scored, control_scored = (int(np.isin(text.unit, part).sum()) for part in (split.test, split.control_units))
        n_check = s.mean_ablation_top * n_k if s.mean_ablation_top else 0  # at most
        text_total = (text.scored * len(ablated) + control_scored * (conditions - len(ablated) + checked - n_check)
                      + test_scored * n_check)
    with tqdm(total=tokens, unit="tok", desc=f"generating ({'greedy' if greedy else 'sampling'})") as gen_bar, \
            tqdm(total=len(chunks) * conditions, unit="ablation", desc="teacher-forced metrics",
                 disable=not s.own_continuation) as metric_bar, \
            tqdm(total=text_total, unit="tok", unit_scale=True, desc="real text", disable=text is None) as text_bar:
        bars = {"tokens": gen_bar, "passes": metric_bar, "text": text_bar}
        results = measure_subsets(lm.model, lm.tokenizer, prompts, prompt_ids, batches, subsets, mean_values, s,
                                  progress=lambda kind, n: bars[kind].update(n), text=text, weights=weights)
        check = (mean_check(lm.model, results, subsets, check_values, s, s.mean_ablation_top,
                            progress=lambda kind, n: bars[kind].update(n)) if s.mean_ablation_top else None)
    module_tables = {}
    if modules:
        tokens = None
        if text is not None:
            tokens = me.tokens_table(results.text, subsets, lm.tokenizer)
            module_tables[layout.MODULE_TOKENS] = tokens
            module_tables[layout.MODULE_CONTEXTS] = me.contexts_table(lm.model, text, subsets, lm.tokenizer, cfg.d_mlp)
        module_tables[layout.MODULE_EFFECTS] = me.effects_table(subsets, results.summary, text is not None,
                                                                weights_source, tokens)

    add_selection_overlap(results, subsets)
    evaluation = evaluation_record(r.input_csv, r.selection_prompts, r.eval_csv, prompts, s, corpus_record)
    evaluation["own_continuation_token_forwards"] = forced_tokens  # what the teacher-forced metrics cost, or would
    if text is not None:
        evaluation["eval_text"] = {**text.record(r.eval_tokens), "leak_check": leak}
    out = Path(r.dataset_path) / layout.RESULTS_DIR
    where = ("held-out prompts" if evaluation["held_out"] else "prompts not looked up in the corpus"
             if evaluation["prompts_in_both"] is None else "the prompts they were chosen on")
    # the whole set is written beside the earlier one and swapped in: a failure leaves the earlier results
    with atomic.OutputSet(out, out / layout.RESULTS_MANIFEST, RESULT_SET, "stage e") as staged:
        written = write_results(staged.dir, results, evaluation, lm.tokenizer)
        for name, df in module_tables.items():
            atomic.write_csv(df, staged.dir / name)
            written.append(staged.dir / name)
        plot_perturbation_summary(results.summary, staged.dir / layout.PERTURBATION_PLOT,
                                  title=f"{lm.name}: effect of {s.ablation}-ablating each subset, on {where}")
        tables = write_comparison(r.dataset_path, staged.dir, lm.name, results, subsets, n_neurons, prompts,
                                  s.control_subsets)
        written += [staged.dir / layout.PERTURBATION_PLOT] + [staged.dir / name for name in tables]
        if tables:
            on = f"{text.scored:,} tokens of held-out text" if text is not None else where
            written.append(staged.dir / layout.COMPARISON_RECORD)
            ylabel = ("Δ NLL of the real next token (nats/token), 95 % CI over " + text.units if text is not None
                      else "Δ NLL of the baseline's tokens (nats/token), 95 % CI over prompts")
        if layout.COMPARISON in tables:
            plot_method_comparison(tables[layout.COMPARISON], staged.dir / layout.COMPARISON_PLOT,
                                   title=f"{lm.name}: neurons chosen by each method, {s.ablation}-ablated, on {on}")
            plot_dose_response(tables[layout.DOSE_RESPONSE], staged.dir / layout.DOSE_RESPONSE_PLOT, ylabel=ylabel,
                               title=f"{lm.name}: dose-response, {s.ablation}-ablating each method's top k, on {on}")
            written += [staged.dir / layout.COMPARISON_PLOT, staged.dir / layout.DOSE_RESPONSE_PLOT]
        if layout.DOSE_RESPONSE_EXCLUDED in tables:
            layers = " ".join(map(str, excluded_layers(by_exclusion(results.primary[0])[1][0].info)))
            plot_dose_response(tables[layout.DOSE_RESPONSE_EXCLUDED], staged.dir / layout.DOSE_RESPONSE_EXCLUDED_PLOT,
                               ylabel=ylabel, title=f"{lm.name}: dose-response without layer(s) {layers}, "
                                                    f"{s.ablation}-ablating each method's top k, on {on}")
            written.append(staged.dir / layout.DOSE_RESPONSE_EXCLUDED_PLOT)
        if check is not None:
            for name, df in check.tables.items():
                atomic.write_csv(df, staged.dir / name)
                written.append(staged.dir / name)
            plot_dose_response(check.tables[layout.MEAN_DOSE_RESPONSE], staged.dir / layout.MEAN_DOSE_RESPONSE_PLOT,
                               ylabel="Δ NLL of the real next token (nats/token), 95 % CI over " + text.units,
                               title=f"{lm.name}: dose-response, mean-ablating each k's {s.mean_ablation_top} best "
                                     f"methods, on {text.scored:,} tokens of held-out text")
            written.append(staged.dir / layout.MEAN_DOSE_RESPONSE_PLOT)
        staged.vouch(written)
    return Outcome(subsets, results, tables, module_tables, out, where, n_neurons, check)
