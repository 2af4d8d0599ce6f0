"""The package's import graph: no cycles (between modules or between top-level packages) and
every import pointing down the layers of DESIGN.md. Imports inside functions count too.

    utils -> config -> model -> data, distributed -> parallel -> artifacts -> interop, plan
          -> train, inference -> tasks -> serve, api -> cli
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "meshlm"

# Bottom to top; a module may import from its own layer's other packages only where no cycle
# results, and from any lower layer.
LAYERS = [
    {"utils"},
    {"config"},
    {"model"},
    {"data", "distributed"},
    {"parallel"},
    {"artifacts"},
    {"interop", "plan"},
    {"train", "inference"},
    {"tasks"},
    {"serve", "api"},
    {"cli", "__main__", "__init__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
# The one place allowed to import meshlm modules by name at run time (it loads model families).
DYNAMIC_IMPORT_ALLOWED = {"meshlm.model.registry"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _package(module: str) -> str:
    """The top-level package (or module) of meshlm a module belongs to: "train", "config", ..."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the meshlm modules it imports (anywhere in its body)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import submodule` imports the submodule; `from pkg import name` the package.
                subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [source, *subs]
            for target in targets:
                if not target.startswith("meshlm"):
                    continue
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    edges[name].add(target)
    return edges


def _cycles(nodes, edges) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer():
    unknown = {_package(m) for m in _modules()} - set(LEVEL)
    assert not unknown, f"add these to LAYERS (and DESIGN.md): {sorted(unknown)}"


def test_no_import_cycle_between_modules():
    modules = _modules()
    assert _cycles(modules, _imports(modules)) == []


def test_no_import_cycle_between_packages():
    modules = _modules()
    package_edges: dict[str, set[str]] = defaultdict(set)
    for a, targets in _imports(modules).items():
        for b in targets:
            if _package(a) != _package(b):
                package_edges[_package(a)].add(_package(b))
    assert _cycles({_package(m) for m in modules}, package_edges) == []


def test_imports_point_down_the_layers():
    modules = _modules()
    upward = [
        f"{a} imports {b}"
        for a, targets in sorted(_imports(modules).items())
        for b in sorted(targets)
        if LEVEL[_package(b)] > LEVEL[_package(a)]
    ]
    assert upward == []


def test_no_dynamic_imports_outside_the_family_registry():
    offenders = []
    for name, path in _modules().items():
        if name in DYNAMIC_IMPORT_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ("import_module", "__import__"):
                    offenders.append(name)
    assert offenders == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """A guard against a checker that passes by seeing nothing."""
    edges = _imports(_modules())
    assert "meshlm.parallel.tensor_parallel" in edges["meshlm.parallel.parallelize"]  # imported inside a function
    assert _cycles(["a", "b", "c"], {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
