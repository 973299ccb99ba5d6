"""Spend a wall-clock budget on the paper's full-recipe runs, and bank what finishes.

A campaign is an ordered list of sweeps (``configs/campaign/default.yaml``). Each
call runs them in order, each one packed on one device (``hydra/launcher=packed``)
with ``trainer.time_limit`` set to the time left, continuing whatever the campaign
folder holds (``resume=auto hydra.sweep.dir=CAMPAIGN/<sweep>``: finished runs are
skipped, stopped ones continue, the rest start). When the budget is spent, the
running runs checkpoint; the call then writes a report of everything finished so
far beside the paper's numbers (report.md: medians of seeds, curves, each ordering
against the original unit with a bootstrap interval), prints what is left and
the size of what must travel to continue on another machine (the campaign
folder without TensorBoard's event files).

A failed or diverged run is not finished: the next call runs it again (from its
checkpoint, ``resume=auto``, else from the start), up to ``--retries`` times
(default 2); each failure, with its reason, is kept in campaign.json, and a
failed try's summary.json, once tried again, as summary.failed-<n>.json.

Before anything is written, the data every sweep reads is checked
(``resnet_exp.data.stage.require``): a CIFAR copy that is not there and cannot be
downloaded stops the call in one line.

    resnet-exp-reproduce --budget 9m                    # default campaign, outputs/campaign
    resnet-exp-reproduce --budget 2h --out DIR dataset=cifar10 data.root=/data/cifar10 data.download=false
    resnet-exp-reproduce --dry                          # tiny nets on the CPU, ~1 minute

Positional arguments are Hydra overrides added to every sweep. Exit status: 0 when
the call ended on time with no run failed (whether or not work is left); 1 when a
run failed in this call, when failed runs have used up their retries, or when a
sweep could not run (its command's error is printed); 2 for a bad argument or
missing data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STATE = "campaign.json"
EVENTS = "events.out.tfevents."
EXIT_TIME_LIMIT = 75  # a sweep left unfinished at its time limit (run/result.py)
ENDED = ("completed", "pruned")  # a run that did what it was asked: never run again
FAILED = ("failed", "diverged")  # tried again, up to --retries times
RETRIES = 2
PREVIOUS = "summary.previous.json"  # a run's summary while its sweep runs again


def campaigns() -> Path:
    """The campaign files: configs/campaign/ (inside the package in a wheel)."""
    from resnet_exp.config import config_dir

    return Path(config_dir()) / "campaign"


def fail(message: str) -> None:
    print(f"reproduce: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_campaign(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if not path.is_file():
        fail(f"no campaign file {path}")
    campaign = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(campaign, dict)
    names = [s.get("name") for s in campaign.get("sweeps") or []]
    if not names or len(set(names)) != len(names) or not all(names):
        fail(f"{path}: sweeps need unique names")
    return campaign


# --- the jobs a sweep plans, and the data they read --------------------------------


def compose(overrides: list[str]) -> Any:
    """The config ``resnet-exp`` composes from these (non-sweep) overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from resnet_exp.config import config_dir, register_configs

    register_configs()  # the schema the YAML extends (the command registers it on import)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


def planned_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweep would launch for ``resnet-exp -m OVERRIDES``: the
    config's ``hydra.sweeper.params`` (an experiment's), then the command line's sweeps
    (which win for the same key). Composing them also checks every override."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    plain.append("hydra/launcher=packed")  # as every sweep runs (its keys may be set)
    cfg = compose(plain)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    batches = BasicSweeper.split_arguments(parser.parse_overrides([*params, *overrides]), None)
    return [job for batch in batches for job in batch]


def data_sources(jobs: list[list[str]]) -> set[tuple[str, str, bool]]:
    """(data.name, data.root, data.download) of a sweep's jobs: one config composed per
    distinct set of data keys among them (usually one: its experiment may set them)."""
    chosen: dict[tuple[str, ...], list[str]] = {}
    for job in jobs:
        keys = tuple(o for o in job if o.lstrip("+~").startswith(("data.", "dataset=")))
        chosen.setdefault(keys, job)
    sources = set()
    for job in chosen.values():
        data = compose([*job, "hydra/launcher=packed"]).data
        sources.add((str(data.name), str(data.root), bool(data.download)))
    return sources


def check_data(sources: set[tuple[str, str, bool]]) -> None:
    """Every data set is there (or downloaded once, here), else exit 2 in one line,
    before anything is written."""
    from resnet_exp.data.stage import require
    from resnet_exp.errors import UserError

    for name, root, download in sorted(sources):
        try:
            require(name, Path(root), download)
        except UserError as e:
            fail(str(e))


