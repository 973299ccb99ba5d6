"""The package's layout: every module imports alone, no import cycle anywhere in src/,
the data sources' layering, and no function in src/ longer than LIMIT lines."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

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


# A fresh interpreter loads the libraries once, then forks a child per module: each
# child imports its module first, with none of the project loaded, and no registry
# (OmegaConf resolvers, Hydra's ConfigStore) holds an earlier import's state. The
# libraries loaded first are the ones src/ names in its imports (argv before "--"), so
# that a child pays for the project's own code alone; a module still needs its own
# import of each name it uses (a library loaded here is not in its namespace).
IMPORT_EACH = """
import importlib, os, sys, traceback
split = sys.argv.index("--")
for name in sys.argv[1:split]:
    importlib.import_module(name)
failed = []
for name in sys.argv[split + 1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
print("FAILED", *failed)
"""


def libraries() -> list[str]:
    """The modules outside the project and the standard library that src/ imports."""
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module)
    own = ("resnet_exp", "hydra_plugins")
    return sorted(n for n in names if n.split(".")[0] not in (*sys.stdlib_module_names, *own))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module")
def test_every_module_imports_alone() -> None:
    modules = src_modules()
    assert "resnet_exp.models.build" in modules and "resnet_exp.cli" in modules
    assert "torch" in libraries() and "hydra" in libraries()
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, *libraries(), "--", *modules],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "FAILED", done.stderr[-3000:]


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
