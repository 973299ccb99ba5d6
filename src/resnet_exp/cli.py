"""The `resnet-exp` command: compose the config with Hydra, dispatch on `mode`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from resnet_exp.config import Config, register_configs
from resnet_exp.errors import UserError
from resnet_exp.train import distributed, gpus
from resnet_exp.train.records import SUMMARY, write_json

log = logging.getLogger("resnet_exp")


def config_dir() -> str:
    """The YAML configs: inside the package in a wheel, at the repository top otherwise.

    Resolved explicitly (not relative to the caller's directory), so the
    installed command works from anywhere, editable install or not.
    """
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "configs")


def _resume_dir(resume: str | None, default: str) -> str:
    """A run resumed from a checkpoint continues in that checkpoint's directory."""
    if resume in (None, "", "auto", "none", "null"):
        return default
    path = Path(str(resume))
    if path.is_dir():
        return str(path)
    if path.is_file():
        return str(path.parent)
    return default  # a missing path is reported by the trainer, with its name


def _rank() -> int:
    """This process's rank in a data-parallel run, known before Hydra starts the job."""
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


def _config_subdir(resume: str | None) -> str | None:
    """Rank 0 writes .hydra/; a resumed run keeps the original's and writes its own beside it."""
    if _rank() != 0:
        return None
    if _resume_dir(resume, "") == "":
        return ".hydra"
    return f".hydra/resumed-{distributed.launch_time('%Y-%m-%d_%H-%M-%S')}"


OmegaConf.register_new_resolver("run_dir", _resume_dir, replace=True)
OmegaConf.register_new_resolver("config_subdir", _config_subdir, replace=True)
OmegaConf.register_new_resolver(
    "launch_time", distributed.launch_time, use_cache=True, replace=True
)
# Other ranks log warnings to the console only; rank 0 keeps the run's log file.
OmegaConf.register_new_resolver(
    "log_handlers", lambda: ["console", "file"] if _rank() == 0 else ["console"]
)
OmegaConf.register_new_resolver("log_level", lambda: "INFO" if _rank() == 0 else "WARNING")
register_configs()


def run(cfg: Config, run_dir: Path) -> dict:
    if cfg.mode.value == "train":
        from resnet_exp.train.loop import train

        return train(cfg, run_dir)
    raise UserError(f"mode={cfg.mode.value!r} is not one of train")


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        cfg: Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        run(cfg, run_dir)
    except UserError as e:
        message = str(e)
        print(f"resnet-exp: error: {message}", file=sys.stderr)
        log.debug("user error", exc_info=True)
        if hc.mode == RunMode.MULTIRUN:
            # Record the failure in this job's directory; the sweep goes on.
            summary = run_dir / SUMMARY
            if not (summary.exists() and '"diverged"' in summary.read_text()):
                write_json(summary, {"status": "failed", "error": message})
            return
        sys.exit(2)
    finally:
        gpus.release()  # a parallel sweep's next job in this process may take the GPU


def main() -> None:
    distributed.init_distributed()  # before Hydra: ranks agree on the run directory
    try:
        _hydra_main()
    finally:
        distributed.shutdown()
