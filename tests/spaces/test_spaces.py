"""Search spaces: real Optuna sweeps, size arithmetic against the real model and export, user TOML spaces."""

from __future__ import annotations

import io
import pickle
import random
import subprocess
import sys
import textwrap

import numpy as np
import optuna
import pytest

from jepatune.errors import SpaceError
from jepatune.spaces import (
    BEST_ZLIB_RATIO,
    INFEASIBLE_KEY,
    SIZE_CAP_BYTES,
    SPACES,
    count_parameters,
    estimate_artifact_bytes,
    fits_cap,
    get_space,
    load_space,
    quantized_payload_bytes,
    tensor_shapes,
    violation_of,
)
from jepatune.spaces._space import KNOBS
from jepatune.trainer.config import TrainConfig, apply_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)
DERIVED_PARAMS = {"bridge_share", "swa_start"}  # parameters that are not knobs themselves
REFERENCE_ARTIFACT_BYTES = 15_080_959  # bytejepa.md: the reference's int8+zlib model bytes


def _recipe(c: TrainConfig) -> dict:
    """What a config does, with equivalent spellings made equal: an explicit SWA start equal to
    ce_pure_frac, and a warm-down fraction that rounds to the same step count."""
    d = c.to_dict()
    d["swa_start_frac"] = c.swa_start if c.swa_enabled else None
    d["warmdown_iters"] = round(c.warmdown_frac * c.iterations) if c.warmdown_frac > 0 else c.warmdown_iters
    del d["warmdown_frac"]
    return d


def _write(tmp_path, text: str, name: str = "space.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- named spaces ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPACES))
def test_named_space_tpe_sweep(name):
    space = get_space(name)
    base = TrainConfig()
    assert space.name == name and set(space.params) <= KNOBS | DERIVED_PARAMS
    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True)  # reads the trials' own constraints
    study = optuna.create_study(sampler=sampler)
    study.enqueue_trial(space.reference_point())
    rng = random.Random(0)
    swa_off = swa_on = infeasible = 0
    for i in range(300):
        trial = study.ask()
        out = space.sample(trial)
        reason = out.pop(INFEASIBLE_KEY, None)
        assert set(out) <= KNOBS, set(out) - KNOBS
        config = apply_overrides(base, out)  # valid even when infeasible (the size cap is not a config rule)
        assert config.ce_pure_frac >= config.jepa_pure_frac
        violation = violation_of(study.trials[-1])
        assert (violation > 0) == (reason is not None), (violation, reason)
        if i == 0:
            assert trial.params == space.reference_point()
            assert reason is None and _recipe(config) == _recipe(base)
        if reason is not None:
            infeasible += 1
            assert name == "full" and "cap" in reason and not fits_cap(config)
        elif name == "full":
            assert fits_cap(config)
        if "swa_start" in trial.params:
            assert config.swa_enabled == (trial.params["swa_start"] < 1.0)
            swa_off += not config.swa_enabled and config.swa_start_frac is None
            swa_on += config.swa_enabled and config.swa_start_frac == trial.params["swa_start"]
        study.tell(trial, rng.random())
    # every trial carries its constraint, feasible or not
    assert all("space" in t.constraints for t in study.trials)
    if name in ("curriculum", "full"):
        assert swa_off > 0 and swa_on > 0, "the no-SWA region must be reachable"
    assert (infeasible > 0) == (name == "full")


def test_get_space_default_and_unknown_name():
    assert get_space().name == "curriculum"
    with pytest.raises(SpaceError, match="did you mean 'curriculum'"):
        get_space("curriculm")
    with pytest.raises(SpaceError, match="does not exist"):
        get_space("nowhere/space.toml")


