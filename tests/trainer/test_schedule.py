import pytest

from jepatune.trainer.schedule import LossWeights, curriculum_weights, lr_multiplier, muon_momentum, progress

REF = dict(jepa_pure_frac=0.10, ce_pure_frac=0.80, jepa_weight=1.0, sigreg_weight=0.05)


@pytest.mark.parametrize("p, expected, stage", [  # (jepa, reg, ce)
    (0.00, (1.0, 0.05, 0.0), 1),
    (0.05, (1.0, 0.05, 0.0), 1),
    (0.10, (1.0, 0.05, 0.0), 1),     # bridge start: b = 0
    (0.45, (0.5, 0.025, 0.5), 2),    # halfway through the bridge
    (0.66, (0.2, 0.01, 0.8), 2),
    (0.80, (0.0, 0.0, 1.0), 3),
    (0.99, (0.0, 0.0, 1.0), 3),
])
def test_curriculum_matches_the_reference_table(p, expected, stage):
    w = curriculum_weights(p, **REF)
    assert w == pytest.approx(expected)
    assert w.stage == stage


def test_ce_from_step_zero_control():
    assert curriculum_weights(0.0, 0.0, 0.0, 1.0, 0.05) == LossWeights(jepa=0.0, reg=0.0, ce=1.0)


def test_lr_warmdown_by_steps():
    assert lr_multiplier(0, 20_000, 2000) == 1.0
    assert lr_multiplier(17_999, 20_000, 2000) == 1.0
    assert lr_multiplier(18_000, 20_000, 2000) == 1.0
    assert lr_multiplier(19_000, 20_000, 2000) == pytest.approx(0.5)
    assert lr_multiplier(19_999, 20_000, 2000) == pytest.approx(1 / 2000)
    # a 2000-step warm-down on a 300-step trial decays from step 0 ...
    assert lr_multiplier(0, 300, 2000) == pytest.approx(300 / 2000)
    # ... so short trials use a fraction of their budget
    assert lr_multiplier(0, 300, 2000, warmdown_frac=0.5) == 1.0
    assert lr_multiplier(225, 300, 2000, warmdown_frac=0.5) == pytest.approx(0.5)


def test_lr_warmdown_by_wallclock():
    # 1000 steps in 500 s -> 0.5 s/step; 2000 avg steps = 1000 s of warm-down
    assert lr_multiplier(1000, 20_000, 2000, elapsed_s=500, max_wallclock_s=3600) == 1.0
    assert lr_multiplier(6000, 20_000, 2000, elapsed_s=3000, max_wallclock_s=3600) == pytest.approx(600 / 1000)
    assert lr_multiplier(10, 20_000, 0, elapsed_s=3599, max_wallclock_s=3600) == 1.0
    assert lr_multiplier(10, 20_000, 2000, elapsed_s=2700, max_wallclock_s=3600, warmdown_frac=0.5) == \
        pytest.approx(0.5)


def test_muon_momentum_warmup_and_progress():
    assert muon_momentum(0, 0.85, 0.95, 500) == pytest.approx(0.85)
    assert muon_momentum(250, 0.85, 0.95, 500) == pytest.approx(0.90)
    assert muon_momentum(900, 0.85, 0.95, 500) == pytest.approx(0.95)
    assert progress(50, 200) == 0.25
    assert progress(50, 200, elapsed_s=900, max_wallclock_s=3600) == 0.25