# --- what a sweep folder holds ---------------------------------------------------


def run_dirs(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.is_dir():
        return []
    return sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())


def read_result(run: Path) -> Any:
    from resnet_exp.run.records import SUMMARY
    from resnet_exp.run.result import RunResult

    path = run / SUMMARY
    return RunResult.from_summary(json.loads(path.read_text()) if path.exists() else {})


def reason(result: Any) -> str:
    """One line: why a run failed or diverged."""
    if result.message:
        return str(result.message)
    step = result.summary.get("diverged_at_step")
    return f"diverged at step {step}" if step is not None else result.status.value


def sweep_state(sweep_dir: Path, planned: int) -> dict[str, Any]:
    """Counts by status, the stopped runs with their progress, and the failed ones with
    their reason. Done: every planned run completed (a failed run is not done)."""
    counts: dict[str, int] = {}
    unfinished, failed = [], {}
    runs = run_dirs(sweep_dir)
    for run in runs:
        result = read_result(run)
        status = result.status.value
        counts[status] = counts.get(status, 0) + 1
        if status == "interrupted":
            s = result.summary
            unfinished.append(f"{run.name} (step {s.get('steps_done')} of {s.get('steps')})")
        elif status in FAILED:
            failed[run.name] = f"{status}: {reason(result)}"
    ended = sum(counts.get(s, 0) for s in ENDED)
    return {
        "planned": planned,
        "counts": counts,
        "unfinished": unfinished,
        "failed": failed,
        # no folder yet, or one without a summary (a retry not yet started, or killed)
        "not_started": planned
        - len(runs)
        + counts.get("not_started", 0)
        + counts.get("unfinished", 0),
        "done": ended == planned,
    }


def travel_size(campaign: Path) -> tuple[float, float]:
    """MB to carry to continue elsewhere (everything but TensorBoard's event files),
    and of that the checkpoints."""
    total = ckpt = 0
    for p in campaign.rglob("*"):
        if p.is_file() and not p.name.startswith(EVENTS):
            size = p.stat().st_size
            total += size
            ckpt += size if p.suffix == ".pt" else 0
    return total / 2**20, ckpt / 2**20


# --- failures and their retries -----------------------------------------------------


def tries(state: dict[str, Any], key: str) -> int:
    return len(state["failures"].get(key, []))


def work_left(name: str, s: dict[str, Any], state: dict[str, Any]) -> bool:
    """Whether running the sweep again can do anything: a run not ended, other than
    one that failed more than ``retries`` times (only retried beside other work)."""
    if s["done"]:
        return False
    spent = sum(1 for run in s["failed"] if tries(state, f"{name}/{run}") > state["retries"])
    ended = sum(s["counts"].get(k, 0) for k in ENDED)
    return ended + spent < s["planned"]


def set_aside(sweep_dir: Path) -> None:
    """Before a sweep runs again: the summary.json of each run not ended (stopped, failed,
    diverged) becomes summary.previous.json, so that the summary after the sweep is this
    call's own (a run that fails again before training would otherwise keep its old one)."""
    from resnet_exp.run.records import SUMMARY

    restore(sweep_dir)  # a call cut off between the two
    for run in run_dirs(sweep_dir):
        if (run / SUMMARY).exists() and read_result(run).status.value not in ENDED:
            os.replace(run / SUMMARY, run / PREVIOUS)


def restore(sweep_dir: Path) -> None:
    """After the sweep: a run it did not reach gets its summary back; a failed try that
    was tried again is kept as summary.failed-<n>.json."""
    from resnet_exp.run.records import SUMMARY

    for run in run_dirs(sweep_dir):
        previous = run / PREVIOUS
        if not previous.exists():
            continue
        if not (run / SUMMARY).exists():
            os.replace(previous, run / SUMMARY)
        elif json.loads(previous.read_text()).get("status") in FAILED:
            n = len(list(run.glob("summary.failed-*.json"))) + 1
            os.replace(previous, run / f"summary.failed-{n}.json")
        else:
            previous.unlink()


def record_failures(name: str, s: dict[str, Any], state: dict[str, Any], call: int) -> list[str]:
    """The sweep's runs that failed in this call (before ``restore``, every failed summary
    is this call's own: set_aside), added to campaign.json; one line each."""
    lines = []
    for run, why in s["failed"].items():
        key = f"{name}/{run}"
        past = state["failures"].setdefault(key, [])
        again = bool(past) and past[-1]["reason"] == why
        past.append({"call": call, "reason": why})
        same = "the same reason as its last try; " if again else ""
        lines.append(f"{key}: {why} ({same}try {len(past)} of {state['retries'] + 1})")
    return lines


