"""The training loop: one step at a time, end-of-epoch work where a step closes an epoch.

``Trainer`` holds one run: its set-up (train/setup.py), its state and checkpoint
(train/state.py), its running metrics, its scheduled evaluations
(train/evaluation.py), its records and its stop flag. Nothing lives in module
globals, so several runs can share a process. ``Trainer.run`` returns the run's
``RunResult`` (run/result.py), which the CLI and the launchers read; ``train(cfg,
run_dir)`` is the entry for Python callers, which raises for a run that did not
complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

from resnet_exp.config import Config
from resnet_exp.models.gradflow import GradFlowMonitor
from resnet_exp.run import distributed
from resnet_exp.run.records import RunRecords
from resnet_exp.run.result import RunResult, Status
from resnet_exp.run.runtime import precision_choice
from resnet_exp.run.stop import StopRequest, TimeLimit
from resnet_exp.train.context import EvaluationReporter, RunContext, resolve
from resnet_exp.train.ending import Ending, Stopped
from resnet_exp.train.evaluation import Evaluation, Evaluator
from resnet_exp.train.metrics import Mean, RunClock, RunningMetrics
from resnet_exp.train.progress import Progress
from resnet_exp.train.setup import Setup, build_setup
from resnet_exp.train.signal import SignalTracker
from resnet_exp.train.state import RunState

log = logging.getLogger("resnet_exp")


def train(
    cfg: Config,
    run_dir: Path,
    stop: StopRequest | None = None,
    pruning: EvaluationReporter | None = None,
) -> RunResult:
    """Train (or continue) one run in ``run_dir``; SIGINT/SIGTERM stop it cleanly (run/stop.py),
    and so does ``trainer.time_limit`` (counted from the call, or from ``stop.started``).

    Returns the completed run's result; a stopped run raises ``Interrupted``, a
    diverged one ``Diverged`` (``RunResult.check``).
    """
    ctx = resolve(cfg, run_dir, stop=stop, pruning=pruning)
    return Trainer(cfg, ctx).run().check()


class Trainer:
    def __init__(self, cfg: Config, ctx: RunContext) -> None:
        self.clock = RunClock()  # the wall time counts the set-up too
        self.cfg, self.ctx = cfg, ctx
        tree, self.flat = ctx.config, ctx.flat
        self.resume = ctx.resume  # loaded and checked with the context, before any data
        self.s = build_setup(cfg, ctx)
        self.metrics = RunningMetrics(ctx.device, ctx.world.world)
        self.state = RunState(self.s, self.metrics, self.clock, tree)
        self.evaluator = Evaluator(self.s, cfg.trainer.eval_every)
        self.gradflow = GradFlowMonitor(self.s.model, cfg.trainer.log_gradflow_every)
        self.signal = SignalTracker(self.s, cfg.trainer.track_signal_every)
        self.steps_per_epoch = self.s.loader.steps_per_epoch
        self.time_limit = time_limit_of(self.s)
        self.ending = Ending(
            self.s, self.metrics, self.clock, self.evaluator, self.state, self.time_limit, self.flat
        )
        self.step = 0
        self.diverged_at: int | None = None
        self.pruned_at: int | None = None  # the epoch after which the search's pruner stopped it
        self.t_mark, self.images = time.perf_counter(), 0  # the throughput window
        self.records = RunRecords(ctx.run_dir, enabled=False)  # opened by run()

    @property
    def run_dir(self) -> Path:
        return self.ctx.run_dir

    # --- the run, top to bottom ---------------------------------------------------

    def run(self) -> RunResult:
        s, ctx = self.s, self.ctx
        choice = precision_choice(self.cfg.trainer.precision, ctx.device)
        if choice is not None:
            log.info("%s", choice)
        log.info(
            "%s, %s params | %s: %d train images | %d steps on %s, %s",
            ctx.net.name,
            f"{s.info['params']:,}",
            s.info["data_source"],
            s.info["train_images"],
            s.total_steps,
            ctx.device,
            ctx.precision.value,
        )
        if self.cfg.dry_run:
            print(json.dumps(s.info, indent=2))
            return RunResult(Status.completed, s.info)
        if self.resume is not None:
            done = self.apply_resume()
            if done is not None:
                return done
        end = self.ending
        with (
            RunRecords(
                self.run_dir, self.step, enabled=ctx.world.is_main, tracking=ctx.tracking
            ) as self.records,
            ctx.stop.installed(),
        ):
            try:
                ended = self.loop()
                measured = end.measure() if ended is Status.completed else {}
            except Exception as e:  # an internal error: the summary says so
                failed = RunResult(Status.failed, dict(s.info), f"{type(e).__name__}: {e}")
                end.record(failed, self.step, self.records)
                raise
            at = Stopped(self.step, self.diverged_at, self.pruned_at)
            return end.record(end.result(ended, at, measured), self.step, self.records)

    def loop(self) -> Status:
        """The steps from here to the run's end or a stop: how the last one ended."""
        s = self.s
        s.model.train()
        progress = Progress(
            self.step,
            s.total_steps,
            self.steps_per_epoch,
            enabled=self.cfg.trainer.progress and self.ctx.world.is_main,
        )
        self.signal.start(self.step, self.records)
        self.t_mark, self.images = time.perf_counter(), 0
        if self.time_limit is not None:
            self.time_limit.begin()
        try:
            for step in range(self.step + 1, s.total_steps + 1):
                self.train_step()
                self.gradflow.log(self.records, step)
                self.t_mark += self.signal.after_step(step, self.records)  # not training time
                progress.step(step)
                ended = self.finish_step(step, progress)
                if ended is not None:
                    return ended
        finally:  # a second signal (Abort) leaves at once: nothing more is written
            progress.close()
        raise AssertionError("the last step ends the run")  # finish_step returns at it

    def train_step(self) -> None:
        """One optimisation step and its metrics (device ops only, no host sync)."""
        s = self.s
        x, y = s.loader.next()
        with self.gradflow.watch(self.step + 1, s.scaler) as measured:
            loss, logits = s.train_step(x, y, plain=measured)
        if s.ema is not None:
            s.ema.update(s.model)
        s.scheduler.step()
        self.step += 1
        self.metrics.update(loss, logits, y)
        self.images += len(y) * self.ctx.world.world

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
                self.end_of_epoch(step, epoch)  # evaluate, decide, record, checkpoint
        if step == total:
            return Status.completed
        # Every rank asks (a collective); only rank 0's pruner can have said stop.
        asks = closes_epoch and self.ctx.pruning is not None
        if asks and distributed.any_rank(self.pruned_at is not None):
            return Status.pruned  # checkpointed at this step by end_of_epoch
        if self.time_limit is not None and distributed.any_rank(self.time_limit.reached()):
            self.ctx.stop.time_up()  # the signal's clean stop, below
        if not self.stop_agreed():
            return None
        if self.state.saved_at != step:  # stopped mid-epoch: checkpoint here, if finite
            bad, _, _ = m.reduce()
            if bad is not None:
                return self.diverge(bad)
            with self.timed("checkpoint"):
                self.state.save(step)
        return Status.interrupted

    # --- the pieces ---------------------------------------------------------------

    def apply_resume(self) -> RunResult | None:
        """Continue from the checkpoint; a run already at its end returns its summary."""
        r, s = self.resume, self.s
        assert r is not None
        r.check_length(s.total_steps)
        self.state.restore(r)
        self.step = r.step
        if self.step == s.total_steps:
            log.info("%s is already at the run's last step %d; nothing to do", r.path, self.step)
            return self.ending.already_done()
        epoch = self.step // self.steps_per_epoch + 1
        log.info("resumed from %s at step %d (epoch %d)", r.path, self.step, epoch)
        return None

    def log_interval(self, step: int, interval: Mean, progress: Progress) -> None:
        m, now = self.metrics, time.perf_counter()
        ips = self.images / (now - self.t_mark)
        m.throughput.append((self.images, now - self.t_mark))
        m.last_interval = interval
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
        """Evaluate (on schedule, and at the run's end), decide, record, checkpoint."""
        t_paused = time.perf_counter()
        if self.evaluator.due(step):
            with self.timed("eval"):
                ev = self.evaluator(step)
            self.decide(ev)
            self.records.evaluation(
                step,
                {
                    "epoch": ev.epoch,
                    "train_loss": epoch_mean.loss,
                    "train_error": epoch_mean.error,
                },
                ev.split,
                ev.values,
                {
                    "lr": self.s.optimizer.param_groups[0]["lr"],
                    "time_s": round(self.clock.wall_time(), 2),
                },
            )
            log_evaluation(ev, epoch_mean, self.s.total_steps, self.steps_per_epoch)
        if step % self.steps_per_epoch == 0:
            self.metrics.epoch.reset()
        with self.timed("checkpoint"):
            self.state.save(step)
        self.t_mark += time.perf_counter() - t_paused  # evaluating and saving are not training

    def decide(self, ev: Evaluation) -> None:
        """The best error of the scheduled evaluations, and the search's pruner's word."""
        m, pruning = self.metrics, self.ctx.pruning
        m.last_eval = ev.named()
        if not ev.scheduled:
            return
        m.best = min(m.best, ev.error)
        if pruning is not None and pruning.should_stop(ev.epoch, ev.error):
            self.pruned_at = ev.epoch

    def timed(self, what: str) -> contextlib.AbstractContextManager:
        """An evaluation or a checkpoint write, measured for the time limit's estimate."""
        return self.time_limit.timed(what) if self.time_limit else contextlib.nullcontext()

    def stop_agreed(self) -> bool:
        """The stop flag: a Python attribute, no device sync. In a data-parallel run the
        ranks agree on it (a host-side all-reduce), so all of them stop after the same step."""
        stop = self.ctx.stop
        requested = stop.requested  # one read per poll
        agreed = distributed.any_rank(requested)
        if agreed and not requested:
            stop.request()  # the others take the same stop
        return agreed

    def diverge(self, step: int) -> Status:
        self.diverged_at = step
        return Status.diverged


