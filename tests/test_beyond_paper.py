"""The recipe switches beyond the paper (docs/fidelity.md, "Beyond the paper"): off by
default, the paper's recipe unchanged; each one, on, does what it says (label smoothing,
the weight average, cutout, mixup, cutmix) and the report tells the recipes apart."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from resnet_exp.data.batch_aug import STATE_KEY, BatchAugment, beta, cutmix, mixup
from resnet_exp.report import write_report
from resnet_exp.train.context import resolve
from resnet_exp.train.evaluation import evaluate_split
from resnet_exp.train.loop import Trainer
from resnet_exp.train.metrics import RunningMetrics
from resnet_exp.train.setup import Setup, build_setup

from conftest import TINY, compose_config, read_checkpoint, run_main, tb_scalars

FP32 = [*TINY, "trainer.precision=fp32", "trainer.deterministic=true"]
CLASSES = 10  # the synthetic data set's

# The paper's recipe before any of these switches existed (same command, an AMD EPYC Zen 5):
# train/loss at steps 1..10, then the final test error and loss.
REFERENCE_LOSS = [
    2.2952864170074463,
    2.234226703643799,
    2.324235439300537,
    2.282022714614868,
    2.2599711418151855,
    2.2062087059020996,
    2.206003189086914,
    2.3099730014801025,
    2.180824041366577,
    2.1110341548919678,
]
REFERENCE_TEST = (95.3125, 2.309460163116455)


def setup_of(overrides: list[str]) -> Setup:
    """A run's set-up, as the trainer builds it (no run folder: nothing is written)."""
    cfg = compose_config([*FP32, *overrides])
    return build_setup(cfg, resolve(cfg, Path("unused")))


