"""
GPT-2 in one file, after nanoGPT, with two additions the pipeline needs:

- the MLP activation is its own submodule (`block.mlp.gelu`), so forward hooks can read and edit the
  post-GELU output of every neuron;
- a key/value cache, so generation prefills the prompt once and then runs one position per step.

Loading checkpoints (hub names, local directories, the shipped model) lives in `gelutrace.model.loading`.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # context window (n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP hidden width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    gelu_approximate: str = "tanh"  # GPT-2 was trained with the tanh approximation ("gelu_new")

    @property
    def d_mlp(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to `max_len` positions."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head

    def forward(self, x, layer: int, cache: KVCache | None, mask: torch.Tensor | None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if mask is None:
            # no cache and no padding, or a single new position that may see everything before it
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GELU(nn.GELU):
    """
    nn.GELU, its tanh form computed on a CPU as x * sigmoid(2z) = 0.5 x (1 + tanh z), z = sqrt(2/pi)(x + 0.044715 x^3):
    the same function up to float rounding (and its sign is x's, as before), about 1.3x faster there, where
    torch's tanh is slow. On other devices, and where autograd records the graph, torch's own GELU.
    """

    def forward(self, x):
        if self.approximate != "tanh" or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            return super().forward(x)
        c = 2 * math.sqrt(2 / math.pi)
        two_z = x * x
        two_z.mul_(0.044715 * c).add_(c).mul_(x)
        return two_z.sigmoid_().mul_(x)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_mlp)
        self.gelu = GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(config.d_mlp, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, layer, cache, mask):
        x = x + self.attn(self.ln_1(x), layer, cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            # _weight: no reset_parameters here (its init.normal_ imports torch._dynamo, a second per process)
            wte=nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd)),
            wpe=nn.Embedding(config.block_size, config.n_embd, _weight=torch.empty(config.block_size, config.n_embd)),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        if self.lm_head.weight.is_meta:  # built to receive a checkpoint
            return
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def gelus(self) -> list[nn.Module]:
        """The GELU module of every layer, in layer order: the place to hook neurons."""
        return [block.mlp.gelu for block in self.transformer.h]

    @staticmethod
    def attention_layout(T: int, past: int = 0, pad: torch.Tensor | None = None, device=None):
        """
        (positions, mask) for T new positions after `past` cached ones: the position ids (1 or B, T) and the
        attention mask each block takes (None: plain causal attention, or a single new position that sees
        everything before it). pad as in forward.
        """
        slots = torch.arange(past, past + T, device=device)
        pos = slots.unsqueeze(0)
        mask = None
        if (pad is not None and bool(pad.any())) or (past > 0 and T > 1):
            keys = torch.arange(past + T, device=device)
            causal = keys.view(1, -1) <= slots.view(-1, 1)  # (T, S)
            mask = causal.view(1, 1, T, -1)
            if pad is not None:
                pos = (pos - pad.unsqueeze(1)).clamp(min=0)
                real = keys.view(1, 1, -1) >= pad.view(-1, 1, 1)  # (B, 1, S): key is not padding
                # a padding query attends to itself only, so it stays finite and never reaches real tokens
                mask = (causal & (real | (keys.view(1, -1) == slots.view(-1, 1)))).unsqueeze(1)
        return pos, mask

    def trunk(self, idx, cache: KVCache | None = None, pad: torch.Tensor | None = None):
        """The residual stream after the last block (B, T, n_embd): the forward pass without the final norm
        and the logits, for callers that only read the hooks (arguments as in forward)."""
        B, T = idx.size()
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context window of {self.config.block_size}")
        pos, mask = self.attention_layout(T, past, pad, idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, cache, mask)
        if cache is not None:
            cache.length += T
        return x

    def trunk_from(self, layer: int, x, pre):
        """trunk's output resumed at `layer`'s GELU, from that block's residual stream after its attention (x) and
        its MLP's pre-activation (pre), as a full pass over unpadded rows computed them: the blocks below, which
        that pass shares, are not run again."""
        _, mask = self.attention_layout(x.size(1), 0, None, x.device)
        block = self.transformer.h[layer]
        x = x + block.mlp.c_proj(block.mlp.gelu(pre))
        for i in range(layer + 1, self.config.n_layer):
            x = self.transformer.h[i](x, i, None, mask)
        return x

    def forward(self, idx, targets=None, cache: KVCache | None = None, pad: torch.Tensor | None = None,
                logits_to_keep: int = 0):
        """
        idx: (B, T) token ids. With `cache`, idx holds only the positions after those already cached.
        pad: (B,) number of left-padding positions of each sequence (batches of unequal prompts);
             padded positions are never attended to and positions count from each sequence's first
             real token.
        logits_to_keep: > 0 computes the logits of the last that many positions only (transformers' argument).
        Returns logits (B, T, vocab) and, given targets, the mean cross-entropy (targets -100 ignored).
        """
        x = self.trunk(idx, cache, pad)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, generators=None, pad=None):
        """
        Continue each row of idx (B, T) by max_new_tokens tokens: the prompt is prefilled once, then one
        position per step runs through the key/value cache. temperature 0 picks the argmax (greedy);
        otherwise tokens are sampled from softmax(logits / temperature), restricted to the top_k most
        likely when top_k is given, each row drawing from its own torch.Generator when `generators` is
        given (so a row's tokens do not depend on what else is in the batch). Returns (B, T + new).
        Every forward call makes exactly one prediction per row, so hooks see one sample per call
        at position -1.
        """
        B, T = idx.shape
        self.check_length(T, max_new_tokens, self.config.block_size)
        if max_new_tokens <= 0:
            return idx
        cache = KVCache(self.config, B, T + max_new_tokens - 1, idx.device, self.transformer.wte.weight.dtype)
        out = [idx]
        step_input = idx
        for step in range(max_new_tokens):
            logits, _ = self(step_input, cache=cache, pad=pad, logits_to_keep=1)
            next_id = self.pick(logits[:, -1, :].float(), temperature, top_k, generators)
            out.append(next_id)
            step_input = next_id
        return torch.cat(out, dim=1)

    @staticmethod
    def check_length(prompt_tokens: int, new_tokens: int, block_size: int):
        # the last new token is never fed back, so it may be the one past the window
        if prompt_tokens + new_tokens > block_size + 1:
            raise ValueError(f"{prompt_tokens} prompt tokens + {new_tokens} new tokens exceed the context window of "
                             f"{block_size}")

    @staticmethod
    def pick(logits, temperature=0.0, top_k=None, generators=None):
        """Next token id (B, 1) from last-position logits (B, vocab)."""
        if temperature == 0.0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
        probs = F.softmax(logits, dim=-1)
        if generators is None:
            return torch.multinomial(probs, num_samples=1)
        # inverse CDF with one uniform from each row's generator: the rows' draws in one batched search (a
        # multinomial call per row costs more than the step's forward pass on a CPU)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=g.device) for g in generators])
        cdf = probs.double().cumsum(dim=-1)
        total = cdf[:, -1:].contiguous()
        x = (u.view(-1, 1) * total).clamp(max=total)
        pick = torch.searchsorted(cdf, x, right=True)  # the first token whose cumulative mass exceeds x
        last = torch.searchsorted(cdf, total)  # x == total by rounding: the last token with mass
        return torch.where(pick < cdf.size(-1), pick, last)
