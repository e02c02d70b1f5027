"""
The labels of a per-prompt neuron graph's nodes (Neuronpedia's `clerp`, shown in a node list, so short): with a
stage-b dataset of the same model, each neuron's top-activating contexts and its most promoted tokens, from the
neuron cards' own code (gelutrace.report.cards); without one, `L{layer}/N{dim}`. A neuron kept at several positions
is looked up once.
"""

import numpy as np

from gelutrace import PipelineError
from gelutrace.circuit.graph import NeuronGraph
from gelutrace.files.dataset import DatasetDir
from gelutrace.report import cards, markdown, viewer

LABEL_CONTEXTS = 2  # distinct top-activating contexts per label ...
LABEL_EXAMPLES = 10  # ... among this many top examples
LABEL_CONTEXT_TOKENS = 3  # tokens shown of each, ending at the one the neuron fires on
LABEL_CONTEXT_CHARS = 24  # a longer context keeps its end
LABEL_TOKENS = 3  # most promoted tokens (direct logit effect)


def plain_label(layer: int, dim: int) -> str:
    return f"L{layer}/N{dim}"


def _context(tokens: list[str]) -> str:
    *before, last = tokens[-LABEL_CONTEXT_TOKENS:]
    text = markdown.visible("".join(before)) + "[" + markdown.visible(last) + "]"
    return text if len(text) <= LABEL_CONTEXT_CHARS else "…" + text[-(LABEL_CONTEXT_CHARS - 1):]


def compose_label(layer: int, dim: int, examples: list[cards.Example], promoted: list[cards.TokenEffect]) -> str:
    """`L3/N17 "a big[ dog]" "the[ cat]" → " bark" " ran"`: the plain label, the end of each top context with the
    token the neuron fires on in brackets, then the tokens it promotes most."""
    parts = [plain_label(layer, dim)]
    contexts = dict.fromkeys(_context(e.tokens) for e in examples if e.tokens)  # a prompt's samples share contexts
    parts += [f'"{c}"' for c in list(contexts)[:LABEL_CONTEXTS]]
    if promoted:
        parts.append("→ " + " ".join(f'"{markdown.visible(t.token)}"' for t in promoted[:LABEL_TOKENS]))
    return " ".join(parts)


def neuron_labels(model, tokenizer, graph: NeuronGraph, data=None, m: str | None = None, batch_size: int = 32,
                  progress=None) -> list[str]:
    """
    One label per kept neuron of `graph`, in its order. With `data` (a stage-b dataset directory of this model,
    prefix `m`), each distinct (layer, dimension) is labelled from its top examples and direct logit effect (on
    model.py's GPT-2 weights only, as the cards), all neurons at once: one pass over the dataset, one product
    with the unembedding per chunk of neurons.
    """
    return trace_cards(model, tokenizer, graph, data, m, batch_size=batch_size, progress=progress)[0]


def trace_cards(model, tokenizer, graph: NeuronGraph, data=None, m: str | None = None, modules=None,
                module_names: dict | None = None, batch_size: int = 32, progress=None, with_cards: bool = False
                ) -> tuple[list[str], viewer.NeuronCards | None]:
    """
    neuron_labels, and with `with_cards` the viewer page's card of each distinct kept neuron: its label, top examples
    shaded by its activation (one more pass over the sequences the shown ones come from), promoted and suppressed tokens,
    and its module (`modules`: each kept neuron's, -1 for none; `module_names`: module -> supernode name). Without
    a dataset a card holds the module alone, and there are no cards without modules either.
    """
    layer = graph.neurons[:, 0].numpy()
    dim = graph.neurons[:, 2].numpy()
    d_mlp = model.config.d_mlp
    ids, where = np.unique(layer * d_mlp + dim, return_inverse=True)
    module_of = {}
    if modules is not None:
        module_of = {int(ids[w]): int(k) for w, k in zip(where, np.asarray(modules).tolist())}

    def module(n: int) -> str:
        k = module_of.get(n, -1)
        return "" if k < 0 else (module_names or {}).get(k, f"M{k}")

    if data is None:
        labels = [plain_label(int(a), int(b)) for a, b in zip(layer, dim)]
        if not with_cards or modules is None:
            return labels, None
        return labels, viewer.NeuronCards(where, [viewer.card_json([], [], [], module(int(n))) for n in ids])
    if m is None:
        raise PipelineError("labels from a dataset need the model's file prefix")
    cfg = model.config
    DatasetDir(data, m).check(cfg.n_layer, cfg.d_mlp)
    examples = cards.neuron_examples(model, tokenizer, data, m, ids, LABEL_EXAMPLES, batch_size, progress,
                                     shades=with_cards, shade_top=viewer.CARD_EXAMPLES)
    n_tokens = max(LABEL_TOKENS, viewer.CARD_EFFECT_TOKENS) if with_cards else LABEL_TOKENS
    effects = (cards.direct_logit_effects(model, tokenizer, ids, n_tokens)
               if cards.has_logit_effect(model) else [([], [])] * len(ids))
    unique = [compose_label(int(n) // cfg.d_mlp, int(n) % cfg.d_mlp, ex, up)
              for n, ex, (up, _) in zip(ids, examples, effects)]
    labels = [unique[i] for i in where]
    if not with_cards:
        return labels, None
    return labels, viewer.NeuronCards(where, [viewer.card_json(ex, up, down, module(int(n)))
                                              for n, ex, (up, down) in zip(ids, examples, effects)])
