"""
One place that turns a `--model_type` into a model, its tokenizer and the file prefix `{m}`:

- the name of a model shipped in this repository's `models/` (e.g. `tinybard`);
- a path to a local directory with a Hugging Face checkpoint (config.json, safetensors weights, tokenizer
  files) of GPT-2 or of a family in `gelutrace.model.sites.FAMILIES`; the prefix is the directory's name;
- a hub name (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`, or any `owner/name` such as
  `EleutherAI/pythia-160m`), fetched into (or read from) the Hugging Face cache and then loaded as a local
  directory; the prefix of an `owner/name` is `name`.

config.json's `model_type` picks the implementation: `gpt2` runs on model.py, the other families on
transformers' own classes through `gelutrace.model.sites.HFCausalLM`.

In a notebook, `load_model` also takes the model object already loaded (load_object): a transformers model, an
nnsight LanguageModel or a TransformerLens TransformerBridge, analysed with its weights as they are in memory;
the prefix is its name_or_path's last part, or the name given.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from gelutrace import PipelineError
from gelutrace.model import sites
from model import GPT, GPTConfig

PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = PACKAGE_DIR.parent
# the checkout's models/, or where `pip install` puts them (pyproject.toml maps models/ to gelutrace/shipped_models)
SHIPPED_DIR = REPO_ROOT / "models" if (REPO_ROOT / "models").is_dir() else PACKAGE_DIR / "shipped_models"
SHIPPED_MODEL = "tinybard"
HUB_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
# (n_layer, d_mlp) of the hub models: stage a needs only these, so it runs without downloading anything
HUB_SHAPES = {"gpt2": (12, 3072), "gpt2-medium": (24, 4096), "gpt2-large": (36, 5120), "gpt2-xl": (48, 6400),
              "distilgpt2": (6, 3072)}
HUB_FILES = ["*.json", "*.safetensors", "merges.txt", "vocab.txt", "*.model"]
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GELU_APPROXIMATE = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass
class LoadedModel:
    model: GPT | sites.HFCausalLM
    tokenizer: object  # a transformers tokenizer
    name: str  # the file prefix {m}
    path: Path | None  # the checkpoint directory; None for a model object, whose weights are in memory
    device: torch.device
    site: dict  # the architecture and neuron-site definition (gelutrace.model.sites.site_info)
    spec: str = ""  # the --model_type it was loaded from


def shipped_models() -> list[str]:
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "config.json").is_file()) if SHIPPED_DIR.is_dir() else []


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for, but torch sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise PipelineError("--device mps was asked for, but torch sees no MPS device")
    if device not in ("cpu", "cuda", "mps"):
        raise PipelineError(f"unknown --device {device!r}: use auto, cpu, cuda or mps")
    return torch.device(device)


def _is_hub_repo(model_type: str) -> bool:
    return model_type.count("/") == 1 and not Path(model_type).expanduser().exists()


def model_name(model_type: str) -> str:
    """The file prefix {m} for a --model_type, without loading anything."""
    p = Path(model_type)
    if model_type not in HUB_MODELS and model_type not in shipped_models() and p.is_dir():
        return p.resolve().name
    if _is_hub_repo(model_type):
        return model_type.split("/")[1]
    return model_type


def checkpoint_dir(model_type: str) -> Path:
    """The local directory holding the checkpoint for --model_type (downloading a hub model if needed)."""
    if model_type in shipped_models():
        return SHIPPED_DIR / model_type
    if model_type in HUB_MODELS or _is_hub_repo(model_type):
        return _hub_snapshot(model_type)
    p = Path(model_type).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise PipelineError(f"{p} has no config.json: not a Hugging Face checkpoint directory")
        return p
    raise PipelineError(f"unknown --model_type {model_type!r}: use a hub name ({', '.join(HUB_MODELS)} or "
                        f"owner/name), "
                        f"a shipped model ({', '.join(shipped_models()) or 'none found'}) or a checkpoint directory")


def _hub_snapshot(model_type: str) -> Path:
    from huggingface_hub import snapshot_download  # lazy: only a hub download needs it

    repo = HUB_MODELS.get(model_type, model_type)
    try:  # the cache first, so an offline machine with the model cached never touches the network
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        if offline:
            raise OSError("HF_HUB_OFFLINE is set")
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES, etag_timeout=10))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(
            f"model {model_type!r} ({repo}) is not in the Hugging Face cache and cannot be downloaded "
            f"({reason}). Alternatives: the shipped model (--model_type {SHIPPED_MODEL}), a local checkpoint "
            f"directory (--model_type path/to/dir), or download it once on a connected machine into the "
            f"cache (HF_HOME) and copy that here") from None


def read_config(path: Path) -> GPTConfig:
    return gpt2_config(*sites.read_config_json(path))


def gpt2_config(cfg_file, hf: dict) -> GPTConfig:
    """model.py's config from a GPT-2 config's dict (`cfg_file`: where it comes from, for the errors), checked."""
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_APPROXIMATE:
        raise PipelineError(f"{cfg_file}: activation_function {act!r} is not a GELU this pipeline can trace")

    def integer(key, default=None, required=True):
        v = hf.get(key, default)
        if v is None and not required:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise PipelineError(f"{cfg_file}: {key} must be a positive integer, got {v!r}"
                                + (" (missing)" if key not in hf and default is None else ""))
        return v

    context = "n_ctx" if "n_ctx" in hf and "n_positions" not in hf else "n_positions"  # the key errors name

    eps = hf.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise PipelineError(f"{cfg_file}: layer_norm_epsilon must be a positive number, got {eps!r}")
    config = GPTConfig(
        block_size=integer(context, 1024),
        vocab_size=integer("vocab_size"),
        n_layer=integer("n_layer"),
        n_head=integer("n_head"),
        n_embd=integer("n_embd"),
        n_inner=integer("n_inner", required=False),
        layer_norm_epsilon=float(eps),
        gelu_approximate=GELU_APPROXIMATE[act],
    )
    if config.n_embd % config.n_head:
        raise PipelineError(f"{cfg_file}: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
    return config


def model_shape(model_type: str) -> tuple[int, int]:
    """(n_layer, d_mlp) of a --model_type, from its config (GPT-2 hub models: known without a download)."""
    return model_site(model_type)[:2]


def model_site(model_type: str) -> tuple[int, int, dict]:
    """(n_layer, d_mlp, site_info) of a --model_type from its config.json alone, without loading weights."""
    if model_type in HUB_SHAPES and model_type not in shipped_models():
        return (*HUB_SHAPES[model_type], sites.site_info("gpt2"))
    path = checkpoint_dir(model_type)
    arch = sites.read_model_type(path)
    if arch == "gpt2":
        cfg = read_config(path)
        return cfg.n_layer, cfg.d_mlp, sites.site_info(arch)
    n_layer, d_mlp, _ = sites.shape(arch, sites.hf_config(path))
    return n_layer, d_mlp, sites.site_info(arch)


def load_checkpoint(path: Path, device: torch.device = torch.device("cpu")) -> GPT:
    """
    A GPT from a Hugging Face GPT-2 checkpoint directory (Conv1D weights transposed to Linear). The config must
    match the weights: every tensor the config implies is there with its shape and no other tensor is, which the
    safetensors header tells before anything is read.
    """
    from safetensors import safe_open  # lazy: only reading a checkpoint needs it

    config = read_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise PipelineError(f"{path} has no model.safetensors (pickled .bin checkpoints are not read)")
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = GPT(config)
    target = model.state_dict()
    try:
        with safe_open(str(weights), "pt") as f:
            stored = {k.removeprefix("transformer."): k for k in f.keys()}
            sources = {}
            for k in target:
                src = k.removeprefix("transformer.")
                if k == "lm_head.weight" and src not in stored:
                    src = "wte.weight"  # tied to the embedding, as GPT-2 saves it
                sources[k] = src
            shapes = {src: tuple(f.get_slice(stored[src]).get_shape()) for src in set(sources.values()) & stored.keys()}
            expected = {src: tuple(target[k].shape[::-1] if src.endswith(CONV1D) else target[k].shape)
                        for k, src in sources.items()}
            sites.check_tensors(weights, config_file=path / "config.json",
                                missing=[src for src in expected if src not in stored],
                                unexpected=[stored[s] for s in stored if s not in expected],
                                mismatched=[(stored[src], shapes[src], want) for src, want in expected.items()
                                            if src in shapes and shapes[src] != want])
            sd = {src: f.get_tensor(stored[src]) for src in expected}
    except PipelineError:
        raise
    except Exception as e:  # truncated or not safetensors at all
        raise PipelineError(f"{weights} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    if sources["lm_head.weight"] == "lm_head.weight" and not torch.equal(sd["lm_head.weight"], sd["wte.weight"]):
        raise PipelineError(f"{weights}: lm_head.weight differs from wte.weight, but this GPT-2 ties its output "
                            f"embedding to the input embedding")
    converted = {k: (sd[src].t() if src.endswith(CONV1D) else sd[src]).to(torch.float32) for k, src in sources.items()}
    model.load_state_dict(converted, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied tensor: tie it again
    return model.to(device).eval()


def load_model(model, device: str = "auto", tokenizer=None, name: str | None = None) -> LoadedModel:
    """
    A --model_type (a shipped model's name, a checkpoint directory, a hub name) loaded from its files, or the model
    object a notebook already holds (load_object; `tokenizer` and `name` go with an object only).
    """
    if not isinstance(model, (str, os.PathLike)):
        return load_object(model, device, tokenizer, name)
    if tokenizer is not None or name is not None:
        raise PipelineError("tokenizer= and name= go with a model object: a checkpoint's tokenizer and name are "
                            "its directory's")
    model_type = os.fspath(model)
    dev = resolve_device(device)
    path = checkpoint_dir(model_type)
    from transformers import AutoTokenizer  # lazy: transformers is slow to import

    arch = sites.read_model_type(path)
    model = load_checkpoint(path, dev) if arch == "gpt2" else sites.load_hf(path, arch, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise PipelineError(f"{path}: cannot load its tokenizer ({e})") from None
    return LoadedModel(model, tokenizer, model_name(model_type), path, dev, sites.site_info(arch), str(model_type))


# --- a model object ------------------------------------------------------------------------------------------
HOOKED_TRANSFORMER = (
    "a TransformerLens HookedTransformer runs its own converted copy of the weights (by default with LayerNorm "
    "folded and the weights centred), not a transformers model whose neurons gelutrace can read: pass the "
    "transformers model instead (AutoModelForCausalLM.from_pretrained(...), the model you gave "
    "HookedTransformer.from_pretrained(..., hf_model=model)), or a TransformerBridge "
    "(TransformerBridge.boot_transformers(...)), which runs the transformers model itself")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def unwrap(obj) -> tuple[object, object]:
    """
    (the transformers model, the wrapper's tokenizer or None) of a model object: a transformers model as it is, an
    nnsight LanguageModel's module (`_module`), a TransformerLens TransformerBridge's `original_model` (the
    transformers model, which the bridge runs with its hook points wrapped around the modules). Recognised by
    their class names and attributes, so neither library is imported here.
    """
    classes = {c.__name__ for c in type(obj).__mro__}
    if "HookedTransformer" in classes:
        raise PipelineError(HOOKED_TRANSFORMER)
    if "TransformerBridge" in classes:
        if getattr(obj, "compatibility_mode", False) or getattr(obj, "_weights_processed", False):
            raise PipelineError("this TransformerBridge runs in compatibility mode, on processed weights (LayerNorm "
                                "folded, weights centred) that are no longer the transformers model's: pass a bridge "
                                "without enable_compatibility_mode(), or the transformers model")
        return obj.original_model, getattr(obj, "tokenizer", None)
    inner = None if isinstance(obj, nn.Module) else getattr(obj, "__dict__", {}).get("_module")
    if isinstance(inner, nn.Module):  # nnsight's LanguageModel: an Envoy around the module it runs
        return inner, getattr(obj, "tokenizer", None)
    return obj, None


def hf_parameters(hf: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers model's parameters by their transformers names, tied ones under each name. A TransformerBridge
    wraps each module, whose own parameters it reaches as `_original_component`; the parameters of the wrappers
    themselves (split attention projections) are the bridge's, not the model's."""
    def the_models(name: str) -> bool:
        mod, parts = hf, name.split(".")
        for part, after in zip(parts, parts[1:] + [""]):
            if part != "_original_component" and "_original_component" in mod._modules and after:
                return False  # a wrapper's own
            mod = mod._modules.get(part, mod)
        return True

    return {k.replace("._original_component", ""): p for k, p in hf.named_parameters(remove_duplicate=False)
            if the_models(k)}


def load_object(obj, device: str = "auto", tokenizer=None, name: str | None = None) -> LoadedModel:
    """
    The model a notebook holds, analysed with the weights it has in memory (nothing is read from disk):
    a transformers causal LM of GPT-2 or a family in sites.FAMILIES, or a wrapper of one (unwrap). GPT-2 runs on
    model.py over the object's own tensors (gpt2_from_hf); the other families through sites.HFCausalLM, which
    adds an identity pre-hook on each output projection and sets the object to eval mode. The tokenizer is
    `tokenizer`, else the wrapper's, else the one at the object's name_or_path; the prefix {m} is `name`, else the
    last part of name_or_path. The model stays where it is: `device` "auto" or the device it is on.
    """
    from transformers import AutoTokenizer, PreTrainedModel  # lazy: transformers is slow to import

    hf, wrapper_tokenizer = unwrap(obj)
    if not isinstance(hf, PreTrainedModel):
        raise PipelineError(f"load_model takes a model name, a checkpoint directory, or a model object (a "
                            f"transformers model, an nnsight LanguageModel, a TransformerLens TransformerBridge); "
                            f"got {type(obj).__name__}")
    what = f"the {type(hf).__name__} object"
    arch = sites.check_model_type(f"{what}'s config", hf.config.to_dict())
    if hf.get_output_embeddings() is None:
        raise PipelineError(f"{what} has no language-model head: load it as a causal LM "
                            f"(AutoModelForCausalLM.from_pretrained, or {type(hf).__name__}'s *ForCausalLM class)")
    params = hf_parameters(hf)
    dev = object_device(what, params, device)
    model = gpt2_from_hf(hf, params) if arch == "gpt2" else sites.HFCausalLM(hf.eval(), arch)
    m = object_name(hf, name)
    tokenizer = tokenizer if tokenizer is not None else wrapper_tokenizer
    if tokenizer is None:
        source = str(getattr(hf, "name_or_path", "") or "")
        if not source:
            raise PipelineError(f"{what} has no name_or_path to find its tokenizer by: give it, "
                                f"load_model(model, tokenizer=...)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PipelineError(f"cannot load the tokenizer of {what} from its name_or_path {source!r} ({reason}): "
                                f"give it, load_model(model, tokenizer=...)") from None
    if not callable(getattr(tokenizer, "decode", None)):
        raise PipelineError(f"load_model needs tokenizer as a transformers tokenizer, got {type(tokenizer).__name__}")
    if len(tokenizer) > model.config.vocab_size:
        raise PipelineError(f"the tokenizer has {len(tokenizer):,} tokens, more than the {model.config.vocab_size:,} "
                            f"of {what}'s vocabulary: it is not this model's tokenizer")
    return LoadedModel(model, tokenizer, m, None, dev, sites.site_info(arch))


def object_device(what: str, params: dict, device: str) -> torch.device:
    """The one device a model object's float32 weights are on (`device`, unless "auto", must be it)."""
    tensors = list(params.values())
    if any(p.is_meta for p in tensors):
        raise PipelineError(f"{what} has no weights yet (meta tensors): load them first (an nnsight LanguageModel: "
                            f"LanguageModel(..., dispatch=True))")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in tensors} - {"float32"})
    if dtypes:
        raise PipelineError(f"{what} holds {', '.join(dtypes)} weights, but gelutrace analyses float32 ones: "
                            f"convert it with model.float() (or load it with dtype=torch.float32)")
    devices = sorted({str(p.device) for p in tensors})
    if len(devices) > 1:
        raise PipelineError(f"{what} is spread over {', '.join(devices)}: move it to one device (model.to(...))")
    dev = tensors[0].device if tensors else torch.device("cpu")
    if device != "auto" and resolve_device(device).type != dev.type:
        raise PipelineError(f"device={device!r}, but {what} is on {dev}: move it there (model.to({device!r})) or "
                            f"leave device='auto'")
    return dev