def log_evaluation(ev: Evaluation, train: Mean, total_steps: int, steps_per_epoch: int) -> None:
    log.info(
        "epoch %d/%d step %d | train loss %.4f err %.2f%% | %s loss %.4f err %.2f%%",
        ev.epoch,
        -(-total_steps // steps_per_epoch),
        ev.step,
        train.loss,
        train.error,
        ev.split,
        ev.values["loss"],
        ev.error,
    )
    if "error_ema" in ev.values:  # trainer.ema
        values = ev.values
        log.info(
            "  weight average | %s loss %.4f err %.2f%%",
            ev.split,
            values["loss_ema"],
            values["error_ema"],
        )


def time_limit_of(s: Setup) -> TimeLimit | None:
    """``trainer.time_limit``, with what the first estimate of a stop's cost needs."""
    state = sum(p.numel() * p.element_size() for p in s.model.parameters())
    evaluated = len(s.data.eval_split) + (len(s.data.test) if s.data.val is not None else 0)
    copies = 1 if s.ema is None else 2  # the averaged weights are evaluated and saved too
    return TimeLimit.of(
        s.ctx.time_limit_s,
        s.ctx.stop,
        eval_images=copies * evaluated,
        batch_size=s.cfg.data.batch_size,
        state_bytes=(1 + copies) * state,  # weights and momentum (and the average)
        log_every=s.cfg.trainer.log_every,
    )
