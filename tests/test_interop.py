"""
The model a notebook already holds, passed to gelutrace.load_model as an object (a transformers model, an nnsight
LanguageModel, a TransformerLens TransformerBridge), and results as the ecosystem's objects (networkx and igraph
graphs, a per-token DataFrame). The references are independent: the same weights saved and loaded by path,
graphs built by hand from the dataset's files read with numpy, ΔNLL per token from transformers' own model.
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gelutrace as gt
from gelutrace import PipelineError
from gelutrace.files import layout
from gelutrace.record import corpus as cp
from gelutrace.record import shards
from gelutrace.report import cards
from tests.conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_PATH, make_tokenizer, run_python

TEXT = [str(HELDOUT_PATH)]
TOKENS = 600


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                    activation_function="gelu_new", bos_token_id=0, eos_token_id=0))
    randomize(hf, seed)
    return hf.eval()


def llama(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, bos_token_id=0, eos_token_id=None, pad_token_id=0))
    randomize(hf, seed)
    return hf.eval()


def randomize(model, seed):
    """Weights at a scale where activations are O(1) (norm gains near 1), so that counts and signs mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1 if name.endswith("weight") else 0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(1.5 / min(p.shape) ** 0.5 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def saved(hf, tokenizer, d: Path) -> Path:
    hf.save_pretrained(str(d), safe_serialization=True)
    tokenizer.save_pretrained(str(d))
    return d


def frequency_bytes(ds) -> bytes:
    return layout.path(ds.path, layout.FREQUENCY, ds.m).read_bytes()


@pytest.mark.parametrize("build", [gpt2, llama])
def test_object_gives_the_frequencies_of_the_same_weights_loaded_by_path(build, tokenizer, tmp_path):
    hf = build()
    ckpt = saved(hf, tokenizer, tmp_path / "tiny")
    from_disk = gt.record_corpus(gt.load_model(str(ckpt), "cpu"), TEXT, tmp_path / "disk", max_tokens=TOKENS)
    lm = gt.load_model(hf, tokenizer=tokenizer, name="tiny")
    from_memory = gt.record_corpus(lm, TEXT, tmp_path / "memory", max_tokens=TOKENS)
    assert lm.path is None and lm.name == "tiny"
    assert frequency_bytes(from_memory) == frequency_bytes(from_disk)
    (memory,), files = from_memory.record["weights"], from_disk.record["weights"]
    assert memory["memory"] is True and from_memory.record["model_path"] is None
    assert [f["file"] for f in files] == ["model.safetensors"] and "memory" not in files[0]
    # the fingerprint is the state dict's bytes: the model loaded from disk hashes the same
    assert cp.memory_weights(gt.load_model(str(ckpt), "cpu").model)["sha256"] == memory["sha256"]


def test_gpt2_runs_on_model_py_over_the_objects_own_tensors(tokenizer):
    hf = gpt2()
    lm = gt.load_model(hf, tokenizer=tokenizer, name="tiny")
    assert type(lm.model).__name__ == "GPT" and lm.site["architecture"] == "gpt2"
    c_fc = hf.transformer.h[1].mlp.c_fc.weight
    assert lm.model.transformer.h[1].mlp.c_fc.weight.data_ptr() == c_fc.data_ptr()  # no copy
    idx = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(lm.model(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)


def test_the_name_comes_from_name_or_path(tokenizer, tmp_path):
    ckpt = saved(gpt2(), tokenizer, tmp_path / "owner" / "my-model")
    from transformers import GPT2LMHeadModel

    lm = gt.load_model(GPT2LMHeadModel.from_pretrained(str(ckpt)))  # its tokenizer found there too
    assert lm.name == "my-model" and lm.tokenizer.decode(lm.tokenizer.encode("To be")) == "To be"
    with pytest.raises(PipelineError, match="name=") as e:
        gt.load_model(gpt2(), tokenizer=tokenizer)  # built in memory: no name_or_path
    assert "\n" not in str(e.value)


def test_an_edit_in_memory_is_what_is_analysed(tokenizer, tmp_path):
    """GPT-2: one neuron's output weights zeroed (a row of its Conv1D c_proj, a column of the down projection):
    its activation count is unchanged, its direct logit effect 0; llama: ablating the neuron changes nothing."""
    layer, dim = 0, 5
    hf = gpt2()
    before = gt.record_corpus(gt.load_model(hf, tokenizer=tokenizer, name="tiny"), TEXT, tmp_path / "a",
                              max_tokens=TOKENS)
    with torch.no_grad():
        hf.transformer.h[layer].mlp.c_proj.weight[dim, :] = 0
    lm = gt.load_model(hf, tokenizer=tokenizer, name="tiny")
    after = gt.record_corpus(lm, TEXT, tmp_path / "b", max_tokens=TOKENS)
    nid = layer * lm.model.config.d_mlp + dim
    assert after.frequencies.activation_count[nid] == before.frequencies.activation_count[nid]
    assert not np.array_equal(after.frequencies.activation_count, before.frequencies.activation_count)
    assert np.all(cards.logit_effect(lm.model, nid) == 0)
    assert np.any(cards.logit_effect(lm.model, nid + 1) != 0)
    assert after.record["weights"] != before.record["weights"]

    hf = llama()
    d_mlp = hf.config.intermediate_size
    with torch.no_grad():
        hf.model.layers[layer].mlp.down_proj.weight[:, dim] = 0
    lm = gt.load_model(hf, tokenizer=tokenizer, name="tinyllama")
    nid = layer * d_mlp + dim
    assert gt.ablate(lm, [nid], TEXT, eval_tokens=200).per_token.delta_nll.abs().max() == 0
    assert gt.ablate(lm, [nid + 1], TEXT, eval_tokens=200).per_token.delta_nll.abs().max() > 0


class LanguageModel:
    """A stand-in for nnsight's LanguageModel: an object (not a torch module) around the model, `_module`, with
    its tokenizer."""

    def __init__(self, module, tokenizer):
        self._module, self.tokenizer = module, tokenizer


class TransformerBridge(torch.nn.Module):
    """A stand-in for TransformerLens 4's TransformerBridge: the transformers model it runs is `original_model`."""

    def __init__(self, model, tokenizer, compatibility_mode=False):
        super().__init__()
        self.__dict__["original_model"] = model
        self.tokenizer, self.compatibility_mode = tokenizer, compatibility_mode


class HookedTransformer(torch.nn.Module):
    pass


def test_wrappers_are_unwrapped(tokenizer, tmp_path):
    hf = llama()
    want = frequency_bytes(gt.record_corpus(gt.load_model(hf, tokenizer=tokenizer, name="tiny"), TEXT,
                                            tmp_path / "hf", max_tokens=TOKENS))
    for i, wrapper in enumerate([LanguageModel(hf, tokenizer), TransformerBridge(hf, tokenizer)]):
        lm = gt.load_model(wrapper, name="tiny")  # the wrapper's tokenizer
        assert lm.model.hf is hf and lm.tokenizer is tokenizer
        assert frequency_bytes(gt.record_corpus(lm, TEXT, tmp_path / str(i), max_tokens=TOKENS)) == want


@pytest.mark.parametrize("what, match", [
    (lambda hf, tok: HookedTransformer(), "HookedTransformer.*pass the transformers model"),
    (lambda hf, tok: TransformerBridge(hf, tok, compatibility_mode=True), "compatibility mode"),
    (lambda hf, tok: hf.half(), "float16 weights.*model.float"),
    (lambda hf, tok: torch.nn.Linear(2, 2), "model object"),
    (lambda hf, tok: hf.transformer, "language-model head"),
    (lambda hf, tok: hf.transformer.h[0].register_forward_hook(lambda *a: None) and hf, "hooks attached"),
    (lambda hf, tok: hf.resize_token_embeddings(8) and hf, "more than the 8 of.*not this model's tokenizer"),
])
def test_what_cannot_be_analysed_is_one_error(what, match, tokenizer):
    with pytest.raises(PipelineError, match=match) as e:
        gt.load_model(what(gpt2(), tokenizer), tokenizer=tokenizer, name="tiny")
    assert "\n" not in str(e.value)


def test_name_and_tokenizer_go_with_an_object_and_name_files(tokenizer):
    with pytest.raises(PipelineError, match="name="):
        gt.load_model(str(SHIPPED_PATH), name="x")
    with pytest.raises(PipelineError, match="prefix"):
        gt.load_model(gpt2(), tokenizer=tokenizer, name="../x")


def test_real_nnsight_language_model(tokenizer, tmp_path):
    nnsight = pytest.importorskip("nnsight")
    hf = gpt2()
    want = frequency_bytes(gt.record_corpus(gt.load_model(hf, tokenizer=tokenizer, name="tiny"), TEXT,
                                            tmp_path / "hf", max_tokens=TOKENS))
    lm = gt.load_model(nnsight.LanguageModel(hf, tokenizer=tokenizer), name="tiny")
    assert frequency_bytes(gt.record_corpus(lm, TEXT, tmp_path / "nns", max_tokens=TOKENS)) == want


def test_real_transformer_bridge_activations_equal_transformers(tmp_path):
    """TransformerLens 4's bridge runs the transformers model: its blocks.{i}.mlp.hook_post equals the neuron values
    of the transformers model it wraps, bit for bit, and those gelutrace records from the unwrapped model."""
    bridge_module = pytest.importorskip("transformer_lens.model_bridge")
    from transformers import AutoTokenizer

    from gelutrace.model.hooks import GeluHooks

    make_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))  # the bridge wants one read from a directory
    hf = gpt2()
    bridge = bridge_module.TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tokenizer)
    idx = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    _, cache = bridge.run_with_cache(idx)
    lm = gt.load_model(bridge, name="tiny")
    seen = {}
    with torch.no_grad(), GeluHooks(lm.model, lambda i: lambda m, a, out: seen.__setitem__(i, out)):
        lm.model(idx)
    own = {}
    handles = [layer.mlp.act.register_forward_hook(lambda m, a, out, i=i: own.__setitem__(i, out))
               for i, layer in enumerate(bridge.original_model.transformer.h)]
    with torch.no_grad():
        bridge.original_model(idx)
    for h in handles:
        h.remove()
    for i in range(hf.config.n_layer):
        post = cache[f"blocks.{i}.mlp.hook_post"]
        assert torch.equal(post, own[i])  # the bridge's values are transformers' own
        # gelutrace runs GPT-2 on model.py (SDPA attention), the bridge switches the model to eager attention:
        # the same function to float32 rounding (bit for bit: the same weights saved and loaded by path)
        assert torch.allclose(seen[i], post, rtol=0, atol=1e-5)

    hf = llama()  # another family runs through HFCausalLM on the bridged model itself: bit for bit
    bridge = bridge_module.TransformerBridge.boot_transformers("meta-llama/Llama-2-7b-hf", hf_model=hf,
                                                               tokenizer=tokenizer)
    _, cache = bridge.run_with_cache(idx)
    lm, seen = gt.load_model(bridge, name="tiny"), {}
    with torch.no_grad(), GeluHooks(lm.model, lambda i: lambda m, a, out: seen.__setitem__(i, out)):
        lm.model(idx)
    for i in range(hf.config.num_hidden_layers):
        assert torch.equal(seen[i], cache[f"blocks.{i}.mlp.hook_post"])


