"""The training loop, top to bottom: set up, train, evaluate, checkpoint, summarise."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from resnet_exp.config import Config
from resnet_exp.data import Normalize, Split, TrainLoader, eval_batches, load_dataset
from resnet_exp.data.imagenet import FileSplit, is_streamed
from resnet_exp.data.stream import StreamLoader, crop_suffix, eval_crops, stream_eval_batches
from resnet_exp.errors import UserError
from resnet_exp.gradflow import GradFlowMonitor
from resnet_exp.models import ORDERINGS, CifarResNet, build_model, count_params
from resnet_exp.models.imagenet import family_unit, resolve_family
from resnet_exp.train import distributed
from resnet_exp.train.checkpoint import CHECKPOINT, load_checkpoint, resolve_resume, save_checkpoint
from resnet_exp.train.checks import check_settings
from resnet_exp.train.optim import build_optimizer, build_scheduler, warmup_on
from resnet_exp.train.records import SUMMARY, RunRecords
from resnet_exp.train.resume import (
    check_resumable,
    fingerprint,
    fingerprint_hash,
    flat_config,
    resumable_overrides,
)
from resnet_exp.train.runtime import (
    autocast,
    pick_device,
    pick_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from resnet_exp.train.step import make_train_step
from resnet_exp.train.stop import Interrupted, StopRequest, signal_name

log = logging.getLogger("resnet_exp")


class NonFiniteLoss(RuntimeError):
    pass


class Diverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Setup:
    """Everything built before the first step."""

    cfg: Config
    device: torch.device
    precision: str
    model: nn.Module  # the network itself (checkpoints, evaluation)
    train_model: nn.Module  # what the step calls: the network, or DDP around it
    data: Any
    loader: TrainLoader | StreamLoader
    normalize: Normalize
    total_steps: int
    warmup: bool
    info: dict[str, Any] = field(default_factory=dict)


def build_setup(cfg: Config) -> Setup:
    dist = distributed.current()
    device = pick_device(cfg.trainer.device, dist.local_rank if dist.enabled else None)
    precision = pick_precision(str(cfg.trainer.precision.value), device)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    block, unit = cfg.model.block.value, cfg.model.unit.value
    family = resolve_family(cfg.model.family.value, is_streamed(cfg.data))
    unit = family_unit(family, cfg.depth, unit)  # a bad depth fails before data loading
    check_settings(cfg)
    if cfg.data.batch_size < 1:
        raise UserError(f"data.batch_size={cfg.data.batch_size} must be at least 1")
    if cfg.data.eval_batch_size < 1:
        raise UserError(f"data.eval_batch_size={cfg.data.eval_batch_size} must be at least 1")
    # data.batch_size is the global batch (the paper's 128), split over the ranks:
    # the recipe, lr included, is the same on any number of GPUs.
    if cfg.data.batch_size % dist.world:
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} does not split evenly over {dist.world} "
            f"processes; use a multiple of {dist.world}"
        )
    if cfg.trainer.sync_bn and device.type != "cuda":
        raise UserError(
            "trainer.sync_bn=true needs CUDA GPUs (SyncBatchNorm); on CPUs leave it off"
        )

    data = load_dataset(cfg.data)
    if cfg.data.batch_size > len(data.train):
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {len(data.train)} training images"
        )
    model = model_from_config(cfg, data.num_classes)
    info = {
        "block": block,
        "depth": cfg.depth,
        "family": family,
        "unit": unit,
        "shortcut": cfg.model.shortcut.describe(),
        "params": count_params(model),
        "dataset": cfg.data.name,
        "data_source": data.source,
        "train_images": len(data.train),
        f"{data.eval_name}_images": len(data.eval_split),
        "optimizer": cfg.optimizer.name,
        "schedule": cfg.schedule.name,
        "device": str(device),
        "precision": precision,
        "seed": cfg.seed,
        "processes": dist.world,
    }
    model = model.to(
        device,
        memory_format=torch.channels_last if cfg.trainer.channels_last else torch.preserve_format,
    )
    train_model: nn.Module = model
    if dist.enabled:
        if cfg.trainer.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Every rank starts from rank 0's weights (DDP broadcasts them) and
        # keeps BN running statistics in step with rank 0's (broadcast_buffers).
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    normalize = Normalize(data.mean, data.std, device)
    loader: TrainLoader | StreamLoader
    if isinstance(data.train, FileSplit):  # too large to hold: read from disk per batch
        loader = StreamLoader(
            data.train,
            cfg.data,
            cfg.data.batch_size // dist.world,
            device,
            cfg.seed,
            cfg.trainer.channels_last,
            dist.rank,
            dist.world,
        )
    else:
        loader = TrainLoader(
            data.train,
            cfg.data.batch_size // dist.world,
            normalize,
            device,
            cfg.seed,
            augment=cfg.data.augment,
            pad=cfg.data.pad,
            channels_last=cfg.trainer.channels_last,
            rank=dist.rank,
            world=dist.world,
        )
    steps = (
        cfg.trainer.max_steps
        if cfg.trainer.max_steps is not None
        else cfg.trainer.epochs * loader.steps_per_epoch
    )
    if steps < 1:
        raise UserError(
            f"the run has {steps} steps: trainer.epochs and trainer.max_steps must be positive"
        )
    # The paper's auto warm-up is for its CIFAR nets (depth 0: off); the ImageNet recipe has none.
    depth_rule = cfg.depth if family == "cifar" else 0
    warmup = warmup_on(cfg.schedule, depth_rule, ORDERINGS[block].is_preact)
    info.update(
        steps=steps,
        steps_per_epoch=loader.steps_per_epoch,
        batch_size=cfg.data.batch_size,
        warmup=warmup,
    )
    return Setup(
        cfg, device, precision, model, train_model, data, loader, normalize, steps, warmup, info
    )


@torch.inference_mode()
def evaluate(s: Setup, split: Split | FileSplit) -> dict[str, float]:
    """Mean loss, top-1 and top-5 error (%) on a split: ``loss``, ``error``,
    ``top5_error``, and the same with ``_<crop>`` for each further test crop of
    streamed data (``error_320``). One host sync at the end.

    In a data-parallel run each rank evaluates every world-th image and the sums are added.
    """
    s.model.eval()
    # per crop suffix: loss, top-1 wrong, top-5 wrong, images (every rank has every suffix)
    crops = eval_crops(s.cfg.data) if isinstance(split, FileSplit) else [0]
    sums = {
        crop_suffix(crops, c): torch.zeros(4, device=s.device, dtype=torch.float64)
        for c in range(len(crops))
    }
    for views, y in _eval_views(s, split):
        valid = y >= 0  # a streamed image that could not be read is not counted
        for suffix, x in views.items():
            with autocast(s.device, s.precision):
                logits = s.model(x)
            top5 = logits.topk(min(5, logits.shape[1]), 1).indices
            hit5 = (top5 == y[:, None]).any(1)
            row = torch.stack(
                [
                    F.cross_entropy(logits.float(), y, reduction="sum", ignore_index=-1),
                    ((logits.argmax(1) != y) & valid).sum().double(),
                    (~hit5 & valid).sum().double(),
                    valid.sum().double(),
                ]
            )
            sums[suffix] += row
    s.model.train()
    names = sorted(sums, key=len)
    totals = torch.stack([sums[k] for k in names])
    distributed.sum_(totals)
    out: dict[str, float] = {}
    for suffix, (loss, wrong, wrong5, n) in zip(names, totals.tolist()):
        n = max(n, 1.0)
        out |= {f"loss{suffix}": loss / n, f"error{suffix}": 100.0 * wrong / n}
        out[f"top5_error{suffix}"] = 100.0 * wrong5 / n
    return out


def _eval_views(s: Setup, split: Split | FileSplit):
    """``({crop suffix: images}, labels)`` batches of this rank's share of a split."""
    dist = distributed.current()
    if isinstance(split, FileSplit):
        yield from stream_eval_batches(
            split, s.cfg.data, s.device, s.cfg.trainer.channels_last, dist.rank, dist.world
        )
        return
    shard = split.subset(torch.arange(dist.rank, len(split), dist.world)) if dist.enabled else split
    for x, y in eval_batches(
        shard, s.cfg.data.eval_batch_size, s.normalize, s.device, s.cfg.trainer.channels_last
    ):
        yield {"": x}, y


