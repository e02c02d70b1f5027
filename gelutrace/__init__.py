"""
Tracing influential GELU neurons of GPT-2-family models: the library behind the stage scripts, and a Python API
(gelutrace.api) for notebooks:

    import gelutrace as gt
    lm = gt.load_model("tinybard")
    ds = gt.record_corpus(lm, ["heldout.txt"], max_tokens=20_000)
    sub = gt.select(ds.graph(), method="attribution", k=30)
    res = gt.ablate(lm, sub, eval_text=["eval.txt"], random_controls=20)
    gt.neuron_cards(lm, ds, sub.ids).to_html("neurons.html")
"""


class PipelineError(Exception):
    """Bad input or an unmet precondition: the scripts print its message as one line and exit non-zero."""


API = ("load_model", "record_corpus", "select", "ablate", "neuron_cards", "find_modules", "trace", "Dataset", "Ablated",
       "Cards")
__all__ = ["PipelineError", *API]


def __getattr__(name):  # the API on first use: `import gelutrace` alone loads neither torch nor transformers
    if name in API:  # (no API name is also a submodule's, which `from gelutrace import x` would then shadow)
        from gelutrace import api

        return getattr(api, name)
    raise AttributeError(f"module 'gelutrace' has no attribute {name!r}")


def __dir__():  # tab completion lists the API, still without importing it
    return sorted(set(globals()) | set(__all__))