def shard(lm, d: Path, i: int):
    cp.run(lm, TEXT, d, cp.CorpusSettings(max_tokens=TOKENS, shard=f"{i}/2", top_examples=0))
    return d


def test_merge_refuses_memory_and_disk_weights(tokenizer, tmp_path):
    ckpt = saved(gpt2(seed=1), tokenizer, tmp_path / "tiny")  # other weights, the same name
    a = shard(gt.load_model(gpt2(), tokenizer=tokenizer, name="tiny"), tmp_path / "a", 0)
    b = shard(gt.load_model(str(ckpt), "cpu"), tmp_path / "b", 1)
    with pytest.raises(PipelineError, match="weights in memory.*checkpoint files|checkpoint files.*weights in "
                                            "memory") as e:
        shards.merge_shards([str(a), str(b)], tmp_path / "merged")
    assert "\n" not in str(e.value) and not (tmp_path / "merged").exists()
    c = shard(gt.load_model(gpt2(seed=1), tokenizer=tokenizer, name="tiny"), tmp_path / "c", 1)
    with pytest.raises(PipelineError, match="different weights.*state dicts"):
        shards.merge_shards([str(a), str(c)], tmp_path / "merged")
    shards.merge_shards([str(a), str(shard(gt.load_model(gpt2(), tokenizer=tokenizer, name="tiny"),
                                           tmp_path / "d", 1))], tmp_path / "merged")  # the same weights


