"""
Influence, pruning and scores of the per-prompt neuron graph (gelutrace.circuit.prune) against a 4-node graph
computed by hand and against circuit-tracer 0.5.0's own functions (circuit_tracer/graph.py: compute_node_influence,
prune_graph, compute_graph_scores) on random graphs; and its graph file (gelutrace.circuit.export) against
Neuronpedia's graph schema (tests/data/neuronpedia_graph/, copied unchanged) and circuit-tracer's node fields.

circuit-tracer is installed without its dependencies into .testdeps/ (`make install`), never into the venv: its
pinned older transformers must not enter it. Only this file puts that folder on sys.path. One import is stubbed:
circuit_tracer.utils.create_graph_files, which circuit_tracer.utils imports for the graph-file writer and which
alone needs transformers and pydantic; the functions checked against need only torch (test_circuit_tracer_imports_
with_torch_alone).
"""

import json
import subprocess
import sys
import types
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from gelutrace import PipelineError
from gelutrace.circuit.export import graph_json, write_graph_json
from gelutrace.circuit.graph import NeuronGraph, TraceSettings
from gelutrace.circuit.prune import graph_scores, influence, node_influence, prune

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTDEPS = REPO_ROOT / ".testdeps"
SCHEMA = json.loads((REPO_ROOT / "tests" / "data" / "neuronpedia_graph" / "graph-schema.json").read_text())
STUBBED = "circuit_tracer.utils.create_graph_files"


def stub_graph_files():
    stub = types.ModuleType(STUBBED)
    stub.create_graph_files = None
    sys.modules.setdefault(STUBBED, stub)


@pytest.fixture(scope="module")
def ct():
    """circuit_tracer.graph from .testdeps/."""
    if not (TESTDEPS / "circuit_tracer").is_dir():
        pytest.skip("circuit-tracer is not in .testdeps/: `make install` installs it there")
    if str(TESTDEPS) not in sys.path:
        sys.path.insert(0, str(TESTDEPS))
    stub_graph_files()
    import circuit_tracer.graph  # lazy: only from .testdeps/, put on sys.path above

    assert Path(circuit_tracer.graph.__file__).is_relative_to(TESTDEPS)
    return circuit_tracer.graph


