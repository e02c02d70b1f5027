"""
Families beyond GPT-2, each a tiny random checkpoint built with transformers' own config class and saved with
save_pretrained (safetensors) plus a tokenizer, then loaded through gelutrace.model.loading:

- recorded neuron values and active sets equal a recomputation from the MLP's input hidden state with the
  layer's own weights and its activation written out here;
- ablation equals weight surgery (the output projection's input column zeroed; mean ablation through the bias);
- greedy tokens of left-padded batches equal transformers' generate() on each prompt alone, without hooks;
- cached and uncached runs give the same tokens and values;
- run_pipeline.sh works end to end on a Pythia-shaped checkpoint;
- the shipped Llama, tinyllama-bard, loads by name and records the inputs of transformers' own mlp.down_proj.
"""

import copy
import inspect
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from gelutrace import PipelineError
from gelutrace.files import formats, layout
from gelutrace.files.dataset import DatasetDir
from gelutrace.model.generation import left_pad
from gelutrace.model.hooks import Ablation, GeluHooks
from gelutrace.model.loading import load_model, model_site
from gelutrace.record.prompts import ActivationRecorder, trace

from conftest import HELDOUT_PATH, REPO_ROOT, SHIPPED_PATH, assert_sum_close, make_tokenizer, run_python


def gelu_exact(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def silu(x):
    return x / (1 + torch.exp(-x))


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=128)
GATED = dict(SMALL, num_key_value_heads=2)
# family: (config class, config kwargs, layers, MLP input linear (dense) or (gate, up) (gated), activation, proj)
FAMILIES = {
    "gpt_neox": ("GPTNeoXConfig", dict(SMALL, hidden_act="gelu"), "gpt_neox.layers", "mlp.dense_h_to_4h",
                 gelu_exact, "mlp.dense_4h_to_h"),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                                      max_position_embeddings=128, attention_types=[[["global", "local"], 1]],
                                      window_size=4), "transformer.h", "mlp.c_fc", gelu_tanh, "mlp.c_proj"),
    "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=128, rotary_dim=4),
             "transformer.h", "mlp.fc_in", gelu_tanh, "mlp.fc_out"),
    "opt": ("OPTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                              max_position_embeddings=128, word_embed_proj_dim=32), "model.decoder.layers", "fc1",
            relu, "fc2"),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4), "transformer.h", "mlp.dense_h_to_4h",
              gelu_tanh, "mlp.dense_4h_to_h"),
    "phi": ("PhiConfig", dict(SMALL, hidden_act="gelu_new"), "model.layers", "mlp.fc1", gelu_tanh, "mlp.fc2"),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=128,
                                             activation_function="gelu_pytorch_tanh"), "transformer.h", "mlp.c_fc",
                    gelu_tanh, "mlp.c_proj"),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=48,
                                    max_position_embeddings=128, bias=True), "transformer.h", "mlp.dense_h_to_4h",
               gelu_exact, "mlp.dense_4h_to_h"),
    "llama": ("LlamaConfig", GATED, "model.layers", ("mlp.gate_proj", "mlp.up_proj"), silu, "mlp.down_proj"),
    "mistral": ("MistralConfig", GATED, "model.layers", ("mlp.gate_proj", "mlp.up_proj"), silu, "mlp.down_proj"),
    "qwen2": ("Qwen2Config", GATED, "model.layers", ("mlp.gate_proj", "mlp.up_proj"), silu, "mlp.down_proj"),
    "gemma": ("GemmaConfig", dict(GATED, head_dim=8, hidden_act="gelu_pytorch_tanh"), "model.layers",
              ("mlp.gate_proj", "mlp.up_proj"), gelu_tanh, "mlp.down_proj"),
}
PROMPTS = ["To be, or not to be", "In the", "Friends, Romans, countrymen, lend me"]