def test_the_papers_recipe_is_unchanged(tmp_path: Path) -> None:
    """The default run's first ten losses and final test numbers are those recorded
    before the switches existed (rel 1e-4: CPU models differ in the last bits), and
    nothing of the switches is built, drawn or saved."""
    run = tmp_path / "run"
    run_main(
        [*FP32, "trainer.max_steps=10", "trainer.log_every=1", "seed=0", f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )
    loss = tb_scalars(run)["train/loss"]
    assert [loss[step] for step in range(1, 11)] == pytest.approx(REFERENCE_LOSS, rel=1e-4)
    summary = json.loads((run / "summary.json").read_text())
    got = (summary["final_test_error"], summary["final_test_loss"])
    assert got == pytest.approx(REFERENCE_TEST, rel=1e-4)
    assert not [k for k in summary if k.endswith("_ema")]
    state = read_checkpoint(run)
    assert "ema" not in state and STATE_KEY not in state["loader"]


# --- label smoothing ----------------------------------------------------------------


@pytest.mark.parametrize("mixing", [[], ["data.mixup_alpha=0.4"]], ids=["labels", "soft"])
def test_label_smoothing_is_the_closed_form_on_a_batch(mixing: list[str]) -> None:
    """The step's loss on a batch is ``-sum((1 - eps) * target + eps / C) * log p``,
    against labels and against mixup's soft targets."""
    eps = 0.1
    s = setup_of([f"trainer.label_smoothing={eps}", *mixing])
    x, y = s.loader.next()
    loss, logits = s.train_step(x, y)
    target = y.double() if y.ndim == 2 else F.one_hot(y, CLASSES).double()
    assert (y.ndim == 2) == bool(mixing)
    logp = F.log_softmax(logits.double(), 1)
    smoothed = -(((1 - eps) * target + eps / CLASSES) * logp).sum(1).mean()
    plain = -(target * logp).sum(1).mean()
    assert loss.item() == pytest.approx(smoothed.item(), rel=1e-5)
    assert abs(smoothed - plain).item() > 1e-3  # the smoothing changes the loss here


def test_evaluation_loss_stays_plain_cross_entropy() -> None:
    s = setup_of(["trainer.label_smoothing=0.2"])
    values, _ = evaluate_split(s.model, s.data, s.data.test, s.ctx.placement, s.ctx.precision)
    ((views, y),) = list(s.data.eval_batches(s.data.test, s.ctx.placement))  # 64 images
    s.model.eval()
    with torch.no_grad():
        plain = F.cross_entropy(s.model(views[""]).float(), y).item()
    assert values["loss"] == pytest.approx(plain, rel=1e-5)


# --- the weight average -------------------------------------------------------------


@pytest.mark.parametrize(("decay", "warmup"), [(0.8, 2), (0.5, 0)])
def test_ema_weights_are_the_closed_form_average(decay: float, warmup: int) -> None:
    """After k trainer steps the average is w_1, then d_t * avg + (1 - d_t) * w_{t+1} with
    d_t = min(decay, (1 + t) / (warmup + t)): the weights and BN running statistics
    averaged, num_batches_tracked copied."""
    cfg = compose_config(
        [*FP32, f"trainer.ema.decay={decay}", f"trainer.ema.warmup_steps={warmup}"]
    )
    trainer = Trainer(cfg, resolve(cfg, Path("unused")))
    s, k = trainer.s, 6
    assert s.ema is not None
    seen = []
    for _ in range(k):
        trainer.train_step()
        seen.append({n: t.detach().clone() for n, t in s.model.state_dict().items()})
    expect = dict(seen[0])
    for t in range(1, k):
        d = min(decay, (1 + t) / (warmup + t)) if warmup else decay
        for n, w in seen[t].items():
            expect[n] = w if not w.is_floating_point() else d * expect[n] + (1 - d) * w
    got = s.ema.module.state_dict()
    assert got.keys() == expect.keys()
    for n in expect:
        torch.testing.assert_close(got[n], expect[n], rtol=1e-5, atol=1e-6, msg=n)
    assert s.ema.state_dict()["n_averaged"].item() == k
    weight = next(n for n, _ in s.model.named_parameters())
    assert not torch.allclose(got[weight], seen[-1][weight])  # an average, not the last weights
    stats = next(n for n in expect if n.endswith("running_mean"))
    assert not torch.allclose(got[stats], seen[-1][stats])  # BN statistics averaged too


# --- cutout, mixup, cutmix ----------------------------------------------------------


def test_cutout_zeroes_a_square_of_the_stated_side_in_each_image() -> None:
    """0 in normalised units: the data set's mean colour. Without crop and flip (whose
    padding is the mean colour too) every 0 in a batch is cutout's."""
    size = 6
    plain = setup_of(["data.augment=false"]).loader
    cut = setup_of(["data.augment=false", f"data.cutout={size}"]).loader
    assert isinstance(cut, BatchAugment)
    x0, y0 = plain.next()
    x1, y1 = cut.next()
    assert torch.equal(y0, y1) and not (x0 == 0).any()
    zero = (x1 == 0).all(1)  # (batch, h, w)
    assert torch.equal((x1 != x0).any(1), zero)  # cutout changed those pixels only
    boxes, full = set(), 0
    for z in zero:
        rows, cols = z.any(1).nonzero().flatten(), z.any(0).nonzero().flatten()
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert z[r0:r1, c0:c1].all() and z.sum() == (r1 - r0) * (c1 - c0)  # one rectangle
        assert r1 - r0 <= size and c1 - c0 <= size  # clipped at the border, never larger
        full += int(z.sum() == size * size)
        boxes.add((int(r0), int(c0)))
    assert full >= len(zero) // 4  # a centre away from the border cuts the whole square
    assert len(boxes) > 1  # each image its own square, not one box for the batch


def test_mixup_targets_sum_to_one_and_mix_the_stated_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, CLASSES, (16,))
    mixed, target, partner, lam = mixup(x, y, 0.4, CLASSES, gen)
    assert sorted(partner.tolist()) == list(range(16)) and 0 < lam < 1
    torch.testing.assert_close(target.sum(1), torch.ones(16))
    one = F.one_hot(y, CLASSES).float()
    for i, j in enumerate(partner.tolist()):
        torch.testing.assert_close(target[i], lam * one[i] + (1 - lam) * one[j])
        torch.testing.assert_close(mixed[i], lam * x[i] + (1 - lam) * x[j])
    # Through a run's loader: soft targets, at most two labels a row, summing to 1.
    xb, tb = setup_of(["data.mixup_alpha=0.4"]).loader.next()
    assert tb.shape == (len(xb), CLASSES)
    torch.testing.assert_close(tb.sum(1), torch.ones(len(xb)))
    assert ((tb > 0).sum(1) <= 2).all()


