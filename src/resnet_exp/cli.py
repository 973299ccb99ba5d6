"""The `resnet-exp` command: compose the config with Hydra, dispatch on `mode`."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from resnet_exp.config import Config, register_configs
from resnet_exp.errors import UserError
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


def _config_subdir(resume: str | None) -> str:
    """Keep the original run's .hydra/ config when a resumed run writes its own."""
    if _resume_dir(resume, "") == "":
        return ".hydra"
    return f".hydra/resumed-{time.strftime('%Y-%m-%d_%H-%M-%S')}"


OmegaConf.register_new_resolver("run_dir", _resume_dir, replace=True)
OmegaConf.register_new_resolver("config_subdir", _config_subdir, replace=True)
register_configs()


def run(cfg: Config, run_dir: Path) -> dict:
    if cfg.mode.value == "train":
        from resnet_exp.train.loop import train

        return train(cfg, run_dir)
    if cfg.mode.value == "diagnose":
        from resnet_exp.diagnose import diagnose

        return diagnose(cfg, run_dir)
    raise UserError(f"mode={cfg.mode.value!r} is not one of train, diagnose")


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


def main() -> None:
    _hydra_main()
