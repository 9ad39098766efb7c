"""No import cycle inside hcx_megatron/: every `import` / `from ... import` between its modules, at module level or
inside a function (a lazy import only hides a cycle from the interpreter, not from the reader), forms a graph that
must have no cycle."""

from __future__ import annotations

import ast
import os

PACKAGE = "hcx_megatron"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def module_files() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> the package modules it imports (`from pkg import name` counts as pkg.name when that is a module)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` where c is a name, not a module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_from_imports():
    graph = import_graph(module_files())
    assert "hcx_megatron.training.checkpoint" in graph["hcx_megatron.training.loop"]
    assert "hcx_megatron.model.builder" in graph["hcx_megatron.training.checkpoint"]
    assert len(graph) > 80


def test_no_import_cycle_in_the_package():
    found = cycles(import_graph(module_files()))
    assert not found, "import cycles in hcx_megatron/:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_config_parsing_does_not_read_the_launch_environment():
    """Flags -> config reads argv only: the world size is an input (the drivers pass the launcher's)."""
    graph = import_graph(module_files())
    for module in (m for m in graph if m.startswith("hcx_megatron.config")):
        assert not [t for t in graph[module] if t.startswith("hcx_megatron.distributed")], module
