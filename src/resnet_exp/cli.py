"""The `resnet-exp` command: compose the config with Hydra, dispatch on `mode`.

Exit status: 0 done; 2 a bad input (one line on stderr, nothing written);
3 the loss diverged; 75 stopped at ``trainer.time_limit`` after saving a
checkpoint, or a sweep left unfinished by it (resumable); 128 + N stopped by
signal N (130 Ctrl-C, 143 SIGTERM), after saving a checkpoint; 1 a sweep with
failed jobs, or an internal error.
A run's result becomes the exit status in one place, :func:`leave`, after the
table in run/result.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resnet_exp.config import Config, Mode, config_dir, parse_duration, register_configs
from resnet_exp.errors import UserError
from resnet_exp.modes.evaluate import check_eval_command
from resnet_exp.run import distributed, gpus
from resnet_exp.run.checkpoint import AUTO, NO_RESUME, Checkpoint
from resnet_exp.run.records import SUMMARY, write_json
from resnet_exp.run.result import EXIT_CODES, RunResult, Status
from resnet_exp.run.resume import resumable_overrides, with_inherited_overrides
from resnet_exp.run.stop import (
    TIME_LIMIT,
    StopRequest,
    exit_code,
    process_started,
    requeue,
    signal_name,
    start_margin,
    time_left,
)
from resnet_exp.run.tracking import SweepJob, Tracking
from resnet_exp.sweep.search.study import trial_reporter
from resnet_exp.train.context import RunContext, resolve

log = logging.getLogger("resnet_exp")

EXIT_USER_ERROR = EXIT_CODES[Status.failed]


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
    kind = "again" if resume in NO_RESUME or resume == AUTO else "resumed"
    return f".hydra/{kind}-{distributed.launch_time('%Y-%m-%d_%H-%M-%S')}"


OmegaConf.register_new_resolver("run_dir", Checkpoint.run_dir_of, replace=True)
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


def run(cfg: Config, ctx: RunContext) -> RunResult:
    """The job ``cfg.mode`` names, in its context."""
    if cfg.mode is Mode.train:
        from resnet_exp.train.loop import Trainer

        return Trainer(cfg, ctx).run()
    if cfg.mode is Mode.diagnose:
        from resnet_exp.modes.diagnose import diagnose

        return diagnose(cfg, ctx)
    from resnet_exp.modes.evaluate import run_eval

    return run_eval(cfg, ctx)


def context(cfg: Config, hc: DictConfig, stop: StopRequest) -> RunContext:
    """Everything the job takes from Hydra, the process group and the machine, once."""
    world = distributed.current()
    pruning = None
    if cfg.mode is Mode.train and not cfg.dry_run:
        # A search's trial reports its evaluations to its study, whose pruner may stop it.
        pruning = trial_reporter(hc, world.is_main)
    return resolve(
        cfg,
        Path(hc.runtime.output_dir),
        world=world,
        stop=stop,
        overrides=tuple(resumable_overrides(list(hc.overrides.task))),
        pruning=pruning,
        tracking=tracking(cfg, hc),
    )


def tracking(cfg: Config, hc: DictConfig) -> Tracking:
    """Where the run records (logger=...); a sweep's job is a child of the sweep's MLflow run,
    which ``callbacks.MlflowTracking`` made and named in the sweep folder."""
    # Relative paths are the command's: a cluster job may start in another directory.
    started = Path(str(hc.runtime.cwd))
    sweep = None
    if hc.mode == RunMode.MULTIRUN:
        sweep = SweepJob(started / str(hc.sweep.dir), int(hc.job.num))
    return Tracking.of(cfg, Path(hc.runtime.output_dir), sweep, started)


def run_job(
    dcfg: DictConfig, hc: DictConfig | None = None, stop: StopRequest | None = None
) -> RunResult:
    """One job of the command, with its error handling; every launcher calls this (with
    the job's Hydra config ``hc``, by default Hydra's current one) and reads the result
    it returns (:func:`leave` turns it into the exit status).

    A bad input is a ``failed`` result with a one-line message; an internal error
    raises (the traceback is for a bug report) except in a sweep, where the job is
    recorded as failed in its directory and the sweep goes on (Reporter names it).
    """
    hc = hc if hc is not None else HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        cfg: Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        if cfg.resume is None and "SUBMITIT_EXECUTOR" in os.environ:
            cfg.resume = "auto"  # a cluster job may be a requeued one: continue its last.pt
        stop = stop or StopRequest(started=process_started())  # the limit counts from here
        trains = cfg.mode is Mode.train and not cfg.dry_run
        late = too_late(cfg.trainer.time_limit, stop) if trains else None
        result = late if late is not None else run(cfg, context(cfg, hc, stop))
    except UserError as e:
        log.debug("user error", exc_info=True)
        result = RunResult(Status.failed, message=str(e))
    except Exception as e:
        if not multirun:
            raise
        log.error("job failed with an internal error", exc_info=True)
        result = RunResult(Status.failed, message=f"{type(e).__name__}: {e}")
        print(f"resnet-exp: error in {run_dir.name}: {result.message}", file=sys.stderr)
        return _kept(result, run_dir)
    finally:
        gpus.release()  # a parallel sweep's next job in this process may take the GPU
    _tell(result, run_dir, hc.sweep.dir if multirun else None)
    return _kept(result, run_dir) if multirun else result


def too_late(time_limit: str | None, stop: StopRequest) -> RunResult | None:
    """A training run that would start with (nearly) none of its time limit left does
    not start (a sweep's later jobs, every launcher): ``not_started``; None: it may."""
    limit = parse_duration(time_limit)
    if limit is None:
        return None
    left = time_left(limit, stop)
    if left > start_margin(limit):
        return None
    message = (
        f"not started: {max(0.0, left):.0f} s of trainer.time_limit={time_limit} "
        f"left (a run starts with more than {start_margin(limit):.0f} s)"
    )
    return RunResult(Status.not_started, message=message, reason=TIME_LIMIT)


def _tell(result: RunResult, run_dir: Path, sweep_dir: str | None) -> None:
    """One line (two for a stop: where it saved, how to continue) for a run that did not complete."""
    if result.status is Status.not_started:
        if sweep_dir is None:  # a sweep's Reporter lists its jobs not started
            print(f"resnet-exp: {result.message}", file=sys.stderr)
    elif result.stop_requested or result.resumable:
        print(f"resnet-exp: {result.message}", file=sys.stderr)
        if sweep_dir is not None:
            hint = f"rerun the same command with resume=auto hydra.sweep.dir={sweep_dir}"
        else:
            hint = f"resnet-exp resume={run_dir}"
        print(f"resnet-exp: to continue: {hint}", file=sys.stderr)
    elif not result.ok:
        print(f"resnet-exp: error: {result.message}", file=sys.stderr)


def _kept(result: RunResult, run_dir: Path) -> RunResult:
    """A sweep job's failure, kept in its directory unless a summary is there already
    (this run's own, e.g. diverged, or an earlier run's, which stays as it was)."""
    summary = run_dir / SUMMARY
    if not result.ok and not result.stop_requested and not summary.exists():
        write_json(summary, result.summary)
    return result


def leave(result: RunResult, multirun: bool) -> RunResult:
    """Where a run's result becomes the command's exit status (run/result.py's table),
    for every launcher. A stop request ends the command, a sweep too (the user asked
    to stop; a submitit job is requeued first); a single run that did not complete
    exits with its code; in a sweep the rest is the Reporter's to count."""
    signum = result.signum
    if signum is not None:
        requeue(signum)  # a submitit job on a cluster: requeued, resumes by itself
    if signum is not None or (not multirun and not result.ok):
        sys.exit(result.exit_code)
    return result


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> RunResult:
    return leave(run_job(dcfg), HydraConfig.get().mode == RunMode.MULTIRUN)


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


# Hydra's flags of which a command takes one (Hydra itself raises a bare ValueError).
EXCLUSIVE_FLAGS = {
    "--run": "-r", "--multirun": "-m", "--cfg": "-c", "--info": "-i", "--shell-completion": "-sc"
}  # fmt: skip


def check_hydra_flags(args: list[str]) -> None:
    given = [
        long
        for long, short in EXCLUSIVE_FLAGS.items()
        if any(a in (long, short) or a.startswith(f"{long}=") for a in args)
    ]
    if len(given) > 1:
        raise UserError(
            f"{' and '.join(given)} cannot go together: give one of "
            f"{', '.join(EXCLUSIVE_FLAGS)} (--cfg job without -m prints one job's config)"
        )


def main() -> None:
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra prints its own errors over several lines; with this set they reach the
    # handler below instead, which prints one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    distributed.init_distributed()  # before Hydra: the ranks agree on the run directory
    try:
        check_hydra_flags(sys.argv[1:])
        check_eval_command(sys.argv[1:])
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
