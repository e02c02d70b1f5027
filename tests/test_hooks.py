"""
Every hook class leaves the model as it found it: each hook a run registers is gone after the `with` block, whether
the block ends normally, raises, or registering itself fails part way. The check reads the modules' own
_forward_hooks / _forward_pre_hooks dicts, on the shipped model (model.py) and on tiny transformers models of two
other families (whose wrapper keeps one pre-hook per output projection, part of the model).
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

from gelutrace.graph.counts import CoactivationCounts
from gelutrace.model.generation import StepProgress
from gelutrace.model.hooks import Ablation, CleanPass, GeluHooks, ResumePoints, RowAblation, SiteMeans, StopAfter
from gelutrace.model.sites import HFCausalLM
from gelutrace.record.corpus import CountingHooks
from gelutrace.record.direct import DirectEdges, DirectHooks, anatomy, corpus_targets
from gelutrace.record.prompts import ActivationRecorder

B, T = 2, 5


class Bar:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n


def recorded(model):
    """Every module's forward hooks and forward pre-hooks, by module name."""
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()}


def count(state) -> int:
    return sum(len(f) + len(p) for f, p in state.values())


def direct(model, idx):
    an = anatomy(model)
    hooks = DirectHooks(model, DirectEdges(model.config.n_layer, model.config.d_mlp, "all", an.gated), an)

    def run():
        hooks.begin(torch.ones(idx.shape), corpus_targets(idx))
        model(idx)
        hooks.finish()
    return hooks, run


def cases(model, idx):
    """name -> (hook object, a forward run that uses it), built fresh for each check."""
    d = model.config.d_mlp
    ids = np.array([1, d + 2])
    values = np.linspace(-1, 1, model.config.n_layer * d)
    out = {
        "GeluHooks": lambda: (GeluHooks(model, lambda layer: lambda m, i, o: None), lambda: model(idx)),
        "ActivationRecorder": lambda: (ActivationRecorder(model, torch.ones(1, B)), lambda: model(idx)),
        "CountingHooks": lambda: (CountingHooks(model, CoactivationCounts(model.config.n_layer, d), keep_rows=True),
                                  lambda: model(idx)),
        "Ablation": lambda: (Ablation(model, ids), lambda: model(idx)),
        "Ablation(values)": lambda: (Ablation(model, ids, values[ids]), lambda: model(idx)),
        "RowAblation": lambda: (RowAblation(model, [ids[:1], ids[1:]], 1, values), lambda: model(idx)),
        "DirectHooks": lambda: direct(model, idx),
        "SiteMeans": lambda: (SiteMeans(model, [1], torch.ones(1, T), B, (0, torch.tensor([3, 4]))),
                              lambda: model(idx[:1].repeat(B, 1))),
        "StepProgress": lambda: (StepProgress(model, Bar(), B), lambda: model(idx)),
        # its pass ends in the exception its block swallows (test_stop_after_ends_the_pass_at_the_layer)
        "StopAfter": lambda: (StopAfter(model, 0), lambda: None),
    }
    if not hasattr(model, "hf"):  # CleanPass and ResumePoints read model.py's blocks
        out["CleanPass"] = lambda: (CleanPass(model, 1), lambda: model(idx))
        out["ResumePoints"] = lambda: (ResumePoints(model, [0, 1]), lambda: model(idx))
    return out


def tiny_hf(model_type):
    import transformers

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 max_position_embeddings=64, vocab_size=50)
    if model_type == "llama":
        cfg = transformers.LlamaConfig(**small, num_key_value_heads=2)
    else:
        cfg = transformers.GPTNeoXConfig(**small, hidden_act="gelu")
    torch.manual_seed(0)
    return HFCausalLM(transformers.AutoModelForCausalLM.from_config(cfg).eval(), model_type)


@pytest.fixture(scope="module", params=["tinybard", "llama", "gpt_neox"])
def model(request):
    if request.param == "tinybard":
        return request.getfixturevalue("shipped").model
    return tiny_hf(request.param)


@pytest.fixture
def idx(model):
    return torch.randint(1, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))


