"""Runs that move: checkpoints loaded safely (no pickled code runs), older checkpoints
read on trust and rewritten safely, settings added since a checkpoint was written, and a
run continued on another device type or number of processes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import resnet_exp
from resnet_exp.config import DataConfig
from resnet_exp.data.batch_aug import STATE_KEY, BatchAugment
from resnet_exp.data.loader import Normalize, TrainLoader
from resnet_exp.data.splits import Placement, Split
from resnet_exp.errors import UserError
from resnet_exp.run import moves
from resnet_exp.run.checkpoint import SCHEMA, Checkpoint

from conftest import REPO, TINY, run_main

LEGACY = REPO / "tests" / "data" / "legacy-efea9bb"  # written by commit efea9bb (2026-11-28)
# conftest's tiny job, exact on a CPU: 16 steps an epoch.
JOB = [*TINY, "trainer.precision=fp32", "trainer.deterministic=true", "trainer.log_every=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped mid-epoch by its length (step 8 of 16)."""
    root = tmp_path_factory.mktemp("portable")
    run_main([*JOB, "trainer.max_steps=8", f"hydra.run.dir={root / 'run'}"], root)
    return root / "run"


def copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


class Planted:
    """An object whose unpickling writes a file: what a checkpoint from someone else
    could carry instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line(result, *phrases: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert all(p in lines[0] for p in phrases), lines[0]
    return lines[0]


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(run: Path, tmp_path: Path) -> None:
    planted = copy(run, tmp_path / "planted")
    marker = tmp_path / "marker"
    state = torch.load(run / "last.pt", weights_only=True)
    torch.save({**state, "note": Planted(marker)}, planted / "last.pt")
    before = (planted / "last.pt").read_bytes()
    for args in (
        [f"resume={planted}"],
        ["resume=auto", f"hydra.run.dir={planted}", *JOB],
        ["mode=eval", f"resume={planted}"],
    ):
        one_line(
            run_main(args, tmp_path, check=False), "holds pickled Python objects (posix.system)"
        )
    for load in (resnet_exp.load_run, resnet_exp.load_pretrained, resnet_exp.read_weights):
        with pytest.raises(UserError, match="trust_checkpoint=true"):
            load(planted)
    assert not marker.exists()  # nothing it names ran
    assert (planted / "last.pt").read_bytes() == before  # and it was left as it was


def test_a_checkpoint_loads_with_weights_only_and_says_where_it_was_made(run: Path) -> None:
    state = torch.load(run / "last.pt", weights_only=True)  # no pickled objects at all
    assert state["schema"] == SCHEMA == 2
    assert state["made_on"]["device"] == "cpu" and state["made_on"]["processes"] == 1
    assert state["made_on"]["precision"] == "fp32"
    assert state["made_on"]["torch"] == str(torch.__version__)
    assert state["made_on"]["resnet_exp"] == resnet_exp.__version__


def test_an_older_tools_run_resumes_on_trust_and_is_rewritten_safely(tmp_path: Path) -> None:
    """A run written by commit efea9bb (before data.interpolation existed; its checkpoint
    a pickle with NumPy's RNG state): refused without trust, the file untouched; with
    trust_checkpoint=true it trains 4 more steps and is saved in the safe format."""
    old = copy(LEGACY, tmp_path / "old")
    before = (old / "last.pt").read_bytes()
    args = [f"resume={old}", "trainer.max_steps=12"]
    one_line(run_main(args, tmp_path, check=False), "pickled Python objects", "trust_checkpoint")
    assert (old / "last.pt").read_bytes() == before
    result = run_main([*args, "trust_checkpoint=true"], tmp_path)
    assert "loading" in result.stderr + (old / "resnet-exp.log").read_text()
    summary = json.loads((old / "summary.json").read_text())
    assert (summary["status"], summary["steps_done"], summary["steps"]) == ("completed", 12, 12)
    ckpt = Checkpoint.load(old / "last.pt")  # weights_only: the safe format now
    assert ckpt.schema == SCHEMA and ckpt.step == 12
    rows = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 12]


def test_a_setting_added_since_counts_with_its_earlier_value() -> None:
    """data.interpolation did not exist before: a checkpoint without it was resized
    bilinearly, so a streamed run compares it as bilinear; in-memory data never resizes,
    so there it is not compared at all."""
    from resnet_exp.run.checkpoint import fingerprint

    streamed = {"data.name": "imagenet", "data.stream": False, "data.batch_size": 256}
    assert fingerprint(streamed)["data.interpolation"] == "bilinear"
    today = {**streamed, "data.interpolation": "bicubic"}
    assert fingerprint(today)["data.interpolation"] == "bicubic"
    cifar = {"data.name": "cifar10", "data.interpolation": "bicubic"}
    assert "data.interpolation" not in fingerprint(cifar)


def loader(split: Split, batch: int = 4, rank: int = 0, world: int = 1) -> TrainLoader:
    cpu = torch.device("cpu")
    norm = Normalize((0.5,) * 3, (0.25,) * 3, cpu)
    return TrainLoader(split, batch, norm, cpu, seed=3, rank=rank, world=world)


def images(n: int) -> Split:
    return Split(torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8), torch.arange(n))


def test_a_generator_of_another_device_is_re_derived_and_the_order_kept() -> None:
    split = images(64)
    a = loader(split)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    x, y = a.next()  # the uninterrupted run's next batch
    exact = loader(split)
    exact.load_state_dict(state)
    assert [torch.equal(u, v) for u, v in zip(exact.next(), (x, y))] == [True, True]
    cuda_like = {**state, "aug_gen": torch.zeros(16, dtype=torch.uint8)}  # a CUDA generator's
    b, c = loader(split), loader(split)
    b.load_state_dict(cuda_like)
    c.load_state_dict(cuda_like)
    xb, yb = b.next()
    assert torch.equal(xb, c.next()[0])  # re-derived from the seed and position: deterministic
    assert torch.equal(yb, y)  # the same images as the uninterrupted run's next batch


def cutout(split: Split, rank: int = 0, world: int = 1) -> BatchAugment:
    at = Placement(torch.device("cpu"), False, rank, world)
    return BatchAugment(loader(split, 4, rank, world), DataConfig(cutout=4), 10, 3, at)


def test_cutout_draws_of_another_device_or_rank_are_re_derived() -> None:
    split = images(64)
    a = cutout(split)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    cuda_like = {**state, STATE_KEY: torch.zeros(16, dtype=torch.uint8), "aug_gen": None}
    b, c = cutout(split), cutout(split)
    b.load_state_dict(cuda_like)  # a CUDA generator's state: no crash, seeded again
    c.load_state_dict(cuda_like)
    assert torch.equal(b.next()[0], c.next()[0])  # deterministic from the seed and position
    # One rank continued by two: each rank draws its own cutouts, not rank 0's copy.
    twos = moves.regroup([{"loader": state, "rng": {}}], 2)
    assert all(r["loader"][STATE_KEY] is None for r in twos)
    ranks = [cutout(split, r, 2) for r in range(2)]
    for r, x in zip(twos, ranks):
        x.load_state_dict(r["loader"])
    boxes = [x.next()[0] == 0 for x in ranks]  # where each rank's cutout zeroed the images
    assert not torch.equal(boxes[0], boxes[1])


def test_the_optimizer_steps_with_this_devices_kernel() -> None:
    model = torch.nn.Linear(3, 2)
    cpu = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    model(torch.ones(1, 3)).sum().backward()
    cpu.step()
    fused = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    mapped = moves.for_device(cpu.state_dict(), fused.defaults)
    assert {(g["fused"], g["foreach"]) for g in mapped["param_groups"]} == {(True, None)}
    fused.load_state_dict(mapped)
    assert fused.param_groups[0]["fused"] is True  # what a captured CUDA-graph step needs


def test_ranks_regroup_keeping_each_steps_images() -> None:
    """Two ranks at step 2 of an epoch, continued by one process: its step 3 reads the
    images the two ranks' step 3 would have read together; and back to two ranks (through
    three) each rank's share is its own again."""
    split = images(40)
    two = [loader(split, 4, r, 2) for r in range(2)]
    for _ in range(2):
        for x in two:
            x.next()
    ranks = [{"loader": x.state_dict(), "rng": {}} for x in two]
    (one,) = moves.regroup(ranks, 1)
    alone = loader(split, 8)
    alone.load_state_dict(one["loader"])
    together = torch.cat([x.next()[1] for x in two])
    assert torch.equal(alone.next()[1].sort().values, together.sort().values)
    back = moves.regroup(moves.regroup(ranks, 3), 2)
    for a, b in zip(back, ranks):
        assert torch.equal(a["loader"]["perm"], b["loader"]["perm"])