def test_stage_e_refuses_a_dataset_of_other_weights_in_memory(tokenizer, tmp_path):
    ckpt = saved(gpt2(), tokenizer, tmp_path / "tiny")
    edited = gpt2()
    with torch.no_grad():
        edited.transformer.h[0].mlp.c_proj.weight[3, :] = 0
    ds = gt.record_corpus(gt.load_model(edited, tokenizer=tokenizer, name="tiny"), TEXT, tmp_path / "ds",
                          max_tokens=TOKENS)
    argv = [sys.executable, REPO_ROOT / "e_generate_perturbed_results.py", "--model_type", str(ckpt), "--device",
            "cpu", "--dataset_path", str(ds.path), "--perturbation_subset_filenames", "NONE", "--eval_csv",
            REPO_ROOT / "parcellation_datasets" / "test_1.csv"]
    r = run_python(argv)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "recorded from weights in memory" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # the same weights in memory pass that check (and stop at the next one, the subsets' names)
    same = gt.record_corpus(gt.load_model(gpt2(), tokenizer=tokenizer, name="tiny"), TEXT, tmp_path / "same",
                            max_tokens=TOKENS)
    r = run_python(argv[:7] + [str(same.path)] + argv[8:])
    assert "weights in memory" not in r.stderr


def test_cards_and_traces_refuse_a_dataset_of_other_weights(tokenizer, tmp_path):
    """A dataset recorded from weights in memory, read with other weights of the same name: the cards and a trace
    labelled from it are refused, as stage e refuses it; with the same weights they go on."""
    edited = gpt2()
    with torch.no_grad():
        edited.transformer.h[0].mlp.c_proj.weight[3, :] = 0
    ds = gt.record_corpus(gt.load_model(edited, tokenizer=tokenizer, name="tiny"), TEXT, tmp_path / "ds",
                          max_tokens=TOKENS)
    other = gt.load_model(gpt2(), tokenizer=tokenizer, name="tiny")
    for call in (lambda lm: gt.neuron_cards(lm, ds, [1]),
                 lambda lm: gt.trace(lm, "To be", tmp_path / "trace", dataset=ds.path, max_nodes=20,
                                     faithfulness_nodes=0)):
        with pytest.raises(PipelineError, match="recorded from weights in memory"):
            call(other)
    assert len(gt.neuron_cards(gt.load_model(edited, tokenizer=tokenizer, name="tiny"), ds, [1]).cards) == 1


