"""The training loop, top to bottom: set up, train, evaluate, checkpoint, summarise."""

from __future__ import annotations

import hashlib
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
from tqdm import tqdm

from resnet_exp.config import Config
from resnet_exp.data import Normalize, Split, TrainLoader, eval_batches, load_dataset
from resnet_exp.errors import UserError
from resnet_exp.models import ORDERINGS, build_model, count_params, resolve_unit
from resnet_exp.train.checkpoint import CHECKPOINT, load_checkpoint, resolve_resume, save_checkpoint
from resnet_exp.train.optim import build_optimizer, build_scheduler, warmup_on
from resnet_exp.train.records import RunRecords
from resnet_exp.train.runtime import (
    autocast,
    pick_device,
    pick_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger("resnet_exp")


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Setup:
    """Everything built before the first step."""

    cfg: Config
    device: torch.device
    precision: str
    model: nn.Module
    data: Any
    loader: TrainLoader
    normalize: Normalize
    total_steps: int
    warmup: bool
    info: dict[str, Any] = field(default_factory=dict)


def build_setup(cfg: Config) -> Setup:
    device = pick_device(cfg.trainer.device)
    precision = pick_precision(str(cfg.trainer.precision.value), device)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    block, unit = cfg.model.block.value, cfg.model.unit.value
    unit, _ = resolve_unit(cfg.depth, unit)  # a bad depth fails before data loading
    if cfg.data.batch_size < 1:
        raise UserError(f"data.batch_size={cfg.data.batch_size} must be at least 1")
    if cfg.data.eval_batch_size < 1:
        raise UserError(f"data.eval_batch_size={cfg.data.eval_batch_size} must be at least 1")

    data = load_dataset(cfg.data)
    if cfg.data.batch_size > len(data.train):
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {len(data.train)} training images"
        )
    model = build_model(
        block,
        cfg.depth,
        data.num_classes,
        unit,
        cfg.model.downsample.value,
        cfg.model.width,
        cfg.model.checkpointing,
        shortcut=cfg.model.shortcut,
    )
    info = {
        "block": block,
        "depth": cfg.depth,
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
    }
    model = model.to(
        device,
        memory_format=torch.channels_last if cfg.trainer.channels_last else torch.preserve_format,
    )
    normalize = Normalize(data.mean, data.std, device)
    loader = TrainLoader(
        data.train,
        cfg.data.batch_size,
        normalize,
        device,
        cfg.seed,
        augment=cfg.data.augment,
        pad=cfg.data.pad,
        channels_last=cfg.trainer.channels_last,
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
    warmup = warmup_on(cfg.schedule, cfg.depth, ORDERINGS[block].is_preact)
    info.update(
        steps=steps,
        steps_per_epoch=loader.steps_per_epoch,
        batch_size=cfg.data.batch_size,
        warmup=warmup,
    )
    return Setup(cfg, device, precision, model, data, loader, normalize, steps, warmup, info)


def config_fingerprint(cfg: Config) -> dict[str, Any]:
    """The parts of the config a checkpoint's weights and data order depend on."""
    c = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    data = {
        k: c["data"][k] for k in ("name", "image_size", "train_limit", "val_size", "num_classes")
    }
    return {"model": c["model"], "depth": c["depth"], "data": data}


def plain_config(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def _hash(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@torch.inference_mode()
def evaluate(s: Setup, split: Split) -> tuple[float, float]:
    """Mean loss and error (%) on a split; one host sync at the end."""
    s.model.eval()
    loss_sum = torch.zeros((), device=s.device)
    wrong = torch.zeros((), device=s.device, dtype=torch.int64)
    for x, y in eval_batches(
        split, s.cfg.data.eval_batch_size, s.normalize, s.device, s.cfg.trainer.channels_last
    ):
        with autocast(s.device, s.precision):
            logits = s.model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        wrong += (logits.argmax(1) != y).sum()
    s.model.train()
    loss, wrong_n = torch.stack([loss_sum, wrong.double()]).tolist()
    return loss / len(split), 100.0 * wrong_n / len(split)


def train(cfg: Config, run_dir: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
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
    step_fn = model
    if cfg.trainer.compile:
        step_fn = torch.compile(model)

    # Resume: weights, optimizer, schedule, scaler, data position and RNG states.
    fingerprint = config_fingerprint(cfg)
    step, best, history = 0, math.inf, []
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, map_location=device)
        if state.get("fingerprint_hash") != _hash(fingerprint):
            old = state.get("fingerprint", {})
            changed = sorted(
                k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)
            )
            raise UserError(
                f"cannot resume from {ckpt_path}: the model or data config differs ({', '.join(changed)}); "
                f"use the run's own config or start a new run"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, best = state["step"], state["best_error"]
        history = state.get("throughput", [])
        log.info("resumed from %s at step %d (epoch %d)", ckpt_path, step, loader.epoch + 1)
    records = RunRecords(run_dir, start_step=step)

    ckpt_step = step if ckpt_path is not None else None

    def checkpoint() -> None:
        nonlocal ckpt_step
        ckpt_step = step
        save_checkpoint(
            run_dir / CHECKPOINT,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "loader": loader.state_dict(),
                "rng": rng_state(),
                "step": step,
                "best_error": best,
                "throughput": history,
                "fingerprint": fingerprint,
                "fingerprint_hash": _hash(fingerprint),
                "config": OmegaConf.to_container(
                    OmegaConf.structured(cfg), resolve=True, enum_to_str=True
                ),
            },
        )

    # Running sums stay on the device; they are read (one sync) every log_every steps.
    zero = torch.zeros((), device=device)
    loss_sum, wrong_sum, seen = zero.clone(), zero.clone(), 0
    bad_step = torch.full((), -1, device=device, dtype=torch.int64)
    step_t = torch.full((), step, device=device, dtype=torch.int64)
    epochs_total = math.ceil(s.total_steps / loader.steps_per_epoch)
    eval_name, eval_split = s.data.eval_name, s.data.eval_split
    last_eval: dict[str, float] = {}
    train_loss = train_err = math.nan
    t_mark, images_mark = time.perf_counter(), 0

    model.train()
    try:
        while step < s.total_steps:
            epoch = loader.epoch + (loader.pos == loader.steps_per_epoch)
            todo = min(
                loader.steps_per_epoch - loader.pos % loader.steps_per_epoch, s.total_steps - step
            )
            bar = tqdm(
                total=todo,
                desc=f"epoch {epoch + 1}/{epochs_total}",
                disable=not cfg.trainer.progress,
                leave=False,
                dynamic_ncols=True,
            )
            ep_loss, ep_wrong, ep_seen = zero.clone(), zero.clone(), 0
            for _ in range(todo):
                x, y = loader.next()
                with autocast(device, s.precision):
                    logits = step_fn(x)
                    loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()

                step += 1
                step_t += 1
                loss = loss.detach().float()
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step_t, bad_step)
                wrong = (logits.detach().argmax(1) != y).sum()
                loss_sum += loss * len(y)
                wrong_sum += wrong
                ep_loss += loss * len(y)
                ep_wrong += wrong
                seen += len(y)
                ep_seen += len(y)
                images_mark += len(y)
                bar.update()

                if step % cfg.trainer.log_every == 0 or step == s.total_steps:
                    lsum, wsum, bad = torch.stack([loss_sum, wrong_sum, bad_step.double()]).tolist()
                    if bad >= 0:
                        bar.close()
                        raise NonFiniteLoss(int(bad))
                    now = time.perf_counter()
                    ips = images_mark / (now - t_mark)
                    history.append((images_mark, now - t_mark))
                    train_loss, train_err = lsum / seen, 100.0 * wsum / seen
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
                    loss_sum.zero_(), wrong_sum.zero_()
                    seen = 0
                    t_mark, images_mark = time.perf_counter(), 0
            bar.close()

            # End of an epoch (or of the run): evaluate, record, checkpoint.
            done = step == s.total_steps
            t_eval = time.perf_counter()
            ep_l, ep_w, bad = torch.stack([ep_loss, ep_wrong, bad_step.double()]).tolist()
            if bad >= 0:  # never checkpoint a diverged model
                raise NonFiniteLoss(int(bad))
            if (epoch + 1) % cfg.trainer.eval_every == 0 or done:
                e_loss, e_err = evaluate(s, eval_split)
                best = min(best, e_err)
                last_eval = {f"{eval_name}_loss": e_loss, f"{eval_name}_error": e_err}
                records.scalars(step, {f"{eval_name}/loss": e_loss, f"{eval_name}/error": e_err})
                records.evaluation(
                    {
                        "step": step,
                        "epoch": epoch + 1,
                        "train_loss": ep_l / max(ep_seen, 1),
                        "train_error": 100.0 * ep_w / max(ep_seen, 1),
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
                    ep_l / max(ep_seen, 1),
                    100.0 * ep_w / max(ep_seen, 1),
                    eval_name,
                    e_loss,
                    e_err,
                )
            checkpoint()
            t_mark += (
                time.perf_counter() - t_eval
            )  # evaluation and saving are not training throughput

    except NonFiniteLoss as e:
        records.summary(
            {**info, "status": "diverged", "diverged_at_step": e.args[0], "steps_done": step},
            plain_config(cfg),
        )
        records.close()
        kept = (
            f"last good checkpoint: {run_dir / CHECKPOINT} (step {ckpt_step})"
            if ckpt_step is not None
            else "no checkpoint was written before it"
        )
        raise UserError(
            f"loss became non-finite at step {e.args[0]}; training stopped, {kept}"
        ) from None

    summary = dict(info)
    if s.data.val is not None:
        test_loss, test_err = evaluate(s, s.data.test)
        summary.update(test_loss=test_loss, test_error=test_err)
    summary.update(
        status="completed",
        steps_done=step,
        final_train_loss=train_loss,
        final_train_error=train_err,
        **{f"final_{k}": v for k, v in last_eval.items()},
        **{f"best_{eval_name}_error": best},
        train_images_per_s=steady_throughput(history),
        wall_time_s=round(time.perf_counter() - t_start, 2),
    )
    records.summary(summary, plain_config(cfg))
    records.close()
    return summary


def steady_throughput(history: list[tuple[int, float]]) -> float:
    """Images/s over all logging intervals but the first (start-up, autotuning, compilation)."""
    rest = history[1:] or history
    images, seconds = sum(h[0] for h in rest), sum(h[1] for h in rest)
    return images / seconds if seconds > 0 else math.nan
