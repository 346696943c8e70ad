"""The rung ladder, and what a trial's value at a rung measures: one `Fidelity` object each.

Judged at milestone m_j of rungs m_1 < ... < m_n (budget B = m_n's end, probe branches of k steps),
a trial has spent:
- ``snapshot``: the running model's BPB mid-curriculum. m_j steps; run to the end, B.
- ``probe``: the BPB after a k-step pure-CE cool-down branched off at each rung and rolled back.
  m_j + j k; to the end B + n k.
- ``restart``: each rung is a whole curriculum compressed to m_j steps, trained from scratch.
  m_1 + ... + m_j; to the end m_1 + ... + m_n + B.

A sweep picks its fidelity once (`get_fidelity`); the trial function, the ASHA set-up, the cache
key and the replay's compute count all ask the object, never its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from jepatune.errors import JepatuneError

# The defaults by evidence (bench/README.md, fidelity_study.py): with the first rung at a quarter of
# the budget, ASHA on the snapshot value never stopped the best of 24 curriculum configs in 200
# replayed orders and spent 55% of the compute; at an eighth the snapshot ranks poorly (Spearman
# 0.36 with the final BPB). Probe and restart cost more and stopped the best more often.
GRACE_DEFAULT_FRAC = 0.25


def default_grace(trial_steps: int) -> int:
    """The first rung when none is given: `GRACE_DEFAULT_FRAC` of the budget, at least one step."""
    return max(1, round(trial_steps * GRACE_DEFAULT_FRAC))


def rung_steps(trial_steps: int, grace_steps: int, reduction_factor: float) -> tuple[int, ...]:
    """ASHA's milestones grace * rf^k below the budget, then the budget itself."""
    rungs, s = [], grace_steps
    while s < trial_steps:
        rungs.append(int(s))
        s *= reduction_factor
    return (*rungs, trial_steps)


@dataclass(frozen=True)
class Fidelity:
    """The snapshot fidelity; `Probe` and `Restart` change what differs."""

    name: str = "snapshot"
    help: str = "the running model's BPB at the rung"
    restarts: bool = False  # each rung retrains from scratch at the rung's budget
    time_attr: str = "step"  # the report field ASHA counts milestones in

    def milestones(self, rungs: tuple[int, ...]) -> tuple[int, ...]:
        """Where ASHA judges a trial, in `time_attr` units, ending with the budget."""
        return tuple(rungs)

    def probe_length(self, rungs: tuple[int, ...], probe_steps: int) -> int:
        """Steps of the cool-down branched off at each rung (0: none)."""
        return 0

    def cost(self, rungs: tuple[int, ...], budget: int, probe_steps: int = 0) -> tuple[dict[int, float], float]:
        """(compute a trial has spent when judged at each rung, compute of a trial run to the end), in
        optimiser steps."""
        return {int(r): float(r) for r in rungs}, float(budget)

    def cache_key(self, recipe_key: str) -> str:
        """The finished-trial cache's name for a recipe trained under this fidelity."""
        return recipe_key

    def recorded_columns(self) -> tuple[tuple[str, Fidelity], ...]:
        """The curves columns a sweep of this fidelity records rung values in, with what each measures."""
        return (("val_bpb", self),)


@dataclass(frozen=True)
class Probe(Fidelity):
    name: str = "probe"
    help: str = "a short pure-CE cool-down branched off the running model at the rung"

    def probe_length(self, rungs: tuple[int, ...], probe_steps: int) -> int:
        return probe_steps or max(1, rungs[0] // 2)

    def cost(self, rungs: tuple[int, ...], budget: int, probe_steps: int = 0) -> tuple[dict[int, float], float]:
        spent = {int(r): float(r + (j + 1) * probe_steps) for j, r in enumerate(rungs)}
        return spent, float(budget + len(rungs) * probe_steps)

    def recorded_columns(self) -> tuple[tuple[str, Fidelity], ...]:
        return (("val_bpb", self), ("snapshot_bpb", SNAPSHOT))  # the running model's value beside the probe's


@dataclass(frozen=True)
class Restart(Fidelity):
    name: str = "restart"
    help: str = "a whole curriculum compressed to the rung's budget, retrained from scratch"
    restarts: bool = True
    time_attr: str = "compute_steps"  # rung k is reached after r1 + ... + rk steps

    def milestones(self, rungs: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(accumulate(rungs))

    def cost(self, rungs: tuple[int, ...], budget: int, probe_steps: int = 0) -> tuple[dict[int, float], float]:
        spent = dict(zip((int(r) for r in rungs), map(float, accumulate(rungs)), strict=True))
        return spent, float(sum(rungs) + budget)

    def cache_key(self, recipe_key: str) -> str:
        return recipe_key + "-restart"  # its values differ from a snapshot trial's of the same recipe


SNAPSHOT = Fidelity()
FIDELITIES: dict[str, Fidelity] = {f.name: f for f in (SNAPSHOT, Restart(), Probe())}


def get_fidelity(name: str) -> Fidelity:
    if name not in FIDELITIES:
        raise JepatuneError(f"fidelity {name!r} is unknown; choose one of {', '.join(FIDELITIES)}")
    return FIDELITIES[name]
