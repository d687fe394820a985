"""Each room's import rule, read from the source, function-level imports included: runtime imports no other
room, stream only runtime and the shared `options`, convert never stream or lab, cluster no room at all,
and no module reaches itself through a cycle of imports.  (`test_boundaries.py` checks what importing the
device side actually loads.)  Each rule is shown to fail on a planted violation."""
import ast
from pathlib import Path

import pytest

import edge_cbn

ROOT = Path(edge_cbn.__file__).parent
FORBIDDEN = {  # room -> the top-level parts of edge_cbn it must not import
    "runtime": {"stream", "convert", "lab", "cluster", "cli", "options"},
    "stream": {"convert", "lab", "cluster", "cli"},
    "convert": {"stream", "lab"},
    "cluster": {"runtime", "stream", "convert", "lab"},
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def run_time_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:`, which never run (editors read them)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *run_time_nodes(child)])
            continue
        yield node
        yield from run_time_nodes(node)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its source}; `from pkg import name` counts as
    importing the submodule `pkg.name` when there is one, else `pkg`."""
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in run_time_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{prefix}.{alias.name}" for alias in node.names if f"{prefix}.{alias.name}" in paths]
                deps.update(subs if len(subs) == len(node.names) else [*subs, prefix])
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def room_violations(graph: dict[str, set[str]]) -> list[str]:
    """"m imports d" for every import a room's rule forbids (entry points, `__main__`, are the CLI's)."""
    found = []
    for module, deps in graph.items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in FORBIDDEN or parts[-1] == "__main__":
            continue
        found += [f"{module} imports {d}" for d in sorted(deps)
                  if len(d.split(".")) > 1 and d.split(".")[1] in FORBIDDEN[parts[1]]]
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_every_room_keeps_its_rule():
    graph = import_graph(ROOT)
    assert {"edge_cbn.runtime.noisy_model", "edge_cbn.convert.export", "edge_cbn.cluster.local",
            "edge_cbn.lab.bench.stream"} <= set(graph)
    assert not room_violations(graph), "\n".join(room_violations(graph))


def test_no_module_imports_itself_through_a_cycle():
    assert not import_cycles(import_graph(ROOT))


def planted_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A copy of the rooms' skeleton (empty modules) with `files` {relative path: source} planted."""
    root = tmp_path / "edge_cbn"
    for rel in ["__init__.py", "cli.py", "options.py", *(f"{room}/__init__.py" for room in
                                                         ("runtime", "stream", "convert", "lab", "cluster"))]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    for rel, source in files.items():
        (root / rel).write_text(source)
    return root


@pytest.mark.parametrize("room, source, target", [
    ("runtime", "from ..stream import engine", "edge_cbn.stream.engine"),
    ("stream", "def later():\n    from ..convert import export\n", "edge_cbn.convert.export"),  # in a function
    ("convert", "import edge_cbn.lab", "edge_cbn.lab"),
    ("cluster", "from .. import runtime", "edge_cbn.runtime"),
])
def test_a_planted_violation_of_each_rule_is_caught(tmp_path, room, source, target):
    root = planted_package(tmp_path, {f"{room}/probe.py": source, "stream/engine.py": "", "convert/export.py": ""})
    assert room_violations(import_graph(root)) == [f"edge_cbn.{room}.probe imports {target}"]


def test_a_planted_cycle_is_caught(tmp_path):
    root = planted_package(tmp_path, {"lab/a.py": "from . import b\n",
                                      "lab/b.py": "def later():\n    from .a import x\n"})
    assert import_cycles(import_graph(root)) == [["edge_cbn.lab.a", "edge_cbn.lab.b"]]


def unexplained_lazy_imports(root: Path) -> list[str]:
    """"path:line" of every import inside a function without a `# lazy: why` comment on its line or the
    line above: a function-level import stays only to keep a heavy optional dependency (TensorFlow, Ray,
    torch, matplotlib, ...) off a path that does not need it, and says so."""
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
                    if "# lazy" not in here:
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return sorted(set(found))


def test_every_function_level_import_says_why_it_is_lazy(tmp_path):
    assert not unexplained_lazy_imports(ROOT)
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text("def f():\n    import json\n    # lazy: TensorFlow only here\n"
                                  "    import tensorflow\n    return json, tensorflow\n")
    assert unexplained_lazy_imports(package) == ["pkg/m.py:2"]


def long_functions(root: Path, limit: int = 60) -> list[str]:
    """"path:line name (N lines)" of every function longer than `limit` lines (decorators aside)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= limit:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} "
                             f"({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_no_function_is_longer_than_sixty_lines(tmp_path):
    assert not long_functions(ROOT)
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text("def f():\n" + "    x = 1\n" * 60 + "    return x\n")
    assert long_functions(package) == ["pkg/m.py:1 f (62 lines)"]
