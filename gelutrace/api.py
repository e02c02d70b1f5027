"""
The pipeline as Python calls, for a notebook: each returns the objects the stage scripts write to disk (and the
scripts call the same functions). Exported by `gelutrace`:

    import gelutrace as gt
    lm = gt.load_model("tinybard")                              # or a checkpoint directory, a hub name, or a
                                                                # transformers / nnsight / TransformerBridge object
    ds = gt.record_corpus(lm, ["heldout.txt"], max_tokens=20_000)  # stage b, corpus mode; a temporary directory
    g = ds.graph()                                              # the co-activation graph (every weight)
    sub = gt.select(g, method="attribution", k=30)              # stage d
    res = gt.ablate(lm, sub, eval_text=["eval.txt"], random_controls=20)  # stage e on real text
    gt.neuron_cards(lm, ds, sub.ids).to_html("neurons.html")    # f_render_neuron_cards.py
    mods = gt.find_modules(g)                                   # c_find_modules.py
    tr = gt.trace(lm, "To be, or not to be", dataset=ds)       # b_trace_gelu_activations.py --graph
"""

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace import PipelineError
from gelutrace.circuit.graph import TraceSettings
from gelutrace.evaluate import ablation as pt
from gelutrace.evaluate import realtext
from gelutrace.files import atomic, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.graph import store as gs
from gelutrace.graph.coactivation import CoactivationGraph
from gelutrace.model.loading import LoadedModel, load_model  # noqa: F401  (exported)
from gelutrace.model.tokens import token_text
from gelutrace.record import corpus as cp
from gelutrace.report import cards as cd
from gelutrace.report import neuronpedia as npx
from gelutrace.report import tracegraph
from gelutrace.selection import communities as md
from gelutrace.selection import methods as sel


@dataclass
class Dataset:
    """A stage-b dataset directory: what `b_generate_activation_dataset.py` wrote, read back on demand."""
    path: Path
    m: str  # the file prefix (the model's name)

    @property
    def frequencies(self) -> pd.DataFrame:
        """{m}_neuron_frequency.csv: each neuron's activation count and frequency, mean activation, attribution."""
        return DatasetDir(self.path, self.m).frequencies()

    @property
    def record(self) -> dict | None:
        """{m}_corpus.json (corpus mode): the files read, with their sha256, format and field; tokens; windows."""
        return DatasetDir(self.path, self.m).corpus_record()

    def graph(self):
        """The co-activation graph store ({m}_weighted_graph) as a gelutrace.graph.coactivation.CoactivationGraph: counts and
        every derived weight (count, jaccard, phi, pmi; direct and direct_abs with direct_edges)."""

        return gs.read_graph(layout.path(self.path, layout.WEIGHTED_GRAPH, self.m))


def record_corpus(lm: LoadedModel, text: list[str], out_dir=None, max_tokens: int | None = None,
                  context: int | None = None, attribution: bool = False, direct_edges: bool = False,
                  top_examples: int = 10, text_field: str = "text") -> Dataset:
    """Stage b in corpus mode over `text` (files or directories, any corpus format), exact streamed statistics,
    into `out_dir` (default: a new temporary directory)."""

    _model("record_corpus", lm)
    text = _paths("record_corpus", "text", text)
    # the checked values (a numpy integer as an int) go on: the settings are recorded as JSON
    top_examples = _whole("record_corpus", "top_examples", top_examples, 0)
    max_tokens, context = (None if v is None else _whole("record_corpus", name, v, 1)
                           for name, v in (("max_tokens", max_tokens), ("context", context)))
    attribution, direct_edges = (_flag("record_corpus", name, v) for name, v in
                                 (("attribution", attribution), ("direct_edges", direct_edges)))
    if out_dir is None:
        out = Path(tempfile.mkdtemp(prefix="gelutrace_"))
    else:
        out = atomic.check_output_dir(_path("record_corpus", "out_dir", out_dir), "out_dir")
    settings = cp.CorpusSettings(context=context, max_tokens=max_tokens, top_examples=top_examples,
                                 attribution=attribution, direct_edges="adjacent" if direct_edges else None,
                                 text_field=text_field)
    with atomic.locked(out, "record_corpus"):  # this call's only: released when it returns, refused to another call
        cp.run(lm, text, out, settings)
    return Dataset(out, lm.name)


