"""The package's shape, read from its source with `ast` (every import, those inside functions included):

- no import cycles between modules;
- dependencies point one way: the root modules < sampling, wrappers < io < evaluation < training < cli;
- a sampler module imports sampling.core only, never another algorithm module;
- nothing imports a private name (`from x import _y`, or `x._y` on a module of ours);
- each shared formula is written once: x0 from eps, lambda, x_t from x0 and eps (diffusion/schedule.py).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "diffusion"
LAYERS = {"": 0, "sampling": 1, "wrappers": 1, "io": 2, "evaluation": 3, "training": 4, "cli": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, list[str]]]:
    """(module, names) that an import statement of `importer` reaches inside the package."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names if a.name.split(".")[0] == "diffusion"]
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    if target.split(".")[0] != "diffusion":
        return []
    found = []
    for alias in node.names:  # `from diffusion.io import checkpoints` reaches the module diffusion.io.checkpoints
        sub = f"{target}.{alias.name}"
        found.append((sub, []) if sub in MODULES else (target, [alias.name]))
    return found


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """module -> the package modules it imports; and every private name it imports or reads off a module of ours."""
    edges, private = defaultdict(set), []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = set()  # local names bound to modules of ours
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target, names in resolve(name, node):
                    edges[name].add(target)
                    private += [f"{name} imports {target}.{n}" for n in names if n.startswith("_")]
                    if not names:
                        bound = [a.asname or a.name for a in node.names]
                        aliases.update(b.split(".")[0] if isinstance(node, ast.Import) else b for b in bound)
        for node in ast.walk(tree):
            is_private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("__")
            if is_private and isinstance(node.value, ast.Name) and node.value.id in aliases:
                private.append(f"{name} reads {node.value.id}.{node.attr}")
    return edges, private


def layer(module: str) -> int:
    """The sub-package's layer (LAYERS); root modules (diffusion.schedule, ...) and the package itself: 0."""
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_there_is_no_import_cycle():
    edges, _ = graph()
    state, cycles = {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt == node or nxt not in MODULES:
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_dependencies_point_one_way():
    edges, _ = graph()
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, targets in edges.items() for b in targets if b in MODULES and layer(b) > layer(a)]  # fmt: skip
    assert not wrong, wrong


def test_a_sampler_imports_the_shared_core_only():
    edges, _ = graph()
    sampling = {m for m in MODULES if m.startswith("diffusion.sampling.")}
    wrong = [f"{a} imports {b}" for a in sampling for b in edges[a] if b in sampling and b != "diffusion.sampling.core"]
    assert not wrong, wrong


def test_nothing_imports_a_private_name():
    _, private = graph()
    assert not private, private


FORMULAS = {  # what each shared formula looks like when it is written out again
    "x0 from eps": r"\(\s*x\w*\s*-\s*\(?1 - abar\w*\)?\s*\*\*\s*0\.5\s*\*\s*eps\w*\s*\)\s*/",
    "lambda": r"log1p\(\s*-\s*abar|log\(\s*abar\w*\s*/\s*\(1 - abar",
    "x_t from x0 and eps": r"abar\w*\s*\*\*\s*0\.5\s*\*\s*x0\w*\s*\+\s*\(1 - abar\w*\)\s*\*\*\s*0\.5\s*\*",
}


@pytest.mark.parametrize("formula", FORMULAS)
def test_each_shared_formula_is_written_once(formula):
    pattern = re.compile(FORMULAS[formula])
    places = [name for name, path in MODULES.items() if pattern.search(path.read_text())]
    assert places == ["diffusion.schedule"], places
