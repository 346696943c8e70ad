"""The named spaces: curriculum (the default), regularizer, optimizer and full."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from jepatune.errors import SpaceError
from jepatune.spaces._size import DEFAULT_CODE_BYTES, size_violation
from jepatune.spaces._space import Dim, Space
from jepatune.trainer.config import TrainConfig

DEFAULT_SPACE = "curriculum"
NO_SWA_FROM = 1.0  # swa_start values from here to the top of its range mean "no SWA"


class SpaceFactory(Protocol):
    def __call__(self, base: TrainConfig | None = None, *, code_bytes: int = DEFAULT_CODE_BYTES) -> Space: ...


# --- parameter groups: dims, how to read their reference values off a base, how to derive knobs --------------

_CURRICULUM = (
    Dim("jepa_pure_frac", 0.0, 0.6),
    # The bridge's share of the budget left after the JEPA stage, rather than ce_pure_frac:
    # ce_pure_frac = jepa + share * (1 - jepa) >= jepa_pure_frac by construction, with no
    # conditional range that would break multivariate TPE. A bridge length added to jepa and
    # capped at 1 put about a quarter of the prior on ce_pure_frac = 1 (no CE stage at all);
    # a share keeps every stage split in the range, and only share = 1 (no mass) has no CE stage.
    Dim("bridge_share", 0.0, 1.0),
    Dim("sigreg_weight", 1e-3, 1.0, log=True),
    # One parameter covers both SWA on/off and its start, so the space stays static. Not
    # named swa_start_frac: Ray merges raw parameters into the trial config, where a
    # parameter named like a knob would be overwritten by the knob's derived value.
    Dim("swa_start", 0.3, 1.05),
)
_REGULARIZER = (
    Dim("regularizer", choices=("varcov", "lejepa", "none")),
    Dim("sigreg_weight", 1e-3, 1.0, log=True),
    Dim("jepa_weight", 1e-3, 3.0, log=True),
)
_OPTIMIZER = (
    Dim("matrix_lr", 0.005, 0.2, log=True),
    Dim("tied_embed_lr", 0.005, 0.5, log=True),
    Dim("scalar_lr", 0.005, 0.2, log=True),
    Dim("warmdown_frac", 0.02, 0.6),  # holds the reference's 2,000 of its 50,000 iterations (0.04)
    Dim("muon_momentum", 0.85, 0.99),
)
_SHAPE = (
    Dim("num_layers", 4, 16, integer=True),
    Dim("model_dim", choices=(256, 384, 512, 640, 768)),
    Dim("num_heads", choices=(4, 8)),  # num_kv_heads = num_heads // 2, as the reference's 8/4
    Dim("mlp_mult", 1, 4, integer=True),
)


def _ce_pure_frac(jepa: float, share: float) -> float:
    # Rounding hides float noise (the share for 0.2 -> 0.9 is 0.8749999999999999, which gives
    # 0.8999999999999999) so a reference point gives its base's value back exactly; max()
    # keeps ce >= jepa after rounding.
    return max(jepa, min(1.0, round(jepa + share * (1.0 - jepa), 12)))


def _bridge_share(jepa: float, ce: float) -> float:
    """The share that gives `ce` after `jepa` (no remaining budget: no bridge)."""
    rest = 1.0 - jepa
    return (ce - jepa) / rest if rest > 0 else 0.0


def _derive(values: dict[str, Any]) -> dict[str, Any]:
    """Knob overrides for any mix of the groups above; other parameters map 1:1."""
    out = dict(values)
    if "bridge_share" in out:
        out["ce_pure_frac"] = _ce_pure_frac(out["jepa_pure_frac"], out.pop("bridge_share"))
    if "swa_start" in out:
        swa = out.pop("swa_start")
        # Explicit None: a base config's own SWA start must not survive "no SWA".
        out["swa_enabled"], out["swa_start_frac"] = (True, swa) if swa < NO_SWA_FROM else (False, None)
    if "num_heads" in out:
        out["num_kv_heads"] = out["num_heads"] // 2
    return out


def _reference(dims: tuple[Dim, ...], base: TrainConfig) -> dict[str, Any]:
    """Parameter values that reproduce `base`, each clipped into its dim."""
    ref: dict[str, Any] = {}
    by_name = {d.name: d for d in dims}
    for d in dims:
        if d.name == "bridge_share":
            # Not rounded: the exact quotient maps back to the base's ce_pure_frac.
            value: Any = _bridge_share(by_name["jepa_pure_frac"].nearest(base.jepa_pure_frac), base.ce_pure_frac)
        elif d.name == "swa_start":
            # A start at 1.0 would never average anything, so it lands in the no-SWA region as it should.
            value = base.swa_start if base.swa_enabled else d.high
        elif d.name == "warmdown_frac" and base.warmdown_frac == 0:
            # The base warms down over warmdown_iters steps: the same length as a fraction
            # (schedule.lr_multiplier rounds frac * iterations back to the step count).
            value = base.warmdown_iters / base.iterations
        else:
            value = getattr(base, d.name)
        ref[d.name] = d.nearest(value)
    return ref


def _make(name: str, dims: tuple[Dim, ...], description: str, sized: bool = False) -> SpaceFactory:
    def factory(base: TrainConfig | None = None, *, code_bytes: int = DEFAULT_CODE_BYTES) -> Space:
        base = base or TrainConfig()
        return Space(name=name, dims=dims, reference=_reference(dims, base), derive=_derive, base=base,
                     check=partial(size_violation, code_bytes=code_bytes) if sized else None, description=description)
    factory.__name__ = factory.__qualname__ = f"{name}_space"
    factory.__doc__ = description
    return factory


def _union(*groups: tuple[Dim, ...]) -> tuple[Dim, ...]:
    seen: dict[str, Dim] = {}
    for group in groups:
        for d in group:
            seen.setdefault(d.name, d)
    return tuple(seen.values())


SPACES: dict[str, SpaceFactory] = {
    "curriculum": _make("curriculum", _CURRICULUM,
                        "stage fractions (jepa_pure_frac, the bridge's share of the rest), regulariser weight, "
                        "SWA start or no SWA"),
    "regularizer": _make("regularizer", _REGULARIZER, "regulariser kind and weight, JEPA weight"),
    "optimizer": _make("optimizer", _OPTIMIZER, "Muon/Adam learning rates, warm-down fraction, Muon momentum"),
    "full": _make("full", _union(_CURRICULUM, _REGULARIZER, _OPTIMIZER, _SHAPE),
                  "all of the above plus model shape; shapes that cannot fit the 16 MB cap are infeasible",
                  sized=True),
}


def get_space(name_or_path: str | Path = DEFAULT_SPACE, base: TrainConfig | None = None, *,
              code_bytes: int = DEFAULT_CODE_BYTES) -> Space:
    """A named space, or a user space from a TOML file (a path ending in .toml, or an existing file).

    `base` is the recipe the space varies (defaults: the reference); `code_bytes` is what the
    submission's code adds to the artifact for the size cap.
    """
    from jepatune.spaces._user import ensure_feasible, load_space

    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".toml") or path.is_file():
        return load_space(path, base, code_bytes=code_bytes)
    factory: Callable[..., Space] | None = SPACES.get(text)
    if factory is None:
        close = difflib.get_close_matches(text, list(SPACES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpaceError(f"unknown search space {text!r}; {hint}choose one of {', '.join(SPACES)} "
                         "or give a path to a .toml space file")
    space = factory(base, code_bytes=code_bytes)
    ensure_feasible(space, f"space {text!r} with this base config")
    return space
