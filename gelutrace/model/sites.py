"""
The neuron site: a neuron's value is its coordinate of the input to the MLP's output projection (post-GELU
for GPT-2, post-activation for GELU/ReLU MLPs, act(gate) * up for gated MLPs).

GPT-2 runs on `model.py`, whose `mlp.gelu` module outputs exactly that. Every other family runs on
transformers' own model class, wrapped by `HFCausalLM`, which exposes the interface every stage uses:
`config` (n_layer, d_mlp, vocab_size, block_size), `gelus()` (one module per layer whose forward output is
the layer's neuron values: forward hooks read them, and a hook's return value replaces them),
`model(idx, pad=...) -> (logits, loss)`, `generate(...)`, `transformer.wte` and `lm_head`. The site module
(`NeuronSite`, an identity) is called by a forward pre-hook on the output projection, so hooks on it see and
edit the projection's input while the checkpoint's module tree and state dict stay as transformers made them.

`FAMILIES` is the one table that says where each architecture keeps its layers and output projection.
"""

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from gelutrace import PipelineError
from model import GPT


@dataclass(frozen=True)
class Family:
    layers: str  # dotted path of the ModuleList of decoder layers
    proj: str  # the output projection, relative to a layer
    value: str  # what a neuron's value is, for the metadata and docs/models.md
    width: tuple[str, ...] = ()  # config keys of the MLP width, the first one set wins; else 4 * hidden_size
    context: tuple[str, ...] = ("max_position_embeddings",)  # config keys of the context length


GPT2_SITE = {"architecture": "gpt2", "neuron_site": "transformer.h.{i}.mlp.gelu output = input to mlp.c_proj",
             "neuron_value": "post-GELU"}

FAMILIES = {
    "gpt_neox": Family("gpt_neox.layers", "mlp.dense_4h_to_h", "post-activation", ("intermediate_size",)),
    "gpt_neo": Family("transformer.h", "mlp.c_proj", "post-activation", ("intermediate_size",)),
    "gptj": Family("transformer.h", "mlp.fc_out", "post-activation", ("n_inner",), ("n_positions",)),
    "opt": Family("model.decoder.layers", "fc2", "post-ReLU", ("ffn_dim",)),
    "bloom": Family("transformer.h", "mlp.dense_4h_to_h", "post-activation", (), ("seq_length",)),
    "phi": Family("model.layers", "mlp.fc2", "post-activation", ("intermediate_size",)),
    "gpt_bigcode": Family("transformer.h", "mlp.c_proj", "post-activation", ("n_inner",), ("n_positions",)),
    "falcon": Family("transformer.h", "mlp.dense_4h_to_h", "post-activation", ("ffn_hidden_size",)),
    **{t: Family("model.layers", "mlp.down_proj", "act(gate) * up", ("intermediate_size",))
       for t in ("llama", "mistral", "qwen2", "gemma")},
}
BLOOM_CONTEXT = 2048  # BLOOM's ALiBi has no learned length; its training length
# buffers that older checkpoints saved beside the weights (causal masks and their fill value, rotary frequencies,
# position ids): the models compute them, so a checkpoint holding them drops no weight
LEGACY_BUFFERS = re.compile(r"(^|\.)(attn|attention)\.(bias|masked_bias)$|rotary_emb\.inv_freq$|(^|\.)position_ids$")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def supported() -> str:
    return "gpt2, " + ", ".join(FAMILIES)


def site_info(model_type: str) -> dict:
    """The architecture and the neuron-site definition, as stage b's metadata records them."""
    if model_type == "gpt2":
        return dict(GPT2_SITE)
    fam = FAMILIES[model_type]
    return {"architecture": model_type, "neuron_site": f"input to {fam.layers}.{{i}}.{fam.proj}",
            "neuron_value": fam.value}


def read_config_json(path: Path) -> tuple[Path, dict]:
    """(the file, its object) of a checkpoint directory's config.json; one error line if it is not a JSON object."""
    cfg_file = Path(path) / "config.json"
    try:
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{cfg_file} cannot be read as JSON: {e}") from None
    if not isinstance(hf, dict):
        raise PipelineError(f"{cfg_file}: expected a JSON object")
    return cfg_file, hf


def read_model_type(path: Path) -> str:
    """config.json's model_type (a checkpoint without one is GPT-2, as the original GPT-2 configs are)."""
    return check_model_type(*read_config_json(path))