def object_name(hf, name) -> str:
    """The file prefix {m} of a model object: `name`, else the last part of its name_or_path."""
    if name is None:
        name = Path(str(getattr(hf, "name_or_path", "") or "")).name
        if not name:
            raise PipelineError(f"the {type(hf).__name__} object has no name_or_path (built in memory): name it, "
                                f"load_model(model, name=...), the prefix of its files")
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise PipelineError(f"the model's name is the prefix of its files: letters, digits, '.', '_', '+' and '-', "
                            f"not starting with a dot or a dash; got {name!r}")
    return name


def user_hooks(hf: nn.Module) -> list[str]:
    """The modules with hooks a user attached: not those transformers (its output capture) and a TransformerBridge
    (around its wrappers) attach themselves; a hook on one of a bridge's hook points is the user's."""
    own = ("transformers.", "transformer_lens.")
    return [name for name, mod in hf.named_modules()
            if (fns := [*mod._forward_hooks.values(), *mod._forward_pre_hooks.values()])
            and (type(mod).__name__ == "HookPoint" or any(not getattr(f, "__module__", "").startswith(own)
                                                         for f in fns))]


def gpt2_from_hf(hf: nn.Module, params: dict) -> GPT:
    """
    model.py's GPT over a transformers GPT-2's own tensors, Conv1D weights as transposed views (as load_checkpoint
    reads them from a file): nothing is copied, and the same code runs on the same layout as for the checkpoint
    saved to disk, so the results are bit for bit the same. Hooks attached to the object would not run: refused.
    """
    what = f"the {type(hf).__name__} object"
    hooked = user_hooks(hf)
    if hooked:
        raise PipelineError(f"{what} has hooks attached ({hooked[0]}{' and more' if len(hooked) > 1 else ''}), "
                            f"which gelutrace would not run: it runs GPT-2 on its own code (model.py) over the "
                            f"model's weights; remove them (handle.remove()), or edit the weights instead")
    config = gpt2_config(f"{what}'s config", hf.config.to_dict())
    with torch.device("meta"):  # no random init: every tensor is the object's
        model = GPT(config)
    want = {k: tuple(v.shape[::-1] if k.endswith(CONV1D) else v.shape) for k, v in model.state_dict().items()}
    sites.check_tensors(what, f"{what}'s config", missing=[k for k in want if k not in params],
                        unexpected=[k for k in params if k not in want],
                        mismatched=[(k, tuple(params[k].shape), s) for k, s in want.items()
                                    if k in params and tuple(params[k].shape) != s])
    if params["lm_head.weight"] is not params["transformer.wte.weight"] and not torch.equal(
            params["lm_head.weight"], params["transformer.wte.weight"]):
        raise PipelineError(f"{what}: lm_head.weight differs from transformer.wte.weight, but this GPT-2 ties its "
                            f"output embedding to the input embedding")
    model.load_state_dict({k: params[k].detach().t() if k.endswith(CONV1D) else params[k].detach() for k in want},
                          assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied tensor: tie it again
    return model.eval()
