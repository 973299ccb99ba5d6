"""The Checkpoint type: where last.pt is, what it keeps, and the one rule by which a
config may use it (a resume allows no matched key to differ, an evaluation the
training-only ones; model.checkpointing may differ for both)."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_exp.config import Config, config_tree, flat_config
from resnet_exp.errors import UserError
from resnet_exp.models import NetSpec
from resnet_exp.run.checkpoint import CHECKPOINT, REQUIRED, Checkpoint
from resnet_exp.run.resume import Resume, check_resumable

from conftest import TINY, compose_config


def written(run: Path, cfg: Config, overrides: list[str] | None = None) -> Path:
    """A checkpoint as the trainer writes one (tiny stand-ins for the owners' states)."""
    run.mkdir(parents=True, exist_ok=True)
    owners = {k: {"stand-in": k} for k in REQUIRED if k != "step"}
    Checkpoint.of_run(
        run / CHECKPOINT,
        owners,
        step=3,
        world=1,
        ranks=None,
        config=config_tree(cfg),
        overrides=overrides or [],
    ).save()
    return run / CHECKPOINT


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return written(tmp_path_factory.mktemp("ckpt") / "run", compose_config(TINY))


def resume(saved: Path, *overrides: str) -> list[str]:
    ckpt = Checkpoint.load(saved)
    return check_resumable(ckpt.state, flat_config(compose_config([*TINY, *overrides])), saved)


def evaluate(saved: Path, *overrides: str) -> Checkpoint:
    cfg = compose_config([*TINY, "mode=eval", f"resume={saved}", *overrides])
    return Resume.to_evaluate(cfg.resume, flat_config(cfg)).checkpoint


def test_written_checkpoint_reads_back(saved: Path) -> None:
    ckpt = Checkpoint.load(saved)
    assert (ckpt.step, ckpt.world, ckpt.overrides) == (3, 1, [])
    assert ckpt.config is not None and ckpt.config["depth"] == 8
    cfg = ckpt.run_config()
    assert cfg.depth == 8 and cfg.data.image_size == 16
    assert Resume(ckpt, []).states(0, 1, ("loader",))["loader"] == {"stand-in": "loader"}
    assert ckpt.schema == 2 and ckpt.made_on == {}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("seed=1", "seed"),
        ("data.batch_size=32", "data.batch_size"),
        ("optimizer=adamw", "optimizer.name"),
    ],
)
def test_training_keys_refuse_a_resume_and_not_an_evaluation(
    saved: Path, override: str, key: str
) -> None:
    with pytest.raises(UserError, match=rf"cannot resume from {saved}: .*{key}=") as info:
        resume(saved, override)
    assert "\n" not in str(info.value)
    assert evaluate(saved, override).path == saved  # an evaluation trains nothing


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("depth=14", "depth"),
        ("block=original", "model.block"),
        ("data.val_size=64", "data.val_size"),
    ],
)
def test_net_and_data_keys_refuse_both(saved: Path, override: str, key: str) -> None:
    with pytest.raises(UserError, match=rf"cannot resume from .*{key}="):
        resume(saved, override)
    with pytest.raises(UserError, match=rf"cannot evaluate {saved}: .*{key}=.*drop those"):
        evaluate(saved, override)


def test_activation_checkpointing_may_change_for_both(saved: Path) -> None:
    """model.checkpointing trades speed for memory with the same gradients and BN
    statistics: a resume logs the change, an evaluation ignores it."""
    assert resume(saved, "model.checkpointing=2") == ["model.checkpointing: 0 -> 2"]
    assert evaluate(saved, "model.checkpointing=2").path == saved


def test_a_checkpoint_without_its_config(saved: Path, tmp_path: Path) -> None:
    """The one reader of the saved config: load_run needs it and refuses; the match
    rule falls back to the hash of the matched keys."""
    state = {**Checkpoint.load(saved).state, "config": None}
    bare = Checkpoint(tmp_path / CHECKPOINT, state)
    with pytest.raises(UserError, match="keeps no config"):
        bare.run_config()
    assert check_resumable(state, flat_config(compose_config(TINY)), bare.path) == []
    with pytest.raises(UserError, match="its config hash differs"):
        check_resumable(state, flat_config(compose_config([*TINY, "depth=14"])), bare.path)


def test_paths(tmp_path: Path, saved: Path) -> None:
    run = saved.parent
    for no in (None, "", "none", "null"):
        assert Checkpoint.resolve(no, run) is None
    assert Checkpoint.resolve("auto", run) == saved
    assert Checkpoint.resolve("auto", tmp_path) is None  # nothing to continue: a new run
    assert Checkpoint.resolve(str(run), tmp_path) == saved
    assert Checkpoint.resolve(str(saved), tmp_path) == saved
    missing = tmp_path / "nothing"
    with pytest.raises(UserError) as info:
        Checkpoint.resolve(str(missing), tmp_path)
    assert str(info.value) == (
        f"resume={str(missing)!r}: {missing} does not exist "
        "(pass a last.pt, its run directory, or auto)"
    )
    assert Checkpoint.run_dir_of(str(saved), "default") == str(run)
    assert Checkpoint.run_dir_of(str(run), "default") == str(run)
    assert Checkpoint.run_dir_of("auto", "default") == "default"
    assert Checkpoint.run_dir_of(str(missing), "default") == "default"


@pytest.mark.parametrize(
    ("depth", "unit"), [(18, "basic"), (34, "basic"), (50, "bottleneck"), (152, "bottleneck")]
)
def test_another_nets_weights_name_the_nets_own_unit(depth: int, unit: str, tmp_path: Path) -> None:
    """The ImageNet nets' units come from their depth table (not the CIFAR 6n+2/9n+2 rule):
    a checkpoint of another net is refused naming this net as it is."""
    net = NetSpec.of("preact", depth, family="imagenet", width=4)
    other = NetSpec.of("preact", 18 if depth != 18 else 34, family="imagenet", width=4)
    ckpt = Checkpoint(tmp_path / "last.pt", {"model": other.build(10).state_dict()})
    with pytest.raises(UserError) as info:
        ckpt.load_weights(net.build(10), net)
    message = str(info.value)
    assert f"(depth={depth}, block=preact, family=imagenet, unit={unit})" in message
    assert "\n" not in message and "fits neither" not in message
