"""The import structure of tilegrad: no import circle, and imports only go down the layers of ARCHITECTURE.md.

The graph is read from the source with ``ast``, so it counts every import: at module level, inside functions and
under ``if TYPE_CHECKING``, and ``importlib.import_module("tilegrad....")`` with a literal name. An import inside a
function hides a circle from Python (nothing fails at import time) but not from this test.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import tilegrad

SRC = Path(tilegrad.__file__).resolve().parent
ARCHITECTURE = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"

# Top to bottom. A module may import modules of its own layer and of the layers below, never above. Groups joined
# by "|" in one layer are independent of each other: neither imports the other. A module belongs to the layer of the
# longest prefix that names it ("tilegrad" alone is the package's __init__, the public API). ARCHITECTURE.md shows
# the same table (checked below).
LAYERS: list[tuple[str, list[list[str]]]] = [
    ("interface", [["tilegrad.cli", "tilegrad.__main__", "tilegrad.commands"]]),
    ("api", [["tilegrad"]]),
    ("training", [["tilegrad.train"]]),
    ("execution", [["tilegrad.stream", "tilegrad.infer", "tilegrad.execute", "tilegrad.monai"]]),
    ("planning", [["tilegrad.plan"]]),
    ("memory", [["tilegrad.memory"]]),
    ("models", [["tilegrad.models"]]),
    (
        "blocks",
        [
            [
                "tilegrad.tiling",
                "tilegrad.segment",
                "tilegrad.statistics",
                "tilegrad.graph",
                "tilegrad.split",
                "tilegrad.heads",
                "tilegrad.reversible",
                "tilegrad.checkpointing",
            ]
        ],
    ),
    ("leaves", [["tilegrad.geometry"], ["tilegrad.io"], ["tilegrad.boundary"]]),
    (
        "base",
        [
            [
                "tilegrad.errors",
                "tilegrad.typing",
                "tilegrad.units",
                "tilegrad.options",
                "tilegrad.dtypes",
                "tilegrad.optim",
                "tilegrad._atomic",
                "tilegrad._lock",
                "tilegrad._autocast",
                "tilegrad._allocator",
            ]
        ],
    ),
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package __init__)."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ["tilegrad", *path.relative_to(SRC).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _import_graph() -> dict[str, set[str]]:
    """module -> the tilegrad modules it imports anywhere in its file."""
    modules = _modules()

    def target(name: str) -> str | None:
        while name and name not in modules:  # `import tilegrad.io.tiff.TiffWriter`-style tails
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        imported: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(target(a.name) for a in node.names if a.name.split(".")[0] == "tilegrad")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                if source.split(".")[0] != "tilegrad":
                    continue
                for alias in node.names:  # `from . import rules` imports the module tilegrad.geometry.rules
                    sub = f"{source}.{alias.name}"
                    imported.add(sub if sub in modules else target(source))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).split(".")[0] == "tilegrad"
            ):
                imported.add(target(node.args[0].value))
        graph[name] = {m for m in imported if m is not None and m != name}
    return graph


def _layer(module: str) -> tuple[int, int]:
    """(layer index from the top, group index) of a module: its longest matching prefix."""
    best: tuple[int, int, int] | None = None
    for i, (_, groups) in enumerate(LAYERS):
        for g, prefixes in enumerate(groups):
            for prefix in prefixes:
                named = module == prefix or (prefix != "tilegrad" and module.startswith(prefix + "."))
                if named and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), i, g)
    if best is None:
        raise KeyError(module)
    return best[1], best[2]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def _path(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """The shortest circle through ``start`` inside a strongly connected component, for the failure message."""
    queue, parent = [start], {start: ""}
    while queue:
        v = queue.pop(0)
        if start in graph[v]:
            path = [v]
            while parent[path[-1]]:
                path.append(parent[path[-1]])
            return [*reversed(path), start]
        for w in sorted(graph[v] & members):
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return [start]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _import_graph()


def test_the_graph_sees_imports_inside_functions(graph):
    # plan.py imports the memory estimator inside plan_streaming: the test must see it, or it would miss circles
    assert "tilegrad.memory.estimate" in graph["tilegrad.plan"]
    # and relative imports of submodules resolve to them
    assert "tilegrad.geometry.rules" in graph["tilegrad.geometry"]


def test_no_import_circle(graph):
    circles = [" -> ".join(_path(graph, c[0], set(c))) for c in _cycles(graph)]
    assert not circles, "import circles (counting imports inside functions):\n" + "\n".join(circles)


def test_every_module_has_a_layer(graph):
    missing = []
    for module in graph:
        try:
            _layer(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"modules without a layer (add them to LAYERS and ARCHITECTURE.md): {missing}"


def test_imports_only_go_down_the_layers(graph):
    wrong = []
    for module, imported in sorted(graph.items()):
        layer, group = _layer(module)
        for other in sorted(imported):
            other_layer, other_group = _layer(other)
            if other_layer < layer:
                wrong.append(
                    f"{module} ({LAYERS[layer][0]}) imports {other} ({LAYERS[other_layer][0]}, above)"
                )
            elif other_layer == layer and other_group != group:
                wrong.append(f"{module} imports {other}: independent groups of layer {LAYERS[layer][0]}")
    assert not wrong, "\n".join(wrong)


def test_memory_sits_below_plan_and_stream(graph):
    # the issue that started this test: memory/estimate.py imported stream.py, which imports plan.py, which imports
    # memory/estimate.py; the estimator finds StreamingModules through tilegrad.typing.PlanningModule instead
    memory = [m for m in graph if m == "tilegrad.memory" or m.startswith("tilegrad.memory.")]
    for module in memory:
        assert not graph[module] & {"tilegrad", "tilegrad.stream", "tilegrad.plan", "tilegrad.infer"}, module


def test_architecture_md_shows_the_same_layers():
    block = re.search(r"```text\n# layers.*?\n(.*?)```", ARCHITECTURE.read_text(), flags=re.DOTALL)
    assert block, "ARCHITECTURE.md has a ```text block starting with '# layers'"
    shown = [line.split() for line in block.group(1).strip().splitlines()]
    expected = [[f"{name}:", *" | ".join(" ".join(g) for g in groups).split()] for name, groups in LAYERS]
    assert shown == expected


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_members() -> dict[str, set[str]]:
    """Private members of tilegrad's classes (methods, ``self._x = ...``, class-level names) -> defining modules."""
    found: dict[str, set[str]] = {}
    for name, (path, _) in _modules().items():
        for cls in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(cls, ast.ClassDef):
                continue
            for node in ast.walk(cls):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name):
                    found.setdefault(node.name, set()).add(name)
                elif (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.ctx, ast.Store)
                    and _private(node.attr)
                ):
                    found.setdefault(node.attr, set()).add(name)
                elif (
                    isinstance(node, ast.AnnAssign)
                    and isinstance(node.target, ast.Name)
                    and _private(node.target.id)
                ):
                    found.setdefault(node.target.id, set()).add(name)
    return found


def test_no_module_uses_another_modules_private_names():
    # a name with a leading underscore is its module's own: another module that needs it gets a public name for it
    # in the module that owns it (plan.py once imported memory/kernels.py's _backend and _channel_block, execute.py
    # called graph.py's Segment._native)
    members = _private_members()
    wrong = []
    for name, (path, is_package) in sorted(_modules().items()):
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                source = (
                    ".".join(p for p in (base, node.module or "") if p) if node.level else node.module or ""
                )
                if source == "tilegrad" or source.startswith("tilegrad."):
                    wrong += [f"{name}:{node.lineno} imports {a.name} from {source}" for a in node.names
                              if _private(a.name)]  # fmt: skip
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _private(node.attr):
                owners = members.get(node.attr, set())
                self_like = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if owners and name not in owners and not self_like:
                    wrong.append(f"{name}:{node.lineno} uses {ast.unparse(node)} ({sorted(owners)}'s own)")
    assert not wrong, "\n".join(wrong)
