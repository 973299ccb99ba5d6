"""trainer.track_signal_every: the per-unit signal on a fixed batch through training.

What it records (against hooks read directly), that it agrees with mode=diagnose at
initialisation, that training with it is bit-identical to training without it, that a
resume keeps signal.jsonl as an uninterrupted run writes it, and the report's figure.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resnet_exp import build_model
from resnet_exp.models.gradflow import measure
from resnet_exp.run.records import read_metrics
from resnet_exp.run.stop import Interrupted, StopRequest
from resnet_exp.train.loop import train

from conftest import (
    TINY,
    assert_same_tensors,
    compose_config,
    outcome,
    run_main,
    tb_scalars,
)

# conftest's tiny job (16 steps an epoch) in fp32, deterministic.
JOB = [
    *TINY,
    "trainer.precision=fp32",
    "trainer.deterministic=true",
    "trainer.log_every=4",
    "trainer.epochs=3",
    "diagnose.batch_size=8",
]
EVERY = 3


def reference_signals(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """||x_l||, ||F(x_l)|| and ||dE/dx_l|| of every unit, read with hooks of the test's own."""
    xs: list[torch.Tensor] = []
    branches: list[torch.Tensor] = []
    hooks = [u.register_forward_pre_hook(lambda _m, a: xs.append(a[0])) for u in model.units]
    hooks += [
        u.branch.register_forward_hook(lambda _m, _a, out: branches.append(out.detach().clone()))
        for u in model.units
    ]
    hooks.append(model.units[-1].register_forward_hook(lambda _m, _a, out: xs.append(out)))
    loss = F.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, xs)
    return {
        "identity_norm": [t.norm().item() for t in xs[:-1]],
        "branch_norm": [b.norm().item() for b in branches],
        "grad_ratio": [(g.norm() / grads[-1].norm()).item() for g in grads[:-1]],
    }


