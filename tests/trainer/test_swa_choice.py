"""The SWA start chosen at the end of a run (`swa_start_choices`): one average per start, kept beside
the main one without touching the training, and the one that ships is the best on train bytes that
no step read."""

import pytest
import torch
from conftest import keep_checkpoint_at

from jepatune.errors import ConfigError
from jepatune.trainer.data import TokenStream
from jepatune.trainer.final import shipped_bpb
from jepatune.trainer.loop import Trainer, train

CHOICES = (0.25, 0.75, 1.0)


def run_to_the_end(config) -> Trainer:
    run = Trainer(config)
    while run.state.step < config.iterations:
        run.train_step(elapsed=0.0)
    return run


def test_each_choice_is_the_average_a_run_with_that_start_keeps(tiny):
    chosen = run_to_the_end(tiny.replace(swa_start_choices=CHOICES))
    assert sorted(chosen.state.swa_choices) == list(CHOICES)  # and the main one, from 0.5, apart
    for start in (0.25, 0.75):
        alone = run_to_the_end(tiny.replace(swa_start_frac=start))
        for name, value in alone.state.swa.avg.items():
            assert torch.equal(chosen.state.swa_choices[start].avg[name], value), (start, name)
    plain = run_to_the_end(tiny)
    assert all(torch.equal(a, b) for a, b in zip(chosen.model.state_dict().values(),
                                                  plain.model.state_dict().values(), strict=True))
    assert all(torch.equal(a, plain.state.swa.avg[k]) for k, a in chosen.state.swa.avg.items())
    # an average from 1.0 starts after the last step: it is the raw weights
    last = chosen.state.swa_choices[1.0].averaged_state(chosen.model)
    assert all(torch.equal(last[k], v) for k, v in chosen.model.state_dict().items())


def test_the_run_ships_the_start_that_scores_best_on_train_bytes_no_step_read(tiny):
    c = tiny.replace(swa_start_choices=CHOICES, swa_select_tokens=2048)
    result = train(c, final_score=False)
    seen = result.summary["swa_select_bpb"]
    assert set(seen) == {"0.25", "0.5", "0.75", "1"}
    best = min(seen, key=seen.get)
    assert result.summary["swa_start_shipped"] == float(best)
    assert result.summary["val_bpb"] == result.summary["avg_q_bpb"]

    # The same numbers from the bytes that follow the ones the steps read, found independently.
    run = run_to_the_end(c)
    stream = TokenStream(run.train_files)
    stream.take(c.iterations * c.grad_accum_steps * (c.train_batch_tokens // c.grad_accum_steps + 1))
    tokens = stream.take(2048 + 1)
    averages = {0.5: run.state.swa, **run.state.swa_choices}
    for start, avg in averages.items():
        bpb = shipped_bpb(run.model, run.evaluate, avg.averaged_state(run.model), tokens, c.save_predictor)[0]
        assert bpb == seen[f"{start:g}"], start
    assert len(set(seen.values())) > 1  # the starts differ, so the choice is a choice


def test_without_choices_the_main_average_ships_and_nothing_is_read_after_the_last_step(tiny):
    result = train(tiny, final_score=False)
    assert result.summary["swa_start_shipped"] == tiny.swa_start and "swa_select_bpb" not in result.summary
    for c in (tiny.replace(swa_enabled=False), tiny.replace(swa_enabled=False, swa_start_choices=CHOICES)):
        assert train(c, final_score=False).summary["swa_start_shipped"] is None  # no average: the raw weights


def test_a_resumed_run_makes_the_same_choice(tiny, tmp_path):
    c = tiny.replace(swa_start_choices=CHOICES, swa_select_tokens=2048)
    saved = tmp_path / "mid.pt"
    full = train(c, report=keep_checkpoint_at(8, saved), checkpoint_dir=tmp_path / "ckpt")
    resumed = train(c, resume_from=saved)
    for key in ("swa_select_bpb", "swa_start_shipped", "val_bpb"):
        assert resumed.summary[key] == full.summary[key], key


@pytest.mark.parametrize("changes, message", [
    ({"swa_start_choices": (0.5, 1.5)}, "must be fractions in [0, 1]"),
    ({"swa_select_tokens": 0}, "must be positive"),
])
def test_bad_choices_are_one_config_error(tiny, changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny.replace(**changes)


def test_choices_parse_from_the_command_line_as_fractions(tiny):
    assert tiny.replace(swa_start_choices="0.6, 0.9 1").swa_start_choices == (0.6, 0.9, 1.0)
    assert tiny.replace(swa_start_choices=[1, 0.5]).swa_start_choices == (1.0, 0.5)