def _paths(call: str, name: str, value) -> list[str]:
    """One path or a list of them (never a path's characters), at least one."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
        raise PipelineError(f"{call} needs {name} as a path or a list of paths, got {type(value).__name__}")
    if not value:
        raise PipelineError(f"{call} needs at least one text file or directory in {name}")
    return [str(v) for v in value]


def _path(call: str, name: str, value, empty: bool = False) -> str:
    """One path (a str or os.PathLike), not empty unless `empty` (the caller refuses it itself)."""
    if not isinstance(value, (str, os.PathLike)) or not (empty or str(os.fspath(value)).strip()):
        raise PipelineError(f"{call} needs {name} as a path (a str or pathlib.Path), got {value!r}")
    return os.fspath(value)


def _flag(call: str, name: str, value) -> bool:
    """A bool (or numpy's), never a string or a number that Python would take as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise PipelineError(f"{call} needs {name} as True or False, got {value!r}")
    return bool(value)


def _real(call: str, name: str, value) -> float | None:
    """None, or a real number (int or float, numpy's too; not a bool nor a string) as a float."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PipelineError(f"{call} needs {name} as a number, got {value!r}")
    return float(value)


def _model(call: str, lm):
    if not isinstance(lm, LoadedModel):
        raise PipelineError(f"{call} needs a model from gelutrace.load_model, got {type(lm).__name__}")


def _graph(call: str, graph):

    if not isinstance(graph, CoactivationGraph):
        raise PipelineError(f"{call} needs a graph (Dataset.graph()), got {type(graph).__name__}")


def _dataset(call: str, dataset, optional: bool = False):
    if not (isinstance(dataset, Dataset) or (optional and dataset is None)):
        raise PipelineError(f"{call} needs dataset as a gelutrace.Dataset (Dataset(path, model name), or what "
                            f"record_corpus returns), got {type(dataset).__name__}")


def _whole(call: str, name: str, value, lo: int) -> int:
    """An int (not a bool, nor a float however whole) >= lo."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise PipelineError(f"{call} needs {name} as a whole number (int) >= {lo}, got {value!r}")
    return int(value)


def select(graph, method: str = "attribution", k: int = 30, threshold: float | None = None, weight: str = "count",
           seed: int = 1337, dataset: Dataset | None = None):
    """Stage d: the k neurons `method` ranks first (gelutrace.selection.methods.Subset: ids in rank order, scores, info);
    graph methods need `threshold`."""

    _graph("select", graph)
    _dataset("select", dataset, optional=True)
    k, seed = _whole("select", "k", k, 1), _whole("select", "seed", seed, 0)
    threshold = _real("select", "threshold", threshold)
    sel.check_params(threshold, 1.0, method)
    sel.check_sizes([k], graph.num_nodes)
    return sel.select_sizes(graph, threshold, [k], method, seed, weight=weight,
                            dataset_path=dataset.path if dataset is not None else None)[0]


def _neuron_ids(neurons, n: int) -> np.ndarray:
    """Neuron ids as int64, each in [0, n)."""
    ids = np.asarray(neurons)
    if ids.ndim != 1 or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
        raise PipelineError(f"neuron ids must be a list of whole numbers, got {ids.dtype} of shape {ids.shape}")
    bad = ids[(ids < 0) | (ids >= n)]
    if len(bad):
        raise PipelineError(f"neuron id {int(bad[0])} is outside 0-{n - 1}, this model's neurons")
    return ids.astype(np.int64)


@dataclass
class Ablated:
    """Stage e on real text for one set of neurons: the summary row's real-text columns (text_delta_nll and
    text_kl with CIs over the units, and with controls their null: text_delta_nll_p_random, ...), the
    measured sums (gelutrace.evaluate.realtext.TextResults), and per_token: the evaluation text token by token
    (position, token_id, token, nll unablated and delta_nll; both NaN for a window's first token, which nothing
    predicts), for plotting."""
    ids: np.ndarray
    summary: dict
    results: object = field(repr=False)
    per_token: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def delta_nll(self) -> float:
        return self.summary["text_delta_nll"]


def ablate(lm: LoadedModel, neurons, eval_text: list[str], eval_tokens: int = 8000, context: int | None = None,
           random_controls: int = 0, seed: int = 1337, batch_size: int = 64) -> Ablated:
    """Zero-ablate the neurons (a Subset, or neuron ids) on held-out text, with `random_controls` random sets of
    the same layers, as stage e's --eval_text measures them."""

    _model("ablate", lm)
    cfg = lm.model.config
    ids = np.unique(_neuron_ids(getattr(neurons, "ids", neurons), cfg.n_layer * cfg.d_mlp))  # each neuron once
    eval_text = _paths("ablate", "eval_text", eval_text)
    if not len(ids):
        raise PipelineError("ablate needs at least one neuron")
    random_controls = _whole("ablate", "random_controls", random_controls, 0)
    seed = _whole("ablate", "seed", seed, 0)
    eval_tokens, batch_size, context = (None if v is None else _whole("ablate", name, v, 1) for name, v in
                                        (("eval_tokens", eval_tokens), ("batch_size", batch_size),
                                         ("context", context)))
    ctx = realtext.check_context(cfg.block_size if context is None else context, cfg.block_size)
    text = realtext.read_eval_text(eval_text, lm.tokenizer, ctx, cfg.vocab_size, eval_tokens)
    sub = pt.Subset("neurons", ids)
    settings = pt.EvalSettings(seed=seed, batch_size=batch_size, validation_share=0.5)
    res = pt.measure_text(lm.model, text, [sub], None, settings, per_position=True)  # stage e's code for --eval_text
    sub.controls = [pt.random_control(ids, cfg.n_layer, cfg.d_mlp, seed, j) for j in range(random_controls)]
    pt.measure_text_controls(res, lm.model, [sub], None, settings)
    names = {int(t): token_text(lm.tokenizer, int(t)) for t in np.unique(text.ids)}
    per_token = pd.DataFrame({"position": np.arange(len(text.ids)), "token_id": text.ids,
                              "token": [names[int(t)] for t in text.ids], "nll": res.baseline.position_nll,
                              "delta_nll": res.mains[0].position_delta_nll})
    return Ablated(ids, realtext.summary_columns(res, 0), res, per_token)


def trace(lm: LoadedModel, prompt: str, out_dir=None, dataset: "Dataset | str | None" = None, modules=None,
          max_nodes: int = 5000, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          faithfulness_nodes: int = 50, batch_size: int = 64) -> "tracegraph.TraceOutcome":
    """The prompt's neuron attribution graph (b_trace_gelu_activations.py --graph): written to `out_dir` (default: a
    new temporary directory) as {m}_trace_graph.json, its page {m}_trace_graph.html and its summary, and returned (outcome.graph, .pruned,
    .scores, .summary, .files). `dataset` (a Dataset or a stage-b directory of the model) labels the neurons and
    compares them with its stage d's corpus ranking; `modules` (a c_find_modules table, {m}_modules_{weight}.csv)
    groups them into supernodes."""

    _model("trace", lm)
    if not isinstance(prompt, str) or not prompt.strip():
        raise PipelineError("trace needs a prompt: a non-empty string")
    max_nodes, faithfulness_nodes, batch_size = (_whole("trace", name, v, lo) for name, v, lo in (
        ("max_nodes", max_nodes, 1), ("faithfulness_nodes", faithfulness_nodes, 0), ("batch_size", batch_size, 1)))
    thresholds = [_real("trace", name, v) for name, v in (("node_threshold", node_threshold),
                                                           ("edge_threshold", edge_threshold))]
    if any(t is None or not 0 <= t <= 1 for t in thresholds):
        raise PipelineError("trace needs node_threshold and edge_threshold in [0, 1]")
    data = None if dataset is None else getattr(dataset, "path", None) or _path("trace", "dataset", dataset)
    mods = None if modules is None else _path("trace", "modules", modules)
    out = (Path(tempfile.mkdtemp(prefix="gelutrace_")) if out_dir is None
           else atomic.check_output_dir(_path("trace", "out_dir", out_dir), "out_dir"))
    settings = TraceSettings(max_nodes, thresholds[0], thresholds[1], batch_size=batch_size)
    with atomic.locked(out, "trace"):  # this call's only: released when it returns, refused to another call
        return tracegraph.run(lm, tracegraph.TraceRequest(prompt, out, data, mods, faithfulness_nodes), settings)


@dataclass
class Cards:
    """Neuron cards (gelutrace.report.cards.Card), as f_render_neuron_cards.py renders them."""
    cards: list
    m: str
    model: object = None  # the model they were built from: the Neuronpedia export's logit effects
    dataset: str = ""  # the dataset directory's name, recorded in the Neuronpedia source

    def to_neuronpedia(self, directory, model_id: str | None = None,
                       creator_id: str | None = None, source_set: str | None = None) -> Path:
        """f_render_neuron_cards.py --neuronpedia DIR [--neuronpedia_model_id ID --neuronpedia_creator_id ID
        --neuronpedia_source_set SET]: the cards in Neuronpedia's export layout under DIR/{model_id}/, returned.
        creator_id defaults to Neuronpedia's bot user (neuronpedia.DEFAULT_CREATOR_ID), source_set (gelutrace-mlp or
        neurons) to gelutrace-mlp; a re-export over other data warns on stderr (docs/stage-f.md, Neuronpedia export)."""

        if self.model is None:
            raise PipelineError("to_neuronpedia needs the model the cards were built from (Cards.model; "
                                "gelutrace.neuron_cards sets it)")
        directory = _path("to_neuronpedia", "directory", directory, empty=True)
        model_id = npx.model_slug(self.m) if model_id is None else npx.check_model_id(model_id)
        creator_id = npx.DEFAULT_CREATOR_ID if creator_id is None else npx.check_creator_id(creator_id)
        source_set = npx.check_source_set(layout.NEURONPEDIA_SET if source_set is None else source_set)
        directory = npx.check_target(directory, model_id)
        # under an flock on the directory (one export at a time, per call), the target checked again there
        return npx.write_export(directory, self.cards, self.m, self.model, self.dataset, creator_id, model_id,
                                source_set)

    def to_html(self, path) -> Path:

        path = _path("to_html", "path", path)
        with atomic.atomic_open(path, "w", encoding="utf-8") as f:
            f.write(cd.cards_html(self.cards, self.m))
        return Path(path)

    def to_markdown(self) -> str:

        return cd.cards_markdown(self.cards, self.m)


def neuron_cards(lm: LoadedModel, dataset: Dataset, neuron_ids, k: int = 10) -> Cards:
    """The cards of these neurons from the dataset (top examples, direct logit effect, figures)."""

    _model("neuron_cards", lm)
    _dataset("neuron_cards", dataset)
    cp.check_recorded_weights(DatasetDir(dataset.path, lm.name).corpus_record(), lm, dataset.path)
    n = lm.model.config.n_layer * lm.model.config.d_mlp
    ids = _neuron_ids(neuron_ids, n)
    if not len(ids) or not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise PipelineError(f"neuron_cards needs at least one neuron and a whole number k >= 1 of examples, got "
                            f"{len(ids)} neurons and k = {k!r}")
    return Cards(cd.build_cards(lm.model, lm.tokenizer, dataset.path, lm.name, ids, k,
                                modules=cd.dataset_modules(dataset.path, lm.name, n)), lm.name, lm.model,
                 Path(dataset.path).resolve().name)


def find_modules(graph, weight: str = "count", top_edges_per_node: int = 32, threshold: float | None = None,
                 resolution: float | None = None, null_graphs: int = 20, seeds: int = 10, seed: int = 0):
    """c_find_modules.py: Leiden modules of the thinned graph against degree-preserving rewired graphs; returns
    (gelutrace.selection.communities.Modules, its record as {m}_modules_{weight}.json holds it)."""

    _graph("find_modules", graph)
    top_edges_per_node, null_graphs, seeds, seed = (
        _whole("find_modules", name, value, lo) for name, value, lo in
        (("top_edges_per_node", top_edges_per_node, 1), ("null_graphs", null_graphs, 0), ("seeds", seeds, 0),
         ("seed", seed, 0)))
    threshold, resolution = _real("find_modules", "threshold", threshold), _real("find_modules", "resolution",
                                                                                  resolution)
    s = md.ModuleSettings(weight, threshold, top_edges_per_node, resolution, "drop", seed, null_graphs, seeds)
    mods = md.find_modules(graph, s)
    return mods, md.describe(mods, graph)
