"""One sweep of a search: check the inputs, open the study, ask, launch, tell, write
the results (the logic behind hydra_plugins/resnet_exp_search).

Everything a user can get wrong is checked before the sweep folder or the study
is touched: the sweeper's settings, the search space, its keys against the
config, and the storage.

A dry run (``dry_run=true``) asks the study nothing and writes no study: it launches
one job, built from each range's lower end (or first choice), whose own dry run
prints what it would train, and says what the search would ask.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from resnet_exp.errors import UserError
from resnet_exp.run.result import RunResult, Status, objective
from resnet_exp.run.stop import signals_deferred
from resnet_exp.sweep.search.plot import SEARCH_PNG, plot_search
from resnet_exp.sweep.search.space import SearchSpace, parse_space, readable
from resnet_exp.sweep.search.study import (
    DIRECTIONS,
    JOURNAL,
    SWEEP_DIR_ATTR,
    Options,
    _shown,
    check_choice,
    make_pruner,
    make_sampler,
    open_storage,
    quiet_optuna,
)

log = logging.getLogger("resnet_exp")

RESULTS = "optimization_results.yaml"


class Search:
    def __init__(self, sweeper: Any, arguments: list[str]) -> None:
        self.sweeper, self.conf, self.config = sweeper, sweeper.conf, sweeper.config
        self.sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        self.options = Options.of(self.conf, str(self.sweep_dir))
        self.resume = str(self.config.get("resume")) == "auto"
        self.dry_run = bool(self.config.get("dry_run"))
        self.failures: list[tuple[int, str]] = []  # this sweep's failed trials
        self.launched = 0
        quiet_optuna()
        self.check_settings()
        self.pruner = make_pruner(self.options)
        self.space = parse_space(dict(self.conf.params or {}), arguments)
        self.check_space(self.space)
        self.grid = None
        if self.conf.sampler.name == "grid":  # the values it goes through, in the space's order
            self.grid = {k: _grid_values(k, d) for k, d in self.space.distributions.items()}

    # --- inputs ---------------------------------------------------------------

    def check_settings(self) -> None:
        c = self.conf
        check_choice("direction", c.direction, DIRECTIONS)
        for key in ("n_trials", "n_jobs"):
            if c[key] < 1:
                raise UserError(f"hydra.sweeper.{key}={c[key]} must be at least 1")
        if not 0.0 <= c.max_failure_rate <= 1.0:
            raise UserError(
                f"hydra.sweeper.max_failure_rate={c.max_failure_rate} must be between 0 and 1"
            )
        make_sampler(c.sampler.name, None, 1, grid={})  # its name

    def check_space(self, space: SearchSpace) -> None:
        """Each key in the config (or a config group), and one trial composed from it."""
        if not space.distributions:
            raise UserError(
                "the search space is empty: give hydra.sweeper.params or a range on the "
                "command line, e.g. 'optimizer.lr=tag(log, interval(0.01, 0.5))'"
            )
        choices = self.config.hydra.runtime.choices
        missing = object()
        for key in space.distributions:
            if key.startswith("+"):
                continue  # adds a key: the composition below checks it
            name = key.lstrip("~")
            if (
                name not in choices
                and OmegaConf.select(self.config, name, default=missing) is missing
            ):
                raise UserError(
                    f"search-space key {name!r} is not in the config; search a config key "
                    f"(e.g. optimizer.lr, optimizer.weight_decay) or a config group "
                    f"(e.g. block)"
                )
        try:
            self.sweeper.validate_batch_is_legal([space.overrides(space.example())])
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"the search space does not fit the config: {first}") from None

    # --- the study ------------------------------------------------------------

    def check_folder(self) -> None:
        """A folder holding a study is continued only with resume=auto (read, not written)."""
        if self.options.default_storage and (self.sweep_dir / JOURNAL).exists() and not self.resume:
            raise UserError(
                f"{self.sweep_dir} holds a search already ({JOURNAL}); continue it with "
                f"resume=auto hydra.sweep.dir={self.sweep_dir}, or pass another hydra.sweep.dir"
            )

    def open_study(self) -> Any:
        import optuna

        o, c = self.options, self.conf
        self.check_folder()
        if o.default_storage:
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(o.storage_url)
        sampler = make_sampler(
            c.sampler.name, c.sampler.seed, c.sampler.n_startup_trials, self.grid
        )
        study = optuna.create_study(
            storage=storage,
            study_name=o.study_name,
            sampler=sampler,
            pruner=self.pruner,
            direction=c.direction,
            load_if_exists=True,
        )
        if study.direction.name.lower() != c.direction:
            raise UserError(
                f"study {o.study_name!r} in {_shown(o.storage_url)} minimises/maximises the "
                f"other way ({study.direction.name.lower()}); pass hydra.sweeper.direction="
                f"{study.direction.name.lower()} or another hydra.sweeper.study_name"
            )
        n = len(study.get_trials(deepcopy=False))
        log.info(
            "search: study %r in %s, %d trials so far, %d asked for; sampler %s, pruner %s",
            o.study_name,
            _shown(o.storage_url),
            n,
            c.n_trials,
            c.sampler.name,
            o.pruner,
        )
        return study

    def left_running(self, study: Any) -> list[tuple[int, dict[str, Any]]]:
        """Trials of this sweep folder that a stopped or killed sweep left running:
        relaunched as they were (same number, directory and values; their jobs
        continue from last.pt with resume=auto)."""
        from optuna.trial import TrialState

        out = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get(SWEEP_DIR_ATTR) != str(self.sweep_dir):
                continue
            if set(t.params) != set(self.space.distributions):
                study.tell(t.number, state=TrialState.FAIL)  # asked, never launched
                continue
            out.append((t.number, dict(t.params)))
        return out

    def ask(self, study: Any) -> tuple[int, dict[str, Any]]:
        """A new trial with its values, marked as this folder's; a stop arriving while
        it is asked waits for the mark (an unmarked trial would be left running for ever:
        a continued sweep takes over only its own)."""
        with signals_deferred():
            return self._ask(study)

    def _ask(self, study: Any) -> tuple[int, dict[str, Any]]:
        c = self.conf
        trial = study.ask()
        if c.sampler.seed is not None and c.sampler.name != "grid":
            # Seeded by the trial's number: a continued or shared study samples each
            # number as one uninterrupted sweep would, not the first trials again.
            study.sampler = make_sampler(
                c.sampler.name, c.sampler.seed + trial.number, c.sampler.n_startup_trials
            )
        params = {k: _suggest(trial, k, d) for k, d in self.space.distributions.items()}
        trial.set_user_attr(SWEEP_DIR_ATTR, str(self.sweep_dir))
        return trial.number, params

    def tell(self, study: Any, number: int, ret: Any) -> None:
        import optuna
        from optuna.trial import TrialState

        state, value, error = job_outcome(ret)
        try:
            if state == "complete":
                study.tell(number, value)
            elif state == "pruned":
                study.tell(number, state=TrialState.PRUNED)
            else:
                study.tell(number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as e:
            log.warning("search: trial %d could not be told its outcome: %s", number, e)
        if state == "fail":
            self.failures.append((number, str(error)))
            log.warning("search: trial %d failed: %s", number, error)
        else:
            shown = "pruned" if value is None else f"{value:.2f}"
            log.info("search: trial %d: %s", number, shown)

    # --- the sweep ------------------------------------------------------------

    def run(self) -> None:
        if self.dry_run:
            self.dry()
            return
        study = self.open_study()
        c = self.conf
        pending = self.left_running(study) if self.resume else []
        if pending:
            log.info("search: continuing trials %s", ", ".join(str(n) for n, _ in pending))
        while True:
            if self.launched and len(self.failures) / self.launched > c.max_failure_rate:
                log.error(
                    "search: stopping, %d of %d trials failed", len(self.failures), self.launched
                )
                break
            if pending:
                batch, pending = pending[: c.n_jobs], pending[c.n_jobs :]
            else:
                left = min(c.n_jobs, c.n_trials - len(study.get_trials(deepcopy=False)))
                if left <= 0 or self.grid_done(study):
                    break
                batch = [self.ask(study) for _ in range(left)]
            returns = self.sweeper.launch([(n, self.space.overrides(p)) for n, p in batch])
            self.launched += len(batch)
            for (number, _), ret in zip(batch, returns):
                self.tell(study, number, ret)
        self.finish(study)

    def dry(self) -> None:
        """Build one job (each range's lower end or first choice) and say what the search
        would do; the study and its storage are not opened."""
        self.check_folder()
        c, o = self.conf, self.options
        example = self.space.example()
        log.info(
            "search (dry run): would ask %d trials of study %r in %s (sampler %s, pruner %s, "
            "%d at a time); building one job with %s; no trial asked, no study written",
            c.n_trials,
            o.study_name,
            _shown(o.storage_url),
            c.sampler.name,
            o.pruner,
            c.n_jobs,
            ", ".join(f"{k}={readable(v)}" for k, v in example.items()),
        )
        (ret,) = self.sweeper.launch([(0, self.space.overrides(example))])
        state, _, error = job_outcome(ret, dry_run=True)
        if state == "fail":
            raise UserError(f"the search's dry run failed: {error}")

    def grid_done(self, study: Any) -> bool:
        sampler = study.sampler
        return self.conf.sampler.name == "grid" and sampler.is_exhausted(study)

    def finish(self, study: Any) -> None:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        if not done:
            if self.failures and len(self.failures) == self.launched:
                raise UserError(
                    f"every trial of the search failed ({len(self.failures)}): "
                    + _failures_line(self.failures)
                )
            log.warning("search: no trial has completed yet (%s)", counts)
            return
        best = study.best_trial
        results = {
            "name": "optuna",
            "study_name": self.options.study_name,
            "storage": _shown(self.options.storage_url),
            "best_trial": best.number,
            "best_params": dict(best.params),
            "best_value": best.value,
            "trials": {k: v for k, v in counts.items() if v},
        }
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / RESULTS)
        plot_search(trials, self.sweep_dir / SEARCH_PNG)
        shown = ", ".join(f"{k}={readable(v)}" for k, v in best.params.items())
        log.info(
            "search: best trial %d, validation error %.2f%% (%s); %s",
            best.number,
            best.value,
            shown,
            ", ".join(f"{v} {k}" for k, v in results["trials"].items()),
        )


def job_outcome(ret: Any, dry_run: bool = False) -> tuple[str, float | None, str | None]:
    """(state, value, error) of a finished job's ``RunResult``: ``complete`` with its
    validation error (``objective``; a dry run's job has none), ``pruned``, or ``fail``
    with why."""
    from hydra.core.utils import JobStatus

    if ret.status == JobStatus.FAILED:
        e = ret._return_value  # the property would re-raise it
        return "fail", None, f"{type(e).__name__}: {e}"
    result = ret.return_value
    if not isinstance(result, RunResult):
        return "fail", None, f"the job returned {type(result).__name__}, not a run's result"
    if result.status is Status.pruned:
        return "pruned", None, None
    if dry_run:
        return ("complete", None, None) if result.ok else ("fail", None, result.message)
    try:
        return "complete", objective(result), None
    except ValueError as e:
        return "fail", None, str(result.message or e)


def _failures_line(failures: list[tuple[int, str]]) -> str:
    """``trials 0, 2: <error>; trial 1: <error>``: one entry per distinct error."""
    by_error: dict[str, list[int]] = {}
    for number, error in failures:
        by_error.setdefault(error, []).append(number)
    common = sorted(by_error.items(), key=lambda kv: -len(kv[1]))
    parts = [
        f"trial{'s' if len(ns) > 1 else ''} {', '.join(map(str, ns))}: {error}"
        for error, ns in common[:3]
    ]
    more = len(common) - len(parts)
    return "; ".join(parts) + (f"; {more} other errors" if more > 0 else "")


def _suggest(trial: Any, key: str, d: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(key, d.choices)
    if isinstance(d, FloatDistribution):
        return trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)
    return trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)


def _grid_values(key: str, d: Any) -> list[Any]:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, IntDistribution) and not d.log:
        return list(range(d.low, d.high + 1, d.step))
    raise UserError(
        f"hydra.sweeper.sampler.name=grid takes choice(...) and range(...); {key} is an "
        f"interval (use sampler.name=tpe or random)"
    )
