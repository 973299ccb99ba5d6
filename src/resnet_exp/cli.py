"""The `resnet-exp` command: compose the config with Hydra, dispatch on `mode`.

Exit status: 0 done; 2 a bad input (one line on stderr, nothing written);
3 the loss diverged; 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM),
after saving a checkpoint; 1 a sweep with failed jobs, or an internal error.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resnet_exp.config import Config, Mode, register_configs
from resnet_exp.errors import UserError
from resnet_exp.evaluate import check_eval_args
from resnet_exp.search import JobResult
from resnet_exp.train import distributed, gpus
from resnet_exp.train.records import SUMMARY, Status, SummaryKey, write_json
from resnet_exp.train.resume import NO_RESUME, run_dir_of, with_inherited_overrides
from resnet_exp.train.stop import Interrupted, StopRequest, exit_code, requeue, signal_name

log = logging.getLogger("resnet_exp")

EXIT_USER_ERROR, EXIT_DIVERGED = 2, 3


def config_dir() -> str:
    """The YAML configs: inside the package in a wheel, at the repository top otherwise.

    Resolved explicitly (not relative to the caller's directory), so the
    installed command works from anywhere, editable install or not.
    """
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "configs")


def _rank() -> int:
    """This process's rank in a data-parallel run, known before Hydra starts the job."""
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


def _config_subdir(output_dir: str, resume: str | None, mode: str = "train") -> str | None:
    """Rank 0 writes .hydra/, and never over a run's .hydra/config.yaml: a later
    command writes its own beside it. mode=eval writes none (it leaves a run as it was)."""
    if _rank() != 0 or mode == "eval":
        return None
    if not (Path(output_dir) / ".hydra" / "config.yaml").exists():
        return ".hydra"
    kind = "again" if resume in NO_RESUME or resume == "auto" else "resumed"
    return f".hydra/{kind}-{distributed.launch_time('%Y-%m-%d_%H-%M-%S')}"


OmegaConf.register_new_resolver("run_dir", run_dir_of, replace=True)
OmegaConf.register_new_resolver("config_subdir", _config_subdir, replace=True)
OmegaConf.register_new_resolver(
    "launch_time", distributed.launch_time, use_cache=True, replace=True
)
# Other ranks log warnings to the console only; rank 0 keeps the run's log file
# (but mode=eval does not write to it).
OmegaConf.register_new_resolver(
    "log_handlers",
    lambda mode="train": ["console", "file"] if _rank() == 0 and mode != "eval" else ["console"],
)
OmegaConf.register_new_resolver("log_level", lambda: "INFO" if _rank() == 0 else "WARNING")
register_configs()


def run(cfg: Config, run_dir: Path, stop: StopRequest | None = None) -> dict:
    if cfg.mode is Mode.train:
        from resnet_exp.train.loop import train

        return train(cfg, run_dir, stop)
    if cfg.mode is Mode.diagnose:
        from resnet_exp.diagnose import diagnose

        return diagnose(cfg, run_dir)
    if cfg.mode is Mode.eval:
        from resnet_exp.evaluate import evaluate_run

        return evaluate_run(cfg, run_dir)
    raise UserError(f"mode={cfg.mode.value!r} is not one of {', '.join(m.value for m in Mode)}")


def _failed(run_dir: Path, status: Status, message: str) -> dict[str, Any]:
    """A sweep job's failure, kept in its directory unless a summary is there already
    (this run's own, e.g. diverged, or an earlier run's, which stays as it was)."""
    result = {SummaryKey.status: status.value, SummaryKey.error: message}
    summary = run_dir / SUMMARY
    if not summary.exists():
        write_json(summary, result)
    return JobResult(result)


def run_job(dcfg: DictConfig, stop: StopRequest | None = None) -> dict[str, Any]:
    """One job of the command, with its error handling; every launcher calls this.

    In a sweep a failed job is recorded in its directory and returned (Reporter
    names it at the end); a stopped one prints where it was saved and exits with
    128 + N (raising SystemExit, in a packed run's thread too: the packed launcher
    re-raises it once every run has stopped).
    """
    from resnet_exp.train.loop import Diverged

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        cfg: Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        if cfg.resume is None and "SUBMITIT_EXECUTOR" in os.environ:
            cfg.resume = "auto"  # a cluster job may be a requeued one: continue its last.pt
        return JobResult(run(cfg, run_dir, stop))  # a search's sweeper reads float(result)
    except UserError as e:
        print(f"resnet-exp: error: {e}", file=sys.stderr)
        log.debug("user error", exc_info=True)
        diverged = isinstance(e, Diverged)
        if multirun:  # the sweep goes on; Reporter names the failed jobs at its end
            return _failed(run_dir, Status.diverged if diverged else Status.failed, str(e))
        sys.exit(EXIT_DIVERGED if diverged else EXIT_USER_ERROR)
    except Interrupted as e:
        print(
            f"resnet-exp: stopped by {signal_name(e.signum)} after step {e.step}; "
            f"checkpoint: {e.checkpoint}",
            file=sys.stderr,
        )
        if multirun:
            hint = f"rerun the same command with resume=auto hydra.sweep.dir={hc.sweep.dir}"
        else:
            hint = f"resnet-exp resume={run_dir}"
        print(f"resnet-exp: to continue: {hint}", file=sys.stderr)
        requeue(e.signum)  # a submitit job on a cluster: requeued, resumes by itself
        sys.exit(exit_code(e.signum))  # a sweep stops too: the user asked to stop
    except Exception as e:
        if not multirun:
            raise  # an internal error: the traceback is for a bug report
        message = f"{type(e).__name__}: {e}"
        log.error("job failed with an internal error", exc_info=True)
        print(f"resnet-exp: error in {run_dir.name}: {message}", file=sys.stderr)
        return _failed(run_dir, Status.failed, message)
    finally:
        gpus.release()  # a parallel sweep's next job in this process may take the GPU


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> dict[str, Any]:
    return run_job(dcfg)


def _one_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages, on one line."""
    if isinstance(e, MissingConfigException) and e.options and "/" in (e.missing_cfg_file or ""):
        group, name = e.missing_cfg_file.rsplit("/", 1)  # type: ignore[union-attr]
        return f"{group}={name} is not one of {', '.join(e.options)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    message = lines[0].rstrip(".") if lines else type(e).__name__
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {message}"
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        message += ": " + str(cause).strip().splitlines()[0]
    return message


def main() -> None:
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra prints its own errors over several lines; with this set they reach the
    # handler below instead, which prints one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    distributed.init_distributed()  # before Hydra: the ranks agree on the run directory
    try:
        check_eval_args(sys.argv[1:])
        sys.argv[1:] = with_inherited_overrides(sys.argv[1:])
        _hydra_main()
    except UserError as e:
        print(f"resnet-exp: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except (HydraException, OmegaConfBaseException) as e:
        if full_error:
            raise
        print(f"resnet-exp: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt as e:  # before training started, or a second signal during it
        signum = getattr(e, "signum", signal.SIGINT)
        print(
            f"\nresnet-exp: stopped at once by {signal_name(signum)}; files on disk are "
            f"intact (checkpoints are replaced atomically)",
            file=sys.stderr,
        )
        sys.exit(exit_code(signum))
    finally:
        distributed.shutdown()
