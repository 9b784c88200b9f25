"""The package's shape: no module imports another that (directly or not) imports it back, an
import inside a function included (the target layout of ../shared/design)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "proximal"


def imports() -> dict[str, set[str]]:
    """Each proximal module -> the proximal modules it imports anywhere in its source."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proximal"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("proximal"))
        graph[name] = found
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = imports()
    state: dict[str, str] = {}  # "open" while on the path being walked, "done" after

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target in graph and target not in state:
                walk(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert "proximal.lm.ppo" in graph["proximal.lm.pipeline"]  # the graph is the package's, not empty


def test_no_module_is_longer_than_about_400_lines_unless_its_opening_says_why():
    """One job a module: a long one is split by job (lm/model.py into loading.py and model.py,
    cli.py into flags.py, commands.py and lm/commands.py), or its docstring says why it is not."""
    import ast

    long = {}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > 420 and "Longer than the ~400 lines" not in (ast.get_docstring(ast.parse(text)) or ""):
            long[str(path.relative_to(PACKAGE.parent))] = lines
    assert long == {}
