"""
What "active" (value > 0) picks out in a model's MLP units, layer by layer, on a text: the figures of
docs/models.md's "What 'active' means in a trained gated MLP".

    python tools/gated_activity.py models/tinyllama-bard parcellation_datasets/heldout_corpus_tinybard.txt
    python tools/gated_activity.py models/tinybard parcellation_datasets/heldout_corpus_tinybard.txt

Reads the text in windows of the model's context (transformers' own model, forward hooks: the units' values are
the input of the MLP's output projection, down_proj or c_proj) and prints per layer: the share of values > 0,
the share of Σ value² they carry, the most negative value, the range of the per-neuron frequencies; for a gated
MLP also the share with an open gate (gate > 0), with up > 0, P(value > 0 | gate open), P(value > 0 | gate shut)
and the share of Σ value² with an open gate.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a checkpoint directory (GPT-2 or Llama family)")
    ap.add_argument("text", help="a .txt file")
    ap.add_argument("--context", type=int, default=256, help="window length (default: %(default)s)")
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tok(Path(args.text).read_text(encoding="utf-8"))["input_ids"])
    gated = hasattr(model, "model") and hasattr(model.model.layers[0].mlp, "gate_proj")
    blocks = model.model.layers if gated else model.transformer.h
    n = len(blocks)
    stats = [dict(tokens=0, pos=0, sq=0.0, sq_pos=0.0, low=np.inf, count=None, open=0, up=0, pos_open=0, pos_shut=0,
                  sq_open=0.0) for _ in range(n)]
    gates = {}

    def record(i, value):
        s, v = stats[i], value.reshape(-1, value.shape[-1]).double()
        s["tokens"] += v.shape[0]
        s["pos"] += int((v > 0).sum())
        s["sq"] += float((v ** 2).sum())
        s["sq_pos"] += float((v.clamp(min=0) ** 2).sum())
        s["low"] = min(s["low"], float(v.min()))
        c = (v > 0).sum(0).numpy()
        s["count"] = c if s["count"] is None else s["count"] + c
        if gated:
            g, u = (x.reshape(v.shape).double() for x in gates.pop(i))
            opened = g > 0
            s["open"] += int(opened.sum())
            s["up"] += int((u > 0).sum())
            s["pos_open"] += int(((v > 0) & opened).sum())
            s["pos_shut"] += int(((v > 0) & ~opened).sum())
            s["sq_open"] += float((v ** 2 * opened).sum())

    handles = []
    for i, b in enumerate(blocks):
        if gated:
            handles.append(b.mlp.gate_proj.register_forward_hook(
                lambda m, a, o, i=i: gates.__setitem__(i, [o.detach()])))
            handles.append(b.mlp.up_proj.register_forward_hook(lambda m, a, o, i=i: gates[i].append(o.detach())))
            handles.append(b.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: record(i, a[0].detach())))
        else:
            handles.append(b.mlp.c_proj.register_forward_pre_hook(lambda m, a, i=i: record(i, a[0].detach())))
    with torch.no_grad():
        for lo in range(0, len(ids), args.context):
            window = ids[lo:lo + args.context]
            if len(window) > 1:
                model(window[None])
    for h in handles:
        h.remove()
    print(f"{args.model}: {len(ids):,} tokens, windows of {args.context}, {'gated' if gated else 'GELU'} units")
    cols = ["layer", "P(>0)", "Σv² in >0", "min", "neuron freq range"]
    cols += ["P(gate>0)", "P(up>0)", "P(>0|open)", "P(>0|shut)", "Σv² open"] if gated else []
    print(" | ".join(cols))
    for i, s in enumerate(stats):
        total = s["tokens"] * len(s["count"])
        freq = s["count"] / s["tokens"]
        row = [str(i), f"{s['pos'] / total:.3f}", f"{s['sq_pos'] / s['sq']:.2f}", f"{s['low']:.2f}",
               f"{freq.min():.2f}-{freq.max():.2f}"]
        if gated:
            shut = total - s["open"]
            row += [f"{s['open'] / total:.2f}", f"{s['up'] / total:.2f}", f"{s['pos_open'] / s['open']:.2f}",
                    f"{s['pos_shut'] / shut:.2f}", f"{s['sq_open'] / s['sq']:.2f}"]
        print(" | ".join(row))


if __name__ == "__main__":
    main()