def test_circuit_tracer_imports_with_torch_alone():
    """In a fresh interpreter where transformers and pydantic cannot be imported, circuit_tracer.graph imports
    (with the one stub) and loads no third-party module besides those `import torch` loads."""
    if not (TESTDEPS / "circuit_tracer").is_dir():
        pytest.skip("circuit-tracer is not in .testdeps/: `make install` installs it there")
    code = f"""
import sys, types
sys.path.insert(0, {str(TESTDEPS)!r})
sys.modules["transformers"] = sys.modules["pydantic"] = None  # importing either raises ImportError
stub = types.ModuleType({STUBBED!r}); stub.create_graph_files = None; sys.modules[{STUBBED!r}] = stub
import torch
before = set(sys.modules)
import circuit_tracer.graph as g
assert g.__file__.startswith({str(TESTDEPS)!r}), g.__file__
new = {{m.split(".")[0] for m in set(sys.modules) - before}} - set(sys.stdlib_module_names)
print(sorted(new), g.prune_graph.__name__, g.compute_graph_scores.__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['circuit_tracer']", "prune_graph", "compute_graph_scores"]


# --- a 4-node graph by hand ---------------------------------------------------------------------------------
# nodes: 0 the neuron (layer 0, position 0, dimension 5), 1 "other neurons" of layer 0, 2 the embedding,
# 3 the logit (probability 0.8). Edges: embedding -> neuron -3; neuron -> logit 1, other -> logit -0.5,
# embedding -> logit 2.5.
def hand_graph(node_threshold=0.8, edge_threshold=0.98) -> NeuronGraph:
    a = torch.zeros(4, 4)
    a[0, 2] = -3.0
    a[3, 0], a[3, 1], a[3, 2] = 1.0, -0.5, 2.5
    return NeuronGraph(
        prompt="x", model_name="hand", input_tokens=torch.tensor([7]), n_layers=1,
        neurons=torch.tensor([[0, 0, 5]]), values=torch.tensor([1.5]), inputs=torch.tensor([1.7]),
        slopes=torch.tensor([1.0]), logit_tokens=torch.tensor([9]), logit_probabilities=torch.tensor([0.8]),
        adjacency=a, constants=torch.zeros(4),
        settings=TraceSettings(node_threshold=node_threshold, edge_threshold=edge_threshold))


def test_influence_by_hand():
    """Normalised rows: logit (1, 0.5, 2.5) / 4, neuron (embedding 1). Influence w A + w A^2, w = 0.8 at the logit:
    neuron 0.8 * 0.25 = 0.2; other 0.8 * 0.125 = 0.1; embedding 0.8 * 0.625 + 0.2 * 1 = 0.7; logit 0."""
    g = hand_graph()
    expected = np.array([0.2, 0.1, 0.7, 0.0])
    assert np.allclose(node_influence(g).numpy(), expected, atol=1e-7)
    # the same as w ((I - A)^-1 - I), the closed form of the series
    a = np.abs(g.adjacency.numpy().astype(np.float64))
    a /= np.maximum(a.sum(1, keepdims=True), 1e-10)
    assert np.allclose(np.array([0, 0, 0, 0.8]) @ (np.linalg.inv(np.eye(4) - a) - np.eye(4)), expected)


def test_pruning_by_hand():
    """Node threshold 0.8: influences ranked 0.7, 0.2, 0.1, 0 add up to 0.7, 0.9, 1.0, so the lowest kept is 0.2:
    "other neurons" (0.1) goes. In the graph without it, the logit's row is (1, 2.5) / 3.5 and the neuron's
    influence 0.8 / 3.5; edge scores: embedding -> logit 0.8 * 2.5 / 3.5, neuron -> logit 0.8 / 3.5, embedding ->
    neuron 0.8 / 3.5 * 1; their shares, highest first: 2/3.6, 2.8/3.6, 1."""
    p = prune(hand_graph())  # edge threshold 0.98: all three edges
    assert p.node_mask.tolist() == [True, False, True, True]
    assert sorted(map(tuple, p.edge_mask.nonzero().tolist())) == [(0, 2), (3, 0), (3, 2)]
    assert np.allclose(p.cumulative_scores.numpy(), [0.9, 1.0, 0.7, 1.0])
    assert np.allclose(p.node_influence.numpy(), [0.2, 0.1, 0.7, 0.0])

    # edge threshold 0.5: only embedding -> logit (share 0.556 >= 0.5); the neuron, left without an outgoing
    # edge, goes too
    p = prune(hand_graph(edge_threshold=0.5))
    assert p.node_mask.tolist() == [False, False, True, True]
    assert p.edge_mask.nonzero().tolist() == [[3, 2]]

    # node threshold 0.95 keeps "other neurons" (0.1); edge scores in the whole graph: embedding -> logit 0.5,
    # neuron -> logit 0.2, embedding -> neuron 0.2, other -> logit 0.1, shares 0.5, 0.7, 0.9, 1: at 0.85 the
    # other's only edge goes, and with it the other
    assert prune(hand_graph(node_threshold=0.95)).node_mask.tolist() == [True, True, True, True]
    # thresholds of 1 keep every node and every edge, and no pair of nodes without one
    p = prune(hand_graph(node_threshold=1.0, edge_threshold=1.0))
    assert p.node_mask.all() and torch.equal(p.edge_mask, hand_graph().adjacency != 0)
    p = prune(hand_graph(node_threshold=0.95, edge_threshold=0.85))
    assert p.node_mask.tolist() == [True, False, True, True]
    assert sorted(map(tuple, p.edge_mask.nonzero().tolist())) == [(0, 2), (3, 0), (3, 2)]


def test_scores_by_hand():
    """Replacement: embedding influence / (embedding + other) = 0.7 / 0.8. Completeness: each node's input share
    not from "other neurons" (the logit 1 - 0.125; the rest 1) weighted by influence + logit weight
    (0.2, 0.1, 0.7, 0.8): (0.2 + 0.1 + 0.7 + 0.8 * 0.875) / 1.8."""
    s = graph_scores(hand_graph())
    assert s.replacement == pytest.approx(0.875, abs=1e-6)
    assert s.completeness == pytest.approx(1.7 / 1.8, abs=1e-6)


def test_bad_thresholds_and_cycles():
    with pytest.raises(PipelineError, match="node_threshold"):
        prune(hand_graph(node_threshold=1.5))
    with pytest.raises(PipelineError, match="edge_threshold"):
        prune(hand_graph(edge_threshold=-0.1))
    cycle = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(PipelineError, match="cycle"):
        influence(cycle, torch.tensor([1.0, 0.0]))


# --- random graphs against circuit-tracer -------------------------------------------------------------------
def random_graph(seed, n_layers=3, n_pos=4, d_mlp=4, n_kept=20, n_logits=3, density=0.5,
                 node_threshold=0.8, edge_threshold=0.98) -> NeuronGraph:
    """Kept neurons drawn from (layer, position, dimension); an edge may go from any neuron, "other neurons" or
    embedding to a neuron of a later layer at the same or a later position, or to a logit (last position)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_pos), torch.arange(d_mlp))
    neurons = grid[torch.randperm(len(grid), generator=g)[:n_kept]]
    n_kept = len(neurons)
    layer = torch.cat([neurons[:, 0], torch.arange(n_layers).repeat_interleave(n_pos), torch.full((n_pos,), -1),
                       torch.full((n_logits,), n_layers)])
    pos = torch.cat([neurons[:, 1], torch.arange(n_pos).repeat(n_layers), torch.arange(n_pos),
                     torch.full((n_logits,), n_pos - 1)])
    n = len(layer)
    allowed = (layer[None, :] < layer[:, None]) & (pos[None, :] <= pos[:, None])
    allowed[n_kept:n - n_logits] = False  # "other neurons" and embeddings have no inputs
    allowed &= torch.rand(n, n, generator=g) < density
    adjacency = torch.where(allowed, torch.randn(n, n, generator=g) * torch.rand(n, n, generator=g) ** 3, 0.0)
    return NeuronGraph(
        prompt=f"random {seed}", model_name="random-model", input_tokens=torch.randint(0, 50, (n_pos,), generator=g),
        n_layers=n_layers, neurons=neurons, values=torch.randn(n_kept, generator=g),
        inputs=torch.randn(n_kept, generator=g), slopes=torch.rand(n_kept, generator=g),
        logit_tokens=torch.randperm(50, generator=g)[:n_logits] + 50,
        logit_probabilities=torch.softmax(torch.randn(n_logits, generator=g), 0) * 0.9, adjacency=adjacency,
        constants=torch.randn(n, generator=g) * (layer >= 0) * allowed.any(1),
        settings=TraceSettings(node_threshold=node_threshold, edge_threshold=edge_threshold))