def get(module, dotted):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def randomize(model, seed):
    """Every parameter at a scale where MLP pre-activations are O(1), so signs and values are tested in earnest."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # a norm's scale
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(1.5 / p.shape[-1] ** 0.5 * torch.randn(p.shape, generator=g))


def build(family, out, tokenizer_vocab=320, **overrides):
    import transformers

    cls_name, kwargs, *_ = FAMILIES[family]
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, tokenizer_vocab)
    cfg = getattr(transformers, cls_name)(**{**kwargs, **overrides}, vocab_size=len(tok), bos_token_id=0,
                                           eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize(hf, 0)
    hf.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    name = request.param
    path = build(name, tmp_path_factory.mktemp(name) / f"tiny_{name}")
    lm = load_model(str(path), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return name, path, lm, hf


def mlp_inputs(hf, name, rows):
    """Forward pre-hooks keeping each layer's MLP input hidden state (rows, T, d) per call: (inputs, handles)."""
    _, _, layers, first, _, _ = FAMILIES[name]
    first = first if isinstance(first, str) else first[0]
    seen = []
    handles = [get(layer, first).register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().clone().view(rows, -1, a[0].size(-1))))
               for layer in get(hf, layers)]
    return seen, handles


def reference(hf, name, layer_index, x):
    """The layer's neuron values from its MLP input x, with its weights and activation written out here."""
    _, _, layers, first, act, _ = FAMILIES[name]
    layer = get(hf, layers)[layer_index]
    if isinstance(first, str):
        lin = get(layer, first)
        return act(F.linear(x, lin.weight, lin.bias))
    gate, up = (get(layer, p) for p in first)
    return act(F.linear(x, gate.weight, gate.bias)) * F.linear(x, up.weight, up.bias)


def test_shape_from_config_alone(family, tmp_path):
    name, path, lm, _ = family
    bare = tmp_path / "config_only"
    bare.mkdir()
    (bare / "config.json").write_bytes((path / "config.json").read_bytes())
    n_layer, d_mlp, site = model_site(str(bare))
    assert (n_layer, d_mlp) == (lm.model.config.n_layer, lm.model.config.d_mlp)
    assert n_layer == 2 and d_mlp == get(get(lm.model.hf, FAMILIES[name][2])[0], FAMILIES[name][5]).in_features
    assert site["architecture"] == name and FAMILIES[name][5] in site["neuron_site"]


@torch.no_grad()
def test_recorded_values_match_hand_recomputation(family):
    name, _, lm, hf = family
    model = lm.model
    ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    seen, handles = mlp_inputs(model.hf, name, 1)
    try:
        values = trace(model, ids)
    finally:
        for h in handles:
            h.remove()
    want = torch.cat([reference(hf, name, i, seen[i][0, -1]) for i in range(len(seen))]).numpy()
    assert values.shape == (model.config.n_layer * model.config.d_mlp,)
    np.testing.assert_allclose(values, want, rtol=1e-4, atol=1e-5)
    clear = np.abs(want) > 1e-4
    assert ((values > 0) == (want > 0))[clear].all()
    assert 0 < (values > 0).sum() < len(values)

    # the recorder during cached, left-padded generation: each call's last position, every row
    rows = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    idx, pad = left_pad(rows, "cpu")
    steps = 4
    seen, handles = mlp_inputs(model.hf, name, len(rows))
    try:
        with ActivationRecorder(model, torch.ones(steps, len(rows))) as rec:
            model.generate(idx, steps, pad=pad)
    finally:
        for h in handles:
            h.remove()
    n_layer = model.config.n_layer
    ref = torch.stack([torch.cat([reference(hf, name, i, seen[s * n_layer + i][:, -1]) for i in range(n_layer)], -1)
                       for s in range(steps)])  # (steps, rows, neurons)
    clear = ref.abs() > 1e-4
    assert torch.equal(rec.active[clear], (ref > 0)[clear])
    assert_sum_close(rec.value_sum.numpy(), ref.double().reshape(-1, ref.shape[-1]).numpy())


def hf_logits(hf, idx, mask):
    """transformers' logits of left-padded rows, positions counted from each row's first real token as generate() does."""
    kwargs = {}
    if "position_ids" in inspect.signature(hf.forward).parameters:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return hf(input_ids=idx, attention_mask=mask, **kwargs).logits


def hf_greedy(hf, one, n):
    """transformers' own greedy generate(), never stopping early at the tokenizer's end-of-text token."""
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id = None
    return hf.generate(one, generation_config=config, max_new_tokens=n, do_sample=False,
                       attention_mask=torch.ones_like(one))


