"""
examples/quickstart.ipynb runs headlessly end to end (nbclient, the test's own interpreter as its kernel), and
its outputs are what it claims: the figures inline, the four methods' ablation table, the cards, the modules'
verdict; and the API's figures equal the stage scripts' files (gelutrace.api returns what they write).
"""

import json

import pytest

from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_and_shows_its_results(tmp_path, shipped_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # shipped without outputs
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 3  # frequency per layer, the ablation effects, the modules
    text = json.dumps([o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in outputs])
    for method in ("attribution", "activation_count", "degree", "random"):
        assert method in text
    assert "Neuron cards of tinybard" in json.dumps([o.get("data", {}).get("text/markdown", "") for o in outputs])
    assert "modules" in text and "Q = " in text
    assert "the analysis sees the edit: True" in text  # a transformers object, edited in memory
    assert "'memory': true" in text.lower() and "networkx: " in text