def as_circuit_tracer(graph: NeuronGraph):
    """The attributes of circuit-tracer's Graph its prune_graph and compute_graph_scores read."""
    return types.SimpleNamespace(
        input_tokens=graph.input_tokens, logit_targets=[None] * graph.n_logits,
        selected_features=torch.arange(graph.n_kept), adjacency_matrix=graph.adjacency,
        logit_probabilities=graph.logit_probabilities, cfg=types.SimpleNamespace(n_layers=graph.n_layers))


CASES = [  # seed, shape, thresholds
    (0, {}, (0.8, 0.98)),
    (1, {"n_layers": 4, "n_pos": 6, "n_kept": 60, "d_mlp": 8}, (0.8, 0.98)),
    (2, {"density": 0.15, "n_kept": 40}, (0.8, 0.98)),
    (3, {"n_kept": 30}, (0.5, 0.7)),
    (4, {"n_layers": 5, "n_pos": 5, "n_kept": 80, "d_mlp": 6, "n_logits": 10}, (0.95, 0.9)),
    (5, {"n_kept": 0}, (0.8, 0.98)),
    (6, {"n_layers": 6, "n_pos": 8, "n_kept": 150, "d_mlp": 10, "density": 0.3}, (0.6, 0.95)),
]


@pytest.mark.parametrize("seed,shape,thresholds", CASES)
def test_against_circuit_tracer(ct, seed, shape, thresholds):
    graph = random_graph(seed, **shape, node_threshold=thresholds[0], edge_threshold=thresholds[1])
    ours = prune(graph)
    ref = ct.prune_graph(as_circuit_tracer(graph), *thresholds)
    assert torch.allclose(ours.node_influence, ct.compute_node_influence(graph.adjacency, graph.logit_weights()),
                          rtol=1e-5, atol=1e-7)
    assert torch.equal(ours.node_mask, ref.node_mask)
    assert torch.equal(ours.edge_mask, ref.edge_mask)
    assert torch.allclose(ours.cumulative_scores, ref.cumulative_scores, rtol=1e-5, atol=1e-7)
    assert 0 < ours.edge_mask.sum() < graph.n_nodes ** 2
    scores = graph_scores(graph)
    replacement, completeness = ct.compute_graph_scores(as_circuit_tracer(graph))
    assert scores.replacement == pytest.approx(replacement, rel=1e-5)
    assert scores.completeness == pytest.approx(completeness, rel=1e-5)