def test_a_two_process_checkpoint_continues_on_one(run: Path, tmp_path: Path) -> None:
    """A checkpoint whose two ranks' states it holds (as a 2-process run writes one)
    continues on 1 process, saying so once."""
    moved = copy(run, tmp_path / "moved")
    state = torch.load(run / "last.pt", weights_only=True)
    own = {k: state[k] for k in ("loader", "rng", "metrics")}
    state["ranks"] = moves.regroup([own], 2)
    state["world"], state["made_on"] = 2, {**state["made_on"], "processes": 2}
    torch.save(state, moved / "last.pt")
    run_main([f"resume={moved}", "trainer.max_steps=12"], tmp_path)
    log = (moved / "resnet-exp.log").read_text()
    line = "continuing a run made elsewhere (processes 2 -> 1): it continues the same run statistically"
    assert log.count(line) == 1
    summary = json.loads((moved / "summary.json").read_text())
    assert (summary["status"], summary["steps_done"], summary["parts"]) == ("completed", 12, 2)


def test_the_same_place_says_nothing_and_continues_exactly(run: Path, tmp_path: Path) -> None:
    again = copy(run, tmp_path / "again")
    run_main([f"resume={again}", "trainer.max_steps=12"], tmp_path)
    assert "made elsewhere" not in (again / "resnet-exp.log").read_text()