def test_to_networkx_and_igraph_equal_the_graph_built_from_the_files(tmp_path):
    lm = gt.load_model("tinybard", "cpu")
    ds = gt.record_corpus(lm, TEXT, tmp_path / "ds", max_tokens=TOKENS, top_examples=0)
    store = layout.path(ds.path, layout.WEIGHTED_GRAPH, ds.m)
    freq = pd.read_csv(layout.path(ds.path, layout.FREQUENCY, ds.m))
    nu = freq["activation_count"].to_numpy(np.float64)
    d = lm.model.config.d_mlp
    pairs = [np.load(store / f"pair_{i:03d}_{i + 1:03d}.npy").astype(np.float64) for i in range(5)]
    for weight, t in (("count", 0.3), ("jaccard", 0.5)):
        raw = []
        for i, c in enumerate(pairs):
            a, b = nu[i * d:(i + 1) * d, None], nu[(i + 1) * d:(i + 2) * d][None, :]
            raw.append(c if weight == "count" else np.where(a + b - c > 0, c / np.maximum(a + b - c, 1), 0.0))
        top = max(r.max() for r in raw)
        want = {}
        for i, (c, r) in enumerate(zip(pairs, raw)):
            for u, v in zip(*np.nonzero(r / top > t)):
                want[(i * d + int(u), (i + 1) * d + int(v))] = (c[u, v], r[u, v] / top)
        g = ds.graph().to_networkx(weight=weight, threshold=t)
        assert g.number_of_nodes() == len(freq) and len(want) > 0
        assert {tuple(sorted(e)) for e in g.edges} == set(want)
        for (u, v), (c, norm) in want.items():
            e = g.edges[u, v]
            assert e["co_activation_count"] == c
            assert e[f"{weight}_normalized" if weight != "count" else "co_activation_count_normalized"] == \
                pytest.approx(norm, rel=1e-12)
        assert [g.nodes[i]["activation_count"] for i in range(len(freq))] == freq["activation_count"].tolist()
        ig = ds.graph().to_igraph(weight=weight, threshold=t)
        assert ig.vcount() == len(freq) and ig.vs["node_id"] == list(range(len(freq)))
        assert {tuple(sorted(e.tuple)) for e in ig.es} == set(want)
        assert sorted(ig.es["co_activation_count"]) == sorted(c for c, _ in want.values())