@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_the_mixing_weight_follows_beta_alpha_alpha(alpha: float) -> None:
    gen = torch.Generator().manual_seed(1)
    lams = torch.stack([beta(alpha, gen, torch.device("cpu")) for _ in range(4000)])
    assert ((lams >= 0) & (lams <= 1)).all()
    assert lams.mean().item() == pytest.approx(0.5, abs=0.03)
    assert lams.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)


def test_cutmix_box_area_sets_the_mixing_weight() -> None:
    h = w = 8
    x, y = torch.randn(16, 3, h, w), torch.arange(16) % CLASSES
    areas = set()
    for seed in range(8):
        mixed, target, partner, weight = cutmix(
            x, y, 1.0, CLASSES, torch.Generator().manual_seed(seed)
        )
        pasted = (mixed != x).any(1)  # where image i now shows its partner's pixels
        moved = [i for i, j in enumerate(partner.tolist()) if j != i]
        box = pasted[moved[0]]
        area = int(box.sum())
        areas.add(area)
        assert weight.item() == pytest.approx(1 - area / (h * w))
        for i in moved:  # one box for the batch, the partner's pixels inside it
            j = int(partner[i])
            assert torch.equal(pasted[i], box)
            assert torch.equal(mixed[i][:, box], x[j][:, box])
            if y[i] != y[j]:
                assert target[i, y[i]].item() == pytest.approx(1 - area / (h * w))
                assert target[i, y[j]].item() == pytest.approx(area / (h * w))
        torch.testing.assert_close(target.sum(1), torch.ones(16))
    assert len(areas) > 2  # the box's size is drawn


def test_with_both_alphas_each_batch_is_mixup_or_cutmix() -> None:
    loader = setup_of(["data.augment=false", "data.mixup_alpha=1", "data.cutmix_alpha=1"]).loader
    plain = setup_of(["data.augment=false"]).loader
    kinds = set()
    for _ in range(12):
        (x, t), (x0, _) = loader.next(), plain.next()
        changed = (x != x0).any(1).float().mean().item()
        kinds.add("mixup" if changed > 0.9 else "cutmix")  # mixup changes every pixel
        torch.testing.assert_close(t.sum(1), torch.ones(len(t)))
    assert kinds == {"mixup", "cutmix"}


def test_train_error_of_a_mixed_batch_counts_the_dominant_label() -> None:
    m = RunningMetrics(torch.device("cpu"))
    soft = torch.zeros(2, CLASSES)
    soft[0, 2], soft[0, 5] = 0.7, 0.3  # dominant: 2
    soft[1, 4], soft[1, 1] = 0.6, 0.4  # dominant: 4
    logits = torch.zeros(2, CLASSES)
    logits[0, 2] = logits[1, 1] = 5.0  # right on the first, the minor label on the second
    m.update(torch.tensor(1.0), logits, soft)
    _, interval, _ = m.reduce()
    assert interval.error == 50.0


# --- bad values ---------------------------------------------------------------------

BAD = {
    "trainer.label_smoothing=1.5": "trainer.label_smoothing=1.5 must be in [0, 1) (0: off)",
    "trainer.ema.decay=1": "trainer.ema.decay=1.0 must be in [0, 1) (0 or null: off)",
    "trainer.ema.warmup_steps=-1": "trainer.ema.warmup_steps=-1 must be >= 0 (0: none)",
    "data.cutout=-2": "data.cutout=-2 must be >= 0 (a side in pixels; 0: off)",
    "data.mixup_alpha=-0.1": "data.mixup_alpha=-0.1 must be a number >= 0 (0: off)",
    "data.cutmix_alpha=inf": "data.cutmix_alpha=inf must be a number >= 0 (0: off)",
}