def test_reference_point_follows_base_clipped():
    base = TrainConfig(jepa_pure_frac=0.2, ce_pure_frac=0.9, sigreg_weight=5.0, swa_enabled=False,
                       warmdown_frac=0.3, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=3)
    ref = get_space("curriculum", base).reference_point()
    assert ref == {"jepa_pure_frac": 0.2, "bridge_share": pytest.approx(0.875), "sigreg_weight": 1.0, "swa_start": 1.05}
    out = get_space("curriculum", base).overrides(ref)
    assert (out["ce_pure_frac"], out["swa_enabled"], out["swa_start_frac"]) == (0.9, False, None)
    assert get_space("optimizer", base).reference_point()["warmdown_frac"] == 0.3
    full = get_space("full", base).reference_point()
    assert (full["num_layers"], full["model_dim"], full["num_heads"], full["mlp_mult"]) == (4, 256, 4, 3)
    # Out-of-range stage fractions are clipped, and ce >= jepa still holds.
    late = TrainConfig(jepa_pure_frac=0.7, ce_pure_frac=0.75)
    ref = get_space("curriculum", late).reference_point()
    assert ref["jepa_pure_frac"] == 0.6 and ref["bridge_share"] == pytest.approx(0.375)
    assert get_space("curriculum", late).overrides(ref)["ce_pure_frac"] == 0.75
    # A base with no CE stage, and one with no bridge, are still exactly representable.
    for jepa, ce in ((0.1, 1.0), (0.3, 0.3), (0.0, 0.0), (0.6, 1.0)):
        space = get_space("curriculum", TrainConfig(jepa_pure_frac=jepa, ce_pure_frac=ce))
        assert space.overrides(space.reference_point())["ce_pure_frac"] == ce


def test_curriculum_reference_maps_back_exactly():
    space = get_space("curriculum")
    ref = space.reference_point()
    assert space.dims[1].contains(ref["bridge_share"])
    out = space.overrides(ref)
    assert (out["jepa_pure_frac"], out["ce_pure_frac"]) == (0.1, 0.8) == (TrainConfig().jepa_pure_frac,
                                                                          TrainConfig().ce_pure_frac)
    # Every base on a 0.01 grid (within the jepa range) gives its own ce_pure_frac back exactly.
    for a in range(0, 61, 3):
        for c in range(a, 101, 7):
            base = TrainConfig(jepa_pure_frac=a / 100, ce_pure_frac=c / 100)
            space = get_space("curriculum", base)
            assert space.overrides(space.reference_point())["ce_pure_frac"] == c / 100


def test_curriculum_prior_has_no_spike_at_no_ce_stage():
    """Uniform draws of the parameters (the prior TPE starts from): ce_pure_frac >= jepa_pure_frac
    always, and hardly any draw lands on "no cross-entropy stage" (the old jepa + bridge
    length capped at 1 put about 23% of the mass there)."""
    space = get_space("curriculum")
    rng = np.random.default_rng(0)
    draws = 20_000
    columns = {}
    for d in space.dims:
        low, high = (np.log(d.low), np.log(d.high)) if d.log else (d.low, d.high)
        u = rng.uniform(low, high, draws)
        columns[d.name] = np.exp(u) if d.log else u
    jepa, ce = [], []
    for k in range(draws):
        out = space.overrides({name: float(v[k]) for name, v in columns.items()})
        assert INFEASIBLE_KEY not in out
        jepa.append(out["jepa_pure_frac"])
        ce.append(out["ce_pure_frac"])
    jepa, ce = np.array(jepa), np.array(ce)
    assert (ce >= jepa).all()
    no_ce = (ce >= 0.999).mean()
    assert no_ce < 0.05, no_ce
    # The stage split still covers its range: CE can start early or late.
    assert (ce >= 0.95).mean() > 0.01 and ce.min() < 0.05


def test_full_marks_oversize_shapes_infeasible():
    space = get_space("full")
    ref = space.reference_point()
    assert (ref["num_layers"], ref["model_dim"], ref["num_heads"], ref["mlp_mult"]) == (9, 512, 8, 2)
    out = space.overrides(ref)
    assert INFEASIBLE_KEY not in out and out["num_kv_heads"] == 4
    for shape in ({"num_layers": 12}, {"num_layers": 16, "model_dim": 768, "mlp_mult": 4}, {"mlp_mult": 4}):
        assert "cap" in space.overrides({**ref, **shape})[INFEASIBLE_KEY]
    assert INFEASIBLE_KEY not in space.overrides({**ref, "num_layers": 16, "model_dim": 256, "mlp_mult": 4})
    # The code shipped beside the artifact counts against the cap too.
    assert INFEASIBLE_KEY in get_space("full", code_bytes=2_000_000).overrides(ref)
    # Through a trial: the constraint is recorded, nothing is raised.
    study = optuna.create_study()
    study.enqueue_trial({**ref, "num_layers": 16})
    assert INFEASIBLE_KEY in space.sample(study.ask()) and violation_of(study.trials[-1]) > 0