def test_a_graph_too_large_is_refused_with_the_memory_it_needs(tmp_path):
    ds = gt.record_corpus(gt.load_model("tinybard", "cpu"), TEXT, tmp_path / "ds", max_tokens=200, top_examples=0)
    for export in (ds.graph().to_networkx, ds.graph().to_igraph):
        with pytest.raises(PipelineError, match=r"needs about [\d.]+ (GiB|MiB) of RAM but 1,000 bytes is available; "
                                                r"raise the threshold") as e:
            export(threshold=0.0, memory_limit=1000)
        assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="threshold"):
        ds.graph().to_networkx(threshold=1.5)


def test_per_token_delta_nll_equals_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    lm = gt.load_model("tinybard", "cpu")
    neurons = [3, 700, 1500]
    res = gt.ablate(lm, neurons, TEXT, eval_tokens=300, context=64)
    tab = res.per_token
    assert list(tab.columns) == ["position", "token_id", "token", "nll", "delta_nll"]
    hf = GPT2LMHeadModel.from_pretrained(str(SHIPPED_PATH), attn_implementation="eager").eval()
    d = hf.config.n_embd * 4
    ids = torch.tensor(tab.token_id.to_numpy())
    drop = {}
    for n in neurons:
        drop.setdefault(n // d, []).append(n % d)

    def zero(layer):
        def hook(module, args, out):
            out = out.clone()
            out[..., drop[layer]] = 0
            return out
        return hook

    nll, dnll = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
    with torch.no_grad():
        for lo in range(0, len(ids), 64):
            w = ids[lo:lo + 64][None]
            if w.size(1) < 2:
                continue
            base = torch.log_softmax(hf(w).logits.double(), -1)
            handles = [hf.transformer.h[layer].mlp.act.register_forward_hook(zero(layer)) for layer in drop]
            abl = torch.log_softmax(hf(w).logits.double(), -1)
            for h in handles:
                h.remove()
            tgt = w[0, 1:, None]
            nll[lo + 1:lo + w.size(1)] = -base[0, :-1].gather(-1, tgt)[:, 0].numpy()
            dnll[lo + 1:lo + w.size(1)] = (base[0, :-1].gather(-1, tgt) - abl[0, :-1].gather(-1, tgt))[:, 0].numpy()
    assert np.array_equal(np.isnan(tab.nll.to_numpy()), np.isnan(nll))
    assert np.allclose(tab.nll.to_numpy(), nll, atol=1e-4, equal_nan=True)
    assert np.allclose(tab.delta_nll.to_numpy(), dnll, atol=1e-4, equal_nan=True)
    assert np.nanmax(np.abs(dnll)) > 1e-3  # the ablation does something
    assert tab.delta_nll.mean() == pytest.approx(res.delta_nll, rel=1e-9)
