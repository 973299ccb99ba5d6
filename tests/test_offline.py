"""A machine without internet: CIFAR staged once (resnet-exp-data) and checked before
anything is scheduled; the wheelhouse installed with no package index; and a rehearsal
of a lent GPU machine's window on the CPU (a fresh copy of the repository, the
wheelhouse, data named by RESNET_EXP_DATA, gpu-check, reproduce twice, then a refusal)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from resnet_exp.data import stage

from conftest import REPO, TINY, make_cifar_folders, run_main

# A proxy on a closed local port: every download fails at once, network or not.
NO_NETWORK = {v: "http://127.0.0.1:9" for v in ("https_proxy", "HTTPS_PROXY", "http_proxy")}


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    for var, value in NO_NETWORK.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(urllib.request, "_opener", None)  # built anew, with the proxy


# --- data staged once, checked before a sweep -----------------------------------------


def test_data_check_counts_each_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_cifar_folders(tmp_path / "cifar", train=3, test=2, classes=4)
    assert stage.main(["check", str(data), "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "train/ + test/ class folders: 4 classes, train 12 images, test 8 images" in out
    assert f"RESNET_EXP_DATA={data.resolve()}" in out


def test_data_check_of_a_folder_without_cifar_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert stage.main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"resnet-exp-data: error: no CIFAR in {tmp_path}")
    assert f"resnet-exp-data download {tmp_path}" in err[0]
    # Class folders whose test split lacks a class: refused as a run would refuse them.
    data = make_cifar_folders(tmp_path / "odd", train=1, test=1, classes=2)
    shutil.rmtree(data / "test" / "class1")
    assert stage.main(["check", str(data)]) == 2
    assert "in only one: class1" in capsys.readouterr().err


def test_data_download_offline_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download runs up to the network call, which fails within its timeout."""
    offline(monkeypatch)
    target = tmp_path / "cifar"
    assert stage.main(["download", str(target), "--dataset", "cifar10", "cifar100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("resnet-exp-data: error: cannot reach www.cs.toronto.edu (")
    assert f"'resnet-exp-data download {target}' on a machine with internet" in err[0]
    assert not target.exists()


def test_a_cifar_copy_that_is_not_torchvisions_is_not_unpickled(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Batches from elsewhere are checked against torchvision's checksums before anything
    loads them: a pickle that would run code is refused, unopened."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]:
        (batches / name).write_bytes(pickle.dumps(Payload()))
    assert stage.main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is unreadable" in err[0] and "download again" in err[0]
    assert not marker.exists()


@pytest.mark.parametrize("launcher", ["basic", "packed"])
def test_a_sweep_on_missing_cifar_is_refused_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("RESNET_EXP_DATA", str(empty))
    offline(monkeypatch)  # data.download=true cannot reach the network either
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "dataset=cifar10", "seed=1,2", f"hydra.sweep.dir={sweep}"]
    args += ["data.download=false"] if launcher == "basic" else ["hydra/launcher=packed"]
    result = run_main(args, tmp_path, check=False)
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1, result.stderr
    assert err[0].startswith(f"resnet-exp: error: no CIFAR-10 in data.root='{empty}'")
    assert f"RESNET_EXP_DATA={empty}" in err[0] and "resnet-exp-data download" in err[0]
    if launcher == "packed":
        assert "cannot reach www.cs.toronto.edu" in err[0]
    assert not sweep.exists()


def test_make_install_from_a_missing_wheelhouse_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["make", "-s", "install", f"WHEELS={tmp_path}/none", f"VENV={tmp_path}/venv"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == (
        f"make: WHEELS={tmp_path}/none is not a folder; make wheelhouse DIR=... fills one"
    )
    assert not (tmp_path / "venv").exists()


# --- the wheelhouse, a fresh venv with no index, and the window's rehearsal -------------


def torch_closure() -> dict[str, metadata.Distribution]:
    """torch, torchvision and everything they require here (extras followed)."""
    seen: dict[str, metadata.Distribution] = {}
    todo, done = [("torch", ()), ("torchvision", ())], set()
    while todo:
        name, extras = todo.pop()
        name = re.sub(r"[-_.]+", "-", name).lower()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        try:
            dist = seen.setdefault(name, metadata.distribution(name))
        except metadata.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((req.name, tuple(sorted(req.extras))))
    return seen


def torch_only_site(dest: Path) -> Path:
    """A folder of links to this environment's torch, torchvision and what they require,
    and nothing else: on a fresh venv's path (a .pth file), it stands for a machine
    with torch preinstalled, without installing torch (GBs) again. (A .pth to this venv's
    whole site-packages would also make hydra, omegaconf... importable, and
    --system-site-packages needs an interpreter that has torch: this one's base has not.)"""
    dest.mkdir(parents=True, exist_ok=True)
    for dist in torch_closure().values():
        base = Path(str(dist.locate_file("")))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            link = dest / top
            if top in ("..", "__pycache__") or top.endswith(".pth") or link.exists():
                continue
            if (base / top).exists():
                link.symlink_to(base / top)
    return dest


def without_index() -> dict[str, str]:
    """This machine's pip reads a global config (an extra index, a folder of wheels):
    none of it, nor PIP_* variables, so pip sees only what it is given. (Nor the state of
    a ``make`` running the suite: each ``make`` here is typed at a shell.)"""
    make = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in make}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def sh(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh copy of the repository (tracked files), its wheelhouse for this Python, and
    its .venv installed from that alone (``make install WHEELS=DIR``), torch linked in."""
    tmp = tmp_path_factory.mktemp("offline")
    files = sh(["git", "ls-files", "-z"], REPO)
    if files.returncode != 0:
        pytest.skip("not a git checkout: no tracked files to copy")
    repo = tmp / "repo"
    for name in files.stdout.split("\0"):
        if name and (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    probe = sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                "-d", str(tmp / "probe"), "tqdm"], tmp)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip("no package index here to build the wheelhouse from")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels = tmp / "wheelhouse"
    built = sh(
        ["make", "wheelhouse", f"PY={version}", f"DIR={wheels}", f"PYTHON={sys.executable}"], repo
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    print(built.stdout.strip().splitlines()[-1])  # the wheelhouse's size
    base = getattr(sys, "_base_executable", sys.executable)
    venv = repo / ".venv"
    assert sh([base, "-m", "venv", str(venv)], tmp).returncode == 0
    # A venv's bundled setuptools (Python <= 3.11) is older than this torch requires:
    # a machine with torch installed has torch's own, linked in below.
    sh(
        [str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"],
        tmp,
        without_index(),
    )
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "torch-only.pth").write_text(f"{torch_only_site(tmp / 'torch-site')}\n")
    installed = sh(["make", "install", f"WHEELS={wheels}", f"PYTHON={base}"], repo, without_index())
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return {"tmp": tmp, "repo": repo, "venv": venv, "wheels": wheels}


@pytest.mark.slow  # ~1.5 minutes: the wheelhouse, the venv, a 2-step run
def test_the_wheelhouse_installs_with_no_index_and_runs(kit: dict[str, Path]) -> None:
    names = {w.name.split("-")[0].lower() for w in kit["wheels"].glob("*.whl")}
    assert {"resnet_exp", "antlr4_python3_runtime", "hydra_core", "omegaconf", "pytest"} <= names
    assert not names & {"torch", "torchvision", "numpy", "pillow"}  # torch brings them
    bin_ = kit["venv"] / "bin"
    where = sh([str(bin_ / "python"), "-c", "import resnet_exp, torch; print(resnet_exp.__file__); print(torch.__file__)"], kit["tmp"])  # fmt: skip
    package, torch_file = where.stdout.split()
    assert package.startswith(str(kit["venv"])), package  # the wheel, not the source tree
    assert torch_file.startswith(str(kit["tmp"] / "torch-site")), torch_file
    run = kit["tmp"] / "run"
    helped = sh([str(bin_ / "resnet-exp"), "--help"], kit["tmp"])
    assert helped.returncode == 0 and "block: bn_after_add, original, preact" in helped.stdout
    trained = sh([str(bin_ / "resnet-exp"), *TINY, "trainer.max_steps=2", f"hydra.run.dir={run}"], kit["tmp"], {**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["steps_done"]) == ("completed", 2)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}  # fmt: skip


@pytest.mark.slow  # ~3 minutes: gpu-check and two reproduce calls of the dry campaign
def test_a_gpu_window_rehearsed_on_the_cpu(kit: dict[str, Path]) -> None:
    tmp, repo = kit["tmp"], kit["repo"]
    data = make_cifar_folders(tmp / "cifar10", train=16, test=4)
    env = {**without_index(), "RESNET_EXP_DATA": str(data), "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(tmp / "cache")}  # fmt: skip
    check, campaign = tmp / "check", tmp / "campaign"

    gpu = sh(["make", "gpu-check", "DRY=1", f"OUT={check}"], repo, env)
    assert gpu.returncode == 0, gpu.stdout[-3000:] + gpu.stderr[-3000:]
    result = json.loads((check / "summary.json").read_text())
    assert result["tests"]["failed"] == 0 and result["tests"]["skipped"] >= 3  # CUDA-only
    single = [r for r in result["single"]["rows"] if r["variant"] != "reference"]
    assert len(single) == 2 and all(r["images_per_s"] > 0 and r["ratio"] > 0 for r in single)
    packs = result["packing"]["rows"]
    assert [r["runs"] for r in packs] == [1, 2] and all(r["images_per_s"] > 0 for r in packs)
    for name in (
        "env.json",
        "tests.xml",
        "summary.md",
        "single/benchmark.md",
        "packing/packing.md",
    ):
        assert (check / name).is_file(), name
    assert gpu.stdout.rstrip().endswith(f"everything in {check}")

    first = sh(["make", "reproduce", "DRY=1", "BUDGET=60s", f"OUT={campaign}"], repo, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = json.loads((campaign / "campaign.json").read_text())["sweeps"]
    assert state["a_depth8_orderings"]["done"]  # the short sweep finished
    assert not state["b_depth11_long"]["done"]  # the long one was cut
    report = (campaign / "report" / "report.md").read_text()
    against = report.split("## Each ordering against the original unit")[1]
    assert "| ResNet-8, preact" in against, report
    assert "## Runs not finished" in report
    assert "reproduce: left:" in first.stdout and " MB of checkpoints)" in first.stdout
    runs = campaign / "b_depth11_long"
    done = {p.parent.name: json.loads(p.read_text())["steps_done"] for p in runs.glob("*/summary.json")}  # fmt: skip

    second = sh(["make", "reproduce", "DRY=1", "BUDGET=60s", f"OUT={campaign}"], repo, env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "a_depth8_orderings:" not in second.stdout.split("budget")[1].split("report:")[0]
    for name, steps in done.items():  # continued from its checkpoint, further along
        assert "resumed from" in (runs / name / "resnet-exp.log").read_text()
        assert json.loads((runs / name / "summary.json").read_text())["steps_done"] > steps

    shutil.rmtree(data)
    before = snapshot(campaign)
    third = sh(["make", "reproduce", "DRY=1", "BUDGET=60s", f"OUT={campaign}"], repo, env)
    assert third.returncode == 2
    said = [line for line in third.stderr.splitlines() if not line.startswith("make: ***")]
    assert len(said) == 1, third.stderr
    assert said[0].startswith(f"reproduce: error: no CIFAR-10 in data.root='{data}'")
    assert f"RESNET_EXP_DATA={data}" in said[0] and "resnet-exp-data download" in said[0]
    assert snapshot(campaign) == before
