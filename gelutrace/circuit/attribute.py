"""
A prompt's NeuronGraph: circuit-tracer's attribution (0.5.0, attribution/attribute.py) with every neuron of every
layer and position as a candidate node.

Phase 3 computes the logit rows; phase 4 repeatedly ranks the candidates by their influence on the logits over
the rows computed so far (circuit-tracer's `compute_partial_influences`: absolute adjacency normalised per row,
weighted by the logits' probabilities, summed over paths) and computes the rows of the next
`UPDATE_INTERVAL * batch_size` unvisited candidates, until `max_nodes` neurons are kept. Unlike circuit-tracer,
which drops the columns of the features it did not keep, the neurons not kept are summed into one "other
neurons" node per layer and position, so that every kept node's input is accounted for.
"""

import sys
import time

import torch
from tqdm import tqdm

from gelutrace import PipelineError
from gelutrace.circuit import linear
from gelutrace.circuit.graph import NeuronGraph, TraceSettings
from gelutrace.graph.store import available_memory

UPDATE_INTERVAL = 4  # circuit-tracer's update_interval: batches between two rankings
OTHER_CHUNK = 256  # target rows whose "other neurons" sums are formed at a time
GiB = 2 ** 30


def _tokens(lm, prompt) -> tuple[str, torch.Tensor]:
    if isinstance(prompt, str):
        ids = lm.tokenizer(prompt)["input_ids"]
        text = prompt
    else:
        ids = [int(t) for t in prompt]
        text = lm.tokenizer.decode(ids)
    if not ids:
        raise PipelineError("the prompt has no tokens")
    block = lm.model.config.block_size
    if len(ids) > block:
        raise PipelineError(f"the prompt has {len(ids)} tokens, more than the model's context of {block}")
    vocab = lm.model.config.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise PipelineError(f"token ids must lie in [0, {vocab})")
    return text, torch.tensor(ids, dtype=torch.long, device=lm.device)


def memory_needed(n_layers: int, n_pos: int, d_mlp: int, d_model: int, vocab: int, settings: TraceSettings) -> dict:
    """Bytes of the trace's main allocations (float32)."""
    n_cand = n_layers * n_pos * d_mlp
    n_rows = min(settings.max_nodes, n_cand) + settings.max_logits
    B = settings.batch_size
    parts = {
        "rows": n_rows * (n_cand + n_pos) * 4,
        # the forward graph kept for the backward passes: per row and layer, about 10 residual-width and 4
        # MLP-width tensors and the attention probabilities (an upper bound over the families)
        "forward": B * n_layers * n_pos * (10 * d_model + 4 * d_mlp + 2 * n_pos * 16) * 4 + B * vocab * 4,
        "backward": 3 * B * (n_cand + n_layers * n_pos * d_model) * 4,  # one pass's gradients and products
        "graph": (n_rows + (n_layers + 1) * n_pos) ** 2 * 4 + 2 * n_rows * n_rows * 4,
    }
    parts["total"] = sum(parts.values())
    return parts


