"""How a training run ended and what its summary says: decided here alone.

``Ending`` reads what the run kept (its metrics and clock, its last evaluation and
checkpoint, its stop flag and time limit) and, from where the trainer's loop
stopped (the last step, the step it diverged at or the epoch it was pruned after),
makes the run's ``RunResult`` (run/result.py) and its summary.json.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from resnet_exp.run.records import SUMMARY, RunRecords
from resnet_exp.run.result import RunResult, Status, SummaryKey
from resnet_exp.run.stop import TIME_LIMIT, TimeLimit
from resnet_exp.train.evaluation import Evaluator
from resnet_exp.train.metrics import RunClock, RunningMetrics
from resnet_exp.train.setup import Setup
from resnet_exp.train.state import RunState

log = logging.getLogger("resnet_exp")


@dataclass
class Stopped:
    """Where the loop left the run: its last step, and why it ended early if it did."""

    step: int
    diverged_at: int | None = None  # the first step with a non-finite loss
    pruned_at: int | None = None  # the epoch after which the search's pruner stopped it


@dataclass
class Ending:
    s: Setup
    metrics: RunningMetrics
    clock: RunClock
    evaluator: Evaluator
    state: RunState
    time_limit: TimeLimit | None
    flat: dict[str, Any]  # the run's config as dotted keys (HPARAMS)

    def measure(self) -> dict[str, Any]:
        """A completed run's final numbers: the test set (with a validation split), the
        last evaluation, the last logged train means, the throughput."""
        m = self.metrics
        out: dict[str, Any] = {}
        if self.s.data.val is not None:  # the test set, once, at the end
            out.update(self.evaluator.test_set())
        out.update(self.last_evaluation())
        out[SummaryKey.final_train_loss] = m.last_interval.loss
        out[SummaryKey.final_train_error] = m.last_interval.error
        out[SummaryKey.train_images_per_s] = m.steady_throughput()
        out.update(self.s.loader.report())  # streamed data: skipped images
        return out

    def last_evaluation(self) -> dict[str, Any]:
        """The last evaluation on the evaluated split, and its best error."""
        m, name = self.metrics, self.s.data.eval_name
        out = {SummaryKey.final(name, k.split("_", 1)[1]): v for k, v in m.last_eval.items()}
        out[SummaryKey.best(name)] = min(m.best, m.last_eval.get(f"{name}_error", m.best))
        return out

    def result(self, ended: Status, at: Stopped, measured: dict[str, Any]) -> RunResult:
        """How the run ended, from how its last step ended."""
        k, path = SummaryKey, self.state.path
        summary, message = {**self.s.info, **measured}, None
        if ended is Status.diverged:
            summary[k.diverged_at_step] = at.diverged_at
            saved = self.state.saved_at
            kept = (
                f"last good checkpoint: {path} (step {saved})"
                if saved is not None
                else "no checkpoint was written before it"
            )
            message = f"loss became non-finite at step {at.diverged_at}; training stopped, {kept}"
        if ended is Status.pruned:  # where it stopped; no test set (it was not trained to the end)
            summary.update(self.last_evaluation())
            summary[k.pruned_at_epoch] = at.pruned_at
            name = self.s.data.eval_name
            error = summary.get(k.final(name, "error"), math.nan)
            message = (
                f"pruned after epoch {at.pruned_at} ({name} error {error:.2f}%): behind the "
                f"search's other trials; checkpoint: {path}"
            )
            log.info("%s", message)
        stop, why = self.stop(ended, at.step)
        message = why or message
        if ended in (Status.interrupted, Status.pruned):
            summary[k.checkpoint] = str(path)
        return RunResult(ended, summary, message, reason=stop)

    def stop(self, ended: Status, step: int) -> tuple[str | None, str | None]:
        """Why the run was stopped, and the line that says so. A stop asked for during
        the last evaluation ends a sweep too, the run being complete."""
        flag, path, limit = self.s.ctx.stop, self.state.path, self.time_limit
        if flag.signum is not None and ended is not Status.diverged:
            return flag.reason, f"stopped by {flag.reason} after step {step}; checkpoint: {path}"
        if ended is Status.interrupted and limit is not None and flag.timed_out:
            setting = self.s.cfg.trainer.time_limit
            return TIME_LIMIT, (
                f"stopped at the time limit (trainer.time_limit={setting}) after step {step} "
                f"of {self.s.total_steps}, {limit.left():.1f} s before it; checkpoint: {path}"
            )
        return None, None

    def record(self, result: RunResult, step: int, records: RunRecords) -> RunResult:
        """summary.json, once, however the run ended (an abort writes nothing). Wall time
        and images/s count every part of a resumed run; ``parts`` says how many."""
        summary = result.summary
        summary[SummaryKey.steps_done] = step
        if result.status is not Status.interrupted:
            summary[SummaryKey.wall_time_s] = round(self.clock.wall_time(), 2)
            summary[SummaryKey.parts] = self.clock.parts
        # HPARAMS for a run that ended; an interrupted one writes them when it does.
        records.summary(summary, None if result.status is Status.interrupted else self.flat)
        return result

    def already_done(self) -> RunResult:
        """A resume of a run already at its last step: its summary, as it was written."""
        path = self.s.ctx.run_dir / SUMMARY
        if not path.exists():
            return RunResult(Status.completed, self.s.info)
        return RunResult.from_summary(json.loads(path.read_text()))
