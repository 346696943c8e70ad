import dataclasses

import pytest

from jepatune.errors import ConfigError
from jepatune.trainer.config import PRESETS, TrainConfig, apply_overrides, load_config, parse_set_args


def test_defaults_are_the_reference():
    c = TrainConfig()
    assert (c.vocab_size, c.num_layers, c.model_dim, c.num_heads, c.num_kv_heads, c.mlp_mult) == (256, 9, 512, 8, 4, 2)
    assert (c.train_seq_len, c.train_batch_tokens, c.grad_accum_steps) == (4096, 524_288, 8)
    assert (c.jepa_pure_frac, c.ce_pure_frac, c.sigreg_weight, c.jepa_weight) == (0.10, 0.80, 0.05, 1.0)
    assert (c.matrix_lr, c.scalar_lr, c.tied_embed_lr, c.muon_momentum) == (0.04, 0.04, 0.05, 0.95)
    assert (c.warmdown_iters, c.muon_momentum_warmup_start, c.muon_momentum_warmup_steps) == (2000, 0.85, 500)
    assert c.swa_decay == 0.995 and c.swa_start == c.ce_pure_frac and c.regularizer == "varcov"
    assert c.save_predictor and not c.swa_fp32_shadow  # the reference's quirks, by default


def test_set_overrides_are_coerced_to_the_field_type():
    c = apply_overrides(TrainConfig(), parse_set_args(
        ["model_dim=256", "swa_start_frac=0.7", "compile=true", "regularizer=lejepa", "eval_steps=10,20"]))
    assert c.model_dim == 256 and c.swa_start_frac == 0.7 and c.compile is True
    assert c.regularizer == "lejepa" and c.eval_steps == (10, 20)
    assert apply_overrides(c, {"swa_start_frac": "none"}).swa_start == c.ce_pure_frac


@pytest.mark.parametrize("overrides, key", [
    ({"modl_dim": "256"}, "model_dim"),  # unknown key suggests the nearest
    ({"jepa_pure_frac": "1.5"}, "jepa_pure_frac"),
    ({"jepa_pure_frac": "0.9"}, "jepa_pure_frac"),  # > ce_pure_frac
    ({"model_dim": "500"}, "model_dim"),  # not divisible by 8 heads
    ({"num_kv_heads": "3"}, "num_heads"),
    ({"model_dim": "abc"}, "model_dim"),
    ({"regularizer": "vicreg"}, "regularizer"),
    ({"swa_decay": "1.0"}, "swa_decay"),
    ({"train_batch_tokens": "1000"}, "train_batch_tokens"),
])
def test_impossible_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(TrainConfig(), overrides)


def test_direct_construction_is_type_checked():
    with pytest.raises(ConfigError, match="num_layers"):
        TrainConfig(num_layers="9")


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_args(["model_dim"])


def test_toml_round_trip_and_errors(tmp_path):
    c = TrainConfig(model_dim=256, swa_start_frac=0.6, eval_steps=(5, 9), data_path="x y")
    path = tmp_path / "c.toml"
    path.write_text(c.to_toml())
    assert load_config(path) == c
    path.write_text("model_dim = 256\nbogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(path)
    path.write_text("model_dim = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_every_preset_is_valid():
    for name, overrides in PRESETS.items():
        c = apply_overrides(TrainConfig(), overrides)
        assert dataclasses.asdict(c), name


def test_a_stored_config_with_a_retired_knob_still_loads():
    stored = {**TrainConfig(model_dim=256).to_dict(), "ce_weight": 0.1}  # as older versions wrote it
    assert TrainConfig.from_dict(stored) == TrainConfig(model_dim=256)
    with pytest.raises(ConfigError, match="ce_weight"):  # but a user's override of it is an unknown key
        apply_overrides(TrainConfig(), {"ce_weight": "0.1"})
