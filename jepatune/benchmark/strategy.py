"""The search settings a simulated sweep runs with: light, so the CLI builds its options from them."""

from __future__ import annotations

from dataclasses import dataclass

from jepatune.errors import JepatuneError
from jepatune.experiment.fidelity import default_grace, get_fidelity, rung_steps
from jepatune.experiment.sampling import SAMPLERS
from jepatune.experiment.settings import SCHEDULERS, SweepSettings


@dataclass(frozen=True)
class Strategy:
    """The search settings a simulation compares: the names and defaults of `SweepSettings`."""

    sampler: str = SweepSettings.sampler
    startup_trials: int = SweepSettings.startup_trials
    scheduler: str = SweepSettings.scheduler
    grace_steps: int = SweepSettings.grace_steps  # 0 = default_grace(budget)
    reduction_factor: int = SweepSettings.reduction_factor
    fidelity: str = SweepSettings.fidelity
    audit_frac: float = SweepSettings.audit_frac
    concurrency: int = SweepSettings.concurrency

    def label(self) -> str:
        name = self.sampler if self.sampler == "random" else f"{self.sampler}({self.startup_trials})"
        if self.scheduler == "none":
            return name
        return f"{name}+asha(g{self.grace_steps or 'B/4'},rf{self.reduction_factor},{self.fidelity})"

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise JepatuneError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.scheduler not in SCHEDULERS:
            raise JepatuneError(f"--scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.reduction_factor < 2 or self.concurrency < 1 or self.startup_trials < 0 or self.grace_steps < 0:
            raise JepatuneError("--reduction-factor must be at least 2, --concurrency at least 1, --startup-trials "
                                "and --grace-steps at least 0")
        get_fidelity(self.fidelity)

    def ladder(self, budget: int) -> tuple[int, ...]:
        """ASHA's milestones below the budget, in steps of the budget (as `SweepSettings.rungs`)."""
        if self.scheduler == "none":
            return ()
        return rung_steps(budget, self.grace_steps or default_grace(budget), self.reduction_factor)[:-1]