def given_up(states: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """Runs that failed on every allowed try, with their last reason."""
    out = []
    for name, s in states.items():
        for run, why in s["failed"].items():
            n = tries(state, f"{name}/{run}")
            if n > state["retries"]:
                out.append(f"{name}/{run}: failed {n} times, last: {why}")
    return out


# --- one call --------------------------------------------------------------------


def run_sweep(
    sweep: dict[str, Any], common: list[str], args: argparse.Namespace, left_s: float, log: Path
) -> int:
    exe = Path(sys.executable).parent / "resnet-exp"
    cmd = [
        str(exe) if exe.exists() else shutil.which("resnet-exp") or "resnet-exp",
        "-m",
        *common,
        *sweep["overrides"],
        *args.overrides,
        "hydra/launcher=packed",
        f"hydra.launcher.runs_per_device={args.runs_per_device}",
        f"trainer.time_limit={int(left_s)}s",
        "resume=auto",
        f"hydra.sweep.dir={args.campaign / sweep['name']}",
    ]
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    return proc.returncode


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="resnet-exp-reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every sweep")
    p.add_argument("--budget", help="wall-clock budget: 90s, 9m, 2h (dry: 60s)")
    p.add_argument(
        "--out",
        "--campaign",
        dest="campaign",
        type=Path,
        metavar="DIR",
        help="the campaign folder (default outputs/campaign, dry: outputs/campaign-dry)",
    )
    p.add_argument("--config", default=None, help="a campaign file (default: default, dry)")
    p.add_argument("--runs-per-device", type=int, help="runs trained at once (default: the file's)")
    p.add_argument(
        "--retries", type=int, help=f"tries of a failed run after its first (default {RETRIES})"
    )
    p.add_argument("--dry", action="store_true", help="tiny nets on the CPU, a budget of ~1 minute")
    args = p.parse_args(argv)
    from resnet_exp.config import parse_duration
    from resnet_exp.errors import UserError

    try:
        args.budget_s = parse_duration(args.budget or ("60s" if args.dry else None), "--budget")
    except UserError as e:
        fail(str(e))
    if args.budget_s is None:
        fail("--budget is required (e.g. --budget 9m)")
    if args.retries is not None and args.retries < 0:
        fail(f"--retries {args.retries} must be 0 or more")
    name = args.config or ("dry" if args.dry else "default")
    args.config = Path(name) if name.endswith(".yaml") else campaigns() / f"{name}.yaml"
    default_dir = "outputs/campaign-dry" if args.dry else "outputs/campaign"
    args.campaign = (args.campaign or Path(default_dir)).resolve()
    return args


