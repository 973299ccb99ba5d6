"""The package's layout (docs/design.md#the-layout): every module imports alone, no
import cycle anywhere in src/, each package imports only its own floor and those below,
only the top floor reads Hydra's state or asks the process group who it is, the data
sources' layering, and no function in src/ longer than LIMIT lines."""

from __future__ import annotations

import ast

from conftest import REPO, fork_server, src_libraries

SRC = REPO / "src"
DATA = SRC / "resnet_exp" / "data"
LIMIT = 60  # lines: past that, a function is doing two jobs
# The floors of docs/design.md, lowest first: a module imports from its own package and
# from lower floors only.
FLOORS = [
    ("resnet_exp.errors", "resnet_exp.version"),
    ("resnet_exp.models",),
    ("resnet_exp.config",),
    ("resnet_exp.data",),
    ("resnet_exp.run",),
    ("resnet_exp.train",),
    ("resnet_exp.modes",),
    ("resnet_exp.report",),
    ("resnet_exp.sweep",),
    ("resnet_exp.callbacks", "resnet_exp.cli", "resnet_exp.__main__", "resnet_exp"),
    ("hydra_plugins",),
]
# Who reads Hydra's global state and asks the process group who this process is: the
# command and its callbacks (and the plugins, which Hydra calls with that state).
TOP = ("resnet_exp.cli", "resnet_exp.callbacks", "hydra_plugins")


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


def floor(module: str) -> int:
    """The floor of a module: the one of the longest package name it starts with."""
    best, found = -1, -1
    for n, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), n
    assert found >= 0, f"{module} is on no floor of docs/design.md"
    return found


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_runs_back_up_a_floor() -> None:
    """What a lower floor imports of a higher one (or of another package on its own
    floor) would tie the layers into a knot that the module graph can still hide."""
    up = [
        f"{m} (floor {floor(m) + 1}) imports {d} (floor {floor(d) + 1})"
        for m, deps in import_graph().items()
        for d in deps
        if floor(d) > floor(m)
        or (floor(d) == floor(m) and package(d) != package(m) and floor(m) < 9)
    ]
    assert up == []
    assert floor("resnet_exp.train.loop") > floor("resnet_exp.run.checkpoint")


def test_only_the_top_floor_reads_hydras_state_or_asks_the_process_group() -> None:
    """Below the command a run's context is handed down (train/context.py), never read
    again from Hydra's HydraConfig or from torch.distributed's world."""
    readers = []
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        if module.startswith(TOP) or module == "resnet_exp.run.distributed":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
            if name == "HydraConfig" or (
                isinstance(node, ast.Attribute) and ast.unparse(node) == "distributed.current"
            ):
                readers.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert readers == []


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
