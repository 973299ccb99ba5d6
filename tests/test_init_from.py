"""Starting from given weights (init_from=) and recomputing batch-norm statistics before
an evaluation (eval.recalibrate_bn)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resnet_exp.modes import export as command
from resnet_exp.run.export import read_weights
from resnet_exp.train.context import resolve
from resnet_exp.train.setup import build_setup

from conftest import TINY, compose_config, run_main, tb_scalars

# The source run: 10 classes. The fine-tuning run: 20 classes (a CIFAR-10 -> CIFAR-100
# move, on synthetic stand-ins).
SOURCE = [*TINY, "data.num_classes=10", "trainer.max_steps=4"]
TARGET = [*TINY, "data.num_classes=20", "seed=1"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("init")
    run_main([*SOURCE, f"hydra.run.dir={root / 'source'}"], root)
    command.main([str(root / "source"), "--out", str(root / "export")])
    return root / "export"


def test_fine_tuning_starts_from_the_exported_weights_with_a_new_head(
    exported: Path, tmp_path: Path
) -> None:
    overrides = [*TARGET, f"init_from.path={exported}", "init_from.head=reset"]
    cfg = compose_config(overrides)
    s = build_setup(cfg, resolve(cfg, tmp_path / "unused"))  # step 0, before any training
    given, ours = read_weights(exported), s.model.state_dict()
    body = [k for k in ours if not k.startswith("fc.")]
    assert body and all(torch.equal(ours[k], given[k]) for k in body)
    assert ours["fc.weight"].shape == (20, given["fc.weight"].shape[1])  # this run's classes
    run = tmp_path / "tuned"
    run_main([*overrides, "trainer.max_steps=20", f"hydra.run.dir={run}"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["steps_done"]) == ("completed", 20)
    assert summary["init_from"] == str(exported) and summary["init_from_head"] == "reset"
    assert summary["init_from_not_loaded"] == []
    assert "hparams/final_test_error" in tb_scalars(run)  # the HPARAMS entry, init_from with it


def test_another_net_is_named_by_its_first_differing_tensor(exported: Path, tmp_path: Path) -> None:
    deeper = run_main(
        [*TINY, "depth=14", "data.num_classes=10", f"init_from.path={exported}"],
        tmp_path,
        check=False,
    )
    (line,) = deeper.stderr.strip().splitlines()
    assert deeper.returncode == 2 and f"init_from={exported} holds weights of another net" in line
    assert "first: units." in line
    other_classes = run_main([*TARGET, f"init_from.path={exported}"], tmp_path, check=False)
    (line,) = other_classes.stderr.strip().splitlines()
    assert "first: fc.weight is (10, 64) there, (20, 64) here" in line
    assert line.endswith("for other classes pass init_from.head=reset")


def test_not_strict_loads_what_fits_and_lists_the_rest(exported: Path, tmp_path: Path) -> None:
    run = tmp_path / "loose"
    result = run_main(
        [*TARGET, f"init_from.path={exported}", "init_from.strict=false", "trainer.max_steps=1",
         f"hydra.run.dir={run}"],
        tmp_path,
    )  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init_from_not_loaded"] == ["fc.bias", "fc.weight"]
    assert "not loaded (init_from.strict=false): fc.bias, fc.weight" in (
        result.stderr + (run / "resnet-exp.log").read_text()
    )


def test_recalibrated_statistics_are_reported_beside_the_plain_evaluation(
    exported: Path, tmp_path: Path
) -> None:
    source = exported.parent / "source"
    plain = run_main(["mode=eval", f"resume={source}"], tmp_path)
    first = json.loads((source / "eval.json").read_text())
    assert "recalibrated_bn" not in first and "recomputing" not in plain.stdout
    again = run_main(["mode=eval", f"resume={source}", "eval.recalibrate_bn=4"], tmp_path)
    second = json.loads((source / "eval.json").read_text())
    assert {k: second[k] for k in ("loss", "error")} == {k: first[k] for k in ("loss", "error")}
    recal = second["recalibrated_bn"]
    assert recal["batches"] == 4 and recal["loss"] != first["loss"]  # other statistics
    assert "after recomputing the batch-norm statistics over 4 training batches" in again.stdout
    bad = run_main(
        ["mode=eval", f"resume={source}", "eval.recalibrate_bn=-1"], tmp_path, check=False
    )
    assert bad.returncode == 2 and "eval.recalibrate_bn=-1 must be 0" in bad.stderr
