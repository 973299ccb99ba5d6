"""A trained run, used again: mode=eval and resnet_exp.load_run on a tiny synthetic run.

The command runs through its entry function, in this process (tests/test_bad_inputs.py
runs the console script's refusals)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import resnet_exp
from resnet_exp.data import Normalize, eval_batches, load_dataset
from resnet_exp.errors import UserError
from resnet_exp.models import build_model
from resnet_exp.run.checkpoint import Checkpoint

from conftest import TINY, read_checkpoint, read_summary, run_main

# 64 of the 256 training images held out: the run evaluates on them, and the test
# set once at the end, so one run has both splits' numbers to compare with.
JOB = [*TINY, "trainer.max_steps=16", "data.val_size=64"]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("eval")
    run = tmp / "run"
    # fp32: load_run's model computes in fp32, as the evaluation must for an exact match
    run_main([*JOB, "trainer.precision=fp32", f"hydra.run.dir={run}"], cwd=tmp)
    return run


@pytest.fixture(scope="module")
def evaluated(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """mode=eval with the run directory alone (from another directory): the run's
    files before and after, what it printed, and its eval.json."""
    before = snapshot(trained)
    cwd = tmp_path_factory.mktemp("elsewhere")
    proc = run_main(["mode=eval", f"resume={trained}"], cwd=cwd)
    assert not any(cwd.iterdir())  # nothing written where it ran
    return before, snapshot(trained), proc.stdout, json.loads((trained / "eval.json").read_text())


def test_eval_matches_the_runs_final_evaluation(trained: Path, evaluated) -> None:
    _, _, stdout, result = evaluated
    summary = read_summary(trained)
    # The run's own data settings (its checkpoint's overrides): its 64 held-out images.
    assert result["split"] == "val" and result["images"] == 64 and result["step"] == 16
    assert result["loss"] == summary["final_val_loss"]  # to the last bit (docs/runs.md)
    assert result["error"] == summary["final_val_error"]
    counts, errors = result["per_class_images"], result["per_class_error"]
    assert list(counts) == [f"class{i}" for i in range(10)] and sum(counts.values()) == 64
    wrong = sum(errors[c] * counts[c] / 100 for c in counts if counts[c])
    assert wrong == pytest.approx(result["error"] * 64 / 100)
    assert f"loss {result['loss']:.4f} | top-1 error {result['error']:.2f}%" in stdout
    assert f"class3  {errors['class3']:6.2f}%  ({counts['class3']} images)" in stdout


def test_eval_changes_no_file_of_the_run(evaluated) -> None:
    before, after, _, _ = evaluated
    # No .hydra/ subdirectory, log lines, TensorBoard events or summary: only eval.json.
    assert set(after) - set(before) == {"eval.json"}
    assert {k: after[k] for k in before} == before


def test_eval_of_the_test_split(trained: Path, evaluated) -> None:
    run_main(["mode=eval", f"resume={trained / 'last.pt'}", "eval.split=test"], trained)
    summary = read_summary(trained)
    result = json.loads((trained / "eval.json").read_text())
    assert result["split"] == "test" and result["images"] == 64
    assert result["loss"] == summary["test_loss"]
    assert result["error"] == summary["test_error"]


def _one_line_error(proc, *phrases: str) -> None:
    assert proc.returncode == 2
    assert proc.stderr.startswith("resnet-exp: error: ") and proc.stderr.count("\n") == 1
    for phrase in phrases:
        assert phrase in proc.stderr


@pytest.fixture
def other_weights(trained: Path, tmp_path: Path) -> Path:
    """A copy of the run whose checkpoint holds a depth-14 net's weights (its config: 8)."""
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    (run / "eval.json").unlink(missing_ok=True)
    state = read_checkpoint(run)
    state["model"] = build_model("preact", 14, 10).state_dict()
    Checkpoint(run / "last.pt", state).save()
    return run


def test_eval_refuses_a_checkpoint_of_another_net(other_weights: Path) -> None:
    before = snapshot(other_weights)
    proc = run_main(["mode=eval", f"resume={other_weights}"], other_weights, check=False)
    _one_line_error(proc, "holds weights of another net", "depth=8", "of another shape")
    assert snapshot(other_weights) == before  # no eval.json


def test_eval_refuses_another_ordering_than_the_run(trained: Path, tmp_path: Path) -> None:
    proc = run_main(["mode=eval", f"resume={trained}", "block=original"], tmp_path, check=False)
    _one_line_error(proc, "model.block=preact", "model.block=original")


def test_eval_needs_a_run(tmp_path: Path) -> None:
    proc = run_main(["mode=eval", *TINY], tmp_path, check=False)
    _one_line_error(proc, "mode=eval needs resume=RUN_DIR")
    assert not any(tmp_path.iterdir())  # no run directory made


def test_load_run_predicts_as_the_evaluation(trained: Path, evaluated) -> None:
    model, cfg = resnet_exp.load_run(trained, device="cpu")
    assert not any(m.training for m in model.modules())
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert cfg.depth == 8 and cfg.data.val_size == 64 and cfg.model.block.value == "preact"
    # The net takes images normalised with the run's training-set statistics.
    data = load_dataset(cfg.data)
    norm = Normalize(data.mean, data.std, torch.device("cpu"))
    x, y = next(eval_batches(data.val, len(data.val), norm, torch.device("cpu"), False))
    with torch.inference_mode():
        logits = model(x)
    result = evaluated[3]  # of the validation split
    assert F.cross_entropy(logits, y).item() == pytest.approx(result["loss"], rel=1e-5)
    wrong = logits.argmax(1) != y
    assert 100.0 * wrong.float().mean().item() == pytest.approx(result["error"])
    assert 100.0 * wrong[y == 3].float().mean().item() == pytest.approx(
        result["per_class_error"]["class3"]
    )


def test_load_run_refuses_weights_of_another_net(other_weights: Path) -> None:
    with pytest.raises(UserError, match="holds weights of another net"):
        resnet_exp.load_run(other_weights / "last.pt")
    with pytest.raises(UserError, match="does not exist"):
        resnet_exp.load_run(other_weights / "missing")
