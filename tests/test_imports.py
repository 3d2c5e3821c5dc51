"""The package's module-level imports form no cycle, and our own modules are imported at module level
(imports inside functions are for optional dependencies only)."""
import ast
from pathlib import Path

import tinygpt

ROOT = Path(tinygpt.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("tinygpt"):
        return []
    # `from . import x` may name a submodule
    return [f"{target}.{a.name}" if (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
            or (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).is_dir() else target for a in node.names]


def graph() -> tuple[dict, list]:
    edges, inner = {}, []
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module_name(path)
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                deps.update(_resolve(mod, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("tinygpt"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tinygpt")):
                        inner.append(f"{mod}.{fn.name}")
        edges[mod] = {d for d in deps if d != mod}
    # importing a.b.c first imports the packages a and a.b
    for mod in list(edges):
        for d in list(edges[mod]):
            parts = d.split(".")
            edges[mod].update(".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) != mod)
    return edges, inner


def find_cycles(edges: dict) -> list:
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d in edges and not state.get(d):
                visit(d)
        stack.pop()
        state[m] = 2
    for m in sorted(edges):
        if not state.get(m):
            visit(m)
    return cycles


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    edges, _ = graph()
    assert "tinygpt.stages.common" in edges["tinygpt.stages.sft"]     # the graph is really walked
    cycles = find_cycles(edges)
    assert not cycles, cycles[:3]


def test_our_modules_are_imported_at_module_level():
    _, inner = graph()
    assert not inner, inner