def surgery(hf, name, ids, d_mlp, values=None):
    """A copy of the model whose output projections ignore neurons `ids` (or feed values[i] through the bias)."""
    cut = copy.deepcopy(hf)
    layers = get(cut, FAMILIES[name][2])
    with torch.no_grad():
        for k, i in enumerate(ids):
            proj = get(layers[i // d_mlp], FAMILIES[name][5])
            if values is not None:
                proj.bias += proj.weight[:, i % d_mlp] * values[k]
            proj.weight[:, i % d_mlp] = 0
    return cut


@torch.no_grad()
def test_ablation_equals_weight_surgery(family):
    name, _, lm, hf = family
    model = lm.model
    d = model.config.d_mlp
    ids = np.array([1, 5, d + 2, d + d - 1])
    rows = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    idx, pad = left_pad(rows, "cpu")
    mask = (torch.arange(idx.size(1)).view(1, -1) >= pad.view(-1, 1)).long()
    cut = surgery(hf, name, ids, d)
    with Ablation(model, ids):
        logits, _ = model(idx, pad=pad)
    want = hf_logits(cut, idx, mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], want[real], rtol=1e-4, atol=1e-4)
    plain, _ = model(idx, pad=pad)
    assert (plain[real] - logits[real]).abs().max() > 1e-3  # the ablation did something

    # with the KV cache on: greedy tokens under the ablation equal the cut model's own generate()
    for r in rows:
        one = torch.tensor([r])
        with Ablation(model, ids):
            mine = model.generate(one, 6)
        assert torch.equal(mine, hf_greedy(cut, one, 6))

    if get(get(hf, FAMILIES[name][2])[0], FAMILIES[name][5]).bias is not None:
        vals = np.array([0.5, -0.25, 1.0, 0.75])
        cut = surgery(hf, name, ids, d, vals)
        with Ablation(model, ids, vals):
            logits, _ = model(idx, pad=pad)
        torch.testing.assert_close(logits[real], hf_logits(cut, idx, mask)[real],
                                   rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_greedy_batches_equal_transformers_generate(family):
    name, _, lm, hf = family
    rows = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    idx, pad = left_pad(rows, "cpu")
    out = lm.model.generate(idx, 8, pad=pad)[:, idx.size(1):]
    for i, r in enumerate(rows):
        one = torch.tensor([r])
        want = hf_greedy(hf, one, 8)[0, len(r):]
        assert torch.equal(out[i], want), (name, i)


@torch.no_grad()
def test_cached_equals_uncached(family):
    name, _, lm, _ = family
    model = lm.model
    ids = lm.tokenizer(PROMPTS[2])["input_ids"]
    steps = 5
    with ActivationRecorder(model, torch.ones(steps, 1)) as rec:
        cached = model.generate(torch.tensor([ids]), steps, temperature=0.8,
                                generators=[torch.Generator().manual_seed(3)])[0, len(ids):]
    seq, g, values = list(ids), torch.Generator().manual_seed(3), []
    for _ in range(steps):
        values.append(trace(model, seq))
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(model.pick(logits[:, -1].float(), 0.8, None, [g])[0, 0]))
    assert seq[len(ids):] == cached.tolist()
    # the cached path rounds each value differently, by about 1e-7 absolute (float32 at O(1) pre-activations)
    assert_sum_close(rec.value_sum.numpy(), values, atol_per_term=1e-6)
    clear = np.abs(np.array(values)) > 1e-4
    assert np.array_equal(rec.active[:, 0].numpy()[clear], (np.array(values) > 0)[clear])


def test_unsupported_architectures_are_one_error(tmp_path):
    from transformers import MixtralConfig

    moe = tmp_path / "moe"
    MixtralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  num_local_experts=4).save_pretrained(str(moe))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "t5", "num_layers": 2}))
    for d, what in ((moe, "mixture-of-experts"), (unknown, "'t5'")):
        with pytest.raises(PipelineError, match="gpt_neox") as e:
            load_model(str(d), device="cpu")
        assert what in str(e.value) and "llama" in str(e.value)
        r = run_python([sys.executable, str(REPO_ROOT / "a_generate_gelu_graph.py"), "--model_type", str(d),
                            "--output_dir", str(tmp_path / "a")], capture_output=True, text=True, cwd=REPO_ROOT)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_stage_e_refuses_another_site(tmp_path):
    from gelutrace.model.sites import site_info

    formats.write_graph_files(tmp_path, "m", 2, 48, write_el=False, site=site_info("llama"))
    DatasetDir(tmp_path, "m").check(2, 48, site_info("llama"))
    with pytest.raises(PipelineError, match="neuron site"):
        DatasetDir(tmp_path, "m").check(2, 48, site_info("gpt_neox"))
    formats.write_graph_files(tmp_path, "m", 2, 48, write_el=False)  # metadata from before other families: GPT-2
    DatasetDir(tmp_path, "m").check(2, 48, site_info("gpt2"))
    with pytest.raises(PipelineError, match="neuron site"):
        DatasetDir(tmp_path, "m").check(2, 48, site_info("llama"))