def test_space_overrides_ignores_extra_keys_and_needs_all_params():
    space = get_space("curriculum")
    ray_config = {**space.reference_point(), "ce_pure_frac": 0.8, "swa_enabled": True}
    assert space.overrides(ray_config)["ce_pure_frac"] == 0.8
    with pytest.raises(SpaceError, match="bridge_share"):
        space.overrides({"jepa_pure_frac": 0.1})


def test_spaces_pickle(tmp_path):
    """Ray pickles the searcher, and with it the space, in its experiment snapshots."""
    for space in [*(get_space(n) for n in SPACES), get_space(_write(tmp_path, VALID))]:
        again = pickle.loads(pickle.dumps(space))
        ref = space.reference_point()
        assert again.reference_point() == ref and again.overrides(ref) == space.overrides(ref)


def test_through_ray_optuna_search():
    """Ray hands the define-by-run function a proxy and merges the raw parameters into the config."""
    optuna_search = pytest.importorskip("ray.tune.search.optuna")
    space = get_space("curriculum")
    searcher = optuna_search.OptunaSearch(
        space=space.sample, metric="bpb", mode="min", sampler=optuna.samplers.RandomSampler(seed=0),
        points_to_evaluate=[{**space.reference_point(), "swa_start": 1.02}])
    config = searcher.suggest("t0")
    assert config["swa_start_frac"] is None and config["swa_enabled"] is False and config["ce_pure_frac"] == 0.8
    assert violation_of(searcher._ot_study.trials[0]) == 0.0
    assert space.overrides(config) == {k: v for k, v in config.items() if k not in DERIVED_PARAMS}


# --- sizes ---------------------------------------------------------------------------------------

SHAPES = [
    dict(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1),
    dict(num_layers=3, model_dim=320, num_heads=4, num_kv_heads=2, mlp_mult=1, tie_embeddings=False),
    dict(num_layers=4, model_dim=384, num_heads=8, num_kv_heads=4, save_predictor=False),
    dict(num_layers=5, model_dim=96, num_heads=4, num_kv_heads=1, mlp_mult=3),
]


def test_parameter_count_and_shapes_match_the_model():
    from jepatune.trainer.model import build_model
    from jepatune.trainer.model import count_parameters as model_count

    assert count_parameters(TrainConfig()) == 17_190_984
    for kw in [{}, *SHAPES]:
        c = TrainConfig(**kw)
        model = build_model(c)
        assert count_parameters(c) == model_count(model)
        assert tensor_shapes(c) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_constants_match_export():
    from jepatune.spaces import _size
    from jepatune.trainer import export, model

    assert SIZE_CAP_BYTES == export.SIZE_CAP_BYTES
    assert _size.KEEP_FLOAT_MAX_NUMEL == export.KEEP_FLOAT_MAX_NUMEL
    for name in tensor_shapes(TrainConfig(tie_embeddings=False)):
        assert model.is_control(name) == any(p in name for p in _size.CONTROL_TENSOR_PATTERNS), name
    # The zlib ratio that decides "cannot fit" must stay optimistic against the one measured artifact.
    assert BEST_ZLIB_RATIO <= REFERENCE_ARTIFACT_BYTES / estimate_artifact_bytes(TrainConfig())
    assert fits_cap(TrainConfig()) and not fits_cap(TrainConfig(num_layers=11))


