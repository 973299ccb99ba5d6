"""The README is the front door and docs/ holds the topics: every relative link
between them resolves, to a file that exists and, with ``#anchor``, to one of its
headings (GitHub's anchors); the README stays short and names the test command; and
every command and Python block they show runs (below: how each is adapted)."""

import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from resnet_exp.modes import export as export_command

from conftest import TINY, run_main

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``# comment`` in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (letters,
    digits, ``_``, ``-`` and spaces kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in ``path``; a repeated heading gets ``-1``, ``-2``... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """``path``'s relative links whose file is missing or whose anchor is no heading there."""
    bad = []
    for line in prose_lines(path.read_text()):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{target}: no file {dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "topic.md").write_text("# A topic\n\n## The paper's tables: 3–4\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "# Front\n\n## Stopping and resuming\n\n"
        "[ok](topic.md#the-papers-tables-34) [ok](#stopping-and-resuming) [web](https://x.org/a#b)\n"
        "[gone](missing.md) [no anchor](topic.md#tables) ![img](gone.png)\n"
        "```bash\n# Not a heading\n[in code](nowhere.md)\n```\n"
        "[not here](#not-a-heading) `[code](nowhere.md)`\n"
    )
    bad = broken_links(doc)
    assert [b.split(":")[0] for b in bad] == [
        "missing.md",
        "topic.md#tables",
        "gone.png",
        "#not-a-heading",
    ]


def test_readme_is_the_short_front_door() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 350, "README.md is the front door: move long topics to docs/"
    assert "make test" in readme and "make run" in readme
    linked = set(LINK.findall(readme))
    topics = sorted(p for p in (REPO / "docs").glob("*.md"))
    assert topics, "docs/ holds the topics"
    for p in topics:  # every topic file is reachable from the front door
        assert f"docs/{p.name}" in linked, f"README.md does not link docs/{p.name}"


# --- every documented command and Python block runs ---------------------------------
#
# Each fenced bash block's `resnet-exp` command (also as `make run ARGS="..."`, after
# `torchrun ... -m resnet_exp`, and `resnet-exp-report`) runs in this process
# (conftest.run_main), adapted to be cheap, in a scratch directory that holds tiny
# runs at the paths the docs name (outputs/<date>/<time>_<block>_<depth>, a sweep
# at outputs/multirun/...):
# - training commands get dry_run=true (each job is built, its summary printed, nothing
#   trained), on the CPU, with synthetic images (dataset=synthetic, 16x16, enough for
#   data.val_size=5000) or, where the command names data.root, a generated CIFAR-style
#   folder (train/ + test/ class folders; ImageNet-style train/ + val/ for streamed data);
# - a command that resumes or evaluates a run keeps that run's own data (inherited from
#   its checkpoint); mode=eval runs for real on the tiny run;
# - a launcher that needs a cluster, GPUs or other processes (slurm, slurm_ddp, gpus,
#   local) is composed with its keys (hydra.launcher.*), then the sweep's jobs run
#   under the basic launcher; the packed launcher and the search sweeper run as written;
# - torchrun lines run their resnet_exp arguments as one process;
# - a run that starts from a documented run's weights (init_from.path=) builds that
#   tiny run's net (depth=8).
# Python blocks of one file run in order in one namespace, as in a notebook, in the
# same scratch directory.

SHELL_BLOCKS = {"bash", "shell", "sh"}
PLACEHOLDER_ROOTS = ("/path/to/", "DIR", "/data/", "../shared/")
OTHER_LAUNCHERS = ("gpus", "slurm", "slurm_ddp", "local")
STREAMED = ("dataset=imagenet", "+experiment=imagenet", "+experiment=table5")
# Sweeps of several jobs (a search's dry run builds one) and 1001-layer or ImageNet
# nets take seconds each: the slow suite's.
SLOW_WHEN = ("+experiment=", "depth=1001", "depth=200", "depth=152", "dataset=imagenet")


@dataclass
class Block:
    lang: str
    where: str  # file:line of the opening fence
    text: str


