"""The package layout as a contract: no import cycle among hived's modules (imports inside
functions count), and the layer contracts of pyproject.toml ([tool.importlinter]) hold."""

import subprocess
import sys

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (pip install -e '.[test]')")


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    class Graph:  # the finder itself, on a made-up graph: a -> b -> c -> a, d alone
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges.get(m, set())

    assert cycles(Graph()) == [["a", "b", "c"]]


def test_no_import_cycle_in_hived():
    graph = grimp.build_graph("hived", include_external_packages=False)
    assert cycles(graph) == []


def test_layer_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter not installed: pip install -e '.[test]'")
    r = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                        "sys.argv[0] = 'lint-imports'; lint_imports_command()"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_every_import_of_a_hived_module_names_one_that_exists():
    """grimp ignores imports of modules that do not exist; a moved module left such an import
    behind once (hived/up.py imported hived.control.cli inside a function)."""
    import ast
    import importlib
    import importlib.util
    from pathlib import Path

    def exists(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    root = Path(__file__).resolve().parent.parent
    missing = []
    for path in sorted((root / "hived").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                missing += [f"{where}: {a.name}" for a in node.names
                            if a.name.split(".")[0] == "hived" and not exists(a.name)]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "hived":
                if not exists(node.module):
                    missing.append(f"{where}: {node.module}")
                    continue
                spec = importlib.util.find_spec(node.module)
                if spec.submodule_search_locations is not None:  # a package: names are submodules or attributes
                    package = importlib.import_module(node.module)
                    missing += [f"{where}: {node.module}.{a.name}" for a in node.names
                                if not hasattr(package, a.name) and not exists(f"{node.module}.{a.name}")]
    assert missing == []


def test_every_top_level_module_is_in_a_layer():
    """A module no layer names escapes the contract: each package and module of hived/ is placed."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    layers = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    listed = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    present = {f"hived.{p.stem}" for p in (root / "hived").iterdir()
               if (p.suffix == ".py" and (not p.name.startswith("_") or p.name == "__main__.py"))
               or (p.is_dir() and (p / "__init__.py").exists())}
    assert present - listed == set()