@pytest.mark.parametrize("kw", SHAPES, ids=lambda kw: f"{kw['num_layers']}x{kw['model_dim']}")
def test_estimate_bounds_the_artifact(kw):
    import torch

    from jepatune.trainer import export
    from jepatune.trainer.model import build_model

    c = TrainConfig(**kw)
    torch.manual_seed(0)
    state = build_model(c).state_dict()
    if not c.save_predictor:
        state = export.drop_predictor(state)
    estimate = estimate_artifact_bytes(c)
    obj, stats = export.quantize_state_dict(state)
    assert quantized_payload_bytes(c) == stats["int8_payload_bytes"]
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = len(buf.getvalue())
    # The framing constants bound torch.save's framing tightly.
    assert raw <= estimate <= raw * 1.02 + 1000, (estimate, raw)
    assert len(export.artifact_bytes(state)[0]) <= estimate  # freshly initialised: zeros compress
    # Incompressible weights (uniform int8 codes): the estimate is still an upper bound, and
    # a close one where the big matrices are quantised.
    noisy = {k: torch.rand_like(v) * 2 - 1 for k, v in state.items()}
    blob = len(export.artifact_bytes(noisy)[0])
    assert blob <= estimate
    if c.model_dim >= 320:
        assert estimate <= 1.10 * blob, (estimate, blob)


# --- user spaces -------------------------------------------------------------------------------

VALID = """
    name = "my-space"
    [params.jepa_pure_frac]
    low = 0.0
    high = 0.5
    [params.sigreg_weight]
    low = 1e-3
    high = 1.0
    log = true
    [params.num_layers]
    low = 4
    high = 12
    step = 2
    [params.regularizer]
    choices = ["varcov", "lejepa"]
    [params.matrix_lr]
    low = 0.01
    high = 0.1
    [fixed]
    model_dim = 256
    save_predictor = false
"""


def test_user_space_samples_correctly(tmp_path):
    space = get_space(_write(tmp_path, VALID))
    assert space.name == "my-space" and space.fixed == {"model_dim": 256, "save_predictor": False}
    assert space.params == ("jepa_pure_frac", "sigreg_weight", "num_layers", "regularizer", "matrix_lr")
    # The base value where the range allows it, else the midpoint (on the step grid).
    ref = space.reference_point()
    assert ref == {"jepa_pure_frac": 0.1, "sigreg_weight": 0.05, "num_layers": 8, "regularizer": "varcov",
                   "matrix_lr": 0.04}
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True))
    study.enqueue_trial(ref)
    log_low = 0
    for i in range(60):
        trial = study.ask()
        out = space.sample(trial)
        assert INFEASIBLE_KEY not in out and violation_of(study.trials[-1]) == 0.0
        assert type(out["num_layers"]) is int and out["num_layers"] in (4, 6, 8, 10, 12)
        assert type(out["jepa_pure_frac"]) is float and 0.0 <= out["jepa_pure_frac"] <= 0.5
        assert 1e-3 <= out["sigreg_weight"] <= 1.0 and out["regularizer"] in ("varcov", "lejepa")
        assert out["model_dim"] == 256 and out["save_predictor"] is False
        log_low += out["sigreg_weight"] < 0.03
        if i == 0:
            assert trial.params == ref
        config = space.config(out)
        assert config.model_dim == 256 and config.num_layers == out["num_layers"]
        study.tell(trial, out["jepa_pure_frac"])
    # log-uniform puts about half the draws below the geometric midpoint (0.03); uniform would put 3%.
    assert log_low >= 10


def test_user_space_marks_invalid_combinations_infeasible(tmp_path):
    path = _write(tmp_path, """
        [params.jepa_pure_frac]
        low = 0.0
        high = 0.9
        [params.model_dim]
        choices = [512, 72]
        [fixed]
        ce_pure_frac = 0.5
    """)
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    reasons = []
    for _ in range(40):
        trial = study.ask()
        out = space.sample(trial)
        violation = violation_of(study.trials[-1])
        assert (INFEASIBLE_KEY in out) == (violation > 0)
        if INFEASIBLE_KEY in out:
            reasons.append(out[INFEASIBLE_KEY])
        else:
            space.config(out)
    assert any("jepa_pure_frac" in r for r in reasons) and any("odd head dim" in r for r in reasons)


def test_impossible_user_space_is_refused(tmp_path):
    path = _write(tmp_path, """
        [params.jepa_pure_frac]
        low = 0.5
        high = 0.9
        [fixed]
        ce_pure_frac = 0.1
    """)
    with pytest.raises(SpaceError, match=r"no feasible point.*jepa_pure_frac"):
        get_space(path)


