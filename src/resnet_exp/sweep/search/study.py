"""A search's Optuna study: where it is stored, its sampler and pruner, and the
trial side of pruning.

The sweeper (hydra_plugins/resnet_exp_search) and each trial reach the study
through its storage, never through objects in memory: a trial may run in
another thread (the packed launcher), another process or another machine
(submitit). A trial finds its own Optuna trial by number: the sweeper launches
trial N as sweep job N, so ``hydra.job.num`` is the trial's number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resnet_exp.errors import UserError
from resnet_exp.train.context import EvaluationReporter

log = logging.getLogger("resnet_exp")

JOURNAL = "study.journal"  # the default storage, in the sweep folder
SWEEP_DIR_ATTR = "sweep_dir"  # a trial's user attribute: the folder its job directory is in
PRUNERS = ("none", "median", "halving", "hyperband")
SAMPLERS = ("tpe", "random", "grid")
DIRECTIONS = ("minimize", "maximize")


@dataclass
class Options:
    """The sweeper's settings a trial needs too (hydra.sweeper.*)."""

    storage: str | None
    study_name: str
    pruner: str
    min_resource: int
    reduction_factor: int
    sweep_dir: str

    @classmethod
    def of(cls, sweeper: Any, sweep_dir: str) -> Options:
        return cls(
            storage=sweeper.storage,
            study_name=str(sweeper.study_name),
            pruner=str(sweeper.pruner),
            min_resource=int(sweeper.min_resource),
            reduction_factor=int(sweeper.reduction_factor),
            sweep_dir=str(sweep_dir),
        )

    @property
    def storage_url(self) -> str:
        """An RDB URL (``sqlite:///``, ``postgresql://``, ...) or a journal file path."""
        if self.storage:
            return str(self.storage)
        return str(Path(self.sweep_dir).resolve() / JOURNAL)

    @property
    def default_storage(self) -> bool:
        return not self.storage


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"hydra.sweeper.{key}={value!r} is not one of {', '.join(allowed)}")


def _shown(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://..."


def open_storage(url: str) -> Any:
    """Optuna's storage for ``url``: a database through SQLAlchemy, else Optuna's
    journal file (append-only, file-locked: several processes, NFS included)."""
    import optuna

    try:
        if "://" in url:
            # Heartbeats are not used: a trial left running by a killed sweep is taken
            # over by the sweep that continues its folder (resume=auto), not failed.
            return optuna.storages.RDBStorage(url)
        from optuna.storages.journal import JournalFileBackend

        if not Path(url).parent.is_dir():
            raise FileNotFoundError(f"no directory {Path(url).parent}")
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"hydra.sweeper.storage={_shown(url)!r} cannot be opened ({type(e).__name__}: "
            f"{first}); pass a reachable database URL (sqlite:///PATH, postgresql://...) "
            f"or the path of a journal file in an existing directory"
        ) from None


def make_pruner(o: Options) -> Any:
    """Scheduled evaluations are the pruner's steps: ``min_resource`` epochs before
    the first cut (with data.eval_every=1), a third of the trials kept at each rung."""
    import optuna

    check_choice("pruner", o.pruner, PRUNERS)
    if o.min_resource < 1 or o.reduction_factor < 2:
        raise UserError(
            f"hydra.sweeper.min_resource={o.min_resource} and reduction_factor="
            f"{o.reduction_factor}: need min_resource >= 1 and reduction_factor >= 2"
        )
    if o.pruner == "none":
        return optuna.pruners.NopPruner()
    if o.pruner == "median":
        # Median: stop a trial worse than the median of earlier trials at the same epoch.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=o.min_resource - 1)
    if o.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=o.min_resource, reduction_factor=o.reduction_factor
        )
    return optuna.pruners.HyperbandPruner(
        min_resource=o.min_resource, reduction_factor=o.reduction_factor
    )


def make_sampler(name: str, seed: int | None, n_startup_trials: int, grid: Any = None) -> Any:
    import optuna

    check_choice("sampler.name", name, SAMPLERS)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(grid, seed=seed)


def quiet_optuna() -> None:
    """Optuna logs each trial at INFO on its own handler; the sweeper logs what matters."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


# --- the trial's side ---------------------------------------------------------------


class TrialPruning:
    """A trial's link to its study (a ``train.context.EvaluationReporter``): each
    scheduled evaluation's validation error is reported (step = epoch) and the
    study's pruner says whether to stop."""

    def __init__(self, trial: Any, number: int) -> None:
        self.trial, self.number = trial, number

    def should_stop(self, epoch: int, val_error: float) -> bool:
        self.trial.report(float(val_error), epoch)
        return bool(self.trial.should_prune())


def _search_options(hc: Any) -> tuple[Options, int] | None:
    """A job's search settings and trial number (from its Hydra config ``hc``), when it is
    a trial of a search that prunes."""
    from hydra.types import RunMode

    if hc.mode != RunMode.MULTIRUN or not is_search(hc.sweeper):
        return None
    o = Options.of(hc.sweeper, hc.sweep.dir)
    return None if o.pruner == "none" else (o, int(hc.job.num))


class FollowRankZero:
    """A rank that reports nothing and never stops on its own word (rank 0 decides,
    the trainer's collective tells the others)."""

    def should_stop(self, epoch: int, val_error: float) -> bool:
        return False


def trial_reporter(hc: Any, is_main: bool) -> EvaluationReporter | None:
    """What a job's trainer reports its evaluations to: None unless the job (Hydra config
    ``hc``) is a trial of a search that prunes; rank 0 reaches the study, the other ranks
    follow it."""
    found = _search_options(hc)
    if found is None:
        return None
    if not is_main:
        return FollowRankZero()
    o, number = found
    import optuna
    from optuna.trial import TrialState

    quiet_optuna()
    storage = open_storage(o.storage_url)
    study = optuna.load_study(study_name=o.study_name, storage=storage, pruner=make_pruner(o))
    study_id = storage.get_study_id_from_name(o.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    if storage.get_trial(trial_id).state != TrialState.RUNNING:
        log.warning("search trial %d is not running in the study; not pruned", number)
        return FollowRankZero()  # never stops; the other ranks hold the same
    return TrialPruning(optuna.trial.Trial(study, trial_id), number)


def is_search(sweeper: Any) -> bool:
    """Whether a config's ``hydra.sweeper`` is this project's search sweeper."""
    return "resnet_exp_search" in str(sweeper.get("_target_", ""))
