"""A Hydra callback that writes the sweep's report when a multirun ends.

Enabled in configs/config.yaml (``hydra.callbacks.report``); remove it with
``~hydra.callbacks.report``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from resnet_exp.errors import UserError


class WriteReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run"):
            return  # nothing was trained
        sweep_dir = Path(config.hydra.sweep.dir)
        from resnet_exp.report import write_report

        try:
            written = write_report([sweep_dir], sweep_dir)
        except UserError as e:  # e.g. no job got as far as writing its directory
            print(f"resnet-exp: no report: {e}", file=sys.stderr)
            return
        # print, not log: after the jobs, logging still points at the last job's log file
        print(f"resnet-exp: report in {written[0]}")