def test_user_space_with_size_cap(tmp_path):
    path = _write(tmp_path, """
        size_cap = true
        [params.num_layers]
        low = 9
        high = 30
    """)
    space = get_space(path)
    assert INFEASIBLE_KEY not in space.overrides({"num_layers": 9})
    assert "cap" in space.overrides({"num_layers": 30})[INFEASIBLE_KEY]


def test_a_path_without_toml_suffix_is_loaded(tmp_path):
    assert get_space(_write(tmp_path, VALID, name="space.txt")).name == "my-space"


R = "[params.jepa_pure_frac]\nlow = 0.0\nhigh = 0.5\n"  # a valid param to pair with a broken [fixed]
ERRORS = {
    "unknown-knob": ("[params.jepa_pure_fra]\nlow = 0.0\nhigh = 0.5\n", ["jepa_pure_fra", "jepa_pure_frac"]),
    "empty-range": ("[params.sigreg_weight]\nlow = 0.1\nhigh = 0.1\n", ["params.sigreg_weight", "empty range"]),
    "low-above-high": ("[params.sigreg_weight]\nlow = 0.5\nhigh = 0.1\n", ["params.sigreg_weight", "swap"]),
    "log-touching-0": ("[params.sigreg_weight]\nlow = 0.0\nhigh = 1.0\nlog = true\n", ["sigreg_weight", "log"]),
    "log-crossing-0": ("[params.matrix_lr]\nlow = -1.0\nhigh = 1.0\nlog = true\n", ["matrix_lr", "log"]),
    "missing-high": ("[params.matrix_lr]\nlow = 0.01\n", ["matrix_lr", "'high'"]),
    "missing-range-and-choices": ("[params.matrix_lr]\nlog = true\n", ["matrix_lr", "choices"]),
    "range-and-choices": ("[params.mlp_mult]\nlow = 1\nhigh = 3\nchoices = [1, 2]\n", ["mlp_mult", "not both"]),
    "empty-choices": ("[params.mlp_mult]\nchoices = []\n", ["mlp_mult", "non-empty"]),
    "wrong-choice-type": ('[params.model_dim]\nchoices = [256, "512"]\n', ["model_dim", "'512'"]),
    "range-on-str": ('[params.regularizer]\nlow = 0\nhigh = 1\n', ["regularizer", "choices"]),
    "range-on-bool": ('[params.tie_embeddings]\nlow = 0\nhigh = 1\n', ["tie_embeddings", "choices"]),
    "float-range-on-int": ("[params.num_layers]\nlow = 4.5\nhigh = 8\n", ["num_layers", "integer"]),
    "log-with-step": ("[params.num_layers]\nlow = 4\nhigh = 8\nstep = 2\nlog = true\n", ["num_layers", "step"]),
    "unknown-param-key": ("[params.num_layers]\nlo = 4\nhigh = 8\n", ["num_layers", "'lo'", "'low'"]),
    "list-knob": ("[params.eval_steps]\nchoices = [1, 2]\n", ["eval_steps", "[fixed]"]),
    "fixed-wrong-type": (R + '[fixed]\nmodel_dim = "big"\n', ["model_dim", "'big'"]),
    "fixed-invalid": (R + "[fixed]\nmodel_dim = 100\n", ["[fixed]", "model_dim=100"]),
    "fixed-unknown": (R + "[fixed]\nmodel_dimm = 256\n", ["model_dimm", "'model_dim'"]),
    "fixed-and-searched": (R + "[fixed]\njepa_pure_frac = 0.2\n", ["jepa_pure_frac", "keep one"]),
    "no-params": ('name = "x"\n', ["no params", "[params."]),
    "unknown-top-key": ('parms = 1\n' + R, ["'parms'"]),
    "invalid-toml": ("[params.num_layers\nlow = 4\n", ["not valid TOML"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_user_space_errors_name_the_key(tmp_path, case):
    text, needles = ERRORS[case]
    path = _write(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        get_space(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_missing_or_unreadable_space_file(tmp_path):
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "missing.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(SpaceError, match="cannot be read"):
        get_space(tmp_path / "dir.toml")


def test_import_loads_no_heavy_modules():
    code = "import sys, jepatune.spaces; print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
