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

    resnet-exp-reproduce --budget 9m                    # default campaign, outputs/campaign
    resnet-exp-reproduce --budget 2h --campaign DIR data.root=/data/cifar10 data.download=false
    resnet-exp-reproduce --dry                          # tiny nets on the CPU, ~1 minute

Positional arguments are Hydra overrides added to every sweep. Exit status: 0 when
the call ended on time (whether or not work is left), 1 when a sweep could not
run (its command's error is printed), 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STATE = "campaign.json"
EVENTS = "events.out.tfevents."
EXIT_TIME_LIMIT = 75  # a sweep left unfinished at its time limit (train/result.py)


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


# --- the jobs a sweep plans ------------------------------------------------------


def planned_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweep would launch for ``resnet-exp -m OVERRIDES``: the
    config's ``hydra.sweeper.params`` (an experiment's), then the command line's sweeps
    (which win for the same key). Composing them also checks every override."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from resnet_exp.config import config_dir

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    plain.append("hydra/launcher=packed")  # as every sweep runs (its keys may be set)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=plain, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    batches = BasicSweeper.split_arguments(parser.parse_overrides([*params, *overrides]), None)
    return [job for batch in batches for job in batch]


# --- what a sweep folder holds ---------------------------------------------------


def sweep_state(sweep_dir: Path, planned: int) -> dict[str, Any]:
    """Counts by status, and the unfinished runs with their progress."""
    from resnet_exp.run.result import RunResult, Status

    runs = (
        sorted(p for p in sweep_dir.glob("*") if (p / ".hydra").is_dir())
        if sweep_dir.is_dir()
        else []
    )
    counts: dict[str, int] = {}
    unfinished = []
    for run in runs:
        path = run / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        result = RunResult.from_summary(summary)
        counts[result.status.value] = counts.get(result.status.value, 0) + 1
        if result.status is Status.interrupted:
            unfinished.append(
                f"{run.name} (step {summary.get('steps_done')} of {summary.get('steps')})"
            )
    ended = sum(counts.get(s, 0) for s in ("completed", "failed", "diverged"))
    return {
        "planned": planned,
        "counts": counts,
        "unfinished": unfinished,
        "not_started": planned - len(runs) + counts.get("not_started", 0),
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
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every sweep")
    p.add_argument("--budget", help="wall-clock budget: 90s, 9m, 2h (dry: 60s)")
    p.add_argument("--campaign", type=Path, help="the campaign folder (default outputs/campaign)")
    p.add_argument("--config", default=None, help="a campaign file (default: default, dry)")
    p.add_argument("--runs-per-device", type=int, help="runs trained at once (default: the file's)")
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
    name = args.config or ("dry" if args.dry else "default")
    args.config = Path(name) if name.endswith(".yaml") else campaigns() / f"{name}.yaml"
    default_dir = "outputs/campaign-dry" if args.dry else "outputs/campaign"
    args.campaign = (args.campaign or Path(default_dir)).resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    deadline = t0 + args.budget_s
    campaign = load_campaign(args.config)
    args.runs_per_device = args.runs_per_device or int(campaign.get("runs_per_device", 4))
    common = list(campaign.get("overrides") or [])
    sweeps = campaign["sweeps"]
    try:
        plans = {
            s["name"]: len(planned_jobs([*common, *s["overrides"], *args.overrides]))
            for s in sweeps
        }
    except Exception as e:  # a bad override in the file or on the command line
        fail(f"{args.config}: {str(e).splitlines()[0]}")
    args.campaign.mkdir(parents=True, exist_ok=True)
    state_path = args.campaign / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {"calls": []}
    # Writing the report and leaving take time too: keep them inside the budget.
    reserve = max(10.0, 0.03 * args.budget_s)
    print(f"reproduce: campaign {args.campaign} ({args.config.name}), budget {args.budget_s:.0f} s")
    ran: list[str] = []
    for sweep in sweeps:
        name = sweep["name"]
        if sweep_state(args.campaign / name, plans[name])["done"]:
            continue
        left = deadline - time.monotonic() - reserve
        if left < 15:
            break
        print(
            f"reproduce: {name}: {sweep.get('about', '')} ({plans[name]} runs), {left:.0f} s left"
        )
        rc = run_sweep(sweep, common, args, left, args.campaign / f"{name}.log")
        ran.append(f"{name}: exit {rc}")
        tail = (args.campaign / f"{name}.log").read_text().strip().splitlines()[-3:]
        # 1: some jobs failed (the sweep's last line names them), or an internal error
        if rc not in (0, 1, EXIT_TIME_LIMIT) or (rc == 1 and "jobs failed" not in tail[-1]):
            print(
                f"reproduce: {name} could not run (exit {rc}):", *tail, sep="\n  ", file=sys.stderr
            )
            return 1
        if rc == EXIT_TIME_LIMIT:
            break
    report = write_campaign_report(args.campaign, [s["name"] for s in sweeps])
    state["calls"].append(
        {"budget_s": args.budget_s, "ran": ran, "took_s": round(time.monotonic() - t0, 1)}
    )
    state["sweeps"] = {
        s["name"]: sweep_state(args.campaign / s["name"], plans[s["name"]]) for s in sweeps
    }
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    print_left(args.campaign, sweeps, state["sweeps"], report)
    print(f"reproduce: took {time.monotonic() - t0:.0f} s of {args.budget_s:.0f} s")
    return 0


def write_campaign_report(campaign: Path, names: list[str]) -> Path | None:
    from resnet_exp.errors import UserError
    from resnet_exp.report import write_report

    dirs = [campaign / n for n in names if (campaign / n).is_dir()]
    try:
        return write_report(dirs, campaign / "report")[0] if dirs else None
    except UserError:  # no run got as far as its directory
        return None


def print_left(
    campaign: Path, sweeps: list[dict[str, Any]], states: dict[str, Any], report: Path | None
) -> None:
    left = []
    for sweep in sweeps:
        s = states[sweep["name"]]
        if s["done"]:
            continue
        done = sum(s["counts"].get(k, 0) for k in ("completed", "failed", "diverged"))
        line = f"{sweep['name']}: {done} of {s['planned']} runs ended"
        if s["unfinished"]:
            line += f"; stopped, to continue: {', '.join(s['unfinished'])}"
        if s["not_started"]:
            line += f"; {s['not_started']} not started"
        left.append(line)
    if report is not None:
        print(f"reproduce: report: {report}")
    total, ckpt = travel_size(campaign)
    if left:
        print("reproduce: left:", *left, sep="\n  ")
        print(
            f"reproduce: to continue on another machine, carry {campaign} without its "
            f"{EVENTS}* files: {total:.1f} MB ({ckpt:.1f} MB of checkpoints); then run the "
            "same command with --campaign pointing at it"
        )
    else:
        print(f"reproduce: the campaign is complete ({total:.1f} MB without event files)")


def entry() -> None:
    """The ``resnet-exp-reproduce`` command."""
    sys.exit(main())