@pytest.mark.slow
def test_run_pipeline_on_pythia(tmp_path):
    ckpt = build("gpt_neox", tmp_path / "tiny-pythia")
    csv = tmp_path / "prompts.csv"
    pd.DataFrame([("To be, or not ", 5, 2), ("In the beginning ", 4, 1), ("Friends, ", 3, 1)],
                 columns=layout.PROMPT_COLUMNS).to_csv(csv, index=False)
    data = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [str(REPO_ROOT / "run_pipeline.sh"), "--thresholds", "0.3", "--ratios", "0.05", "--random_controls", "1",
           "--device", "cpu", "--effects", "0", "--module_controls", "1", str(ckpt), str(csv), str(data)]
    r = run_python(cmd, env=env)  # the driver in this process (test_pipeline.py runs run_pipeline.sh's own)
    assert r.returncode == 0, r.stderr[-3000:]
    m = "tiny-pythia"
    meta = formats.read_graph_meta(data, m)
    assert (meta["n_layer"], meta["d_mlp"], meta["architecture"]) == (2, 48, "gpt_neox")
    assert "dense_4h_to_h" in meta["neuron_site"]
    ds = pd.read_csv(layout.path(data, layout.DATASET, m), keep_default_na=False)
    assert len(ds) == 5 * 2 + 4 + 3
    assert (data / layout.RESULTS_DIR / layout.PERTURBATION_SUMMARY).is_file() and (data / "report.md").is_file()


REAL = ["EleutherAI/pythia-14m", "EleutherAI/pythia-70m", "EleutherAI/pythia-160m", "EleutherAI/gpt-neo-125m",
        "facebook/opt-125m", "bigscience/bloom-560m", "Qwen/Qwen2-0.5B", "HuggingFaceTB/SmolLM-135M"]


def cached_real_checkpoint():
    from huggingface_hub import snapshot_download

    for repo in REAL:
        try:
            path = snapshot_download(repo, local_files_only=True)
        except Exception:
            continue
        if any(p.suffix == ".safetensors" for p in Path(path).iterdir()):
            return repo
    return None


@torch.no_grad()
def test_real_checkpoint_from_cache():
    repo = cached_real_checkpoint()
    if repo is None:
        pytest.skip(f"none of {', '.join(REAL)} is in the local Hugging Face cache (with safetensors)")
    from transformers import AutoModelForCausalLM

    lm = load_model(repo, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(lm.path), dtype=torch.float32).eval()
    ids = lm.tokenizer("The capital of France is")["input_ids"]
    one = torch.tensor([ids])
    want = hf_greedy(hf, one, 5)
    assert torch.equal(lm.model.generate(one, 5), want)