def check_model_type(cfg_file, hf: dict) -> str:
    """The model_type of a config's dict (`cfg_file`: where it comes from, for the errors), if it has a site."""
    model_type = hf.get("model_type", "gpt2")
    moe = [k for k in MOE_KEYS if isinstance(hf.get(k), int) and hf[k] > 0]
    if moe:
        raise PipelineError(f"{cfg_file}: a mixture-of-experts MLP ({moe[0]}={hf[moe[0]]}) has no single neuron "
                            f"site; supported (dense MLPs): {supported()}")
    if model_type != "gpt2" and model_type not in FAMILIES:
        raise PipelineError(f"{cfg_file}: architecture {model_type!r} has no neuron site this pipeline knows "
                            f"(an MLP whose hidden units feed one output projection); supported: {supported()}")
    tp = hf.get("pretraining_tp", 1)
    if model_type == "bloom" and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
        raise PipelineError(f"{cfg_file}: pretraining_tp must be a positive integer, got {tp!r}")
    if model_type == "bloom" and tp > 1 and hf.get("slow_but_exact"):
        raise PipelineError(f"{cfg_file}: BLOOM with slow_but_exact bypasses its output projection module; set "
                            f"slow_but_exact to false")
    return model_type


def hf_config(path: Path):
    from transformers import AutoConfig  # lazy: transformers is slow to import

    cfg_file = Path(path) / "config.json"
    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise PipelineError(f"{cfg_file}: not a valid configuration ({type(e).__name__}: {e})") from None
    if cfg.model_type in FAMILIES:
        shape(cfg.model_type, cfg, cfg_file)
    return cfg


def shape(model_type: str, cfg, source="config.json") -> tuple[int, int, int]:
    """(n_layer, d_mlp, block_size) of a non-GPT-2 family from its transformers config (no weights), checked."""
    fam = FAMILIES[model_type]

    def positive(key):
        value = getattr(cfg, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise PipelineError(f"{source}: {key} must be a positive integer, got {value!r}")
        return value

    n_layer, hidden = positive("num_hidden_layers"), positive("hidden_size")
    if n_layer is None:
        raise PipelineError(f"{source}: the number of layers (num_hidden_layers) is missing")
    width = next((v for v in map(positive, fam.width) if v is not None), None)
    if width is None:
        if hidden is None:
            raise PipelineError(f"{source}: the MLP width ({', '.join(fam.width + ('hidden_size',))}) is missing")
        width = 4 * hidden
    context = next((v for v in map(positive, fam.context) if v is not None), BLOOM_CONTEXT)
    return n_layer, width, context


def run_trunk(model, idx: torch.Tensor, pad: torch.Tensor | None = None):
    """A forward pass that stops after the last block where the model allows it (model.py), for its hooks."""
    (model.trunk if hasattr(model, "trunk") else model)(idx, pad=pad)


def split_head(model):
    """
    (body, head) with head(body(idx)) the logits of model(idx): for model.py, body the final norm's output and head
    the unembedding, so that a caller forms the logits a block of positions at a time; for the transformers path
    (final norms, soft-capping and scales differ by family), body the logits and head the identity.
    """
    if hasattr(model, "trunk"):
        return (lambda idx: model.transformer.ln_f(model.trunk(idx))), model.lm_head
    return (lambda idx: model(idx)[0]), (lambda x: x)


def resumed_body(model):
    """For model.py, body(idx) of split_head resumed at a layer's GELU: f(layer, x, pre) from what
    hooks.ResumePoints kept of a full pass (GPT.trunk_from); None for the transformers path."""
    if not hasattr(model, "trunk_from"):
        return None
    return lambda layer, x, pre: model.transformer.ln_f(model.trunk_from(layer, x, pre))


@dataclass
class SiteConfig:
    n_layer: int
    d_mlp: int
    vocab_size: int
    block_size: int
    architecture: str


class NeuronSite(nn.Module):
    """The identity: its output is the layer's neuron values, the place to hook them."""

    def forward(self, x):
        return x


def _feed_site(site: NeuronSite, rows: list):
    """The projection's input through the site; a flattened (B * T, d) input (OPT) is seen as (B, T, d)."""
    def pre_hook(module, args):
        x = args[0]
        y = site(x.view(*rows, -1)).reshape(x.shape) if x.dim() == 2 else site(x)
        return (y,) + tuple(args[1:])
    return pre_hook


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


class _Embedding:
    def __init__(self, wte):
        self.wte = wte


class HFCausalLM(nn.Module):
    """A transformers causal LM with model.py's interface; its neurons are the inputs to the output projections."""

    pick, check_length = staticmethod(GPT.pick), staticmethod(GPT.check_length)

    def __init__(self, hf: nn.Module, model_type: str):
        super().__init__()
        self.hf = hf
        fam = FAMILIES[model_type]
        layers = _get(hf, fam.layers)
        projs = [_get(layer, fam.proj) for layer in layers]
        _, _, block = shape(model_type, hf.config)
        self.sites = nn.ModuleList(NeuronSite() for _ in projs)
        self._rows = [0, 0]  # (B, T) of the forward call in progress
        for proj, site in zip(projs, self.sites):
            proj.register_forward_pre_hook(_feed_site(site, self._rows))
        self.config = SiteConfig(n_layer=len(layers), d_mlp=projs[0].in_features,
                                 vocab_size=hf.get_output_embeddings().out_features, block_size=block,
                                 architecture=model_type)
        self._positions = "position_ids" in inspect.signature(hf.forward).parameters

    @property
    def transformer(self):
        return _Embedding(self.hf.get_input_embeddings())

    @property
    def lm_head(self):
        return self.hf.get_output_embeddings()

    def gelus(self) -> list[nn.Module]:
        return list(self.sites)

    def _run(self, idx, mask, past, cache, logits_to_keep=0):
        self._rows[:] = idx.shape
        kwargs = {}
        if self._positions:
            pos = mask.long().cumsum(-1) - 1
            kwargs["position_ids"] = pos[:, past:].clamp(min=0)
        out = self.hf(input_ids=idx, attention_mask=mask, cache=cache, use_cache=cache is not None,
                      logits_to_keep=logits_to_keep, **kwargs)
        return out.logits

    @staticmethod
    def _mask(idx, pad):
        """attention_mask: 1 for real tokens, 0 for the left padding."""
        if pad is None:
            return torch.ones_like(idx)
        return (torch.arange(idx.size(1), device=idx.device).view(1, -1) >= pad.view(-1, 1)).long()

    def forward(self, idx, targets=None, pad=None, logits_to_keep: int = 0):
        """Logits (B, T, vocab) of left-padded rows (`pad`: padding positions per row; logits_to_keep > 0: of the
        last that many positions only) and, given targets, the loss."""
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {idx.size(1)} tokens exceeds the context window of {self.config.block_size}")
        logits = self._run(idx, self._mask(idx, pad), 0, None, logits_to_keep)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, generators=None, pad=None):
        """As model.py's GPT.generate: prefill once, then one position per step through transformers' KV cache."""
        from transformers import DynamicCache  # lazy: transformers is slow to import
        B, T = idx.shape
        self.check_length(T, max_new_tokens, self.config.block_size)
        if max_new_tokens <= 0:
            return idx
        cache = DynamicCache(config=self.hf.config)
        mask = self._mask(idx, pad)
        out, step_input, past = [idx], idx, 0
        for step in range(max_new_tokens):
            logits = self._run(step_input, mask, past, cache, logits_to_keep=1)  # the prediction only
            past = mask.size(1)
            next_id = self.pick(logits[:, -1, :].float(), temperature, top_k, generators)
            out.append(next_id)
            step_input = next_id
            mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
        return torch.cat(out, dim=1)


