"""User search spaces from TOML files (format: see the package docstring), validated up front.

Every mistake is a SpaceError that names the file, the key and the fix, raised when the
space is loaded: a sweep must not find out after an hour that its space was impossible.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from functools import partial
from pathlib import Path
from typing import Any

from jepatune.errors import ConfigError, SpaceError
from jepatune.spaces._size import DEFAULT_CODE_BYTES, size_violation
from jepatune.spaces._space import INFEASIBLE_KEY, KNOBS, Dim, Space
from jepatune.trainer.config import TrainConfig, apply_overrides, read_toml

PROBE_POINTS = 200  # random draws that must contain one feasible point
_TOP_KEYS = ("name", "description", "size_cap", "params", "fixed")
_PARAM_KEYS = ("low", "high", "log", "step", "choices")


def _kinds() -> dict[str, tuple[type, bool]]:
    """knob -> (value type, whether None is allowed); tuple knobs map to `tuple`."""
    out: dict[str, tuple[type, bool]] = {}
    for name, tp in typing.get_type_hints(TrainConfig).items():
        options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        real = [o for o in options if o is not type(None)]
        kind = tuple if typing.get_origin(real[0]) is tuple else real[0]
        out[name] = (kind, len(real) < len(options))
    return out


def _fits(kind: type, optional: bool, value: Any) -> bool:
    if value is None:
        return optional
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind is tuple:  # TOML arrays; TrainConfig turns them into tuples
        return isinstance(value, list) and all(type(v) is int for v in value)
    return type(value) is kind


def _unknown_knob(where: str, key: str) -> SpaceError:
    close = difflib.get_close_matches(key, sorted(KNOBS), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "`jepatune train --help-config` lists the knobs"
    return SpaceError(f"{where}: {key!r} is not a TrainConfig knob; {hint}")


def _parse_dim(where: str, knob: str, spec: Any, kind: type, optional: bool) -> Dim:
    key = f"{where}: [params.{knob}]"
    if not isinstance(spec, dict):
        raise SpaceError(f"{key} must be a table with low/high or choices, e.g. [params.{knob}] low = ... high = ...")
    for k in spec:
        if k not in _PARAM_KEYS:
            close = difflib.get_close_matches(k, _PARAM_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"use {', '.join(_PARAM_KEYS)}"
            raise SpaceError(f"{key}: unknown key {k!r}; {hint}")
    if kind is tuple:
        raise SpaceError(f"{key}: {knob} holds a list of steps and cannot be searched; set it in [fixed]")
    type_name = "number" if kind is float else kind.__name__
    if "choices" in spec:
        extra = [k for k in ("low", "high", "log", "step") if k in spec]
        if extra:
            raise SpaceError(f"{key}: give either choices or a range (low/high), not both; remove {extra[0]!r}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            example = getattr(TrainConfig(), knob)
            raise SpaceError(f"{key}: choices must be a non-empty list, e.g. choices = [{example!r}]")
        for c in choices:
            if not _fits(kind, optional, c):
                raise SpaceError(f"{key}: choice {c!r} is not a {type_name} as {knob} needs; fix choices")
        if len(set(choices)) < len(choices):
            raise SpaceError(f"{key}: choices repeat a value; list each value once")
        return Dim(knob, choices=tuple(choices))
    missing = [k for k in ("low", "high") if k not in spec]
    if len(missing) == 2:
        raise SpaceError(f"{key}: needs low and high (a range) or choices (a list)")
    if missing:
        raise SpaceError(f"{key}: missing {missing[0]!r}; a range needs both low and high")
    if kind not in (int, float):
        raise SpaceError(f"{key}: {knob} is a {kind.__name__}, so a range makes no sense; give choices = [...]")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    integer = kind is int
    for k, v in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if not _fits(kind, False, v):
            raise SpaceError(f"{key}: {k} = {v!r} must be {'an integer' if integer else 'a finite number'} "
                             f"since {knob} is {'an int' if integer else 'a float'} knob")
    if not isinstance(log, bool):
        raise SpaceError(f"{key}: log must be true or false, not {log!r}")
    if low > high:
        raise SpaceError(f"{key}: low = {low!r} is above high = {high!r}; swap them")
    if low == high:
        raise SpaceError(f"{key}: empty range (low = high = {low!r}); widen it or move {knob} to [fixed]")
    if log and low <= 0:
        raise SpaceError(f"{key}: a log range must be above 0 but low = {low!r}; raise low or set log = false")
    if step is not None:
        if step <= 0:
            raise SpaceError(f"{key}: step = {step!r} must be positive")
        if log:
            raise SpaceError(f"{key}: Optuna cannot combine log = true with step; drop one of them")
    return Dim(knob, low, high, log=log, step=step, integer=integer)


def load_space(path: str | Path, base: TrainConfig | None = None, *,
               code_bytes: int = DEFAULT_CODE_BYTES) -> Space:
    """The user space in the TOML file `path`, validated; SpaceError names the key and the fix."""
    path = Path(path)
    where = f"space file {path}"
    doc = read_toml(path, "space file", SpaceError)
    for k in doc:
        if k not in _TOP_KEYS:
            raise SpaceError(f"{where}: unknown key {k!r}; use name, description, size_cap, [params.<knob>], [fixed]")
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise SpaceError(f"{where}: name must be a non-empty string")
    size_cap = doc.get("size_cap", False)
    if not isinstance(size_cap, bool):
        raise SpaceError(f"{where}: size_cap must be true or false, not {size_cap!r}")
    params, fixed = doc.get("params", {}), doc.get("fixed", {})
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{where}: no params to search; add a [params.<knob>] table with low/high or choices")
    if not isinstance(fixed, dict):
        raise SpaceError(f"{where}: fixed must be a table, e.g. [fixed] model_dim = 256")
    kinds = _kinds()
    dims = []
    for knob, spec in params.items():
        if knob not in KNOBS:
            raise _unknown_knob(f"{where}: [params]", knob)
        dims.append(_parse_dim(where, knob, spec, *kinds[knob]))
    for knob, value in fixed.items():
        if knob not in KNOBS:
            raise _unknown_knob(f"{where}: [fixed]", knob)
        if knob in params:
            raise SpaceError(f"{where}: {knob} is both searched in [params] and set in [fixed]; keep one")
        kind, optional = kinds[knob]
        if not _fits(kind, optional, value):
            raise SpaceError(f"{where}: [fixed] {knob} = {value!r} is not a {kind.__name__}; give a {kind.__name__}")
    base = base or TrainConfig()
    # The base value where the range allows it, so a sweep's first trial is the base recipe.
    reference = {d.name: (b if d.contains(b := getattr(base, d.name)) else d.midpoint()) for d in dims}
    space = Space(name=name, dims=tuple(dims), reference=reference, base=base,
                  fixed={k: tuple(v) if isinstance(v, list) else v for k, v in fixed.items()},
                  check=partial(size_violation, code_bytes=code_bytes) if size_cap else None,
                  description=str(doc.get("description", "")))
    try:
        apply_overrides(base, space.fixed)
        fixed_error = None
    except ConfigError as e:
        fixed_error = str(e)  # a searched knob may still repair it (e.g. a wider ce_pure_frac)
    ensure_feasible(space, where, fixed_error)
    return space


def ensure_feasible(space: Space, where: str, fixed_error: str | None = None) -> None:
    """Raise SpaceError when neither the reference point nor PROBE_POINTS random draws are feasible."""
    if INFEASIBLE_KEY not in space.overrides(space.reference_point()):
        return
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line for a probe
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        last = ""
        for _ in range(PROBE_POINTS):
            trial = study.ask()
            out = space.sample(trial)
            if INFEASIBLE_KEY not in out:
                return
            last = out[INFEASIBLE_KEY]
    finally:
        optuna.logging.set_verbosity(verbosity)
    if fixed_error is not None:
        raise SpaceError(f"{where}: [fixed] gives an invalid config ({fixed_error}); fix the value")
    raise SpaceError(f"{where}: no feasible point in {PROBE_POINTS} random draws (last: {last}); "
                     "widen the ranges or change [fixed]")
