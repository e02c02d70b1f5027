"""
The package's layering, read from its source with `ast`: each sub-package imports only from those below it
(model < files < graph < record < circuit < selection < evaluate < report < the top: api, cli, commands, pipeline and the
`python -m` entry points), nothing imports in a cycle, and an import inside a function says why on its line.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gelutrace"
LAYERS = ("model", "files", "graph", "record", "circuit", "selection", "evaluate", "report")
TOP = len(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """-1 for the package root (PipelineError), the sub-package's index, TOP for the modules above them all."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    if parts[-1] == "__main__" or parts[1] not in LAYERS:
        return TOP
    return LAYERS.index(parts[1])


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST, here: str, known: set[str]) -> list[str]:
    """The package modules an import statement names (`from gelutrace.x import y` names gelutrace.x.y when
    that is a module, else gelutrace.x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "gelutrace"]
    if node.level:
        base = here.split(".")[: -node.level] if here in known else here.split(".")
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != "gelutrace":
        return []
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]


def import_edges():
    """(importer, imported, line, inside a function, the line's text) for every import of a module of the package
    but the root's: `gelutrace.__getattr__` loads the API on first use, the one import that goes up on purpose."""
    known = set(modules())
    out = []
    for name, path in modules().items():
        if name == "gelutrace":
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        inside = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inside |= {id(n) for n in ast.walk(fn) if n is not fn}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                text = lines[node.lineno - 1]
                targets = imported(node, name, known) or [None]
                for target in targets:
                    out.append((name, target, node.lineno, id(node) in inside, text))
    return out


def test_every_module_has_a_layer():
    for name in modules():
        assert layer(name) >= -1, name
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} <= set(LAYERS) | {
        "shipped_models"}


def test_no_import_from_a_higher_layer():
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)}), line {line}"
           for a, b, line, _, _ in import_edges() if b is not None and layer(b) > layer(a)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {}
    for a, b, *_ in import_edges():
        if b is not None and b != a and b != "gelutrace":
            graph.setdefault(a, set()).add(b)
    state, stack, cycles = {}, [], []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    assert not cycles, "\n".join(cycles)


def test_an_import_inside_a_function_says_why():
    bad = sorted({f"{a}:{line}: {text.strip()}" for a, _, line, inside, text in import_edges()
                  if inside and "#" not in text})
    assert not bad, "imports inside functions without a reason on their line:\n" + "\n".join(bad)