def test_hub_names_of_other_families(tmp_path):
    from gelutrace.model.loading import model_name

    assert model_name("EleutherAI/pythia-160m") == "pythia-160m"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = run_python([sys.executable, str(REPO_ROOT / "a_generate_gelu_graph.py"), "--model_type",
                        "EleutherAI/pythia-160m", "--output_dir", str(tmp_path / "a")], capture_output=True, text=True,
                   cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "EleutherAI/pythia-160m" in r.stderr and "not in the Hugging Face cache" in r.stderr


def test_corpus_mode_on_pythia(tmp_path):
    """Corpus mode through the transformers adapter: node and pair counts against the site's values recomputed
    by hand from the MLP inputs of transformers' own model over the same windows."""
    from transformers import AutoModelForCausalLM

    from gelutrace.graph import store as gs
    ckpt = build("gpt_neox", tmp_path / "tiny-pythia")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(PROMPTS) * 3)
    r = run_python([sys.executable, str(REPO_ROOT / "b_generate_activation_dataset.py"), "--model_type", str(ckpt),
                        "--input_text", str(text), "--export_dir", str(tmp_path / "out"), "--context", "16",
                        "--device", "cpu"], capture_output=True, text=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = "tiny-pythia"
    assert formats.read_graph_meta(tmp_path / "out", m)["architecture"] == "gpt_neox"
    lm = load_model(str(ckpt), device="cpu")
    ids = lm.tokenizer(text.read_text())["input_ids"] + [lm.tokenizer.eos_token_id or 0]
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    active = []
    for lo in range(0, len(ids), 16):
        window = ids[lo:lo + 16]
        seen, handles = mlp_inputs(hf, "gpt_neox", 1)
        try:
            with torch.no_grad():
                hf(torch.tensor([window]))
        finally:
            for h in handles:
                h.remove()
        active.append(torch.cat([reference(hf, "gpt_neox", i, seen[i][0]) for i in range(len(seen))], -1) > 0)
    a = torch.cat(active).numpy().astype(np.int64)
    g = gs.read_graph(tmp_path / "out" / f"{m}_weighted_graph")
    d = lm.model.config.d_mlp
    assert g.num_samples == len(ids)
    np.testing.assert_array_equal(g.activation_count, a.sum(0))
    np.testing.assert_array_equal(np.asarray(g.blocks[0].counts()), a[:, :d].T @ a[:, d:2 * d])


@torch.no_grad()
def test_shipped_llama_records_down_proj_inputs():
    """tinyllama-bard by name: transformers' path, tinybard's very tokenizer files, and every position's recorded
    neuron values equal to the input of each layer's mlp.down_proj in transformers' own LlamaForCausalLM, loaded
    on its own and read by a forward pre-hook."""
    from transformers import LlamaForCausalLM

    from gelutrace.model.sites import HFCausalLM

    path = REPO_ROOT / "models" / "tinyllama-bard"
    lm = load_model("tinyllama-bard", device="cpu")
    assert isinstance(lm.model, HFCausalLM) and lm.name == "tinyllama-bard" and lm.path == path
    assert lm.site["architecture"] == "llama" and "mlp.down_proj" in lm.site["neuron_site"]
    assert model_site("tinyllama-bard")[:2] == (6, 360)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (path / f).read_bytes() == (SHIPPED_PATH / f).read_bytes()
    hf = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert not [n for n, _ in hf.named_parameters() if n.endswith("bias")]
    seen = []
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].clone()))
               for layer in hf.model.layers]
    try:
        for prompt in PROMPTS + [HELDOUT_PATH.read_text(encoding="utf-8")[:600]]:
            ids = lm.tokenizer(prompt)["input_ids"]
            seen.clear()
            hf(torch.tensor([ids]))
            want = torch.cat(seen, -1)  # (T, 6 * 360), layer-major as the pipeline numbers neurons
            mine = []
            with GeluHooks(lm.model, lambda layer: lambda m, i, o: mine.append(o[0].clone())):
                lm.model(torch.tensor([ids]))
            torch.testing.assert_close(torch.cat(mine, -1), want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(trace(lm.model, ids), want[-1].numpy(), rtol=1e-4, atol=1e-5)
            clear = want.abs() > 1e-4
            assert torch.equal((torch.cat(mine, -1) > 0)[clear], (want > 0)[clear])
    finally:
        for h in handles:
            h.remove()
    assert len(ids) > 100


def test_ablations_generated_together_equal_each_alone(family):
    """Stage e's grouped generation (a block of rows per ablation) through the family's own generate: each
    ablation's tokens equal those it gets generated alone under its own hook."""
    from gelutrace.evaluate import metrics
    from gelutrace.model import hooks
    from gelutrace.model.generation import Prompt, plan_batches

    _, _, lm, _ = family
    n = lm.model.config.n_layer * lm.model.config.d_mlp
    rng = np.random.default_rng(1)
    prompts = [Prompt("a", 5, 1), Prompt("b", 5, 1)]
    ids = [[5, 6, 7], [9, 10]]
    batches = plan_batches(prompts, ids, True, 64, lm.model.config.block_size)
    rows = metrics.plan_rows(batches, prompts)
    groups = [np.sort(rng.choice(n, k, replace=False)) for k in (2, n // 4, n // 2)]
    together = metrics.generate_groups(lm.model, batches, rows, ids, 0.0, None, 3, groups)
    for g, got in zip(groups, together):
        with hooks.Ablation(lm.model, g):
            alone = metrics.generate_rows(lm.model, batches, rows, ids, 0.0, None, 3)
        assert [a.tolist() for a in got] == [a.tolist() for a in alone]
