"""search.png: a study's history and each parameter against the validation error
(matplotlib's Agg canvas, as the report's figures)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

SEARCH_PNG = "search.png"


def _value(t: Any) -> float | None:
    """A completed trial's value; a pruned one's last reported error (where it stopped)."""
    from optuna.trial import TrialState

    if t.state == TrialState.COMPLETE and t.value is not None:
        return float(t.value)
    if t.state == TrialState.PRUNED and t.intermediate_values:
        return float(t.intermediate_values[max(t.intermediate_values)])
    return None


def plot_search(trials: list[Any], path: Path, objective: str = "validation error %") -> Path:
    """Trials over time (completed dots, pruned crosses at the epoch they reached,
    the best so far as a line), then one panel per parameter."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    shown = [t for t in trials if _value(t) is not None]
    params = sorted({k for t in shown for k in t.params})
    n = 1 + len(params)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    done = [t for t in shown if t.state == TrialState.COMPLETE]
    pruned = [t for t in shown if t.state == TrialState.PRUNED]

    ax = axes[0]
    ax.scatter([t.number for t in done], [_value(t) for t in done], s=18, label="completed")
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [_value(t) for t in pruned],
            marker="x",
            s=18,
            color="tab:gray",
            label="pruned (error where it stopped)",
        )
    best, xs, ys = math.inf, [], []
    for t in sorted(done, key=lambda t: t.number):
        best = min(best, float(t.value))
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set(title="optimisation history", xlabel="trial", ylabel=objective)
    ax.legend(fontsize="small")

    for ax, key in zip(axes[1:], params):
        dist = next(t.distributions[key] for t in shown if key in t.params)
        for group, style in ((done, {"s": 18}), (pruned, {"marker": "x", "color": "tab:gray"})):
            pts = [(t.params[key], _value(t)) for t in group if key in t.params]
            if pts:
                if isinstance(dist, CategoricalDistribution):
                    pts = [(str(x), y) for x, y in pts]
                ax.scatter(*zip(*pts), **style)
        if getattr(dist, "log", False):
            ax.set_xscale("log")
        ax.set(title=key, xlabel=key, ylabel=objective)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)
    return path
