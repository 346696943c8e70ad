"""Search spaces over `TrainConfig` knobs, their constraints, and the base (reference) recipe.

A space is a define-by-run function for Optuna (and Ray's `OptunaSearch`)::

    space = get_space("curriculum")                # or "regularizer", "optimizer", "full", "my.toml"
    study.enqueue_trial(space.reference_point())   # every sweep contains the base recipe
    overrides = space.sample(trial)                # TrainConfig overrides, e.g. {"ce_pure_frac": 0.8, ...}

A point the parameterisation cannot rule out (a model over the 16 MB cap, an invalid knob
combination) is not an error: `sample` returns it with `"_infeasible": "<reason>"` and sets
the trial's constraint (Optuna's `Trial.set_constraint`) above 0, so TPE learns to avoid
the region and the search skips training it.

Named spaces
------------
- ``curriculum`` (default): jepa_pure_frac in [0, 0.6]; bridge_share in [0, 1], the bridge's
  share of what the JEPA stage leaves, with ce_pure_frac = jepa_pure_frac + bridge_share *
  (1 - jepa_pure_frac) (so "no CE stage" is a point, not a quarter of the prior); sigreg_weight
  in [1e-3, 1] (log); swa_start in [0.3, 1.05] -> swa_start_frac, where 1.0 and above means no SWA
  (swa_enabled = false). bridge_share and swa_start are the only parameters that are not
  knobs; Ray merges them into a trial's config, so drop them, or rebuild the overrides
  with `space.overrides(config)`.
- ``regularizer``: regularizer in {varcov, lejepa, none}; sigreg_weight in [1e-3, 1] (log);
  jepa_weight in [1e-3, 3] (log).
- ``optimizer``: matrix_lr [0.005, 0.2], tied_embed_lr [0.005, 0.5], scalar_lr [0.005, 0.2]
  (all log); warmdown_frac [0.02, 0.6]; muon_momentum [0.85, 0.99].
- ``full``: all of the above plus num_layers [4, 16], model_dim {256, 384, 512, 640, 768},
  num_heads {4, 8} (num_kv_heads = num_heads / 2), mlp_mult [1, 4]; a shape that cannot fit
  the cap even after zlib is infeasible.

User spaces (TOML)
------------------
Give a path ending in ``.toml``::

    name = "my-space"            # optional; default: the file name
    description = "..."          # optional
    size_cap = true              # optional: shapes that cannot fit 16 MB are infeasible

    [params.jepa_pure_frac]      # one table per searched knob (TrainConfig names)
    low = 0.0
    high = 0.5
    [params.sigreg_weight]
    low = 1e-3
    high = 1.0
    log = true                   # log-uniform; low must be above 0
    [params.num_layers]          # an int knob takes integer low/high (and step)
    low = 4
    high = 12
    step = 2
    [params.regularizer]         # choices instead of a range; values of the knob's type
    choices = ["varcov", "lejepa"]

    [fixed]                      # knobs set for every trial of this space
    model_dim = 256

Rules: each param has either low and high (low < high; ``step`` > 0 optional; ``log``
optional and not with step) or a non-empty ``choices`` list; str and bool knobs take
choices only; a knob is either searched or fixed. Int knobs are sampled with
``suggest_int``, float knobs with ``suggest_float``. Every sampled point is checked
against TrainConfig's validation (e.g. jepa_pure_frac <= ce_pure_frac): invalid points are
infeasible, and a space where none of 200 random points is valid is refused when loaded.
The reference point is the base config's value of each knob where the range allows it,
else the range's midpoint (geometric for log ranges) or the first choice.
Mistakes raise `SpaceError` naming the file, the key and the fix.

Importing this package loads neither torch, Ray nor pandas (Optuna only when a space is
probed); sizes are computed by arithmetic on the config's shapes.
"""

from jepatune.spaces._named import DEFAULT_SPACE, NO_SWA_FROM, SPACES, get_space
from jepatune.spaces._size import (
    BEST_ZLIB_RATIO,
    DEFAULT_CODE_BYTES,
    SIZE_CAP_BYTES,
    count_parameters,
    estimate_artifact_bytes,
    fits_cap,
    memory_floor_bytes,
    memory_violation,
    min_total_bytes,
    quantized_payload_bytes,
    size_violation,
    tensor_shapes,
)
from jepatune.spaces._space import CONSTRAINT_KEY, FAILURE_CONSTRAINT, INFEASIBLE_KEY, Dim, Space, violation_of
from jepatune.spaces._user import load_space

__all__ = [
    "BEST_ZLIB_RATIO",
    "CONSTRAINT_KEY",
    "DEFAULT_CODE_BYTES",
    "DEFAULT_SPACE",
    "FAILURE_CONSTRAINT",
    "INFEASIBLE_KEY",
    "NO_SWA_FROM",
    "SIZE_CAP_BYTES",
    "SPACES",
    "Dim",
    "Space",
    "violation_of",
    "count_parameters",
    "estimate_artifact_bytes",
    "fits_cap",
    "get_space",
    "load_space",
    "memory_floor_bytes",
    "memory_violation",
    "min_total_bytes",
    "quantized_payload_bytes",
    "size_violation",
    "tensor_shapes",
]