@pytest.mark.parametrize("shortcut", ["identity", "dropout"])
def test_measure_reads_each_unit_and_leaves_the_model_as_it_was(shortcut: str) -> None:
    """The numbers equal what autograd gives; buffers, .grad and the random streams are
    untouched (a dropout shortcut draws from the global stream in training mode)."""
    torch.manual_seed(0)
    model = build_model("preact", 20, shortcut=shortcut).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    flow, loss = measure(model, x, y)

    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_tensors(model.state_dict(), buffers, "state")  # running stats, batch counts
    assert all(p.grad is None for p in model.parameters())
    rows = flow.unit_rows()  # the reference draws the same dropout masks: the stream is as it was
    want = reference_signals(model, x, y)
    assert [r["unit"] for r in rows] == list(range(9))
    assert [r["stage"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # by the output's size
    for key, values in want.items():
        torch.testing.assert_close([r[key] for r in rows], values, rtol=1e-4, atol=0)
    assert math.isfinite(loss) and loss > 0
    summary = flow.stage_summary("signal/")
    for k, first in enumerate((0, 3, 6)):
        assert summary[f"signal/stage{k}/grad_ratio_first"] == rows[first]["grad_ratio"]
        ratios = sorted(r["branch_norm"] / r["identity_norm"] for r in rows[first : first + 3])
        assert summary[f"signal/stage{k}/branch_identity_ratio"] == pytest.approx(ratios[1])


def test_first_row_is_mode_diagnose_of_the_same_net(tmp_path: Path, data_args: list[str]) -> None:
    """Pre-act ResNet-56 at initialisation: the tracker's step-0 row and mode=diagnose's
    figures for the same net, seed and batch (synthetic data, batch 16)."""
    common = [*data_args, "block=preact", "depth=56", "seed=3", "diagnose.batch_size=16"]
    run_main(["mode=diagnose", *common, f"hydra.run.dir={tmp_path / 'diagnose'}"], cwd=tmp_path)
    training = [
        *common,
        "trainer.device=cpu",
        "trainer.progress=false",
        "data.batch_size=16",
        "data.test_limit=16",
        "trainer.max_steps=1",
        "trainer.track_signal_every=100",
    ]
    run_main([*training, f"hydra.run.dir={tmp_path / 'train'}"], cwd=tmp_path)

    summary = json.loads((tmp_path / "diagnose" / "summary.json").read_text())
    with open(tmp_path / "diagnose" / "gradflow.csv", newline="") as f:
        diagnosed = [float(r["grad_norm"]) for r in csv.DictReader(f)]
    rows = read_metrics(tmp_path / "train" / "signal.jsonl")
    assert [r["step"] for r in rows] == [0]  # step 1 is not a multiple of 100
    units = rows[0]["units"]
    assert len(units) == 27 == len(diagnosed) - 1
    first = units[0]["grad_ratio"]
    assert first == pytest.approx(summary["grad_ratio_first_last"], rel=0.10)  # the acceptance
    # The same pass on the same batch: equal to rounding, unit by unit.
    assert first == pytest.approx(summary["grad_ratio_first_last"], rel=1e-5)
    torch.testing.assert_close([u["grad_norm"] for u in units], diagnosed[:-1], rtol=1e-5, atol=0)


def computed(run_dir: Path) -> dict[str, Any]:
    """What a run computed (conftest's ``outcome``) but its summary and the signal's own
    curves: what tracking may add to a run without changing it."""
    got = outcome(run_dir)
    got["scalars"] = {t: p for t, p in got["scalars"].items() if not t.startswith("signal/")}
    return {k: got[k] for k in ("state", "rows", "scalars")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny job (a dropout shortcut: its units draw random masks) with and without
    tracking, uninterrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    for name, every in (("off", 0), ("on", EVERY)):
        overrides = [*JOB, "shortcut=dropout", f"trainer.track_signal_every={every}"]
        train(compose_config(overrides), root / name)
    return {"off": root / "off", "on": root / "on"}


def test_tracking_leaves_training_bit_identical(uninterrupted: dict[str, Path]) -> None:
    on, off = uninterrupted["on"], uninterrupted["off"]
    assert_same_tensors(computed(on), computed(off))
    assert not (off / "signal.jsonl").exists()

    rows = read_metrics(on / "signal.jsonl")
    assert [r["step"] for r in rows] == list(range(0, 49, EVERY))  # 48 steps, and the start
    assert all(len(r["units"]) == 3 for r in rows)  # ResNet-8: one unit a stage
    ratios = [r["units"][0]["grad_ratio"] for r in rows]
    assert all(math.isfinite(v) and v > 0 for v in ratios) and len(set(ratios)) == len(ratios)
    tags = tb_scalars(on)
    for k in range(3):
        for name in ("grad_ratio_first", "branch_identity_ratio"):
            assert list(tags[f"signal/stage{k}/{name}"]) == [r["step"] for r in rows]
    assert [tags["signal/stage0/grad_ratio_first"][r["step"]] for r in rows] == pytest.approx(
        ratios, rel=1e-6
    )


class KillAfter(StopRequest):
    """Keeps a copy of the checkpoint written at step ``keep``, stops at step ``stop``: put
    back, the copy stands for a process killed between them, after writing rows
    signal.jsonl holds but its checkpoint does not."""

    def __init__(self, run_dir: Path, keep: int, stop: int) -> None:
        super().__init__()
        self.run_dir, self.keep, self.stop, self.polls = run_dir, keep, stop, 0

    @property
    def requested(self) -> bool:  # read once per step, after the step's checkpoint
        self.polls += 1
        if self.polls == self.keep:
            shutil.copy(self.run_dir / "last.pt", self.run_dir / "kept.pt")
        if self.polls == self.stop:
            self.request(signal.SIGINT)
        return self.signum is not None


def test_resume_rewrites_rows_after_the_checkpoint(
    tmp_path: Path, uninterrupted: dict[str, Path]
) -> None:
    run = tmp_path / "run"
    overrides = [*JOB, "shortcut=dropout", f"trainer.track_signal_every={EVERY}"]
    with pytest.raises(Interrupted):
        train(compose_config(overrides), run, KillAfter(run, keep=16, stop=22))
    assert read_metrics(run / "signal.jsonl")[-1]["step"] == 21  # rows past step 16
    shutil.move(run / "kept.pt", run / "last.pt")

    train(compose_config([*overrides, f"resume={run}"]), run)

    reference = uninterrupted["on"]
    assert read_metrics(run / "signal.jsonl") == read_metrics(reference / "signal.jsonl")
    assert_same_tensors(computed(run), computed(reference))
    signal_curves = {t: p for t, p in tb_scalars(run).items() if t.startswith("signal/")}
    assert signal_curves == {
        t: p for t, p in tb_scalars(reference).items() if t.startswith("signal/")
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainer.track_signal_every=-2",
            "trainer.track_signal_every=-2 must be 0 (off) or a positive step count",
        ),
        (
            "diagnose.batch_size=1",
            "diagnose.batch_size=1 (the batch trainer.track_signal_every measures) must be at "
            "least 2",
        ),
        (
            "diagnose.batch_size=512",
            "diagnose.batch_size=512 (the batch trainer.track_signal_every measures) is larger "
            "than the 256 training images",
        ),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path: Path, override: str, message: str) -> None:
    run = tmp_path / "run"
    args = [*TINY, "trainer.track_signal_every=5", override, f"hydra.run.dir={run}"]
    proc = run_main(args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "signal.jsonl").exists() and not (run / "last.pt").exists()


def coloured(png: Path, rgb: tuple[int, int, int]) -> int:
    with Image.open(png) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.int16).reshape(-1, 3)
    return int((np.abs(px - np.array(rgb, dtype=np.int16)) < 45).all(axis=1).sum())


def test_sweep_over_orderings_reports_the_first_units_ratio(
    tmp_path: Path, data_args: list[str]
) -> None:
    """Two orderings x two seeds with tracking: signal.png in the sweep's report, a line
    per ordering; a sweep without tracking has none."""
    sweep = tmp_path / "sweep"
    job = [
        *data_args,
        "depth=8",
        "data.image_size=16",
        "data.batch_size=32",
        "data.test_limit=32",
        "trainer.max_steps=6",
        "trainer.device=cpu",
        "trainer.progress=false",
        "diagnose.batch_size=8",
    ]
    run_main(
        ["-m", "block=original,preact", "seed=1,2", "trainer.track_signal_every=2", *job]
        + [f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert len(list(sweep.glob("*/signal.jsonl"))) == 4
    png = sweep / "signal.png"
    assert "![signal](signal.png)" in (sweep / "report.md").read_text()
    for colour in ((31, 119, 180), (255, 127, 14)):  # tab:blue, tab:orange: one per ordering
        assert coloured(png, colour) > 100

    plain = tmp_path / "plain"
    run_main(["-m", "block=original", "seed=1", *job, f"hydra.sweep.dir={plain}"], cwd=tmp_path)
    assert (plain / "report.md").exists() and not (plain / "signal.png").exists()