# --- the graph file ---------------------------------------------------------------------------------------------
class Tokenizer:
    """What token_text asks of a tokenizer."""

    def decode(self, ids):
        return f" t{ids[0]}"


def check_file(doc: dict):
    """Valid against Neuronpedia's schema; node ids unique; every link, pinned id and supernode member a node."""
    jsonschema.Draft7Validator(SCHEMA).validate(doc)
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(set(ids)) == len(ids)
    ids = set(ids)
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    assert set(doc["qParams"]["pinnedIds"]) <= ids
    for label, *members in doc["qParams"]["supernodes"]:
        assert isinstance(label, str) and members and set(members) <= ids
        assert set(members) <= set(doc["qParams"]["pinnedIds"])  # the viewers draw only pinned members


def test_hand_graph_file(tmp_path):
    g = hand_graph()
    target = tmp_path / "hand_trace_graph.json"
    write_graph_json(g, prune(g), target, slug="hand-graph", tokenizer=Tokenizer(), pinned=[0, 1, 3],
                     supernodes=[("module 1", [0])])
    doc = json.loads(target.read_text())
    check_file(doc)
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    assert list(nodes) == ["0_5_0", "E_7_0", "2_9_0"]  # "other neurons" (err_0_0) pruned
    n = nodes["0_5_0"]
    assert (n["feature"], n["layer"], n["ctx_idx"], n["clerp"], n["jsNodeId"]) == (20, "0", 0, "L0/N5", "0_5-0")
    assert n["activation"] == 1.5 and n["influence"] == pytest.approx(0.9)
    assert nodes["2_9_0"]["clerp"] == 'Output " t9" (p=0.800)' and nodes["2_9_0"]["is_target_logit"]
    assert nodes["E_7_0"]["influence"] == pytest.approx(0.7)
    assert sorted((k["source"], k["target"], k["weight"]) for k in doc["links"]) == [
        ("0_5_0", "2_9_0", 1.0), ("E_7_0", "0_5_0", -3.0), ("E_7_0", "2_9_0", 2.5)]
    assert doc["qParams"]["supernodes"] == [["module 1", "0_5_0"]]
    assert doc["qParams"]["pinnedIds"] == ["0_5_0", "2_9_0"]
    meta = doc["metadata"]
    assert (meta["slug"], meta["scan"], meta["prompt"], meta["prompt_tokens"]) == ("hand-graph", "hand", "x", [" t7"])
    assert meta["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    assert meta["generation_settings"]["max_feature_nodes"] == 5000
    assert meta["info"]["generator"]["name"] == "gelutrace"
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


def test_node_fields_as_circuit_tracer(ct):
    """Each kind of node with the fields circuit-tracer's frontend/graph_models.py Node gives it; "other neurons"
    differ only in the id (err_, not 0_, in front) and in their label."""
    pytest.importorskip("pydantic")
    from circuit_tracer.frontend.graph_models import Node  # lazy: needs pydantic, not a dependency of the project

    g = hand_graph(node_threshold=1.0)
    p = prune(g)
    doc = graph_json(g, p, labels=[""])  # circuit-tracer labels no node but logits
    nodes = {n["feature_type"]: n for n in doc["nodes"]}
    c = p.cumulative_scores.tolist()
    assert nodes["cross layer transcoder"] == Node.feature_node(0, 0, 5, influence=c[0], activation=1.5).model_dump()
    assert nodes["embedding"] == Node.token_node(0, 7, influence=c[2]).model_dump()
    assert nodes["logit"] == Node.logit_node(pos=0, vocab_idx=9, token="9", num_layers=1, target_logit=True,
                                             token_prob=float(g.logit_probabilities[0])).model_dump()
    other = Node.error_node(0, 0, influence=c[1]).model_dump()
    assert nodes["mlp reconstruction error"] | {"node_id": other["node_id"], "clerp": ""} == other
    assert nodes["mlp reconstruction error"]["node_id"] == "err_0_0"


def test_random_graph_file(tmp_path):
    """Every kept node an edge touches, every embedding and logit, and every kept edge with its weight; ids
    unique though many neurons of layer 0 have dimensions below n_layers (circuit-tracer's error id 0_{layer}_{pos}
    would be one of theirs); supernode members and pins pruned away left out."""
    g = random_graph(6, n_layers=6, n_pos=8, n_kept=150, d_mlp=10, density=0.3)
    p = prune(g)
    labels = [f"neuron {i}" for i in range(g.n_kept)]
    dropped = (~p.node_mask[:g.n_kept]).nonzero().flatten().tolist()
    kept = p.node_mask[:g.n_kept].nonzero().flatten().tolist()
    assert dropped and len(kept) > 4
    supernodes = [("a", kept[:3] + dropped[:2]), ("b", dropped[2:5]), ("c", [kept[3], kept[3], kept[4]])]
    target = tmp_path / "random_trace_graph.json"
    write_graph_json(g, p, target, labels=labels, supernodes=supernodes, pinned=[kept[5], dropped[0], g.n_nodes - 1])
    doc = json.loads(target.read_text())
    check_file(doc)

    ids = {}
    for layer, pos, dim in g.neurons.tolist():
        ids[len(ids)] = f"{layer}_{dim}_{pos}"
    for layer in range(g.n_layers):
        for pos in range(g.n_pos):
            ids[len(ids)] = f"err_{layer}_{pos}"
    for pos, token in enumerate(g.input_tokens.tolist()):
        ids[len(ids)] = f"E_{token}_{pos}"
    for token in g.logit_tokens.tolist():
        ids[len(ids)] = f"{g.n_layers + 1}_{token}_{g.n_pos - 1}"
    edges = p.edge_mask.nonzero().tolist()
    assert sorted((k["source"], k["target"], k["weight"]) for k in doc["links"]) == sorted(
        (ids[s], ids[t], float(g.adjacency[t, s])) for t, s in edges)
    touched = {i for edge in edges for i in edge} | set(range(g.embedding_start, g.n_nodes))
    assert [n["node_id"] for n in doc["nodes"]] == [ids[i] for i in sorted(touched)]
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    for i in touched:
        if i < g.n_kept:
            assert by_id[ids[i]]["clerp"] == labels[i]
            assert by_id[ids[i]]["activation"] == pytest.approx(float(g.values[i]))
        if i < g.logit_start:
            assert by_id[ids[i]]["influence"] == pytest.approx(float(p.cumulative_scores[i]))
    assert doc["qParams"]["supernodes"] == [["a", *(ids[i] for i in kept[:3])], ["c", ids[kept[3]], ids[kept[4]]]]
    assert doc["qParams"]["pinnedIds"] == [ids[kept[5]], ids[g.n_nodes - 1], *(ids[i] for i in kept[:5])]
    assert doc["metadata"]["prompt_tokens"] == [str(t) for t in g.input_tokens.tolist()]
    assert doc["metadata"]["slug"] == "random-model-random-6"


def test_bad_export_inputs():
    g = hand_graph()
    p = prune(g)
    with pytest.raises(PipelineError, match="labels"):
        graph_json(g, p, labels=["a", "b"])
    with pytest.raises(PipelineError, match="supernode"):
        graph_json(g, p, supernodes=[("x", [1])])  # node 1 is "other neurons", not a kept neuron
    with pytest.raises(PipelineError, match="pinned"):
        graph_json(g, p, pinned=[4])
    with pytest.raises(PipelineError, match="pruning"):
        graph_json(random_graph(0), p)


def test_token_strings_from_the_shipped_tokenizer(shipped_path):
    """With the shipped model's tokenizer, the prompt tokens put together give the prompt back, and the logits'
    labels name their tokens."""
    from transformers import AutoTokenizer  # lazy: slow to import, and only this test needs it

    tokenizer = AutoTokenizer.from_pretrained(str(shipped_path))
    prompt = "To be, or not to be, that is the question"
    g = random_graph(0, n_pos=len(tokenizer(prompt)["input_ids"]))
    g.prompt, g.input_tokens = prompt, torch.tensor(tokenizer(prompt)["input_ids"])
    doc = graph_json(g, prune(g), tokenizer=tokenizer)
    check_file(doc)
    assert "".join(doc["metadata"]["prompt_tokens"]) == prompt
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert [n["clerp"].split('"')[1] for n in logits] == [tokenizer.decode([t]) for t in g.logit_tokens.tolist()]


@pytest.mark.parametrize("seed,shape,thresholds", CASES[:5])
def test_the_viewer_shares_are_the_scores_ranked_above(seed, shape, thresholds):
    """Pruned.node_shares and .edge_shares (the viewer pages' slider values), brute force in numpy: a node's share
    of the total influence held by the nodes of larger influence; a kept edge's share of the total edge score
    (normalised |weight| times its target's influence plus logit weight, in the graph of the nodes that pass the
    node threshold) held by the edges of larger score. Every kept node and edge is under its threshold."""
    graph = random_graph(seed, **shape, node_threshold=thresholds[0], edge_threshold=thresholds[1])
    p = prune(graph)
    s = p.node_influence.double().numpy()
    want = np.array([s[s > x].sum() / s.sum() for x in s])
    assert np.allclose(p.node_shares.numpy(), want, rtol=1e-9, atol=1e-12)
    ranked = np.sort(s[s > 0])[::-1]  # the node threshold: the kept influence reaches node_threshold of the total
    passed = s >= ranked[min(int((np.cumsum(ranked) / ranked.sum() < thresholds[0]).sum()), len(ranked) - 1)]
    passed[graph.embedding_start:] = True
    a = np.abs(graph.adjacency.double().numpy()) * (passed[:, None] & passed[None, :])
    norm = a / np.maximum(a.sum(1, keepdims=True), 1e-10)
    w = graph.logit_weights().double().numpy()
    inf, step = np.zeros_like(w), w @ norm
    while step.any():
        inf, step = inf + step, step @ norm
    scores = norm * (inf + w)[:, None]
    positive = scores[scores > 0]
    kept = scores[p.edge_mask.numpy()]
    assert len(p.edge_shares) == len(kept)
    want = np.array([positive[positive > x].sum() / positive.sum() for x in kept])
    assert np.allclose(p.edge_shares.numpy(), want, rtol=1e-5, atol=1e-6)
    assert (p.edge_shares.numpy() < thresholds[1] + 1e-6).all()
    sources = np.arange(graph.n_nodes) >= graph.embedding_start
    assert (p.node_shares.numpy()[p.node_mask.numpy() & ~sources] < thresholds[0] + 1e-6).all()
