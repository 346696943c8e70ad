"""What a benchmark recording records: light, so the CLI builds its options from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jepatune.errors import JepatuneError
from jepatune.experiment.fidelity import default_grace, rung_steps
from jepatune.trainer.config import PRESETS


@dataclass(frozen=True)
class RecordSettings:
    """What a benchmark records; the defaults are the demo proxy's (`jepatune demo`)."""

    out: str
    data: str
    space: str = "curriculum"
    preset: str | None = "demo"
    overrides: dict[str, Any] = field(default_factory=dict)
    recipes: int = 200
    seeds: int = 2
    trial_steps: int = 120
    # Every rung of ASHA's ladders for first rungs of B/8 and B/4 and reduction factors 2 and 3.
    graces: tuple[int, ...] = (0, 0)  # 0: B/8, and the sweep's default first rung (B/4)
    factors: tuple[int, ...] = (2, 3)
    # Recipes drawn, once the main runs are in, around the best ones (each best recipe the centre of a
    # Latin hypercube of half-width `refine_width` in the unit cube): where a sweep's sampler ends up,
    # the surrogate interpolates between close neighbours instead of far ones.
    refine_recipes: int = 40
    refine_width: float = 0.1
    transfer_recipes: int = 30
    transfer_factor: int = 4
    transfer_seeds: int = 2
    fidelity_seeds: int = 2  # seeds of every recipe's restart runs (the first ones of `seeds`)
    probe_steps: int = 15  # half the default first rung (B/4), as a probe sweep's default; 0: no probes
    fidelity_rungs: tuple[int, ...] = ()  # the restart rungs; () = every recorded rung
    seed: int = 0  # the design's seed
    workers: int = 2  # training processes on this machine (without `ray`)
    ray: bool = False  # each run a Ray task: on the cluster RAY_ADDRESS names, else on a local Ray
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0

    def grace_steps(self) -> tuple[int, ...]:
        b = self.trial_steps
        return tuple(g or (max(1, b // 8) if i == 0 else default_grace(b)) for i, g in enumerate(self.graces))

    def rungs(self) -> tuple[int, ...]:
        """Every rung below the budget of every recorded ladder (where each main run is evaluated)."""
        return tuple(sorted({r for g in self.grace_steps() for f in self.factors
                             for r in rung_steps(self.trial_steps, g, f)[:-1]}))

    def restart_rungs(self) -> tuple[int, ...]:
        """The rungs each recipe is also trained to from scratch (`restart`): every recorded rung unless
        given. Probes need no runs of their own: a main run branches one off at every rung."""
        return self.fidelity_rungs or self.rungs()

    def check(self) -> None:
        for key, low in (("recipes", 2), ("seeds", 1), ("trial_steps", 2), ("transfer_factor", 1),
                         ("transfer_seeds", 1), ("fidelity_seeds", 0), ("workers", 1), ("probe_steps", 0)):
            if getattr(self, key) < low:
                raise JepatuneError(f"--{key.replace('_', '-')}={getattr(self, key)}: must be at least {low}")
        if self.refine_recipes < 0:
            raise JepatuneError(f"--refine-recipes={self.refine_recipes}: must be at least 0")
        if not 0 < self.refine_width <= 0.5:
            raise JepatuneError(f"--refine-width={self.refine_width}: must be in (0, 0.5], a half-width in the unit "
                                f"cube")
        if self.fidelity_seeds > self.seeds:
            raise JepatuneError(f"--fidelity-seeds={self.fidelity_seeds}: at most --seeds={self.seeds} (the restarts "
                                f"use the main runs' seeds)")
        if not set(self.fidelity_rungs) <= set(self.rungs()):
            raise JepatuneError(f"--fidelity-rungs {list(self.fidelity_rungs)}: restarts are recorded at rungs the "
                                f"main runs evaluate, {list(self.rungs())}")
        if self.cpus_per_run <= 0 or self.gpus_per_run < 0:
            raise JepatuneError(f"--cpus-per-run={self.cpus_per_run} --gpus-per-run={self.gpus_per_run}: a run needs "
                                f"more than 0 CPUs and at least 0 GPUs")
        if not 0 <= self.transfer_recipes <= self.recipes + self.refine_recipes:
            raise JepatuneError(f"--transfer-recipes={self.transfer_recipes}: must be in [0, --recipes + "
                                f"--refine-recipes]")
        if any(f < 2 for f in self.factors):
            raise JepatuneError(f"--factors {list(self.factors)}: every reduction factor must be at least 2")
        if self.preset is not None and self.preset not in PRESETS:
            raise JepatuneError(f"--preset {self.preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
