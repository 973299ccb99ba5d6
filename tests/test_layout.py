"""The package's layout: every module imports alone, no import cycle anywhere in src/,
the data sources' layering, and no function in src/ longer than LIMIT lines."""

from __future__ import annotations

import ast

from conftest import REPO, fork_server, src_libraries

SRC = REPO / "src"
DATA = SRC / "resnet_exp" / "data"
LIMIT = 80  # lines: past that, a function is doing two jobs


def src_modules() -> list[str]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__main__":  # runs the program when imported
            continue
        if parts[-1] == "__init__":
            parts.pop()
        out.append(".".join(parts))
    return out


def test_every_module_imports_alone() -> None:
    """Each module imported first, in a fresh process with none of the project loaded (a
    child of conftest's fork server: no registry, OmegaConf's resolvers or Hydra's
    ConfigStore, holds an earlier import's state). The server loaded the libraries src/
    imports; a module still needs its own import of each name it uses."""
    modules = src_modules()
    assert "resnet_exp.models.build" in modules and "resnet_exp.cli" in modules
    assert {"torch", "hydra"} <= set(src_libraries())
    assert fork_server().imports_alone(modules) == {}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function (a
    deferred import ties two modules as much as a top-level one); ``from package
    import name`` counts as the submodule where ``name`` is one."""
    mods = set(src_modules())
    graph: dict[str, set[str]] = {}
    for mod in mods:
        path = SRC / (mod.replace(".", "/") + ".py")
        if not path.exists():
            path = SRC / mod.replace(".", "/") / "__init__.py"
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle_in_src() -> None:
    graph = import_graph()
    assert graph["resnet_exp.models.build"] >= {
        "resnet_exp.models.cifar",
        "resnet_exp.models.imagenet",
    }
    assert cycles(graph) == []


def test_the_two_data_paths_import_neither_the_other() -> None:
    """data/sources.py (images in memory) and data/imagenet.py (streamed from files)."""
    graph = import_graph()
    assert "resnet_exp.data.imagenet" not in graph["resnet_exp.data.sources"]
    assert "resnet_exp.data.sources" not in graph["resnet_exp.data.imagenet"]


def test_no_split_type_is_tested_outside_data() -> None:
    """Which data path a run takes is the data source's business, not its callers'."""
    for path in SRC.rglob("*.py"):
        if DATA in path.parents:
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                names = ast.unparse(node.args[1])
                assert "Split" not in names, f"{path.relative_to(REPO)}:{node.lineno}: {names}"
        assert 'getattr(self.s.loader, "report"' not in text


def test_no_function_is_over_the_limit() -> None:
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > LIMIT:
                    long.append(
                        f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines"
                    )
    assert not long, "\n".join(long)
