"""The search settings a simulated sweep runs with: light, so the CLI builds its options from them."""

from __future__ import annotations

from dataclasses import dataclass

from jepatune.errors import JepatuneError
from jepatune.experiment.fidelity import get_fidelity, rung_steps
from jepatune.experiment.sampling import SAMPLERS


@dataclass(frozen=True)
class Strategy:
    """The search settings a simulation compares (the names and defaults of `jepatune search`)."""

    sampler: str = "tpe"
    startup_trials: int = 10
    scheduler: str = "asha"
    grace_steps: int = 0  # 0 = a quarter of the budget
    reduction_factor: int = 2
    fidelity: str = "snapshot"
    audit_frac: float = 0.05
    concurrency: int = 2

    def label(self) -> str:
        name = self.sampler if self.sampler == "random" else f"{self.sampler}({self.startup_trials})"
        if self.scheduler == "none":
            return name
        return f"{name}+asha(g{self.grace_steps or 'B/4'},rf{self.reduction_factor},{self.fidelity})"

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise JepatuneError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.scheduler not in ("asha", "none"):
            raise JepatuneError(f"--scheduler {self.scheduler!r}: choose asha or none")
        if self.reduction_factor < 2 or self.concurrency < 1 or self.startup_trials < 0 or self.grace_steps < 0:
            raise JepatuneError("--reduction-factor must be at least 2, --concurrency at least 1, --startup-trials "
                                "and --grace-steps at least 0")
        get_fidelity(self.fidelity)

    def ladder(self, budget: int) -> tuple[int, ...]:
        """ASHA's milestones below the budget, in steps of the budget (as `SweepSettings.rungs`)."""
        if self.scheduler == "none":
            return ()
        grace = self.grace_steps or max(1, round(budget * 0.25))
        return rung_steps(budget, grace, self.reduction_factor)[:-1]
