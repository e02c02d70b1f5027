"""
A stage-b dataset directory, read back: whether it is a corpus-mode dataset, its corpus record (checked: whole,
of this model, the one its manifest vouches for), its frequencies and mean activations, and whether it describes
a given model. The graph store in it is read by gelutrace.graph.store.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gelutrace import PipelineError
from gelutrace.files import atomic, formats, layout
from gelutrace.files.layout import CORPUS_FORMAT
from gelutrace.model.sites import GPT2_SITE

# what every corpus record holds (gelutrace.record.corpus.corpus_record), and its type
RECORD_FIELDS = {"model": str, "n_layer": int, "d_mlp": int, "files": list, "documents": int, "tokens": int,
                 "context": int, "samples": int}


@dataclass
class DatasetDir:
    """The directory `path` holding stage b's files of model prefix `m` ({m}_neuron_frequency.csv, ...)."""
    path: Path
    m: str

    def __post_init__(self):
        self.path = Path(self.path)

    @classmethod
    def find(cls, path, template: str = layout.FREQUENCY) -> "DatasetDir":
        """The dataset in `path` of the one model whose file named like `template` is there."""
        return cls(Path(path), layout.model_prefix(path, template))

    def file(self, template: str) -> Path:
        return layout.path(self.path, template, self.m)

    @property
    def is_corpus(self) -> bool:
        """Whether stage b read text here (corpus mode, {m}_corpus.json) rather than generating from prompts."""
        return self.file(layout.CORPUS).is_file()

    def corpus_record(self) -> dict | None:
        """
        {m}_corpus.json (None for a prompt-mode dataset): the files read, with their sha256, format and field;
        tokens, windows, samples, shard. Refused when damaged, of another model, or not the record the dataset
        manifest vouches for (replaced or edited since the run that wrote the files beside it).
        """
        p = self.file(layout.CORPUS)
        if not p.is_file():
            return None

        def damaged(why: str) -> PipelineError:
            return PipelineError(f"{p} is damaged: {why}; rerun stage b")

        try:
            rec = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise damaged(f"not valid JSON ({e})") from None
        if not isinstance(rec, dict) or rec.get("format") != CORPUS_FORMAT:
            found = rec.get("format") if isinstance(rec, dict) else type(rec).__name__
            raise damaged(f"not a corpus record (format {found!r}, not {CORPUS_FORMAT!r})")
        for key, kind in RECORD_FIELDS.items():
            if not isinstance(rec.get(key), kind) or isinstance(rec.get(key), bool):
                raise damaged(f"no {key!r} ({kind.__name__})")
        if not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in rec["files"]):
            raise damaged("a file read without its path")
        if rec["model"] != self.m:
            raise PipelineError(f"{p} is the corpus record of model {rec['model']!r}, not {self.m!r}: the dataset "
                                f"is from another model")
        atomic.verify_output_set(self.file(layout.DATASET_MANIFEST), [p], "stage b")
        return rec

    def frequencies(self) -> pd.DataFrame:
        """{m}_neuron_frequency.csv: each neuron's activation count and frequency, mean activation, attribution."""
        p = self.file(layout.FREQUENCY)
        if not p.is_file():
            raise PipelineError(f"{p} does not exist: {self.path} is not a stage-b dataset of {self.m}")
        return pd.read_csv(p)

    def mean_activations(self, n_neurons: int) -> np.ndarray:
        """Each neuron's mean post-GELU output, from {m}_neuron_frequency.csv."""
        return formats.read_neuron_column(self.file(layout.FREQUENCY), "mean_activation", n_neurons,
                                          "--ablation mean needs stage b's frequency file; rerun stage b or use "
                                          "--ablation zero")

    def check_model(self):
        """The directory holds files of this model (its graph metadata or attributes, which stage b writes)."""
        d, m = self.path, self.m
        if not d.is_dir():
            raise PipelineError(f"--dataset_path {d} is not a directory")
        meta_p, attr_p = self.file(layout.GRAPH_META), self.file(layout.ATTRIBUTES)
        if not meta_p.is_file() and not attr_p.is_file():
            others = sorted({p.name[: -len(suffix)] for suffix in (layout.ATTRIBUTES.format(m=""),
                                                                   layout.GRAPH_META.format(m=""))
                             for p in d.glob("*" + suffix)})
            found = f"; it holds files of model(s) {', '.join(others)}" if others else ""
            raise PipelineError(f"{d} has neither {attr_p.name} nor {meta_p.name}: not a dataset of model {m!r}{found} "
                                f"(stage b writes them)")

    def check(self, n_layer: int, d_mlp: int, site: dict | None = None):
        """
        The directory must describe this model: its {m} graph files, with its layer count and width, and (given
        `site`) neurons recorded at the same site (metadata without a site predates other families: GPT-2).
        """
        d, m = self.path, self.m
        self.check_model()
        meta_p, attr_p = self.file(layout.GRAPH_META), self.file(layout.ATTRIBUTES)
        want = f"n_layer={n_layer}, d_mlp={d_mlp}"
        if meta_p.is_file():
            meta = formats.read_graph_meta(d, m)
            if (meta.get("n_layer"), meta.get("d_mlp")) != (n_layer, d_mlp):
                raise PipelineError(f"{meta_p} describes n_layer={meta.get('n_layer')}, d_mlp={meta.get('d_mlp')}, "
                                    f"but model {m!r} has {want}: the dataset is from another model")
            if site is not None:
                recorded = {k: meta.get(k, GPT2_SITE[k]) for k in ("architecture", "neuron_site")}
                if any(recorded[k] != site[k] for k in recorded):
                    raise PipelineError(f"{meta_p} was recorded on architecture {recorded['architecture']} at the "
                                        f"neuron site {recorded['neuron_site']!r}, but the model's config.json gives "
                                        f"architecture {site['architecture']}, whose neurons are at "
                                        f"{site['neuron_site']!r}: the dataset is from another model")
        if attr_p.is_file():
            attrs = formats.read_attributes(d, m)
            n = n_layer * d_mlp
            ok = (len(attrs) == n and np.array_equal(attrs["node_id"].to_numpy(), np.arange(n))
                  and np.array_equal(attrs["layer"].to_numpy(), np.arange(n) // d_mlp)
                  and np.array_equal(attrs["dimension"].to_numpy(), np.arange(n) % d_mlp))
            if not ok:
                raise PipelineError(f"{attr_p} does not list the {n} neurons of model {m!r} ({want}) in id order: "
                                    f"the dataset is from another model")
