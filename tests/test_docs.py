"""
The documentation: every flag that a script's --help lists appears, as code, on that script's page in docs/, and
every relative link of README.md and docs/*.md resolves (to a file, and for an #anchor into Markdown to one of
its headings, by GitHub's rule).
"""
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import run_python

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# every script and the page that documents its flags
PAGES = {
    "a_generate_gelu_graph.py": "stage-a.md",
    "b_generate_activation_dataset.py": "stage-b.md",
    "b_trace_gelu_activations.py": "stage-b.md",
    "c_calculate_weighted_activation_graph.py": "stage-c.md",
    "c_analyze_weighted_activation_graph.py": "stage-c.md",
    "c_merge_activation_statistics.py": "stage-c.md",
    "c_measure_edge_fidelity.py": "stage-c.md",
    "c_find_modules.py": "stage-c.md",
    "d_calculate_perturbation_subset.py": "stage-d.md",
    "d_batch_perturbation_calculate.sh": "stage-d.md",
    "d_calculate_neuron_effects.py": "stage-d.md",
    "e_generate_perturbed_results.py": "stage-e.md",
    "e_batch_generate_perturbed_results.sh": "stage-e.md",
    "f_render_neuron_cards.py": "stage-f.md",
    "run_pipeline.sh": "pipeline.md",
}

FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def helps():
    """Each script's --help: {script: (exit status, stdout; a shell script's stderr too)}, through
    conftest.run_python: a Python script's main and the command a driver script execs run in this process (torch
    imported once), any other shell script as a subprocess."""
    env = dict(os.environ, COLUMNS="120", PYTHON=sys.executable)  # PYTHON: the shell scripts' interpreter
    out = {}
    for script in PAGES:
        shell = script.endswith(".sh")
        r = run_python([*([] if shell else [sys.executable]), str(ROOT / script), "--help"], cwd=ROOT, env=env,
                       timeout=60)
        out[script] = (r.returncode, r.stdout + r.stderr if shell else r.stdout)
    return out


def flags(text):
    return set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text)) - {"--help"}


def code_text(markdown):
    """The text of a page's fenced code blocks and inline code spans."""
    blocks = [m.group(0) for m in FENCE.finditer(markdown)]
    return "\n".join(blocks + INLINE_CODE.findall(FENCE.sub("", markdown)))


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' removed, each space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown):
    seen, out = {}, set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", markdown), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_follows_githubs_rule():
    assert slug("c — causal edge weights: `--direct_edges`") == "c--causal-edge-weights---direct_edges"
    assert slug("Where this differs from the original pipeline") == "where-this-differs-from-the-original-pipeline"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


@pytest.mark.parametrize("script", sorted(PAGES))
def test_every_flag_of_a_script_is_on_its_page(helps, script):
    status, text = helps[script]
    assert status == 0, f"{script} --help exited with {status}"
    listed = flags(text)
    assert listed, f"no flag found in {script} --help"
    page = DOCS / PAGES[script]
    code = code_text(page.read_text(encoding="utf-8"))
    missing = sorted(f for f in listed if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", code))
    assert not missing, f"{script}: flags its --help lists that docs/{PAGES[script]} does not show as code: {missing}"


def markdown_files():
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    text = md.read_text(encoding="utf-8")
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{md.relative_to(ROOT)}: {broken}"


def test_index_lists_every_page_and_readme_links_the_index():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = {t.partition("#")[0] for t in LINK.findall(index)}
    assert {p.name for p in DOCS.glob("*.md")} - {"index.md"} <= linked
    assert "docs/index.md" in LINK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert set(PAGES.values()) <= {p.name for p in DOCS.glob("*.md")}
