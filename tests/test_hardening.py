"""Hostile inputs: each must give one `error:` line and exit status 2, run no foreign code, and write nothing."""

import os
import pickle
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest

from conftest import REPO_ROOT
from gelutrace import PipelineError
from gelutrace import coactivation as co


def script(name, *args, cwd=None):
    return subprocess.run([sys.executable, str(REPO_ROOT / name), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg"))


def one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]


class Pwn:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("argv", [
    ("c_analyze_weighted_activation_graph.py", "--input_path", "{evil}"),
    ("d_calculate_perturbation_subset.py", "--input_graph_path", "{evil}", "--threshold", "0.5", "--ratio", "0.1",
     "--output_path", "{out}"),
])
def test_malicious_gpickle_runs_no_code(tmp_path, argv):
    evil = tmp_path / "evil.gpickle"
    marker = tmp_path / "PWNED"
    evil.write_bytes(pickle.dumps(Pwn(marker)))
    with pytest.raises(PipelineError, match="refusing posix.system|refusing os.system"):
        co.load_gpickle(evil)
    args = [a.format(evil=evil, out=tmp_path / "s.npy") for a in argv[1:]]
    one_error_line(script(argv[0], *args, cwd=tmp_path))
    assert not marker.exists()
    assert not (tmp_path / "s.npy").exists()


def test_malicious_gpickle_in_batch_script(tmp_path):
    evil = tmp_path / "evil.gpickle"
    marker = tmp_path / "PWNED"
    evil.write_bytes(pickle.dumps(Pwn(marker)))
    r = subprocess.run([str(REPO_ROOT / "d_batch_perturbation_calculate.sh"), "--thresholds", "0.5", "--ratios", "0.1",
                        str(evil), str(tmp_path / "out")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode != 0 and not marker.exists()


def test_damaged_and_foreign_gpickles(tmp_path):
    g = nx.Graph(model="toy", num_samples=3)
    g.add_node(0, layer=0, dimension=0, activation_count=np.int64(2))
    g.add_node(1, layer=1, dimension=0, activation_count=1)
    g.add_edge(0, 1, co_activation_count=np.int64(1))
    for proto in (0, 2, pickle.HIGHEST_PROTOCOL):  # a graph as the original or stage c wrote it still loads
        (tmp_path / f"ok{proto}.gpickle").write_bytes(pickle.dumps(g, protocol=proto))
        back = co.load_gpickle(tmp_path / f"ok{proto}.gpickle")
        assert back.nodes[0]["activation_count"] == 2 and back.edges[0, 1]["co_activation_count"] == 1
    good = pickle.dumps(g)
    (tmp_path / "cut.gpickle").write_bytes(good[: len(good) // 2])
    (tmp_path / "set.gpickle").write_bytes(pickle.dumps({1, 2}))
    (tmp_path / "other.gpickle").write_bytes(pickle.dumps(nx.DiGraph()))
    for name in ("cut", "set", "other"):
        with pytest.raises(PipelineError):
            co.load_gpickle(tmp_path / f"{name}.gpickle")
