"""A recipe's rung values and score anywhere in the space, from a recorded benchmark.

Each recorded recipe i has, per seed s, a vector y[i, s]: its value at every rung of the fidelity
and its final score. The surrogate splits it into the recipe's mean over seeds m[i] and the seed's
residual r[i, s] = y[i, s] - m[i], and predicts a point x of the space (in the space's unit cube,
`Dim.to_unit`) under seed s as

    y(x, s) = sum_k w_k m[k] / sum_k w_k + r[nearest, s],    w_k = 1 / distance(x, k)^2

over its `neighbours` nearest recipes, the distance scaled per parameter. The scales and the
number of neighbours are fitted to the benchmark by leave-one-out (`fit_metric`: each recipe's mean
score predicted from the others), so a parameter that barely moves the score (on the demo proxy
everything but `jepa_pure_frac`) barely counts in who is near. Why this one:
- it is exact where the recipe was recorded (the nearest is at distance 0: y[i, s] itself, a
  tabular look-up);
- a few hundred recipes in a few dimensions give no basis for a smooth global model; a weighted
  mean of neighbours assumes only locality, and never predicts a value better than the best
  neighbour's (no invented optimum for a sampler to chase);
- the seed's residual of the nearest recipe keeps the seed-to-seed noise a sweep really sees at its
  full size (averaging neighbours' seeds would shrink it), and the noise of one seed stays the same
  across rungs and score, as in a real run.
A point whose nearest recipe diverged under seed s diverges (the penalty everywhere).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from jepatune.benchmark.tables import Benchmark
from jepatune.errors import JepatuneError
from jepatune.experiment.trials import PENALTY_BPB
from jepatune.spaces import Space, get_space


class Surrogate:
    def __init__(self, bench: Benchmark, fidelity: str = "snapshot", neighbours: int | None = None,
                 space: Space | None = None, recipes: Iterable[int] | None = None, seeds: Iterable[int] | None = None):
        """`neighbours`: None fits them with the scales; `recipes`, `seeds`: only these of the
        benchmark's (default all that have the fidelity's values for every seed), e.g. to compare
        fidelities on the same recipes and seed."""
        if neighbours is not None and neighbours < 1:
            raise JepatuneError(f"neighbours={neighbours}: use at least 1 (1 = the nearest recorded recipe)")
        self.bench, self.fidelity, self.neighbours = bench, fidelity, neighbours
        self.space = space or get_space(bench.info["settings"]["space"])
        values = bench.rung_values(fidelity)  # (recipe, seed) x rung
        finals = bench.runs[bench.runs["kind"] == "main"].set_index(["recipe", "seed"])
        seeds = sorted(values.index.get_level_values("seed").unique()) if seeds is None else sorted(seeds)
        wanted = values.index.get_level_values("recipe").unique() if recipes is None else list(recipes)
        recipes = [r for r in wanted if all((r, s) in values.index and (r, s) in finals.index for s in seeds)]
        if len(recipes) < 2:
            raise JepatuneError(f"the benchmark has {len(recipes)} recipe(s) with {fidelity} values for every seed; "
                                f"the surrogate needs 2")
        self.rungs = tuple(int(c) for c in values.columns)
        self.seeds, self.recipes = seeds, recipes
        table = self.bench.recipes.set_index("recipe").loc[recipes]
        self.params = [d.name for d in self.space.dims]
        self.x = np.array([[d.to_unit(table.loc[r, d.name]) for d in self.space.dims] for r in recipes])
        # y[i, s, :] = rung values, then the final score
        self.y = np.array([[[*values.loc[(r, s)].tolist(), float(finals.loc[(r, s), "score"])] for s in seeds]
                           for r in recipes])
        self.failed = np.array([[finals.loc[(r, s), "status"] != "completed" for s in seeds] for r in recipes])
        self.mean = self.y.mean(axis=1)
        self.residual = self.y - self.mean[:, None, :]
        self.scales, self.neighbours, self.loo_error = fit_metric(self.x, self.mean[:, -1], neighbours)

    def unit(self, params: Mapping[str, Any]) -> np.ndarray:
        missing = [p for p in self.params if p not in params]
        if missing:
            raise JepatuneError(f"point {dict(params)}: parameter {missing[0]!r} of space {self.space.name!r} missing")
        return np.array([d.to_unit(params[d.name]) for d in self.space.dims])

    def _weights(self, params: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
        dist = np.sqrt((((self.x - self.unit(params)) * self.scales) ** 2).sum(axis=1))
        near = np.argsort(dist, kind="stable")[: self.neighbours]
        if dist[near[0]] < 1e-12:
            return near[:1], np.ones(1), int(near[0])
        return near, 1.0 / dist[near] ** 2, int(near[0])

    def predict(self, params: Mapping[str, Any], seed_index: int) -> tuple[dict[int, float], float, bool]:
        """(value at each rung, final score, diverged) of the point under the benchmark's seed_index-th seed."""
        near, w, nearest = self._weights(params)
        s = seed_index % len(self.seeds)
        if self.failed[nearest, s]:
            return {r: PENALTY_BPB for r in self.rungs}, PENALTY_BPB, True
        y = (w[:, None] * self.mean[near]).sum(axis=0) / w.sum() + self.residual[nearest, s]
        return dict(zip(self.rungs, y[:-1].tolist(), strict=True)), float(y[-1]), False

    def true_score(self, params: Mapping[str, Any]) -> float:
        """The point's expected final score: the weighted mean over seeds (the recipe's mean where recorded)."""
        near, w, _ = self._weights(params)
        return float((w * self.mean[near, -1]).sum() / w.sum())

    def best_true(self) -> float:
        """The best recipe's mean score: no point of the space is predicted better."""
        return float(self.mean[:, -1].min())

    def noise_floor(self) -> float:
        """The median over recipes of the seed-to-seed standard deviation of the final score."""
        ok = ~self.failed.any(axis=1)
        return float(np.median(self.y[ok, :, -1].std(axis=1, ddof=1))) if len(self.seeds) > 1 else 0.0


