"""
`pip install .` (a wheel built from a copy of the checkout, installed into a folder of its own) gives the package,
model.py, the stage scripts as modules, the shipped model and the `gelutrace` command, and they work from a
directory outside any checkout.
"""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_pip_install_gives_the_api_the_command_and_the_shipped_model(tmp_path, shipped_path):
    src = tmp_path / "src"
    keep = ["pyproject.toml", "README.md", "model.py", "gelutrace", "models",
            *(p.name for p in REPO_ROOT.glob("[a-f]_*.py"))]
    src.mkdir()
    for name in keep:
        (shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy2)(
            REPO_ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                             if (REPO_ROOT / name).is_dir() else {}))
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (target / "gelutrace" / "shipped_models" / "tinybard" / "model.safetensors").is_file()
    assert (target / "model.py").is_file() and (target / "e_generate_perturbed_results.py").is_file()
    vendor = target / "gelutrace" / "report" / "vendor"
    assert all((vendor / n).is_file() for n in ("d3.min.js", "d3.LICENSE", "d3.json"))
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1")
    code = ("import gelutrace as gt; lm = gt.load_model('tinybard', 'cpu'); "
            "import gelutrace as G; print(lm.path.relative_to(G.__file__.rsplit('/', 1)[0]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=away, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "shipped_models/tinybard", r.stderr[-2000:]
    cmd = target / "bin" / "gelutrace"
    r = subprocess.run([sys.executable, str(cmd), "a", "--model_type", "tinybard", "--output_dir", "out"], cwd=away,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (away / "out" / "tinybard_graph_meta.json").is_file()
    code = ("from gelutrace.report import viewer; "  # the viewer's script and d3 from the installed copy
            "page = viewer.page_html({'title': 't'}); print(viewer.d3_version() in page, viewer.HERE)")
    r = subprocess.run([sys.executable, "-c", code], cwd=away, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["True", str(target / "gelutrace" / "report")], r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(cmd), "nope"], cwd=away, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:")
    r = subprocess.run([sys.executable, str(cmd), "d", "--k", "5"], cwd=away, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr.strip().splitlines()[-1]  # the stage's own check