def model_from_config(cfg: Config, num_classes: int) -> CifarResNet:
    """The net ``cfg.model`` and ``cfg.depth`` describe, for the trainer and diagnostics."""
    family = resolve_family(cfg.model.family.value, is_streamed(cfg.data))
    unit = family_unit(family, cfg.depth, cfg.model.unit.value)
    return build_model(
        cfg.model.block.value,
        cfg.depth,
        num_classes,
        unit,
        cfg.model.downsample.value,
        cfg.model.width,
        cfg.model.checkpointing,
        shortcut=cfg.model.shortcut,
        family=family,
    )


def train(cfg: Config, run_dir: Path, stop: StopRequest | None = None) -> dict[str, Any]:
    """Train (or continue) one run in ``run_dir``; SIGINT/SIGTERM stop it cleanly (train/stop.py)."""
    t_start = time.perf_counter()
    stop = stop or StopRequest()
    flat = flat_config(cfg)
    fp = fingerprint(flat)
    # A resume is checked against the checkpoint before any data is loaded.
    state, changes = None, []
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        changes = check_resumable(state, flat, ckpt_path)
    elif not cfg.dry_run and (run_dir / CHECKPOINT).exists():
        raise UserError(
            f"{run_dir} already holds a run ({CHECKPOINT}); continue it with resume={run_dir} "
            f"(or resume=auto), or pass another hydra.run.dir"
        )
    s = build_setup(cfg)
    info = s.info
    log.info(
        "%s ResNet-%d (%s units), %s params | %s: %d train images | %d steps on %s, %s",
        info["block"],
        info["depth"],
        info["unit"],
        f"{info['params']:,}",
        info["data_source"],
        info["train_images"],
        s.total_steps,
        s.device,
        s.precision,
    )
    if cfg.dry_run:
        print(json.dumps(info, indent=2))
        return info

    model, loader, device = s.model, s.loader, s.device
    optimizer = build_optimizer(model, cfg.optimizer, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, cfg.schedule, s.total_steps, s.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "fp16")
    t = cfg.trainer
    train_step = make_train_step(
        s.train_model,
        optimizer,
        scaler,
        device,
        s.precision,
        t.compile,
        t.compile_mode,
        t.cuda_graphs,
        hooks=t.log_gradflow_every > 0,
    )
    gradflow = GradFlowMonitor(model, t.log_gradflow_every)
    dist = distributed.current()

    # Running sums stay on the device; they are read (one sync) every log_every steps.
    zero = torch.zeros((), device=device)
    loss_sum, wrong_sum, seen = zero.clone(), zero.clone(), 0  # this logging interval
    ep_loss, ep_wrong, ep_seen = zero.clone(), zero.clone(), 0  # this epoch
    step, best, history = 0, math.inf, []
    last_eval: dict[str, float] = {}
    train_loss = train_err = math.nan

    # Resume: weights, optimizer, schedule, scaler, data position, RNG states and the
    # partial sums of the current epoch and logging interval, so that the continuation
    # computes exactly what an uninterrupted run would have.
    if state is not None:
        if state.get("world", 1) != dist.world:
            raise UserError(
                f"{ckpt_path} was written by a run of {state.get('world', 1)} processes; resume it "
                f"with the same number (this run has {dist.world}): the data order is split by rank"
            )
        if dist.enabled:  # this rank's own data position, RNG and partial sums
            state = {**state, **state["ranks"][dist.rank]}
        if state["step"] > s.total_steps:
            raise UserError(
                f"{ckpt_path} is at step {state['step']}, past this run's {s.total_steps} steps; "
                f"pass a larger trainer.max_steps or trainer.epochs"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, best = state["step"], state["best_error"]
        history = state.get("throughput", [])
        if "progress" in state:
            p = state["progress"]
            loss_sum, wrong_sum, seen = (
                p["loss_sum"].to(device),
                p["wrong_sum"].to(device),
                p["seen"],
            )
            ep_loss, ep_wrong, ep_seen = (
                p["ep_loss"].to(device),
                p["ep_wrong"].to(device),
                p["ep_seen"],
            )
            train_loss, train_err, last_eval = p["train_loss"], p["train_error"], p["last_eval"]
        for change in changes:
            log.info("resuming with a changed setting: %s", change)
        if any(c.startswith(("trainer.epochs", "trainer.max_steps")) for c in changes):
            log.info(
                "the learning-rate schedule continues as saved (milestones of the original length)"
            )
        if step == s.total_steps:
            log.info("%s is already at the run's last step %d; nothing to do", ckpt_path, step)
            summary_path = run_dir / SUMMARY
            return json.loads(summary_path.read_text()) if summary_path.exists() else info
        log.info(
            "resumed from %s at step %d (epoch %d)",
            ckpt_path,
            step,
            loader.epoch + 1 + (loader.pos == loader.steps_per_epoch),
        )
    records = RunRecords(run_dir, start_step=step, enabled=dist.is_main)
    ckpt_step = step if ckpt_path is not None else None

    def checkpoint() -> None:
        nonlocal ckpt_step
        ckpt_step = step
        # What differs between ranks: each one's data position, RNG and partial sums.
        own = {
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "progress": {
                "loss_sum": loss_sum.cpu(),
                "wrong_sum": wrong_sum.cpu(),
                "seen": seen,
                "ep_loss": ep_loss.cpu(),
                "ep_wrong": ep_wrong.cpu(),
                "ep_seen": ep_seen,
                "train_loss": train_loss,
                "train_error": train_err,
                "last_eval": last_eval,
            },
        }
        ranks = distributed.gather_to_main(own)
        if not dist.is_main:
            return
        save_checkpoint(
            run_dir / CHECKPOINT,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                **own,
                "step": step,
                "best_error": best,
                "world": dist.world,
                **({"ranks": ranks} if dist.enabled else {}),
                "throughput": history,
                "fingerprint": fp,
                "fingerprint_hash": fingerprint_hash(fp),
                "config": OmegaConf.to_container(
                    OmegaConf.structured(cfg), resolve=True, enum_to_str=True
                ),
                "overrides": _run_overrides(),
            },
        )

    def stop_agreed() -> bool:
        """The stop flag: a Python attribute, no device sync. In a data-parallel run the
        ranks agree on it (a host-side all-reduce), so all of them stop after the same step."""
        agreed = distributed.any_rank(stop.requested)  # one read per poll
        if agreed:
            stop.request()  # no-op on the rank that asked; the others take the same stop
        return agreed

    def interrupted(completed: bool) -> Interrupted:
        assert stop.signum is not None
        if not completed:
            records.summary(
                {
                    **info,
                    "status": "interrupted",
                    "signal": signal_name(stop.signum),
                    "steps_done": step,
                    "checkpoint": str(run_dir / CHECKPOINT),
                }
            )
        records.close()
        return Interrupted(stop.signum, step, run_dir / CHECKPOINT)

    bad_step = torch.full((), -1, device=device, dtype=torch.int64)
    step_t = torch.full((), step, device=device, dtype=torch.int64)
    epochs_total = math.ceil(s.total_steps / loader.steps_per_epoch)
    eval_name, eval_split = s.data.eval_name, s.data.eval_split
    t_mark, images_mark = time.perf_counter(), 0

    model.train()
    try:
        with stop.installed():
            while step < s.total_steps:
                epoch = loader.epoch + (loader.pos == loader.steps_per_epoch)
                todo = min(
                    loader.steps_per_epoch - loader.pos % loader.steps_per_epoch,
                    s.total_steps - step,
                )
                bar = tqdm(
                    total=todo,
                    desc=f"epoch {epoch + 1}/{epochs_total}",
                    disable=not (cfg.trainer.progress and dist.is_main),
                    leave=False,
                    dynamic_ncols=True,
                )
                for _ in range(todo):
                    x, y = loader.next()
                    with gradflow.watch(step + 1, scaler) as measured:
                        loss, logits = train_step(x, y, plain=measured)
                    gradflow.log(records, step + 1)
                    scheduler.step()

                    step += 1
                    step_t += 1
                    loss = loss.float()
                    bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step_t, bad_step)
                    wrong = (logits.argmax(1) != y).sum()
                    loss_sum += loss * len(y)
                    wrong_sum += wrong
                    ep_loss += loss * len(y)
                    ep_wrong += wrong
                    seen += len(y)
                    ep_seen += len(y)
                    images_mark += len(y) * dist.world
                    bar.update()

                    if step % cfg.trainer.log_every == 0 or step == s.total_steps:
                        bad, (lsum, wsum) = _reduced(bad_step, loss_sum, wrong_sum)
                        if bad >= 0:
                            bar.close()
                            raise NonFiniteLoss(int(bad))
                        now = time.perf_counter()
                        ips = images_mark / (now - t_mark)
                        history.append((images_mark, now - t_mark))
                        n = seen * dist.world
                        train_loss, train_err = lsum / n, 100.0 * wsum / n
                        lr = optimizer.param_groups[0]["lr"]
                        records.scalars(
                            step,
                            {
                                "train/loss": train_loss,
                                "train/error": train_err,
                                "lr": lr,
                                "throughput/images_per_s": ips,
                            },
                        )
                        bar.set_postfix(
                            loss=f"{train_loss:.3f}", err=f"{train_err:.1f}%", img_s=f"{ips:.0f}"
                        )
                        # A run's last interval may be partial: its sums go on in a resumed
                        # run, which then logs the same points as an uninterrupted one.
                        if step % cfg.trainer.log_every == 0:
                            loss_sum.zero_(), wrong_sum.zero_()
                            seen = 0
                        t_mark, images_mark = time.perf_counter(), 0
                    if stop_agreed():
                        break
                bar.close()

                epoch_done = loader.pos == loader.steps_per_epoch
                done = step == s.total_steps
                if not (epoch_done or done):  # stopped mid-epoch on request
                    bad, _ = _reduced(bad_step)
                    if bad >= 0:  # never checkpoint a diverged model
                        raise NonFiniteLoss(int(bad))
                    checkpoint()
                    raise interrupted(completed=False)

                # End of an epoch (or of the run): evaluate, record, checkpoint.
                t_eval = time.perf_counter()
                bad, (ep_l, ep_w) = _reduced(bad_step, ep_loss, ep_wrong)
                ep_n = ep_seen * dist.world
                if bad >= 0:  # never checkpoint a diverged model
                    raise NonFiniteLoss(int(bad))
                # Scheduled evaluations count towards the best error; the one at the end of
                # a run that stops mid-epoch (max_steps) only towards this run's summary.
                scheduled = epoch_done and (epoch + 1) % cfg.trainer.eval_every == 0
                if scheduled or done:
                    ev = evaluate(s, eval_split)
                    e_loss, e_err = ev["loss"], ev["error"]
                    if scheduled:
                        best = min(best, e_err)
                    last_eval = {f"{eval_name}_{k}": v for k, v in ev.items()}
                    records.scalars(step, {f"{eval_name}/{k}": v for k, v in ev.items()})
                    records.evaluation(
                        {
                            "step": step,
                            "epoch": epoch + 1,
                            "train_loss": ep_l / max(ep_n, 1),
                            "train_error": 100.0 * ep_w / max(ep_n, 1),
                            **last_eval,
                            "lr": optimizer.param_groups[0]["lr"],
                            "time_s": round(time.perf_counter() - t_start, 2),
                        }
                    )
                    log.info(
                        "epoch %d/%d step %d | train loss %.4f err %.2f%% | %s loss %.4f err %.2f%%",
                        epoch + 1,
                        epochs_total,
                        step,
                        ep_l / max(ep_n, 1),
                        100.0 * ep_w / max(ep_n, 1),
                        eval_name,
                        e_loss,
                        e_err,
                    )
                if epoch_done:
                    ep_loss.zero_(), ep_wrong.zero_()
                    ep_seen = 0
                checkpoint()
                # evaluation and saving are not training throughput
                t_mark += time.perf_counter() - t_eval
                if stop_agreed() and not done:
                    raise interrupted(completed=False)

            summary = dict(info)
            if s.data.val is not None:
                summary.update({f"test_{k}": v for k, v in evaluate(s, s.data.test).items()})
            summary.update(
                status="completed",
                steps_done=step,
                final_train_loss=train_loss,
                final_train_error=train_err,
                **{f"final_{k}": v for k, v in last_eval.items()},
                **{f"best_{eval_name}_error": min(best, last_eval.get(f"{eval_name}_error", best))},
                train_images_per_s=steady_throughput(history),
                **(loader.report() if isinstance(loader, StreamLoader) else {}),
                wall_time_s=round(time.perf_counter() - t_start, 2),
            )
            records.summary(summary, flat)
            if stop.requested:  # it came during the last evaluation: done, but stop a sweep
                raise interrupted(completed=True)
            records.close()
            return summary

    except NonFiniteLoss as e:
        records.summary(
            {**info, "status": "diverged", "diverged_at_step": e.args[0], "steps_done": step},
            flat,
        )
        records.close()
        kept = (
            f"last good checkpoint: {run_dir / CHECKPOINT} (step {ckpt_step})"
            if ckpt_step is not None
            else "no checkpoint was written before it"
        )
        raise Diverged(
            f"loss became non-finite at step {e.args[0]}; training stopped, {kept}"
        ) from None


def _run_overrides() -> list[str]:
    """This run's command-line overrides, kept in the checkpoint for ``resume=PATH``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return resumable_overrides(list(HydraConfig.get().overrides.task))


def _reduced(bad_step: torch.Tensor, *sums: torch.Tensor) -> tuple[int, list[float]]:
    """One host sync: the first non-finite step (-1: none; the earliest over the
    ranks) and the device sums, added over the ranks."""
    values = torch.stack([*(t.double() for t in sums), bad_step.double()])
    values[-1] = torch.where(values[-1] < 0, math.inf, values[-1])
    if distributed.current().enabled:
        distributed.sum_(values[:-1])
        distributed.min_(values[-1:])
    *totals, bad = values.tolist()
    return (-1 if math.isinf(bad) else int(bad)), totals


def steady_throughput(history: list[tuple[int, float]]) -> float:
    """Images/s over all logging intervals but the first (start-up, autotuning, compilation)."""
    rest = history[1:] or history
    images, seconds = sum(h[0] for h in rest), sum(h[1] for h in rest)
    return images / seconds if seconds > 0 else math.nan
