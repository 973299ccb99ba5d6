"""A search's space, read from Hydra's sweep syntax into Optuna distributions.

The syntax is Hydra's own override grammar, as ``hydra/sweeper=search`` has
always taken it (in ``hydra.sweeper.params`` or on the command line):

- ``tag(log, interval(a, b))``: a float in ``[a, b]``, sampled on a log scale;
  without ``tag(log, ...)``, uniformly (Hydra's interval is always a float).
- ``choice(a, b, c)`` or ``a,b,c``: one of the values.
- ``range(start, stop[, step])``: Hydra's range, ``stop`` excluded (as in a
  basic sweep of the same range); integers become an int distribution,
  floats or a shuffled range a choice between its values.

Anything else is a fixed override, passed to every trial as written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from resnet_exp.errors import UserError

SYNTAX = "tag(log, interval(a, b)), interval(a, b), choice(x, y, ...) or range(start, stop)"


@dataclass
class SearchSpace:
    """What Optuna samples (``key -> distribution``) and what every trial gets as is."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)  # key -> the override as written

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """One trial's command line: the fixed overrides, then its sampled values."""
        sampled = [f"{key}={override_value(params[key])}" for key in self.distributions]
        return [*self.fixed.values(), *sampled]

    def example(self) -> dict[str, Any]:
        """A value of each distribution (its lower end or first choice), to check
        before any trial that the config takes the space's keys and values."""
        out: dict[str, Any] = {}
        for key, d in self.distributions.items():
            out[key] = d.choices[0] if isinstance(d, CategoricalDistribution) else d.low  # type: ignore[attr-defined]
        return out


def parse_space(params: dict[str, str], arguments: list[str]) -> SearchSpace:
    """The config's ``hydra.sweeper.params``, then the command line's overrides (a
    key on the command line replaces the config's)."""
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except HydraException as e:
        raise UserError(f"cannot parse the search space: {str(e).splitlines()[0]}") from None
    space = SearchSpace()
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():  # in place of the config's range for the same key
            space.fixed.pop(key, None)
            space.distributions[key] = distribution(override)
        else:
            space.distributions.pop(key, None)
            space.fixed[key] = override.input_line or f"{key}={override.get_value_element_as_str()}"
    return space


def distribution(override: Override) -> BaseDistribution:
    """One sweep override as an Optuna distribution; an empty or impossible one is refused."""
    value = override.value()
    where = override.input_line or override.get_key_element()
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        low, high, log = value.start, value.end, "log" in value.tags
        if low is None or high is None or not low < high:
            raise UserError(f"{where}: the interval is empty; interval(a, b) needs a < b")
        if log and low <= 0:
            raise UserError(f"{where}: a log interval needs a > 0 (its values are logarithms)")
        return FloatDistribution(float(low), float(high), log=log)  # Hydra's interval: floats
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        if not values:
            raise UserError(f"{where}: the range is empty; range(start, stop) needs start < stop")
        if (
            all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            and not value.shuffle
        ):
            step = values[1] - values[0] if len(values) > 1 else 1
            return IntDistribution(values[0], values[-1], step=step)
        return CategoricalDistribution(values)
    if override.is_choice_sweep():
        assert isinstance(value, ChoiceSweep)
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        bad = [v for v in values if not isinstance(v, (str, int, float, bool, type(None)))]
        if bad:
            raise UserError(f"{where}: a choice takes numbers, strings, booleans or null")
        if not values:
            raise UserError(f"{where}: the choice is empty")
        return CategoricalDistribution(values)
    raise UserError(f"{where} is not a search range; use {SYNTAX}")


_PLAIN = re.compile(r"^[\w./\-+:]+$")


def override_value(v: Any) -> str:
    """A sampled value as Hydra's override grammar reads it back unchanged."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, int) or (isinstance(v, str) and _PLAIN.match(v)):
        return str(v)
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def readable(v: Any) -> str:
    """A value for people: numbers to 3 significant digits (0.0123, 1.5e-05)."""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