def blocks(path: Path) -> list[Block]:
    out, lang, start, body = [], None, 0, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if m and lang is None:
            lang, start, body = line.strip().strip("`~").strip() or "text", n, []
        elif m:
            out.append(Block(lang, f"{path.relative_to(REPO)}:{start}", "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


@dataclass
class Command:
    where: str
    program: str  # resnet-exp or resnet-exp-report
    args: list[str]

    def __str__(self) -> str:
        return f"{self.where}: {self.program} {' '.join(self.args)}"


def command_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """The resnet-exp (or -report) command a shell line runs, if any."""
    if not tokens:
        return None
    if tokens[0] in ("resnet-exp", "resnet-exp-report"):
        return tokens[0], tokens[1:]
    if tokens[:2] == ["make", "run"]:  # make run ARGS="...": resnet-exp $(ARGS)
        args = [t.split("=", 1)[1] for t in tokens[2:] if t.startswith("ARGS=")]
        return "resnet-exp", shlex.split(args[0]) if args else []
    if tokens[0] == "torchrun":
        for i in range(len(tokens) - 1):
            if tokens[i : i + 2] in (["-m", "resnet_exp"], ["--no-python", "resnet-exp"]):
                return "resnet-exp", [t for t in tokens[i + 2 :] if t != "..."]
    return None


def commands(path: Path) -> list[Command]:
    out = []
    for block in blocks(path):
        if block.lang not in SHELL_BLOCKS:
            continue
        for line in block.text.replace("\\\n", " ").splitlines():
            found = command_of(shlex.split(line, comments=True))
            if found:
                out.append(Command(block.where, *found))
    return out


def unique(found: list[Command]) -> list[Command]:
    """A command repeated across files (README and a topic) runs once, named by both."""
    seen: dict[tuple[str, ...], Command] = {}
    for c in found:
        key = (c.program, *c.args)
        if key in seen:
            seen[key].where += f", {c.where}"
        else:
            seen[key] = c
    return list(seen.values())


COMMANDS = unique([c for p in DOCS for c in commands(p)])
PYTHON = [(p, [b for b in blocks(p) if b.lang == "python"]) for p in DOCS]
PYTHON = [
    pytest.param(
        p,
        bs,
        id=str(p.relative_to(REPO)),
        # a 1001-layer or ImageNet net takes seconds to build
        marks=[pytest.mark.slow]
        if re.search(r"1001|imagenet", "".join(b.text for b in bs))
        else [],
    )
    for p, bs in PYTHON
    if bs
]
RUN_PATHS = sorted(
    {
        m
        for b in (b for p in DOCS for b in blocks(p))
        for m in re.findall(r"outputs/(?:multirun/)?\d{4}-\d\d-\d\d/[\w/-]+", b.text)
    }
)


def is_slow(c: Command) -> bool:
    sweep = "-m" in c.args and "hydra/sweeper=search" not in c.args
    return sweep or any(s in a for a in c.args for s in SLOW_WHEN)


def write_images(folder: Path, classes: int, per_class: int, size: int, ext: str) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i}.{ext}")


def imagenet_folder(root: Path) -> Path:
    """ImageNet-style train/ + val/ class folders of JPEGs, enough for a batch of 1024."""
    folder = root / "imagenet"
    if not folder.exists():
        write_images(folder / "train", 2, 520, 32, "jpg")
        write_images(folder / "val", 2, 2, 32, "jpg")
    return folder


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory with tiny runs where the docs name runs, a sweep where they
    name one, and a small CIFAR-style folder."""
    root = tmp_path_factory.mktemp("docs")
    write_images(root / "cifar" / "test", 10, 1, 32, "png")
    write_images(root / "cifar" / "train", 10, 13, 32, "png")  # a batch of 128
    run = root / "tiny-run"
    run_main([*TINY, "trainer.max_steps=4", f"hydra.run.dir={run}"], root)
    for rel in RUN_PATHS:
        dest = root / rel
        if rel.startswith("outputs/multirun/"):  # a sweep directory: one job in it
            dest = dest / "0_preact_8"
        if "*" not in rel and not dest.exists():
            shutil.copytree(run, dest)
    export_command.main([str(run), "--out", str(run / "export")])
    for rel in RUN_PATHS:  # each documented run's export where sharing.md names it
        dest = root / rel
        if "*" not in rel and not rel.startswith("outputs/multirun/"):
            shutil.copytree(run / "export", dest / "export", dirs_exist_ok=True)
    return root


def adapted(c: Command, root: Path, n: int) -> tuple[list[str], list[list[str]]]:
    """The command's arguments as run here, and the launcher overrides to compose."""
    args, launcher = [], []
    other = any(a in (f"hydra/launcher={x}" for x in OTHER_LAUNCHERS) for a in c.args)
    streamed = any(a in STREAMED for a in c.args)
    for a in c.args:
        if other and (a.startswith("hydra/launcher=") or a.startswith("hydra.launcher.")):
            launcher.append(a)
        elif a.startswith("hydra.run.dir=/"):  # a shared file system's path: here instead
            args.append(f"hydra.run.dir={root}{a.split('=', 1)[1]}")
        elif a.startswith("data.root=") and a.split("=", 1)[1].startswith(PLACEHOLDER_ROOTS):
            args.append(f"data.root={imagenet_folder(root) if streamed else root / 'cifar'}")
        else:
            args.append(a)
    resumes = any(a.startswith("resume=") and a not in ("resume=auto", "resume=null") for a in args)
    evaluates = "mode=eval" in args
    extra = ["trainer.device=cpu"]
    if not evaluates:
        extra.append("dry_run=true")
    if not resumes:
        extra += [
            "trainer.progress=false",
            f"data.cache_dir={root / 'cache'}",
            "data.download=false",
        ]
        if not any(a.startswith("data.root=") for a in args):
            extra += [
                "dataset=synthetic",
                "data.synthetic_train=5200",
                "data.synthetic_test=100",
                "data.image_size=16",
            ]
    if any(a.startswith("init_from.path=") for a in args):
        extra.append("depth=8")  # the tiny run's net, whose weights it starts from
    if "-m" in args and not any(a.startswith("seed=") for a in args):
        extra.append("seed=1")  # a preset's other seeds build the same nets again
    if "-m" in args and not any(a.startswith("hydra.sweep.dir=") for a in args):
        extra.append(f"hydra.sweep.dir=sweeps/{n}")
    if "-m" not in args and not any(a.startswith("hydra.run.dir=") for a in args) and not resumes:
        extra.append(f"hydra.run.dir=runs/{n}")
    return [*args, *extra], launcher


def compose_launcher(overrides: list[str]) -> None:
    """The launcher's config group and keys, as Hydra composes them for the sweep."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from resnet_exp.cli import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    for o in overrides:
        key, value = o.split("=", 1)
        if key.startswith("hydra.launcher."):
            assert str(OmegaConf.select(cfg, key)) == value, o


def run_documented(c: Command, root: Path, n: int) -> None:
    if c.program == "resnet-exp-report":
        from resnet_exp.report import cli as report_cli

        args = [str(p) for a in c.args for p in (sorted(root.glob(a)) if "*" in a else [a])]
        report_cli.main(
            [a if a.startswith("-") or os.path.isabs(a) else str(root / a) for a in args]
        )
        return
    args, launcher = adapted(c, root, n)
    if launcher:
        compose_launcher(launcher)
    r = run_main(args, root, check=False)
    assert r.returncode == 0, f"{c}\nran as: resnet-exp {' '.join(args)}\n{r.stderr[-2000:]}"
    if "mode=eval" not in args:
        assert '"params"' in r.stdout, r.stdout[-2000:]  # each job printed what it would run


@pytest.mark.parametrize(
    "n", [i for i, c in enumerate(COMMANDS) if not is_slow(c)], ids=lambda i: str(COMMANDS[i])
)
def test_documented_command_runs(n: int, scratch: Path) -> None:
    run_documented(COMMANDS[n], scratch, n)


@pytest.mark.slow
@pytest.mark.parametrize(
    "n", [i for i, c in enumerate(COMMANDS) if is_slow(c)], ids=lambda i: str(COMMANDS[i])
)
def test_documented_sweep_or_large_net_runs(n: int, scratch: Path) -> None:
    run_documented(COMMANDS[n], scratch, n)


@pytest.mark.parametrize("path,code", PYTHON)
def test_documented_python_runs(
    path: Path, code: list[Block], scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(scratch)
    namespace: dict = {}
    for block in code:
        exec(compile(block.text, block.where, "exec"), namespace)  # noqa: S102 (the docs' own code)


def test_the_docs_show_commands_of_each_kind() -> None:
    """The parser finds what the docs hold (a parser that found nothing would pass)."""
    programs = {c.program for c in COMMANDS}
    assert programs == {"resnet-exp", "resnet-exp-report"}
    assert len(COMMANDS) >= 30  # 38 distinct commands in 55 fenced lines
    assert any(c.where.startswith("README.md") and c.args == [] for c in COMMANDS)  # make run
    assert any("mode=eval" in c.args for c in COMMANDS)
