"""``hydra/sweeper=search``: a hyper-parameter search on Optuna's ask/tell interface.

The sweeper asks the study for ``n_jobs`` trials at a time, launches them as
sweep jobs through the configured launcher (trial N is job N, in directory
``N_<block>_<depth>``), and tells the study each job's outcome: its final
validation error, ``pruned`` (the trial stopped itself on the pruner's word,
see resnet_exp/sweep/search/study.py), or failed. The study lives in its storage
(by default a journal file in the sweep folder), so a search can be continued
(``resume=auto``) and fed by several sweeps at once (``hydra.sweeper.storage``).

(No ``from __future__ import annotations``: Hydra executes plugin modules
without registering them in sys.modules, where dataclasses look string
annotations up.)
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | grid (grid: choice(...) and range(...) only)
    seed: int | None = None  # trial N samples with seed + N: the same command, the same trials
    n_startup_trials: int = 10  # tpe: the first trials sample at random


@dataclass
class SearchSweeperConf:
    _target_: str = "hydra_plugins.resnet_exp_search.search_sweeper.SearchSweeper"
    sampler: SamplerConf = field(default_factory=SamplerConf)
    direction: str = "minimize"  # the trial's final validation error
    n_trials: int = 20  # over the whole study, continued or shared
    n_jobs: int = 1  # trials asked and launched at once
    max_failure_rate: float = 1.0  # stop asking when more of this sweep's trials failed
    storage: str | None = None  # None: <sweep dir>/study.journal; or a database URL
    study_name: str = "search"
    pruner: str = "halving"  # none | median | halving | hyperband
    min_resource: int = 1  # scheduled evaluations before the first cut
    reduction_factor: int = 3  # halving/hyperband: 1 in reduction_factor goes on at each rung
    params: dict[str, Any] = field(default_factory=dict)  # key -> search range


ConfigStore.instance().store(
    group="hydra/sweeper", name="search_base", node=SearchSweeperConf, provider="resnet-exp"
)


class SearchSweeper(Sweeper):
    def __init__(self, **conf: Any) -> None:
        # Hydra passes the config's values; merged onto the schema, they are type-checked.
        self.conf: Any = OmegaConf.merge(OmegaConf.structured(SearchSweeperConf), conf)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        from resnet_exp.sweep.search.run import Search

        assert self.config is not None
        Search(self, arguments).run()

    # What resnet_exp.sweep.search.run calls back: launching and composing stay Hydra's.

    def launch(self, batch: Sequence[tuple[int, Sequence[str]]]) -> list[JobReturn]:
        """Launch ``(trial number, overrides)`` pairs; each run of consecutive numbers
        is one launcher call, so that job N is trial N (another sweep on the same
        study may have taken the numbers between)."""
        returns: list[JobReturn] = []
        i = 0
        while i < len(batch):
            j = i + 1
            while j < len(batch) and batch[j][0] == batch[j - 1][0] + 1:
                j += 1
            group = batch[i:j]
            returns += self.launcher.launch(
                [list(o) for _, o in group], initial_job_idx=group[0][0]
            )
            i = j
        return returns