def assert_clean(model, before):
    assert recorded(model) == before
    if hasattr(model, "hf"):  # only the wrapper's own pre-hooks on the output projections
        assert count(before) == model.config.n_layer
        assert all(not f for f, _ in before.values())
    else:
        assert count(before) == 0


NAMES = ["GeluHooks", "ActivationRecorder", "CountingHooks", "Ablation", "Ablation(values)", "RowAblation",
         "DirectHooks", "SiteMeans", "StepProgress", "CleanPass", "StopAfter", "ResumePoints"]


def make(model, idx, name):
    made = cases(model, idx)
    if name not in made:
        pytest.skip(f"{name} is for model.py's GPT-2")
    return made[name]()


@pytest.mark.parametrize("name", NAMES)
def test_removed_on_exit(model, idx, name):
    hooks, run = make(model, idx, name)
    before = recorded(model)
    with torch.no_grad(), hooks:
        assert count(recorded(model)) > count(before)
        run()
    assert_clean(model, before)
    with torch.no_grad(), hooks:  # a hook object is reusable: it registers again and cleans up again
        run()
    assert_clean(model, before)


@pytest.mark.parametrize("name", NAMES)
def test_removed_on_an_error_in_the_block(model, idx, name):
    hooks, run = make(model, idx, name)
    before = recorded(model)
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), hooks:
        run()
        raise KeyboardInterrupt
    assert_clean(model, before)


def test_removed_on_an_error_inside_a_hook(model, idx):
    def hook_for(layer):
        def hook(m, i, o):
            if layer == 1:
                raise ValueError("boom")
        return hook

    before = recorded(model)
    with pytest.raises(ValueError, match="boom"), torch.no_grad(), GeluHooks(model, hook_for):
        model(idx)
    assert_clean(model, before)


@pytest.mark.parametrize("name", NAMES)
def test_removed_when_registering_fails(model, idx, name, monkeypatch):
    """The last registration of the set raises: the ones before it are removed, and the error goes through."""
    hooks, _ = make(model, idx, name)
    before = recorded(model)
    with hooks:
        n = count(recorded(model)) - count(before)
    calls = []
    real = {"register_forward_hook": nn.Module.register_forward_hook,
            "register_forward_pre_hook": nn.Module.register_forward_pre_hook}

    def failing(kind):
        def register(module, *a, **k):
            calls.append(kind)
            if len(calls) == n:
                raise RuntimeError("registration failed")
            return real[kind](module, *a, **k)
        return register

    for kind in real:
        monkeypatch.setattr(nn.Module, kind, failing(kind))
    with pytest.raises(RuntimeError, match="registration failed"):
        with hooks:
            pass
    monkeypatch.undo()
    assert len(calls) == n
    assert_clean(model, before)
    assert hooks.handles == []


def test_stop_after_ends_the_pass_at_the_layer(model, idx):
    """The layers up to the stop run (the hooks entered before it see their values), none above it."""
    seen = []
    with torch.no_grad(), GeluHooks(model, lambda layer: lambda m, i, o: seen.append((layer, o.clone()))), \
            StopAfter(model, 0):
        model(idx)
    with torch.no_grad(), GeluHooks(model, lambda layer: lambda m, i, o: seen.append((layer, o.clone()))):
        model(idx)
    assert [layer for layer, _ in seen] == [0] + list(range(model.config.n_layer))
    assert torch.equal(seen[0][1], seen[1][1])


def test_a_pass_resumed_at_a_layer_equals_the_whole_pass(shipped):
    """GPT.trunk_from at each layer, from what ResumePoints kept, gives trunk's output bit for bit, and under an
    ablation of that layer's neurons the ablated whole pass's output."""
    model = shipped.model
    idx = torch.randint(1, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    d = model.config.d_mlp
    with torch.no_grad():
        whole = model.trunk(idx)
        for layer in range(model.config.n_layer):
            with ResumePoints(model, [layer]) as kept:
                model.trunk(idx)
            assert torch.equal(model.trunk_from(layer, *kept.points[layer]), whole)
            ids = np.array([layer * d + 3, min(layer + 1, model.config.n_layer - 1) * d + 5])
            with Ablation(model, ids):
                ablated = model.trunk(idx)
                assert torch.equal(model.trunk_from(layer, *kept.points[layer]), ablated)
