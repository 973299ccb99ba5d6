"""A catalogue of bad inputs through the `resnet-exp` command's entry function.

Each must give one line on stderr naming the bad value, a non-zero exit, no
traceback, and leave an existing run's files exactly as they were. The cases run
in this process (``cli.main``, what the console script calls); a few of them
also through the installed console script.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    TINY,
    Result,
    compose_config,
    read_checkpoint,
    read_summary,
    run_main,
    start_command,
)

# Most cases only build the tiny job (dry_run) inside an existing run's directory.

# (name, overrides, the message's distinctive part); {run} is an existing run directory.
CASES = [
    (
        "unknown block",
        ["block=nope"],
        "block=nope is not one of bn_after_add, original, preact, relu_before_add, relu_only_preact",
    ),
    (
        "unknown dataset",
        ["dataset=nope"],
        "dataset=nope is not one of cifar10, cifar100, imagefolder, imagenet, synthetic",
    ),
    (
        "depth 0",
        ["depth=0"],
        "depth=0 fits neither basic (6n+2) nor bottleneck (9n+2) units; nearest valid depths: 8 (basic), 11 (bottleneck)",
    ),
    (
        "depth 100",
        ["depth=100"],
        "depth=100 fits neither basic (6n+2) nor bottleneck (9n+2) units; nearest valid depths: 98, 104 (basic), 92, 101 (bottleneck)",
    ),
    ("depth -5", ["depth=-5"], "depth=-5 fits neither basic"),
    (
        "bottleneck at a 6n+2 depth",
        ["model.unit=bottleneck", "depth=32"],
        "depth=32 does not fit bottleneck units (9n+2, n >= 1); nearest valid depths: 29, 38",
    ),
    ("negative lr", ["optimizer.lr=-0.1"], "optimizer.lr=-0.1 must be a positive number"),
    ("zero lr", ["optimizer.lr=0"], "optimizer.lr=0.0 must be a positive number"),
    ("batch 0", ["data.batch_size=0"], "data.batch_size=0 must be at least 1"),
    (
        "batch larger than the data",
        ["data.synthetic_train=100", "data.batch_size=128"],
        "data.batch_size=128 is larger than the 100 training images",
    ),
    (
        "fp16 on the CPU",
        ["trainer.precision=fp16"],
        "trainer.precision=fp16 needs a CUDA GPU (fp16 with a grad scaler); on the CPU use bf16 or fp32",
    ),
    (
        "missing data root, no download",
        ["dataset=cifar10", "data.root={tmp}/nothing", "data.download=false"],
        "no CIFAR-10 in data.root='{tmp}/nothing'",
    ),
    (
        "image folder without images",
        ["dataset=imagefolder", "data.root={tmp}/empty"],
        "no images in {tmp}/empty/train",
    ),
    (
        "image folder class mismatch",
        ["dataset=imagefolder", "data.root={tmp}/mismatch"],
        "train/ and test/ in {tmp}/mismatch have different classes (2 vs 2; in only one: b, c)",
    ),
    (
        "unknown optimizer",
        ["optimizer.name=lion"],
        "Invalid value 'lion', expected one of [sgd, adamw]",
    ),
    (
        "unknown override key",
        ["nope.key=1"],
        "Could not override 'nope.key': Key 'nope' not in 'Config'",
    ),
    (
        "output directory not writable",
        ["hydra.run.dir={tmp}/a_file/run"],
        "hydra.run.dir='{tmp}/a_file/run' cannot be created: {tmp}/a_file is a file, not a directory",
    ),
    (
        "resume path missing",
        ["resume={tmp}/nothing"],
        "resume='{tmp}/nothing': {tmp}/nothing does not exist",
    ),
    (
        "corrupt checkpoint",
        ["resume={tmp}/broken"],
        "checkpoint {tmp}/broken/last.pt is truncated or corrupt",
    ),
    (
        "resume with another depth",
        ["resume={run}", "depth=14", "dry_run=false"],
        "cannot resume from {run}/last.pt: it was trained with depth=8, this run asks for depth=14",
    ),
    (
        "new run over an existing one",
        ["dry_run=false"],
        "{run} already holds a run (last.pt); continue it with resume={run}",
    ),
]
# Also through the console script: a Hydra error, a callback's refusal, the trainer's.
CONSOLE = {"unknown block", "output directory not writable", "new run over an existing one"}


def snapshot(root: Path) -> dict[str, str]:
    """Every file's hash, but the log a failed command may append to and the
    config it writes beside the run's own."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.name != "resnet-exp.log"
        and not any(part.startswith(("again-", "resumed-")) for part in p.parts)
    }


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An existing run and the broken inputs the cases point at."""
    tmp = tmp_path_factory.mktemp("bad")
    run = tmp / "run"
    run_main([*TINY, "trainer.max_steps=16", f"hydra.run.dir={run}"], cwd=tmp)
    for split, classes in (("train", "ab"), ("test", "ac")):
        (tmp / "empty" / split / "a").mkdir(parents=True)
        for c in classes:
            (tmp / "mismatch" / split / c).mkdir(parents=True)
            for i in range(2):
                pixels = np.full((8, 8, 3), 40 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(tmp / "mismatch" / split / c / f"{i}.png")
    (tmp / "a_file").write_text("not a directory")
    shutil.copytree(run, tmp / "broken")
    data = (run / "last.pt").read_bytes()
    (tmp / "broken" / "last.pt").write_bytes(data[: len(data) // 2])  # a kill mid-copy
    return {"tmp": tmp, "run": run}


Outcome = tuple[Result, str]


@pytest.fixture(scope="module")
def outcomes(place: dict[str, Path]) -> dict[str, Outcome]:
    """Every case's result and message (``console: NAME``: through the installed console
    script, each in a fresh process, the three at once)."""
    tmp, run = place["tmp"], place["run"]
    before, broken = snapshot(run), snapshot(tmp / "broken")
    fill = {"tmp": tmp, "run": run}
    cases = {
        name: ([*TINY, "dry_run=true", f"hydra.run.dir={run}", *(a.format(**fill) for a in args)],
               message.format(**fill))
        for name, args, message in CASES
    }  # fmt: skip
    results: dict[str, Outcome] = {
        name: (run_main(overrides, cwd=tmp, check=False), message)
        for name, (overrides, message) in cases.items()
    }
    started = {name: start_command(cases[name][0], cwd=tmp) for name in CONSOLE}
    for name, proc in started.items():
        results[f"console: {name}"] = proc.result(check=False), cases[name][1]
    # Nothing any case did changed the existing run or the broken checkpoint.
    assert snapshot(run) == before and snapshot(tmp / "broken") == broken
    return results


@pytest.mark.parametrize("name", [c[0] for c in CASES] + [f"console: {n}" for n in sorted(CONSOLE)])
def test_bad_input_is_one_line_and_changes_nothing(outcomes: dict[str, Outcome], name: str) -> None:
    proc, message = outcomes[name]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("resnet-exp: error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_divergence_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """lr 0.1 during a 16-step warm-up (one epoch, checkpointed), then 1e30."""
    run = tmp_path / "run"
    args = [
        *TINY,
        "trainer.epochs=2",
        "trainer.log_every=4",
        "optimizer.lr=1e30",
        "schedule.warmup=true",
        "schedule.warmup_steps=16",
        "schedule.warmup_factor=1e-31",
        f"hydra.run.dir={run}",
    ]
    proc = run_main(args, cwd=tmp_path, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 3, proc.stderr
    summary = read_summary(run)
    step = summary["diverged_at_step"]
    assert summary["status"] == "diverged" and 16 < step <= 20
    assert lines == [
        f"resnet-exp: error: loss became non-finite at step {step}; training stopped, "
        f"last good checkpoint: {run / 'last.pt'} (step 16)"
    ]
    state = read_checkpoint(run)
    assert state["step"] == 16
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.log_every=0", "trainer.log_every=0 must be at least 1"),
        ("trainer.eval_every=-1", "trainer.eval_every=-1 must be at least 1"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be at least 1 (or null)"),
        ("trainer.epochs=0", "trainer.epochs=0 must be at least 1"),
        ("model.width=0", "model.width=0 must be at least 1"),
        ("schedule.warmup_factor=2", "schedule.warmup_factor=2.0 must be in [0, 1]"),
        ("schedule.gamma=0", "schedule.gamma=0.0 must be positive"),
        ("schedule.milestones=[0.5,1.5]", "schedule.milestones=[0.5, 1.5] must be fractions"),
        ("optimizer.momentum=-1", "optimizer.momentum=-1.0 must be >= 0"),
        ("schedule.warmup=maybe", "schedule.warmup='maybe' is not one of auto, true, false"),
    ],
)
def test_late_settings_are_checked_before_any_data_is_loaded(override: str, message: str) -> None:
    from resnet_exp.errors import UserError
    from resnet_exp.train.context import check

    cfg = compose_config([override])
    with pytest.raises(UserError) as info:
        check(cfg)  # type: ignore[arg-type]
    assert message in str(info.value)