@pytest.mark.parametrize("override", list(BAD))
def test_a_bad_value_is_one_line_and_exit_2(override: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_main([*TINY, override, f"hydra.run.dir={run}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"resnet-exp: error: {BAD[override]}"]
    assert not (run / "last.pt").exists() and not (run / "summary.json").exists()


# --- what a run with the weight average writes, and the report -----------------------

MODERN = [
    "schedule=cosine",
    "trainer.label_smoothing=0.1",
    "trainer.ema.decay=0.9",
    "data.cutout=4",
]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a) and (e) under the paper's recipe and under a modern one: two tiny sweeps."""
    tmp = tmp_path_factory.mktemp("recipes")
    job = [*FP32, "trainer.max_steps=20", "trainer.log_every=5", "block=original,preact"]
    for name, recipe in (("paper", []), ("modern", MODERN)):
        run_main(["-m", *job, *recipe, f"hydra.sweep.dir={tmp / name}"], cwd=tmp)
    return tmp / "paper", tmp / "modern"


def test_the_average_is_evaluated_logged_and_checkpointed(sweeps: tuple[Path, Path]) -> None:
    run = sweeps[1] / "1_preact_8"
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [16, 20]
    assert rows[-1]["test_error_ema"] == summary["final_test_error_ema"]
    assert rows[-1]["test_loss_ema"] == summary["final_test_loss_ema"]
    scalars = tb_scalars(run)
    assert scalars["test/error_ema"][20] == pytest.approx(summary["final_test_error_ema"])
    assert scalars["hparams/final_test_error_ema"][20] == pytest.approx(rows[-1]["test_error_ema"])
    # The checkpoint's average, evaluated afresh, gives the summary's numbers; the
    # net's own weights give other ones.
    state = read_checkpoint(run)
    # What the switches add to a checkpoint is tensors in plain dicts (weights_only-safe).
    assert type(state["ema"]) is dict
    assert all(isinstance(v, torch.Tensor) for v in state["ema"].values())
    assert isinstance(state["loader"][STATE_KEY], torch.Tensor)
    assert state["ema"]["n_averaged"].item() == 20  # updated after every step
    s = setup_of([])
    averaged = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    s.model.load_state_dict(averaged)
    values, _ = evaluate_split(s.model, s.data, s.data.test, s.ctx.placement, s.ctx.precision)
    assert values["loss"] == pytest.approx(summary["final_test_loss_ema"], rel=1e-6)
    assert values["error"] == summary["final_test_error_ema"]
    assert summary["final_test_loss"] != summary["final_test_loss_ema"]


def test_with_a_validation_split_the_average_meets_the_test_set_at_the_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_main(
        [*FP32, "data.val_size=32", "trainer.max_steps=8", "trainer.ema.decay=0.9",
         f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    for key in ("final_val_error_ema", "final_val_loss_ema", "test_error_ema", "test_loss_ema"):
        assert isinstance(summary[key], float), key
    assert summary["test_loss_ema"] != summary["test_loss"]


def test_the_report_tells_the_recipes_apart(sweeps: tuple[Path, Path], tmp_path: Path) -> None:
    write_report(list(sweeps), tmp_path)
    md = (tmp_path / "report.md").read_text()
    with open(tmp_path / "report.csv") as f:
        rows = {r["configuration"]: r for r in csv.DictReader(f)}
    modern = "cosine + label smoothing 0.1 + EMA 0.9 + cutout 4"
    assert set(rows) == {
        f"{block}, {recipe}"
        for block in ("original", "preact")
        for recipe in ("paper recipe", modern)
    }
    assert "EMA weights' test error % (median)" in md
    for label, row in rows.items():
        has_ema = modern in label
        assert (row["median_error_ema"] != "") == has_ema
        assert row["recipe"] == (modern if has_ema else "paper recipe")
    # (e) against (a) within each recipe: two comparisons, never across recipes.
    compared = [ln for ln in md.splitlines() if ln.startswith("| preact, ")]
    assert len(compared) == 2 + 2  # the main table's two preact rows, then the comparisons
