"""The paper presets: every job of every table composes and builds, at both scales (in-process)."""

from __future__ import annotations

import functools

import pytest
from omegaconf import OmegaConf

from resnet_exp import build_model
from resnet_exp.config import Config, flatten
from resnet_exp.models import resolve_unit
from resnet_exp.report.paper import paper_error

from conftest import BLOCKS, preset_config, preset_jobs

# preset -> jobs per seed, and the depths at each scale
PRESETS = {
    "table1": (11, {"short": {20}, "full": {110}}),
    "table2": (10, {"short": {20, 29}, "full": {110, 164}}),
    "table3": (16, {"short": {20, 29, 47}, "full": {110, 164, 1001}}),
    "resnet1001_batch64": (1, {"short": {47}, "full": {1001}}),
    "modern": (4, {"short": {20, 29}, "full": {110, 164}}),
}
SEEDS = {"short": ["seed=1"], "full": [f"seed={s}" for s in range(1, 6)]}
# Composition is slow (~0.1-0.4 s a job): every preset once, table3 (16 jobs) at the full
# scale (composed once a session: tests/test_presets_build.py builds those nets), the
# others at the short scale.
CASES = [("table1", "short"), ("table2", "short"), ("table3", "full"), ("modern", "short")] + [
    ("resnet1001_batch64", s) for s in ("short", "full")
]


@functools.cache
def seed_one(experiment: str, scale: str) -> list[Config]:
    """The configs of a preset's first seed; other seeds differ only by the seed."""
    per_seed, _ = PRESETS[experiment]
    jobs = preset_jobs(experiment, scale)
    assert len(jobs) == per_seed * len(SEEDS[scale])
    assert sorted({o for j in jobs for o in j if o.startswith("seed=")}) == SEEDS[scale]
    return [preset_config(j) for j in jobs[:per_seed]]


@pytest.mark.parametrize(("experiment", "scale"), CASES)
def test_every_job_of_a_preset_composes_and_builds(experiment: str, scale: str) -> None:
    _, depths = PRESETS[experiment]
    configs = seed_one(experiment, scale)
    assert {c.seed for c in configs} == {1}
    assert {c.depth for c in configs} == depths[scale]
    for c in configs:
        unit, _ = resolve_unit(c.depth, c.model.unit.value)  # a depth that fits its unit
        if scale == "short":
            assert c.trainer.max_steps == 200 and c.data.test_limit == 2000
            # on the CPU: for these small nets faster than the meta device's dispatch
            build_model(c.model.block.value, c.depth, 10, unit, shortcut=c.model.shortcut)
        else:  # fb.resnet.torch's 200 epochs for the published batch-64 run
            epochs = 200 if experiment == "resnet1001_batch64" else 164
            assert c.trainer.max_steps is None and c.trainer.epochs == epochs
            assert c.data.train_limit is None and c.data.test_limit is None
        # Every job is a row of the paper: the report can put its number beside it.
        flat = flatten(OmegaConf.to_container(OmegaConf.structured(c), enum_to_str=True))
        if not (experiment == "table3" and c.data.name == "cifar100" and unit != "bottleneck"):
            assert paper_error(flat) is not None, c


def test_table2_is_five_orderings_at_two_depths() -> None:
    configs = seed_one("table2", "short")
    rows = {(c.model.block.value, c.depth, c.model.unit.value) for c in configs}
    expect = {(b, d, u) for b in BLOCKS for d, u in ((20, "basic"), (29, "bottleneck"))}
    assert rows == expect and all(c.data.name == "cifar10" for c in configs)


def test_table1_cases_are_the_papers() -> None:
    configs = seed_one("table1", "short")
    cases = [c.model.shortcut.describe() for c in configs]
    assert cases == [
        "identity",
        "scaling(0/1)",  # a plain net
        "scaling(0.5/1)",
        "scaling(0.5/0.5)",
        "exclusive_gating(b_g=0)",
        "exclusive_gating(b_g=-6)",
        "exclusive_gating(b_g=-7)",
        "shortcut_gating(b_g=0)",
        "shortcut_gating(b_g=-6)",
        "conv1x1",
        "dropout(p=0.5)",
    ]
    assert {c.model.block.value for c in configs} == {"original"}


def test_table3_nets_and_datasets() -> None:
    configs = seed_one("table3", "full")
    nets = {(c.data.name, c.model.block.value, c.depth, c.model.unit.value) for c in configs}
    assert len(nets) == 16
    assert ("cifar10", "original", 110, "single") in nets
    assert ("cifar100", "preact", 1001, "bottleneck") in nets
    (batch64,) = seed_one("resnet1001_batch64", "full")
    assert (batch64.model.block.value, batch64.depth, batch64.data.batch_size) == (
        "preact",
        1001,
        64,
    )


def test_modern_is_table2s_a_and_e_with_only_the_recipe_changed() -> None:
    """Each modern job is the table2 job of the same unit and net, but for the recipe's
    keys: the report's rows then differ by the recipe alone."""
    modern = seed_one("modern", "short")
    rows = {(c.model.block.value, c.depth, c.model.unit.value) for c in modern}
    nets = ((20, "basic"), (29, "bottleneck"))
    assert rows == {(b, d, u) for b in ("original", "preact") for d, u in nets}
    paper = {(c.model.block.value, c.depth): c for c in seed_one("table2", "short")}
    for c in modern:
        a, b = (
            flatten(OmegaConf.to_container(OmegaConf.structured(x), enum_to_str=True))
            for x in (paper[(c.model.block.value, c.depth)], c)
        )
        changed = {k: b[k] for k in a if a[k] != b[k]}
        assert changed == {
            "schedule.name": "cosine",
            "trainer.label_smoothing": 0.1,
            "trainer.ema.decay": 0.999,
            "data.cutout": 16,
        }