def _influence(rows: torch.Tensor, sums: torch.Tensor, row_cols: torch.Tensor, n_logits: int,
               probabilities: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """
    circuit-tracer's `compute_partial_influences` (graph.py) over the rows computed so far: the influence on
    the logits of every column. With Â the row-normalised |rows| and w_0 the logits' probabilities on the logit
    rows, w_{k+1} = (w_k Â) restricted to the rows' own columns, and influence = sum_k w_k Â; the sum over k
    runs on the small square block Â[:, row_cols] and the full rows are read once.
    """
    n = len(rows)
    scale = 1 / sums.clamp(min=1e-10)
    order = torch.argsort(row_cols)  # columns read in increasing order
    block = rows[:, row_cols[order]].abs_().mul_(scale[:, None])  # (n, n - n_logits)
    w = torch.zeros(n)
    w[:n_logits] = probabilities
    total = w.clone()
    for _ in range(n + 1):  # a DAG: w vanishes after at most its depth
        nxt = torch.zeros(n)
        nxt[n_logits + order] = w @ block
        if not nxt.any():
            break
        w = nxt
        total += w
    weights = total * scale
    influence = torch.zeros(rows.size(1))
    tmp = torch.empty(chunk, rows.size(1))  # one small buffer for |rows|, chunk by chunk
    for i in range(0, n, chunk):
        part = tmp[:len(rows[i:i + chunk])]
        torch.abs(rows[i:i + chunk], out=part)
        influence.addmv_(part.T, weights[i:i + chunk])
    return influence


def attribute(lm, prompt: str | list[int], settings: TraceSettings = TraceSettings(), progress: bool = True,
              stats: dict | None = None) -> NeuronGraph:
    """
    The NeuronGraph of `prompt` for a LoadedModel. `stats`, when given, receives the passes ((targets, top
    layer) of each backward pass) and the seconds of each phase.
    """
    text, tokens = _tokens(lm, prompt)
    model = lm.model
    linear.check_family(model)
    n_layers, d_mlp, T = model.config.n_layer, model.config.d_mlp, len(tokens)
    d_model = model.lm_head.weight.size(1)
    n_cand = n_layers * T * d_mlp
    max_nodes = min(settings.max_nodes, n_cand)
    if max_nodes < 1 or settings.batch_size < 1 or settings.max_logits < 1:
        raise PipelineError("max_nodes, batch_size and max_logits must be positive")
    need = memory_needed(n_layers, T, d_mlp, d_model, model.config.vocab_size, settings)
    have = available_memory()
    print(f"trace: {T} tokens, {n_cand:,} candidate neurons, {max_nodes:,} kept; needs about "
          f"{need['total'] / GiB:.2f} GiB (rows {need['rows'] / GiB:.2f} GiB), {have / GiB:.1f} GiB available",
          file=sys.stderr)
    if need["total"] > have:
        raise PipelineError(f"the trace needs about {need['total'] / GiB:.1f} GiB, more than the "
                            f"{have / GiB:.1f} GiB available: lower --max_nodes or shorten the prompt")
    stats = {} if stats is None else stats
    stats.update(passes=[], forward_s=0.0, backward_s=0.0, influence_s=0.0, assemble_s=0.0)
    B = settings.batch_size
    t0 = time.perf_counter()
    with linear.frozen_pass(lm, tokens, B) as fp:
        stats["forward_s"] = time.perf_counter() - t0
        targets = linear.logit_targets(fp, settings.max_logits, settings.logit_probability)
        probabilities = targets.probabilities.cpu()
        n_logits = len(targets.tokens)
        rows = torch.empty(n_logits + max_nodes, n_cand + T)  # every row is written whole by its pass
        sums = torch.zeros(n_logits + max_nodes)  # each row's absolute sum
        row_node = torch.full((n_logits + max_nodes,), -1, dtype=torch.long)  # candidate of each row
        visited = torch.zeros(n_cand, dtype=torch.bool)

        def compute(layers, positions, dims, start, vectors=None):
            t = time.perf_counter()
            fp.rows(layers, positions, dims, vectors, out=rows[start:start + len(layers)])
            sums[start:start + len(layers)] = torch.linalg.vector_norm(rows[start:start + len(layers)], 1, dim=1)
            stats["backward_s"] += time.perf_counter() - t
            stats["passes"].append((len(layers), int(layers.max())))

        # phase 3: the logit rows
        for i in range(0, n_logits, B):
            k = torch.arange(i, min(i + B, n_logits))
            compute(torch.full((len(k),), n_layers), torch.full((len(k),), T - 1), k, i, targets.vectors)

        # phase 4: neuron rows, in order of influence
        st, n_visited = n_logits, 0
        bar = tqdm(total=max_nodes, desc="neuron rows", disable=not progress, file=sys.stderr)
        while n_visited < max_nodes:
            if max_nodes == n_cand:
                pending = torch.arange(n_cand)
            else:
                t = time.perf_counter()
                influence = _influence(rows[:st], sums[:st], row_node[n_logits:st], n_logits, probabilities)[:n_cand]
                stats["influence_s"] += time.perf_counter() - t
                rank = torch.argsort(influence, descending=True)
                pending = rank[~visited[rank]][:min(UPDATE_INTERVAL * B, max_nodes - n_visited)]
                # by layer, so a pass stops at its highest target's layer (the set is the same)
                pending = pending[torch.argsort(pending // (T * d_mlp), stable=True)]
            for i in range(0, len(pending), B):
                idx = pending[i:i + B]
                layer, rest = idx // (T * d_mlp), idx % (T * d_mlp)
                compute(layer, rest // d_mlp, rest % d_mlp, st)
                row_node[st:st + len(idx)] = idx
                visited[idx] = True
                st += len(idx)
                n_visited += len(idx)
                bar.update(len(idx))
        bar.close()

        t = time.perf_counter()
        graph = _assemble(lm, text, tokens, fp, targets, rows, row_node, n_logits, settings)
        stats["assemble_s"] = time.perf_counter() - t
    return graph


def _assemble(lm, text, tokens, fp, targets, rows, row_node, n_logits, settings) -> NeuronGraph:
    """The NeuronGraph from the computed rows; consumes `rows` (the kept neurons' columns are zeroed)."""
    n_layers, T, d_mlp = fp.shape
    n_cand = n_layers * T * d_mlp
    kept = torch.nonzero(row_node >= 0).flatten()
    order = kept[torch.argsort(row_node[kept])]  # the kept neurons' rows in (layer, position, dim) order
    neurons = row_node[order]
    n_kept = len(neurons)
    other_start, emb_start = n_kept, n_kept + n_layers * T
    logit_start = emb_start + T
    n_nodes = logit_start + n_logits
    adjacency = torch.zeros(n_nodes, n_nodes)
    row_of = torch.cat([order, torch.arange(n_logits)])  # buffer row of each target node
    target_nodes = torch.cat([torch.arange(n_kept), torch.arange(logit_start, n_nodes)])
    adjacency[target_nodes, :n_kept] = rows[row_of[:, None], neurons[None, :]]
    adjacency[target_nodes, emb_start:logit_start] = rows[:, n_cand:][row_of]
    rows[:, neurons] = 0
    for lo in range(0, len(row_of), OTHER_CHUNK):  # in blocks: a gather of every row would copy the buffer whole
        r = row_of[lo:lo + OTHER_CHUNK]
        adjacency[target_nodes[lo:lo + OTHER_CHUNK], other_start:emb_start] = (
            rows[r, :n_cand].view(len(r), n_layers * T, d_mlp).sum(2))
    layer, rest = neurons // (T * d_mlp), neurons % (T * d_mlp)
    inputs = torch.cat([fp.input_values.flatten()[neurons], targets.inputs]).cpu()
    constants = torch.zeros(n_nodes)
    constants[target_nodes] = (inputs.double() - adjacency[target_nodes].double().sum(1)).float()
    return NeuronGraph(
        prompt=text, model_name=lm.name, input_tokens=tokens.cpu(), n_layers=n_layers,
        neurons=torch.stack([layer, rest // d_mlp, rest % d_mlp], 1),
        values=fp.values.flatten()[neurons].cpu(), inputs=fp.input_values.flatten()[neurons].cpu(),
        slopes=fp.slopes.flatten()[neurons].cpu(), logit_tokens=targets.tokens.cpu(),
        logit_probabilities=targets.probabilities.cpu(), adjacency=adjacency, constants=constants,
        settings=settings)
