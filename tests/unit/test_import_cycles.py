"""No import cycles among Ferry's modules, and each gateway module imports on its own.

A cycle works at run time only in some import orders (or only because one side imports
under TYPE_CHECKING), and it ties modules that should be separable: the gateway's front
ends once imported main.py, which builds them. The check reads every `import` statement
(inside functions and TYPE_CHECKING blocks too) of the source folders, as modules of the
installed namespace.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"common": "ferry.common", "services": "ferry.services", "kernels": "ferry.kernels",
            "bench": "ferry.bench", "ferry": "ferry"}  # root folder -> installed name


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the source folders."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `modules` it imports anywhere in its source."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # `from pkg import module` or `from module import x`
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = (deps & modules.keys()) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_itself_back():
    modules = module_files()
    assert "ferry.services.gateway.main" in modules
    assert cycles(import_graph(modules)) == []


def test_each_gateway_module_imports_alone():
    """In a fresh interpreter each (one at a time, in parallel): no module works only
    when another was imported first."""
    names = sorted(n for n in module_files() if n.startswith("ferry.services.gateway.")
                   and not n.endswith(".__main__"))  # (that one runs a gateway)
    procs = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"], cwd=ROOT,
                                    stderr=subprocess.PIPE, text=True) for name in names}
    try:
        errors = {name: proc.communicate(timeout=120)[1] for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    assert {name: errors[name][-500:] for name, proc in procs.items() if proc.returncode} == {}
