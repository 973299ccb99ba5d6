"""What the benchmark scripts share: a run's config from Hydra overrides, the
subprocess each measurement runs in (killed at a timeout), the results table and
files, and the machine's name and peak memory."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def compose(overrides: list[str]):
    """The Config ``resnet-exp`` would build from these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from resnet_exp.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=overrides))


# A measurement that takes longer has hung (a wedged GPU, a deadlocked worker): killed.
WORKER_TIMEOUT_S = float(os.environ.get("RESNET_EXP_WORKER_TIMEOUT", 600))


@dataclass
class Finished:
    """What a subprocess left: ``returncode`` None when it was killed at its timeout."""

    returncode: int | None
    stdout: str
    stderr: str
    timeout_s: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def error(self, what: str) -> str | None:
        """One line when it did not succeed, else None."""
        if self.timed_out:
            return f"{what} timed out after {self.timeout_s:.0f} s (killed)"
        if self.returncode != 0:
            tail = (self.stderr.strip().splitlines() or ["?"])[-1]
            return f"{what} exited {self.returncode}: {tail}"
        return None


def run_killable(cmd: list[str], timeout_s: float, cwd: Path | None = None) -> Finished:
    """``cmd`` in its own process group, killed with everything it started (a benchmark's
    workers too) when it runs past ``timeout_s``."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return Finished(proc.returncode, out, err, timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Finished(None, out, err, timeout_s)
    finally:
        if proc.poll() is None:  # interrupted while waiting: leave no orphans behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_worker(script: str, worker_args: list[str]) -> dict[str, Any]:
    """``script --worker ...`` in a fresh process (its peak memory is its own): the JSON
    of its last output line, or ``{"error": ...}`` (its last error line, or its timeout)."""
    done = run_killable([sys.executable, script, "--worker", *worker_args], WORKER_TIMEOUT_S)
    error = done.error("the measurement")
    if error is not None:
        return {"error": error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(
    columns: list[str],
    rows: list[dict[str, Any]],
    cells: Callable[[dict[str, Any]], list[str]],
    keys: list[str],
) -> str:
    """A table of ``rows``; a row with an ``error`` shows its ``keys`` and the error."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        row = (
            cells(r) if "error" not in r else [*(str(r[k]) for k in keys), f"failed: {r['error']}"]
        )
        row += [""] * (len(columns) - len(row))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_results(out: Path, stem: str, text: str, payload: dict[str, Any]) -> None:
    """``out/stem.md`` (``text``) and ``out/stem.json``, then the text on the terminal."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    print()
    print(text)
    print(f"written: {out / f'{stem}.md'}, {out / f'{stem}.json'}")


def peak_memory_mb(device: Any) -> float:
    """CUDA max allocated on a GPU, peak RSS of this process on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"
