"""Sharing a trained run: resnet-exp-export's folder, load_pretrained and read_weights.

One tiny CIFAR-family run and one tiny ImageNet-family run, trained once for the module;
each export goes into its own folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import resnet_exp
from resnet_exp.errors import UserError
from resnet_exp.modes import export as command
from resnet_exp.run import export as ex

from conftest import ONE_THREAD, TINY, run_main

# A scaled shortcut: its constants live in the net's settings, not in its weights, so
# a lost setting shows in the logits.
CIFAR_JOB = [*TINY, "trainer.max_steps=3", "shortcut=scaling", "model.shortcut.branch_scale=0.7"]
IMAGENET_JOB = [
    *("dataset=synthetic", "data.synthetic_train=64", "data.synthetic_test=32"),
    *("data.image_size=32", "depth=18", "model.family=imagenet", "model.width=8"),
    *("data.batch_size=16", "trainer.max_steps=2", "trainer.progress=false"),
    "trainer.device=cpu",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name, job in (("cifar", CIFAR_JOB), ("imagenet", IMAGENET_JOB)):
        out[name] = tmp / name
        run_main([*job, f"hydra.run.dir={out[name]}"], cwd=tmp)
    return out


def export(argv: list[str]) -> tuple[int, str, str]:
    """resnet-exp-export's entry function in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            command.main([str(a) for a in argv])
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def images(size: int, n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.float()(x)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def refused(code: int, err: str, *words: str) -> None:
    """One line on stderr, exit 2, no traceback, the line naming ``words``."""
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and all(w in err for w in words), err


# --- export, then load: the run's own net ---------------------------------------------


@pytest.mark.parametrize("family", ["cifar", "imagenet"])
def test_an_export_loads_as_the_runs_own_net(runs, family: str, tmp_path: Path) -> None:
    run = runs[family]
    code, stdout, err = export([run, "--out", tmp_path / "exp"])
    assert code == 0, err
    folder = tmp_path / "exp"
    assert stdout.strip() == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", ex.WEIGHTS]

    own = resnet_exp.load_run(run).model  # the run's own net, as the trainer builds it
    shared = resnet_exp.load_pretrained(folder)
    assert not shared.training and all(not m.training for m in shared.modules())
    assert type(shared) is type(own)
    size = 16 if family == "cifar" else 32
    x = images(size)
    assert torch.equal(logits(shared, x), logits(own, x))  # fp32, eval mode: bit for bit
    assert torch.equal(logits(resnet_exp.load_pretrained(run), x), logits(own, x))

    config = json.loads((folder / "config.json").read_text())
    s = summary(run)
    net = config["net"]
    assert net["family"] == family and net["depth"] == s["depth"] and net["num_classes"] == 10
    assert config["input"]["mean"] == s["data_mean"] and config["input"]["std"] == s["data_std"]
    assert config["input"]["image_size"] == size and len(s["data_mean"]) == 3
    assert config["source"]["step"] == s["steps_done"]
    assert config["source"]["status"] == "completed"
    # The weights alone, by each path that holds them: the same tensors.
    weights = {k: v.cpu() for k, v in own.state_dict().items()}
    for path in (folder, folder / ex.WEIGHTS, run, run / "last.pt"):
        got = resnet_exp.read_weights(path)
        assert got.keys() == weights.keys(), path
        assert all(torch.equal(got[k], weights[k]) for k in weights), path


def test_the_config_keeps_the_nets_settings(runs, tmp_path: Path) -> None:
    """Resolved settings (no ``auto``, no null width) and the shortcut's constants."""
    assert export([runs["cifar"], "--out", tmp_path / "exp"])[0] == 0
    net = json.loads((tmp_path / "exp" / "config.json").read_text())["net"]
    assert (net["block"], net["unit"], net["downsample"], net["width"]) == (
        "preact",
        "basic",
        "A",
        16,
    )
    assert net["shortcut"]["name"] == "scaling" and net["shortcut"]["branch_scale"] == 0.7
    # Without its settings the same weights give other logits: the scale is in the net.
    other = ex.build_net({**net, "shortcut": {**net["shortcut"], "branch_scale": 1.0}})
    ex.load_into(other, resnet_exp.read_weights(tmp_path / "exp"), "test")
    x = images(16)
    assert not torch.equal(
        logits(other.eval(), x), logits(resnet_exp.load_pretrained(tmp_path / "exp"), x)
    )


def test_the_model_card(runs, tmp_path: Path) -> None:
    run = runs["cifar"]
    assert export([run, "--out", tmp_path / "exp"])[0] == 0
    card = (tmp_path / "exp" / "README.md").read_text()
    s = summary(run)
    assert card.startswith("---\nlibrary_name: resnet-exp\n")
    assert "# preact ResNet-8 (cifar, basic units) on synthetic" in card
    assert f"at step {s['steps_done']} with resnet-exp {resnet_exp.__version__}" in card
    for row in (
        "| optimizer | sgd, lr 0.1, weight decay 0.0001, momentum 0.9 |",
        "| length | 3 steps (16 an epoch) |",
        "| batch | 16 (global, 1 process(es)) |",
        f"| precision | {s['precision']} |",
        "| seed | 0 |",
        f"| final_test_error | {s['final_test_error']:.2f} |",
        f"| final_train_error | {s['final_train_error']:.2f} |",
        "| shortcut | scaling |",
    ):
        assert row in card, row
    assert "Unfinished" not in card
    assert f"mean = {s['data_mean']}" in card


# --- ONNX ----------------------------------------------------------------------------


def test_onnx_matches_the_net(runs, tmp_path: Path) -> None:
    import onnxruntime

    code, stdout, err = export([runs["imagenet"], "--out", tmp_path / "exp", "--onnx"])
    assert code == 0, err
    folder = tmp_path / "exp"
    check = json.loads((folder / "config.json").read_text())["onnx"]
    recorded, largest = check["max_abs_diff"], check["max_abs_logit"]
    assert check["tolerance"] == pytest.approx(command.ONNX_TOLERANCE * max(1.0, largest))
    # A tiny net's logits are a few units: within the 1e-4 itself, absolute.
    assert 0 <= recorded <= command.ONNX_TOLERANCE and f"difference {recorded:.3g}" in stdout
    session = onnxruntime.InferenceSession(
        str(folder / ex.ONNX), providers=["CPUExecutionProvider"]
    )
    x = images(32, n=5, seed=7)  # another batch size than the export's example
    (got,) = session.run(None, {"images": x.numpy()})
    want = logits(resnet_exp.load_pretrained(folder), x).numpy()
    assert np.abs(got - want).max() <= command.ONNX_TOLERANCE
    assert "checked with onnxruntime" in (folder / "README.md").read_text()


def test_onnx_over_the_tolerance_is_refused(runs, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(command, "ONNX_TOLERANCE", -1.0)  # no export can be that close
    code, _, err = export([runs["cifar"], "--out", tmp_path / "exp", "--onnx"])
    refused(code, err, "differs from the net")
    assert not any(tmp_path.iterdir())  # neither the export nor its temporary folder


def test_onnx_without_the_extra(runs, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    code, _, err = export([runs["cifar"], "--out", tmp_path / "exp", "--onnx"])
    refused(code, err, "onnxruntime", "pip install 'resnet-exp[onnx]'")
    assert not any(tmp_path.iterdir())


# --- prefixes ------------------------------------------------------------------------


def test_wrappers_prefixes_are_stripped(runs, tmp_path: Path) -> None:
    net = resnet_exp.load_pretrained(runs["cifar"])
    plain = net.state_dict()
    wrapped = {
        "ddp": nn.DataParallel(net).state_dict(),  # module.: as DistributedDataParallel's
        "compiled": torch.compile(net).state_dict(),  # _orig_mod. (nothing compiled yet)
        "both": torch.compile(nn.DataParallel(net)).state_dict(),
    }
    assert next(iter(wrapped["both"])).startswith("_orig_mod.module.")
    for name, state in wrapped.items():
        assert list(ex.strip_prefixes(state)) == list(plain), name
    assert ex.strip_prefixes(plain) == plain

    # An export folder whose weights a DDP-wrapped net wrote loads as the net.
    assert export([runs["cifar"], "--out", tmp_path / "exp"])[0] == 0
    folder = tmp_path / "exp"
    ddp = {k: v.contiguous() for k, v in wrapped["both"].items()}
    save_file(ddp, folder / ex.WEIGHTS)
    assert next(iter(load_file(folder / ex.WEIGHTS))).startswith("_orig_mod.module.")
    x = images(16)
    assert torch.equal(logits(resnet_exp.load_pretrained(folder), x), logits(net, x))
    assert resnet_exp.read_weights(folder / ex.WEIGHTS).keys() == plain.keys()


# --- refusals ------------------------------------------------------------------------


def test_refusals_of_bad_input(runs, tmp_path: Path) -> None:
    run = runs["cifar"]
    code, _, err = export([tmp_path / "nope"])
    refused(code, err, "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    code, _, err = export([tmp_path / "empty", "--out", tmp_path / "x"])
    refused(code, err, "is not a run directory", "last.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = export([run, "--out", tmp_path / "full"])
    refused(code, err, "full", "not an empty folder")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # nothing written
    assert not (run / command.DEFAULT_OUT).exists()
    # An empty folder is taken.
    (tmp_path / "empty_out").mkdir()
    assert export([run, "--out", tmp_path / "empty_out"])[0] == 0
    assert (tmp_path / "empty_out" / ex.WEIGHTS).is_file()


def test_an_unfinished_run_needs_the_flag(runs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["cifar"], run)
    s = summary(run)
    (run / "summary.json").write_text(json.dumps({**s, "status": "interrupted"}))
    code, _, err = export([run])
    refused(code, err, "did not complete (status interrupted)", "--allow-unfinished")
    assert not (run / command.DEFAULT_OUT).exists()
    (run / "summary.json").unlink()  # killed: no summary at all
    code, _, err = export([run])
    refused(code, err, "status unfinished")
    code, _, err = export([run, "--allow-unfinished"])
    assert code == 0, err
    card = (run / command.DEFAULT_OUT / "README.md").read_text()
    assert "> **Unfinished run** (status `unfinished`, step 3)" in card
    config = json.loads((run / command.DEFAULT_OUT / "config.json").read_text())
    assert config["source"]["status"] == "unfinished"


def test_a_failure_while_writing_leaves_no_export(runs, tmp_path: Path, monkeypatch) -> None:
    def broken(*_args) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(command, "model_card", broken)  # after the weights and config
    out = tmp_path / "new" / "deeper" / "exp"
    with pytest.raises(OSError, match="disk full"):
        command.export_run(runs["cifar"], out)
    assert not any(tmp_path.iterdir())  # no export, no temporary folder, no parents made


def test_console_script_refuses_in_one_line(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "resnet-exp-export"
    proc = subprocess.run(
        [str(script), str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ONE_THREAD},
    )
    assert proc.returncode == 2 and proc.stderr.startswith("resnet-exp-export: error: ")
    assert len(proc.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


# --- runs from before the normalisation was recorded ---------------------------------


def test_normalisation_of_an_older_run_comes_from_its_data(runs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["cifar"], run)
    s = summary(run)
    old = {k: v for k, v in s.items() if k not in ("data_mean", "data_std")}
    (run / "summary.json").write_text(json.dumps(old))
    assert export([run])[0] == 0
    spec = json.loads((run / command.DEFAULT_OUT / "config.json").read_text())["input"]
    assert spec["mean"] == pytest.approx(s["data_mean"], abs=1e-12)
    assert spec["std"] == pytest.approx(s["data_std"], abs=1e-12)


def _image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_an_older_run_without_its_data_is_one_line(tmp_path: Path) -> None:
    data, run = tmp_path / "images", tmp_path / "run"
    _image_folder(data)
    job = [*TINY[1:], "dataset=imagefolder", f"data.root={data}", "data.cache_dir="]
    run_main([*job, "data.batch_size=8", "trainer.max_steps=1", f"hydra.run.dir={run}"], tmp_path)
    old = {k: v for k, v in summary(run).items() if k not in ("data_mean", "data_std")}
    (run / "summary.json").write_text(json.dumps(old))
    shutil.rmtree(data)
    code, _, err = export([run])
    refused(code, err, "records no data_mean/data_std", "imagefolder", str(data))
    assert not (run / command.DEFAULT_OUT).exists()


# --- what load_pretrained and read_weights refuse ------------------------------------


def test_loading_refuses_what_is_not_an_export(runs, tmp_path: Path) -> None:
    assert export([runs["cifar"], "--out", tmp_path / "exp"])[0] == 0
    folder = tmp_path / "exp"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "net": {**config["net"], "block": "evil"}})
    )
    with pytest.raises(UserError, match=r"config.json: block='evil' is not one of original"):
        resnet_exp.load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(UserError, match="format_version 99"):
        resnet_exp.load_pretrained(folder)
    with pytest.raises(UserError, match="holds weights but not the net's settings"):
        resnet_exp.load_pretrained(folder / ex.WEIGHTS)
    (tmp_path / "junk.safetensors").write_bytes(b"not tensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        resnet_exp.read_weights(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="is not an export folder"):
        resnet_exp.read_weights(tmp_path / "nothing")
    with pytest.raises(UserError, match="is neither an export folder"):
        resnet_exp.load_pretrained(tmp_path)


# --- a data-parallel run --------------------------------------------------------------


@pytest.mark.slow
def test_a_ddp_run_loads(tmp_path: Path) -> None:
    """Two gloo processes under torchrun write the checkpoint; it loads, exported or not."""
    run = tmp_path / "ddp"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, "-m", "resnet_exp", *TINY, "trainer.max_steps=2", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **ONE_THREAD},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(run)["processes"] == 2
    own = resnet_exp.load_run(run).model
    x = images(16)
    assert torch.equal(logits(resnet_exp.load_pretrained(run), x), logits(own, x))
    assert export([run, "--out", tmp_path / "exp"])[0] == 0
    assert torch.equal(logits(resnet_exp.load_pretrained(tmp_path / "exp"), x), logits(own, x))