def loo_error(x: np.ndarray, y: np.ndarray, scales: np.ndarray, k: int) -> float:
    """Root mean square error of each recipe's y predicted from its k nearest other recipes."""
    d = np.sqrt((((x[:, None, :] - x[None, :, :]) * scales) ** 2).sum(axis=-1))
    np.fill_diagonal(d, np.inf)
    k = min(k, len(x) - 1)
    near = np.argsort(d, axis=1, kind="stable")[:, :k]
    w = 1.0 / np.maximum(np.take_along_axis(d, near, axis=1), 1e-12) ** 2
    return float(np.sqrt(np.mean(((w * y[near]).sum(axis=1) / w.sum(axis=1) - y) ** 2)))


def fit_metric(x: np.ndarray, y: np.ndarray, neighbours: int | None,
               rounds: int = 3) -> tuple[np.ndarray, int, float]:
    """(per-parameter scales, neighbours, leave-one-out RMSE): coordinate descent over scales in
    powers of 2 (the first parameter's held at 1: only ratios matter) and neighbours in 2, 4, 8
    unless given."""
    ks = (neighbours,) if neighbours is not None else (2, 4, 8)
    scales = np.ones(x.shape[1])
    best = min((loo_error(x, y, scales, k), k) for k in ks)
    for _ in range(rounds):
        improved = False
        for j in range(1, x.shape[1]):
            for factor in (0.25, 0.5, 2.0, 4.0):
                trial = scales.copy()
                trial[j] = min(max(trial[j] * factor, 1 / 64), 64)
                for k in ks:
                    if (e := loo_error(x, y, trial, k)) < best[0] - 1e-12:
                        best, scales, improved = (e, k), trial, True
        if not improved:
            break
    return scales, best[1], best[0]
