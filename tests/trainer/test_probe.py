"""The probe fidelity: a pure-CE cool-down branch at each evaluation, undone afterwards."""

import math

from conftest import keep_checkpoint_at

from jepatune.trainer.loop import train


def evals(history):
    return [h for h in history if not h.get("final")]


def test_probes_leave_the_main_run_untouched_and_are_counted(tiny):
    config = tiny.replace(val_loss_every=0, eval_steps=(3, 6, 9), regularizer="lejepa")
    plain = train(config)
    probed = train(config.replace(probe_steps=2))
    # The main run reads the same data, takes the same steps and ends with the same weights.
    assert [(h["step"], h["val_bpb"], h["train_loss"]) for h in evals(probed.history)] == \
           [(h["step"], h["val_bpb"], h["train_loss"]) for h in evals(plain.history)]
    assert probed.summary["val_bpb"] == plain.summary["val_bpb"]
    points = evals(probed.history)
    assert [("probe_bpb" in h) for h in points] == [True, True, True, False]  # none at the end: it is final
    assert all(math.isfinite(h["probe_bpb"]) for h in points[:3])
    assert [h["compute_steps"] for h in points] == [3 + 2, 6 + 4, 9 + 6, 12 + 6]
    assert [h["compute_steps"] for h in evals(plain.history)] == [3, 6, 9, 12]


def test_a_probe_trains_cross_entropy_only(tiny):
    # At step 3 the main run is in pure JEPA (jepa_pure_frac=0.25 of 12): its head has seen no CE, so
    # a short CE cool-down must lower the BPB a lot; a longer one lowers it further.
    config = tiny.replace(val_loss_every=0, eval_steps=(3,))
    short = evals(train(config.replace(probe_steps=2)).history)[0]
    longer = evals(train(config.replace(probe_steps=6)).history)[0]
    assert longer["probe_bpb"] < short["probe_bpb"] < short["val_bpb"]
    assert longer["val_bpb"] == short["val_bpb"]


def test_probe_cost_survives_a_resume(tiny, tmp_path):
    config = tiny.replace(val_loss_every=0, eval_steps=(6,), probe_steps=3)
    saved = tmp_path / "mid.pt"
    full = train(config, report=keep_checkpoint_at(6, saved), checkpoint_dir=tmp_path / "ckpt")
    resumed = train(config, resume_from=saved)
    assert evals(resumed.history)[-1]["compute_steps"] == evals(full.history)[-1]["compute_steps"] == 15
    assert resumed.summary["val_bpb"] == full.summary["val_bpb"]