def prepare(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """The campaign, its planned jobs per sweep and its state; nothing is written
    before every override and the data are checked."""
    campaign = load_campaign(args.config)
    args.runs_per_device = args.runs_per_device or int(campaign.get("runs_per_device", 4))
    common = list(campaign.get("overrides") or [])
    try:
        jobs = {
            s["name"]: planned_jobs([*common, *s["overrides"], *args.overrides])
            for s in campaign["sweeps"]
        }
    except Exception as e:  # a bad override in the file or on the command line
        fail(f"{args.config}: {str(e).splitlines()[0]}")
    check_data(set().union(*(data_sources(planned) for planned in jobs.values())))
    path = args.campaign / STATE
    state = json.loads(path.read_text()) if path.exists() else {"calls": []}
    state.setdefault("failures", {})
    state["retries"] = args.retries if args.retries is not None else state.get("retries", RETRIES)
    return campaign, {name: len(j) for name, j in jobs.items()}, state


def write_state(args: argparse.Namespace, state: dict[str, Any]) -> None:
    """campaign.json, replaced whole (a call cut off mid-write leaves the last one)."""
    path = args.campaign / STATE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    deadline = t0 + args.budget_s
    campaign, plans, state = prepare(args)
    sweeps, common = campaign["sweeps"], list(campaign.get("overrides") or [])
    args.campaign.mkdir(parents=True, exist_ok=True)
    call = len(state["calls"]) + 1
    # Writing the report and leaving take time too: keep them inside the budget.
    reserve = max(10.0, 0.03 * args.budget_s)
    print(f"reproduce: campaign {args.campaign} ({args.config.name}), budget {args.budget_s:.0f} s")
    ran: list[str] = []
    failed: list[str] = []
    for sweep in sweeps:
        name = sweep["name"]
        if not work_left(name, sweep_state(args.campaign / name, plans[name]), state):
            continue
        left = deadline - time.monotonic() - reserve
        if left < 15:
            break
        print(
            f"reproduce: {name}: {sweep.get('about', '')} ({plans[name]} runs), {left:.0f} s left"
        )
        set_aside(args.campaign / name)
        rc = run_sweep(sweep, common, args, left, args.campaign / f"{name}.log")
        ran.append(f"{name}: exit {rc}")
        failed += record_failures(name, sweep_state(args.campaign / name, plans[name]), state, call)
        restore(args.campaign / name)
        write_state(args, state)
        tail = (args.campaign / f"{name}.log").read_text().strip().splitlines()[-3:]
        # 1: some jobs failed (the sweep's last line names them), or an internal error
        if rc not in (0, 1, EXIT_TIME_LIMIT) or (rc == 1 and "jobs failed" not in tail[-1]):
            print(
                f"reproduce: {name} could not run (exit {rc}):", *tail, sep="\n  ", file=sys.stderr
            )
            return 1
        if rc == EXIT_TIME_LIMIT:
            break
    return finish(args, state, sweeps, plans, t0, ran, failed)


def finish(
    args: argparse.Namespace,
    state: dict[str, Any],
    sweeps: list[dict[str, Any]],
    plans: dict[str, int],
    t0: float,
    ran: list[str],
    failed: list[str],
) -> int:
    """The failures first, then the report, what is left, and campaign.json; the exit status."""
    if failed:
        print(f"reproduce: {len(failed)} runs failed in this call:", *failed, sep="\n  ")
    names = [s["name"] for s in sweeps]
    report = write_campaign_report(args.campaign, names)
    state["calls"].append(
        {
            "budget_s": args.budget_s,
            "ran": ran,
            "failed": [line.split(":", 1)[0] for line in failed],
            "took_s": round(time.monotonic() - t0, 1),
        }
    )
    state["sweeps"] = {n: sweep_state(args.campaign / n, plans[n]) for n in names}
    write_state(args, state)
    stuck = given_up(state["sweeps"], state)
    print_left(args.campaign, sweeps, state, report, stuck)
    print(f"reproduce: took {time.monotonic() - t0:.0f} s of {args.budget_s:.0f} s")
    return 1 if failed or stuck else 0


def write_campaign_report(campaign: Path, names: list[str]) -> Path | None:
    from resnet_exp.errors import UserError
    from resnet_exp.report import write_report

    dirs = [campaign / n for n in names if (campaign / n).is_dir()]
    try:
        return write_report(dirs, campaign / "report")[0] if dirs else None
    except UserError:  # no run got as far as its directory
        return None


def left_line(name: str, s: dict[str, Any], state: dict[str, Any]) -> str:
    done = sum(s["counts"].get(k, 0) for k in ENDED)
    line = f"{name}: {done} of {s['planned']} runs completed"
    if s["unfinished"]:
        line += f"; stopped, to continue: {', '.join(s['unfinished'])}"
    retry = [r for r in s["failed"] if tries(state, f"{name}/{r}") <= state["retries"]]
    if retry:
        line += f"; failed, to try again: {', '.join(retry)}"
    if s["not_started"]:
        line += f"; {s['not_started']} not started"
    return line


def print_left(
    campaign: Path,
    sweeps: list[dict[str, Any]],
    state: dict[str, Any],
    report: Path | None,
    stuck: list[str],
) -> None:
    states = state["sweeps"]
    left = [
        left_line(w["name"], states[w["name"]], state)
        for w in sweeps
        if work_left(w["name"], states[w["name"]], state)
    ]
    if report is not None:
        print(f"reproduce: report: {report}")
    total, ckpt = travel_size(campaign)
    if stuck:
        print(
            f"reproduce: {len(stuck)} runs failed on each of their {state['retries'] + 1} tries "
            f"and are not tried again (campaign.json; --retries N allows more):",
            *stuck,
            sep="\n  ",
        )
    if not left:
        if stuck:
            print("reproduce: the campaign is not complete: nothing else is left to run")
        else:
            print(f"reproduce: the campaign is complete ({total:.1f} MB without event files)")
        return
    print("reproduce: left:", *left, sep="\n  ")
    print(
        f"reproduce: to continue on another machine, carry {campaign} without its "
        f"{EVENTS}* files: {total:.1f} MB ({ckpt:.1f} MB of checkpoints); then run the "
        "same command with --out pointing at it"
    )


def entry() -> None:
    """The ``resnet-exp-reproduce`` command."""
    sys.exit(main())
