"""The training loop: one step at a time, end-of-epoch work where a step closes an epoch.

``Trainer`` holds one run: its set-up (train/setup.py), the owners of its state
(model, optimizer, schedule, scaler, loader, RNG, running metrics), its records
and its stop flag. Nothing lives in module globals, so several runs can share a
process. ``Trainer.run`` returns the run's ``RunResult`` (train/result.py), which
the CLI and the launchers read; ``train(cfg, run_dir)`` is the entry for Python
callers, which raises for a run that did not complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resnet_exp.config import Config, flat_config, parse_duration
from resnet_exp.models.gradflow import GradFlowMonitor
from resnet_exp.run import distributed
from resnet_exp.run.checkpoint import CHECKPOINT, Checkpoint
from resnet_exp.run.records import SUMMARY, RunRecords
from resnet_exp.run.result import RunResult, Status, SummaryKey
from resnet_exp.run.resume import Resume, Stateful, resumable_overrides
from resnet_exp.run.runtime import GlobalRNG
from resnet_exp.run.stop import TIME_LIMIT, StopRequest, TimeLimit
from resnet_exp.train.evaluation import evaluate
from resnet_exp.train.metrics import Mean, RunningMetrics
from resnet_exp.train.progress import Progress
from resnet_exp.train.pruning import EvaluationReporter
from resnet_exp.train.setup import Setup, build_setup

log = logging.getLogger("resnet_exp")


def train(cfg: Config, run_dir: Path, stop: StopRequest | None = None) -> RunResult:
    """Train (or continue) one run in ``run_dir``; SIGINT/SIGTERM stop it cleanly (train/stop.py),
    and so does ``trainer.time_limit`` (counted from the call, or from ``stop.started``).

    Returns the completed run's result; a stopped run raises ``Interrupted``, a
    diverged one ``Diverged`` (``RunResult.check``).
    """
    return Trainer(cfg, run_dir, stop).run().check()


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        stop: StopRequest | None = None,
        pruning: EvaluationReporter | None = None,
    ) -> None:
        self.t_start = time.perf_counter()
        self.cfg, self.run_dir, self.stop = cfg, run_dir, stop or StopRequest()
        self.flat = flat_config(cfg)
        self.dist = distributed.current()
        # A resume is loaded and checked once, before any data is loaded.
        self.resume = Resume.find(
            cfg.resume, run_dir, self.flat, self.dist.world, fresh_ok=cfg.dry_run
        )
        self.s: Setup = build_setup(cfg)
        self.metrics = RunningMetrics(self.s.device, self.dist.world)
        self.gradflow = GradFlowMonitor(self.s.model, cfg.trainer.log_gradflow_every)
        self.steps_per_epoch = self.s.loader.steps_per_epoch
        self.time_limit = self._time_limit()
        self.step = 0
        self.ckpt_step: int | None = None  # the last checkpoint written (or resumed from)
        self.diverged_at: int | None = None
        # A search's trial: each scheduled evaluation is reported, and the pruner may
        # stop the run after it (train/pruning.py; every rank holds one, or none does).
        self.pruning = pruning
        self.pruned_at: int | None = None  # the epoch after which the pruner stopped it
        self.t_mark, self.images = time.perf_counter(), 0  # the throughput window
        self.records = RunRecords(run_dir, enabled=False)  # opened by run()

    # --- the run, top to bottom ---------------------------------------------------

    def run(self) -> RunResult:
        s, info = self.s, self.s.info
        log.info(
            "%s ResNet-%d (%s units), %s params | %s: %d train images | %d steps on %s, %s",
            *(info[k] for k in ("block", "depth", "unit")),
            f"{info['params']:,}",
            info["data_source"],
            info["train_images"],
            s.total_steps,
            s.device,
            s.precision,
        )
        if self.cfg.dry_run:
            print(json.dumps(info, indent=2))
            return RunResult(Status.completed, info)
        if self.resume is not None:
            done = self.apply_resume()
            if done is not None:
                return done

        ended: Status | None = None
        measured: dict[str, Any] = {}
        progress = Progress(
            self.step,
            s.total_steps,
            self.steps_per_epoch,
            enabled=self.cfg.trainer.progress and self.dist.is_main,
        )
        with (
            RunRecords(self.run_dir, self.step, enabled=self.dist.is_main) as self.records,
            self.stop.installed(),
        ):
            s.model.train()
            self.t_mark, self.images = time.perf_counter(), 0
            if self.time_limit is not None:
                self.time_limit.begin()
            try:
                for step in range(self.step + 1, s.total_steps + 1):
                    self.train_step()
                    self.gradflow.log(self.records, step)
                    progress.step(step)
                    ended = self.finish_step(step, progress)
                    if ended is not None:
                        break
                if ended is Status.completed:
                    measured = self.final_summary()
            except Exception as e:  # an internal error: the summary says so
                self.record(RunResult(Status.failed, dict(s.info), f"{type(e).__name__}: {e}"))
                raise
            finally:  # a second signal (Abort) leaves at once: nothing more is written
                progress.close()
            assert ended is not None
            return self.record(self.result(ended, measured))

    def train_step(self) -> None:
        """One optimisation step and its metrics (device ops only, no host sync)."""
        s = self.s
        x, y = s.loader.next()
        with self.gradflow.watch(self.step + 1, s.scaler) as measured:
            loss, logits = s.train_step(x, y, plain=measured)
        s.scheduler.step()
        self.step += 1
        self.metrics.update(loss, logits, y)
        self.images += len(y) * self.dist.world

    def finish_step(self, step: int, progress: Progress) -> Status | None:
        """Logging, end-of-epoch work, stop, divergence and pruning: where every step's outcome is
        decided; None: go on, else how the run ends."""
        total, m = self.s.total_steps, self.metrics
        logs = step % self.cfg.trainer.log_every == 0 or step == total
        closes_epoch = step % self.steps_per_epoch == 0 or step == total
        if logs or closes_epoch:
            bad, interval, epoch = m.reduce()  # one host sync
            if bad is not None:  # never evaluate or checkpoint a diverged model
                return self.diverge(bad)
            if logs:
                self.log_interval(step, interval, progress)
            if closes_epoch:
                self.end_of_epoch(step, epoch)  # evaluate, record, checkpoint
        if step == total:
            return Status.completed
        # Every rank asks (a collective); only rank 0's pruner can have said stop.
        asks = closes_epoch and self.pruning is not None
        if asks and distributed.any_rank(self.pruned_at is not None):
            return Status.pruned  # checkpointed at this step by end_of_epoch
        if self.time_limit is not None and distributed.any_rank(self.time_limit.reached()):
            self.stop.time_up()  # the signal's clean stop, below
        if not self.stop_agreed():
            return None
        if self.ckpt_step != step:  # stopped mid-epoch: checkpoint here, if finite
            bad, _, _ = m.reduce()
            if bad is not None:
                return self.diverge(bad)
            self.timed_checkpoint(step)
        return Status.interrupted

    # --- the pieces ---------------------------------------------------------------

    def apply_resume(self) -> RunResult | None:
        """Continue from the checkpoint; a run already at its end returns its summary."""
        r, s = self.resume, self.s
        assert r is not None
        r.check_length(s.total_steps)
        r.apply(
            {**self.shared_state(), **self.rank_state()},
            rank=self.dist.rank if self.dist.enabled else None,
        )
        self.step = self.ckpt_step = r.step
        if self.step == s.total_steps:
            log.info("%s is already at the run's last step %d; nothing to do", r.path, self.step)
            path = self.run_dir / SUMMARY
            if not path.exists():
                return RunResult(Status.completed, s.info)
            return RunResult.from_summary(json.loads(path.read_text()))
        log.info(
            "resumed from %s at step %d (epoch %d)",
            r.path,
            self.step,
            self.step // self.steps_per_epoch + 1,
        )
        return None

    def log_interval(self, step: int, interval: Mean, progress: Progress) -> None:
        m, now = self.metrics, time.perf_counter()
        ips = self.images / (now - self.t_mark)
        m.throughput.append((self.images, now - self.t_mark))
        m.train = interval
        self.records.scalars(
            step,
            {
                "train/loss": interval.loss,
                "train/error": interval.error,
                "lr": self.s.optimizer.param_groups[0]["lr"],
                "throughput/images_per_s": ips,
            },
        )
        progress.logged(step, interval.loss, interval.error, ips)
        # A run's last interval may be partial: its sums go on in a resumed run,
        # which then logs the same points as an uninterrupted one.
        if step % self.cfg.trainer.log_every == 0:
            m.interval.reset()
        self.t_mark, self.images = time.perf_counter(), 0

    def end_of_epoch(self, step: int, epoch_mean: Mean) -> None:
        """Evaluate (on schedule, and at the run's end), record, checkpoint."""
        t_eval, m, s = time.perf_counter(), self.metrics, self.s
        epoch = (step - 1) // self.steps_per_epoch  # 0-based: the epoch this step closes
        closes_epoch = step % self.steps_per_epoch == 0
        # Scheduled evaluations count towards the best error; the one at the end of a
        # run that stops mid-epoch (max_steps) only towards this run's summary.
        scheduled = closes_epoch and (epoch + 1) % self.cfg.trainer.eval_every == 0
        if scheduled or step == s.total_steps:
            name = s.data.eval_name
            with self.timed("eval"):
                ev, _ = evaluate(s, s.data.eval_split)
            loss, err = ev["loss"], ev["error"]
            if scheduled:
                m.best = min(m.best, err)
                if self.pruning is not None and self.pruning.should_stop(epoch + 1, err):
                    self.pruned_at = epoch + 1
            m.last_eval = {f"{name}_{k}": v for k, v in ev.items()}
            self.records.scalars(step, {f"{name}/{k}": v for k, v in ev.items()})
            self.records.evaluation(
                {
                    "step": step,
                    "epoch": epoch + 1,
                    "train_loss": epoch_mean.loss,
                    "train_error": epoch_mean.error,
                    **m.last_eval,
                    "lr": s.optimizer.param_groups[0]["lr"],
                    "time_s": round(time.perf_counter() - self.t_start, 2),
                }
            )
            log.info(
                "epoch %d/%d step %d | train loss %.4f err %.2f%% | %s loss %.4f err %.2f%%",
                epoch + 1,
                math.ceil(s.total_steps / self.steps_per_epoch),
                step,
                epoch_mean.loss,
                epoch_mean.error,
                name,
                loss,
                err,
            )
        if closes_epoch:
            m.epoch.reset()
        self.timed_checkpoint(step)
        self.t_mark += time.perf_counter() - t_eval  # evaluating and saving are not training

    def _time_limit(self) -> TimeLimit | None:
        """``trainer.time_limit``, with what the first estimate of a stop's cost needs."""
        s = self.s
        state = sum(p.numel() * p.element_size() for p in s.model.parameters())
        evaluated = len(s.data.eval_split) + (len(s.data.test) if s.data.val is not None else 0)
        return TimeLimit.of(
            parse_duration(self.cfg.trainer.time_limit),
            self.stop,
            eval_images=evaluated,
            batch_size=self.cfg.data.batch_size,
            state_bytes=2 * state,  # weights and momentum
            log_every=self.cfg.trainer.log_every,
        )

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """An evaluation or a checkpoint write, measured for the time limit's estimate."""
        if self.time_limit is None:
            yield
            return
        with self.time_limit.timed(what):
            yield

    def timed_checkpoint(self, step: int) -> None:
        with self.timed("checkpoint"):
            self.checkpoint(step)

    def stop_agreed(self) -> bool:
        """The stop flag: a Python attribute, no device sync. In a data-parallel run the
        ranks agree on it (a host-side all-reduce), so all of them stop after the same step."""
        requested = self.stop.requested  # one read per poll
        agreed = distributed.any_rank(requested)
        if agreed and not requested:
            self.stop.request()  # the others take the same stop
        return agreed

    def diverge(self, step: int) -> Status:
        self.diverged_at = step
        return Status.diverged

    # --- state and its checkpoint -------------------------------------------------

    def shared_state(self) -> dict[str, Stateful]:
        """Owners whose state is the same on every rank."""
        s = self.s
        return {
            "model": s.model,
            "optimizer": s.optimizer,
            "scheduler": s.scheduler,
            "scaler": s.scaler,
        }

    def rank_state(self) -> dict[str, Stateful]:
        """Owners whose state differs between ranks: data position, RNG, running sums."""
        return {"loader": self.s.loader, "rng": GlobalRNG(), "metrics": self.metrics}

    def checkpoint(self, step: int) -> None:
        """The owners' state dicts side by side, with what a resume checks them against."""
        self.ckpt_step = step
        own = {name: owner.state_dict() for name, owner in self.rank_state().items()}
        ranks = distributed.gather_to_main(own)
        if not self.dist.is_main:
            return
        shared = {name: owner.state_dict() for name, owner in self.shared_state().items()}
        Checkpoint.of_run(
            self.run_dir / CHECKPOINT,
            {**shared, **own},
            step=step,
            world=self.dist.world,
            ranks=ranks if self.dist.enabled else None,
            cfg=self.cfg,
            overrides=_run_overrides(),
        ).save()

    # --- the end ------------------------------------------------------------------

    def final_summary(self) -> dict[str, Any]:
        m, data = self.metrics, self.s.data
        out: dict[str, Any] = {}
        if data.val is not None:  # the test set, once, at the end
            out.update({f"test_{k}": v for k, v in evaluate(self.s, data.test)[0].items()})
        out.update(self.last_evaluation())
        out[SummaryKey.final_train_loss] = m.train.loss
        out[SummaryKey.final_train_error] = m.train.error
        out[SummaryKey.train_images_per_s] = m.steady_throughput()
        out.update(self.s.loader.report())  # streamed data: skipped images
        return out

    def last_evaluation(self) -> dict[str, Any]:
        """The last evaluation on the evaluated split, and its best error."""
        m, name = self.metrics, self.s.data.eval_name
        out = {SummaryKey.final(name, k.split("_", 1)[1]): v for k, v in m.last_eval.items()}
        out[SummaryKey.best(name)] = min(m.best, m.last_eval.get(f"{name}_error", m.best))
        return out

    def result(self, ended: Status, measured: dict[str, Any]) -> RunResult:
        """How the run ended, from how its last step ended: decided here alone."""
        k, path = SummaryKey, self.run_dir / CHECKPOINT
        summary, message = {**self.s.info, **measured}, None
        if ended is Status.diverged:
            summary[k.diverged_at_step] = self.diverged_at
            kept = (
                f"last good checkpoint: {path} (step {self.ckpt_step})"
                if self.ckpt_step is not None
                else "no checkpoint was written before it"
            )
            message = f"loss became non-finite at step {self.diverged_at}; training stopped, {kept}"
        if ended is Status.pruned:  # where it stopped; no test set (it was not trained to the end)
            summary.update(self.last_evaluation())
            summary[k.pruned_at_epoch] = self.pruned_at
            error = summary.get(k.final(self.s.data.eval_name, "error"), math.nan)
            message = (
                f"pruned after epoch {self.pruned_at} ({self.s.data.eval_name} error "
                f"{error:.2f}%): behind the search's other trials; checkpoint: {path}"
            )
            log.info("%s", message)
        # A stop asked for during the last evaluation ends a sweep too, the run being complete.
        stop = None
        if self.stop.signum is not None and ended is not Status.diverged:
            stop = self.stop.reason
            message = f"stopped by {stop} after step {self.step}; checkpoint: {path}"
        elif ended is Status.interrupted and self.time_limit is not None and self.stop.timed_out:
            stop = TIME_LIMIT
            message = (
                f"stopped at the time limit (trainer.time_limit={self.cfg.trainer.time_limit}) "
                f"after step {self.step} of {self.s.total_steps}, {self.time_limit.left():.1f} s "
                f"before it; checkpoint: {path}"
            )
        if ended in (Status.interrupted, Status.pruned):
            summary[k.checkpoint] = str(path)
        return RunResult(ended, summary, message, reason=stop)

    def record(self, result: RunResult) -> RunResult:
        """summary.json, once, however the run ended (an abort writes nothing)."""
        summary = result.summary
        summary[SummaryKey.steps_done] = self.step
        if result.status is not Status.interrupted:
            summary[SummaryKey.wall_time_s] = round(time.perf_counter() - self.t_start, 2)
        # HPARAMS for a run that ended; an interrupted one writes them when it does.
        self.records.summary(summary, None if result.status is Status.interrupted else self.flat)
        return result


def _run_overrides() -> list[str]:
    """This run's command-line overrides, kept in the checkpoint for ``resume=PATH``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return resumable_overrides(list(HydraConfig.get().overrides.task))
