"""`Space`: a define-by-run Optuna search space that yields `TrainConfig` overrides.

Every space is static (the same parameters on every trial, no branches) so that
multivariate TPE can model them jointly. What the parameterisation cannot rule out (a
model too big for the cap, an invalid combination of knobs) is reported as an Optuna
constraint instead of raising, so that the sampler learns to avoid the region and the
search skips training such a point.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jepatune.errors import ConfigError, SpaceError
from jepatune.trainer.config import TrainConfig, apply_overrides

INFEASIBLE_KEY = "_infeasible"
CONSTRAINT_KEY = "space"
# The constraint a search sets above 0 on a trial that diverged or was refused before training: TPE
# ranks such trials after every completed and pruned one, so a penalty never enters its good group.
FAILURE_CONSTRAINT = "failed"
CONFIG_VIOLATION = 1.0  # an invalid TrainConfig: no degree to measure, so one unit
KNOBS = frozenset(f.name for f in dataclasses.fields(TrainConfig))

# Returns (violation > 0, reason) for a config that breaks the space's own constraint, else None.
Check = Callable[[TrainConfig], "tuple[float, str] | None"]


@dataclass(frozen=True)
class Dim:
    """One Optuna parameter: a float or int range (optionally log or stepped), or categorical choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether Optuna can take `value` for this parameter (an enqueued value outside is resampled)."""
        if self.choices is not None:
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float) or (self.integer and value != int(value)):
            return False
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return math.isclose(k, round(k), abs_tol=1e-9)

    def nearest(self, value: Any) -> Any:
        """The value of this parameter closest to `value` (the first choice when nothing compares)."""
        if self.contains(value):
            return value
        if self.choices is not None:
            numeric = [c for c in self.choices if isinstance(c, int | float) and not isinstance(c, bool)]
            if numeric and isinstance(value, int | float) and not isinstance(value, bool):
                return min(numeric, key=lambda c: abs(c - value))
            return self.choices[0]
        assert self.low is not None and self.high is not None
        if not isinstance(value, int | float) or isinstance(value, bool):
            return self.midpoint()
        return self._snap(min(max(value, self.low), self.high))

    def to_unit(self, value: Any) -> float:
        """`value` as a coordinate in [0, 1]: linear in the range (in its log for log ranges); for
        choices, the middle of the choice's equal slot."""
        if self.choices is not None:
            return (list(self.choices).index(value) + 0.5) / len(self.choices)
        assert self.low is not None and self.high is not None
        if self.high == self.low:
            return 0.5
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (float(value) - self.low) / (self.high - self.low)

    def from_unit(self, u: float) -> Any:
        """The parameter value at coordinate `u` in [0, 1] (the inverse of `to_unit`, snapped to the
        range's steps and integers)."""
        u = min(max(float(u), 0.0), 1.0)
        if self.choices is not None:
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        assert self.low is not None and self.high is not None
        if self.log:
            return self._snap(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return self._snap(self.low + u * (self.high - self.low))

    def midpoint(self) -> Any:
        """Centre of the range (geometric for log ranges), or the first choice."""
        if self.choices is not None:
            return self.choices[0]
        assert self.low is not None and self.high is not None
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return self._snap(mid)

    def _snap(self, value: float) -> Any:
        assert self.low is not None and self.high is not None
        if self.step is not None:
            k = round((value - self.low) / self.step)
            k = min(k, math.floor((self.high - self.low) / self.step + 1e-9))
            value = self.low + k * self.step
        if self.integer:
            return int(round(value))
        return float(value)


def _set_constraint(trial: Any, violation: float) -> None:
    # Optuna 5 reads per-trial constraints from the trial itself (TPE treats > 0 as infeasible).
    trial.set_constraint(CONSTRAINT_KEY, violation)


def violation_of(trial: Any) -> float:
    """The constraint violation `Space.sample` recorded on a (frozen) trial; <= 0 is feasible."""
    return float(trial.constraints.get(CONSTRAINT_KEY, 0.0))


@dataclass(frozen=True, eq=False)
class Space:
    """A search space over `TrainConfig` knobs.

    `dims` are the Optuna parameters; `derive` turns their values into knob overrides
    (1:1 for most, computed for the rest, e.g. ce_pure_frac from the bridge's share);
    `reference` holds the parameter values of the base recipe; `check` adds a constraint
    beyond TrainConfig's own validation (e.g. the size cap).
    """

    name: str
    dims: tuple[Dim, ...]
    reference: Mapping[str, Any]
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    base: TrainConfig = field(default_factory=TrainConfig)
    fixed: dict[str, Any] = field(default_factory=dict)
    check: Check | None = None
    description: str = ""

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims)

    def sample(self, trial: Any) -> dict[str, Any]:
        """Define-by-run for Optuna (or Ray's OptunaSearch): suggest every parameter, return overrides.

        Never raises for an infeasible point: the returned dict then has `_infeasible` (a
        one-line reason) and the trial's "constraint" user attribute is positive.
        """
        values = {d.name: d.suggest(trial) for d in self.dims}
        overrides, violation = self._resolve(values)
        _set_constraint(trial, violation)
        return overrides

    def overrides(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The dict `sample` returns for these parameter values (extra keys, e.g. of a Ray config, ignored)."""
        missing = [p for p in self.params if p not in params]
        if missing:
            raise SpaceError(f"space {self.name!r}: parameter {missing[0]!r} missing; pass all of {list(self.params)}")
        return self._resolve({p: params[p] for p in self.params})[0]

    def reference_point(self) -> dict[str, Any]:
        """Parameter values of the base recipe, to enqueue as a sweep's first trial."""
        return dict(self.reference)

    def config(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """The base config with `overrides` (as returned by `sample`) applied."""
        return apply_overrides(self.base, {k: v for k, v in overrides.items() if k != INFEASIBLE_KEY})

    def _resolve(self, values: dict[str, Any]) -> tuple[dict[str, Any], float]:
        overrides = {**(self.derive(values) if self.derive else values), **self.fixed}
        violation, reason = self.violation(overrides)
        if reason is not None:
            overrides[INFEASIBLE_KEY] = reason
        return overrides, violation

    def violation(self, overrides: Mapping[str, Any]) -> tuple[float, str | None]:
        """(violation, reason): (0.0, None) when the overrides give a valid config within the constraints."""
        try:
            config = self.config(overrides)
        except ConfigError as e:
            return CONFIG_VIOLATION, str(e)
        broken = self.check(config) if self.check else None
        return (0.0, None) if broken is None else broken