def _natural(key: str):
    """Sort key that puts layer 2 before layer 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def check_tensors(weights, config_file, missing=(), unexpected=(), mismatched=(), shown: int = 3):
    """
    One error line when a checkpoint's config does not match its weights: tensors the config implies that the
    weights lack, tensors of the weights the config has no place for (saved buffers aside: LEGACY_BUFFERS), or
    (name, stored shape, expected shape) of tensors whose shape differs; the first `shown` of each kind are named,
    in layer order.
    """
    unexpected = [k for k in unexpected if not LEGACY_BUFFERS.search(k)]

    def first(names):
        names = sorted(names, key=_natural)
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    parts = []
    if missing:
        parts.append(f"it lacks {first(missing)}, which the config implies")
    if unexpected:
        parts.append(f"it holds {first(unexpected)}, which the config has no place for")
    if mismatched:
        rows = sorted(mismatched, key=lambda r: _natural(r[0]))
        more = f" and {len(rows) - shown} more" if len(rows) > shown else ""
        parts.append(", ".join(f"{name} has shape {tuple(got)} where the config implies {tuple(want)}"
                               for name, got, want in rows[:shown]) + more)
    if parts:
        raise PipelineError(f"{weights} does not match {config_file}: " + "; ".join(parts))


def load_hf(path: Path, model_type: str, device: torch.device) -> HFCausalLM:
    """
    A supported non-GPT-2 checkpoint directory (safetensors only, float32) as an HFCausalLM. transformers'
    loading report must be clean: a tensor missing (it would be drawn at random), unused (dropped) or of
    another shape than the config implies is refused. Tied weights and buffers the model computes (attention
    masks, rotary frequencies) are not tensors it misses or drops.
    """
    from transformers import AutoModelForCausalLM  # lazy: transformers is slow to import
    if not any(Path(path).glob("*.safetensors")):
        raise PipelineError(f"{path} has no .safetensors weights (pickled .bin checkpoints are not read)")
    cfg = hf_config(path)
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(str(path), config=cfg, use_safetensors=True,
                                                        dtype=torch.float32, output_loading_info=True,
                                                        ignore_mismatched_sizes=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"{path}: cannot load the {model_type} checkpoint ({reason})") from None
    check_tensors(f"{path} (safetensors weights)", Path(path) / "config.json", info.get("missing_keys", ()),
                  info.get("unexpected_keys", ()), info.get("mismatched_keys", ()))
    return HFCausalLM(hf.to(device).eval(), model_type)
